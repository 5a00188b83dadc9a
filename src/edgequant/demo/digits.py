"""Tiny CNNs trained on scikit-learn's 8x8 digits, shipped as package data.

They give tests and examples real (trained) weights and activations to quantize without any download:
``DigitsCNN`` exercises plain conv/BN/ReLU plus a functional residual add, ``DigitsDepthwiseCNN`` is a
MobileNet-style net whose depthwise convolutions have the badly balanced per-channel ranges that make
per-tensor int8 lossy (the classic target for cross-layer equalisation).
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
from torch import nn

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "MODEL_NAMES",
    "DigitsCNN",
    "DigitsDepthwiseCNN",
    "build_model",
    "evaluate_accuracy",
    "load_digits_tensors",
    "load_pretrained",
]

# Fixed normalisation constants (mean / std of all 1797 images, pixel values 0..16). Kept as constants,
# not recomputed per split, so that train, test and calibration data always see the same transform.
DIGITS_MEAN = 4.8842
DIGITS_STD = 6.0168

_TEST_FRACTION = 0.25


def load_digits_tensors(split: str = "test", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return normalised digits images ``(N, 1, 8, 8)`` float32 and int64 labels for one split.

    The 75/25 split uses numpy's legacy ``RandomState`` permutation, whose stream is frozen across numpy
    versions, so the bundled weights are always evaluated on the exact images they were not trained on.
    ``split`` is ``"train"``, ``"test"`` or ``"all"``.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    digits = load_digits()
    images = (digits.images.astype(np.float32) - DIGITS_MEAN) / DIGITS_STD
    labels = digits.target.astype(np.int64)
    if split != "all":
        perm = np.random.RandomState(seed).permutation(len(labels))
        n_test = int(round(len(labels) * _TEST_FRACTION))
        idx = perm[:n_test] if split == "test" else perm[n_test:]
        idx = np.sort(idx)
        images, labels = images[idx], labels[idx]
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    y = torch.from_numpy(np.ascontiguousarray(labels))
    return x, y


def _conv_bn(
    cin: int,
    cout: int,
    act: nn.Module,
    kernel: int = 3,
    stride: int = 1,
    groups: int = 1,
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act,
    )


class DigitsCNN(nn.Module):
    """Plain conv-BN-ReLU CNN with one functional residual add (``x + y``).

    The add is written as a tensor op rather than a module on purpose: quantizers must discover and
    quantize functional ops in traced graphs, and this model is the smallest real test of that.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _conv_bn(1, 16, nn.ReLU())
        self.conv2 = _conv_bn(16, 32, nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.conv3 = _conv_bn(32, 32, nn.ReLU())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of ``(N, 1, 8, 8)`` normalised digits into logits ``(N, 10)``."""
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.pool(x)
        y = self.conv3(x)
        x = x + y
        x = torch.flatten(self.gap(x), 1)
        return self.fc(x)


class DigitsDepthwiseCNN(nn.Module):
    """MobileNet-v1-style net: stem, three depthwise-separable blocks, pooling, linear classifier.

    Depthwise 3x3 convs followed by BatchNorm end up with very different per-channel weight ranges once
    BN is folded, which is what makes per-tensor weight quantization hurt and equalisation help.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(1, 16, nn.ReLU6())
        widths = [(16, 32, 1), (32, 64, 2), (64, 64, 1)]
        blocks = []
        for cin, cout, stride in widths:
            blocks.append(
                nn.Sequential(
                    _conv_bn(cin, cin, nn.ReLU6(), kernel=3, stride=stride, groups=cin),
                    _conv_bn(cin, cout, nn.ReLU6(), kernel=1),
                )
            )
        self.blocks = nn.Sequential(*blocks)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of ``(N, 1, 8, 8)`` normalised digits into logits ``(N, 10)``."""
        x = self.stem(x)
        x = self.blocks(x)
        x = torch.flatten(self.gap(x), 1)
        return self.fc(x)


MODEL_NAMES: dict[str, type[nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "digits_dwcnn": DigitsDepthwiseCNN,
}


def build_model(name: str = "digits_cnn") -> nn.Module:
    """Build an untrained demo model by name (what the training script and ``load_pretrained`` share)."""
    try:
        cls = MODEL_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown demo model {name!r}; choose from {sorted(MODEL_NAMES)}") from None
    return cls()


def load_pretrained(name: str = "digits_cnn") -> nn.Module:
    """Return a demo model in eval mode with its bundled weights from ``edgequant/assets/{name}.pt``.

    Weights are read through ``importlib.resources`` so this works from a wheel or zip install too, and
    with ``weights_only=True`` because a state dict never needs arbitrary unpickling.
    """
    model = build_model(name)
    ref = resources.files("edgequant") / "assets" / f"{name}.pt"
    if not ref.is_file():
        raise FileNotFoundError(f"bundled weights {name}.pt missing; run scripts/train_digits.py")
    with ref.open("rb") as fh:
        state = torch.load(fh, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy in [0, 1], batched on whatever device the model's parameters live on.

    Runs in eval mode (so BatchNorm statistics are never updated by evaluation) and restores the
    model's previous mode afterwards.
    """
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else images.device
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(labels), batch_size):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            correct += int((model(x).argmax(dim=1) == y).sum().item())
    finally:
        model.train(was_training)
    return correct / max(len(labels), 1)
