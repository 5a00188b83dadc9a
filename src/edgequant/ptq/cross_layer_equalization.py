"""Cross-layer equalization with high-bias absorption (Nagel et al., 2019, "Data-Free Quantization Through
Weight Equalization and Bias Correction").

For ``y = W2 act(W1 x + b1)`` with a positively homogeneous ``act`` (ReLU, PReLU, LeakyReLU, pooling),
dividing output channel ``i`` of layer 1 by ``s_i`` and multiplying input channel ``i`` of layer 2 by ``s_i``
leaves ``y`` unchanged. ``s_i = sqrt(r1_i * r2_i) / r2_i`` makes both per-channel weight ranges equal to
``sqrt(r1_i * r2_i)``, which is what per-tensor weight quantization needs (depthwise convs after BN
folding have channel ranges orders of magnitude apart). Chains (Conv -> depthwise -> Conv) are rescaled
pair by pair, repeatedly, until the scales stop changing.

ReLU6 / Hardtanh are not homogeneous, but ``relu6(x) / s = clamp(x / s, 0, 6 / s)``: such activations are
replaced by a `ChannelClamp` whose bounds are scaled with the channels, so those pairs are equalized
exactly too. A clamp module shared by several calls (one ``self.act`` used twice in a block) is first
untied, by replacing its caller with the traced graph of that caller (see `untie_calls`).

High-bias absorption: equalization can give channels large biases (a channel that sits saturated at 6
becomes a constant 6 / s); where layer 1 was followed by a BN with learned ``beta``, ``gamma``, its
pre-activation output is ~N(beta, gamma^2) and almost always above ``c = max(0, beta - 3 gamma)``.
Subtracting ``c`` from ``b1`` and adding ``W2 c`` to ``b2`` moves that offset out of the activation to
quantize. Through a ReLU this is the paper's approximation (exact where the input exceeds ``c``); through
a clamp both bounds move by ``c``, which is exact for every input. It is only done where layer 2 turns a
constant input into a constant output (no zero padding), since a padded border would see ``c`` as a
spatially varying error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgequant.ptq.batch_norm_fold import FoldedBatchNorm, fold_batch_norm_records
from edgequant.ptq.channel_clamp import ChannelClamp
from edgequant.ptq.graph_patterns import (
    EqualizationCandidate,
    find_equalization_candidates,
    move_into_slots,
    set_submodule,
    untie_calls,
)
from edgequant.ptq.layer_channels import (
    add_to_bias,
    num_output_channels,
    output_channel_dim,
    range_matrix,
    responds_to_constants_exactly,
    scale_input_channels,
    scale_output_channels,
    weights_times_input,
)
from edgequant.sim.graph import GraphNode, ModelGraph, build_graph


@dataclass
class PairOutcome:
    """One layer pair considered for equalization."""

    first: str
    second: str
    activation: str
    equalized: bool
    reason: str = ""
    absorbed_bias: float = 0.0  # mean of c over channels (0: no absorption)


@dataclass
class EqualizationReport:
    folded: list[FoldedBatchNorm] = field(default_factory=list)
    pairs: list[PairOutcome] = field(default_factory=list)
    replaced_activations: dict[str, str] = field(default_factory=dict)
    untied: list[str] = field(default_factory=list)
    """Shared activation modules given one copy per call, and how."""
    iterations: int = 0
    layer_output_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Expected mean and std of each BN-folded layer's output, after scaling and absorption (what the
    analytical mode of `correct_bias` needs once the BNs are gone)."""

    @property
    def equalized(self) -> list[PairOutcome]:
        return [p for p in self.pairs if p.equalized]

    @property
    def not_equalized(self) -> list[PairOutcome]:
        return [p for p in self.pairs if not p.equalized]

    def summary(self) -> str:
        lines = [
            f"folded {len(self.folded)} BatchNorms; equalized {len(self.equalized)} of {len(self.pairs)} layer pairs "
            f"in {self.iterations} iterations",
        ]
        lines += [f"  replaced {name}: {what}" for name, what in self.replaced_activations.items()]
        lines += [f"  untied shared activation {what}" for what in self.untied]
        for pair in self.pairs:
            target = f"{pair.first} -> {pair.second or '?'}"
            if pair.equalized:
                extra = f", absorbed mean bias {pair.absorbed_bias:.3g}" if pair.absorbed_bias else ""
                lines.append(f"  equalized  {target} (via {pair.activation}{extra})")
            else:
                lines.append(f"  skipped    {target}: {pair.reason}")
        return "\n".join(lines)


def equalize(
    model: nn.Module,
    dummy_input: Any,
    *,
    absorb_high_bias: bool = True,
    activation_aware: bool = True,
    max_iterations: int = 100,
    tolerance: float = 1e-5,
) -> EqualizationReport:
    """Fold BNs, equalize every eligible layer pair and absorb high biases, in place on the float model.

    ``activation_aware`` (a deviation from the paper, which balances weights only): where the BN statistics
    predict the activation between a pair, a channel's layer-1 range is the larger of its normalised weight
    and activation ranges, so scaling never inflates one activation channel far beyond the others (a
    saturated ReLU6 channel with tiny weights would otherwise become a constant ``6 / s`` hundreds of times
    larger than the rest and ruin per-tensor activation quantization). ``False`` gives the paper's scales.

    ``model``'s function is unchanged up to float rounding (high-bias absorption through a plain ReLU: up to
    inputs below the 3-sigma bound). Returns a report of what was done, and which pairs were left alone and why.
    """
    report = EqualizationReport()
    with torch.no_grad():
        graph = build_graph(model, dummy_input)
        report.folded = fold_batch_norm_records(model, dummy_input, graph)
        stats = {f.layer: (f.beta.clone(), f.gamma.clone()) for f in report.folded if f.direction == "preceding"}
        graph, candidates = _untie_shared_clamps(model, dummy_input, graph, report)
        pairs = [c for c in candidates if c.blocker is None]
        for candidate in pairs:
            _replace_clamps(model, graph, candidate, report)
        activations = {}
        if activation_aware:
            activations = {p.first: r for p in pairs if (r := _activation_ranges(model, p, stats)) is not None}
        scales = _scale_until_converged(model, pairs, report, max_iterations, tolerance, activations)
        for name, total in scales.items():
            if name in stats:
                mean, std = stats[name]
                stats[name] = (mean / total, std / total)
        absorbed = _absorb_high_biases(model, graph, pairs, stats) if absorb_high_bias else {}
    for candidate in candidates:
        report.pairs.append(PairOutcome(
            candidate.first, candidate.second, candidate.activation, candidate.blocker is None,
            candidate.blocker or "", absorbed.get((candidate.first, candidate.second), 0.0),
        ))
    report.layer_output_stats = {name: (m.float(), s.float()) for name, (m, s) in stats.items()}
    return report


def _untie_shared_clamps(
    model: nn.Module, dummy_input: Any, graph: ModelGraph, report: EqualizationReport
) -> tuple[ModelGraph, list[EqualizationCandidate]]:
    """Give every clamp on an equalizable path its own module; block pairs where that is impossible."""
    failed: set[str] = set()
    while True:
        candidates = find_equalization_candidates(graph)
        shared = [
            name for c in candidates if c.blocker is None for name in c.clamps
            if graph.calls(name) > 1 and name not in failed
        ]
        if not shared:
            break
        moved = False
        for name in dict.fromkeys(shared):  # slots are distinct per module: one graph serves all moves
            slots = move_into_slots(model, graph, name)
            if slots is not None:
                report.untied.append(f"{name} (moved into {', '.join(slots)}; it is now an Identity)")
                moved = True
        if not moved:
            caller = untie_calls(model, shared[0], dummy_input)
            if caller is None:
                failed.add(shared[0])
                continue
            report.untied.append(f"{shared[0]} (its caller {caller} was replaced by its traced graph)")
        graph = build_graph(model, dummy_input)
    for candidate in candidates:
        shared_here = [n for n in candidate.clamps if graph.calls(n) > 1]
        if candidate.blocker is None and shared_here:
            candidate.blocker = (
                f"activation {shared_here[0]} is called {graph.calls(shared_here[0])} times from code that cannot be "
                "traced; give each call its own module"
            )
    return graph, candidates


def _replace_clamps(
    model: nn.Module, graph: ModelGraph, candidate: EqualizationCandidate, report: EqualizationReport
) -> None:
    first = model.get_submodule(candidate.first)
    channel_dim = output_channel_dim(first, graph.leaf_calls[candidate.first].output_ndim)
    for name in candidate.clamps:
        module = model.get_submodule(name)
        if isinstance(module, ChannelClamp):
            continue
        clamp = ChannelClamp.from_hardtanh(module, num_output_channels(first), channel_dim, first.weight.device)
        set_submodule(model, name, clamp)
        report.replaced_activations[name] = (
            f"{type(module).__name__}({module.min_val:g}, {module.max_val:g}) -> ChannelClamp (per-channel bounds "
            "scaled with the channels: exact)"
        )


class _ChannelRanges:
    """Per-channel weight ranges of one layer under running input multipliers and output divisors.

    Works on the kernel-reduced ``max |w|`` matrix (`range_matrix`) and re-reduces it only when the other
    side's scales changed: output ranges are ``max_i(M * mult) / div`` and input ranges ``mult * max_o(M / div)``.
    """

    def __init__(self, layer: nn.Module, activation_ranges: torch.Tensor | None = None) -> None:
        self.matrix = range_matrix(layer).double()
        self.activation_ranges = activation_ranges
        groups, out_per_group, in_per_group = self.matrix.shape
        self.multipliers = torch.ones(groups * in_per_group, dtype=torch.float64, device=self.matrix.device)
        self.divisors = torch.ones(groups * out_per_group, dtype=torch.float64, device=self.matrix.device)
        self._max_over_inputs: torch.Tensor | None = None
        self._max_over_outputs: torch.Tensor | None = None

    def output_ranges(self) -> torch.Tensor:
        """Weight ranges per output channel; with activation ranges, the larger of the two after each is
        normalised by its tensor-wide maximum (both shrink by the same ``1 / s``, and both are quantized
        per tensor), in weight units."""
        if self._max_over_inputs is None:
            weighted = self.matrix * self.multipliers.view(self.matrix.shape[0], 1, -1)
            self._max_over_inputs = weighted.amax(dim=2).reshape(-1)
        weights = self._max_over_inputs / self.divisors
        if self.activation_ranges is None:
            return weights
        activations = self.activation_ranges / self.divisors
        return torch.maximum(weights / weights.max(), activations / activations.max()) * weights.max()

    def input_ranges(self) -> torch.Tensor:
        if self._max_over_outputs is None:
            weighted = self.matrix / self.divisors.view(self.matrix.shape[0], -1, 1)
            self._max_over_outputs = weighted.amax(dim=1).reshape(-1)
        return self._max_over_outputs * self.multipliers

    def divide_outputs(self, scale: torch.Tensor) -> None:
        self.divisors *= scale
        self._max_over_outputs = None

    def multiply_inputs(self, scale: torch.Tensor) -> None:
        self.multipliers *= scale
        self._max_over_inputs = None


def _activation_ranges(
    model: nn.Module, pair: EqualizationCandidate, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor | None:
    """Expected per-channel magnitude of the activation between the pair (the BN's ``beta +- 3 gamma``
    through the path's ReLU/clamp bounds), or None without BN statistics."""
    if pair.first not in stats:
        return None
    mean, std = stats[pair.first]
    lower, upper = torch.full_like(mean, -torch.inf), torch.full_like(mean, torch.inf)
    for node in pair.path:
        if node.name in pair.clamps:
            clamp = model.get_submodule(node.name)
            lower, upper = torch.maximum(lower, clamp.lower.to(mean)), torch.minimum(upper, clamp.upper.to(mean))
        elif _is_relu(node):
            lower = lower.clamp_min(0)
    extremes = torch.stack([mean - 3 * std, mean + 3 * std]).clamp(lower, upper).abs()
    return extremes.amax(dim=0).clamp_min(1e-12)


def _scale_until_converged(
    model: nn.Module,
    pairs: list[EqualizationCandidate],
    report: EqualizationReport,
    max_iterations: int,
    tolerance: float,
    activation_ranges: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Rescale each pair until no scale moves by more than ``tolerance``, then apply the accumulated scales
    to the weights once (one rounding). Returns each first layer's per-channel divisor."""
    names = {name for pair in pairs for name in (pair.first, pair.second)}
    layers = {name: model.get_submodule(name) for name in names}
    ranges = {name: _ChannelRanges(layer, activation_ranges.get(name)) for name, layer in layers.items()}
    for iteration in range(1, max_iterations + 1):
        largest_change = 0.0
        for pair in pairs:
            ranges_first = ranges[pair.first].output_ranges()
            ranges_second = ranges[pair.second].input_ranges()
            usable = (ranges_first > 0) & (ranges_second > 0)
            scale = torch.where(usable, torch.sqrt(ranges_first / ranges_second.where(usable, 1.0)), 1.0)
            ranges[pair.first].divide_outputs(scale)
            ranges[pair.second].multiply_inputs(scale)
            largest_change = max(largest_change, float((scale - 1).abs().max()))
        report.iterations = iteration
        if largest_change < tolerance:
            break
    for name, layer in layers.items():
        scale_output_channels(layer, 1.0 / ranges[name].divisors)
        scale_input_channels(layer, ranges[name].multipliers)
    for pair in pairs:
        for name in pair.clamps:
            clamp = model.get_submodule(name)
            clamp.lower /= ranges[pair.first].divisors.to(clamp.lower)
            clamp.upper /= ranges[pair.first].divisors.to(clamp.upper)
    return {pair.first: ranges[pair.first].divisors for pair in pairs}


def _absorbing_activation(
    model: nn.Module, graph: ModelGraph, pair: EqualizationCandidate
) -> tuple[bool, ChannelClamp | None]:
    """(absorbable, its clamp): the path must be pass-throughs around exactly one ReLU or clamp, and layer 2
    must turn a per-channel constant into a per-channel constant (no zero padding: a padded border would
    see the absorbed constant as a spatially varying error)."""
    activations = [n for n in pair.path if not (n.kind == "module" and isinstance(n.module, (nn.Identity, nn.Dropout)))]
    second = model.get_submodule(pair.second)
    if len(activations) != 1 or not responds_to_constants_exactly(second, graph.leaf_calls[pair.second].input_shape):
        return False, None
    node = activations[0]
    if node.kind == "module" and node.name in pair.clamps:
        return True, model.get_submodule(node.name)
    return _is_relu(node), None


def _is_relu(node: GraphNode) -> bool:
    """A plain ReLU, as a module or a function (also when wrapped in a sim's `FunctionalOp`)."""
    return (node.kind == "module" and type(node.module) is nn.ReLU) or node.op_name in ("relu", "relu_")


def _absorb_high_biases(
    model: nn.Module,
    graph: ModelGraph,
    pairs: list[EqualizationCandidate],
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[tuple[str, str], float]:
    absorbed = {}
    for pair in pairs:
        absorbable, clamp = _absorbing_activation(model, graph, pair) if pair.first in stats else (False, None)
        if not absorbable:
            continue
        mean, std = stats[pair.first]
        lower = clamp.lower.to(mean) if clamp is not None else torch.zeros_like(mean)
        amount = (mean - 3 * std - lower).clamp_min(0)
        if clamp is not None:  # clamp(x - c, l - c, u - c) == clamp(x, l, u) - c for every x: exact
            amount = torch.minimum(amount, clamp.upper.to(mean) - lower)
            clamp.lower -= amount.to(clamp.lower)
            clamp.upper -= amount.to(clamp.upper)
        first, second = model.get_submodule(pair.first), model.get_submodule(pair.second)
        add_to_bias(first, -amount)
        add_to_bias(second, weights_times_input(second.weight, second, amount))
        stats[pair.first] = (mean - amount, std)
        absorbed[(pair.first, pair.second)] = float(amount.mean())
    return absorbed
