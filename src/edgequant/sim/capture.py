"""Graph capture: turn functional ops into modules so that they can be quantized like layers.

Why torch.fx and not torch.export: fx rewrites the *eager* module in place and keeps every parameter,
buffer and submodule under its original name, so ``conv1.weight`` stays ``conv1.weight`` in state dicts,
optimizers, DDP and AIMET-style encodings files, and the result trains like any ``nn.Module``.
torch.export produces a functionalised ATen graph with lifted parameters, made for deployment, not for
further training.

fx cannot follow data-dependent control flow. We therefore trace the whole model first and, where that
fails, each child separately (recursively). A traced graph is only kept if it reproduces the recorded
output of the dummy input exactly; a module that cannot be traced keeps its layers quantized (they are
leaves) and the functional ops it calls itself are reported as float in the coverage report.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from edgequant.sim.aten_layers import lift_aten_layers
from edgequant.sim.onnx_source import ONNX_NODE_ATTRIBUTE
from edgequant.sim.ops import (
    function_name,
    function_op_type,
    is_data_movement,
    is_float_math_call,
    is_pass_through,
    module_op_type,
)
from edgequant.sim.quantized_module import FunctionalOp, is_float_tensor


@dataclass
class CallRecord:
    """What one module saw on its first call with the dummy input."""

    args: tuple  # kept (with output) only for modules that may be traced; leaves record shapes of calls only
    kwargs: dict
    output: Any = None
    finished: bool = False  # the first call returned (later calls record nothing)
    float_inputs: list[int] = field(default_factory=list)
    num_float_outputs: int = 0
    float_ops: list = field(default_factory=list)  # math functions called by forward itself, in order


@dataclass
class CoverageNote:
    """A tensor that gets no quantizer of its own, and why."""

    tensor: str
    op: str
    reason: str
    by_design: bool = False  # the hardware never quantizes it either (fused, kept float by the config, data movement)


def is_leaf(module: nn.Module) -> bool:
    """Leaves are the layers we quantize as a whole (and fx must not trace into)."""
    return (
        module_op_type(module) is not None
        or is_pass_through(module)
        or not any(True for _ in module.children())
    )


class _OpRecorder(TorchFunctionMode):
    """Counts the functional math ops each module calls directly (not inside its children)."""

    def __init__(self, stack: list[str], records: dict[str, CallRecord]) -> None:
        super().__init__()
        self.stack = stack
        self.records = records

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if self.stack and is_float_math_call(func, args, kwargs or {}):
            record = self.records.get(self.stack[-1])
            if record is not None and not record.finished:  # first call only
                record.float_ops.append(func)
        return func(*args, **(kwargs or {}))


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value) if not hasattr(value, "_fields") else value
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def record_calls(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, CallRecord]:
    """Run the dummy input once, recording each module's first call, by module name."""
    records: dict[str, CallRecord] = {}
    stack: list[str] = []
    handles = []

    def before(name: str):
        def hook(module: nn.Module, call_args: tuple, call_kwargs: dict) -> None:
            stack.append(name)
            if name not in records:
                keep = not is_leaf(module)
                records[name] = CallRecord(
                    _detach(call_args) if keep else (),
                    _detach(call_kwargs) if keep else {},
                    float_inputs=[i for i, a in enumerate(call_args) if is_float_tensor(a)],
                )

        return hook

    def after(name: str):
        def hook(module: nn.Module, call_args: tuple, call_kwargs: dict, output: Any) -> None:
            stack.pop()
            record = records[name]
            if not record.finished:
                record.finished = True
                record.output = _detach(output) if not is_leaf(module) else None
                record.num_float_outputs = sum(is_float_tensor(v) for v in tree_flatten(output)[0])

        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(before(name), with_kwargs=True))
        handles.append(module.register_forward_hook(after(name), with_kwargs=True))
    try:
        with torch.no_grad(), _OpRecorder(stack, records):
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return records


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return is_leaf(module) or super().is_leaf_module(module, qualname)

    def _proxy_placeholder(self, name, concrete_args, sig, fn_for_analysis):  # noqa: ANN001, ANN202
        # non-tensor values passed through **kwargs (Hugging Face passes cache=None, position_ids=None...)
        # are baked into the graph like other concrete arguments; fx itself cannot specialise them
        if name.startswith("*") and concrete_args is not None and name in concrete_args:
            return concrete_args[name]
        return super()._proxy_placeholder(name, concrete_args, sig, fn_for_analysis)


def _drop_folded_kwargs(folded: dict, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Pre-hook of a traced module: remove the **kwargs that tracing baked in, after checking they still hold."""
    for key, value in folded.items():
        if key in kwargs and kwargs[key] is not value and kwargs[key] != value:
            raise RuntimeError(
                f"{type(module).__name__} was traced with {key}={value!r} but is now called with {key}="
                f"{kwargs[key]!r}; build the QuantSim with a dummy_input that uses the same settings"
            )
    return args, {k: v for k, v in kwargs.items() if k not in folded}


def _same_output(actual: Any, expected: Any) -> bool:
    actual_leaves, actual_spec = tree_flatten(actual)
    expected_leaves, expected_spec = tree_flatten(expected)
    if len(actual_leaves) != len(expected_leaves):
        return False
    for got, want in zip(actual_leaves, expected_leaves, strict=True):
        if isinstance(want, torch.Tensor):
            if not (isinstance(got, torch.Tensor) and got.shape == want.shape):
                return False
            if not ((got == want) | (got.isnan() & want.isnan())).all():
                return False
    return True


def _trace_unwrapped(module: nn.Module, concrete: dict[str, Any]) -> fx.Graph:
    """Trace the undecorated ``forward``: fx mis-binds arguments through ``functools.wraps`` decorators
    (transformers wraps many forwards to rename deprecated kwargs)."""
    cls = type(module)
    forward = inspect.unwrap(cls.forward)
    if forward is cls.forward:
        return LeafTracer().trace(module, concrete_args=concrete)
    module.__class__ = type(cls.__name__, (cls,), {"forward": forward})
    try:
        return LeafTracer().trace(module, concrete_args=concrete)
    finally:
        module.__class__ = cls


def try_trace(module: nn.Module, record: CallRecord) -> tuple[fx.GraphModule | None, str]:
    """Trace ``module`` with non-tensor arguments fixed to their recorded values; (None, reason) on failure."""
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*record.args, **record.kwargs)
        concrete: dict[str, Any] = {}
        folded: dict[str, Any] = {}
        for name, param in signature.parameters.items():
            value = bound.arguments.get(name, param.default)
            if param.kind == param.VAR_POSITIONAL:
                if value:
                    return None, f"forward takes *{name} which fx cannot trace"
            elif param.kind == param.VAR_KEYWORD:
                folded = dict(value) if value is not param.default else {}
                if any(isinstance(v, torch.Tensor) for v in tree_flatten(folded)[0]):
                    return None, f"tensors passed through **{name} cannot be traced"
                concrete[f"**{name}"] = folded
            elif not isinstance(value, torch.Tensor):
                if not _plain_constant(value):
                    kind = type(value).__name__
                    return None, f"argument {name!r} ({kind}) would be baked into the graph as a constant"
                concrete[name] = value
        graph = _trace_unwrapped(module, concrete)
        traced = fx.GraphModule(module, graph, class_name=type(module).__name__)
        if folded:
            traced.register_forward_pre_hook(functools.partial(_drop_folded_kwargs, folded), with_kwargs=True)
        with torch.no_grad():
            output = traced(*record.args, **record.kwargs)
    except Exception as error:  # fx raises many kinds of errors on untraceable code
        first_line = (str(error).strip().splitlines() or [""])[0][:160]
        return None, f"{type(error).__name__}: {first_line}"
    if not _same_output(output, record.output):
        return None, "traced graph does not reproduce the module's output"
    return traced, ""


def _plain_constant(value: object) -> bool:
    """Values fx may fix to their recorded value: no tensor inside (rotary ``(cos, sin)`` tuples change with the
    positions) and no object with state (a KV cache)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain_constant(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _plain_constant(item) for key, item in value.items())
    return False


def functionalize_graph(traced: fx.GraphModule, prefix: str) -> list[CoverageNote]:
    """Replace quantizable functional nodes with `FunctionalOp` modules; give shared stateless modules
    one copy per call site (each call needs its own output encoding). Returns notes for float nodes."""
    notes: list[CoverageNote] = []
    seen_targets: set[str] = set()
    lift_aten_layers(traced)
    for node in list(traced.graph.nodes):
        if node.op == "call_module":
            module = traced.get_submodule(node.target)
            function = getattr(module, "computes_function", None)
            if function is not None and not node.kwargs:
                _replace_by_function(traced, node, module, function)
                continue
            if node.target in seen_targets and not any(True for _ in module.parameters()):
                node.target = add_submodule(traced, node.target.replace(".", "_"), copy.deepcopy(module))
            seen_targets.add(node.target)
        elif node.op in ("call_function", "call_method"):
            op_type = function_op_type(node.target)
            tensor_name = f"{prefix}{node.name}"
            if op_type is not None:
                name = add_submodule(traced, node.name, FunctionalOp(node.target, op_type))
                with traced.graph.inserting_before(node):
                    replacement = traced.graph.call_module(name, node.args, node.kwargs)
                node.replace_all_uses_with(replacement)
                traced.graph.erase_node(node)
            elif is_data_movement(node.target):
                notes.append(
                    CoverageNote(
                        tensor_name, function_name(node.target), "data movement: keeps its input's values and encoding",
                        by_design=True,
                    )
                )
            elif hasattr(node.target, "float_by_design"):  # a function that says why the hardware keeps it float
                notes.append(CoverageNote(tensor_name, function_name(node.target), node.target.float_by_design, True))
            else:
                notes.append(
                    CoverageNote(
                        tensor_name,
                        function_name(node.target),
                        "no quantization rule for this function: stays in float "
                        "(edgequant.sim.ops.FUNCTION_OP_TYPES lists the known ones)",
                    )
                )
    traced.graph.lint()
    traced.recompile()
    return notes


def _replace_by_function(traced: fx.GraphModule, node: fx.Node, module: nn.Module, function: object) -> None:
    """A module that declares ``computes_function`` (a converted ONNX ``Add``) becomes the `FunctionalOp` the sim
    makes of that call, so it is quantized and emulated as ``x + y`` is; the module's ONNX node goes along.

    ``packs_inputs`` passes the inputs as one sequence (``torch.cat``), ``function_keywords`` are added keywords."""
    if getattr(module, "packs_inputs", False):
        node.args = (tuple(node.args),)
    node.kwargs = dict(getattr(module, "function_keywords", {}))
    replacement = FunctionalOp(function, module_op_type(module) or function_op_type(function))
    if ONNX_NODE_ATTRIBUTE in module.__dict__:
        setattr(replacement, ONNX_NODE_ATTRIBUTE, module.__dict__[ONNX_NODE_ATTRIBUTE])
    traced.add_submodule(node.target, replacement)


def add_submodule(traced: fx.GraphModule, name: str, module: nn.Module) -> str:
    candidate, index = name, 1
    while hasattr(traced, candidate):
        candidate, index = f"{name}_{index}", index + 1
    traced.add_submodule(candidate, module)
    return candidate
