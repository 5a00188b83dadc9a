"""Does the simulation predict the integer runtime? Run the QDQ model in ONNX Runtime and compare with the sim.

ONNX Runtime runs on the CPU with all graph optimisations on, so it fuses DQ→op→Q groups into its integer kernels
(QLinearConv, QLinearMatMul, QLinearAdd, ...) and computes in int8 with int32 accumulators, requantizing with a
float multiplier. The reference is the sim itself (``sim`` given) or, without a sim, the same QDQ model run
unoptimised, where every op computes in float between Q/DQ pairs, which is exactly what the sim computes.

Every quantized tensor of the QDQ model is compared on its integer grid: ORT's QuantizeLinear outputs are added
as graph outputs (fused kernels still produce them), the sim's values are captured from its quantizers. The first
tensor that differs in topological order points at the layer whose kernel rounds differently; each tensor's
histogram of differences (in LSB) shows how far it is off. A sim in emulation mode (``sim.emulate("onnxruntime")``)
should show no difference at all.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from edgequant.export.qdq import QDQ_METADATA_KEY
from edgequant.export.runtime_cpu import ORT_SESSION_CONFIG, u8s8_saturates, with_unsigned_weights

if TYPE_CHECKING:
    from edgequant.sim.quantsim import QuantSim

INTEGER_KERNELS = (
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QLinearAdd", "QLinearMul",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "QGemm",
    "QLinearReduceMean", "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
)


@dataclass
class OutputParity:
    """One final output: runtime vs reference, in units of the output's quantization step (LSB)."""

    name: str
    num_elements: int = 0
    max_lsb_diff: float = 0.0
    identical: int = 0
    within_1_lsb: int = 0
    top1_agree: int = 0
    top1_total: int = 0
    lsb_histogram: Counter = field(default_factory=Counter)  # |difference| in LSB -> number of elements

    @property
    def share_identical(self) -> float:
        return self.identical / max(self.num_elements, 1)

    @property
    def share_within_1_lsb(self) -> float:
        return self.within_1_lsb / max(self.num_elements, 1)

    @property
    def top1_agreement(self) -> float | None:
        return self.top1_agree / self.top1_total if self.top1_total else None


@dataclass
class TensorParity:
    """One intermediate quantized tensor: the runtime's grid values against the reference's (SQNR, histogram of
    differences in LSB)."""

    tensor: str
    quantizers: list[str]
    signal: float = 0.0
    noise: float = 0.0
    max_lsb_diff: float = 0.0
    num_elements: int = 0
    lsb_histogram: Counter = field(default_factory=Counter)  # |difference| in LSB -> number of elements

    @property
    def share_identical(self) -> float:
        return self.lsb_histogram[0] / max(self.num_elements, 1)

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        return 10 * math.log10(max(self.signal, 1e-30) / self.noise)


@dataclass
class ParityReport:
    reference: str
    num_samples: int = 0
    outputs: list[OutputParity] = field(default_factory=list)
    tensors: list[TensorParity] = field(default_factory=list)
    integer_kernels: dict[str, int] = field(default_factory=dict)
    float_kernels: dict[str, int] = field(default_factory=dict)
    unsigned_weights: int = 0
    """int8 weights run as the identical uint8 + 128 (see `edgequant.export.runtime_cpu`); 0 when run as exported."""
    emulation: str | None = None
    """The emulating sim's coverage (``EmulationPlan.coverage()``); None for the default sim."""

    @property
    def first_divergence(self) -> TensorParity | None:
        """First tensor (topological order) where runtime and reference differ by more than one step."""
        return next((t for t in self.tensors if t.max_lsb_diff > 1), None)

    def threshold_failures(self, max_lsb: float, min_identical_percent: float) -> list[str]:
        """What misses the gate: an output more than ``max_lsb`` LSBs off, or fewer identical values than asked."""
        failures = []
        for out in self.outputs:
            if out.max_lsb_diff > max_lsb:
                failures.append(f"output {out.name} differs by {out.max_lsb_diff:g} LSB (> --max-lsb {max_lsb})")
            if 100 * out.share_identical < min_identical_percent:
                failures.append(f"output {out.name}: {out.share_identical:.2%} identical (< --min-identical "
                                f"{min_identical_percent:g}%)")
        return failures

    @property
    def first_difference(self) -> TensorParity | None:
        """First tensor (topological order) where runtime and reference differ at all."""
        return next((t for t in self.tensors if t.max_lsb_diff > 0), None)

    def tensor_table(self) -> str:
        """Per-tensor parity along the network, in topological order: share identical, max and histogram."""
        lines = [f"  {'tensor':<56} {'identical':>9} {'max':>4}  |diff| in LSB: count"]
        for t in self.tensors:
            histogram = ", ".join(f"{d:g}: {n}" for d, n in sorted(t.lsb_histogram.items()))
            lines.append(f"  {t.tensor:<56} {t.share_identical:>9.2%} {t.max_lsb_diff:>4g}  {histogram}")
        return "\n".join(lines)

    def summary(self) -> str:
        lines = [f"ONNX Runtime (CPU, integer kernels) vs {self.reference} on {self.num_samples} samples"]
        if self.emulation:
            lines.append(f"  {self.emulation}")
        kernels = ", ".join(f"{op}×{n}" for op, n in sorted(self.integer_kernels.items())) or "none"
        lines.append(f"  integer kernels: {kernels}")
        if self.float_kernels:
            lines.append("  float ops left: " + ", ".join(f"{op}×{n}" for op, n in sorted(self.float_kernels.items())))
        if self.unsigned_weights:
            lines.append(f"  this CPU has no VNNI: ORT's u8×s8 kernels saturate int16 pair sums, so its "
                         f"{self.unsigned_weights} int8 weight tensors ran as the same uint8 + 128 (exact kernels)")
        for out in self.outputs:
            top1 = f", top-1 agreement {out.top1_agreement:.2%}" if out.top1_agreement is not None else ""
            histogram = ", ".join(f"{d:g}: {n}" for d, n in sorted(out.lsb_histogram.items()))
            lines.append(
                f"  output {out.name}: max diff {out.max_lsb_diff:g} LSB, {out.share_identical:.2%} identical, "
                f"{out.share_within_1_lsb:.2%} within 1 LSB{top1} (|diff| in LSB: count {histogram})"
            )
        if self.tensors:
            worst = min(self.tensors, key=lambda t: t.sqnr_db)
            lines.append(
                f"  {len(self.tensors)} quantized tensors compared; "
                f"lowest SQNR {worst.sqnr_db:.1f} dB at {worst.tensor}"
            )
            identical = sum(t.max_lsb_diff == 0 for t in self.tensors)
            first = self.first_difference
            lines.append(f"  {identical} of {len(self.tensors)} tensors identical; " + (
                f"first tensor that differs: {first.tensor} ({first.share_identical:.2%} identical, max "
                f"{first.max_lsb_diff:g} LSB)" if first else "no tensor differs"))
            first = self.first_divergence
            lines.append(
                f"  first tensor off by more than 1 LSB: {first.tensor} ({first.max_lsb_diff:g} LSB, "
                f"SQNR {first.sqnr_db:.1f} dB)" if first else "  no tensor differs by more than 1 LSB"
            )
        return "\n".join(lines)


def _qdq_path(export: str | Path, name: str) -> Path:
    path = Path(export)
    if path.is_dir():
        path = path / f"{name}_qdq.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"no QDQ model at {path}; pass the export directory (and name=) or the *_qdq.onnx file")
    return path


def _session(model: onnx.ModelProto, optimized: bool, save_to: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    for key, value in ORT_SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _with_quantized_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    instrumented = onnx.ModelProto()
    instrumented.CopyFrom(model)
    types = {q.output[0]: q for q in model.graph.node if q.op_type == "QuantizeLinear"}
    existing = {o.name for o in model.graph.output}
    for tensor in tensors:
        if tensor in types and tensor not in existing:
            instrumented.graph.output.append(onnx.ValueInfoProto(name=tensor))
    return instrumented


def _kernel_counts(optimized_path: Path) -> tuple[dict[str, int], dict[str, int]]:
    model = onnx.load(optimized_path)
    ops = Counter(node.op_type for node in model.graph.node)
    integer = {op: n for op, n in ops.items() if op in INTEGER_KERNELS}
    skip = {"QuantizeLinear", "DequantizeLinear", *INTEGER_KERNELS}
    return integer, {op: n for op, n in ops.items() if op not in skip}


def _batches(data: Any, batch_size: int) -> Iterable[Any]:
    if isinstance(data, torch.Tensor):
        return list(data.split(batch_size))
    if isinstance(data, np.ndarray):
        return list(torch.from_numpy(data).split(batch_size))
    return data


def _as_inputs(batch: Any, names: list[str]) -> tuple[tuple, dict, dict[str, np.ndarray]]:
    """(sim args, sim kwargs, ORT feed) of one batch: a tensor, a tuple led by the inputs, or a dict."""
    if isinstance(batch, dict):
        feed = {k: batch[k] for k in names}
        return (), feed, {k: v.detach().cpu().numpy() for k, v in feed.items()}
    items = tuple(batch[: len(names)]) if isinstance(batch, (tuple, list)) else (batch,)
    return items, {}, {n: t.detach().cpu().numpy() for n, t in zip(names, items, strict=True)}


class _Captures:
    """The sim's quantizer outputs of one forward (first call of each quantizer)."""

    def __init__(self, sim: QuantSim, names: set[str]) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, quantizer in sim.quantizers().items():
            if name in names:
                self.handles.append(quantizer.register_forward_hook(self.hook(name)))

    def hook(self, name: str):
        def capture(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name not in self.values:  # clone: in-place ops (ReLU(inplace=True)) overwrite the output later
                self.values[name] = output.detach().clone()

        return capture

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def verify(
    export: str | Path,
    sim: QuantSim | None,
    data: Any,
    name: str = "model",
    batch_size: int = 32,
    intermediate: bool = True,
    progress: bool = True,
    unsigned_weights: bool | None = None,
) -> ParityReport:
    """Compare ONNX Runtime's integer execution of ``{name}_qdq.onnx`` with ``sim`` (or, if None, with the QDQ
    graph run in float) on ``data``: a tensor of samples, or an iterable of batches (tensors, tuples whose leading
    items are the inputs, dicts of named inputs).

    ``unsigned_weights`` runs int8 weights as the identical uint8 + 128, which ORT's exact kernels execute; by
    default exactly where this CPU's u8×s8 kernels would saturate (`edgequant.export.runtime_cpu`), so the check
    measures the simulation rather than the CPU. ``False`` runs the model as exported. The sessions run with
    `ORT_SESSION_CONFIG` (fused weight-only MatMuls multiply their input as the QDQ graph gives it), for the same
    reason."""
    path = _qdq_path(export, name)
    model = onnx.load(path)
    rewritten = 0
    if u8s8_saturates() if unsigned_weights is None else unsigned_weights:
        model, rewritten = with_unsigned_weights(model)
    metadata = {p.key: p.value for p in model.metadata_props}
    sites: dict[str, dict] = json.loads(metadata.get(QDQ_METADATA_KEY, "{}"))
    initializers = _initializer_values(model)
    grids = _quantized_grids(model, initializers)
    output_grids = _output_grids(model, initializers)
    with tempfile.TemporaryDirectory() as tmp:
        optimized_path = Path(tmp) / "optimized.onnx"
        runtime = _session(model, optimized=True, save_to=optimized_path)
        integer_kernels, float_kernels = _kernel_counts(optimized_path)
    tensors = [t for t in sites if sites[t]["quantizers"] or sim is None] if intermediate else []
    instrumented = _with_quantized_outputs(model, tensors) if tensors else model
    probe = _session(instrumented, optimized=True) if tensors else None
    reference_session = _session(instrumented, optimized=False) if sim is None else None
    input_names = [i.name for i in runtime.get_inputs()]
    output_names = [o.name for o in runtime.get_outputs()]
    report = ParityReport(_reference_label(sim))
    report.emulation = sim.emulation.coverage() if sim is not None and sim.emulation is not None else None
    report.integer_kernels, report.float_kernels = integer_kernels, float_kernels
    report.unsigned_weights = rewritten
    report.outputs = [OutputParity(n) for n in output_names]
    report.tensors = [TensorParity(sites[t]["tensor"], sites[t]["quantizers"]) for t in tensors]
    captures = _Captures(sim, {q for t in tensors for q in sites[t]["quantizers"][:1]}) if sim is not None else None
    device = next((p.device for p in sim.model.parameters()), torch.device("cpu")) if sim is not None else None
    try:
        for batch in tqdm(_batches(data, batch_size), desc="verifying", disable=not progress):
            args, kwargs, feed = _as_inputs(batch, input_names)
            runtime_outputs = runtime.run(None, feed)
            if sim is not None:
                captures.values.clear()
                with torch.no_grad():
                    result = sim.model(*[a.to(device) for a in args], **{k: v.to(device) for k, v in kwargs.items()})
                reference_outputs = [t.detach().cpu().float().numpy() for t in tree_leaves(result)]
                reference_ints = {
                    t: _sim_grid(captures.values[sites[t]["quantizers"][0]], grids[t]) for t in tensors
                    if sites[t]["quantizers"][0] in captures.values
                }
            else:
                everything = reference_session.run(None, feed)
                reference_outputs = everything[: len(output_names)]
                reference_ints = dict(zip(tensors, everything[len(output_names):], strict=True))
                reference_ints = {t: v.astype(np.int64) - grids[t][1] for t, v in reference_ints.items()}
            report.num_samples += len(runtime_outputs[0]) if runtime_outputs[0].ndim else 1
            for parity, got, want in zip(report.outputs, runtime_outputs, reference_outputs, strict=False):
                _compare_output(parity, got, want, output_grids.get(parity.name))
            if probe is not None:
                probed = dict(zip(tensors, probe.run(tensors, feed), strict=True))
                for parity, tensor in zip(report.tensors, tensors, strict=True):
                    if tensor in reference_ints:
                        _compare_tensor(parity, probed[tensor].astype(np.int64) - grids[tensor][1],
                                        reference_ints[tensor], grids[tensor][0])
    finally:
        if captures is not None:
            captures.remove()
    return report


def _reference_label(sim: QuantSim | None) -> str:
    if sim is None:
        return "the QDQ graph run in float (no sim given)"
    if sim.emulation is None:
        return "the sim (default fake-quantization)"
    return f"the sim emulating {sim.emulation.runtime.name}"


def _initializer_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _quantized_grids(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> dict[str, tuple[float, int]]:
    """QuantizeLinear output -> (scale, zero point) of its per-tensor grid (``values``: the initializers)."""
    grids = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[1] in values:
            zero_point = int(values[node.input[2]].reshape(-1)[0]) if len(node.input) > 2 else 0
            grids[node.output[0]] = (float(values[node.input[1]].reshape(-1)[0]), zero_point)
    return grids


def _output_grids(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> dict[str, float]:
    """Graph output -> the scale of the DequantizeLinear producing it (its LSB; ``values``: the initializers)."""
    outputs = {o.name for o in model.graph.output}
    return {
        node.output[0]: float(values[node.input[1]].reshape(-1)[0])
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and node.output[0] in outputs and node.input[1] in values
    }


def _sim_grid(value: torch.Tensor, grid: tuple[float, int]) -> np.ndarray:
    """The sim's fake-quantized values as signed grid indices ``x / scale`` (exact: x = k * scale)."""
    return np.round(value.cpu().double().numpy() / grid[0]).astype(np.int64)


def _compare_output(parity: OutputParity, got: np.ndarray, want: np.ndarray, lsb: float | None) -> None:
    got, want = got.astype(np.float64), want.astype(np.float64)
    step = lsb if lsb is not None else 1.0
    diff = np.abs(np.round(got / step) - np.round(want / step)) if lsb is not None else np.abs(got - want)
    parity.num_elements += diff.size
    if lsb is not None:
        parity.lsb_histogram.update(_histogram(diff))
    parity.max_lsb_diff = max(parity.max_lsb_diff, float(diff.max(initial=0)))
    parity.identical += int((diff == 0).sum())
    parity.within_1_lsb += int((diff <= 1).sum())
    if got.ndim == 2 and got.shape[1] > 1:
        parity.top1_agree += int((got.argmax(1) == want.argmax(1)).sum())
        parity.top1_total += got.shape[0]


def _compare_tensor(parity: TensorParity, got: np.ndarray, want: np.ndarray, scale: float) -> None:
    diff = (got - want).astype(np.float64)
    parity.num_elements += diff.size
    parity.lsb_histogram.update(_histogram(np.abs(diff)))
    parity.max_lsb_diff = max(parity.max_lsb_diff, float(np.abs(diff).max(initial=0)))
    parity.signal += float(np.square(want.astype(np.float64) * scale).sum())
    parity.noise += float(np.square(diff * scale).sum())


def _histogram(abs_diff: np.ndarray) -> dict[float, int]:
    values, counts = np.unique(abs_diff, return_counts=True)
    return {float(v): int(n) for v, n in zip(values, counts, strict=True)}
