"""Mutation testing of the numeric core with mutmut (issue 14); not part of the normal test run.

For each package below, a scratch project is laid out in ``build/mutation/<package>/`` (a copy of ``src/`` and
of only that package's fast test files), mutmut mutates the listed files there, and each mutant runs only the
selected tests that execute the mutated function (mutmut records that per function), fastest first, stopping
at the first failure. The score counts a mutant as detected when a test fails or times out; mutants listed in
``ACCEPTED`` (equivalent, or accepted with a reason, see benchmarks/README.md) are left out of it.

    pip install -e ".[mutation]"
    python benchmarks/mutation.py                    # all packages (~25 min on the 2-core dev VM)
    python benchmarks/mutation.py quantization       # one package: quantization, encodings_io or ptq_math
    python benchmarks/mutation.py --show-survivors   # also print the diff of every surviving mutant

Mutant names (``module.x_function__mutmut_N``) are numbered per function, so ``ACCEPTED`` must be reviewed
whenever a listed function changes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "mutation"
MUTMUT = [sys.executable, "-m", "mutmut"]

PACKAGES: dict[str, dict[str, list[str]]] = {
    "quantization": {
        "files": ["quantization/affine.py", "quantization/analyzers.py", "quantization/encoding.py"],
        "tests": ["test_quantization_math.py", "test_analyzers.py", "test_reference_grid.py",
                  "test_reference_analyzers.py"],
        "mutants": ["edgequant.quantization.*"],
    },
    "encodings_io": {
        "files": ["export/encodings_io.py"],
        "tests": ["test_encodings_io.py", "test_reference_encodings_docs.py"],
        "mutants": ["edgequant.export.encodings_io.*"],
    },
    "ptq_math": {
        "files": ["ptq/batch_norm_fold.py", "ptq/cross_layer_equalization.py", "ptq/adaround.py",
                  "ptq/bias_correction.py"],
        "tests": ["test_ptq_fold_cle.py", "test_ptq_bias_bn.py", "test_adaround.py", "test_reference_ptq.py"],
        # AdaRound: its rounding math only (data collection and bookkeeping are out of scope)
        "mutants": ["edgequant.ptq.batch_norm_fold.*", "edgequant.ptq.cross_layer_equalization.*",
                    "edgequant.ptq.bias_correction.*"]
        + [f"edgequant.ptq.adaround.x_{name}__mutmut_*" for name in
           ("rectified_sigmoid", "_initial_v", "_beta", "weight_grid", "_reconstruction_loss", "_round_layer")],
    },
}

DETECTED = {"killed", "timeout", "segfault", "caught by type check"}

ACCEPTED: dict[str, str] = {
    # filled from the reviewed survivors; the reasons are in benchmarks/README.md
}


def prepare(package: str) -> Path:
    """Scratch project: src/ as is, only the package's test files, and the mutmut configuration."""
    spec = PACKAGES[package]
    work = WORK / package
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (work / "tests").mkdir(parents=True)
    for name in spec["tests"]:
        shutil.copy2(ROOT / "tests" / name, work / "tests" / name)
    (work / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {json.dumps([f'src/edgequant/{name}' for name in spec['files']])}\n"
        f"pytest_add_cli_args_test_selection = {json.dumps([f'tests/{name}' for name in spec['tests']])}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-W", "ignore"]\n'
    )
    return work


def run(package: str, max_children: int) -> Path:
    work = prepare(package)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mutmut puts the mutated src/ first
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # no thread pools across mutmut's forks
    log = (work / "mutmut-run.log").open("w")
    subprocess.run([*MUTMUT, "run", "--max-children", str(max_children), *PACKAGES[package]["mutants"]],
                   cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    return work


def statuses(work: Path, package: str) -> dict[str, str]:
    listing = subprocess.run([*MUTMUT, "results", "--all", "true"], cwd=work, capture_output=True, text=True,
                             check=True).stdout
    patterns = [re.compile(re.escape(p).replace(r"\*", ".*") + "$") for p in PACKAGES[package]["mutants"]]
    found = dict(re.findall(r"^\s+(\S+): (.+)$", listing, flags=re.MULTILINE))
    return {name: status for name, status in found.items() if any(p.match(name) for p in patterns)}


def report(package: str, work: Path, show_survivors: bool) -> tuple[int, int]:
    results = statuses(work, package)
    counts = Counter(results.values())
    accepted = {name for name in results if name in ACCEPTED and results[name] not in DETECTED}
    considered = {name: status for name, status in results.items() if name not in accepted}
    detected = sum(status in DETECTED for status in considered.values())
    score = 100.0 * detected / max(len(considered), 1)
    print(f"\n== {package}: {len(results)} mutants; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"   accepted (equivalent or justified) {len(accepted)}; "
          f"score {detected}/{len(considered)} = {score:.1f}% of the non-accepted mutants detected")
    undetected = sorted(name for name, status in considered.items() if status not in DETECTED)
    for name in undetected:
        print(f"   {considered[name]}: {name}")
        if show_survivors:
            diff = subprocess.run([*MUTMUT, "show", name], cwd=work, capture_output=True, text=True).stdout
            print("\n".join("      " + line for line in diff.splitlines()[1:]))
    return detected, len(considered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("packages", nargs="*", help=f"any of {', '.join(PACKAGES)} (default: all)")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutants (default 2: a 2-core VM)")
    parser.add_argument("--report-only", action="store_true", help="re-read the last run's results")
    parser.add_argument("--show-survivors", action="store_true")
    args = parser.parse_args()
    unknown = set(args.packages) - set(PACKAGES)
    if unknown:
        parser.error(f"unknown package {', '.join(sorted(unknown))}; choose from {', '.join(PACKAGES)}")
    for package in args.packages or list(PACKAGES):
        work = WORK / package if args.report_only else run(package, args.max_children)
        report(package, work, args.show_survivors)


if __name__ == "__main__":
    main()
