"""Calibration methods: the user's choice of how quantizers turn observed tensors into ranges.

A method is a small frozen dataclass holding its settings (``Percentile(99.9)``, ``Sqnr(gamma=1.0)``) that builds
the statistics engine (an `EncodingAnalyzer`) of each quantizer from the quantizer's granularity and role. Methods are
registered by name, so ``quant_scheme="sqnr"`` keeps working and AIMET's names (``tf``, ``tf_enhanced``,
``percentile``, ...) are aliases; a new method is one class decorated with `register`.

Weights and activations differ (a weight is observed once and every value of it is used on every input; an
activation is observed over many batches), so a method may hand one role to another method. These choices are
the fields ``for_params`` (weights) and ``for_activations`` (layer inputs and outputs, model inputs), ``None``
meaning the method itself; the built-in defaults:

* ``minmax``: min/max for both roles;
* ``sqnr``: the SQNR grid search (``gamma=3``) for both roles;
* ``percentile``: weights keep their extremes (``for_params=MinMax()``); activations clip the tails of a histogram;
* ``mse``: weights get the exact MSE search over their values; activations get ``Sqnr(gamma=1.0)``
  (``for_activations``), the same squared-error objective on a fixed-size histogram, since keeping every
  activation value of every calibration batch would not fit in memory.

A method's JSON form (`CalibrationMethod.to_json`) is its name plus the settings that differ from the defaults,
just the name when none do; `calibration_method` accepts a name, that JSON form, or a method.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from edgequant.quantization.analyzers import (
    EncodingAnalyzer,
    MinMaxAnalyzer,
    MseAnalyzer,
    PercentileAnalyzer,
    SqnrAnalyzer,
)
from edgequant.quantization.granularity import Granularity

ROLE_FIELDS = ("for_params", "for_activations")


@dataclass(frozen=True)
class CalibrationMethod(ABC):
    """Base of the registered methods: per-role delegation, validation, JSON form and a short printable name.

    Subclasses set ``name``, declare their settings as fields with defaults and build their analyzer in
    `_statistics`."""

    name: ClassVar[str]
    for_params: CalibrationMethod | None = field(default=None, kw_only=True)
    for_activations: CalibrationMethod | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        for role_field in ROLE_FIELDS:
            value = getattr(self, role_field)
            if value is not None and not isinstance(value, CalibrationMethod):
                raise TypeError(f"{role_field} must be a calibration method (e.g. MinMax()) or None, got {value!r}")

    def analyzer(self, granularity: Granularity | int | None, role: str) -> EncodingAnalyzer:
        """The statistics engine for a quantizer of ``role`` (``"param"`` or an activation role) with
        ``granularity`` (also the ``axis: int | None`` of older code); the method named by the role's field builds
        it, if any."""
        delegate = self.for_params if role == "param" else self.for_activations
        return (delegate or self)._statistics(granularity)

    @abstractmethod
    def _statistics(self, granularity: Granularity | int | None) -> EncodingAnalyzer:
        """This method's own analyzer, whatever the role."""

    def to_json(self) -> str | dict[str, Any]:
        """The name, with the settings that differ from the defaults (just the name when none do), for files."""
        changed = self._changed_settings()
        if not changed:
            return self.name
        return {"name": self.name} | {
            key: value.to_json() if isinstance(value, CalibrationMethod) else value for key, value in changed.items()
        }

    def _changed_settings(self) -> dict[str, Any]:
        default = type(self)()
        settings = {f.name: getattr(self, f.name) for f in fields(self)}
        return {key: value for key, value in settings.items() if value != getattr(default, key)}

    def __str__(self) -> str:
        changed = self._changed_settings()
        if not changed:
            return self.name
        return f"{self.name}({', '.join(f'{key}={value}' for key, value in changed.items())})"


CALIBRATION_METHODS: dict[str, type[CalibrationMethod]] = {}
"""The registered methods by name, in registration order."""

SCHEME_ALIASES = {"tf": "minmax", "min_max": "minmax", "tf_enhanced": "sqnr", "post_training_tf_enhanced": "sqnr",
                  "post_training_tf": "minmax", "post_training_percentile": "percentile"}
"""AIMET's scheme names, accepted wherever a registered name is."""


def register(cls: type[CalibrationMethod]) -> type[CalibrationMethod]:
    """Class decorator: make the method selectable by its ``name`` (``quant_scheme="<name>"``)."""
    if cls.name in CALIBRATION_METHODS or cls.name in SCHEME_ALIASES:
        raise ValueError(f"a calibration method named {cls.name!r} is already registered")
    CALIBRATION_METHODS[cls.name] = cls
    return cls


def _check(method: CalibrationMethod, setting: str, valid: Callable[[Any], bool], expected: str) -> None:
    value = getattr(method, setting)
    if isinstance(value, bool) or not valid(value):
        raise ValueError(f"{type(method).__name__}: {setting} must be {expected}, got {value!r}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and value >= 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@register
@dataclass(frozen=True)
class MinMax(CalibrationMethod):
    """The observed extremes (AIMET's ``tf``): nothing is clipped."""

    name: ClassVar[str] = "minmax"

    def _statistics(self, granularity: Granularity | int | None) -> EncodingAnalyzer:
        return MinMaxAnalyzer(granularity)


@register
@dataclass(frozen=True)
class Sqnr(CalibrationMethod):
    """Grid search for the least expected noise (AIMET's ``tf_enhanced``): rounding noise inside the grid plus
    ``gamma`` times the squared clipping error outside it, from a ``bins``-bin histogram; ``candidates`` scales
    (fractions of the observed range) and, for asymmetric grids, ``offset_candidates`` offsets per scale."""

    name: ClassVar[str] = "sqnr"
    gamma: float = 3.0
    candidates: int = 100
    offset_candidates: int = 21
    bins: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, "gamma", lambda v: _is_number(v) and v > 0, "a finite number > 0")
        for setting in ("candidates", "offset_candidates", "bins"):
            _check(self, setting, _is_count, "an integer >= 1")

    def _statistics(self, granularity: Granularity | int | None) -> EncodingAnalyzer:
        return SqnrAnalyzer(granularity, num_bins=self.bins, gamma=self.gamma, num_scales=self.candidates,
                            num_offsets=self.offset_candidates)


@register
@dataclass(frozen=True)
class Percentile(CalibrationMethod):
    """Clips the ``100 - percentile`` % tails at either end of the observed distribution (a ``bins``-bin
    histogram, so the range is exact to one bin). Weights keep their extremes (``for_params=MinMax()``)."""

    name: ClassVar[str] = "percentile"
    percentile: float = 99.99
    bins: int = 2048
    for_params: CalibrationMethod | None = field(default=MinMax(), kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, "percentile", lambda v: _is_number(v) and 50 < v <= 100, "a number in (50, 100]")
        _check(self, "bins", _is_count, "an integer >= 1")

    def _statistics(self, granularity: Granularity | int | None) -> EncodingAnalyzer:
        return PercentileAnalyzer(granularity, num_bins=self.bins, percentile=self.percentile)


@register
@dataclass(frozen=True)
class Mse(CalibrationMethod):
    """Per-channel search over clipping ratios in ``[min_ratio, 1]`` of the observed range for the least exact
    quantization MSE (``candidates`` coarse ratios, then as many fine ones around the best). It keeps the observed
    values, so activations use ``for_activations=Sqnr(gamma=1.0)``, the same objective on a histogram."""

    name: ClassVar[str] = "mse"
    candidates: int = 24
    min_ratio: float = 0.2
    for_activations: CalibrationMethod | None = field(default=Sqnr(gamma=1.0), kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, "candidates", _is_count, "an integer >= 1")
        _check(self, "min_ratio", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")

    def _statistics(self, granularity: Granularity | int | None) -> EncodingAnalyzer:
        return MseAnalyzer(granularity, num_candidates=self.candidates, min_ratio=self.min_ratio)


QUANT_SCHEMES = tuple(CALIBRATION_METHODS)
"""The built-in method names (the CLI's ``--scheme`` choices)."""

MethodSpec = str | Mapping[str, Any] | CalibrationMethod
"""What a ``quant_scheme`` argument may be: a name, a JSON form or a method (see `calibration_method`)."""


def calibration_method(value: MethodSpec) -> CalibrationMethod:
    """The method ``value`` names: a registered name or alias, a JSON form (`CalibrationMethod.to_json`), or a
    method (returned as it is)."""
    if isinstance(value, CalibrationMethod):
        return value
    if isinstance(value, str):
        return _registered(value)()
    if isinstance(value, Mapping):
        settings = dict(value)
        cls = _registered(settings.pop("name", None))
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(f"calibration method {cls.name!r} has no setting {', '.join(map(repr, unknown))}; "
                             f"its settings are {', '.join(known)}")
        for role_field in ROLE_FIELDS:
            if settings.get(role_field) is not None:
                settings[role_field] = calibration_method(settings[role_field])
        return cls(**settings)
    raise TypeError(f"quant_scheme must be a name, a dict or a calibration method (e.g. Percentile(99.9)), "
                    f"got {type(value).__name__}")


def _registered(name: Any) -> type[CalibrationMethod]:
    cls = CALIBRATION_METHODS.get(SCHEME_ALIASES.get(name, name)) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown quant_scheme {name!r}; choose one of {', '.join(CALIBRATION_METHODS)} "
                         f"(AIMET's {', '.join(SCHEME_ALIASES)} are accepted too)")
    return cls


def make_analyzer(scheme: MethodSpec, granularity: Granularity | int | None, for_params: bool) -> EncodingAnalyzer:
    """Analyzer of ``scheme`` (see `calibration_method`) for a weight (``for_params``) or an activation."""
    return calibration_method(scheme).analyzer(granularity, "param" if for_params else "output")
