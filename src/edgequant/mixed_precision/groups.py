"""Quantizer groups: the tensors that must share a bit width, found from the sim's dataflow graph.

A group is what the search changes as one unit:

* a layer's parameters and its output (one kernel computes at one precision);
* every layer of a supergroup (the config fuses e.g. Conv+BN+ReLU: the members have no output quantizer of
  their own, and their weights run in the fused kernel whose output the last member quantizes);
* a layer's input quantizers, with the layer;
* the inputs of a concatenation, with its output (the hardware writes them into one buffer with one encoding).

Quantizers whose bit width the config fixes per op (``supported_kernels``), frozen quantizers (AdaRound,
loaded encodings) and disabled ones are never changed, so every configuration the search makes is one the
config allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from edgequant.quantization import CalibrationError, Quantizer
from edgequant.sim import QuantSim
from edgequant.sim.graph import GraphNode, ModelGraph

CONCAT_OPS = frozenset({"cat", "concat", "concatenate", "stack"})

Candidate = tuple[int, int]
"""``(param_bw, output_bw)``: the weight bit width and the activation bit width of a group."""


@dataclass
class QuantizerGroup:
    """Quantizers that change bit width together; ``params``/``activations`` are the ones the search may set."""

    name: str
    layers: list[str]
    params: list[Quantizer] = field(default_factory=list)
    activations: list[Quantizer] = field(default_factory=list)

    def bitwidths(self, candidate: Candidate) -> dict[str, int]:
        """Bit width per quantizer name under ``candidate``."""
        param_bw, output_bw = candidate
        return {q.name: param_bw for q in self.params} | {q.name: output_bw for q in self.activations}

    def effective(self, candidate: Candidate) -> Candidate:
        """The part of ``candidate`` this group uses (a group without weights ignores ``param_bw``)."""
        return (candidate[0] if self.params else 0, candidate[1] if self.activations else 0)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        self.parent.setdefault(item, item)
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _module_quantizers(module: nn.Module | None, attribute: str) -> list[Quantizer]:
    quantizers = getattr(module, attribute, None) if module is not None else None
    return [q for q in (quantizers or {}).values() if isinstance(q, Quantizer)]


def model_input_sources(sim: QuantSim, graph: ModelGraph) -> dict[int, Quantizer]:
    """Model-input quantizer of each source node that is one of the root's inputs (by id of the node)."""
    by_key = {q.key: q for q in sim.quantizers(role="model_input").values()}
    leading = []
    for node in graph.nodes:  # the root's placeholders come first, in argument order
        if node.kind != "source":
            break
        leading.append(node)
    found = {}
    for index, node in enumerate(leading):
        quantizer = by_key.get(node.name) or by_key.get(str(index))
        if quantizer is not None:
            found[id(node)] = quantizer
    return found


def _own_quantizers(module: nn.Module | None) -> list[Quantizer]:
    return [q for attr in ("param_quantizers", "input_quantizers", "output_quantizers")
            for q in _module_quantizers(module, attr)]


def upstream_quantizer(node: GraphNode, sources: dict[int, Quantizer]) -> Quantizer | None:
    """The quantizer that sets the encoding of ``node``'s output as a consumer sees it: its own output
    quantizer, or (through data-movement and fused ops) the one upstream; None where the tensor stays float.
    ``sources`` is `model_input_sources`."""
    seen = set()
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if node.kind == "source":
            quantizer = sources.get(id(node))
            return quantizer if quantizer is not None and quantizer.enabled else None
        outputs = _module_quantizers(node.module, "output_quantizers")
        if outputs:
            return outputs[0] if outputs[0].enabled else None
        node = node.inputs[0] if node.inputs else None
    return None


def _fused_consumer_quantizers(node: GraphNode) -> list[Quantizer]:
    """Quantizers of the op that a layer without output quantizer is fused into: its only consumer, reached
    through quantizer-less single-consumer nodes (Identity/Dropout left by BN folding, reshapes)."""
    seen = set()
    while len(node.users) == 1 and node.users[0].kind in ("module", "function") and id(node) not in seen:
        seen.add(id(node))
        node = node.users[0]
        found = _own_quantizers(node.module)
        if found:
            return found
    return []


def _fixed_by_config(sim: QuantSim, quantizer: Quantizer) -> bool:
    if quantizer.role == "model_input":
        return sim.config.output_rule("__model_input__").bitwidth is not None
    op_type = getattr(sim.layer_of(quantizer), "onnx_op_type", None)
    if op_type is None:
        return False
    if quantizer.role == "param":
        return sim.config.param_rule(op_type, quantizer.key).bitwidth is not None
    rule = sim.config.output_rule(op_type) if quantizer.role == "output" else sim.config.input_rule(op_type)
    return rule.bitwidth is not None


def find_groups(sim: QuantSim, graph: ModelGraph | None = None) -> list[QuantizerGroup]:
    """The sim's quantizer groups in execution order (see the module docstring)."""
    graph = graph or sim.graph()
    sources = model_input_sources(sim, graph)
    quantizers = {name: q for name, q in sim.quantizers().items() if q.enabled}
    union = _UnionFind()
    for name in quantizers:
        union.find(name)
    for layer in sim.quantized_modules().values():  # also layers the graph cannot see (untraceable parents)
        own = [q.name for q in _own_quantizers(layer) if q.name in quantizers]
        for name in own[1:]:
            union.union(name, own[0])
    for node in graph.module_nodes():
        own = [q.name for q in _own_quantizers(node.module) if q.name in quantizers]
        if own and not _module_quantizers(node.module, "output_quantizers"):  # fused into the op that consumes it
            consumer = _fused_consumer_quantizers(node)
            consumer = [q.name for q in consumer if q.name in quantizers]
            if consumer:
                union.union(own[0], consumer[0])
        if node.op_name in CONCAT_OPS:
            joined = [upstream_quantizer(p, sources) for p in node.inputs] + [upstream_quantizer(node, sources)]
            joined = [q.name for q in joined if q is not None and q.name in quantizers]
            for name in joined[1:]:
                union.union(name, joined[0])
    members: dict[str, list[Quantizer]] = {}
    for name, quantizer in quantizers.items():
        members.setdefault(union.find(name), []).append(quantizer)
    order = {node.name: index for index, node in enumerate(graph.nodes)}
    groups = []
    for group_quantizers in members.values():
        free = [q for q in group_quantizers if not q.frozen and not _fixed_by_config(sim, q)]
        if not free:
            continue
        layers = sorted({q.owner or "<model input>" for q in group_quantizers}, key=lambda n: order.get(n, -1))
        groups.append(QuantizerGroup(
            "+".join(layers), layers,
            params=[q for q in free if q.role == "param"],
            activations=[q for q in free if q.role != "param"],
        ))
    groups.sort(key=lambda g: min(order.get(n, -1) for n in g.layers))
    return groups


def current_bitwidths(sim: QuantSim) -> dict[str, int]:
    """Bit width of every enabled quantizer, by name."""
    return {name: q.bitwidth for name, q in sim.quantizers().items() if q.enabled}


def apply_bitwidths(sim: QuantSim, bitwidths: dict[str, int], data_batches: list | None = None) -> list[str]:
    """Set the quantizers' bit widths and re-encode those that changed; returns their names.

    Weights are re-encoded from the weights. Activation encodings are recomputed from the statistics the
    analyzer kept from calibration (calibration runs the float model, so they do not depend on other
    quantizers' bit widths); a quantizer without statistics (a loaded sim) is re-calibrated on
    ``data_batches`` alone, the others disabled and frozen meanwhile."""
    changed = [q for name, q in sim.quantizers().items() if name in bitwidths and q.bitwidth != bitwidths[name]]
    for quantizer in changed:  # a float format has no bitwidth to choose
        quantizer.require_integer_grid("mixed precision")
    previous = {q.name: q.bitwidth for q in changed}
    missing_stats = []
    for quantizer in changed:
        quantizer.bitwidth = bitwidths[quantizer.name]
        if quantizer.role == "param":
            quantizer.encode_from(getattr(sim.layer_of(quantizer), quantizer.key))
            continue
        try:
            quantizer.compute_encoding()
        except CalibrationError:
            missing_stats.append(quantizer)
    if missing_stats:
        if not data_batches:
            for quantizer in missing_stats:  # their encodings are untouched: keep them consistent
                quantizer.bitwidth = previous[quantizer.name]
            raise CalibrationError(
                f"{len(missing_stats)} quantizers have no calibration statistics (e.g. a loaded sim); pass "
                "calibration data so they can be re-calibrated at their new bit width"
            )
        _recalibrate(sim, missing_stats, data_batches)
    return [q.name for q in changed]


def _recalibrate(sim: QuantSim, quantizers: list[Quantizer], data_batches: list) -> None:
    others = [q for q in sim.quantizers().values() if q not in quantizers and not q.frozen]
    for quantizer in others:
        quantizer.frozen = True
    try:
        with sim.quantizers_enabled(False, others), sim.calibrating():
            for args, kwargs in data_batches:
                sim.model(*args, **kwargs)
    finally:
        for quantizer in others:
            quantizer.frozen = False
