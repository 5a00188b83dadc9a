"""Orchestration on top of the techniques: AutoQuant."""

from edgequant.workflows.autoquant import AutoQuantSettings, QuantSimSettings, autoquant
from edgequant.workflows.autoquant_result import AutoQuantResult, StepRecord

__all__ = ["AutoQuantResult", "AutoQuantSettings", "QuantSimSettings", "StepRecord", "autoquant"]
