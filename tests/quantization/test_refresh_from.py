"""`Quantizer.refresh_from` (QAT's per-step weight encodings, written in place) against `Encoding.from_range` and
`Quantizer.encode_from`, bit for bit (signs of zero included)."""

import pytest
import torch

from edgequant.quantization import Encoding, PerChannel, Quantizer


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


def _weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    random = torch.randn(8, 4, 3, 3, generator=generator)
    signed_zeros = torch.where(random.abs() < 0.7, torch.tensor(-0.0), random)
    return {
        "random": random,
        "tiny": random * 1e-7,  # below MIN_RANGE: widened
        "all_zero": torch.zeros(8, 4, 3, 3),
        "negative_zero": torch.full((8, 4, 3, 3), -0.0),
        "constant": torch.full((8, 4, 3, 3), 0.3),
        "negative_constant": torch.full((8, 4, 3, 3), -2.5),
        "non_negative": random.abs(),
        "non_positive": -random.abs(),
        "signed_zeros": signed_zeros,
        "non_negative_signed_zeros": signed_zeros.abs() * torch.where(random > 0, 1.0, -1.0),
    }


def _expected(weight: torch.Tensor, bitwidth: int, symmetric: bool, axis: int | None) -> Encoding:
    if axis is None:
        low, high = torch.aminmax(weight)
    else:
        low, high = torch.aminmax(weight.movedim(axis, 0).reshape(weight.shape[axis], -1), dim=1)
    return Encoding.from_range(low, high, bitwidth, symmetric, axis)


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bitwidth", [4, 8])
@pytest.mark.parametrize("case", list(_weights()))
def test_refresh_from_equals_from_range_and_encode_from(case, bitwidth, symmetric, axis):
    weight = _weights()[case]
    refreshed = Quantizer(bitwidth, symmetric, granularity=axis, role="param")
    refreshed.encode_from(torch.randn(weight.shape))  # an earlier grid, overwritten in place
    scale, offset = refreshed.scale, refreshed.offset
    refreshed.refresh_from(weight)
    assert refreshed.scale is scale and refreshed.offset is offset
    encoded = Quantizer(bitwidth, symmetric, granularity=axis, role="param")
    encoded.encode_from(weight)
    expected = _expected(weight, bitwidth, symmetric, axis)
    for quantizer in (refreshed, encoded):
        assert torch.equal(_bits(quantizer.scale), _bits(expected.scale))
        assert torch.equal(_bits(quantizer.offset), _bits(expected.offset))
    assert torch.equal(_bits(refreshed.analyzer.min), _bits(encoded.analyzer.min))  # same statistics kept
    assert torch.equal(_bits(refreshed.analyzer.max), _bits(encoded.analyzer.max))


def test_refresh_from_falls_back_where_the_fast_path_does_not_apply():
    weight = torch.randn(4, 6)
    weight[1, 2] = float("nan")
    weight[3, 0] = -3e38  # a sentinel: left out of the statistics
    for make in (lambda: Quantizer(4, False, granularity=PerChannel(0), role="param"),
                 lambda: Quantizer(4, True, role="param", scheme="sqnr"),
                 lambda: Quantizer(4, False, role="output", min_constraint=0.0)):
        refreshed, encoded = make(), make()
        refreshed.encode_from(torch.randn(4, 6))
        refreshed.refresh_from(weight)
        encoded.encode_from(weight)
        assert refreshed.encoding.equals(encoded.encoding)
        assert refreshed.analyzer.num_nonfinite == encoded.analyzer.num_nonfinite == 1
        assert refreshed.analyzer.num_sentinels == encoded.analyzer.num_sentinels == 1
    first = Quantizer(4, True, granularity=PerChannel(0), role="param")
    first.refresh_from(torch.randn(4, 6))  # no grid yet: allocated by encode_from
    assert first.scale.shape == (4,)
