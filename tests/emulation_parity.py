"""The shared start of the emulation parity tests: a calibrated sim exported, checked against ONNX Runtime as the
default sim, then switched to emulating ORT."""

from __future__ import annotations

from pathlib import Path

import torch

import edgequant as eq
from edgequant.export.verify import ParityReport, verify
from edgequant.sim.emulation import EmulationPlan


def export_then_emulate(sim: eq.QuantSim, calibration: torch.Tensor, data: torch.Tensor, folder: Path
                        ) -> tuple[ParityReport, EmulationPlan]:
    """Calibrate ``sim`` on ``calibration`` (batches of 8), export it to ``folder``, verify the default sim against
    ORT on ``data``, then emulate ORT and require every op emulated: the default sim's report and the plan."""
    sim.calibrate(calibration.split(8), progress=False)
    sim.export(folder, calibration[:1])
    default = verify(folder, sim, data, progress=False)
    plan = sim.emulate("onnxruntime")
    assert not plan.skipped, plan.summary()
    return default, plan
