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

DEVICE = "device placement only: the same on the CPU; tests/test_devices.py covers it on a GPU (run_on_gpu.sh)"
CUDA = "fused CUDA kernel branch: unreachable on the CPU; bit-exactness is tested on a GPU (test_devices.py)"
SPEED = "scalar-bounds fast path: both branches compute the same clamp (a speed choice)"
NEVER_READ = "attribute reset to another falsy placeholder; it is always assigned before it is read"
INACTIVE_CLAMP = "clamp that never binds: the clamped index or offset is provably inside the bounds already"
TIES = "changes only which of two candidates with exactly equal error is kept"
Q, A = "edgequant.quantization.affine.", "edgequant.quantization.analyzers."
E = "edgequant.export.encodings_io."
ACCEPTED: dict[str, str] = {
    # quantization/affine.py
    Q + "x__reduce_to__mutmut_20": "keepdim=False then reshape to the parameter's shape: same values, same order",
    Q + "x__reduce_to__mutmut_21": "keepdim=False then reshape to the parameter's shape: same values, same order",
    **{f"{Q}x_quantize_dequantize__mutmut_{n}": CUDA for n in range(22, 37)},
    **{f"{Q}x_quantize_dequantize__mutmut_{n}": SPEED for n in (47, 48, 49, 50)},
    Q + "xǁ_QuantDequantǁbackward__mutmut_7": "a gradient returned for an input that needs none is discarded by "
    "autograd",
    # quantization/analyzers.py
    A + "xǁEncodingAnalyzerǁobserve__mutmut_20": "always takes the slow (sentinel-aware) path, which gives the same "
    "statistics for clean data",
    A + "xǁEncodingAnalyzerǁreset__mutmut_2": NEVER_READ,
    A + "xǁHistogramAnalyzerǁreset__mutmut_2": NEVER_READ,
    A + "xǁHistogramAnalyzerǁreset__mutmut_3": NEVER_READ,
    A + "xǁHistogramAnalyzerǁ_histogram__mutmut_15": "counts stay float32 before the += into the float64 histogram",
    A + "xǁHistogramAnalyzerǁ_histogram__mutmut_44": "counts stay int64 before the += into the float64 histogram",
    A + "xǁHistogramAnalyzerǁ_histogram__mutmut_20": INACTIVE_CLAMP + " (hist_min <= every observed value)",
    A + "xǁHistogramAnalyzerǁ_histogram__mutmut_33": DEVICE,
    A + "xǁHistogramAnalyzerǁ_histogram__mutmut_35": DEVICE,
    A + "xǁHistogramAnalyzerǁ_update__mutmut_16": "accepted: a float32 histogram counts exactly up to 2**24 values "
    "per bin; catching it needs a 16.7M-value test",
    A + "xǁHistogramAnalyzerǁ_update__mutmut_20": "accepted: same as _update__mutmut_16 (default dtype float32)",
    A + "xǁHistogramAnalyzerǁ_update__mutmut_17": DEVICE,
    A + "xǁHistogramAnalyzerǁ_update__mutmut_21": DEVICE,
    A + "xǁHistogramAnalyzerǁ_update__mutmut_24": "widening onto the same range maps every bin onto itself",
    A + "xǁHistogramAnalyzerǁ_update__mutmut_25": "widening onto the same range maps every bin onto itself",
    **{f"{A}xǁHistogramAnalyzerǁ_widen__mutmut_{n}": INACTIVE_CLAMP + " (old bin centres lie inside the new range)"
       for n in (6, 7, 9, 13)},
    A + "xǁHistogramAnalyzerǁbin_centres__mutmut_7": DEVICE,
    A + "xǁHistogramAnalyzerǁbin_centres__mutmut_10": DEVICE,
    A + "xǁHistogramAnalyzerǁbin_centres__mutmut_8": "int64 steps + 0.5 promote to the same float32 values",
    A + "xǁHistogramAnalyzerǁbin_centres__mutmut_11": "int64 steps + 0.5 promote to the same float32 values",
    **{f"{A}xǁMseAnalyzerǁ_search__mutmut_{n}": "the candidate encoding's axis is never read (scale and offset "
       "are broadcast by hand)" for n in (13, 18, 21)},
    A + "xǁMseAnalyzerǁ_search__mutmut_36": TIES,
    **{f"{A}xǁMseAnalyzerǁcompute_range__mutmut_{n}": DEVICE for n in (5, 9, 39, 43)},
    A + "xǁMseAnalyzerǁcompute_range__mutmut_67": TIES,
    A + "xǁMseAnalyzerǁcompute_range__mutmut_50": "the fine window is symmetric: the same candidates in reverse "
    "order, so only ties differ",
    A + "xǁMseAnalyzerǁcompute_range__mutmut_46": "accepted: the lower clamp binds only when min_ratio is below "
    "one coarse step (not with the defaults)",
    **{f"{A}xǁMseAnalyzerǁcompute_range__mutmut_{n}": "accepted: fine ratios above 1 only coarsen the grid "
       "without reducing clipping; they win only by chance alignment" for n in (47, 49, 52)},
    **{f"{A}xǁMseAnalyzerǁcompute_range__mutmut_{n}": "accepted: changes the fine window's width; the tests bound "
       "the result's optimality (brute force), not the exact candidate set" for n in (16, 19)},
    A + "xǁMseAnalyzerǁcompute_range__mutmut_20": "accepted: with one candidate the fine window adds ratio 1e-3, "
    "below min_ratio, which loses to it unless the optimum lies below min_ratio",
    **{f"{A}xǁPercentileAnalyzerǁcompute_range__mutmut_{n}": INACTIVE_CLAMP + " (searchsorted stays below "
       "num_bins: the last cdf entry is the total)" for n in (22, 33)},
    **{f"{A}xǁSqnrAnalyzerǁ__init____mutmut_{n}": "accepted: a default hyper-parameter (bins, scales, offsets); "
       "any value is a valid search" for n in (1, 3, 4)},
    A + "xǁSqnrAnalyzerǁ_expected_noise__mutmut_17": "computes an extra prefix sum that is never used",
    **{f"{A}xǁSqnrAnalyzerǁcompute_range__mutmut_{n}": DEVICE for n in (22, 25, 61, 65, 107, 109)},
    A + "xǁSqnrAnalyzerǁcompute_range__mutmut_28": "accepted: adds a 101 % candidate; it can win only where the "
    "100 % asymmetric grids all clip by rounding their offset",
    **{f"{A}xǁSqnrAnalyzerǁcompute_range__mutmut_{n}": INACTIVE_CLAMP + " (every offset candidate is <= 0)"
       for n in (70, 72, 87)},
    # quantization/encoding.py
    "edgequant.quantization.encoding.xǁEncodingǁto__mutmut_11": DEVICE,
    "edgequant.quantization.encoding.xǁEncodingǁto__mutmut_12": DEVICE,
    # export/encodings_io.py
    **{f"{E}x__entry_0_6_1__mutmut_{n}": "zip's strict check: min, max, scale and offset always have the same "
       "length" for n in (22, 27, 32)},
    **{f"{E}xǁ_Readerǁencoding__mutmut_{n}": "the tensor dtype before Encoding, which converts to float32 anyway"
       for n in (12, 14, 19, 21)},
    E + "xǁ_Readerǁentry_2_0_0__mutmut_88": "symmetric also needs every offset at -2**(b-1) (checked in "
    "_Reader.encoding), which no unsigned or nonzero zero point gives",
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
