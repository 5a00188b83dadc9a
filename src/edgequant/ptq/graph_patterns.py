"""Patterns the PTQ techniques search for in the sim's dataflow view (`edgequant.sim.graph`): layer/BN pairs
to fold and layer -> activation -> layer chains to equalize, plus the graph surgery that untying calls needs."""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from edgequant.ptq.channel_clamp import ChannelClamp
from edgequant.ptq.layer_channels import (
    input_channel_dim,
    is_weight_layer,
    output_channel_dim,
    responds_to_constants_exactly,
)
from edgequant.sim.batches import split_model_input
from edgequant.sim.capture import LeafTracer, add_submodule, record_calls
from edgequant.sim.graph import GraphNode, ModelGraph
from edgequant.sim.modes import quantizers_disabled
from edgequant.sim.ops import is_pass_through
from edgequant.sim.quantized_module import FunctionalOp

BATCH_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
POOL_TYPES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
HOMOGENEOUS_MODULES = (nn.ReLU, nn.PReLU, nn.LeakyReLU, *POOL_TYPES)
"""Per-channel, positively homogeneous: ``f(x / s) = f(x) / s`` for every ``s > 0``."""
HOMOGENEOUS_FUNCTIONS = {"relu", "relu_", "leaky_relu", "dropout", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d"}
CLAMP_FUNCTIONS = {"relu6", "hardtanh", "clamp", "clip", "clamp_"}
RESHAPING = (nn.Flatten, nn.Unflatten)


# -- patterns ----------------------------------------------------------------------------------------------
@dataclass
class BatchNormFold:
    """A BatchNorm that can be folded into ``layer``: into the layer before it (``"preceding"``) or, when
    that is impossible, into the layer after it (``"following"``)."""

    layer: str
    bn: str
    direction: str


def _only_user(node: GraphNode) -> GraphNode | None:
    return node.users[0] if len(node.users) == 1 else None


def _folds_into_following(layer: nn.Module, bn_input_shape: tuple[int, ...]) -> bool:
    """Folding ``x -> bn -> layer`` into the layer is exact only if the BN's channels are the layer's input
    channels and the BN's per-channel shift reaches every output position in full (no padding)."""
    if isinstance(layer, nn.Linear) and len(bn_input_shape) != 2:
        return False
    return responds_to_constants_exactly(layer, bn_input_shape)


def find_batch_norm_folds(graph: ModelGraph, allow_following: bool = True) -> list[BatchNormFold]:
    """Every BatchNorm with running statistics that a single-use Conv/ConvTranspose/Linear can absorb."""
    folds = []
    for node in graph.module_nodes():
        if not isinstance(node.module, BATCH_NORM_TYPES) or graph.calls(node.name) != 1:
            continue
        if node.module.running_mean is None:
            continue  # no running statistics: normalises with batch statistics even at inference
        bn_call = graph.leaf_calls[node.name]
        producer = node.inputs[0] if len(node.inputs) == 1 else None
        if (
            producer is not None
            and producer.kind == "module"
            and is_weight_layer(producer.module)
            and producer.users == [node]
            and graph.calls(producer.name) == 1
            and (not isinstance(producer.module, nn.Linear) or bn_call.input_ndim == 2)
        ):
            folds.append(BatchNormFold(producer.name, node.name, "preceding"))
            continue
        consumer = _only_user(node)
        if (
            allow_following
            and consumer is not None
            and consumer.kind == "module"
            and is_weight_layer(consumer.module)
            and consumer.inputs == [node]
            and graph.calls(consumer.name) == 1
            and _folds_into_following(consumer.module, bn_call.input_shape)
        ):
            folds.append(BatchNormFold(consumer.name, node.name, "following"))
    return folds


@dataclass
class EqualizationCandidate:
    """``first -> path -> second``: a layer pair whose shared channels cross-layer scaling may rescale.

    ``blocker`` says why it cannot (None when it can); ``clamps`` are the ReLU6/Hardtanh/`ChannelClamp`
    modules on the path whose bounds must be rescaled with the channels.
    """

    first: str
    second: str
    path: list[GraphNode]
    blocker: str | None = None
    clamps: list[str] = field(default_factory=list)

    @property
    def activation(self) -> str:
        names = [type(n.module).__name__ if n.kind == "module" else n.label for n in self.path]
        names = [n for n in names if n not in ("Identity", "Dropout")]
        return "+".join(names) or "none"


def _path_step(node: GraphNode) -> tuple[str, str]:
    """How a node between two layers affects scaling: ("ok" | "clamp" | "blocked" | "end", reason)."""
    module = node.module
    if node.kind == "function" or isinstance(module, FunctionalOp):
        op = node.op_name
        if op in HOMOGENEOUS_FUNCTIONS:
            return "ok", ""
        if op in CLAMP_FUNCTIONS:
            return "blocked", (
                f"the functional {op}() in forward code cannot get per-channel bounds; use an nn.ReLU6/nn.Hardtanh "
                "module instead"
            )
        return "end", ""
    if node.kind != "module":
        return "end", ""
    if isinstance(module, RESHAPING):
        return "end", ""
    if is_pass_through(module) or isinstance(module, HOMOGENEOUS_MODULES):
        return "ok", ""
    if isinstance(module, (nn.Hardtanh, ChannelClamp)):
        return "clamp", ""
    if isinstance(module, BATCH_NORM_TYPES):
        return "blocked", f"BatchNorm {node.name} between the layers could not be folded"
    if is_weight_layer(module):
        return "end", ""
    return "blocked", f"{type(module).__name__} ({node.name}) is not positively homogeneous: scaling would change it"


def find_equalization_candidates(graph: ModelGraph) -> list[EqualizationCandidate]:
    """Layer pairs connected through single-use, channel-preserving ops, in graph order.

    Pairs whose path branches (e.g. into a residual add) are returned with a blocker so that the report
    can say why they were left alone.
    """
    candidates = []
    for start in graph.module_nodes():
        if not is_weight_layer(start.module):
            continue
        path: list[GraphNode] = []
        blocker: str | None = None
        node = start
        while True:
            if len(node.users) != 1:
                if len(node.users) > 1:
                    consumers = ", ".join(sorted({u.label for u in node.users}))
                    candidates.append(EqualizationCandidate(
                        start.name, "", path,
                        f"output of {node.label} feeds {len(node.users)} ops ({consumers}); scaling would change them",
                    ))
                break
            node = node.users[0]
            if node.kind == "module" and is_weight_layer(node.module):
                candidate = EqualizationCandidate(start.name, node.name, path, blocker)
                _check_pair(graph, candidate, start, node)
                candidates.append(candidate)
                break
            step, reason = _path_step(node)
            if step == "end":
                break
            if step == "blocked" and blocker is None:
                blocker = reason
            path.append(node)
    return candidates


def _check_pair(graph: ModelGraph, candidate: EqualizationCandidate, first: GraphNode, second: GraphNode) -> None:
    clamp_types = (nn.Hardtanh, ChannelClamp)
    candidate.clamps = [n.name for n in candidate.path if n.kind == "module" and isinstance(n.module, clamp_types)]
    if candidate.blocker is not None:
        return
    for node in (first, second):
        if graph.calls(node.name) != 1:
            candidate.blocker = f"{node.name} is called {graph.calls(node.name)} times (shared weights)"
            return
    if len(second.inputs) != 1:
        candidate.blocker = f"{second.name} takes {len(second.inputs)} inputs"
        return
    out_ndim = graph.leaf_calls[first.name].output_ndim
    first_dim = output_channel_dim(first.module, out_ndim)
    second_dim = input_channel_dim(second.module, out_ndim)
    if first_dim != second_dim:
        candidate.blocker = f"channel axes differ ({first.name}: dim {first_dim}, {second.name}: dim {second_dim})"


# -- surgery -----------------------------------------------------------------------------------------------
def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attribute, module)


def move_into_slots(model: nn.Module, graph: ModelGraph, module_name: str) -> list[str] | None:
    """Untie a stateless module called from several places by moving a copy of it into the single-use
    ``nn.Identity`` right before each call (where a folded BatchNorm was) and making it an Identity.

    Keeps the model's classes and forward code. Returns the slot names, or None when some call has no
    such slot.
    """
    sites = [n for n in graph.module_nodes() if n.name == module_name]
    slots = [site.inputs[0] if len(site.inputs) == 1 else None for site in sites]
    if not all(
        slot is not None and slot.kind == "module" and isinstance(slot.module, nn.Identity)
        and len(slot.users) == 1 and graph.calls(slot.name) == 1
        for slot in slots
    ):
        return None
    module = model.get_submodule(module_name)
    for slot in slots:
        set_submodule(model, slot.name, copy.deepcopy(module))
    set_submodule(model, module_name, nn.Identity())
    return [slot.name for slot in slots]


def untie_calls(model: nn.Module, module_name: str, dummy_input: Any) -> str | None:
    """Give each call of a stateless module that is called several times its own copy.

    The module's caller is replaced by its fx-traced graph (same submodule names, so parameters and
    state dicts are unchanged), in which the second and later call sites use copies named ``<name>_1``...
    Non-tensor arguments are fixed to the values seen with ``dummy_input`` (still accepted, then ignored),
    and the graph follows the eval-mode path of any ``self.training`` branch. Returns the name of the
    replaced caller, or None when the calls come from the root's own forward (which cannot be replaced in
    place) or from code fx cannot trace.
    """
    args, kwargs = split_model_input(dummy_input)
    target = model.get_submodule(module_name)
    with quantizers_disabled(model):
        records = record_calls(model, args, kwargs)
    parts = module_name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        caller_name = ".".join(parts[:depth])
        record = records.get(caller_name)
        traced = _trace_with_fixed_arguments(model.get_submodule(caller_name), record) if record else None
        if traced is None:
            continue
        local = ".".join(parts[depth:])
        sites = [n for n in traced.graph.nodes if n.op == "call_module" and n.target == local]
        if len(sites) < 2:
            continue
        for site in sites[1:]:
            site.target = add_submodule(traced, local.replace(".", "_"), copy.deepcopy(target))
        traced.recompile()
        set_submodule(model, caller_name, traced)
        return caller_name
    return None


def _trace_with_fixed_arguments(caller: nn.Module, record: Any) -> fx.GraphModule | None:
    """Trace ``caller`` with its non-tensor arguments fixed to the recorded values, keeping them in the
    signature (defaulting to those values) so that its own caller can still pass them; None if the graph
    does not reproduce the recorded output."""
    signature = inspect.signature(caller.forward)
    try:
        bound = signature.bind(*record.args, **record.kwargs)
    except TypeError:
        return None
    fixed: dict[str, Any] = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            if bound.arguments.get(name):
                return None
            continue
        value = bound.arguments.get(name, parameter.default)
        if isinstance(value, torch.Tensor):
            if fixed:
                return None  # a tensor argument after a fixed one: the signature order cannot be kept
            continue
        fixed[name] = value
    try:
        traced = fx.GraphModule(caller, LeafTracer().trace(caller, concrete_args=fixed), type(caller).__name__)
        placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
        for name, value in fixed.items():
            with traced.graph.inserting_after(placeholders[-1]):
                placeholders.append(traced.graph.placeholder(name, default_value=value))
        traced.recompile()
        with torch.no_grad():
            output = traced(*record.args, **record.kwargs)
    except Exception:  # fx raises many kinds of errors on untraceable code
        return None
    expected = record.output
    if not (isinstance(output, torch.Tensor) and isinstance(expected, torch.Tensor) and torch.equal(output, expected)):
        return None
    return traced
