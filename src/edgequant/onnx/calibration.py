"""Calibration of a sim of an ONNX file inside ONNX Runtime, for the quantizers whose statistics ORT can compute.

A min-max quantizer of a sim built with `QuantSim.from_onnx` observes a tensor of the user's graph in float (during
calibration every quantizer that is not frozen passes its input through, so nothing upstream is rounded). ONNX Runtime
computes that tensor too, faster than the converted torch module: one session over the float model the export writes
(the user's graph with the sim's current weights, folded BatchNorms removed) gets a ``ReduceMin``/``ReduceMax`` pair
per observed tensor as graph outputs (over the channel axes kept where a quantizer is per channel), so ORT reduces
and no activation is copied out. The running extremes go into each quantizer's analyzer through
`EncodingAnalyzer.observe` of a tensor holding just the extremes, which leaves the min-max statistics observing the
tensor would leave. Each reduction runs right after its tensor is computed (the nodes are appended deepest tensor
first, see `_Calibrator._plan`), and a batch whose activations outgrow the CPU's cache runs a few samples at a time
where no op mixes samples (`edgequant.onnx.sub_batches`).

A tensor no value of which can be negative (a ReLU's output, pooled or reshaped) in NCHW layout only gets its
maximum, by ``GlobalMaxPool``, which ORT computes in its blocked layout (a ``ReduceMin`` would make it copy the
tensor back to NCHW first); its minimum is recorded as 0. Every grid holds 0, so a minimum enters the encodings only
as ``min(minimum, 0)``, which is 0 for such a tensor either way.

A tensor whose extremes in a batch reach the analyzers' sentinel magnitude (``finfo.min`` attention masks) or are
not finite is taken whole from then on (an ``Identity`` output) and observed as the torch pass observes it, so
sentinels and non-finite values are counted and left out the same way.

Quantizers ORT cannot serve so (another calibration method, a granularity other than per tensor or per channel, a
layer whose input the converted module pads first) are observed by the torch pass, which then runs on the same
batches with the served quantizers passing through; without such quantizers it does not run at all. Everything goes
to the torch pass where ORT's float model is not what the torch pass runs: a frozen, enabled quantizer (AdaRound's
weights, loaded encodings) rounds during calibration, a module in training mode, a sim the original graph no longer
maps, a model too large for one protobuf, a graph ORT cannot load (an op only a converter registered with onnx2torch
knows). The session is kept with the sim and rebuilt when its weights or quantizers change.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper
from torch import nn

from edgequant.export.original_graph import OriginalGraphError, trace_original_graph
from edgequant.onnx.conversion import EXTERNAL_DATA_BYTES, tensor_bytes
from edgequant.onnx.graph_constants import GraphConstants, light_model
from edgequant.onnx.sub_batches import SUB_BATCH_BYTES, largest_activation_bytes, samples_independent
from edgequant.quantization import CalibrationError, PerChannel, PerTensor, Quantizer
from edgequant.quantization.analyzers import SENTINEL_MAGNITUDE, MinMaxAnalyzer
from edgequant.sim.onnx_source import ONNX_NODE_ATTRIBUTE

if TYPE_CHECKING:
    from edgequant.sim.quantsim import QuantSim

ACTIVATION_ROLES = ("model_input", "input", "output")
TorchStep = Callable[[int, tuple, dict], None]
"""The sim's torch calibration step for one batch: ``(index, args, kwargs)``."""


@dataclass(frozen=True)
class OnnxCalibrationReport:
    """Which activation quantizers ONNX Runtime calibrated, and why the others needed the torch pass."""

    served: tuple[str, ...]
    torch_reasons: dict[str, str] = field(default_factory=dict)  # quantizer name -> why the torch pass observes it
    raw_tensors: tuple[str, ...] = ()  # tensors taken whole (sentinels or non-finite values in their extremes)

    @property
    def torch_pass(self) -> bool:
        return bool(self.torch_reasons)


def calibrate_in_onnxruntime(sim: QuantSim, batches: Iterable[tuple[tuple, dict]], torch_step: TorchStep
                             ) -> OnnxCalibrationReport:
    """Observe ``batches`` (from ``sim.batches``, inside ``sim.calibrating()``): the quantizers ORT can serve through
    one ORT session, the others by ``torch_step`` on the same batch, which runs only where such quantizers exist."""
    calibrator = _calibrator(sim)
    served = [calibrator.quantizers[name] for name in calibrator.served]
    torch_needed = bool(calibrator.reasons)
    for reduction in calibrator.reductions.values():  # a calibration that failed half-way left its batches here
        reduction.low = reduction.high = None
    with sim.quantizers_enabled(False, served):  # the torch pass leaves them to ORT
        for index, (args, kwargs) in enumerate(batches):
            if served:
                calibrator.run(index, args, kwargs)
            if torch_needed:
                torch_step(index, args, kwargs)
    calibrator.deliver()
    return calibrator.report()


def onnxruntime_calibration_plan(sim: QuantSim) -> OnnxCalibrationReport:
    """What `calibrate_in_onnxruntime` would do with ``sim`` now (nothing is run)."""
    return _calibrator(sim).report()


@dataclass
class _Reduction:
    """One observed tensor reduced one way: ``axes`` None over everything (per tensor), else over those axes."""

    tensor: str
    axes: tuple[int, ...] | None
    channel_axes: tuple[int, ...] = ()
    pooled: bool = False  # a non-negative NCHW tensor: only its maximum, through GlobalMaxPool (see `_build_session`)
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    @cached_property
    def output(self) -> str:
        """Prefix of the session outputs holding this reduction's extremes."""
        axes = "all" if self.axes is None else "_".join(map(str, self.axes))
        return f"{self.tensor}__edgequant_calibration_{axes}"

    def accumulate(self, low: np.ndarray | None, high: np.ndarray) -> None:
        """Merge one batch's extremes (``low`` None: a pooled tensor, whose grid minimum is 0)."""
        low = np.zeros_like(high) if low is None else low
        if self.low is None:
            self.low, self.high = low, high
        else:
            self.low, self.high = np.minimum(self.low, low), np.maximum(self.high, high)

    def extremes(self) -> torch.Tensor:
        """A tensor holding only the running extremes, shaped so that observing it gives the same statistics (and
        scale shape) as observing the tensor: per channel, ``low`` and ``high`` side by side along a reduced axis."""
        low, high = torch.as_tensor(self.low), torch.as_tensor(self.high)
        if self.axes is None:
            return torch.stack([low.reshape(()), high.reshape(())])
        return torch.cat([low, high], dim=self.axes[0])


class _Calibrator:
    """The session and the quantizer/tensor plan of one sim, valid while its ``fingerprint`` holds."""

    def __init__(self, sim: QuantSim, fingerprint: tuple) -> None:
        self.fingerprint = fingerprint
        self.quantizers = {name: q for name, q in sim.quantizers(role=ACTIVATION_ROLES).items() if not q.frozen}
        self.reasons: dict[str, str] = {}
        self.served: list[str] = []
        self.reductions: dict[tuple, _Reduction] = {}
        self.tensor_of: dict[str, tuple] = {}  # served quantizer -> its reduction's key
        self.raw: set[str] = set()  # tensors taken whole
        self.depth: dict[str, int] = {}  # tensor -> index of its producer in the float graph's topological order
        self.light = onnx.ModelProto()  # the float graph without its weights, for shape inference
        self.independent = False  # whether a batch may run in sub-batches (see edgequant.onnx.sub_batches)
        self.sample_bytes: float | None = None  # the largest activation per sample, from the first batch
        self.sessions: dict[frozenset[str], tuple[ort.InferenceSession, list[str]]] = {}
        self.input_names = sim.onnx_source.input_names
        self.model_bytes = b""  # the float model serialized once: each session appends its own nodes to it
        self.opset = 1
        self._plan(sim)

    # -- plan ------------------------------------------------------------------------------------------
    def _plan(self, sim: QuantSim) -> None:
        reason = self._whole_model_reason(sim)
        if reason is not None:
            self.reasons = dict.fromkeys(self.quantizers, reason)
            return
        try:
            traced, _ = trace_original_graph(sim, include_disabled=True)
        except OriginalGraphError as error:
            self.reasons = dict.fromkeys(self.quantizers, f"the original graph does not map the sim ({error})")
            return
        tensors = {site.quantizer: site.tensor for site in traced.sites}
        self.light = light_model(traced.float_model)
        ranks = _ranks(self.light)
        constants = GraphConstants.of(traced.float_model)
        self.independent = samples_independent(traced.float_model, ranks, constants)
        nonnegative = _nonnegative_tensors(traced.float_model, constants.values)
        for name, quantizer in self.quantizers.items():
            reason, key = self._reduction_key(sim, quantizer, tensors.get(name), ranks)
            if reason is not None:
                self.reasons[name] = reason
                continue
            self.served.append(name)
            self.tensor_of[name] = key
            if key not in self.reductions:
                tensor, axes, channel_axes = key
                pooled = tensor in nonnegative and ranks.get(tensor) == 4 and channel_axes in ((), (1,))
                self.reductions[key] = _Reduction(tensor, axes, channel_axes, pooled)
        # deepest tensor first: ORT's default order is a depth-first walk back from the graph's leaves that starts
        # at the leaf appended last, so in this order each reduction runs right after its tensor is computed and
        # the tensor is freed (appended shallowest first, they all ran after the whole network: every observed
        # tensor stayed alive, 2.4 GB instead of 0.7 GB on resnet50 at 16 images, and ORT's first runs page-faulted)
        self.depth = {output: index for index, node in enumerate(traced.float_model.graph.node)
                      for output in node.output}
        self.reductions = dict(sorted(self.reductions.items(), key=lambda item: self.depth.get(item[1].tensor, -1),
                                      reverse=True))
        self.model_bytes = traced.float_model.SerializeToString()
        self.opset = next((o.version for o in traced.float_model.opset_import if o.domain in ("", "ai.onnx")), 1)
        if self.served:
            try:
                self._session()
            except Exception as error:  # noqa: BLE001 - ORT refuses the graph (an op only a registered converter knows)
                reason = f"ONNX Runtime cannot load the graph ({type(error).__name__}: {str(error).strip()[:200]})"
                self.reasons.update(dict.fromkeys(self.served, reason))
                self.served, self.tensor_of, self.reductions = [], {}, {}

    def _whole_model_reason(self, sim: QuantSim) -> str | None:
        frozen = [name for name, q in sim.quantizers().items() if q.frozen and q.enabled]
        if frozen:  # it quantizes during calibration: what it feeds is not the float model's tensor
            return f"frozen quantizer '{frozen[0]}' quantizes during calibration (ORT computes the float model)"
        if any(module.training for module in sim.model.modules()):
            return "the model is in training mode (ORT computes the inference graph)"
        source = sim.onnx_source
        if tensor_bytes(source.model) > EXTERNAL_DATA_BYTES:
            return "the ONNX model is too large for one protobuf (ORT would need its tensors written out)"
        given = len(sim.model_input.args) + len(sim.model_input.kwargs)
        if given != len(self.input_names) or not set(sim.model_input.kwargs) <= set(self.input_names):
            return "the dummy input does not give every graph input by position or graph name"
        if len(sim.model_input.args) > 0 and any(k in self.input_names[: len(sim.model_input.args)]
                                                 for k in sim.model_input.kwargs):
            return "the dummy input gives a graph input twice"
        return None

    @staticmethod
    def _reduction_key(sim: QuantSim, quantizer: Quantizer, tensor: str | None, ranks: dict[str, int]
                       ) -> tuple[str | None, tuple | None]:
        if type(quantizer.analyzer) is not MinMaxAnalyzer:
            return f"calibration method {quantizer.calibration.name} is not min-max", None
        if tensor is None:
            return "no tensor of the ONNX graph holds what it observes", None
        if quantizer.role == "input" and _padded_input(sim, quantizer):
            return "its layer pads its input before the quantizer sees it", None
        granularity = quantizer.granularity
        if isinstance(granularity, PerTensor):
            return None, (tensor, None, ())
        if not isinstance(granularity, PerChannel) or tensor not in ranks:
            return f"granularity {granularity.describe()} (or an unknown rank) is not reduced in ORT", None
        rank = ranks[tensor]
        channel_axes = tuple(a % rank for a in granularity.axes) if rank else ()
        axes = tuple(d for d in range(rank) if d not in channel_axes)
        if not axes or len(set(channel_axes)) != len(granularity.axes) or list(channel_axes) != sorted(channel_axes):
            return f"granularity {granularity.describe()} of a rank-{rank} tensor is not reduced in ORT", None
        return None, (tensor, axes, channel_axes)

    def report(self) -> OnnxCalibrationReport:
        return OnnxCalibrationReport(tuple(self.served), dict(self.reasons), tuple(sorted(self.raw)))

    # -- running ---------------------------------------------------------------------------------------
    def _session(self) -> tuple[ort.InferenceSession, list[str]]:
        key = frozenset(self.raw)
        if key not in self.sessions:
            self.sessions[key] = _build_session(self.model_bytes, self.opset, self.reductions.values(),
                                                sorted(self.raw, key=lambda tensor: self.depth.get(tensor, -1),
                                                       reverse=True))
        return self.sessions[key]

    def run(self, index: int, args: tuple, kwargs: dict) -> None:
        feeds = {name: _numpy(value) for name, value in zip(self.input_names, args, strict=False)}
        feeds.update({name: _numpy(value) for name, value in kwargs.items()})
        for part in self._sub_batches(feeds):
            self._run(index, part)

    def _sub_batches(self, feeds: dict[str, Any]) -> list[dict[str, Any]]:
        """``feeds`` split along their common leading axis so that one ORT run's largest activation stays under
        `SUB_BATCH_BYTES`; ``[feeds]`` where the samples are not independent, the inputs have no common leading
        axis or the activations are small."""
        sizes = {value.shape[0] if isinstance(value, np.ndarray) and value.ndim else None for value in feeds.values()}
        if not self.independent or len(sizes) != 1 or None in sizes:
            return [feeds]
        size = sizes.pop()
        if self.sample_bytes is None and size > 0:
            largest = largest_activation_bytes(self.light, {name: value.shape for name, value in feeds.items()})
            self.sample_bytes = largest / size if largest else 0.0
        step = max(1, int(SUB_BATCH_BYTES // self.sample_bytes)) if self.sample_bytes else size
        if step >= size:
            return [feeds]
        return [{name: value[start:start + step] for name, value in feeds.items()} for start in range(0, size, step)]

    def _run(self, index: int, feeds: dict[str, Any]) -> None:
        while True:
            session, outputs = self._session()
            try:
                values = dict(zip(outputs, session.run(outputs, feeds), strict=True))
            except Exception as error:  # noqa: BLE001 - ORT raises its own kinds
                raise CalibrationError(
                    f"calibration batch {index} does not run in ONNX Runtime ({type(error).__name__}: "
                    f"{str(error).strip()[:300]}); batches must have the graph inputs' dtypes and shapes, or "
                    "calibrate with engine='torch'"
                ) from error
            reduced = [r for r in self.reductions.values() if r.tensor not in self.raw]
            flagged = {r.tensor for r in reduced
                       if not _plain(values.get(f"{r.output}_min"), values[f"{r.output}_max"])}
            if not flagged:
                break
            self.raw |= flagged  # take these whole from now on, this batch included (run again)
        for reduction in reduced:
            reduction.accumulate(values.get(f"{reduction.output}_min"), values[f"{reduction.output}_max"])
        for name, (tensor, _, _) in self.tensor_of.items():
            if tensor in self.raw:
                self.quantizers[name].analyzer.observe(torch.from_numpy(values[_raw_name(tensor)]))

    def deliver(self) -> None:
        """Hand the running extremes to the analyzers."""
        for name, key in self.tensor_of.items():
            reduction = self.reductions[key]
            if reduction.low is not None:
                self.quantizers[name].analyzer.observe(reduction.extremes())


_CALIBRATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _calibrator(sim: QuantSim) -> _Calibrator:
    """The sim's calibrator, rebuilt when what its session was built from changed."""
    fingerprint = _fingerprint(sim)
    calibrator = _CALIBRATORS.get(sim)
    if calibrator is None or calibrator.fingerprint != fingerprint:
        calibrator = _Calibrator(sim, fingerprint)
        _CALIBRATORS[sim] = calibrator
    return calibrator


def _fingerprint(sim: QuantSim) -> tuple:
    """What the session and plan depend on: the quantizers (which observe, how; frozen ones quantize), training
    flags, the layers that compute ONNX nodes (folded BatchNorms are gone) and their parameters' storage, version
    counter, shape and sum (``.data`` edits bypass the version counter, not the sum; a float64 sum would take 20x
    as long)."""
    quantizers, training, layers = [], [], []
    for name, module in sim.model.named_modules():  # one walk: a large model has thousands of modules
        training.append(module.training)
        if isinstance(module, Quantizer):
            quantizers.append((name, module.frozen, module.enabled, type(module.analyzer).__name__,
                               module.granularity.describe()))
        elif ONNX_NODE_ATTRIBUTE in module.__dict__:
            params = tuple(
                (param_name, param.data_ptr(), param._version, tuple(param.shape), float(param.detach().sum()))
                for param_name, param in module.named_parameters(recurse=False)
            )
            layers.append((name, module.__dict__[ONNX_NODE_ATTRIBUTE].outputs, params))
    return (tuple(quantizers), tuple(training), tuple(layers), len(sim.model_input.args),
            tuple(sim.model_input.kwargs))


def _padded_input(sim: QuantSim, quantizer: Quantizer) -> bool:
    """Whether the quantizer's layer is the second half of ``Sequential(pad, layer)``: it sees the padded input."""
    parent_name, _, _ = quantizer.owner.rpartition(".")
    parent = sim.model.get_submodule(parent_name) if parent_name else sim.model
    return isinstance(parent, nn.Sequential)


def _ranks(light: onnx.ModelProto) -> dict[str, int]:
    """Rank of each tensor shape inference types, run on the graph `light_model` made (the weights' values do not
    change any rank)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:  # noqa: BLE001 - then per-channel quantizers take the torch pass
        return {}
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: len(v.type.tensor_type.shape.dim) for v in values if v.type.tensor_type.HasField("shape")}


def _raw_name(tensor: str) -> str:
    return f"{tensor}__edgequant_calibration_whole"


def _build_session(model_bytes: bytes, opset: int, reductions: Iterable[_Reduction], raw: list[str]
                   ) -> tuple[ort.InferenceSession, list[str]]:
    """A session computing the reductions of the tensors not taken whole, and the whole ``raw`` tensors, in the order
    given (deepest tensor first, see `_Calibrator._plan`).

    The nodes and outputs are a second serialized model appended to ``model_bytes``: protobuf merges the two, which
    appends their repeated fields (nodes, outputs, initializers), so the weights are not serialized again."""
    addition = onnx.ModelProto()
    graph = addition.graph
    outputs = []
    for reduction in reductions:
        if reduction.tensor in raw:
            continue
        name = reduction.output
        if reduction.pooled:  # ORT keeps it in its blocked layout (NCHWc) and only copies out [N, C, 1, 1]
            graph.node.append(helper.make_node("GlobalMaxPool", [reduction.tensor], [name + "_pooled"]))
            graph.node.append(_reduce("ReduceMax", name + "_pooled", name + "_max", reduction.axes, opset, graph))
            outputs.append(name + "_max")
            continue
        for op, suffix in (("ReduceMin", "_min"), ("ReduceMax", "_max")):
            graph.node.append(_reduce(op, reduction.tensor, name + suffix, reduction.axes, opset, graph))
            outputs.append(name + suffix)
    for tensor in raw:
        graph.node.append(helper.make_node("Identity", [tensor], [_raw_name(tensor)]))
        outputs.append(_raw_name(tensor))
    graph.output.extend(helper.make_empty_tensor_value_info(name) for name in outputs)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes + addition.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session, outputs


def _reduce(op: str, tensor: str, output: str, axes: tuple[int, ...] | None, opset: int, graph: onnx.GraphProto
            ) -> onnx.NodeProto:
    """``op`` (ReduceMin/ReduceMax) of ``tensor`` over ``axes`` (kept as size 1), or over everything into a scalar."""
    if axes is None:
        return helper.make_node(op, [tensor], [output], keepdims=0)
    if opset < 18:
        return helper.make_node(op, [tensor], [output], axes=list(axes), keepdims=1)
    axes_name = f"edgequant_calibration_axes_{'_'.join(map(str, axes))}"
    if not any(i.name == axes_name for i in graph.initializer):
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(axes, np.int64), axes_name))
    return helper.make_node(op, [tensor, axes_name], [output], keepdims=1)


def _plain(low: np.ndarray | None, high: np.ndarray) -> bool:
    """Whether these batch extremes hold only data: finite and below the sentinel magnitude (NaN fails)."""
    return bool((low is None or (low > -SENTINEL_MAGNITUDE).all()) and (high < SENTINEL_MAGNITUDE).all())


def _nonnegative_tensors(model: onnx.ModelProto, constants: dict[str, np.ndarray]) -> set[str]:
    """Tensors no value of which is negative: outputs of ``Relu``, ``Sigmoid``, ``HardSigmoid``, ``Softmax``, of
    ``Clip`` with a constant lower bound of at least 0 (ReLU6), of ``Mul``/``Add``/``Div`` whose inputs are such
    tensors or non-negative constants (a divisor positive: hard-swish's ``Clip(x + 3, 0, 6) / 6``), and of pooling
    and data movement of such tensors. ``constants``: the values of the model's small constants."""
    found: set[str] = set()

    def nonnegative(tensor: str, positive: bool = False) -> bool:
        if tensor in constants:
            values = constants[tensor]
            return values.size > 0 and bool((values > 0).all() if positive else (values >= 0).all())
        return not positive and tensor in found

    for node in model.graph.node:  # in topological order, as ONNX requires
        if node.domain not in ("", "ai.onnx") or not node.output:
            continue
        inputs = list(node.input)
        if node.op_type in _NONNEGATIVE_OPS:
            found.add(node.output[0])
        elif node.op_type in _KEEPS_SIGN_OPS and inputs and inputs[0] in found:
            found.add(node.output[0])
        elif node.op_type in ("Concat", "Mul", "Add") and inputs and all(nonnegative(i) for i in inputs):
            found.add(node.output[0])
        elif node.op_type == "Div" and len(inputs) == 2 and nonnegative(inputs[0]) and nonnegative(inputs[1], True):
            found.add(node.output[0])
        elif node.op_type == "Clip":
            bound = next((a.f for a in node.attribute if a.name == "min"), None)
            if len(inputs) > 1 and inputs[1] in constants and constants[inputs[1]].size == 1:
                bound = float(constants[inputs[1]])
            if bound is not None and bound >= 0:
                found.add(node.output[0])
    return found


_NONNEGATIVE_OPS = {"Relu", "Sigmoid", "HardSigmoid", "Softmax"}
_KEEPS_SIGN_OPS = {"MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool", "Flatten", "Reshape", "Transpose",
                   "Identity", "Squeeze", "Unsqueeze"}


def _numpy(value: Any) -> Any:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
