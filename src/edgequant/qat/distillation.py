"""Label-free QAT: the quantized model learns to reproduce the FP32 model's outputs.

How the loss is chosen from an output (``kind="auto"``): a 2-D floating tensor ``(batch, classes)`` is taken
for logits and compared by KL divergence of the softened distributions,
``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al. 2015); any other floating tensor
(feature maps, sequences, embeddings of rank > 2) by mean squared error. Models whose 2-D output is an
embedding rather than logits pass ``kind="mse"``. Outputs that are tuples/dicts are compared leaf by leaf
and the losses summed; integer leaves are ignored.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

DISTILLATION_KINDS = ("auto", "kl", "mse")


def distillation_loss(student: Any, teacher: Any, kind: str = "auto", temperature: float = 1.0) -> torch.Tensor:
    """Distance between a student's and a teacher's outputs (see the module doc for ``kind``)."""
    if kind not in DISTILLATION_KINDS:
        raise ValueError(f"distillation kind {kind!r} is not one of {', '.join(DISTILLATION_KINDS)}")
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    pairs = [(s, t) for s, t in zip(tree_leaves(student), tree_leaves(teacher), strict=True)
             if isinstance(s, torch.Tensor) and s.is_floating_point()]
    if not pairs:
        raise ValueError("the model output has no floating-point tensor to distill; pass loss_fn")
    total = pairs[0][0].new_zeros(())
    for student_value, teacher_value in pairs:
        teacher_value = teacher_value.detach()
        use_kl = kind == "kl" or (kind == "auto" and student_value.dim() == 2)
        if use_kl:
            total = total + temperature**2 * F.kl_div(
                F.log_softmax(student_value / temperature, dim=-1), F.log_softmax(teacher_value / temperature, dim=-1),
                reduction="batchmean", log_target=True)
        else:
            total = total + F.mse_loss(student_value, teacher_value)
    return total
