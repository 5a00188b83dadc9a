"""The README's code blocks run as written: every Python block, and the `edgequant` commands of the shell blocks
(the install and test commands of the first block that runs are what `.ci/run` itself runs). A block preceded by
``<!-- not run: why -->`` needs the user's own files or an index CI cannot reach, and is skipped here, visibly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- not run[^>]*-->\s*)?```(python|bash)\n(.*?)```", re.S)


def _blocks(language: str) -> list[tuple[int, str, bool]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group(3), bool(m.group(1)))
            for m in BLOCK.finditer(text) if m.group(2) == language]


@pytest.mark.parametrize(("line", "code", "not_run"), _blocks("python"), ids=lambda v: str(v)[:12])
def test_python_block_runs(line: int, code: str, not_run: bool, tmp_path: Path) -> None:
    assert not not_run, f"README.md:{line}: every Python block must run"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=900, check=False)
    assert result.returncode == 0, f"README.md:{line} failed:\n{result.stderr[-3000:]}"


def _commands() -> list[tuple[int, str]]:
    commands = []
    for line, code, not_run in _blocks("bash"):
        joined = code.replace("\\\n", " ")
        for command in joined.splitlines():
            command = command.split("#")[0].strip()
            if command.startswith("edgequant") and not not_run and command not in {c for _, c in commands}:
                commands.append((line, command))
    return commands


def test_install_and_test_commands_are_what_ci_runs() -> None:
    ci = (ROOT / ".ci/run").read_text()
    first_block = next(code for _, code, not_run in _blocks("bash") if not not_run)
    install, _, test = (line.split("#")[0].strip() for line in first_block.strip().splitlines())
    assert install in ci and test in ci


@pytest.mark.parametrize(("line", "command"), _commands(), ids=lambda v: str(v)[:30])
def test_shell_command_runs(line: int, command: str, tmp_path: Path) -> None:
    executable = Path(sys.executable).with_name("edgequant")
    argv = [str(executable) if executable.exists() else "edgequant", *command.split()[1:]]
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False)
    output = result.stdout[-2000:] + result.stderr[-2000:]
    assert result.returncode == 0, f"README.md:{line} `{command}` failed:\n{output}"
