"""Re-run the table of planted bugs: plant each one in a scratch copy of src/, run the reference tests
against it, and print which tests catch it. The working tree is never modified.

    python benchmarks/planted_bugs.py            # all bugs; about a minute per bug on the 2-core dev VM
    python benchmarks/planted_bugs.py sqnr bn    # only the bugs whose key contains one of the words
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# key: (file, original text, planted text, description of the planted bug)
BUGS = {
    "round_half_up_no_grad": (
        "quantization/affine.py", "    out.round_()\n", "    out.add_(0.5).floor_()\n",
        "round half up instead of half to even in the no-grad quantize-dequantize"),
    "round_half_up_autograd": (
        "quantization/affine.py", "rounded = scaled.round() if learns_range else scaled.round_()",
        "rounded = torch.floor(scaled + 0.5)",
        "the same in the autograd path (_QuantDequant.forward)"),
    "sqnr_symmetric_ignores_negative": (
        "quantization/analyzers.py",
        "abs_max = torch.maximum(-low, high).clamp_min(MIN_RANGE)\n            scales",
        "abs_max = high.clamp_min(MIN_RANGE)\n            scales",
        "SQNR search: symmetric range ignores the negative side"),
    "bn_fold_without_eps": (
        "ptq/batch_norm_fold.py", "torch.sqrt(variance + bn.eps)", "torch.sqrt(variance)",
        "BN folding without eps"),
    "adaround_no_clamp": (
        "ptq/adaround.py", "rounded = (torch.clamp(floor + (v >= 0).float(), low, high) * scale)",
        "rounded = ((floor + (v >= 0).float()) * scale)",
        "AdaRound's final rounding without clamping to the grid"),
    "adaround_floor_to_round": (
        "ptq/adaround.py", "floor = torch.floor(scaled)", "floor = torch.round(scaled)", "AdaRound floor -> round"),
    "absorption_1_sigma": (
        "ptq/cross_layer_equalization.py", "amount = (mean - 3 * std - lower)", "amount = (mean - std - lower)",
        "high-bias absorption at 1 sigma instead of 3 sigma"),
    "zero_point_sign_2_0_0": (
        "export/encodings_io.py",
        ("zero_points = _ints(encoding.onnx_zero_point)", "if signed else -zero_point\n"),
        ("zero_points = _ints(-encoding.onnx_zero_point)", "if signed else zero_point\n"),
        "AIMET 2.0.0 zero-point sign flipped in writer and reader"),
    "percentile_upper_tail_doubled": (
        "quantization/analyzers.py", "total * (1.0 - tail)", "total * (1.0 - 2 * tail)",
        "percentile analyzer: upper tail doubled"),
    "lsq_per_channel_counts_the_tensor": (
        "quantization/granularity.py", "return math.prod(shape) // max(math.prod(self.scale_shape(shape)), 1)",
        "return math.prod(shape)",
        "LSQ gradient scale of a per-channel quantizer computed with the whole tensor's element count"),
    "grouped_conv_macs_ignore_groups": (
        "mixed_precision/cost.py", "per_output = module.in_channels // module.groups * math.prod",
        "per_output = module.in_channels * math.prod",
        "BitOps of grouped and depthwise convolutions count every input channel per output"),
    "histogram_merge_keeps_first_lower_bound": (
        "quantization/analyzers.py", "self._widen(torch.minimum(other_min, self.hist_min), ",
        "self._widen(self.hist_min, ",
        "histogram merge keeps the first shard's lower bound when the second shard widens only the low end"),
    "per_channel_false_override_ignored": (
        "config.py", "if op.per_channel is not None:", "if op.per_channel:",
        "op_type per_channel_quantization False ignored where the defaults say True"),
}

TESTS = [
    "tests/quantization/test_reference_grid.py", "tests/quantization/test_reference_analyzers.py",
    "tests/export/test_reference_encodings_docs.py", "tests/ptq/test_reference_ptq.py",
    "tests/quantization/test_quantization_math.py", "tests/quantization/test_analyzers.py",
    "tests/test_config.py", "tests/mixed_precision/test_groups_and_cost.py", "tests/qat/test_lsq_gradients.py",
    "tests/qat/test_prepare.py::test_lsq_grad_scale_of_each_quantizer_counts_the_values_of_one_scale",
]


def plant(scratch: Path, relative: str, original: str | tuple, planted: str | tuple) -> None:
    path = scratch / "src/edgequant" / relative
    text = path.read_text()
    for old, new in zip(*((original, planted) if isinstance(original, tuple) else ((original,), (planted,))),
                        strict=True):
        if text.count(old) != 1:
            raise SystemExit(f"{relative}: expected exactly one {old!r}; the source changed, update BUGS")
        text = text.replace(old, new)
    path.write_text(text)


def failing_tests(scratch: Path) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(scratch / "src"), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
                          "--import-mode=importlib", "-o", "pythonpath=tests", *TESTS],
                         cwd=scratch, env=env, capture_output=True, text=True)
    return sorted(set(re.findall(r"^FAILED (\S+?)(?: - |$)", run.stdout, flags=re.MULTILINE)))


def main(words: list[str]) -> None:
    selected = {key: bug for key, bug in BUGS.items() if not words or any(w in key for w in words)}
    rows = []
    for key, (relative, original, planted, description) in selected.items():
        with tempfile.TemporaryDirectory(prefix=f"planted_{key}_") as tmp:
            scratch = Path(tmp)
            shutil.copytree(ROOT / "src", scratch / "src", ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copytree(ROOT / "tests", scratch / "tests", ignore=shutil.ignore_patterns("__pycache__"))
            plant(scratch, relative, original, planted)
            failures = failing_tests(scratch)
        rows.append((description, failures))
        print(f"{'CAUGHT' if failures else 'MISSED'}  {description}: {len(failures)} failing tests", flush=True)
        for failure in failures:
            print(f"        {failure}", flush=True)
    missed = [description for description, failures in rows if not failures]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} planted bugs caught" + (f"; missed: {missed}" if missed else ""))
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
