"""`choose_mixed_precision`: the cheapest per-group bit widths that keep ``eval_fn`` within the allowed drop.

The search follows AIMET's automatic mixed precision, with a bisection instead of a full sweep of the front:

1. Sensitivity: starting from every group at the most accurate (most expensive) candidate, each group alone is
   lowered to each cheaper candidate and the output fidelity to FP32 (``1 - NMSE``, `OutputFidelity`) is
   measured on a few batches. Quantization noise powers add, so a group's fidelity loss is its share of the
   output error.
2. Pareto front: greedily, from the all-expensive configuration, the move (one group to a cheaper candidate)
   with the least fidelity loss per unit of cost saved is applied, until every group is at its cheapest
   candidate. The predicted fidelity of each point is ``1 -`` the sum of the losses of the moves so far.
3. Bisection with the real ``eval_fn`` along the front for the cheapest point whose metric is at least
   ``eval_fn(FP32) - allowed_accuracy_drop`` (the front is ordered by cost, and its metric decreases along it):
   ``2 + ceil(log2(len(front)))`` calls of ``eval_fn`` instead of one per point.
4. Tie-break at equal cost: some moves save nothing under the chosen cost but save under the other one (under
   BitOps, a 16-bit output read only by non-MAC ops: residual adds, Softmax inputs). They never enter the front
   (they buy no cost for their accuracy loss), so from the chosen point the same greedy rule builds a second
   path of such moves, ordered by loss per unit of the other cost saved, and a second bisection takes the
   longest prefix that still meets the target: of the configurations with the chosen cost, the one that also
   saves memory (or BitOps), for ``ceil(log2(len(path)))`` more calls.

Every measurement is cached in ``out_dir/mixed_precision_cache.json`` under a key of the configuration, so a
rerun (after an interruption, or with another allowed drop) resumes without re-evaluating. The cache belongs to
one sim state (weights, encodings, bit widths), group set and candidate list and is dropped when they differ;
it cannot see a changed ``eval_fn`` or data: use another ``out_dir`` for those.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from edgequant.analysis.fidelity import OutputFidelity
from edgequant.analysis.sweeps import evaluate
from edgequant.mixed_precision.cost import CostModel, bitops_model, memory_model
from edgequant.mixed_precision.groups import (
    Candidate,
    QuantizerGroup,
    apply_bitwidths,
    current_bitwidths,
    find_groups,
)
from edgequant.mixed_precision.report import write_report
from edgequant.mixed_precision.result import FrontPoint, GroupSensitivity, MixedPrecisionResult
from edgequant.quantization.encoding import check_bitwidth
from edgequant.sim import QuantSim
from edgequant.sim.state_file import tensors_checksum

COST_MODELS = ("bitops", "memory")
COST_TOLERANCE = 1e-12  # relative cost differences below this are ties
CACHE_FILE = "mixed_precision_cache.json"


class _Cache:
    """JSON file of measurements keyed by what was measured; None keeps them in memory only."""

    def __init__(self, path: Path | None, identity: str) -> None:
        self.path, self.entries = path, {}
        if path is not None and path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("identity") == identity:
                self.entries = stored["entries"]
        self.identity = identity

    def get(self, key: str, compute: Callable[[], float]) -> tuple[float, bool]:
        """The cached value of ``key`` or ``compute()`` (stored at once); also whether it was computed."""
        if key in self.entries:
            return self.entries[key], False
        value = compute()
        self.entries[key] = value
        if self.path is not None:
            self.path.write_text(json.dumps({"identity": self.identity, "entries": self.entries}, indent=1))
        return value, True


def _check_candidates(candidates: Iterable[Sequence[int]]) -> list[Candidate]:
    checked = []
    for candidate in candidates:
        if not (isinstance(candidate, (tuple, list)) and len(candidate) == 2):
            raise ValueError(f"candidate {candidate!r} is not a (param_bw, output_bw) pair, e.g. (8, 16)")
        check_bitwidth(candidate[0], "candidate param_bw")
        check_bitwidth(candidate[1], "candidate output_bw")
        checked.append((int(candidate[0]), int(candidate[1])))
    if len(set(checked)) < 2:
        raise ValueError("give at least two different (param_bw, output_bw) candidates, e.g. [(8, 8), (8, 16)]")
    return list(dict.fromkeys(checked))


def _configuration(groups: list[QuantizerGroup], choice: dict[str, Candidate], base: dict[str, int]) -> dict[str, int]:
    bitwidths = dict(base)
    for group in groups:
        bitwidths.update(group.bitwidths(choice[group.name]))
    return bitwidths


def _key(kind: str, choice: dict[str, Candidate]) -> str:
    text = json.dumps(sorted((g, list(c)) for g, c in choice.items()))
    return f"{kind}:{hashlib.sha256(text.encode()).hexdigest()[:20]}"


def choose_mixed_precision(
    sim: QuantSim,
    data: Iterable[Any],
    eval_fn: Callable[[nn.Module], float],
    candidates: Sequence[Sequence[int]],
    allowed_accuracy_drop: float,
    *,
    cost: str = "bitops",
    out_dir: str | Path | None = None,
    num_batches: int = 4,
    progress: bool = True,
) -> MixedPrecisionResult:
    """Choose per-group ``(param_bw, output_bw)`` from ``candidates`` for a calibrated ``sim`` so that
    ``eval_fn(sim.model)`` stays within ``allowed_accuracy_drop`` of its FP32 value at the least cost
    (``"bitops"`` or ``"memory"``), apply it to the sim and return what was chosen (see the module docstring).

    ``data`` gives the batches for the sensitivity phase (``num_batches`` of them); ``out_dir`` keeps the
    evaluation cache and the HTML report ``mixed_precision.html``."""
    if cost not in COST_MODELS:
        raise ValueError(f"unknown cost {cost!r}; choose one of {', '.join(COST_MODELS)}")
    if not (isinstance(allowed_accuracy_drop, (int, float)) and allowed_accuracy_drop >= 0
            and math.isfinite(allowed_accuracy_drop)):
        raise ValueError(f"allowed_accuracy_drop must be a finite number >= 0, got {allowed_accuracy_drop!r}")
    candidate_list = _check_candidates(candidates)
    if any(q.scale is None for q in sim.quantizers().values() if q.enabled):
        raise ValueError("the sim is not calibrated: call sim.calibrate(data) before choose_mixed_precision")
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)

    graph = sim.graph()
    groups = find_groups(sim, graph)
    if not groups:
        raise ValueError("no quantizer's bit width is free to choose (all fixed by the config, frozen or disabled)")
    bitops, memory = bitops_model(sim, graph), memory_model(sim)
    cost_model, other_model = (bitops, memory) if cost == "bitops" else (memory, bitops)
    original = current_bitwidths(sim)
    batches = list(sim.batches(data, num_batches))
    state = {k: v for k, v in sim.model.state_dict().items() if isinstance(v, torch.Tensor)}
    identity = json.dumps([[g.name for g in groups], candidate_list, sorted(original.items()),
                           tensors_checksum(state)])
    cache = _Cache(out_path / CACHE_FILE if out_path else None, hashlib.sha256(identity.encode()).hexdigest())

    options = {g.name: _group_options(g, candidate_list, cost_model, original) for g in groups}
    most_accurate = {g.name: options[g.name][0] for g in groups}
    def uniform_maximum(model: CostModel) -> float:  # every group at the candidate that costs most overall
        return max(model(_configuration(groups, dict.fromkeys(options, c), original)) for c in candidate_list)

    reference_cost, reference_other, reference_bitops, reference_memory = map(
        uniform_maximum, (cost_model, other_model, bitops, memory))

    def relative(choice: dict[str, Candidate], model: CostModel = cost_model,
                 reference: float = reference_cost) -> float:
        return model(_configuration(groups, choice, original)) / reference

    with sim.quantizers_enabled(False):
        fidelity = OutputFidelity(batches, [sim.model(*args, **kwargs) for args, kwargs in batches])
    eval_calls = 0

    def measure(kind: str, choice: dict[str, Candidate]) -> float:
        nonlocal eval_calls

        def compute() -> float:
            apply_bitwidths(sim, _configuration(groups, choice, original), batches)
            return evaluate(fidelity if kind == "fidelity" else eval_fn, sim.model)

        value, computed = cache.get(_key(kind, choice), compute)
        eval_calls += computed and kind == "eval"
        return value

    try:
        # 1. sensitivity
        lowered = [(g, c) for g in groups for c in options[g.name][1:]]
        bar = tqdm(total=len(lowered) + 1, desc="mixed precision: sensitivity", disable=not progress)
        base_fidelity = measure("fidelity", most_accurate)
        bar.update()
        sensitivities = []
        for group in groups:
            values = {most_accurate[group.name]: base_fidelity}
            for candidate in options[group.name][1:]:
                values[candidate] = measure("fidelity", most_accurate | {group.name: candidate})
                bar.update()
            sensitivities.append(GroupSensitivity(group.name, values))
        bar.close()
        # 2. greedy Pareto front
        loss = {s.group: {c: max(0.0, base_fidelity - f) for c, f in s.fidelity.items()} for s in sensitivities}

        def cheaper(before: dict[str, Candidate], after: dict[str, Candidate]) -> float | None:
            saved = relative(before) - relative(after)
            return saved if saved > COST_TOLERANCE else None

        def as_cheap_smaller(before: dict[str, Candidate], after: dict[str, Candidate]) -> float | None:
            if abs(relative(before) - relative(after)) > COST_TOLERANCE:
                return None
            saved = (relative(before, other_model, reference_other) - relative(after, other_model, reference_other))
            return saved if saved > COST_TOLERANCE else None

        start = FrontPoint(dict(most_accurate), relative(most_accurate), base_fidelity)
        front = _greedy_path(groups, options, loss, start, cheaper, relative)
        # 3. bisection with eval_fn
        with sim.quantizers_enabled(False):
            fp32_metric, computed = cache.get("eval:fp32", lambda: evaluate(eval_fn, sim.model))
        eval_calls += computed
        target = fp32_metric - allowed_accuracy_drop
        bar = tqdm(total=1 + max(1, math.ceil(math.log2(len(front)))), desc="mixed precision: bisection",
                   disable=not progress)

        def metric_at(points: list[FrontPoint], index: int) -> float:
            point = points[index]
            point.metric = measure("eval", point.choice)
            bar.update()
            return point.metric

        met_target = metric_at(front, 0) >= target
        tie_break: list[FrontPoint] = []
        if not met_target:
            warnings.warn(
                f"even the most accurate candidate everywhere gives {front[0].metric:.4f} < target {target:.4f}: "
                "keeping it; add a more accurate candidate or allow a larger drop",
                stacklevel=2,
            )
            chosen = front[0]
        else:
            chosen = front[_last_meeting(front, metric_at, target)]
            # 4. tie-break at equal cost
            tie_break = _greedy_path(groups, options, loss, chosen, as_cheap_smaller, relative)
            bar.total += math.ceil(math.log2(len(tie_break)))
            chosen = tie_break[_last_meeting(tie_break, metric_at, target)]
        bar.close()
        apply_bitwidths(sim, _configuration(groups, chosen.choice, original), batches)
    except BaseException:
        apply_bitwidths(sim, original, batches)
        raise
    layer_groups = {layer: g.name for g in groups for layer in g.layers}
    result = MixedPrecisionResult(
        choice=chosen.choice,
        layer_bitwidths=_layer_bitwidths(groups, chosen.choice),
        relative_bitops=relative(chosen.choice, bitops, reference_bitops),
        relative_memory=relative(chosen.choice, memory, reference_memory),
        effective_bits={name: model.effective_bits(_configuration(groups, chosen.choice, original))
                        for name, model in (("bitops", bitops), ("memory", memory))},
        metric=chosen.metric,
        fp32_metric=fp32_metric,
        target=target,
        met_target=met_target,
        cost=cost,
        pareto=sorted({(p.relative_cost, p.metric) for p in front + tie_break if p.metric is not None}),
        front=front,
        tie_break=tie_break,
        sensitivities=sensitivities,
        groups=[g.name for g in groups],
        eval_calls=eval_calls,
        candidates=candidate_list,
        layer_groups=layer_groups,
    )
    if out_path is not None:
        result.report_path = write_report(result, out_path / "mixed_precision.html")
    return result


def _group_options(group: QuantizerGroup, candidates: list[Candidate], cost_model: CostModel,
                   base: dict[str, int]) -> list[Candidate]:
    """The group's distinct candidates, most expensive (alone in the group) first; ties by precision. Of the
    candidates a group cannot tell apart (a group without weights ignores ``param_bw``) the most precise one
    stands for them, so an add is reported as W8A8, not W4A8."""
    distinct = {}
    for candidate in sorted(candidates, reverse=True):
        distinct.setdefault(group.effective(candidate), candidate)
    costs = {c: cost_model(base | group.bitwidths(c)) for c in distinct.values()}
    return sorted(distinct.values(), key=lambda c: (-costs[c], -c[1], -c[0]))


def _greedy_path(groups: list[QuantizerGroup], options: dict[str, list[Candidate]],
                 loss: dict[str, dict[Candidate, float]], start: FrontPoint,
                 saving: Callable[[dict[str, Candidate], dict[str, Candidate]], float | None],
                 relative: Callable[[dict[str, Candidate]], float]) -> list[FrontPoint]:
    """From ``start``, repeatedly take the move (one group to another of its options) with the least fidelity
    loss per unit ``saving`` (None: not a move of this path) until none is left; the fidelity losses are measured
    against the most accurate configuration and add up. The first point is ``start``."""
    choice, fidelity = dict(start.choice), start.predicted_fidelity
    path = [FrontPoint(dict(choice), start.relative_cost, fidelity, start.metric)]
    while True:
        best = None
        for group in groups:
            now = choice[group.name]
            for candidate in options[group.name]:
                saved = None if candidate == now else saving(choice, choice | {group.name: candidate})
                if saved is None:
                    continue
                added = loss[group.name][candidate] - loss[group.name][now]
                score = (added / saved, -saved)
                if best is None or score < best[0]:
                    best = (score, group.name, candidate, added)
        if best is None:
            return path
        _, name, candidate, added = best
        choice[name] = candidate
        fidelity -= added
        path.append(FrontPoint(dict(choice), relative(choice), fidelity))


def _last_meeting(points: list[FrontPoint], metric_at: Callable[[list[FrontPoint], int], float],
                  target: float) -> int:
    """Index of the last of ``points`` whose metric meets ``target``, by bisection; ``points[0]`` meets it."""
    low, high = 0, len(points) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if metric_at(points, middle) >= target:
            low = middle
        else:
            high = middle - 1
    return low


def _layer_bitwidths(groups: list[QuantizerGroup], choice: dict[str, Candidate]) -> dict[str, dict[str, int]]:
    layers: dict[str, dict[str, int]] = {}
    for group in groups:
        param_bw, output_bw = choice[group.name]
        for quantizer in group.params:
            layers.setdefault(quantizer.owner, {})["param_bw"] = param_bw
        for quantizer in group.activations:
            layers.setdefault(quantizer.owner or "<model input>", {})["output_bw"] = output_bw
    return layers
