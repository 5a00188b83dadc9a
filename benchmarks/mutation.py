"""Mutation testing of the numeric core with mutmut; not part of the normal test run.

For each package below, a scratch project is laid out in ``build/mutation/<package>/`` (a copy of ``src/`` and
of only that package's fast test files), mutmut mutates the listed files there, and each mutant runs only the
selected tests that execute the mutated function (mutmut records that per function), fastest first, stopping
at the first failure. The score counts a mutant as detected when a test fails or times out; mutants listed in
``ACCEPTED`` are equivalent (no input tells them apart), GPU-only (the same on the CPU) or accepted survivors
(real changes left untested on purpose, with the reason); only the first two are left out of the score.

    pip install -e ".[mutation]"
    python benchmarks/mutation.py                    # all packages (~25 min on the 2-core dev VM)
    python benchmarks/mutation.py quantization       # one package: quantization, encodings_io, ptq_math or
                                                     # qat_cost_config (LSQ grad scales, BitOps, config rules)
    python benchmarks/mutation.py --show-survivors   # also print the diff of every surviving mutant
    python benchmarks/mutation.py --recheck ptq_math # after adding tests: re-run only the undetected mutants

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
        "tests": ["quantization/test_quantization_math.py", "quantization/test_analyzers.py",
                  "quantization/test_reference_grid.py", "quantization/test_reference_analyzers.py",
                  "quantization/test_encoding_checks.py", "quantization/test_refresh_from.py",
                  "quantization/test_fused_cpu.py", "qat/test_lsq_gradients.py", "test_config_aimet_keys.py"],
        "mutants": ["edgequant.quantization.*"],
    },
    "encodings_io": {
        "files": ["export/encodings_io.py"],
        "tests": ["export/test_encodings_io.py", "export/test_reference_encodings_docs.py"],
        "mutants": ["edgequant.export.encodings_io.*"],
    },
    "ptq_math": {
        "files": ["ptq/batch_norm_fold.py", "ptq/cross_layer_equalization.py", "ptq/adaround.py",
                  "ptq/bias_correction.py"],
        "tests": ["ptq/test_fold_cle.py", "ptq/test_bias_correction_bn.py", "ptq/test_adaround.py",
                  "ptq/test_reference_ptq.py", "ptq/test_reference_ptq_details.py"],
        # AdaRound: its rounding math only (data collection and bookkeeping are out of scope)
        "mutants": ["edgequant.ptq.batch_norm_fold.*", "edgequant.ptq.cross_layer_equalization.*",
                    "edgequant.ptq.bias_correction.*"]
        + [f"edgequant.ptq.adaround.x_{name}__mutmut_*" for name in
           ("rectified_sigmoid", "_initial_v", "_beta", "weight_grid", "_reconstruction_loss", "_round_layer")],
    },
    "qat_cost_config": {
        "files": ["qat/lsq.py", "mixed_precision/cost.py", "config.py"],
        "tests": ["qat/test_lsq_gradients.py", "qat/test_prepare.py", "mixed_precision/test_groups_and_cost.py",
                  "test_config.py"],
        "mutants": ["edgequant.qat.lsq.*", "edgequant.mixed_precision.cost.*", "edgequant.config.*"],
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
B, C, D, R = (f"edgequant.ptq.{name}." for name in
              ("batch_norm_fold", "cross_layer_equalization", "bias_correction", "adaround"))
PROGRESS = "progress-bar cosmetics (description, leave, default shown or not)"
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
    **{f"{A}xǁ{cls}ǁ__init____mutmut_1": "accepted: a default hyper-parameter; any value is a valid search"
       for cls in ("HistogramAnalyzer", "MseAnalyzer", "PercentileAnalyzer")},
    A + "xǁMseAnalyzerǁcompute_range__mutmut_10": "accepted: coarse ratios up to 2; the fine search clamps back to "
    "1, and wider-than-observed ranges never win on the tested data",
    **{f"{A}xǁSqnrAnalyzerǁcompute_range__mutmut_{n}": "accepted: changes asymmetric offset candidates that the "
       "tested distributions never pick as the optimum" for n in (67, 69, 83)},
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
    # ptq/batch_norm_fold.py
    **{f"{B}x_sim_dummy_input__mutmut_{n}": "accepted: keyword dummy inputs (transformers) are tested in "
       "test_quantsim.py, outside this run's fast selection" for n in (1, 3)},
    B + "x_fold_batch_norms_to_scale__mutmut_43": "non-frozen weight encodings are recomputed by "
    "compute_param_encodings() right after",
    B + "x_fold_batch_norms_to_scale__mutmut_44": "accepted: differs only for a layer without a weight quantizer, "
    "which a sim does not create",
    B + "x_fold_batch_norms_to_scale__mutmut_50": DEVICE,
    B + "x_fold_batch_norms_to_scale__mutmut_52": "accepted: in a sim both the layer and its BN are QuantizedModules",
    # ptq/adaround.py (rounding only)
    R + "x_weight_grid__mutmut_5": DEVICE,
    R + "x_weight_grid__mutmut_8": DEVICE,
    R + "x__reconstruction_loss__mutmut_7": "no layer output has fewer than 2 dimensions",
    R + "x__round_layer__mutmut_23": "accepted: the warm start's length changes the optimisation path, which no "
    "final-rounding check pins down",
    **{f"{R}x__round_layer__mutmut_{n}": PROGRESS for n in (27, 28, 29, 31, 33, 36)},
    **{f"{R}x__round_layer__mutmut_{n}": DEVICE for n in (40, 44)},
    **{f"{R}x__round_layer__mutmut_{n}": "accepted: unseeded batch sampling; still a valid AdaRound, only not "
       "reproducible run to run" for n in (41, 45)},
    **{f"{R}x__round_layer__mutmut_{n}": "casts to the weight's own dtype: float32 either way" for n in (53, 98)},
    R + "x__round_layer__mutmut_56": "accepted: the soft weights of weights clipped below the grid leave it while "
    "optimising; the final rounding is clamped",
    R + "x__round_layer__mutmut_65": "the layer only picks the loss's channel axis; the output rank decides it for "
    "Conv and 2-D Linear outputs",
    R + "x__round_layer__mutmut_75": "accepted: regularisation starts one iteration later",
    R + "x__round_layer__mutmut_89": "adds a constant to the loss: same gradients",
    R + "x__round_layer__mutmut_93": "accepted: reshapes the regulariser; the fast tests fix only the optimum of a "
    "well-conditioned problem",
    **{f"{R}x__round_layer__mutmut_{n}": "zero_grad without set_to_none: the same update" for n in (95, 96)},
    R + "x__round_layer__mutmut_107": "v is exactly 0 with probability 0",
    R + "x__round_layer__mutmut_108": "accepted: differs only for h(V) left in [0.5, 0.78) after annealing, which "
    "the regulariser drives to 0 or 1",
    **{f"{R}x__round_layer__mutmut_{n}": "the seconds field is overwritten by the caller" for n in (147, 154)},
    # ptq/bias_correction.py
    D + "x_correct_bias__mutmut_1": PROGRESS,
    D + "x_correct_bias__mutmut_32": PROGRESS,
    D + "x__channel_means__mutmut_8": "only stops the forward early (speed); the means are the same",
    D + "x__channel_means__mutmut_28": "true division of an exact multiple: the same count",
    D + "x__correct_empirically__mutmut_9": "accepted: the batch index only appears in input-error messages",
    **{f"{D}x__correct_empirically__mutmut_{n}": PROGRESS for n in (28, 29, 31, 32, 33, 34)},
    **{f"{D}x_clipped_normal_mean__mutmut_{n}": INACTIVE_CLAMP + " (|alpha|, |beta| <= 1e12: std >= 1e-12)"
       for n in (28, 29, 31, 33, 34, 45, 46, 48, 50, 51)},
    **{f"{D}x__input_expectation__mutmut_{n}": "accepted: the weight layers and pass-through modules walked here "
       "have one input" for n in (4, 27)},
    **{f"{D}x__input_expectation__mutmut_{n}": DEVICE for n in (45, 48, 70, 71)},
    D + "x__input_expectation__mutmut_53": "0 / ones is 0 * ones",
    D + "x__input_expectation__mutmut_61": "the reason is only read when no expectation is returned",
    D + "x__activation_bounds__mutmut_10": "float('INF') is infinity too",
    # ptq/cross_layer_equalization.py
    C + "x_equalize__mutmut_2": "accepted: the activation_aware default (both settings are tested explicitly)",
    C + "x_equalize__mutmut_3": "accepted: the max_iterations default",
    C + "x_equalize__mutmut_13": "the dummy input is unused when a graph is passed",
    **{f"{C}xǁ_ChannelRangesǁ__init____mutmut_{n}": DEVICE for n in (8, 11, 16, 19)},
    **{f"{C}xǁ_ChannelRangesǁ__init____mutmut_{n}": "accepted: float32 instead of float64 running scales: the same "
       "scales to float32 rounding" for n in (7, 10, 15, 18)},
    C + "x__replace_clamps__mutmut_15": DEVICE,
    C + "x__scale_until_converged__mutmut_40": "the denominator of an unusable channel is discarded by the outer "
    "where",
    C + "x__scale_until_converged__mutmut_53": "accepted: stops one iteration earlier when the change equals the "
    "tolerance exactly",
    **{f"{C}x__scale_until_converged__mutmut_{n}": DEVICE for n in (69, 72)},
    **{f"{C}x__activation_ranges__mutmut_{n}": DEVICE for n in (21, 26)},
    **{f"{C}x__absorb_high_biases__mutmut_{n}": DEVICE for n in (19, 36, 39, 42)},
}


SUPPORT_FILES = ["conftest.py", "references.py", "aimet_fixtures.py"]
"""Shared fixtures and independent references the package tests import."""


def prepare(package: str) -> Path:
    """Scratch project: src/ as is, only the package's test files, and the mutmut configuration."""
    spec = PACKAGES[package]
    work = WORK / package
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (work / "tests").mkdir(parents=True)
    for name in [*SUPPORT_FILES, *spec["tests"]]:
        (work / "tests" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "tests" / name, work / "tests" / name)
    shutil.copytree(ROOT / "tests/fixtures", work / "tests/fixtures")
    prepare_config(package, work)
    return work


def prepare_config(package: str, work: Path) -> None:
    spec = PACKAGES[package]
    (work / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {json.dumps([f'src/edgequant/{name}' for name in spec['files']])}\n"
        f"pytest_add_cli_args_test_selection = {json.dumps([f'tests/{name}' for name in spec['tests']])}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-W", "ignore", "--import-mode=importlib", '
        '"-o", "pythonpath=tests"]\n'
    )


def run(package: str, max_children: int) -> Path:
    work = prepare(package)
    _mutmut_run(work, max_children, PACKAGES[package]["mutants"])
    return work


def _mutmut_run(work: Path, max_children: int, names: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mutmut puts the mutated src/ first
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # no thread pools across mutmut's forks
    with (work / "mutmut-run.log").open("a") as log:
        subprocess.run([*MUTMUT, "run", "--max-children", str(max_children), *names],
                       cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)


def recheck(package: str, max_children: int) -> Path:
    """Re-run only the mutants the last run left undetected, against the current test files (a full run
    takes 10-40 minutes on the shared 2-core VM; this is for the edit-test-recheck loop)."""
    work = WORK / package
    undetected = [name for name, status in statuses(work, package).items()
                  if status not in DETECTED and name not in ACCEPTED]
    prepare_config(package, work)
    for name in PACKAGES[package]["tests"]:
        for folder in (work / "tests", work / "mutants" / "tests"):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / "tests" / name, folder / name)
    if undetected:
        _mutmut_run(work, max_children, undetected)
    return work


def statuses(work: Path, package: str) -> dict[str, str]:
    listing = subprocess.run([*MUTMUT, "results", "--all", "true"], cwd=work, capture_output=True, text=True,
                             check=True).stdout
    patterns = [re.compile(re.escape(p).replace(r"\*", ".*") + "$") for p in PACKAGES[package]["mutants"]]
    found = dict(re.findall(r"^\s+(\S+): (.+)$", listing, flags=re.MULTILINE))
    return {name: status for name, status in found.items() if any(p.match(name) for p in patterns)}


def category(name: str) -> str:
    """How a listed mutant counts: "gpu" (only a GPU can tell), "equivalent" (no input can tell), or
    "accepted" (a real change left untested on purpose: it stays in the score's denominator)."""
    reason = ACCEPTED[name]
    if reason in (DEVICE, CUDA):
        return "gpu"
    return "accepted" if reason.startswith("accepted") else "equivalent"


def report(package: str, work: Path, show_survivors: bool) -> None:
    results = statuses(work, package)
    counts = Counter(results.values())
    listed = {name: category(name) for name in results if name in ACCEPTED and results[name] not in DETECTED}
    excluded = {name for name, kind in listed.items() if kind != "accepted"}
    considered = {name: status for name, status in results.items() if name not in excluded}
    detected = sum(status in DETECTED for status in considered.values())
    score = 100.0 * detected / max(len(considered), 1)
    kinds = Counter(listed.values())
    print(f"\n== {package}: {len(results)} mutants; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"   left out of the score: {kinds['equivalent']} equivalent, {kinds['gpu']} GPU-only; "
          f"{kinds['accepted']} accepted survivors stay in it")
    print(f"   score {detected}/{len(considered)} = {score:.1f}% of the non-equivalent mutants killed")
    undetected = sorted(name for name, status in considered.items() if status not in DETECTED)
    for name in undetected:
        print(f"   {considered[name]}{' (accepted)' if name in listed else ''}: {name}")
        if show_survivors:
            diff = subprocess.run([*MUTMUT, "show", name], cwd=work, capture_output=True, text=True).stdout
            print("\n".join("      " + line for line in diff.splitlines()[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("packages", nargs="*", help=f"any of {', '.join(PACKAGES)} (default: all)")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutants (default 2: a 2-core VM)")
    parser.add_argument("--report-only", action="store_true", help="re-read the last run's results")
    parser.add_argument("--recheck", action="store_true",
                        help="re-run only the last run's undetected, non-accepted mutants against the current tests")
    parser.add_argument("--show-survivors", action="store_true")
    args = parser.parse_args()
    unknown = set(args.packages) - set(PACKAGES)
    if unknown:
        parser.error(f"unknown package {', '.join(sorted(unknown))}; choose from {', '.join(PACKAGES)}")
    for package in args.packages or list(PACKAGES):
        if args.report_only:
            work = WORK / package
        elif args.recheck:
            work = recheck(package, args.max_children)
        else:
            work = run(package, args.max_children)
        report(package, work, args.show_survivors)


if __name__ == "__main__":
    main()
