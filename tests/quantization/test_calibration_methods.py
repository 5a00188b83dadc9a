"""Calibration methods: each setting changes the range as a hand computation predicts, the per-role choices are
the documented fields, names and JSON forms round-trip, and bad names or settings fail at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

from edgequant.quantization import (
    CalibrationMethod,
    MinMax,
    MinMaxAnalyzer,
    Mse,
    MseAnalyzer,
    Percentile,
    PercentileAnalyzer,
    PerChannel,
    Quantizer,
    Sqnr,
    SqnrAnalyzer,
    calibration_method,
    calibration_methods,
    register,
)


def _range(method: CalibrationMethod, x: torch.Tensor, role: str = "output", symmetric: bool = False,
           bitwidth: int = 8) -> tuple[float, float]:
    analyzer = method.analyzer(None, role)
    analyzer.observe(x)
    low, high = analyzer.compute_range(bitwidth, symmetric)
    return float(low), float(high)


def test_minmax_is_the_exact_extremes() -> None:
    x = torch.tensor([0.3, -1.25, 7.5, 2.0])
    assert _range(MinMax(), x) == (-1.25, 7.5)
    quantizer = Quantizer(8, False, None, MinMax(), role="output")
    encoding = quantizer.encode_from(x)
    assert float(encoding.scale) == pytest.approx(8.75 / 255, rel=1e-6)


def test_percentile_90_is_numpy_percentile_within_one_bin() -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    method = Percentile(90, bins=256)
    analyzer = method.analyzer(None, "output")
    analyzer.observe(x)
    assert analyzer.hist.shape == (1, 256)
    low, high = (float(v) for v in analyzer.compute_range(8, False))
    width = (float(x.max()) - float(x.min())) / 256
    assert abs(low - np.percentile(x.numpy(), 10)) <= width  # about -1.28, while the default 99.99 gives -3.7
    assert abs(high - np.percentile(x.numpy(), 90)) <= width


def _sqnr_data() -> torch.Tensor:
    """30000 zeros and one 1.0: the histogram of 2 bins over [0, 1] has 30000 values at centre 0.25 and one at
    centre 0.75, which the noise of each candidate grid is computed from."""
    return torch.cat([torch.zeros(30_000), torch.ones(1)])


@pytest.mark.parametrize("gamma, candidates, expected", [
    # 8-bit symmetric, scale = f * 1.0 / 127, grid [-128 scale, 127 scale]; rounding noise scale^2 / 12 per value
    # inside the grid, gamma * (0.75 - grid max)^2 for the value at 0.75 when it is clipped.
    # f = 1:    30001 * (1/127)^2 / 12                        = 0.1550            (no clipping)
    # f = 0.5:  30000 * (0.5/127)^2 / 12 + gamma * 0.25^2     = 0.0388 + 0.0625 gamma
    # f = 0.75: 30001 * (0.75/127)^2 / 12                     = 0.0872            (0.75 sits on the grid's end)
    # f = 0.25: 30000 * (0.25/127)^2 / 12 + gamma * 0.5^2     = 0.0097 + 0.25 gamma
    (3.0, 2, 1.0),    # 0.2263 > 0.1550: the full range
    (1.0, 2, 0.5),    # 0.1013 < 0.1550: clip the lone value
    (1.0, 4, 0.75),   # 0.0872 beats 0.1013 (f = 0.5), 0.1550 and 0.2597 (f = 0.25)
])
def test_sqnr_gamma_and_candidates_pick_the_hand_computed_grid(gamma: float, candidates: int, expected: float) -> None:
    method = Sqnr(gamma=gamma, candidates=candidates, bins=2)
    low, high = _range(method, _sqnr_data(), symmetric=True)
    assert (low, high) == (pytest.approx(-expected, rel=1e-6), pytest.approx(expected, rel=1e-6))
    encoding = Quantizer(8, True, None, method, role="output").encode_from(_sqnr_data())
    assert float(encoding.scale) == pytest.approx(expected / 127, rel=1e-6)


def test_mse_settings_pick_the_hand_computed_ratio() -> None:
    # 2-bit asymmetric grid over [0, ratio]: ratio 0.6 puts 0.2, 0.4 and 0.6 on the grid and clips 1.0 (squared
    # error 0.16); ratio 1 (grid 0, 1/3, 2/3, 1) costs 10 * (0.1333^2 + 0.0667^2 + 0.0667^2) = 0.2667.
    # The fine step around 0.6 tries 0.2 (worse) and 1.0.
    x = torch.tensor([0.0, 1.0] + [0.2, 0.4, 0.6] * 10)
    assert _range(Mse(candidates=2, min_ratio=0.6), x, role="param", bitwidth=2) == (0.0, pytest.approx(0.6))
    assert _range(Mse(), x, role="param", bitwidth=2)[1] != pytest.approx(0.6)  # the default search differs


@pytest.mark.parametrize("method, role, expected, settings", [
    (MinMax(), "param", MinMaxAnalyzer, {}),
    (Sqnr(gamma=2.0), "param", SqnrAnalyzer, {"gamma": 2.0}),
    (Sqnr(bins=64, candidates=7, offset_candidates=3), "input", SqnrAnalyzer,
     {"num_bins": 64, "num_scales": 7, "num_offsets": 3, "gamma": 3.0}),
    (Percentile(99.5), "param", MinMaxAnalyzer, {}),  # for_params=MinMax()
    (Percentile(99.5), "output", PercentileAnalyzer, {"percentile": 99.5, "num_bins": 2048}),
    (Percentile(99.5, for_params=None), "param", PercentileAnalyzer, {"percentile": 99.5}),
    (Mse(candidates=5), "param", MseAnalyzer, {"num_candidates": 5, "min_ratio": 0.2}),
    (Mse(candidates=5), "model_input", SqnrAnalyzer, {"gamma": 1.0, "num_bins": 512}),  # for_activations
    (Mse(for_activations=Percentile(99)), "output", PercentileAnalyzer, {"percentile": 99}),
    (MinMax(for_activations=Sqnr()), "input", SqnrAnalyzer, {"gamma": 3.0}),
])
def test_per_role_choices_are_the_fields(method: CalibrationMethod, role: str, expected: type,
                                         settings: dict) -> None:
    analyzer = method.analyzer(0, role)
    assert type(analyzer) is expected and analyzer.granularity == PerChannel(0)
    assert {key: getattr(analyzer, key) for key in settings} == settings


def test_documented_role_defaults() -> None:
    assert Percentile().for_params == MinMax() and Percentile().for_activations is None
    assert Mse().for_activations == Sqnr(gamma=1.0) and Mse().for_params is None
    assert MinMax().for_params is None and Sqnr().for_activations is None


@pytest.mark.parametrize("method, json_form, text", [
    (MinMax(), "minmax", "minmax"),
    (Sqnr(), "sqnr", "sqnr"),
    (Percentile(99.9), {"name": "percentile", "percentile": 99.9}, "percentile(percentile=99.9)"),
    (Sqnr(gamma=1.5, bins=128), {"name": "sqnr", "gamma": 1.5, "bins": 128}, "sqnr(gamma=1.5, bins=128)"),
    (Mse(for_activations=Percentile(99)), {"name": "mse", "for_activations": {"name": "percentile", "percentile": 99}},
     "mse(for_activations=percentile(percentile=99))"),
    (Percentile(for_params=None), {"name": "percentile", "for_params": None}, "percentile(for_params=None)"),
])
def test_json_form_and_text_round_trip(method: CalibrationMethod, json_form: object, text: str) -> None:
    assert method.to_json() == json_form and str(method) == text
    assert calibration_method(json_form) == method
    assert calibration_method(method) is method


@pytest.mark.parametrize("alias, method", [("tf", MinMax()), ("min_max", MinMax()), ("tf_enhanced", Sqnr()),
                                           ("post_training_percentile", Percentile()), ("mse", Mse())])
def test_names_and_aimet_aliases(alias: str, method: CalibrationMethod) -> None:
    assert calibration_method(alias) == method


def test_unknown_names_list_the_registered_ones() -> None:
    for value in ("nope", {"name": "nope"}, {"gamma": 1.0}):
        with pytest.raises(ValueError, match=r"unknown quant_scheme .*; choose one of minmax, sqnr, percentile, mse "
                                             r"\(AIMET's tf, .* are accepted too\)"):
            calibration_method(value)
    with pytest.raises(ValueError, match="'sqnr' has no setting 'gama'; its settings are for_params, for_activations, "
                                         "gamma, candidates, offset_candidates, bins"):
        calibration_method({"name": "sqnr", "gama": 2.0})
    with pytest.raises(TypeError, match="quant_scheme must be a name, a dict or a calibration method"):
        calibration_method(3)


@pytest.mark.parametrize("build, message", [
    (lambda: Percentile(150), r"Percentile: percentile must be a number in \(50, 100\], got 150"),
    (lambda: Percentile(50), r"Percentile: percentile must be a number in \(50, 100\], got 50"),
    (lambda: Percentile(bins=0), "Percentile: bins must be an integer >= 1, got 0"),
    (lambda: Sqnr(gamma=-1.0), r"Sqnr: gamma must be a finite number > 0, got -1.0"),
    (lambda: Sqnr(gamma=float("nan")), "Sqnr: gamma must be a finite number > 0, got nan"),
    (lambda: Sqnr(candidates=0), "Sqnr: candidates must be an integer >= 1, got 0"),
    (lambda: Sqnr(offset_candidates=2.5), "Sqnr: offset_candidates must be an integer >= 1, got 2.5"),
    (lambda: Mse(min_ratio=0.0), r"Mse: min_ratio must be a number in \(0, 1\], got 0.0"),
    (lambda: Mse(candidates=True), "Mse: candidates must be an integer >= 1, got True"),
    (lambda: calibration_method({"name": "percentile", "percentile": 101}), "percentile must be a number in"),
])
def test_invalid_settings_fail_at_construction(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()
    with pytest.raises(TypeError, match="for_params must be a calibration method"):
        Percentile(for_params="minmax")


def test_a_new_method_is_one_registered_class(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration_methods, "CALIBRATION_METHODS", dict(calibration_methods.CALIBRATION_METHODS))

    @register
    @dataclass(frozen=True)
    class Widened(CalibrationMethod):
        """Min/max widened by ``factor`` (a toy method)."""

        name: ClassVar[str] = "widened"
        factor: float = 2.0

        def _statistics(self, axis: int | None) -> MinMaxAnalyzer:
            factor = self.factor

            class WidenedAnalyzer(MinMaxAnalyzer):
                def compute_range(self, bitwidth: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
                    low, high = super().compute_range(bitwidth, symmetric)
                    return low * factor, high * factor

            return WidenedAnalyzer(axis)

    method = calibration_method({"name": "widened", "factor": 3.0})
    assert method == Widened(3.0) and method.to_json() == {"name": "widened", "factor": 3.0}
    assert _range(method, torch.tensor([-1.0, 2.0])) == (-3.0, 6.0)
    with pytest.raises(ValueError, match="choose one of minmax, sqnr, percentile, mse, widened"):
        calibration_method("nope")
    with pytest.raises(ValueError, match="a calibration method named 'widened' is already registered"):
        register(Widened)
