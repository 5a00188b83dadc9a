"""The documentation site (mkdocs.yml, docs/): it builds with ``mkdocs build --strict`` (no broken link, no
warning), its generated CLI and API pages hold what they document, and every ```python block of docs/**/*.md runs
as written. A block preceded by ``<!-- not run: why -->`` (a script for torchrun, say) is skipped, visibly.

The blocks run in one subprocess (torch and edgequant are imported once), each in a fresh namespace and a fresh
working folder, and each is reported as its own test."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(<!-- not run([^>]*)-->\s*)?```(python|bash)\n(.*?)```", re.S)

RUNNER = r"""
import json, os, sys, traceback
blocks, out, work = json.loads(open(sys.argv[1]).read()), sys.argv[2], sys.argv[3]
results = {}
for index, (where, code) in enumerate(blocks):
    folder = os.path.join(work, str(index))
    os.makedirs(folder)
    os.chdir(folder)
    try:
        exec(compile(code, where, "exec"), {"__name__": "__main__"})
        results[where] = None
    except BaseException:
        results[where] = traceback.format_exc()[-3000:]
with open(out, "w") as f:
    json.dump(results, f)
"""


def _blocks(language: str, page: Path | None = None) -> list[tuple[str, str, str | None]]:
    """(``page.md:line``, code, why it is not run or None) of every block of ``language`` in the docs."""
    found = []
    for path in [page] if page else sorted(DOCS.rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            if m.group(3) == language:
                where = f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}"
                found.append((where, m.group(4), m.group(2).strip(": ") if m.group(1) else None))
    return found


@pytest.fixture(scope="module")
def block_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | None]:
    work = tmp_path_factory.mktemp("doc_blocks")
    runnable = [(where, code) for where, code, why in _blocks("python") if why is None]
    (work / "blocks.json").write_text(json.dumps(runnable))
    (work / "runner.py").write_text(RUNNER)
    result = subprocess.run(
        [sys.executable, str(work / "runner.py"), str(work / "blocks.json"), str(work / "results.json"),
         str(work / "run")],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, f"the block runner failed:\n{result.stderr[-3000:]}"
    return json.loads((work / "results.json").read_text())


@pytest.mark.parametrize(("where", "code", "not_run"), _blocks("python"), ids=lambda v: str(v)[:40])
def test_python_block_runs(where: str, code: str, not_run: str | None,
                           block_results: dict[str, str | None]) -> None:
    if not_run is not None:
        assert not_run, f"{where}: a block that is not run says why (<!-- not run: why -->)"
        pytest.skip(f"{where} not run: {not_run}")
    assert block_results[where] is None, f"{where} failed:\n{block_results[where]}"


def test_index_commands_are_the_readme_commands() -> None:
    """The home page's install / run / test commands are the README's (which CI runs)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    readme_block = next(m.group(4) for m in BLOCK.finditer(readme) if m.group(3) == "bash" and not m.group(1))
    index_blocks = [code for _, code, why in _blocks("bash", DOCS / "index.md") if why is None]

    def commands(code: str) -> list[str]:
        return [line.split("#")[0].strip() for line in code.strip().splitlines()]

    assert index_blocks and all(commands(code) == commands(readme_block) for code in index_blocks)


def test_site_builds_strict(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip('mkdocs is not installed (pip install -c constraints.txt -e ".[docs]")')
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False, env=env,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-5000:]}"

    def page(path: str) -> str:
        return (site / path / "index.html").read_text(encoding="utf-8")

    assert "edgequant quantize" in (site / "index.html").read_text(encoding="utf-8")
    cli = page("cli")
    for command in ("quantize", "export", "verify", "autoquant", "analyze", "qat", "--scheme"):
        assert command in cli, f"the CLI page does not list {command}"
    assert 'id="edgequant.sim.QuantSim.compute_encodings"' in page("api/sim")
    assert 'id="edgequant.ptq.adaround.adaround"' in page("api/ptq")
    assert 'id="edgequant.workflows.autoquant.autoquant"' in page("api/workflows")
    assert 'id="edgequant.quantization.PerBlock"' in page("api/quantization")
    assert 'id="edgequant.llm.quantize.quantize"' in page("api/llm")
    assert (site / "assets/analysis_report.png").is_file()
    assert 'src="../../assets/analysis_report.png"' in page("guides/analysis")
