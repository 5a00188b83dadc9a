"""SQNR and MSE searches score their candidates on the grid the quantizer uses: a strict symmetric quantizer's
[-(2**(b-1) - 1), 2**(b-1) - 1] grid, not the [-2**(b-1), 2**(b-1) - 1] one."""

import pytest
import torch

from edgequant.quantization import Quantizer
from edgequant.quantization.affine import quantize_dequantize

# Two values, 4 bits, symmetric; the search picks a clipping ratio r of max|x| = 1, so scale = r / 7.
# Signed grid [-8, 7] * scale: r = 7/8 puts -1 on level -8 and 0.5 on level 4, no error at all.
# Strict grid [-7, 7] * scale: -1 clips to -r and 0.5 rounds to level 4 (3.5 / r rounds up for r in (7/8, 1)),
# so the error is (1 - r)^2 + (4r/7 - 1/2)^2, least at r = 63/65 (zero derivative).
VALUES = torch.tensor([-1.0, 0.5])


def _strict_error(scale: float) -> float:
    offset = torch.tensor(-7.0)
    return float((quantize_dequantize(VALUES, torch.tensor(scale), offset, 4, strict_symmetric=True) - VALUES)
                 .square().mean())


def test_mse_search_finds_the_best_ratio_of_the_strict_grid() -> None:
    signed = Quantizer(4, True, scheme="mse", role="param")
    strict = Quantizer(4, True, scheme="mse", role="param", strict_symmetric=True)
    signed_scale = float(signed.encode_from(VALUES).scale)
    strict_scale = float(strict.encode_from(VALUES).scale)
    fine_step = 2 * (0.8 / 23) / 23  # the fine search's spacing (24 ratios over [0.2, 1], then 24 within one step)
    assert signed_scale * 7 == pytest.approx(7 / 8, abs=fine_step)
    assert strict_scale * 7 == pytest.approx(63 / 65, abs=fine_step)
    assert _strict_error(strict_scale) < _strict_error(signed_scale) / 3  # the signed grid's choice clips -1 to -7/8


def test_sqnr_search_scores_its_candidates_on_the_strict_grid() -> None:
    # 100 candidate ratios k/100 of max|x| = 1; the histogram's outer bin centres are -1 + w/2 and 0.5 - w/2 with
    # w = 1.5 / 512. Noise: scale^2 / 12 per value inside the grid plus gamma = 3 times the squared clipping error.
    # Signed grid: r = 0.87 leaves -1's bin 0.0043 outside (noise 3 * 0.0043^2 + (0.87/7)^2 / 12 = 0.00134), less
    # than r = 0.88 (nothing clipped, 2 * (0.88/7)^2 / 12 = 0.00263) and r = 0.86 (0.0020).
    # Strict grid [-7, 7] * r/7: r = 0.99 (3 * 0.0085^2 + (0.99/7)^2 / 12 = 0.0019) beats r = 1 (0.0034) and
    # r = 0.98 (0.0027).
    signed = Quantizer(4, True, scheme="sqnr", role="output")
    strict = Quantizer(4, True, scheme="sqnr", role="output", strict_symmetric=True)
    assert float(signed.encode_from(VALUES).scale) * 7 == pytest.approx(0.87, abs=1e-6)
    assert float(strict.encode_from(VALUES).scale) * 7 == pytest.approx(0.99, abs=1e-6)
    assert strict.encoding.strict_symmetric and int(strict.offset) == -7
