"""torchvision's Swin window attention as quantizable ops.

``ShiftedWindowAttention`` calls ``shifted_window_attention``, a function torchvision hides from fx
(``torch.fx.wrap``) and hands the qkv and projection weights as tensors: the sim could quantize nothing inside it,
and the runtime computed it with its own float kernels. The sim's copy of the model gets a
`QuantizableWindowAttention` in its place, which computes the same function with the same layers (``qkv``,
``proj``) and ops the sim quantizes: ``q · head_dim^-½``, ``q·kᵀ``, ``+ relative position bias``,
``softmax(· + shift mask)`` (the mask of shifted windows added in float inside the softmax, as
`edgequant.sim.ops.masked_softmax` does), ``·v``. Padding to whole windows, the cyclic shift and the partition
into windows (and back) only move values: `window_partition` and `window_merge` / `shifted_window_merge`, one
call each in a traced graph. Whether a block's windows are shifted depends on the feature map's size (torchvision
shifts none along an axis one window covers): it is fixed by the dummy input, and checked on every call.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from edgequant.sim.capture import CallRecord
from edgequant.sim.ops import masked_softmax, qualified_name
from edgequant.sim.quantized_module import FunctionalOp

WINDOW_ATTENTION_CLASS = "torchvision.models.swin_transformer.ShiftedWindowAttention"
"""The module `quantizable_window_attention` replaces (by qualified name: torchvision is not a dependency;
``ShiftedWindowAttentionV2``, with cosine attention, is left as it is)."""


def _padded_size(height: int, width: int, window: list[int]) -> tuple[int, int]:
    return height + (window[0] - height % window[0]) % window[0], width + (window[1] - width % window[1]) % window[1]


def _effective_shift(height: int, width: int, window: list[int], shift: list[int]) -> list[int]:
    """The shift of a ``height × width`` map's windows: none along an axis one window covers (as torchvision)."""
    padded = _padded_size(height, width, window)
    return [0 if window[axis] >= padded[axis] else shift[axis] for axis in range(2)]


def _check_shifted(like: torch.Tensor, window: list[int], shift: list[int], shifted: bool) -> list[int]:
    height, width = like.shape[1:3]
    effective = _effective_shift(height, width, window, shift)
    if (sum(effective) > 0) != shifted:
        raise ValueError(f"the window attention was quantized for maps whose windows are {'' if shifted else 'not '}"
                         f"shifted and gets a {height}×{width} map; build the QuantSim with a dummy_input of the "
                         "size it runs on")
    return effective


def window_partition(x: torch.Tensor, window: list[int], shift: list[int], shifted: bool) -> torch.Tensor:
    """``[B, H, W, C]`` padded with zeros to whole windows, shifted cyclically (``shifted``), as windows
    ``[B·nW, Wh·Ww, C]``."""
    shift = _check_shifted(x, window, shift, shifted)
    batch, height, width, channels = x.shape
    padded_height, padded_width = _padded_size(height, width, window)
    x = F.pad(x, (0, 0, 0, padded_width - width, 0, padded_height - height))
    if shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(batch, padded_height // window[0], window[0], padded_width // window[1], window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], channels)


def _merge(windows: torch.Tensor, like: torch.Tensor, window: list[int], shift: list[int],
           shifted: bool) -> torch.Tensor:
    shift = _check_shifted(like, window, shift, shifted)
    batch, height, width, channels = like.shape
    padded_height, padded_width = _padded_size(height, width, window)
    x = windows.view(batch, padded_height // window[0], padded_width // window[1], window[0], window[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_height, padded_width, channels)
    if shifted:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


def window_merge(windows: torch.Tensor, like: torch.Tensor, window: list[int], shift: list[int]) -> torch.Tensor:
    """`window_partition` of windows that are not shifted undone: ``[B·nW, Wh·Ww, C]`` back to the shape of
    ``like``, ``[B, H, W, C]``."""
    return _merge(windows, like, window, shift, shifted=False)


def shifted_window_merge(windows: torch.Tensor, like: torch.Tensor, window: list[int],
                         shift: list[int]) -> torch.Tensor:
    """`window_merge` of shifted windows: the cyclic shift undone too."""
    return _merge(windows, like, window, shift, shifted=True)


def shift_mask(like: torch.Tensor, windows: torch.Tensor, window: list[int], shift: list[int]) -> torch.Tensor:
    """The additive mask ``[B·nW, 1, Wh·Ww, Wh·Ww]`` of shifted windows: -100 between tokens of regions the shift
    brought together, as torchvision."""
    shift = _check_shifted(like, window, shift, True)
    batch, height, width, _ = like.shape
    padded_height, padded_width = _padded_size(height, width, window)
    num_windows, length = (padded_height // window[0]) * (padded_width // window[1]), window[0] * window[1]
    regions = windows.new_zeros((padded_height, padded_width))
    count = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            regions[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    regions = regions.view(padded_height // window[0], window[0], padded_width // window[1], window[1])
    regions = regions.permute(0, 2, 1, 3).reshape(num_windows, length)
    mask = regions.unsqueeze(1) - regions.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    return mask.unsqueeze(1).repeat(batch, 1, 1, 1)


for _function in (window_partition, window_merge, shifted_window_merge, shift_mask):
    fx.wrap(_function.__name__)  # one call each in a traced graph: the map's size sets their shapes
window_partition.holds_input_values = window_merge.holds_input_values = True  # zeros padded are on every grid
shifted_window_merge.holds_input_values = True
# the export writes Pad (window_partition), Slice and Concat (a shift undone) in there, which ONNX Runtime does not
# move a DQ past: the qkv Linear reading the windows and the residual Add reading shifted windows merged back get a
# float input
window_partition.runtime_reads_float = shifted_window_merge.runtime_reads_float = True
shift_mask.float_by_design = "the shifted windows' mask: added in float inside the softmax (masked_softmax)"


class QuantizableWindowAttention(nn.Module):
    """``ShiftedWindowAttention``'s forward with the ops the sim quantizes (see the module docstring) on maps
    whose windows are ``shifted`` or not."""

    def __init__(self, attention: nn.Module, shifted: bool) -> None:
        super().__init__()
        self.window_size, self.shift_size = list(attention.window_size), list(attention.shift_size)
        self.num_heads, self.shifted = attention.num_heads, shifted
        self.qkv, self.proj = attention.qkv, attention.proj
        self.relative_position_bias_table = attention.relative_position_bias_table
        self.register_buffer("relative_position_index", attention.relative_position_index)
        self.attention_dropout = nn.Dropout(attention.attention_dropout)
        self.dropout = nn.Dropout(attention.dropout)
        self.scale = FunctionalOp(torch.mul, "Mul")
        self.scores = FunctionalOp(torch.matmul, "MatMul")
        self.add_position_bias = FunctionalOp(torch.add, "Add")
        self.softmax = FunctionalOp(masked_softmax if shifted else torch.softmax, "Softmax")
        self.context = FunctionalOp(torch.matmul, "MatMul")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window, shift = self.window_size, self.shift_size
        windows = window_partition(x, window, shift, self.shifted)
        length, channels = window[0] * window[1], self.qkv.in_features
        head_dim = channels // self.num_heads
        qkv = self.qkv(windows).reshape(-1, length, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = self.scores(self.scale(q, head_dim ** -0.5), k.transpose(-2, -1))
        bias = self.relative_position_bias_table[self.relative_position_index]
        scores = self.add_position_bias(scores, bias.view(length, length, -1).permute(2, 0, 1).contiguous()[None])
        if self.shifted:
            probabilities = self.softmax(scores, shift_mask(x, windows, window, shift))
        else:
            probabilities = self.softmax(scores, -1)
        context = self.context(self.attention_dropout(probabilities), v).transpose(1, 2).reshape(-1, length, channels)
        merge = shifted_window_merge if self.shifted else window_merge
        return merge(self.dropout(self.proj(context)), x, window, shift)


def quantizable_window_attention(model: nn.Module, records: dict[str, CallRecord]) -> list[str]:
    """Put a `QuantizableWindowAttention` in place of every torchvision ``ShiftedWindowAttention`` inside ``model``
    that ran in ``records`` (the model's calls on the dummy input, by module name: the map's size there says
    whether its windows are shifted); returns their names."""
    replaced = []
    for name, module in list(model.named_modules()):
        record = records.get(name)
        if not name or qualified_name(type(module)) != WINDOW_ATTENTION_CLASS or record is None or not record.args:
            continue
        height, width = record.args[0].shape[1:3]
        shifted = sum(_effective_shift(height, width, module.window_size, module.shift_size)) > 0
        replacement = QuantizableWindowAttention(module, shifted)
        replacement.train(module.training)
        model.set_submodule(name, replacement)
        replaced.append(name)
    return replaced
