"""The data the reference toolkit's own MobileNetV2 on digits (``tests/fixtures/aimet-2.42/mobilenet_v2_digits``;
the float model is `aimet_fixtures.mobilenet`) was trained and evaluated on, reconstructed from the fixture's inputs.

The fixture's 128 test inputs are, to 1e-4, sklearn's digits upsampled bilinearly to 16x16 and standardised with
the training images' mean and std, in the order of ``train_test_split(test_size=0.3, stratify=labels,
random_state=0)``'s test split (1257 training / 540 test images). With that data the float model scores 0.9907 on the
540 test images, the published FP32 figure of the reference toolkit's MobileNetV2, so the QAT recipe
can be compared on the same weights and the same images.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import aimet_fixtures  # noqa: E402 - the fixture helpers live with the tests


def load_model() -> nn.Module:
    return aimet_fixtures.mobilenet()


def load_data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((train images, labels), (test images, labels))``: (N, 1, 16, 16) float32 and int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = F.interpolate(torch.tensor(digits.images, dtype=torch.float32)[:, None], size=16, mode="bilinear",
                           align_corners=False)
    labels = torch.tensor(digits.target)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.3, stratify=digits.target, random_state=0)
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return (images[train], labels[train]), (images[test], labels[test])
