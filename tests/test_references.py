"""The grid-step comparison the float-path tests rely on: it must tolerate a rare one-step rounding flip and nothing
else, or those tests would hide real errors behind CPU-proofing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from references import assert_within_grid_steps

SCALE = np.float32(0.0013)


def _on_grid(indices: np.ndarray) -> np.ndarray:
    """Dequantized float32 values k * scale, each rounded once, as a runtime produces them."""
    return (indices.astype(np.float32) * SCALE).astype(np.float32)


@pytest.fixture
def indices() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 65536, size=1000)  # 16-bit grid: float32 rounding is largest


def test_identical_values_pass_with_no_flips_allowed(indices: np.ndarray) -> None:
    assert_within_grid_steps(_on_grid(indices), torch.from_numpy(_on_grid(indices)), float(SCALE))


def test_one_step_flips_within_the_share_pass(indices: np.ndarray) -> None:
    flipped = indices.copy()
    flipped[[3, 500]] += 1  # at the top of a 16-bit grid too: k * scale rounds differently on both sides
    flipped[7] = 65535
    expected = indices.copy()
    expected[7] = 65534
    assert_within_grid_steps(_on_grid(flipped), _on_grid(expected), float(SCALE), max_steps=1, max_share=0.003)


def test_two_steps_off_fail_even_on_a_single_element(indices: np.ndarray) -> None:
    off = indices.copy()
    off[10] += 2
    with pytest.raises(AssertionError, match="2 steps apart"):
        assert_within_grid_steps(_on_grid(off), _on_grid(indices), float(SCALE), max_steps=1, max_share=0.5)


def test_too_many_one_step_flips_fail(indices: np.ndarray) -> None:
    off = indices.copy()
    off[:11] -= 1  # 11 of 1000 where 1 % allows 10
    with pytest.raises(AssertionError, match="11 of 1000 values differ"):
        assert_within_grid_steps(_on_grid(off), _on_grid(indices), float(SCALE), max_steps=1, max_share=0.01)
    off[10] += 1  # 10 flips: exactly the share
    assert_within_grid_steps(_on_grid(off), _on_grid(indices), float(SCALE), max_steps=1, max_share=0.01)


def test_values_off_the_grid_fail(indices: np.ndarray) -> None:
    half_step = _on_grid(indices) + np.float32(0.5) * SCALE
    with pytest.raises(AssertionError, match="not a whole number of steps"):
        assert_within_grid_steps(half_step, _on_grid(indices), float(SCALE), max_steps=1, max_share=1.0)


def test_a_float_difference_on_the_same_step_counts_as_a_difference(indices: np.ndarray) -> None:
    nudged = _on_grid(indices)
    nudged[0] = np.nextafter(nudged[0], np.float32(np.inf))  # same grid index, not the same value
    with pytest.raises(AssertionError, match="1 of 1000 values differ"):
        assert_within_grid_steps(nudged, _on_grid(indices), float(SCALE))


def test_shapes_must_match(indices: np.ndarray) -> None:
    with pytest.raises(AssertionError):
        assert_within_grid_steps(_on_grid(indices[:10]), _on_grid(indices[:10]).reshape(2, 5), float(SCALE))
