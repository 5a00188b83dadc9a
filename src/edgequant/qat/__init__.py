"""Quantization-aware training: regular (weights train, weight encodings follow them) and with range learning
(LSQ/LSQ+), BatchNorm folding, label-free fine-tuning by distillation, on one process or under DDP.

    sim.calibrate(data)
    prepare_qat(sim, mode="regular" | "range_learning")   # or let finetune prepare it
    finetune(sim, data, epochs=3, lr=1e-4)                  # or train sim.model in your own loop
    finalize(sim, data)                                     # final encodings, BatchNorms folded
    sim.export(out_dir)
"""

from edgequant.qat.checkpoint import TrainingProgress
from edgequant.qat.distillation import distillation_loss
from edgequant.qat.finetune import (
    CheckpointSettings,
    EvalSettings,
    FinetuneResult,
    FinetuneSettings,
    LossSettings,
    TrainingSchedule,
    finetune,
)
from edgequant.qat.lsq import LearnedRange, lsq_grad_scale
from edgequant.qat.prepare import MODES, QatSetup, finalize, prepare_qat, qat_setup

__all__ = [
    "MODES",
    "CheckpointSettings",
    "EvalSettings",
    "FinetuneResult",
    "FinetuneSettings",
    "LearnedRange",
    "LossSettings",
    "QatSetup",
    "TrainingProgress",
    "TrainingSchedule",
    "distillation_loss",
    "finalize",
    "finetune",
    "lsq_grad_scale",
    "prepare_qat",
    "qat_setup",
]
