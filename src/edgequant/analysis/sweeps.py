"""Sensitivity sweeps: the metric with quantizers switched on and off, by kind and by layer.

Every figure is the metric on ``sim.model`` with a set of quantizers on and the rest off, using only
`QuantSim.quantizers_enabled`, so each can be re-measured with ``sim.set_enabled`` and the same metric: one full
evaluation, or, for the default metric, the forward from the layer's cut on (`cut_sweeps`). Quantizers the user
had disabled before the analysis stay off throughout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from edgequant.analysis.cut_sweeps import sensitivities_from_cuts
from edgequant.analysis.fidelity import OutputFidelity
from edgequant.quantization import Quantizer
from edgequant.sim import QuantSim

Metric = Callable[[nn.Module], float]


@dataclass
class GlobalMetrics:
    fp32: float
    quantized: float
    weights_only: float
    activations_only: float


@dataclass
class LayerSensitivity:
    only_this_quantized: float
    all_but_this_quantized: float


def evaluate(metric: Metric, model: nn.Module) -> float:
    """One metric value, checked: a number, and not NaN."""
    with torch.no_grad():
        value = metric(model)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"eval_fn returned {type(value).__name__}; it must return a number (higher is better)"
        ) from None
    if math.isnan(value):
        raise ValueError("eval_fn returned NaN; it must return a number (higher is better)")
    return value


class Sweeps:
    """Runs the metric with chosen quantizer sets, counting evaluations on one progress bar."""

    def __init__(self, sim: QuantSim, metric: Metric, total: int, progress: bool) -> None:
        self.sim, self.metric = sim, metric
        self.active = [q for q in sim.quantizers().values() if q.enabled]
        self.bar = tqdm(total=total, desc="analysis: sensitivity", disable=not progress, leave=False)

    def measure(self, enabled: list[Quantizer]) -> float:
        """The metric with exactly ``enabled`` (of the active quantizers) on."""
        chosen = {id(q) for q in enabled}
        off = [q for q in self.active if id(q) not in chosen]
        with self.sim.quantizers_enabled(False, off), self.sim.quantizers_enabled(True, enabled):
            value = evaluate(self.metric, self.sim.model)
        self.bar.update()
        return value

    def global_metrics(self) -> GlobalMetrics:
        return GlobalMetrics(
            fp32=self.measure([]),
            quantized=self.measure(self.active),
            weights_only=self.measure([q for q in self.active if q.role == "param"]),
            activations_only=self.measure([q for q in self.active if q.role != "param"]),
        )

    def layer(self, quantizers: list[Quantizer]) -> LayerSensitivity:
        own = {id(q) for q in quantizers}
        return LayerSensitivity(
            only_this_quantized=self.measure(quantizers),
            all_but_this_quantized=self.measure([q for q in self.active if id(q) not in own]),
        )

    def layers(self, own: dict[str, list[Quantizer]]) -> dict[str, LayerSensitivity]:
        """Each layer's sensitivities (``own[layer]``: its quantizers): from its cut where the metric is the
        default one and the sim's graph has a cut before the layer, else from two full evaluations."""
        from_cuts: dict[str, tuple[float, float]] = {}
        segmented = self.sim.split_at_layers(own) if isinstance(self.metric, OutputFidelity) else None
        if segmented is not None:
            from_cuts = sensitivities_from_cuts(self.sim, segmented, self.metric, self.active, own,
                                                lambda share: self.bar.update(share))
        return {name: LayerSensitivity(*from_cuts[name]) if name in from_cuts else self.layer(quantizers)
                for name, quantizers in own.items()}

    def close(self) -> None:
        self.bar.close()
