"""What a mixed-precision search measured and chose."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgequant.mixed_precision.groups import Candidate


@dataclass
class GroupSensitivity:
    """Fidelity to FP32 with only this group lowered to each candidate (the others at the most accurate one)."""

    group: str
    fidelity: dict[Candidate, float]


@dataclass
class FrontPoint:
    """One configuration of the greedy Pareto front."""

    choice: dict[str, Candidate]  # group name -> candidate
    relative_cost: float
    predicted_fidelity: float
    metric: float | None = None  # eval_fn, when the bisection evaluated this point


@dataclass
class MixedPrecisionResult:
    """What `choose_mixed_precision` chose and measured (the sim already carries the choice)."""

    choice: dict[str, Candidate]
    layer_bitwidths: dict[str, dict[str, int]]  # layer -> {"param_bw": .., "output_bw": ..} (0: not set)
    relative_bitops: float
    relative_memory: float
    effective_bits: dict[str, float]  # "bitops", "memory": the uniform bit width of the same cost
    metric: float
    fp32_metric: float
    target: float
    met_target: bool
    cost: str
    pareto: list[tuple[float, float]]  # (relative cost, eval_fn metric) of the evaluated front points
    front: list[FrontPoint]
    sensitivities: list[GroupSensitivity]
    groups: list[str]
    eval_calls: int
    candidates: list[Candidate]
    report_path: Path | None = None
    layer_groups: dict[str, str] = field(default_factory=dict)
    tie_break: list[FrontPoint] = field(default_factory=list)  # moves at the chosen cost saving the other one

    def summary(self) -> str:
        by_candidate: dict[Candidate, list[str]] = {}
        for group, candidate in self.choice.items():
            by_candidate.setdefault(candidate, []).append(group)
        chosen = "; ".join(f"W{c[0]}A{c[1]}: {', '.join(g)}" for c, g in sorted(by_candidate.items()))
        return (
            f"mixed precision: metric {self.metric:.4f} (FP32 {self.fp32_metric:.4f}, target {self.target:.4f}"
            f"{'' if self.met_target else ', NOT met'}), relative BitOps {self.relative_bitops:.3f}, relative memory "
            f"{self.relative_memory:.3f}; {len(self.groups)} groups, {self.eval_calls} eval_fn calls; {chosen}"
        )
