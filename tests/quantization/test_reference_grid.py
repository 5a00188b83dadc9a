"""The affine grid against independent references: hand-computed encodings, numpy in float64, and ONNX Runtime.

Ties are built exactly: scales are powers of two, so ``(k + 0.5) * scale`` and its division by the scale are
exact in float32 and every tie reaches the rounding step as an exact ``.5``. The autograd path (any forward
with ``requires_grad``, every QAT step) must give the same bits as the no-grad path and as ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from references import ort_qdq

from edgequant.quantization import Encoding, PerChannel, dequantize, quantize, quantize_dequantize
from edgequant.quantization.affine import _QuantDequant
from edgequant.quantization.encoding import MIN_RANGE

F32 = np.float32


def numpy_qdq(x: torch.Tensor, scale: np.ndarray, offset: np.ndarray, bitwidth: int) -> np.ndarray:
    """The documented grid in float64 numpy (np.round rounds half to even)."""
    values = x.double().numpy()
    q = np.clip(np.round(values / scale) - offset, 0, 2**bitwidth - 1)
    return ((q + offset) * scale).astype(np.float32)


def ties(scale: float, low_step: int, high_step: int) -> torch.Tensor:
    """Every exact tie ``(k + 0.5) * scale`` for k in [low_step, high_step), both signs of k included."""
    return (torch.arange(low_step, high_step, dtype=torch.float32) + 0.5) * scale


ENCODINGS = {
    "asym8": Encoding(torch.tensor(0.25), torch.tensor(-100.0), 8, False),
    "sym8": Encoding(torch.tensor(2.0**-6), torch.tensor(-128.0), 8, True),
    "asym4": Encoding(torch.tensor(0.5), torch.tensor(-3.0), 4, False),
    "sym16": Encoding(torch.tensor(2.0**-10), torch.tensor(-32768.0), 16, True),
}


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_autograd_path_is_bit_identical_to_no_grad_numpy_and_onnxruntime_on_exact_ties(name: str) -> None:
    encoding = ENCODINGS[name]
    low, high = int(encoding.offset) - 3, int(encoding.offset) + encoding.num_steps + 3  # past both ends
    x = torch.cat([ties(float(encoding.scale), low, high), torch.tensor([0.0, 1e9, -1e9])])
    assert bool(((x[:-3] / encoding.scale) % 1 == 0.5).all())  # exact ties
    with torch.no_grad():
        no_grad = quantize_dequantize(x.clone(), encoding.scale, encoding.offset, encoding.bitwidth)
    with_input_grad = quantize_dequantize(x.clone().requires_grad_(), encoding.scale, encoding.offset,
                                          encoding.bitwidth)
    learned_scale = encoding.scale.clone().requires_grad_()
    learned_offset = encoding.offset.clone().requires_grad_()
    with_range_learning = quantize_dequantize(x.clone(), learned_scale, learned_offset, encoding.bitwidth)
    assert with_input_grad.grad_fn is not None and with_range_learning.grad_fn is not None
    expected = numpy_qdq(x, float(encoding.scale), float(encoding.offset), encoding.bitwidth)
    np.testing.assert_array_equal(no_grad.numpy(), expected)
    np.testing.assert_array_equal(with_input_grad.detach().numpy(), expected)
    np.testing.assert_array_equal(with_range_learning.detach().numpy(), expected)
    if encoding.bitwidth in (4, 8, 16):
        np.testing.assert_array_equal(expected, ort_qdq(x, encoding))
    # half to even, hand-checked on the first ties inside the grid: k + 0.5 -> the even one of k, k + 1
    steps = (torch.from_numpy(expected) / encoding.scale)[3:9]
    first = int(encoding.offset)
    assert steps.tolist() == [m if m % 2 == 0 else m + 1 for m in range(first, first + 6)]


def test_per_channel_autograd_ties_match_onnxruntime() -> None:
    scale = torch.tensor([0.5, 0.25, 0.125])
    encoding = Encoding(scale, torch.tensor([-128.0, -128.0, -128.0]), 8, True, granularity=PerChannel(1))
    x = torch.stack([ties(float(s), -130, 130) for s in scale], dim=1)  # (260, 3): channel c on its own grid
    shape = (1, -1)  # channels on axis 1
    with torch.no_grad():
        no_grad = quantize_dequantize(x.clone(), encoding.scale.view(shape), encoding.offset.view(shape), 8)
    learned = encoding.scale.view(shape).clone().requires_grad_()
    with_grad = quantize_dequantize(x.clone().requires_grad_(), learned, encoding.offset.view(shape), 8)
    reference = ort_qdq(x, encoding)
    np.testing.assert_array_equal(no_grad.numpy(), reference)
    np.testing.assert_array_equal(with_grad.detach().numpy(), reference)


def test_in_place_and_tensor_bound_paths_agree_with_the_reference() -> None:
    encoding = ENCODINGS["asym8"]
    x = torch.cat([ties(0.25, -105, 160), torch.tensor([-1e6, 1e6])])
    expected = numpy_qdq(x, 0.25, -100.0, 8)
    buffer = x.clone()
    with torch.no_grad():
        result = quantize_dequantize(buffer, encoding.scale, encoding.offset, 8, inplace=True)
        per_channel = quantize_dequantize(x.view(-1, 1), encoding.scale.view(1), encoding.offset.view(1), 8)
    assert result.data_ptr() == buffer.data_ptr()
    np.testing.assert_array_equal(buffer.numpy(), expected)
    np.testing.assert_array_equal(per_channel.view(-1).numpy(), expected)
    untouched = x.clone()
    quantize_dequantize(untouched, encoding.scale, encoding.offset, 8)
    assert torch.equal(untouched, x)  # not in place unless asked


def test_quantize_and_dequantize_by_hand() -> None:
    scale, offset = torch.tensor(0.5), torch.tensor(-4.0)
    x = torch.tensor([-9.0, -2.0, -1.75, 0.0, 0.75, 1.25, 5.5, 9.0])
    # x / 0.5 = [-18, -4, -3.5, 0, 1.5, 2.5, 11, 18] -> round: [-18, -4, -4, 0, 2, 2, 11, 18]; + 4, clamp [0, 15]
    q = quantize(x, scale, offset, 4)
    assert q.tolist() == [0.0, 0.0, 0.0, 4.0, 6.0, 6.0, 15.0, 15.0]
    assert dequantize(q, scale, offset).tolist() == [-2.0, -2.0, -2.0, 0.0, 1.0, 1.0, 5.5, 5.5]
    assert dequantize(torch.tensor([0.0, 7.0]), torch.tensor(3.0), torch.tensor(-2.0)).tolist() == [-6.0, 15.0]


def test_learned_offset_is_rounded_with_a_straight_through_gradient() -> None:
    x = torch.tensor([-3.0, -0.2, 0.4, 30.0])
    scale = torch.tensor(1.0, requires_grad=True)
    offset = torch.tensor(-2.4, requires_grad=True)  # acts as -2: grid [-2, 1] at 2 bits
    out = quantize_dequantize(x, scale, offset, 2)
    assert out.tolist() == [-2.0, 0.0, 0.0, 1.0]
    out.sum().backward()
    # LSQ: d/d offset = scale for each clipped element (2 of them), straight through the rounding
    assert offset.grad.item() == 2.0
    # d/d scale: clipped low -> offset (-2), inside -> round(x/s) - x/s, clipped high -> offset + 3 (1)
    assert scale.grad.item() == pytest.approx(-2 + (0 + 0.2) + (0 - 0.4) + 1, abs=2**-20)


def test_per_channel_gradients_by_hand() -> None:
    x = torch.tensor([[0.3, -5.0], [2.6, 0.9], [-0.1, 7.0]], requires_grad=True)  # channels on axis 1
    scale = torch.tensor([[1.0, 0.5]], requires_grad=True)
    offset = torch.tensor([[-2.0, -4.0]], requires_grad=True)
    out = _QuantDequant.apply(x, scale, offset, 3)  # grids: [-2, 1] and [-2.0, -0.5] in steps of 0.5
    assert out.tolist() == [[0.0, -2.0], [1.0, -0.5], [-0.0, -0.5]]
    out.sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]]
    # channel 0: inside 0.3 -> 0 - 0.3, clipped high 2.6 -> 1, inside -0.1 -> 0 + 0.1; channel 1: -4, -1, -1
    torch.testing.assert_close(scale.grad, torch.tensor([[-0.3 + 1 + 0.1, -4.0 - 1 - 1]]), rtol=0, atol=2**-20)
    assert offset.grad.tolist() == [[1.0, 1.5]]  # scale per clipped element
    assert scale.grad.shape == scale.shape and offset.grad.shape == offset.shape


def test_gradient_reduced_to_a_lower_rank_parameter() -> None:
    x = torch.tensor([[[0.25, 0.75]], [[1.25, 9.0]]], requires_grad=True)  # (2, 1, 2)
    scale = torch.tensor([0.5, 0.5], requires_grad=True)  # per last-axis channel, rank 1
    offset = torch.tensor([0.0, 0.0])
    _QuantDequant.apply(x, scale, offset, 3).sum().backward()
    # x / s = [[0.5, 1.5], [2.5, 18]] -> rounded [0, 2], [2, 18 -> 3 clipped]; grad: round(x/s) - x/s or 3
    assert scale.grad.tolist() == [(0 - 0.5) + (2 - 2.5), (2 - 1.5) + 3.0]
    assert x.grad.tolist() == [[[1.0, 1.0]], [[1.0, 0.0]]]


# -- Encoding ---------------------------------------------------------------------------------------------
def test_from_range_by_hand() -> None:
    symmetric = Encoding.from_range(-0.7, 0.35, 4, True)  # abs max 0.7 over 7 steps each side
    assert symmetric.scale.item() == F32(F32(0.7) / 7) and symmetric.offset.item() == -8
    positive = Encoding.from_range(2.0, 5.1, 8, False)  # min raised to 0 so that zero is exact
    assert positive.scale.item() == F32(F32(5.1) / 255) and positive.offset.item() == 0
    negative = Encoding.from_range(-5.1, -1.0, 8, False)  # max lowered to 0
    assert negative.scale.item() == F32(F32(5.1) / 255) and negative.offset.item() == -255
    skewed = Encoding.from_range(-1.0, 3.0, 8, False)  # offset = round(-1 / (4/255)) = round(-63.75) = -64
    assert skewed.scale.item() == F32(F32(4.0) / 255) and skewed.offset.item() == -64
    assert skewed.min.item() == F32(-64 * skewed.scale.item())
    assert skewed.max.item() == F32(191 * skewed.scale.item())
    # channel 0: range 255/64 gives the exact scale 1/64 and offset -64; channel 1: offset 0
    per_channel = Encoding.from_range(torch.tensor([-1.0, 0.0]), torch.tensor([2.984375, 2.55]), 8, False,
                                      PerChannel(0))
    assert per_channel.axis == 0 and per_channel.offset.tolist() == [-64.0, 0.0]
    assert per_channel.scale.tolist() == [1 / 64, F32(F32(2.55) / 255)]


def test_narrow_ranges_are_widened_to_min_range() -> None:
    assert Encoding.from_range(0.0, 0.0, 8, False).scale.item() == F32(F32(MIN_RANGE) / 255)
    assert Encoding.from_range(0.0, 0.0, 8, True).scale.item() == F32(F32(MIN_RANGE) / 127)
    assert Encoding.from_range(-1e-7, 0.0, 8, True).scale.item() == F32(F32(MIN_RANGE) / 127)
    tiny = Encoding.from_range(-2e-6, 0.0, 8, False)  # max raised to min + MIN_RANGE
    assert tiny.scale.item() == F32((F32(-2e-6) + F32(MIN_RANGE) - F32(-2e-6)) / 255)
    wide_enough = Encoding.from_range(-2e-5, 0.0, 8, False)
    assert wide_enough.scale.item() == F32(F32(2e-5) / 255)


@pytest.mark.parametrize("bitwidth, symmetric, offset, zero_point", [
    (8, False, -100.0, 100), (8, True, -128.0, 0), (4, True, -8.0, 0), (16, False, 0.0, 0),
    # a symmetric flag on a grid that is not the signed one exports unsigned, zero point -offset: [-127, 128] is
    # uint8 q - 127 (an int8 zero point could not hold it), [0, 255] (unsigned symmetric) uint8 with zero point 0
    (8, True, -127.0, 127), (8, True, 0.0, 0),
])
def test_onnx_zero_point_min_and_max(bitwidth: int, symmetric: bool, offset: float, zero_point: int) -> None:
    encoding = Encoding(torch.tensor(0.5), torch.tensor(offset), bitwidth, symmetric)
    assert encoding.onnx_zero_point.item() == zero_point
    assert encoding.num_steps == 2**bitwidth - 1
    assert encoding.min.item() == offset * 0.5
    assert encoding.max.item() == (offset + 2**bitwidth - 1) * 0.5


def test_encoding_validation_names_the_problem() -> None:
    for bitwidth in (2, 32):
        assert Encoding(1.0, 0.0, bitwidth, False).bitwidth == bitwidth
    for bitwidth in (1, 33):
        with pytest.raises(ValueError, match=f"encoding bitwidth={bitwidth} is not supported; use an integer from 2"):
            Encoding(1.0, 0.0, bitwidth, False)
    for bad_scale in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale must be finite and > 0"):
            Encoding(bad_scale, 0.0, 8, False)
    with pytest.raises(ValueError, match=r"scale shape \(2,\) != offset shape \(\)"):
        Encoding(torch.ones(2), 0.0, 8, False)
    assert Encoding(1.0, -3.4, 8, False).offset.item() == -3.0  # offsets are integers
    assert Encoding(1.0, -3.6, 8, False).offset.dtype == torch.float32


def test_encoding_dict_round_trip_equality_and_device() -> None:
    encoding = Encoding(torch.tensor([0.5, 0.25]), torch.tensor([-3.0, -8.0]), 4, False, granularity=PerChannel(1))
    as_dict = encoding.to_dict()
    assert as_dict == {"scale": [0.5, 0.25], "offset": [-3.0, -8.0], "bitwidth": 4, "symmetric": False, "axis": 1,
                       "granularity": {"kind": "per_channel", "axis": 1}, "strict_symmetric": False}
    again = Encoding.from_dict(as_dict)
    assert again.equals(encoding) and encoding.equals(again)
    older = {k: v for k, v in as_dict.items() if k != "granularity"}  # the form with "axis" only
    assert Encoding.from_dict(older).equals(encoding)
    assert Encoding.from_dict({k: v for k, v in older.items() if k != "axis"}).axis is None
    assert encoding.to("cpu").equals(encoding)
    scale, offset = encoding.broadcast_to((4, 2, 5))
    assert scale.shape == offset.shape == (1, 2, 1) and scale.reshape(-1).tolist() == [0.5, 0.25]
    variants = [
        Encoding(torch.tensor([0.5, 0.5]), encoding.offset, 4, False, granularity=PerChannel(1)),
        Encoding(encoding.scale, torch.tensor([-3.0, -7.0]), 4, False, granularity=PerChannel(1)),
        Encoding(encoding.scale, encoding.offset, 5, False, granularity=PerChannel(1)),
        Encoding(encoding.scale, encoding.offset, 4, True, granularity=PerChannel(1)),
        Encoding(encoding.scale, encoding.offset, 4, False, granularity=PerChannel(0)),
    ]
    assert not any(encoding.equals(v) for v in variants)


def test_elementwise_scale_gradient_keeps_its_shape() -> None:
    x = torch.tensor([0.3, 5.0, -0.6], requires_grad=True)
    scale = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)  # one scale per element: nothing to reduce
    quantize_dequantize(x, scale, torch.tensor(-2.0), 2).sum().backward()
    # x / s = [0.3, 2.5, -1.2] -> rounded [0, 2, -1]; grid [-2, 1]: 2 clips to 1
    assert scale.grad.tolist() == pytest.approx([0 - 0.3, 1.0, -1 + 1.2])


def test_only_the_scale_learned_takes_the_autograd_path() -> None:
    x = torch.tensor([0.3, 9.0, -0.6])
    scale = torch.tensor(0.5, requires_grad=True)
    out = quantize_dequantize(x, scale, torch.tensor(-4.0), 3)  # offset is a plain buffer
    assert out.grad_fn is not None
    out.sum().backward()
    # x / s = [0.6, 18, -1.2] -> [1, 18 -> clipped at offset + 7 = 3, -1]
    assert scale.grad.item() == pytest.approx((1 - 0.6) + 3 + (-1 + 1.2))


def test_in_place_without_no_grad_when_nothing_needs_a_gradient() -> None:
    x = ties(0.25, -20, 20)
    expected = numpy_qdq(x, 0.25, -100.0, 8)
    buffer = x.clone()
    result = quantize_dequantize(buffer, torch.tensor(0.25), torch.tensor(-100.0), 8, inplace=True)
    assert torch.is_grad_enabled() and result.data_ptr() == buffer.data_ptr()
    np.testing.assert_array_equal(buffer.numpy(), expected)


def test_encoding_stores_float32_whatever_it_is_given() -> None:
    encoding = Encoding(torch.tensor(0.1, dtype=torch.float64), torch.tensor(-3), 8, False)
    assert encoding.scale.dtype == torch.float32 and encoding.offset.dtype == torch.float32
    assert encoding.scale.item() == F32(0.1) and encoding.offset.item() == -3.0
    # float64 bounds are rounded to float32 first, so the grid does not depend on the caller's dtype
    low, high = torch.tensor(-1.1, dtype=torch.float64), torch.tensor(2.3, dtype=torch.float64)
    from_double = Encoding.from_range(low, high, 8, False)
    assert from_double.equals(Encoding.from_range(low.float(), high.float(), 8, False))
    assert from_double.scale.item() == F32((F32(2.3) - F32(-1.1)) / F32(255))


def test_messages_are_exact() -> None:
    with pytest.raises(ValueError, match=r"^encoding scale must be finite and > 0, got \[0.0, 1.0\]$"):
        Encoding(torch.tensor([0.0, 1.0]), torch.zeros(2), 8, False)
    symmetric = Encoding(torch.tensor(0.5), torch.tensor(-128.0), 8, True)
    assert Encoding.from_dict(symmetric.to_dict()).equals(symmetric)
