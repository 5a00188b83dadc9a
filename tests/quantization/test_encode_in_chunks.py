"""`Quantizer.encode_from` searches a tensor of many scales a chunk of scales at a time when its analyzer keeps large
statistics per scale (histograms, values): the encoding is the one the whole-tensor analysis gives, bit for bit, and
no histogram of the tensor is left behind."""

from __future__ import annotations

import pytest
import torch

from edgequant.quantization import Lpbq, Mse, PerBlock, Percentile, PerChannel, Quantizer, Sqnr, quantizer
from edgequant.quantization.encoding import Encoding

METHODS = {"sqnr": Sqnr(), "mse": Mse(), "percentile": Percentile(99.0, for_params=None)}
GRIDS = {  # bitwidth, symmetric, granularity, variant
    "per-channel asym": (8, False, PerChannel(0), {}),
    "per-block": (4, True, PerBlock(8, 0, 1), {}),
    "lpbq": (4, True, Lpbq(8, 0, 1, decompressed_bw=8), {}),
    "per-block strict": (4, True, PerBlock(8, 0, 1), {"strict_symmetric": True}),
    "per-block unsigned": (4, True, PerBlock(8, 0, 1), {"unsigned_symmetric": True}),
}


def _weight() -> torch.Tensor:
    """7 x 24 (21 blocks of 8, 7 channels: an odd count leaves a one-row tail to merge); rows of every kind."""
    weight = torch.randn(7, 24, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 3, 7)[:, None]
    weight[2] = weight[2].abs()  # a non-negative channel (the unsigned grid's case)
    weight[4, 5] = 40.0  # an outlier the searches clip
    weight[5, 9] = -3e38  # a sentinel (attention-mask style), left out of the statistics
    return weight


def _whole(make: callable, weight: torch.Tensor) -> Encoding:
    reference = make()
    reference.analyzer.observe(weight)
    return reference.compute_encoding()


@pytest.mark.parametrize("chunk_values", [16, 24, 2**16])  # 2 and 3 blocks (or channels) a chunk, and one chunk
@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_chunked_search_gives_the_whole_tensor_encoding(monkeypatch: pytest.MonkeyPatch, method: str, grid: str,
                                                         chunk_values: int) -> None:
    monkeypatch.setattr(quantizer, "ENCODE_CHUNK_VALUES", chunk_values)
    bitwidth, symmetric, granularity, variant = GRIDS[grid]
    weight = _weight()

    def make() -> Quantizer:
        return Quantizer(bitwidth, symmetric, granularity, METHODS[method], role="param", **variant)

    chunked = make()
    encoding = chunked.encode_from(weight)
    expected = _whole(make, weight)
    assert encoding.equals(expected)
    assert chunked.analyzer.min is None and getattr(chunked.analyzer, "hist", None) is None  # nothing kept


def test_a_tensor_without_finite_values_in_a_chunk_is_still_an_error_naming_the_quantizer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantizer, "ENCODE_CHUNK_VALUES", 16)
    weight = _weight()
    weight[6] = float("nan")
    with pytest.raises(RuntimeError, match="quantizer 'w.param_quantizers.weight': no finite data"):
        Quantizer(4, True, PerBlock(8, 0, 1), Sqnr(), role="param", owner="w", key="weight").encode_from(weight)


@pytest.mark.parametrize("chunk_values", [16, 2**16])
def test_non_finite_values_left_out_are_counted_chunk_or_not(monkeypatch: pytest.MonkeyPatch,
                                                             chunk_values: int) -> None:
    """The sim refuses NaN/inf weights by this count, not by a pass of its own over every weight."""
    monkeypatch.setattr(quantizer, "ENCODE_CHUNK_VALUES", chunk_values)
    weight = _weight()
    weight[1, 3], weight[6, 0] = float("nan"), float("inf")
    chunked = Quantizer(4, True, PerBlock(8, 0, 1), Sqnr(), role="param")
    chunked.encode_from(weight)
    assert chunked.analyzer.num_nonfinite == 2
    assert _whole(lambda: Quantizer(4, True, PerBlock(8, 0, 1), Sqnr(), role="param"), weight).equals(
        chunked.encoding)
