"""Which ops of a sim the runtime computes as one integer kernel, with the grids they read and write, and why
the others are left to the default fake-quantized path."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from edgequant.quantization import PerChannel, Quantizer
from edgequant.quantization.granularity import PER_TENSOR, PerBlock
from edgequant.sim.emulation.arithmetic import RuntimeModel
from edgequant.sim.emulation.kernels import (
    FLOAT_FALLBACKS,
    KERNELS,
    Interpolation,
    is_global_pool_size,
    op_kind,
    softmax_dim,
)
from edgequant.sim.emulation.provenance import RecordedCall, RecordedTensor, record_calls
from edgequant.sim.graph import FUSED_ACTIVATIONS, ModelGraph
from edgequant.sim.ops import (
    function_name,
    is_data_movement,
    is_pass_through,
    module_op_type,
    qualified_name,
    weight_output_axis,
)
from edgequant.sim.quantized_module import FunctionalOp


@dataclass
class EmulatedOp:
    """One fused integer op: the module whose forward is replaced, the grids it reads and writes."""

    name: str
    kind: str  # a key of `KERNELS`: Conv, Gemm, MatMul, Add, Mul, GlobalAveragePool, AveragePool, Sigmoid, ...
    module: nn.Module
    inputs: list[Quantizer]
    output: Quantizer | None  # None: a float op whose float output the runtime passes on (see `_float_readers`)
    activation: nn.Module | None = None  # the ReLU/ReLU6 fused between the op and its output quantizer


@dataclass
class EmulationPlan:
    """What `plan_emulation` found: the ops emulated, and the candidates left to the default path, with why."""

    runtime: RuntimeModel
    ops: list[EmulatedOp] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def coverage(self, named: int = 3) -> str:
        """One line: how many of the ops the runtime computes with its own arithmetic are emulated (its integer
        kernels, and the float ops it computes with another formula than PyTorch: the kinds in `KERNELS`), and the
        first ``named`` that are not."""
        total = len(self.ops) + len(self.skipped)
        if not self.skipped:
            return f"emulating {self.runtime.name}: every op emulated ({total} of {total})"
        first = ", ".join(list(self.skipped)[:named]) + (", ..." if len(self.skipped) > named else "")
        return (f"emulating {self.runtime.name}: {len(self.ops)} of {total} ops emulated "
                f"({len(self.ops) / total:.0%}); not emulated: {first} (plan.summary() says why)")

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.kind] = counts.get(op.kind, 0) + 1
        lines = [self.coverage(), f"  models: {self.runtime.models or self.runtime.name}",
                 "  emulated: " + (", ".join(f"{k}×{n}" for k, n in sorted(counts.items())) or "no op")]
        lines += [f"  not emulated: {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


class _GraphIndex:
    """The sim's fx graphs (the root's and nested ones), to follow a tensor to the quantizer that produced it;
    where a graph's input comes from outside every graph, the recorded call of that graph says (`provenance`)."""

    def __init__(self, model: nn.Module, recorded: dict[str, RecordedCall]) -> None:
        self.model = model
        self.recorded = recorded
        self.graphs: dict[str, fx.GraphModule] = {
            name: m for name, m in model.named_modules() if isinstance(m, fx.GraphModule)
        }
        self.calls: dict[str, tuple[str, fx.Node]] = {}  # nested graph name -> (parent graph name, its call node)
        for prefix, graph_module in self.graphs.items():
            for node in graph_module.graph.nodes:
                if node.op == "call_module":
                    full = _join(prefix, node.target)
                    if full in self.graphs:
                        self.calls[full] = (prefix, node)
        self.views = {prefix: ModelGraph.of_traced(module, prefix) for prefix, module in self.graphs.items()}

    def module(self, prefix: str, node: fx.Node) -> nn.Module:
        return self.model.get_submodule(_join(prefix, node.target))

    def producer_quantizer(self, prefix: str, node: Any) -> Quantizer | None:
        """The enabled quantizer whose output ``node`` (a traced node or a recorded tensor) holds, through
        pass-through and data-movement ops and from one graph into the next."""
        while isinstance(node, fx.Node):
            if node.op == "placeholder":
                index = [n for n in self.graphs[prefix].graph.nodes if n.op == "placeholder"].index(node)
                if prefix in self.calls:
                    prefix, call = self.calls[prefix]
                    node = call.args[index] if index < len(call.args) else None
                    continue
                if prefix in self.recorded:  # a graph called by code outside every graph
                    node = self.recorded_argument(prefix, node)  # unless called again with other quantizers' inputs
                    break
                quantizers = getattr(self.model, "model_input_quantizers", {})
                quantizer = quantizers[str(index)] if str(index) in quantizers else None
                return quantizer if quantizer is not None and quantizer.enabled else None
            if node.op == "call_module":
                module = self.module(prefix, node)
                if isinstance(module, Quantizer):  # a model-input quantizer the sim placed in the graph
                    return module if module.enabled else None
                if isinstance(module, fx.GraphModule):
                    prefix = _join(prefix, node.target)
                    node = next(n for n in module.graph.nodes if n.op == "output").args[0]
                    continue
                quantizers = getattr(module, "output_quantizers", {})
                if "0" in quantizers and quantizers["0"].enabled:
                    return quantizers["0"]
                if is_pass_through(module) or qualified_name(type(module)) in DATA_MOVEMENT_MODULES:
                    node = node.args[0] if node.args else None
                    continue
                return None
            if node.op in ("call_function", "call_method") and is_data_movement(node.target):
                node = node.args[0] if node.args else None
                continue
            return None
        if isinstance(node, RecordedTensor) and node.quantizer is not None and node.quantizer.enabled:
            return node.quantizer
        return None

    def recorded_argument(self, prefix: str | None, node: Any) -> Any:
        """What the recorded run passed for ``node`` where it is an input of a graph called by code outside every
        graph, each call alike (`RecordedCall.uniform`): a `RecordedTensor`; else ``node``."""
        if not (isinstance(node, fx.Node) and node.op == "placeholder" and prefix is not None
                and prefix not in self.calls and prefix in self.recorded and self.recorded[prefix].uniform):
            return node
        index = [n for n in self.graphs[prefix].graph.nodes if n.op == "placeholder"].index(node)
        call = self.recorded[prefix]
        return call.args[index] if index < len(call.args) else call.kwargs.get(node.target)

    def source(self, prefix: str | None, node: Any) -> Any:
        """``node`` followed back through data movement and pass-through modules (Swin's StochasticDepth)."""
        while isinstance(node, fx.Node) and (
                (node.op in ("call_function", "call_method") and is_data_movement(node.target))
                or (node.op == "call_module" and prefix is not None and is_pass_through(self.module(prefix, node)))):
            node = node.args[0] if node.args else None
        return node

    @staticmethod
    def gathered(node: Any) -> bool:
        """Does ``node`` reach its producer through tensor indexing with an integer (``x[:, 0]``: BERT's pooler
        takes the first token; ``qkv[0]``) or through a function that declares ``runtime_reads_float`` (Swin's
        `window_partition`: Pad, Slice and Concat)? The export writes a Gather (those ops) there, after the
        producer's DQ and with no Q of its own, so the op reading ``node`` gets a float input and the runtime
        does not fuse it."""
        while isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and is_data_movement(
                node.target):
            index = node.args[1] if len(node.args) > 1 else None
            integer = isinstance(index, int) and not _sequence(node.args[0])  # qkv[0]; not chunk(...)[0]
            if node.target in (operator.getitem, "__getitem__") and (integer or isinstance(index, tuple) and any(
                    isinstance(item, int) for item in index)):
                return True
            if getattr(node.target, "runtime_reads_float", False):
                return True
            node = node.args[0] if node.args else None
        return False

    def through_fused_pad(self, prefix: str, node: Any, spatial_axes: int) -> Any:
        """The input of a constant zero padding that ONNX Runtime folds into the convolution reading ``node``
        (its PadFusion: a Pad with one consumer, pads ≥ 0 on spatial axes only, a constant value 0 given), else
        ``node``. The fused QLinearConv pads with the input's zero point, and the sim's padded zeros are index 0
        of the same grid: the convolution reads the grid of what the padding pads."""
        if not isinstance(node, fx.Node) or node.op != "call_module" or len(node.users) != 1 or not node.args:
            return node
        module = self.module(prefix, node)
        if isinstance(module, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)) and not node.kwargs:
            pads, value = module.padding, module.value
        elif (module_op_type(module) == "Pad" and isinstance(module, FunctionalOp) and len(node.args) == 2
              and not any(q.enabled for q in getattr(module, "output_quantizers", {}).values() if q is not None)):
            pads, value = node.args[1], node.kwargs.get("value")
            if value is None:  # exported without a constant-value input, which PadFusion does not fold
                return node
            if node.kwargs.get("mode", "constant") != "constant" or set(node.kwargs) - {"mode", "value"}:
                return node
        else:
            return node
        fused = (isinstance(pads, (tuple, list)) and all(isinstance(p, int) and p >= 0 for p in pads)
                 and len(pads) <= 2 * spatial_axes and not value)
        return node.args[0] if fused else node

    def fused_output(self, prefix: str | None, node: Any) -> tuple[Quantizer | None, nn.Module | None]:
        """The quantizer that ends ``node``'s fused group (its own, or that of the activation the graph says is
        fused after it), and that activation; no quantizer where an unfolded BatchNorm is in between. An op
        outside every graph (``prefix`` None: no graph says what follows it) ends with its own quantizer."""
        quantizers = getattr(node.module if prefix is None else self.module(prefix, node), "output_quantizers", {})
        activation = None
        view = self.views[prefix] if prefix is not None else None
        for fused in view.fused_after(view.node_of(node)) if view is not None else ():
            if "0" in quantizers:
                break
            if module_op_type(fused.module) not in FUSED_ACTIVATIONS:
                return None, None
            activation = fused.module
            quantizers = getattr(activation, "output_quantizers", {})
        if "0" not in quantizers:
            return None, activation
        return (quantizers["0"] if quantizers["0"].enabled else None), activation


def _on_integer_weight_grid(module: nn.Module, weight: Quantizer) -> bool:
    """Can the runtime's integer Gemm read this weight: 8 bits, per tensor or per output channel?"""
    return weight.bitwidth == 8 and weight.float_format is None and weight.granularity in (
        PER_TENSOR, PerChannel(weight_output_axis(module, module.weight)))


DATA_MOVEMENT_MODULES = ("torchvision.ops.misc.Permute",)
"""Modules that only move their input's values (Swin's NHWC → NCHW ``Permute``, exported as a Transpose, which
ORT moves past the next op: the QLinearGlobalAveragePool after it reads the grid before it)."""


def _unquantized_function(node: Any) -> bool:
    """Is ``node`` a call of a Python function fx did not trace into (``torch.fx.wrap``: Swin's
    ``shifted_window_attention``)? The sim quantizes nothing inside it and the export writes its ops in float: the
    runtime computes them with its own float kernels, in an order the emulation does not model."""
    if not (isinstance(node, fx.Node) and node.op == "call_function") or is_data_movement(node.target):
        return False
    module = getattr(node.target, "__module__", None) or ""
    return module.split(".")[0] not in ("torch", "_operator", "operator", "builtins", "math")


SEQUENCE_OUTPUTS = frozenset({"chunk", "split", "split_with_sizes", "tensor_split", "unbind"})
"""Data movement returning a tuple of tensors: an integer index picks one of them (no Gather in the export)."""


def _sequence(node: Any) -> bool:
    return isinstance(node, fx.Node) and function_name(node.target).strip("_") in SEQUENCE_OUTPUTS


def _float_gemm_unsupported(module: nn.Module, weight: Quantizer, source: Quantizer, output: Quantizer | None) -> str:
    """Why a Linear the runtime computes in float is not emulated ("" where it is): the float path is modelled
    for 8- and 4-bit weights (per channel, per block or LPBQ), which ORT fuses with their DQ into MatMulNBits."""
    if weight.bitwidth not in (4, 8):
        return (f"a {weight.bitwidth}-bit weight without an integer kernel: ORT's MatMulNBits kernel for it sums "
                f"in an order that is not modelled")
    has_bias = module.tensor_values("bias") is not None
    if isinstance(weight.granularity, PerBlock) and has_bias:
        return "a blocked weight with a bias (a float MatMul, then the bias): not modelled"
    if (has_bias and source.bitwidth == 8 and output is not None and output.bitwidth != 8
            and _on_integer_weight_grid(module, weight)):
        return ("an 8-bit input and weight into a wider output with a bias: ORT's MatMulIntegerToFloat and a float "
                "Add, not modelled")
    return ""


def _float_readers(index: _GraphIndex, prefix: str | None, node: Any) -> bool:
    """Is ``node``'s unquantized output read only by ops the emulation computes on float inputs? Then the runtime
    runs the op in float and hands its float output on (DQ → Conv → HardSwish → Q: a supergroup that leaves the
    Conv's output unquantized), which the emulation follows exactly."""
    if prefix is None or not isinstance(node, fx.Node) or not node.users:
        return False
    for user in node.users:
        module = index.module(prefix, user) if user.op == "call_module" else None
        if module is not None and is_pass_through(module):  # a folded BatchNorm's Identity
            if not _float_readers(index, prefix, user):
                return False
            continue
        kind = op_kind(module) if module is not None else None
        if kind is None or not KERNELS[kind].float_inputs:
            return False
    return True


def clip_bounds(module: nn.Module) -> tuple[float, float] | None:
    """What a ReLU/ReLU6/Hardtanh fused after an op clamps to; None for an activation whose bounds are unknown."""
    if module_op_type(module) == "Relu":
        return 0.0, math.inf
    if isinstance(module, nn.ReLU6) or (isinstance(module, FunctionalOp) and module.target is F.relu6):
        return 0.0, 6.0
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass
class _UntracedCall:
    """A module called outside every fx graph (a layer of a module fx could not trace, or one of its functional
    ops, `edgequant.sim.interception`), as called with the dummy input."""

    module: nn.Module
    args: tuple
    kwargs: dict
    uniform: bool


def plan_emulation(model: nn.Module, runtime: RuntimeModel, args: tuple = (), kwargs: dict | None = None
                   ) -> EmulationPlan:
    """Find every op the runtime fuses into an integer kernel, with the quantizers of its inputs and output.

    ``model`` runs once on ``(args, kwargs)`` (the dummy input) to follow tensors where no fx graph does: from
    one graph into another through untraced code, into the layers and ops of untraced modules (`provenance`).
    Without an input only what the graphs show is followed."""
    plan = EmulationPlan(runtime)
    recorded = record_calls(model, args, kwargs or {}) if args or kwargs else {}
    index = _GraphIndex(model, recorded)
    candidates: list[tuple[str | None, Any, str, nn.Module]] = []
    for prefix, graph_module in index.graphs.items():
        candidates += [(prefix, node, _join(prefix, node.target), index.module(prefix, node))
                       for node in graph_module.graph.nodes if node.op == "call_module"]
    in_graphs = {name for _, _, name, _ in candidates}
    for name, call in recorded.items():
        module = model.get_submodule(name)
        if name not in in_graphs and not isinstance(module, fx.GraphModule):
            # torch's dispatch spells out a function's defaults (F.softmax: dtype=None, _stacklevel=3)
            kwargs = {k: v for k, v in call.kwargs.items() if v is not None and k != "_stacklevel"}
            candidates.append((None, _UntracedCall(module, call.args, kwargs, call.uniform), name, module))
    for prefix, node, name, module in candidates:
        kind = op_kind(module)
        if kind is None or _by_float_constant(module, node, kind, index, prefix, recorded.get(name)):
            continue
        reason = _plan_op(plan, index, prefix, node, name, module, kind)
        if reason:
            plan.skipped[name] = reason
    return plan


def _is_tensor(arg: Any) -> bool:
    return isinstance(arg, (fx.Node, RecordedTensor))


def _by_float_constant(module: nn.Module, node: fx.Node | _UntracedCall, kind: str, index: _GraphIndex,
                       prefix: str | None, recorded: RecordedCall | None) -> bool:
    """An Add/Mul of a tensor and an unquantized constant, or a Concat with such a constant among its inputs (ViT's
    class token before the patch embeddings; `_constant`): the export has no DQ on it, so the runtime computes the
    op in float32 between DQ and Q, as the default sim does: not an integer op. ``recorded``: the op's call in the
    dummy run, which tells a graph's shape arithmetic (numbers) from its tensors."""
    if kind == "Concat" and node.args and isinstance(node.args[0], (tuple, list)):
        held = recorded.args[0] if recorded is not None and recorded.args else ()
        items = list(node.args[0])
        return any(_constant(index, prefix, item, held[i] if i < len(held) else None) for i, item in enumerate(items))
    if kind not in ("Add", "Mul") or len(node.args) != 2:
        return False
    held = recorded.args if recorded is not None and len(recorded.args) == 2 else (None, None)
    for position, (arg, value) in enumerate(zip(node.args, held, strict=True)):
        own = module.input_quantizers[str(position)] if str(position) in module.input_quantizers else None
        if _constant(index, prefix, arg, value) and (own is None or not own.enabled):
            return True
    return False


def _constant(index: _GraphIndex, prefix: str | None, arg: Any, recorded: Any) -> bool:
    """Does ``arg`` hold what the export writes as a constant, or as a tensor no quantizer produced: a number (also
    a node of shape arithmetic, ViT's ``(width // heads) ** -0.5``, a number in the recorded call ``recorded``), a
    parameter or buffer (through data movement: ViT's class token expanded to the batch), a tensor that no
    quantizer produced outside every graph (BERT's attention mask; a rotary embedding's cos and sin tables)."""
    if recorded is not None and not isinstance(recorded, (RecordedTensor, torch.Tensor)):
        return True
    arg = index.source(prefix, index.recorded_argument(prefix, arg))
    return (not _is_tensor(arg) or (isinstance(arg, fx.Node) and arg.op == "get_attr")
            or (isinstance(arg, RecordedTensor) and arg.quantizer is None and arg.float_source is None))


def _plan_op(plan: EmulationPlan, index: _GraphIndex, prefix: str | None, node: fx.Node | _UntracedCall,
             name: str, module: nn.Module, kind: str) -> str:
    """Add ``node``'s op to the plan (``prefix``: its graph, None outside every graph); returns why not where
    it is not emulated."""
    kernel = KERNELS[kind]
    if isinstance(node, _UntracedCall) and not node.uniform:
        return "called more than once, with inputs from other quantizers (one emulated forward serves every call)"
    if set(node.kwargs) - set(kernel.keywords):
        return "called with keyword arguments"
    args = node.args
    if kind == "GlobalAveragePool" and isinstance(module, FunctionalOp):  # F.adaptive_avg_pool2d(x, 1)
        if len(args) != 2 or not is_global_pool_size(args[1]):
            return "not a global average pool"
        args = args[:1]
    if kernel.num_inputs is None:  # torch.cat([a, b], dim)
        args = tuple(args[0]) if args and isinstance(args[0], (tuple, list)) else ()
    elif len(args) == kernel.num_inputs + len(kernel.keywords) and kernel.keywords:  # F.leaky_relu(x, 0.2)
        args = args[:kernel.num_inputs]
    if not args or (kernel.num_inputs is not None and len(args) != kernel.num_inputs) or not all(
            _is_tensor(a) for a in args):
        return f"expects {kernel.num_inputs or 'a list of'} tensor input(s)"
    if kind in ("Conv", "Gemm") and index.gathered(args[0]):
        if kind == "Conv":
            return "its input is indexed with an integer after the DQ (a Gather): the runtime runs it in float"
        kind, kernel = "GatheredGemm", KERNELS["GatheredGemm"]  # a float Gemm in the runtime
    if kind == "Conv":
        args = (index.through_fused_pad(prefix, args[0], module.weight.dim() - 2),)
    inputs = []
    for position, arg in enumerate(() if kernel.float_inputs else args):  # a float op needs no input grid
        key = str(position) if kernel.num_inputs is not None else None  # a list's own quantizers are not per item
        own = module.input_quantizers[key] if key in module.input_quantizers else None
        quantizer = own if own is not None and own.enabled else index.producer_quantizer(prefix, arg)
        source = index.source(prefix, index.recorded_argument(prefix, arg))
        computed = (getattr(source.target, "__name__", source.target) if _unquantized_function(source) else
                    source.float_source if isinstance(source, RecordedTensor) else None)
        if quantizer is None and computed is not None:
            return (f"input {position} is the float output of {computed}, which the sim does not quantize: the "
                    f"runtime computes it with its own float kernels (not modelled)")
        if quantizer is None:
            return f"input {position} does not come from a quantizer the sim can trace"
        inputs.append(quantizer)
    weight = module.param_quantizers["weight"] if "weight" in getattr(module, "param_quantizers", {}) else None
    if kernel.weighted:
        if weight is None or not weight.enabled:
            return "its weight is not quantized"
        if kind == "Conv" and module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (the runtime pads in a separate op)"
    output, activation = index.fused_output(prefix, node)
    if output is None and not (kind in FLOAT_FALLBACKS and activation is None and _float_readers(index, prefix, node)):
        return "its output is not quantized by one fused group (op → [ReLU/ReLU6] → quantizer)"
    if activation is not None and clip_bounds(activation) is None:
        return f"the bounds of its fused {module_op_type(activation)} are not known to the emulation"
    if kind == "Resize" and (unsupported := Interpolation.of(module, node.args, node.kwargs).unsupported()):
        return unsupported
    if kind in FLOAT_FALLBACKS and (output is None
                                    or any(index.gathered(arg) for arg in args)
                                    or any(q.bitwidth != 8 for q in (*inputs, output) if q.float_format is None)
                                    or (kernel.weighted and not _on_integer_weight_grid(module, weight))):
        kind, kernel = FLOAT_FALLBACKS[kind], KERNELS[FLOAT_FALLBACKS[kind]]
        if kind == "FloatGemm" and (reason := _float_gemm_unsupported(module, weight, inputs[0], output)):
            return reason
        if kind == "FloatConv" and not isinstance(module, nn.Conv2d):
            return "a 1-D or 3-D convolution without an integer kernel: its float path is not modelled"
    if kind == "FloatSoftmax" and softmax_dim(module, (*node.args, *node.kwargs.values())) != -1:
        return "a float softmax over another axis than the last (named -1): not modelled"
    if kind == "Softmax" and softmax_dim(module, (*node.args, *node.kwargs.values())) is None:
        return "a softmax without an explicit dim"
    if kind == "Softmax" and any(q.symmetric for q in (*inputs, output)):
        return "a signed grid (the runtime's int8 QLinearSoftmax wraps around above 127; not emulated)"
    for quantizer in (q for q in (*inputs, output, weight) if q is not None):
        if quantizer.float_format is not None:  # fp8 has a scale and 8 bits, but no integer grid
            return f"quantizer {quantizer.name} has the float format {quantizer.float_format.name}"
        granularities = (PER_TENSOR,)
        if quantizer is weight and kind in ("FloatGemm", "FloatConv"):  # dequantized for a float product
            granularities += (quantizer.granularity,)
        elif quantizer is weight:  # the runtime rescales its accumulator by one multiplier per output channel
            granularities += (PerChannel(weight_output_axis(module, module.weight)),)
        if (quantizer.bitwidth != 8 and not kernel.float_inputs) or quantizer.granularity not in granularities:
            return (f"quantizer {quantizer.name} is not an 8-bit per-tensor activation / per-output-channel weight "
                    f"grid ({quantizer.granularity.describe()})")
    plan.ops.append(EmulatedOp(name, kind, module, inputs, output, activation))
    return ""


