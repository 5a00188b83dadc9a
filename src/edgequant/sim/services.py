"""Features of higher layers that `QuantSim` offers as methods (``sim.export``, ``sim.load_encodings``).

The sim must not import the packages built on it; they register their entry points here when imported
(``import edgequant`` imports them all), and the sim's thin methods look them up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_SERVICES: dict[str, Callable[..., Any]] = {}


def register_service(name: str, function: Callable[..., Any]) -> None:
    _SERVICES[name] = function


def service(name: str, provider: str) -> Callable[..., Any]:
    if name not in _SERVICES:
        raise RuntimeError(f"sim.{name} is provided by {provider}; import it (or `import edgequant`) first")
    return _SERVICES[name]
