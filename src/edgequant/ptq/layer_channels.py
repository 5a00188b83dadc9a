"""Per-channel views of Conv / ConvTranspose / Linear weights, for every layout and group count.

Folding, equalization and bias correction all scale or sum a layer's weights along its *output* channels
(what the next BatchNorm or activation sees) or its *input* channels (what the previous one produced).
Grouped and depthwise convolutions and transposed convolutions lay these out differently; keeping that
bookkeeping here lets the techniques speak in channels only.
"""

from __future__ import annotations

import torch
from torch import nn

WEIGHT_LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def is_weight_layer(module: nn.Module | None) -> bool:
    return isinstance(module, WEIGHT_LAYER_TYPES)


def _groups(layer: nn.Module) -> int:
    return getattr(layer, "groups", 1)


def _is_transposed(layer: nn.Module) -> bool:
    return isinstance(layer, nn.modules.conv._ConvTransposeNd)


def num_output_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def num_input_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def output_channel_dim(layer: nn.Module, output_ndim: int) -> int:
    """Axis of the layer's output tensor that holds its output channels."""
    return output_ndim - 1 if isinstance(layer, nn.Linear) else 1


def input_channel_dim(layer: nn.Module, input_ndim: int) -> int:
    return input_ndim - 1 if isinstance(layer, nn.Linear) else 1


def _output_major(weight: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Weight as ``(groups, out_per_group, in_per_group, kernel)``, whatever the layer's layout."""
    groups = _groups(layer)
    if _is_transposed(layer):  # (in, out/groups, *k)
        in_per_group = weight.shape[0] // groups
        grouped = weight.reshape(groups, in_per_group, weight.shape[1], -1)
        return grouped.transpose(1, 2)
    out_per_group = weight.shape[0] // groups
    return weight.reshape(groups, out_per_group, weight.shape[1], -1)


def range_matrix(layer: nn.Module) -> torch.Tensor:
    """max |w| over the kernel, as ``(groups, out_per_group, in_per_group)``: enough to follow how channel
    ranges change under any per-channel input/output scaling without touching the weights."""
    return _output_major(layer.weight.detach(), layer).abs().amax(dim=3)


def output_channel_ranges(layer: nn.Module) -> torch.Tensor:
    """max |w| per output channel (Nagel et al.'s r^(1))."""
    return range_matrix(layer).amax(dim=2).reshape(-1)


def input_channel_ranges(layer: nn.Module) -> torch.Tensor:
    """max |w| per input channel (Nagel et al.'s r^(2))."""
    return range_matrix(layer).amax(dim=1).reshape(-1)


def _broadcast(factor: torch.Tensor, weight: torch.Tensor, layer: nn.Module, along: str) -> torch.Tensor:
    """Expand a per-channel vector to the weight's shape (``along`` is "output" or "input")."""
    groups = _groups(layer)
    grouped = _output_major(weight, layer)
    per_group = factor.reshape(groups, -1)
    if along == "output":
        expanded = per_group[:, :, None, None].expand_as(grouped)
    else:
        expanded = per_group[:, None, :, None].expand_as(grouped)
    if _is_transposed(layer):
        expanded = expanded.transpose(1, 2)
    return expanded.reshape(weight.shape)


def scale_output_channels(layer: nn.Module, factor: torch.Tensor) -> None:
    """Multiply output channel ``c`` of the layer (weights and bias) by ``factor[c]``, in place."""
    weight = layer.weight
    factor = factor.to(weight.device, torch.float64)
    weight.data = (weight.data.double() * _broadcast(factor, weight.data, layer, "output")).to(weight.dtype)
    if layer.bias is not None:
        layer.bias.data = (layer.bias.data.double() * factor).to(layer.bias.dtype)


def scale_input_channels(layer: nn.Module, factor: torch.Tensor) -> None:
    """Multiply the weights that read input channel ``c`` by ``factor[c]``, in place."""
    weight = layer.weight
    factor = factor.to(weight.device, torch.float64)
    weight.data = (weight.data.double() * _broadcast(factor, weight.data, layer, "input")).to(weight.dtype)


def weights_times_input(weight: torch.Tensor, layer: nn.Module, per_input: torch.Tensor) -> torch.Tensor:
    """Per output channel ``sum_{c,k} weight[o, c, k] * per_input[c]``: the layer's response (bias excluded)
    to an input that is constant per channel, away from padded borders."""
    grouped = _output_major(weight.detach().double(), layer).sum(dim=3)  # (groups, out/g, in/g)
    values = per_input.to(weight.device, torch.float64).reshape(grouped.shape[0], 1, -1)
    return (grouped * values).sum(dim=2).reshape(-1)


def add_to_bias(layer: nn.Module, delta: torch.Tensor) -> None:
    """``bias += delta``; a layer without bias gets one (zeros before the addition)."""
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(num_output_channels(layer), device=layer.weight.device,
                                              dtype=layer.weight.dtype))
    layer.bias.data += delta.to(layer.bias.device, layer.bias.dtype)


def responds_to_constants_exactly(layer: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether an input that is constant per channel gives ``W @ c + b`` at every output position, i.e. the
    layer never sees padded zeros or partial windows (what shifting a constant into its bias assumes).

    Tested on the layer itself rather than inferred from its attributes, so subclasses that pad in forward
    (TensorFlow-style "same" convolutions) are caught."""
    if not input_shape:
        return False
    weight = layer.weight
    channels = num_input_channels(layer)
    constants = torch.linspace(1.0, 2.0, channels, device=weight.device, dtype=weight.dtype)
    shape = [1] * len(input_shape)
    shape[input_channel_dim(layer, len(input_shape))] = channels
    probe = constants.view(shape).expand(1, *input_shape[1:]).contiguous()
    with torch.no_grad():
        output = layer(probe)
    expected = weights_times_input(weight, layer, constants).to(output.dtype)
    if layer.bias is not None:
        expected = expected + layer.bias.detach()
    out_shape = [1] * output.dim()
    out_shape[input_channel_dim(layer, output.dim())] = -1
    return torch.allclose(output, expected.view(out_shape).expand_as(output), rtol=1e-4, atol=1e-5)
