"""The sim's forward split at layers: the tensors live just before a layer, and the rest of the graph from there.

A technique that changes the quantization of one layer and re-measures the model output need not rerun what
lies upstream of that layer when those values do not change (the analyzer's per-layer sweeps: with only one
layer quantized, everything before it is FP32; with all but one, everything before it is the fully quantized
sim). Splitting the traced root graph before the first call of each chosen layer gives segments that run one
after the other exactly as the whole forward does (the same ops, in the same order, on the same values); the
values passed from one segment to the next are every tensor defined before the cut and used after it, so skip
connections are carried across. Where the root is not one traced graph (an untraced model, a forward hook on
the root) there is no well-defined cut and `split_at_layers` returns None; a layer that is not called by the
root graph itself gets no cut.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map


@dataclass
class Cut:
    """The values live just before the first call of ``layer`` in one forward; ``index`` is its segment."""

    layer: str
    index: int
    values: tuple


class SegmentedForward:
    """``model``'s root graph split before the first call of each of ``layers`` that it calls (see the module
    docstring). ``layers`` lists those, in the order the forward reaches them."""

    def __init__(self, model: fx.GraphModule, layers: list[str]) -> None:
        nodes = list(model.graph.nodes)
        wanted, first_call = set(layers), {}
        for position, node in enumerate(nodes):
            if node.op == "call_module" and node.target in wanted and node.target not in first_call:
                first_call[node.target] = position
        self.layers = sorted(first_call, key=first_call.get)
        bounds = [0, *(first_call[name] for name in self.layers), len(nodes)]
        live = [_live_at(nodes, position) for position in bounds[1:-1]]
        inputs, outputs = [[], *live], [*live, None]
        self.segments = [
            _segment(model, nodes[start:end], needed, produced)
            for start, end, needed, produced in zip(bounds[:-1], bounds[1:], inputs, outputs, strict=True)
        ]

    def cuts(self, args: tuple, kwargs: dict) -> Iterator[Cut]:
        """Run the forward on ``(args, kwargs)`` segment by segment, yielding the cut before each layer; each
        segment runs when the next cut is asked for, with the quantizer settings of that moment."""
        if not self.layers:
            return
        values = self.segments[0](*args, **kwargs)
        for index, layer in enumerate(self.layers, start=1):
            yield Cut(layer, index, values)
            if index < len(self.layers):
                values = self.segments[index](*values)

    def run_from(self, cut: Cut) -> Any:
        """The model output computed from ``cut`` on (on copies of its tensors: in-place ops downstream leave
        the cut intact for the forward it came from)."""
        values = tree_map(lambda value: value.clone() if isinstance(value, torch.Tensor) else value, cut.values)
        for segment in self.segments[cut.index:]:
            values = segment(*values)
        return values


def split_at_layers(model: nn.Module, layers: list[str]) -> SegmentedForward | None:
    """``model`` split before the first call of each of ``layers``, or None where the root is not one graph."""
    if not isinstance(model, fx.GraphModule) or model._forward_hooks or model._forward_pre_hooks:
        return None
    if type(model.graph._codegen) is not fx.graph.CodeGen:  # inputs flattened from a pytree: another signature
        return None
    return SegmentedForward(model, layers)


def _live_at(nodes: list[fx.Node], position: int) -> list[fx.Node]:
    """Nodes defined before ``position`` and used at or after it (attributes are re-read where they are used)."""
    later = set(nodes[position:])
    return [node for node in nodes[:position] if node.op != "get_attr" and any(user in later for user in node.users)]


def _segment(model: fx.GraphModule, nodes: list[fx.Node], inputs: list[fx.Node],
             outputs: list[fx.Node] | None) -> fx.GraphModule:
    """A graph module running ``nodes`` on ``inputs`` (the first segment: on the model's own placeholders),
    returning ``outputs`` as a tuple (None: the last segment, returning the model's output)."""
    graph = fx.Graph()
    env = {node: graph.placeholder(f"live_{index}") for index, node in enumerate(inputs)}

    def value(node: fx.Node) -> fx.Node:
        if node not in env:  # an attribute defined upstream: read it again here
            env[node] = graph.node_copy(node, value)
        return env[node]

    for node in nodes:
        env[node] = graph.node_copy(node, value)
    if outputs is not None:
        graph.output(tuple(value(node) for node in outputs))
    return fx.GraphModule(model, graph)
