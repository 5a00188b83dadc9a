"""The release a user installs: `python -m build` makes an sdist and, from that sdist, a wheel holding every module
and every data file the package reads at run time (hardware configs, demo weights, the C source compiled at first
use), the `edgequant` command, and the version of `edgequant.__version__`; no tests or benchmarks leak into it.

The build runs without isolation (the installed setuptools, no download) on a copy of the sources, so the checkout
is left untouched."""

from __future__ import annotations

import configparser
import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgequant
from edgequant.cli import main

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "edgequant"
BUILD_INPUTS = ("pyproject.toml", "MANIFEST.in", "README.md", "CHANGELOG.md", "constraints.txt")
# copied too, so that a packaging setting that picks them up shows in the wheel
NOT_SHIPPED = ("tests", "benchmarks")
JUNK = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.egg-info", ".pytest_cache")


def _package_files() -> set[str]:
    """Every file of src/edgequant (modules and data), as wheel paths."""
    return {"edgequant/" + path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in {".pyc", ".pyo"}}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m build --no-isolation` on a copy of the sources: the sdist, then the wheel built from it."""
    if importlib.util.find_spec("build") is None:
        pytest.fail("the `build` package is missing: pip install -c constraints.txt -e '.[test]'")
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        shutil.copy2(ROOT / name, source / name)
    for name in ("src", *NOT_SHIPPED):
        shutil.copytree(ROOT / name, source / name, ignore=JUNK)
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
                            cwd=source, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"python -m build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return out


def _only(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {directory}, found {[p.name for p in found]}"
    return found[0]


def test_wheel_holds_the_package_and_its_data(dist: Path) -> None:
    wheel = _only(dist, f"edgequant-{edgequant.__version__}-py3-none-any.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.startswith("edgequant/")}
    expected = _package_files()
    for suffix in (".py", ".json", ".pt", ".c"):  # modules, hardware configs, demo weights, the fused CPU loops
        assert any(n.endswith(suffix) for n in expected), f"no {suffix} file under src/edgequant to check"
    assert {"edgequant/configs/per_channel.json", "edgequant/assets/digits_cnn.pt",
            "edgequant/quantization/fused_cpu.c", "edgequant/cli/main.py"} <= shipped
    assert sorted(expected - shipped) == [], "files of src/edgequant missing from the wheel"
    assert sorted(shipped - expected) == [], "files in the wheel that src/edgequant does not have"
    dist_info = f"edgequant-{edgequant.__version__}.dist-info/"
    others = sorted(n for n in names - shipped if not n.startswith(dist_info))
    assert others == [], f"the wheel holds files outside edgequant/ and its metadata: {others[:10]}"
    assert not any(n.startswith(f"{d}/") or f"/{d}/" in n for n in names for d in NOT_SHIPPED)


def test_wheel_metadata_version_and_command(dist: Path) -> None:
    wheel = zipfile.ZipFile(_only(dist, "edgequant-*.whl"))
    dist_info = next(n.split("/")[0] for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
    assert metadata["Name"] == "edgequant"
    assert metadata["Version"] == edgequant.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel.read(f"{dist_info}/entry_points.txt").decode())
    assert dict(entry_points["console_scripts"]) == {"edgequant": "edgequant.cli:main"}


def test_sdist_builds_the_wheel_and_leaves_tests_out(dist: Path) -> None:
    sdist = _only(dist, f"edgequant-{edgequant.__version__}.tar.gz")
    prefix = f"edgequant-{edgequant.__version__}/"
    with tarfile.open(sdist) as archive:
        names = {m.name.removeprefix(prefix) for m in archive.getmembers() if m.isfile()}
        pkg_info = Parser().parsestr(archive.extractfile(prefix + "PKG-INFO").read().decode())  # type: ignore[union-attr]
    assert pkg_info["Version"] == edgequant.__version__
    assert set(BUILD_INPUTS) <= names
    assert sorted({"src/" + n for n in _package_files()} - names) == []
    assert not any(n.startswith(f"{d}/") for n in names for d in NOT_SHIPPED)


def test_cli_version_is_the_package_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"edgequant, version {edgequant.__version__}"


def test_changelog_has_an_entry_for_this_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    releases = re.findall(r"^## \[(\d[^\]]*)\] - (\d{4}-\d{2}-\d{2})$", text, re.M)
    assert releases, "CHANGELOG.md has no '## [x.y.z] - YYYY-MM-DD' release heading"
    assert releases[0][0] == edgequant.__version__, "the newest CHANGELOG.md release is not edgequant.__version__"
    assert re.search(r"^## \[Unreleased\]$", text, re.M), "CHANGELOG.md keeps an [Unreleased] section on top"
