"""What AutoQuant returns: the step log and the best sim (shared by the run and its report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgequant.sim import QuantSim


@dataclass
class StepRecord:
    """One evaluated configuration (or diagnostic) in the order AutoQuant ran it."""

    name: str
    description: str
    metric: float | None
    seconds: float
    layers: list[str] = field(default_factory=list)
    state_file: str | None = None  # sim state of a candidate, relative to the run directory
    stage: str = "original"  # float model it was built from: original, bn_fold or cle
    scheme: str | dict[str, Any] = ""  # the calibration method's JSON form (`CalibrationMethod.to_json`)
    meets_target: bool = False
    diagnostic: bool = False
    cached: bool = False


@dataclass
class AutoQuantResult:
    """Best sim found, where its state lies, the step log, the HTML report and, if needed, what to try next."""

    sim: QuantSim
    fp32_metric: float
    target_metric: float
    best_step: str
    best_metric: float
    target_met: bool
    sim_state_path: Path
    report_path: Path
    steps: list[StepRecord]
    sensitivity: list[tuple[str, float]] = field(default_factory=list)
    recommendation: str | None = None
