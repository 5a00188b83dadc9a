"""Which layers feed which: one dataflow view of a float model or a sim, for every technique that walks it
(BN folding, equalization, bias correction, mixed-precision groups), and of what a runtime fuses after an op
(the sim's supergroups, AdaRound's reconstruction target, the emulation's integer kernels).

The model is traced with torch.fx using the simulation's own notion of leaf layers (`capture.is_leaf`), so a
node here names the same modules a `QuantSim` wraps. Where a module cannot be traced, an ``nn.Sequential`` is
read in registration order (its children run one after the other by definition); any other untraceable module
is opaque: its children are analysed on their own and nothing is assumed about how their outputs are used.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from edgequant.quantization import Quantizer
from edgequant.sim.batches import split_model_input
from edgequant.sim.capture import is_leaf, record_calls, try_trace
from edgequant.sim.modes import quantizers_disabled, training_mode
from edgequant.sim.ops import function_name, is_pass_through, module_op_type
from edgequant.sim.quantized_module import FunctionalOp


@dataclass(eq=False)
class GraphNode:
    """One call in the dataflow graph: a leaf module call, a function/method call, a source or a sink."""

    name: str
    kind: str  # "module", "function", "source", "sink"
    module: nn.Module | None = None
    function: Any = None
    inputs: list[GraphNode] = field(default_factory=list)
    users: list[GraphNode] = field(default_factory=list)
    call: fx.Node | None = None  # the traced call (its non-tensor arguments), where the node comes from a trace

    @property
    def label(self) -> str:
        if self.kind == "function":
            return f"{function_name(self.function)}()"
        return self.name

    @property
    def op_name(self) -> str:
        """Function name for functional nodes (also when wrapped in a sim's `FunctionalOp`)."""
        if isinstance(self.module, FunctionalOp):
            return function_name(self.module.target).strip("_")
        return function_name(self.function).strip("_") if self.kind == "function" else ""


@dataclass
class LeafCall:
    """Shapes seen by a leaf module with the dummy input, and how often it ran."""

    input_shape: tuple[int, ...] = ()
    output_ndim: int = 0
    calls: int = 0

    @property
    def input_ndim(self) -> int:
        return len(self.input_shape)


class ModelGraph:
    """Nodes in execution order; ``node.inputs``/``node.users`` say who feeds whom."""

    def __init__(self, model: nn.Module, leaf_calls: dict[str, LeafCall]) -> None:
        self.model = model
        self.leaf_calls = leaf_calls
        self.nodes: list[GraphNode] = []
        self.sink = GraphNode("<outside>", "sink")
        self._by_call: dict[fx.Node, GraphNode] = {}

    def add(self, node: GraphNode) -> GraphNode:
        for producer in node.inputs:
            producer.users.append(node)
        self.nodes.append(node)
        if node.call is not None:
            self._by_call[node.call] = node
        return node

    def calls(self, name: str) -> int:
        return self.leaf_calls.get(name, LeafCall()).calls

    def module_nodes(self) -> list[GraphNode]:
        return [n for n in self.nodes if n.kind == "module"]

    def node_of(self, call: fx.Node) -> GraphNode:
        """The node built from ``call`` of the traced graph this view was made of."""
        return self._by_call[call]

    @classmethod
    def of_traced(cls, traced: fx.GraphModule, prefix: str = "") -> ModelGraph:
        """The view of one traced graph, without running it: for code that holds the graph, not an input
        (the sim while it places quantizers, the emulation planning on the sim's graphs)."""
        graph = cls(traced, {})
        for output in _add_traced(graph, traced, f"{prefix}." if prefix else "", None):
            output.users.append(graph.sink)
        return graph

    # -- fusion: which ops a runtime computes in the kernel of the op before them ------------------------
    def fused_after(self, node: GraphNode) -> list[GraphNode]:
        """The ops a runtime fuses into ``node``'s kernel: BatchNorms, then at most one ReLU/ReLU6/Clip, each
        the sole consumer of the one before (pass-through modules in between are skipped) and with no other
        tensor input. ``node`` and these write one output, so techniques reconstruct the tensor after them."""
        chain: list[GraphNode] = []
        current = node
        while (consumer := _sole_consumer(current)) is not None:
            if consumer.kind != "module" or len(consumer.inputs) != 1:
                break
            op_type = module_op_type(consumer.module)
            if op_type not in FUSED_NORMS and op_type not in FUSED_ACTIVATIONS:
                break
            chain.append(consumer)
            current = consumer
            if op_type in FUSED_ACTIVATIONS:
                break
        return chain

    def supergroup_members(self, patterns: Iterable[tuple[str, ...]]) -> dict[str, str]:
        """Ops whose output the hardware never writes, by name, with the supergroup (``"Conv+Relu"``) that
        fuses them into the op after them: each pattern of op types is matched along sole consumers, skipping
        pass-through modules; every member but the last is fused."""
        members: dict[str, str] = {}
        for node in self.module_nodes():
            for pattern in patterns:
                chain = [node]
                while len(chain) < len(pattern) and _op_type(chain[-1]) == pattern[len(chain) - 1]:
                    consumer = _sole_consumer(chain[-1])
                    if consumer is None:
                        break
                    chain.append(consumer)
                if len(chain) == len(pattern) and [_op_type(n) for n in chain] == list(pattern):
                    for member in chain[:-1]:
                        members[member.name] = "+".join(pattern)
        return members


FUSED_NORMS = {"BatchNormalization"}
"""Ops a runtime folds into the Conv/Gemm before them (where BN folding has not already removed them)."""
FUSED_ACTIVATIONS = {"Relu", "Clip"}
"""Activations a runtime applies in the kernel of the op before them."""


def _op_type(node: GraphNode) -> str | None:
    return module_op_type(node.module) if node.kind == "module" else None


def _sole_consumer(node: GraphNode) -> GraphNode | None:
    """The one op that reads ``node``'s output, through pass-through modules (Dropout, Identity); None where
    several do, or the model returns it."""
    users = list(dict.fromkeys(node.users))
    while len(users) == 1 and users[0].kind == "module" and is_pass_through(users[0].module):
        users = list(dict.fromkeys(users[0].users))
    return users[0] if len(users) == 1 else None


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((t for t in map(_first_tensor, value) if t is not None), None)
    return None


def _record_calls_and_leaves(model: nn.Module, args: tuple, kwargs: dict) -> tuple[dict, dict[str, LeafCall]]:
    """`record_calls` plus, in the same forward, each leaf's call count and tensor ranks."""
    found: dict[str, LeafCall] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: Any) -> None:
            call = found.setdefault(name, LeafCall())
            if call.calls == 0:
                first_in, first_out = _first_tensor(inputs), _first_tensor(output)
                call.input_shape = tuple(first_in.shape) if first_in is not None else ()
                call.output_ndim = first_out.dim() if first_out is not None else 0
            call.calls += 1

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and is_leaf(m)]
    try:
        records = record_calls(model, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return records, found


def build_graph(model: nn.Module, dummy_input: Any) -> ModelGraph:
    """Dataflow graph of ``model``'s leaf calls on ``dummy_input`` (quantizers, if any, are bypassed)."""
    args, kwargs = split_model_input(dummy_input)
    with training_mode(model, False), quantizers_disabled(model):
        try:
            records, leaf_calls = _record_calls_and_leaves(model, args, kwargs)
        except Exception as error:  # any error of the user's forward: the input does not fit the model
            raise ValueError(
                f"the model does not run on dummy_input ({type(error).__name__}: {str(error).splitlines()[0]}); "
                "pass an input with the shape, dtype and device the model expects"
            ) from None
        graph = ModelGraph(model, leaf_calls)
        outputs = _add_module(graph, model, "", records, None)
    for output in outputs:
        output.users.append(graph.sink)
    return graph


def _add_module(
    graph: ModelGraph, module: nn.Module, prefix: str, records: dict, inputs: list[GraphNode] | None
) -> list[GraphNode]:
    name = prefix.rstrip(".")
    if name and is_leaf(module):
        if graph.calls(name) == 0:
            return []
        return [graph.add(GraphNode(name, "module", module, inputs=list(inputs or [])))]
    record = records.get(name)
    if record is None:
        return []
    traced, _ = try_trace(module, record)
    if traced is not None:
        return _add_traced(graph, traced, prefix, inputs)
    if isinstance(module, nn.Sequential):
        current = inputs
        for child_name, child in module.named_children():
            current = _add_module(graph, child, f"{prefix}{child_name}.", records, current) or current
        return list(current or [])
    for child_name, child in module.named_children():  # opaque: children analysed separately
        for output in _add_module(graph, child, f"{prefix}{child_name}.", records, [GraphNode(name, "source")]):
            output.users.append(graph.sink)
    return [graph.add(GraphNode(name or "<model>", "source"))]


def _producers(node: fx.Node, env: dict[fx.Node, GraphNode]) -> list[GraphNode]:
    found: list[GraphNode] = []
    fx.node.map_arg((node.args, node.kwargs), lambda arg: found.append(env[arg]) if arg in env else None)
    return found


def _add_traced(
    graph: ModelGraph, traced: fx.GraphModule, prefix: str, inputs: list[GraphNode] | None
) -> list[GraphNode]:
    env: dict[fx.Node, GraphNode] = {}
    outputs: list[GraphNode] = []
    num_placeholders = 0
    for node in traced.graph.nodes:
        producers = _producers(node, env)
        if node.op == "placeholder":
            given = inputs[0] if inputs and num_placeholders == 0 else None
            env[node] = given or graph.add(GraphNode(f"{prefix}{node.name}", "source"))
            num_placeholders += 1
        elif node.op == "get_attr":
            env[node] = graph.add(GraphNode(f"{prefix}{node.target}", "source"))
        elif node.op == "call_module" and isinstance(traced.get_submodule(node.target), Quantizer) and producers:
            env[node] = producers[0]  # a model-input quantizer in the graph: the same tensor, on its grid
        elif node.op == "call_module":
            module = traced.get_submodule(node.target)
            env[node] = graph.add(GraphNode(f"{prefix}{node.target}", "module", module, inputs=producers, call=node))
        elif node.op in ("call_function", "call_method"):
            env[node] = graph.add(
                GraphNode(f"{prefix}{node.name}", "function", function=node.target, inputs=producers, call=node)
            )
        elif node.op == "output":
            outputs = producers
    return outputs
