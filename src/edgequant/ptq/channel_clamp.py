"""`ChannelClamp`: a clamp whose bounds differ per channel, what ReLU6 becomes under cross-layer scaling.

ReLU6 is not scale-equivariant: ``relu6(x / s) != relu6(x) / s``. But ``relu6(x) / s`` is exactly
``clamp(x / s, 0, 6 / s)``, so after equalization scales channel ``c`` of the producing layer by ``1 / s_c``,
a clamp with upper bound ``6 / s_c`` on that channel keeps the network's function unchanged. The
simulation quantizes it as the ONNX ``Clip`` it stands for (so ``Conv + Clip`` supergroups still fuse),
and it exports as ``Max``/``Min`` with per-channel constant bounds.
"""

from __future__ import annotations

import torch
from torch import nn

from edgequant.sim.ops import register_module


class ChannelClamp(nn.Module):
    """``clamp(x, lower[c], upper[c])`` along ``channel_dim``."""

    def __init__(self, lower: torch.Tensor, upper: torch.Tensor, channel_dim: int = 1) -> None:
        super().__init__()
        if lower.shape != upper.shape or lower.dim() != 1:
            raise ValueError(f"ChannelClamp needs 1-D bounds of equal length, got {lower.shape} and {upper.shape}")
        self.channel_dim = channel_dim
        self.register_buffer("lower", lower.detach().clone().float())
        self.register_buffer("upper", upper.detach().clone().float())

    @classmethod
    def from_hardtanh(
        cls, module: nn.Hardtanh, num_channels: int, channel_dim: int, device: torch.device
    ) -> ChannelClamp:
        """Per-channel copy of a ReLU6/Hardtanh's constant bounds."""
        lower = torch.full((num_channels,), float(module.min_val), device=device)
        upper = torch.full((num_channels,), float(module.max_val), device=device)
        return cls(lower, upper, channel_dim)

    def extra_repr(self) -> str:
        return f"channels={self.lower.numel()}, channel_dim={self.channel_dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return torch.minimum(torch.maximum(x, self.lower.view(shape)), self.upper.view(shape))


register_module(ChannelClamp, "Clip")
