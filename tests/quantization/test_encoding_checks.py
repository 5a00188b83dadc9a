"""Encodings refuse ranges and grids no hardware grid can honour, with a message that names the first bad channel
and its values (what the user must fix), never a NaN scale."""

from __future__ import annotations

import pytest
import torch

from edgequant.quantization import Encoding

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(("low", "high", "message"), [
    ([0.0, 1.0, 2.0], [1.0, 0.5, 3.0], "encoding range (channel 1) has min 1.0 > max 0.5; pass the smaller bound "
                                       "as min_val"),
    ([0.0, 3.0, NAN], [1.0, 2.0, 3.0], "encoding range (channel 1) has min 3.0 > max 2.0"),  # the first bad one
    ([0.0, 1.0, NAN], [1.0, 2.0, 3.0], "encoding range (channel 2) must be finite, got min nan and max 3.0"),
    ([0.0, -1.0], [2.0, -INF], "encoding range (channel 1) must be finite, got min -1.0 and max -inf"),
    ([-1.0, 0.0], [INF, 1.0], "encoding range (channel 0) must be finite, got min -1.0 and max inf"),
    (2.0, 1.0, "encoding range has min 2.0 > max 1.0; pass the smaller bound as min_val"),
    (INF, 1.0, "encoding range must be finite, got min inf and max 1.0"),
    (0.0, [1.0, -1.0], "encoding range (channel 1) has min 0.0 > max -1.0"),  # a scalar bound broadcasts
])
def test_bad_ranges_name_the_first_bad_channel_and_its_values(low, high, message) -> None:
    with pytest.raises(ValueError) as error:
        Encoding.from_range(torch.tensor(low), torch.tensor(high), 8, False)
    assert str(error.value).startswith(message), str(error.value)


def test_ranges_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^min shape \(2,\) != max shape \(3,\)$"):
        Encoding.from_range(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0, 3.0]), 8, False)


def test_equal_bounds_are_a_valid_range() -> None:
    """min == max is not min > max: a constant channel gets the smallest grid, not an error."""
    encoding = Encoding.from_range(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), 8, False)
    assert torch.isfinite(encoding.scale).all() and (encoding.scale > 0).all()


@pytest.mark.parametrize(("scale", "offset", "message"), [
    ([1.0, 0.0], [0.0, 0.0], "encoding scale must be finite and > 0, got [1.0, 0.0]"),
    ([1.0, -2.0], [0.0, 0.0], "encoding scale must be finite and > 0, got [1.0, -2.0]"),
    ([1.0, INF], [0.0, 0.0], "encoding scale must be finite and > 0, got [1.0, inf]"),
    ([NAN, 1.0], [0.0, 0.0], "encoding scale must be finite and > 0, got [nan, 1.0]"),
    ([1.0, 1.0], [0.0, NAN], "encoding offset must be finite, got [0.0, nan]"),
    ([1.0, 1.0], [-INF, 0.0], "encoding offset must be finite, got [-inf, 0.0]"),
    ([1.0, 1.0], [0.0], "scale shape (2,) != offset shape (1,)"),
])
def test_bad_grids_are_refused_with_their_values(scale, offset, message) -> None:
    with pytest.raises(ValueError) as error:
        Encoding(torch.tensor(scale), torch.tensor(offset), 8, False)
    assert str(error.value) == message
