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
from dataclasses import dataclass
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


def _key(kind: str, choice: dict[str, Candidate]) -> str:
    text = json.dumps(sorted((g, list(c)) for g, c in choice.items()))
    return f"{kind}:{hashlib.sha256(text.encode()).hexdigest()[:20]}"


_Saving = Callable[[dict[str, Candidate], dict[str, Candidate]], float | None]
"""What a move from the first choice to the second saves, or None when it is not a move of the path."""


@dataclass(frozen=True)
class _Settings:
    """What one search is asked, checked: distinct candidates, the allowed drop, the cost to minimise, and how
    many batches the sensitivity phase measures."""

    candidates: tuple[Candidate, ...]
    allowed_accuracy_drop: float
    cost: str
    num_batches: int

    @classmethod
    def checked(cls, candidates: Sequence[Sequence[int]], allowed_accuracy_drop: float, cost: str,
                num_batches: int) -> _Settings:
        if cost not in COST_MODELS:
            raise ValueError(f"unknown cost {cost!r}; choose one of {', '.join(COST_MODELS)}")
        if not (isinstance(allowed_accuracy_drop, (int, float)) and allowed_accuracy_drop >= 0
                and math.isfinite(allowed_accuracy_drop)):
            raise ValueError(f"allowed_accuracy_drop must be a finite number >= 0, got {allowed_accuracy_drop!r}")
        return cls(tuple(_check_candidates(candidates)), allowed_accuracy_drop, cost, num_batches)

    @property
    def other_cost(self) -> str:
        """The cost not minimised, which the tie-break saves."""
        return next(c for c in COST_MODELS if c != self.cost)


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
    settings = _Settings.checked(candidates, allowed_accuracy_drop, cost, num_batches)
    if any(q.scale is None for q in sim.quantizers().values() if q.enabled):
        raise ValueError("the sim is not calibrated: call sim.calibrate(data) before choose_mixed_precision")
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)
    search = _Search(sim, data, eval_fn, settings, out_path / CACHE_FILE if out_path else None)
    try:
        base_fidelity, sensitivities = search.sensitivities(progress)
        loss = _fidelity_losses(sensitivities, base_fidelity)
        start = FrontPoint(dict(search.most_accurate), search.relative(search.most_accurate), base_fidelity)
        front = search.path(start, loss, search.cheaper)
        fp32_metric = search.fp32_metric()
        target = fp32_metric - settings.allowed_accuracy_drop
        chosen, tie_break = search.bisection(front, loss, target, progress)
        search.apply(chosen.choice)
    except BaseException:
        search.restore()
        raise
    result = search.result(chosen, front, tie_break, sensitivities, fp32_metric, target)
    if out_path is not None:
        result.report_path = write_report(result, out_path / "mixed_precision.html")
    return result


class _Search:
    """One search: the sim's groups and their options, the cost models and references, the sensitivity batches,
    the measurement cache, and the phases that measure on them (see the module docstring)."""

    def __init__(self, sim: QuantSim, data: Iterable[Any], eval_fn: Callable[[nn.Module], float],
                 settings: _Settings, cache_path: Path | None) -> None:
        self.sim, self.eval_fn, self.settings = sim, eval_fn, settings
        graph = sim.graph()
        self.groups = find_groups(sim, graph)
        if not self.groups:
            raise ValueError("no quantizer's bit width is free to choose (all fixed by the config, frozen or disabled)")
        self.models = {"bitops": bitops_model(sim, graph), "memory": memory_model(sim)}
        self.original = current_bitwidths(sim)
        self.batches = list(sim.batches(data, settings.num_batches))
        self.cache = _Cache(cache_path, self._identity())
        self.options = {g.name: _group_options(g, list(settings.candidates), self.models[settings.cost],
                                               self.original) for g in self.groups}
        self.most_accurate = {g.name: self.options[g.name][0] for g in self.groups}
        self.references = {kind: self._uniform_maximum(model) for kind, model in self.models.items()}
        with sim.quantizers_enabled(False):
            self.fidelity = OutputFidelity(self.batches, [sim.model(*args, **kwargs) for args, kwargs in self.batches])
        self.eval_calls = 0

    def _identity(self) -> str:
        """What the cache belongs to: the groups, candidates, bit widths and sim state."""
        state = {k: v for k, v in self.sim.model.state_dict().items() if isinstance(v, torch.Tensor)}
        identity = json.dumps([[g.name for g in self.groups], list(self.settings.candidates),
                               sorted(self.original.items()), tensors_checksum(state)])
        return hashlib.sha256(identity.encode()).hexdigest()

    def _uniform_maximum(self, model: CostModel) -> float:
        """The cost with every group at the candidate that costs most overall: what relative costs divide by."""
        return max(model(self.configuration(dict.fromkeys(self.options, c))) for c in self.settings.candidates)

    def configuration(self, choice: dict[str, Candidate]) -> dict[str, int]:
        """The bit width of every quantizer under ``choice`` (quantizers of no group keep theirs)."""
        bitwidths = dict(self.original)
        for group in self.groups:
            bitwidths.update(group.bitwidths(choice[group.name]))
        return bitwidths

    def relative(self, choice: dict[str, Candidate], kind: str | None = None) -> float:
        """The cost ``kind`` (default: the minimised one) of ``choice``, relative to the uniform maximum."""
        kind = kind or self.settings.cost
        return self.models[kind](self.configuration(choice)) / self.references[kind]

    def apply(self, choice: dict[str, Candidate]) -> None:
        apply_bitwidths(self.sim, self.configuration(choice), self.batches)

    def restore(self) -> None:
        """The sim's bit widths as before the search."""
        apply_bitwidths(self.sim, self.original, self.batches)

    def measure(self, kind: str, choice: dict[str, Candidate]) -> float:
        """Output fidelity (``kind="fidelity"``) or ``eval_fn`` (``"eval"``) under ``choice``, cached."""
        def compute() -> float:
            self.apply(choice)
            return evaluate(self.fidelity if kind == "fidelity" else self.eval_fn, self.sim.model)

        value, computed = self.cache.get(_key(kind, choice), compute)
        self.eval_calls += computed and kind == "eval"
        return value

    def fp32_metric(self) -> float:
        with self.sim.quantizers_enabled(False):
            metric, computed = self.cache.get("eval:fp32", lambda: evaluate(self.eval_fn, self.sim.model))
        self.eval_calls += computed
        return metric

    # 1. sensitivity
    def sensitivities(self, progress: bool) -> tuple[float, list[GroupSensitivity]]:
        """The fidelity with every group at its most accurate option, and with each group alone lowered."""
        lowered = sum(len(self.options[g.name]) - 1 for g in self.groups)
        with tqdm(total=lowered + 1, desc="mixed precision: sensitivity", disable=not progress) as bar:
            base = self.measure("fidelity", self.most_accurate)
            bar.update()
            sensitivities = []
            for group in self.groups:
                values = {self.most_accurate[group.name]: base}
                for candidate in self.options[group.name][1:]:
                    values[candidate] = self.measure("fidelity", self.most_accurate | {group.name: candidate})
                    bar.update()
                sensitivities.append(GroupSensitivity(group.name, values))
        return base, sensitivities

    # 2. greedy paths: the Pareto front (moves that save cost) and the tie-break (moves that save the other cost)
    def cheaper(self, before: dict[str, Candidate], after: dict[str, Candidate]) -> float | None:
        saved = self.relative(before) - self.relative(after)
        return saved if saved > COST_TOLERANCE else None

    def as_cheap_smaller(self, before: dict[str, Candidate], after: dict[str, Candidate]) -> float | None:
        if abs(self.relative(before) - self.relative(after)) > COST_TOLERANCE:
            return None
        other = self.settings.other_cost
        saved = self.relative(before, other) - self.relative(after, other)
        return saved if saved > COST_TOLERANCE else None

    def path(self, start: FrontPoint, loss: dict[str, dict[Candidate, float]], saving: _Saving) -> list[FrontPoint]:
        """From ``start``, repeatedly take the move (one group to another of its options) with the least fidelity
        loss per unit ``saving`` (None: not a move of this path) until none is left; the fidelity losses are
        measured against the most accurate configuration and add up. The first point is ``start``."""
        choice, fidelity = dict(start.choice), start.predicted_fidelity
        path = [FrontPoint(dict(choice), start.relative_cost, fidelity, start.metric)]
        while (move := self._best_move(choice, loss, saving)) is not None:
            name, candidate, added = move
            choice[name] = candidate
            fidelity -= added
            path.append(FrontPoint(dict(choice), self.relative(choice), fidelity))
        return path

    def _best_move(self, choice: dict[str, Candidate], loss: dict[str, dict[Candidate, float]],
                   saving: _Saving) -> tuple[str, Candidate, float] | None:
        """(group, candidate, fidelity loss added) of the move with the least loss per unit saved; ties: the
        larger saving, then the first found."""
        best = None
        for group in self.groups:
            now = choice[group.name]
            for candidate in self.options[group.name]:
                saved = None if candidate == now else saving(choice, choice | {group.name: candidate})
                if saved is None:
                    continue
                added = loss[group.name][candidate] - loss[group.name][now]
                score = (added / saved, -saved)
                if best is None or score < best[0]:
                    best = (score, (group.name, candidate, added))
        return best[1] if best is not None else None

    # 3. bisection with eval_fn, 4. tie-break at equal cost
    def bisection(self, front: list[FrontPoint], loss: dict[str, dict[Candidate, float]], target: float,
                  progress: bool) -> tuple[FrontPoint, list[FrontPoint]]:
        """(chosen point, tie-break path): the cheapest point of ``front`` that meets ``target``, then the last
        point of its tie-break path that still meets it; ``front[0]`` with a warning when even it misses."""
        total = 1 + max(1, math.ceil(math.log2(len(front))))
        with tqdm(total=total, desc="mixed precision: bisection", disable=not progress) as bar:
            if self._metric(front[0], bar) < target:
                warnings.warn(
                    f"even the most accurate candidate everywhere gives {front[0].metric:.4f} < target {target:.4f}: "
                    "keeping it; add a more accurate candidate or allow a larger drop",
                    stacklevel=3,
                )
                return front[0], []
            chosen = front[self._last_meeting(front, target, bar)]
            tie_break = self.path(chosen, loss, self.as_cheap_smaller)
            bar.total += math.ceil(math.log2(len(tie_break)))
            return tie_break[self._last_meeting(tie_break, target, bar)], tie_break

    def _metric(self, point: FrontPoint, bar: tqdm) -> float:
        point.metric = self.measure("eval", point.choice)
        bar.update()
        return point.metric

    def _last_meeting(self, points: list[FrontPoint], target: float, bar: tqdm) -> int:
        """Index of the last of ``points`` whose metric meets ``target``, by bisection; ``points[0]`` meets it."""
        low, high = 0, len(points) - 1
        while low < high:
            middle = (low + high + 1) // 2
            if self._metric(points[middle], bar) >= target:
                low = middle
            else:
                high = middle - 1
        return low

    def result(self, chosen: FrontPoint, front: list[FrontPoint], tie_break: list[FrontPoint],
               sensitivities: list[GroupSensitivity], fp32_metric: float, target: float) -> MixedPrecisionResult:
        configuration = self.configuration(chosen.choice)
        return MixedPrecisionResult(
            choice=chosen.choice,
            layer_bitwidths=_layer_bitwidths(self.groups, chosen.choice),
            relative_bitops=self.relative(chosen.choice, "bitops"),
            relative_memory=self.relative(chosen.choice, "memory"),
            effective_bits={kind: model.effective_bits(configuration) for kind, model in self.models.items()},
            metric=chosen.metric,
            fp32_metric=fp32_metric,
            target=target,
            met_target=front[0].metric >= target,
            cost=self.settings.cost,
            pareto=sorted({(p.relative_cost, p.metric) for p in front + tie_break if p.metric is not None}),
            front=front,
            tie_break=tie_break,
            sensitivities=sensitivities,
            groups=[g.name for g in self.groups],
            eval_calls=self.eval_calls,
            candidates=list(self.settings.candidates),
            layer_groups={layer: g.name for g in self.groups for layer in g.layers},
        )


def _fidelity_losses(sensitivities: list[GroupSensitivity], base: float) -> dict[str, dict[Candidate, float]]:
    """Each group's fidelity loss at each option, from the most accurate configuration's fidelity ``base``."""
    return {s.group: {c: max(0.0, base - f) for c, f in s.fidelity.items()} for s in sensitivities}


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


def _layer_bitwidths(groups: list[QuantizerGroup], choice: dict[str, Candidate]) -> dict[str, dict[str, int]]:
    layers: dict[str, dict[str, int]] = {}
    for group in groups:
        param_bw, output_bw = choice[group.name]
        for quantizer in group.params:
            layers.setdefault(quantizer.owner, {})["param_bw"] = param_bw
        for quantizer in group.activations:
            layers.setdefault(quantizer.owner or "<model input>", {})["output_bw"] = output_bw
    return layers
