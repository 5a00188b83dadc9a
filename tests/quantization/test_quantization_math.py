"""Quantizer math against hand-computed values and against ONNX Runtime's QuantizeLinear/DequantizeLinear."""

import numpy as np
import pytest
import torch
from references import ort_qdq

from edgequant.quantization import Encoding, PerChannel, Quantizer, quantize, quantize_dequantize


def test_hand_computed_asymmetric_grid():
    encoding = Encoding.from_range(-1.0, 3.0, bitwidth=2, symmetric=False)
    # range 4 over 3 steps: scale 4/3, offset round(-1 / (4/3)) = round(-0.75) = -1
    assert encoding.scale.item() == pytest.approx(4 / 3)
    assert encoding.offset.item() == -1
    x = torch.tensor([-5.0, -0.7, 0.0, 0.66, 0.67, 2.0, 9.0])
    expected_q = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 3.0, 3.0])  # round(x/s) - offset, clamped to [0, 3]
    assert torch.equal(quantize(x, encoding.scale, encoding.offset, 2), expected_q)
    assert torch.allclose(quantize_dequantize(x, encoding.scale, encoding.offset, 2), (expected_q - 1) * 4 / 3)


def test_round_half_to_even_and_saturation():
    encoding = Encoding(torch.tensor(1.0), torch.tensor(-128.0), 8, True)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.5, 300.0, -300.0])
    expected = torch.tensor([0.0, 2.0, 2.0, -0.0, -2.0, 126.0, 127.0, 127.0, -128.0])
    assert torch.equal(quantize_dequantize(x, encoding.scale, encoding.offset, 8), expected)


def test_symmetric_encoding_matches_aimet_convention():
    # AIMET: scale = max|x| / 127, offset = -128 for 8-bit symmetric (see shared fixtures)
    encoding = Encoding.from_range(-0.5, 1.27, bitwidth=8, symmetric=True)
    assert encoding.scale.item() == pytest.approx(0.01)
    assert encoding.offset.item() == -128
    assert encoding.onnx_zero_point.item() == 0
    assert encoding.min.item() == pytest.approx(-1.28)
    assert encoding.max.item() == pytest.approx(1.27)


def test_zero_range_never_gives_zero_scale():
    for symmetric in (True, False):
        encoding = Encoding.from_range(0.0, 0.0, 8, symmetric)
        assert encoding.scale.item() > 0
        out = quantize_dequantize(torch.zeros(4), encoding.scale, encoding.offset, 8)
        assert torch.equal(out, torch.zeros(4))


@pytest.mark.parametrize("bitwidth", [4, 8, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_bit_exact_with_onnxruntime(bitwidth, symmetric):
    torch.manual_seed(bitwidth + symmetric)
    x = torch.randn(32, 16, 7, 7) * 4 + 1
    encoding = Encoding.from_range(x.min() * 0.8, x.max() * 0.8, bitwidth, symmetric)
    ours = quantize_dequantize(x, encoding.scale, encoding.offset, bitwidth)
    np.testing.assert_array_equal(ours.numpy(), ort_qdq(x, encoding))


@pytest.mark.parametrize("axis", [0, 1, 3])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_bit_exact_with_onnxruntime(axis, symmetric):
    torch.manual_seed(axis)
    x = torch.randn(6, 5, 4, 3) * torch.linspace(0.1, 10, 3)
    dims = [d for d in range(4) if d != axis]
    encoding = Encoding.from_range(x.amin(dims), x.amax(dims), 8, symmetric, granularity=axis)
    shape = [1, 1, 1, 1]
    shape[axis] = -1
    ours = quantize_dequantize(x, encoding.scale.view(shape), encoding.offset.view(shape), 8)
    np.testing.assert_array_equal(ours.numpy(), ort_qdq(x, encoding))


def test_straight_through_gradient_is_masked_outside_range():
    quantizer = Quantizer(bitwidth=8, symmetric=False)
    quantizer.set_encoding(Encoding.from_range(-1.0, 1.0, 8, False))
    x = torch.tensor([-2.0, -0.5, 0.3, 0.99, 1.5], requires_grad=True)
    quantizer(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_range_learning_gradients_follow_lsq():
    quantizer = Quantizer(bitwidth=4, symmetric=False)
    quantizer.set_encoding(Encoding(torch.tensor(0.5), torch.tensor(-4.0), 4, False))
    quantizer.enable_range_learning()
    x = torch.tensor([0.3, -3.0, 9.0])  # inside, clipped low (q_min=-2.0), clipped high (q_max=5.5)
    quantizer(x).sum().backward()
    # d/ds: inside round(x/s) - x/s = 1 - 0.6; low: offset = -4; high: offset + 15 = 11
    assert quantizer.scale.grad.item() == pytest.approx((1 - 0.6) - 4 + 11)
    # d/d offset: s for each clipped element
    assert quantizer.offset.grad.item() == pytest.approx(1.0)


def test_per_channel_quantizer_gradients_by_hand():
    # 4-bit symmetric, one scale per output channel: integers in [-8, 7], channel 0 on steps of 0.5, channel 1 of 0.25
    quantizer = Quantizer(bitwidth=4, symmetric=True, granularity=PerChannel(0))
    quantizer.set_encoding(Encoding(torch.tensor([0.5, 0.25]), torch.tensor([-8.0, -8.0]), 4, True, PerChannel(0)))
    quantizer.enable_range_learning()
    weight = torch.tensor([[0.3, -5.0, 4.0], [0.6, -0.1, 1.0]]).view(2, 3, 1, 1).requires_grad_()
    upstream = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).view(2, 3, 1, 1)
    out = quantizer(weight)
    assert out.flatten(1).tolist() == [[0.5, -4.0, 3.5], [0.5, 0.0, 1.0]]
    (out * upstream).sum().backward()
    # channel 0: 0.3/0.5 = 0.6 rounds to 1 (d/ds = 1 - 0.6), -5/0.5 = -10 clips to -8 (d/ds = -8), 4/0.5 = 8 clips
    # to 7 (d/ds = 7): 1 * 0.4 + 2 * -8 + 3 * 7. Channel 1: 2.4 -> 2 (-0.4), -0.4 -> 0 (0.4), 4 -> 4 (0), none clips.
    torch.testing.assert_close(quantizer.scale.grad, torch.tensor([0.4 - 16 + 21, 4 * -0.4 + 5 * 0.4 + 0.0]),
                               rtol=0, atol=1e-5)
    # d/d offset: the step s of each clipped value (channel 0: two of them, upstream 2 and 3)
    torch.testing.assert_close(quantizer.offset.grad, torch.tensor([(2 + 3) * 0.5, 0.0]), rtol=0, atol=0)
    # straight through inside the grid, zero where clipped
    assert weight.grad.flatten(1).tolist() == [[1.0, 0.0, 0.0], [4.0, 5.0, 6.0]]


def test_quantizer_without_encoding_explains_what_to_do():
    quantizer = Quantizer(role="output", owner="conv1", key="0")
    with pytest.raises(RuntimeError, match="conv1.output_quantizers.0.*compute_encodings"):
        quantizer(torch.ones(2))
