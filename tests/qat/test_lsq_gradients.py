"""LSQ/LSQ+ gradients of the fake quantizer vs finite differences of their straight-through surrogate, and the
LSQ gradient scale applied by range learning."""

import math

import pytest
import torch

from edgequant.qat.lsq import has_unsigned_grid, learn_range, lsq_grad_scale, values_per_scale
from edgequant.quantization import Encoding, PerChannel, Quantizer
from edgequant.quantization.affine import quantize_dequantize


def _surrogate(x, scale, offset, num_steps, residual):
    """Quantize-dequantize with the rounding residual frozen: its exact derivative is what STE/LSQ define."""
    return scale * torch.clamp(x / scale + residual, offset, offset + num_steps)


@pytest.mark.parametrize("axis", [None, 0])
def test_gradients_match_finite_differences_of_the_ste_surrogate(axis):
    generator = torch.Generator().manual_seed(0)
    # grid points k (never the grid's ends -5 and 10, where the surrogate has a kink) plus noise below half a step
    steps = torch.tensor([-8, -7, -4, -1, 0, 3, 9, 11, 12, 2, -3, 5] * 2, dtype=torch.float64).reshape(4, 6)
    x = 0.21 * (steps + (torch.rand(4, 6, generator=generator, dtype=torch.float64) - 0.5) * 0.8)
    weights = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    shape = (4, 1) if axis == 0 else ()
    scale = torch.full(shape, 0.21, dtype=torch.float64, requires_grad=True)
    offset = torch.full(shape, -5.0, dtype=torch.float64, requires_grad=True)
    x_var = x.clone().requires_grad_(True)
    bitwidth, num_steps = 4, 15
    (quantize_dequantize(x_var, scale, offset, bitwidth) * weights).sum().backward()
    assert ((x / 0.21).round() < -5).any() and ((x / 0.21).round() > 10).any()  # both clipping sides exercised

    residual = ((x / scale.detach()).round() - x / scale.detach())
    def loss(x_, s_, o_):
        return float((_surrogate(x_, s_, o_, num_steps, residual) * weights).sum())

    eps = 1e-6
    for index in range(scale.numel()):
        bump = torch.zeros_like(scale).reshape(-1)
        bump[index] = eps
        bump = bump.reshape(shape)
        s, o = scale.detach(), offset.detach()
        numeric_scale = (loss(x, s + bump, o) - loss(x, s - bump, o)) / (2 * eps)
        numeric_offset = (loss(x, s, o + bump) - loss(x, s, o - bump)) / (2 * eps)
        assert scale.grad.reshape(-1)[index].item() == pytest.approx(numeric_scale, rel=1e-6, abs=1e-8)
        assert offset.grad.reshape(-1)[index].item() == pytest.approx(numeric_offset, rel=1e-6, abs=1e-8)
    in_range = ((x / 0.21).round() >= -5) & ((x / 0.21).round() <= 10)
    assert torch.equal(x_var.grad, weights * in_range)  # STE: passed inside the range, zero where clipped


def test_lsq_grad_scale_is_one_over_sqrt_n_qp():
    assert lsq_grad_scale(288, 4, True) == pytest.approx(1 / math.sqrt(288 * 7))
    assert lsq_grad_scale(100, 8, False) == pytest.approx(1 / math.sqrt(100 * 255))
    weight_quantizer = Quantizer(4, True, granularity=PerChannel(0), role="param")
    assert values_per_scale(weight_quantizer, torch.Size([16, 8, 3, 3]), batched=False) == 72
    activation = Quantizer(4, False, role="output")
    assert values_per_scale(activation, torch.Size([2, 8, 4, 4]), batched=True) == 128


def test_lsq_grad_scale_counts_the_whole_grid_of_an_unsigned_symmetric_quantizer():
    # 8 bits, 64 values per scale: signed symmetric levels -128..127 (strict: -127..127) have Qp = 127; the unsigned
    # symmetric grid 0..255 (offset 0) has Qp = 255, as an asymmetric one does
    assert lsq_grad_scale(64, 8, True) == pytest.approx(1 / math.sqrt(64 * 127))
    assert lsq_grad_scale(64, 8, True, unsigned=True) == pytest.approx(1 / math.sqrt(64 * 255))
    assert lsq_grad_scale(64, 8, True, unsigned=True) == pytest.approx(lsq_grad_scale(64, 8, False))
    non_negative, signed = torch.linspace(0, 3, 64), torch.linspace(-1, 3, 64)
    unsigned = Quantizer(8, True, role="output", unsigned_symmetric=True)
    unsigned.encode_from(non_negative)
    assert unsigned.offset.item() == 0 and has_unsigned_grid(unsigned)
    unsigned.encode_from(signed)
    assert unsigned.offset.item() == -128 and not has_unsigned_grid(unsigned)
    strict = Quantizer(8, True, role="output", strict_symmetric=True)
    strict.encode_from(non_negative)
    assert strict.offset.item() == -127 and not has_unsigned_grid(strict)
    asymmetric = Quantizer(8, False, role="output")
    asymmetric.encode_from(non_negative)
    assert asymmetric.offset.item() == 0 and not has_unsigned_grid(asymmetric)  # Qp from symmetric=False already
    mixed = Quantizer(8, True, granularity=PerChannel(0), role="param", unsigned_symmetric=True)
    mixed.encode_from(torch.stack([non_negative, signed]))
    assert mixed.offset.flatten().tolist() == [0, -128] and not has_unsigned_grid(mixed)


def test_range_learning_scales_the_gradients_by_g():
    quantizer = Quantizer(4, False, role="output")
    quantizer.set_encoding(Encoding.from_range(-1.0, 2.0, 4, False))
    x = torch.linspace(-3, 3, 50)
    quantizer.enable_range_learning()
    quantizer(x).pow(2).sum().backward()
    plain_scale, plain_offset = quantizer.scale.grad.clone(), quantizer.offset.grad.clone()
    quantizer.scale.grad = quantizer.offset.grad = None
    learned, _ = learn_range(quantizer, grad_scale=0.125)
    quantizer(x).pow(2).sum().backward()
    assert learned.learns_offset
    torch.testing.assert_close(quantizer.scale.grad, plain_scale * 0.125)
    torch.testing.assert_close(quantizer.offset.grad, plain_offset * 0.125)
