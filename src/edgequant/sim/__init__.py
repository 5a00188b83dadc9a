"""Quantization simulation: graph capture, quantized modules and the `QuantSim` object."""

from edgequant.sim.ops import register_module
from edgequant.sim.quantized_module import FunctionalOp, QuantizedModule
from edgequant.sim.quantsim import CoverageEntry, QuantSim

__all__ = ["CoverageEntry", "FunctionalOp", "QuantSim", "QuantizedModule", "register_module"]
