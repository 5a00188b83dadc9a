"""A small U-Net for the emulation tests and benchmarks: the up path's ops that ONNX Runtime computes in float
between DQ and Q (ConvTranspose, bilinear and nearest Resize) beside its integer convolutions and concats."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _stage(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU())


class UNet(nn.Module):
    """Two down stages (Conv+BN+ReLU, MaxPool), a bottleneck, and an up path: a ConvTranspose2d stage and a
    bilinear ``F.interpolate`` stage, each joined to its skip connection by ``torch.cat``, the bottleneck also
    brought up by a nearest ``F.interpolate``; per-pixel class logits at the input's resolution."""

    def __init__(self, channels: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.down1, self.down2 = _stage(3, channels), _stage(channels, 2 * channels)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _stage(2 * channels, 4 * channels)
        self.up2 = nn.ConvTranspose2d(4 * channels, 2 * channels, 2, stride=2)
        self.decode2 = _stage(4 * channels, 2 * channels)
        self.decode1 = _stage(7 * channels, channels)
        self.head = nn.Conv2d(channels, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip1 = self.down1(x)
        skip2 = self.down2(self.pool(skip1))
        bottom = self.bottleneck(self.pool(skip2))
        up2 = self.decode2(torch.cat([self.up2(bottom), skip2], 1))
        up1 = torch.cat([F.interpolate(up2, scale_factor=2, mode="bilinear", align_corners=False),
                         F.interpolate(bottom, scale_factor=4, mode="nearest"), skip1], 1)
        return self.head(self.decode1(up1))
