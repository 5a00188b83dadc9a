"""Which layers feed which: one dataflow view of a float model or a sim, for every technique that walks it
(BN folding, equalization, bias correction, mixed-precision groups).

The model is traced with torch.fx using the simulation's own notion of leaf layers (`capture.is_leaf`), so a
node here names the same modules a `QuantSim` wraps. Where a module cannot be traced, an ``nn.Sequential`` is
read in registration order (its children run one after the other by definition); any other untraceable module
is opaque: its children are analysed on their own and nothing is assumed about how their outputs are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from edgequant.quantization import Quantizer
from edgequant.sim.batches import split_model_input
from edgequant.sim.capture import is_leaf, record_calls, try_trace
from edgequant.sim.modes import quantizers_disabled, training_mode
from edgequant.sim.ops import function_name
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

    def add(self, node: GraphNode) -> GraphNode:
        for producer in node.inputs:
            producer.users.append(node)
        self.nodes.append(node)
        return node

    def calls(self, name: str) -> int:
        return self.leaf_calls.get(name, LeafCall()).calls

    def module_nodes(self) -> list[GraphNode]:
        return [n for n in self.nodes if n.kind == "module"]


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
            env[node] = graph.add(
                GraphNode(f"{prefix}{node.target}", "module", traced.get_submodule(node.target), inputs=producers)
            )
        elif node.op in ("call_function", "call_method"):
            env[node] = graph.add(GraphNode(f"{prefix}{node.name}", "function", function=node.target, inputs=producers))
        elif node.op == "output":
            outputs = producers
    return outputs
