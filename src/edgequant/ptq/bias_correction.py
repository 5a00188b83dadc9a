"""Bias correction (Nagel et al., 2019): remove the expected shift that weight quantization adds to each
layer's output, ``E[y_q] - E[y] = (W_q - W) E[x]``, by subtracting it from the layer's bias.

* empirical (``data`` given): ``E[y]`` and ``E[y_q]`` per output channel are measured on calibration data,
  layer by layer in execution order, so that each layer is corrected for the quantized inputs it really
  gets after the layers before it were corrected (each measurement stops the forward at that layer);
* analytical (``data=None``, data-free): ``E[x]`` per input channel comes from the BatchNorm that precedes
  the layer (in the sim, or folded earlier: pass `EqualizationReport.layer_output_stats`), pushed through
  the ReLU/ReLU6/clamp between them as the mean of a clipped normal distribution.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from edgequant.ptq.channel_clamp import ChannelClamp
from edgequant.ptq.graph_patterns import BATCH_NORM_TYPES
from edgequant.ptq.layer_channels import add_to_bias, is_weight_layer, output_channel_dim, weights_times_input
from edgequant.ptq.sim_helpers import StopForward, run_until_stopped
from edgequant.sim.graph import GraphNode, ModelGraph
from edgequant.sim.modes import quantizers_disabled, training_mode
from edgequant.sim.quantized_module import param_quantizer
from edgequant.sim.quantsim import QuantSim


@dataclass
class BiasCorrectionReport:
    corrected: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per layer, the vector added to its bias."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Per layer left alone, why."""


def correct_bias(
    sim: QuantSim,
    data: Iterable[Any] | None = None,
    *,
    num_batches: int | None = None,
    layer_output_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    layers: list[str] | None = None,
    progress: bool = True,
) -> BiasCorrectionReport:
    """Correct the biases of ``sim.model``'s quantized Conv/ConvTranspose/Linear layers (in place).

    With ``data`` (batches as for `QuantSim.calibrate`; the first ``num_batches``) the correction is
    empirical, otherwise analytical. The sim must be calibrated. A layer without bias gets one. ``layers``
    restricts the correction to those names.
    """
    graph = sim.graph()
    targets, report = _targets(sim, graph, layers)
    with torch.no_grad():
        if data is None:
            _correct_analytically(sim, graph, targets, layer_output_stats or {}, report)
        else:
            _correct_empirically(sim, targets, data, num_batches, report, progress)
    return report


def _targets(sim: QuantSim, graph: ModelGraph, layers: list[str] | None) -> tuple[list[str], BiasCorrectionReport]:
    report = BiasCorrectionReport()
    targets = []
    for name in dict.fromkeys(n.name for n in graph.module_nodes()):  # execution order
        module = sim.model.get_submodule(name)
        if not is_weight_layer(module) or (layers is not None and name not in layers):
            continue
        quantizer = param_quantizer(module)
        if quantizer is None or not quantizer.enabled:
            report.skipped[name] = "weights are not quantized"
        elif graph.calls(name) != 1:
            report.skipped[name] = f"called {graph.calls(name)} times (shared weights)"
        else:
            targets.append(name)
    return targets, report


def _apply(sim: QuantSim, name: str, delta: torch.Tensor, report: BiasCorrectionReport) -> None:
    module = sim.model.get_submodule(name)
    add_to_bias(module, delta)
    bias_quantizer = param_quantizer(module, "bias")
    if bias_quantizer is not None and not bias_quantizer.frozen:  # keep its grid covering the new bias
        bias_quantizer.encode_from(module.bias)
    report.corrected[name] = delta.float()


# -- empirical ---------------------------------------------------------------------------------------------
def _channel_means(sim: QuantSim, names: list[str], batches: list[tuple[tuple, dict]]) -> dict[str, torch.Tensor]:
    """Mean of each named layer's output per output channel over all batches (stops after the last one)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    last = names[-1]

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            dim = output_channel_dim(module, output.dim())
            reduce = [d for d in range(output.dim()) if d != dim]
            total = output.detach().double().sum(dim=reduce)
            sums[name] = sums[name] + total if name in sums else total
            counts[name] += output.numel() // output.shape[dim]
            if name == last:
                raise StopForward

        return record

    handles = [sim.model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        run_until_stopped(sim.model, batches)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in names}


def _correct_empirically(
    sim: QuantSim,
    targets: list[str],
    data: Iterable[Any],
    num_batches: int | None,
    report: BiasCorrectionReport,
    progress: bool,
) -> None:
    batches = list(sim.batches(data, num_batches, desc="correct_bias (or pass data=None)"))
    if not targets:
        return
    with training_mode(sim.model, False):
        with quantizers_disabled(sim.model):
            float_means = _channel_means(sim, targets, batches)
        for name in tqdm(targets, desc="bias correction", disable=not progress):
            quantized_mean = _channel_means(sim, [name], batches)[name]
            _apply(sim, name, float_means[name] - quantized_mean, report)


# -- analytical --------------------------------------------------------------------------------------------
def clipped_normal_mean(
    mean: torch.Tensor, std: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor
) -> torch.Tensor:
    """``E[clamp(X, lower, upper)]`` for ``X ~ N(mean, std^2)`` (bounds may be infinite)."""
    std = std.clamp_min(1e-12)
    normal = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    alpha, beta = (lower - mean) / std, (upper - mean) / std
    cdf_alpha, cdf_beta = normal.cdf(alpha), normal.cdf(beta)
    pdf_alpha = torch.where(torch.isfinite(alpha), normal.log_prob(alpha.clamp(-1e6, 1e6)).exp(), 0.0)
    pdf_beta = torch.where(torch.isfinite(beta), normal.log_prob(beta.clamp(-1e6, 1e6)).exp(), 0.0)
    below = torch.where(torch.isfinite(lower), lower * cdf_alpha, 0.0)
    above = torch.where(torch.isfinite(upper), upper * (1 - cdf_beta), 0.0)
    return below + above + mean * (cdf_beta - cdf_alpha) + std * (pdf_alpha - pdf_beta)


def _input_expectation(
    sim: QuantSim, node: GraphNode, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor | None, str]:
    """E[x] per input channel of ``node``'s layer from the BN statistics before it, or (None, why not)."""
    lower = upper = None
    producer = node.inputs[0] if len(node.inputs) == 1 else None
    while producer is not None and producer.kind == "module":
        module = sim.model.get_submodule(producer.name)
        if isinstance(module, BATCH_NORM_TYPES) or (is_weight_layer(module) and producer.name in stats):
            break
        if isinstance(module, (nn.Identity, nn.Dropout)):
            pass  # keeps values and channels
        elif lower is None and isinstance(module, (nn.ReLU, nn.Hardtanh, ChannelClamp)):
            lower, upper = _activation_bounds(module)
        else:
            return None, f"{producer.name} ({type(module).__name__}) between the statistics and the layer"
        producer = producer.inputs[0] if len(producer.inputs) == 1 else None
    if producer is None or producer.kind != "module":
        return None, "no BatchNorm statistics precede this layer"
    module = sim.model.get_submodule(producer.name)
    if isinstance(module, BATCH_NORM_TYPES):
        channels = module.num_features
        ones = torch.ones(channels, dtype=torch.float64, device=module.running_mean.device)
        mean = module.bias.detach().double() if module.bias is not None else 0 * ones
        std = module.weight.detach().double().abs() if module.weight is not None else ones
    else:
        mean, std = (t.double() for t in stats[producer.name])
    if lower is None:
        return mean, ""
    return clipped_normal_mean(mean, std, lower.to(mean), upper.to(mean)), ""


def _activation_bounds(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(module, ChannelClamp):
        return module.lower.double(), module.upper.double()
    if isinstance(module, nn.Hardtanh):
        return torch.tensor(float(module.min_val)), torch.tensor(float(module.max_val))
    return torch.tensor(0.0), torch.tensor(float("inf"))


def _correct_analytically(
    sim: QuantSim,
    graph: ModelGraph,
    targets: list[str],
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
    report: BiasCorrectionReport,
) -> None:
    nodes = {n.name: n for n in graph.module_nodes()}
    for name in targets:
        expected_input, reason = _input_expectation(sim, nodes[name], stats)
        if expected_input is None:
            report.skipped[name] = reason
            continue
        module = sim.model.get_submodule(name)
        weight = module.weight.detach()
        quantized = module.param_quantizers["weight"](weight)
        _apply(sim, name, -weights_times_input(quantized - weight, module, expected_input), report)
