"""The package's layering holds: the import-linter contracts of pyproject.toml (layers, independent feature
packages, no import cycle, the CLI's dependencies kept in the CLI), and nothing outside `edgequant.sim` reaches
into a private member of a `QuantSim` (the sim's internals may change without notice to other packages)."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "edgequant"


def test_import_contracts_are_kept() -> None:
    """`lint-imports` on this checkout's sources (grimp reads every import statement, those inside functions too)."""
    if importlib.util.find_spec("importlinter") is None:
        if sys.version_info < (3, 11):  # import-linter 2.17 and grimp 3.20 need 3.11: the test extra skips them
            pytest.skip("import-linter needs Python 3.11 or later")
        pytest.fail("import-linter is missing: pip install -c constraints.txt -e '.[test]'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "160", "NO_COLOR": "1"}
    command = ("from importlinter.cli import lint_imports_command; "
               "lint_imports_command.main(['pyproject.toml', '--no-cache'])")
    result = subprocess.run([sys.executable, "-c", command], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    report = result.stdout[result.stdout.find("Contracts"):] + result.stderr
    assert result.returncode == 0, f"import contracts broken (pyproject.toml [tool.importlinter]):\n{report}"
    assert "0 broken" in report and "kept" in report, report


def _annotated_as_sim(annotation: ast.expr | None) -> bool:
    return annotation is not None and "QuantSim" in ast.unparse(annotation)


def _is_sim(node: ast.expr, sim_names: set[str]) -> bool:
    """Whether ``node`` denotes a QuantSim: a name or attribute called ``*sim`` (``sim``, ``self.sim``,
    ``quant_sim``), the class itself, or a name annotated ``QuantSim`` in the enclosing function."""
    if isinstance(node, ast.Name):
        return node.id.lower().endswith("sim") or node.id in sim_names
    return isinstance(node, ast.Attribute) and node.attr.lower().endswith("sim")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_sim_accesses(source: str, sim_private_names: frozenset[str] = frozenset()) -> list[tuple[int, str]]:
    """``(line, expression)`` of every private member reached on a QuantSim in ``source``: ``sim._x``,
    ``getattr(sim, "_x")``, and any of ``sim_private_names`` (the QuantSim's own) on anything but self/cls."""
    tree = ast.parse(source)
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, sim_names: set[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            sim_names = sim_names | {a.arg for a in arguments if _annotated_as_sim(a.annotation)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and _annotated_as_sim(
                node.annotation):
            sim_names.add(node.target.id)
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            receiver = node.value
            on_self = isinstance(receiver, ast.Name) and receiver.id in ("self", "cls")
            if _is_sim(receiver, sim_names) or (node.attr in sim_private_names and not on_self):
                found.append((node.lineno, ast.unparse(node)))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                and _is_private(node.args[1].value) and _is_sim(node.args[0], sim_names)):
            found.append((node.lineno, ast.unparse(node)))
        for child in ast.iter_child_nodes(node):
            visit(child, sim_names)

    visit(tree, set())
    return found


def quantsim_private_names() -> frozenset[str]:
    """The private methods and attributes the QuantSim class defines (``def _x`` and ``self._x = ...``)."""
    tree = ast.parse((PACKAGE / "sim" / "quantsim.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "QuantSim")
    names = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for node in ast.walk(cls):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(element, ast.Attribute) and isinstance(element.value, ast.Name) and \
                        element.value.id == "self":
                    names.add(element.attr)
    return frozenset(name for name in names if _is_private(name))


def test_no_module_outside_sim_touches_a_private_member_of_the_sim() -> None:
    private = quantsim_private_names()
    assert {"_notes", "_prepare", "_emulation"} <= private  # the scan sees the class it protects
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "sim") in path.parents:
            continue
        for line, expression in private_sim_accesses(path.read_text(encoding="utf-8"), private):
            problems.append(f"{path.relative_to(ROOT)}:{line}: {expression}")
    assert not problems, "private members of the sim used outside edgequant.sim (add a public API to the sim):\n" \
        + "\n".join(problems)


def test_private_member_scan_finds_each_form_of_reach_through() -> None:
    source = '''
def f(sim, other, qs: "QuantSim", maybe: QuantSim | None, setup):
    sim._notes
    setup.sim._emulation.plan
    quant_sim._prepare()
    QuantSim._wrap
    qs._in_place
    maybe._capture
    getattr(sim, "_observing")
    other._supergroup_members
    self._notes  # a class's own member
    sim.model._forward_pre_hooks  # the model's (torch) internals, not the sim's
    sim.__class__
    other._private_of_its_own
'''
    found = [expression for _, expression in private_sim_accesses(source, frozenset({"_supergroup_members",
                                                                                          "_notes"}))]
    assert found == ["sim._notes", "setup.sim._emulation", "quant_sim._prepare", "QuantSim._wrap", "qs._in_place",
                     "maybe._capture", "getattr(sim, '_observing')", "other._supergroup_members"]
