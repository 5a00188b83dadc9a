"""BatchNorm re-estimation: recompute BN running statistics on the *quantized* model.

Quantization shifts and rescales activations, so the running mean/variance a BN learned in float no
longer match what it sees in the sim (notably after QAT or with low bitwidths). Running calibration data
through the sim with only the BNs in train mode, and ``momentum=None`` (a cumulative average over all
batches instead of an exponential one), gives statistics of the quantized activations; everything else
stays in eval mode and no weights change. Afterwards the BNs can be folded into the weight quantizers'
scales (`fold_batch_norms_to_scale`), as the hardware will run them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from edgequant.ptq.batch_norm_fold import fold_batch_norms_to_scale
from edgequant.ptq.graph_patterns import BATCH_NORM_TYPES
from edgequant.sim.modes import training_mode
from edgequant.sim.quantsim import QuantSim


@dataclass
class BatchNormReestimation:
    reestimated: list[str] = field(default_factory=list)
    folded: list[tuple[str, str]] = field(default_factory=list)
    """(layer, bn) pairs folded to scale afterwards (empty with ``fold_to_scale=False``)."""


def reestimate_bn(
    sim: QuantSim,
    data: Iterable[Any],
    num_batches: int = 100,
    *,
    fold_to_scale: bool = True,
    progress: bool = True,
) -> BatchNormReestimation:
    """Re-estimate the running statistics of every BatchNorm in ``sim.model`` on up to ``num_batches``
    batches of ``data`` (as for `QuantSim.calibrate`), then (``fold_to_scale``) fold the BNs that follow a
    Conv/ConvTranspose/Linear into it and its weight quantizer. Modes and momenta are restored. The sim
    must be calibrated.
    """
    norms = {
        name: m for name, m in sim.model.named_modules() if isinstance(m, BATCH_NORM_TYPES) and m.track_running_stats
    }
    result = BatchNormReestimation(reestimated=list(norms))
    if not norms:
        return result
    momenta = {name: m.momentum for name, m in norms.items()}
    saved = {name: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for name, m in norms.items()}
    seen = 0
    try:
        with training_mode(sim.model, False), torch.no_grad():
            for module in norms.values():
                module.reset_running_stats()
                module.momentum = None
                module.train()
            for args, kwargs in sim.batches(data, num_batches, progress=progress, desc="reestimate_bn"):
                sim.model(*args, **kwargs)
                seen += 1
    finally:
        for name, module in norms.items():
            module.momentum = momenta[name]
            if seen == 0:  # nothing ran (error or empty data): keep the old statistics
                module.running_mean.copy_(saved[name][0])
                module.running_var.copy_(saved[name][1])
                module.num_batches_tracked.copy_(saved[name][2])
    if fold_to_scale:
        result.folded = fold_batch_norms_to_scale(sim)
    return result
