"""Orchestration on top of the techniques: AutoQuant."""

from edgequant.workflows.autoquant import autoquant
from edgequant.workflows.autoquant_result import AutoQuantResult, StepRecord

__all__ = ["AutoQuantResult", "StepRecord", "autoquant"]
