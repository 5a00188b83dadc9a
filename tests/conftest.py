"""Fixtures shared across the test packages: the bundled digits model and data (no download)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgequant.demo.digits import load_digits_tensors, load_pretrained


@pytest.fixture(scope="session")
def digits_train() -> torch.Tensor:
    """The 1257 training images of scikit-learn's digits, (N, 1, 8, 8) in [0, 1] (read-only: clone to edit)."""
    images, _ = load_digits_tensors("train")
    return images


@pytest.fixture(scope="session")
def digits_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The 540 test images and their labels."""
    return load_digits_tensors("test")


@pytest.fixture
def digits_cnn() -> nn.Module:
    """A fresh copy of the bundled digits CNN (98 % test accuracy), in eval mode."""
    return load_pretrained("digits_cnn")
