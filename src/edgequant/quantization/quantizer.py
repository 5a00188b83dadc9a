"""`Quantizer`: the one module the simulation inserts wherever the hardware quantizes a tensor.

It has three modes, chosen by plain attributes so other features plug in without subclassing:

* ``calibrating``: observe the tensor with the encoding analyzer and pass it through in float;
* ``enabled`` with an encoding: fake-quantize (STE/LSQ gradients, see `affine`);
* disabled: identity (used by analysis to isolate one layer, or for ops the config leaves in float).

``scale``/``offset`` are buffers; `enable_range_learning` turns them into parameters for QAT with range
learning. ``frozen`` encodings are not recomputed by calibration (AdaRound, loaded or edited encodings).
"""

from __future__ import annotations

import torch
from torch import nn

from edgequant.quantization.affine import quantize_dequantize
from edgequant.quantization.analyzers import CalibrationError, EncodingAnalyzer, make_analyzer
from edgequant.quantization.encoding import Encoding, broadcast_shape


class Quantizer(nn.Module):
    def __init__(
        self,
        bitwidth: int = 8,
        symmetric: bool = False,
        axis: int | None = None,
        scheme: str = "minmax",
        for_params: bool = False,
        min_constraint: float | None = None,
        max_constraint: float | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        if not 2 <= bitwidth <= 16:
            raise ValueError(f"quantizer {name or '?'}: bitwidth {bitwidth} is outside the supported range 2..16")
        self.bitwidth = bitwidth
        self.symmetric = symmetric
        self.axis = axis
        self.min_constraint = min_constraint
        self.max_constraint = max_constraint
        self.name = name
        self.enabled = True
        self.frozen = False
        self.reuse_input_memory = False  # set by the sim for op outputs, which nothing else holds
        self.calibrating = False
        self.analyzer: EncodingAnalyzer = make_analyzer(scheme, axis, for_params)
        self.register_buffer("scale", None)
        self.register_buffer("offset", None)

    def extra_repr(self) -> str:
        granularity = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        state = "enabled" if self.enabled else "disabled"
        return f"bw={self.bitwidth}, {'sym' if self.symmetric else 'asym'}, {granularity}, {state}"

    # -- encodings ---------------------------------------------------------------------------------------
    @property
    def encoding(self) -> Encoding | None:
        if self.scale is None:
            return None
        return Encoding(self.scale, self.offset, self.bitwidth, self.symmetric, self.axis)

    def set_encoding(self, encoding: Encoding | None) -> None:
        """Install an encoding (its bitwidth/symmetry/axis become this quantizer's)."""
        if encoding is None:
            self.scale = self.offset = None
            return
        self.bitwidth, self.symmetric, self.axis = encoding.bitwidth, encoding.symmetric, encoding.axis
        device = self.scale.device if self.scale is not None else encoding.scale.device
        scale, offset = encoding.scale.to(device), encoding.offset.to(device)
        if isinstance(self.scale, nn.Parameter):
            with torch.no_grad():
                self.scale = nn.Parameter(scale)
                self.offset = nn.Parameter(offset)
        else:
            self.scale, self.offset = scale, offset

    def compute_encoding(self) -> Encoding:
        """Turn the analyzer's statistics into an encoding, honouring the config's range constraints."""
        try:
            low, high = self.analyzer.compute_range(self.bitwidth, self.symmetric)
        except CalibrationError as error:
            raise CalibrationError(
                f"quantizer '{self.name}': {error}. Check that the calibration data reaches this layer "
                "and contains finite values, or disable this quantizer."
            ) from None
        if self.min_constraint is not None and self.max_constraint is not None:
            # a fixed output range (e.g. Softmax in [0, 1]) that the hardware kernel assumes
            low, high = torch.full_like(low, self.min_constraint), torch.full_like(high, self.max_constraint)
        elif self.min_constraint is not None:  # data wholly below the bound: an empty range at the bound
            low = low.clamp_min(self.min_constraint)
            high = torch.maximum(high, low)
        elif self.max_constraint is not None:
            high = high.clamp_max(self.max_constraint)
            low = torch.minimum(low, high)
        if self.axis is None:
            low, high = low.reshape(()), high.reshape(())
        encoding = Encoding.from_range(low, high, self.bitwidth, self.symmetric, self.axis)
        self.set_encoding(encoding)
        return encoding

    def enable_range_learning(self) -> None:
        """Make scale and offset trainable (QAT with range learning, LSQ gradients)."""
        if self.scale is None:
            raise RuntimeError(f"quantizer '{self.name}' has no encoding to learn; calibrate first")
        scale, offset = self.scale.detach(), self.offset.detach()
        del self.scale, self.offset
        self.scale = nn.Parameter(scale)
        self.offset = nn.Parameter(offset)

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.analyzer.observe(x)
            return x
        if not self.enabled or not x.is_floating_point():  # integer tensors (indices, masks) are not data
            return x
        if self.scale is None:
            raise RuntimeError(
                f"quantizer '{self.name}' has no encoding: call sim.compute_encodings(...) or sim.calibrate(...) "
                "first, or disable it."
            )
        inplace = self.reuse_input_memory and not torch.is_grad_enabled() and (
            torch.is_inference_mode_enabled() or not x.is_inference()
        )
        if self.axis is None:
            return quantize_dequantize(x, self.scale, self.offset, self.bitwidth, inplace)
        shape = broadcast_shape(x.dim(), self.axis)
        return quantize_dequantize(x, self.scale.view(shape), self.offset.view(shape), self.bitwidth, inplace)
