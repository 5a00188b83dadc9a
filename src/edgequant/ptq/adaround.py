"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Nearest rounding minimises each weight's own error, not the error of the layer's output; AdaRound learns, per
weight, whether to round down or up so that the layer (followed by its fused ReLU/ReLU6, and a BatchNorm in
between when it was not folded) reproduces the FP32 output on calibration data. Per layer it optimises ``V``
in ``w_soft = s * clamp(floor(w/s) + h(V), grid)`` with the rectified sigmoid
``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` (zeta=1.1, gamma=-0.1), initialised so that
``h(V) = frac(w/s)``, under ``reconstruction MSE + reg_param * sum(1 - |2h(V) - 1|^beta)`` with ``beta``
cosine-annealed from 20 to 2 after a warm start without regularisation, then rounds hard (``h = V >= 0``).

**Data collection.** The FP32 targets of every layer are collected in ONE pass over the calibration set
(all target layers hooked at once, quantizers off). The layer's *quantized* input must reflect the already
AdaRounded earlier layers (``refresh_inputs=True``, the default): before each layer the quantized model runs
only up to that layer and is stopped there by an exception from its hook, so L layers cost ~L/2 passes of
partial forwards, small next to 10k optimisation steps per layer. ``refresh_inputs=False`` caches every
layer's quantized input in the same single pass instead (no per-layer runs at all), but then the inputs carry
the noise of *nearest*-rounded upstream weights, and AdaRound learns to compensate an error that the rounded
model no longer makes: on the digits CNN (W3 per-tensor) that fell to 76% top-1 against 97.6% with refreshed
inputs and 95.8% with nearest rounding, so it is only offered for quick experiments. Cached tensors live in
a `LayerCache` (in memory up to ``memory_budget_mb``, spilled to disk beyond).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from edgequant.ptq.layer_cache import LayerCache
from edgequant.ptq.sim_helpers import StopForward, run_until_stopped
from edgequant.quantization import Encoding, Quantizer, quantize_dequantize
from edgequant.sim import QuantizedModule, QuantSim
from edgequant.sim.graph import GraphNode
from edgequant.sim.modes import quantizers_disabled, training_mode
from edgequant.sim.quantized_module import param_quantizer

ZETA, GAMMA = 1.1, -0.1
"""Stretch of the rectified sigmoid (the paper's values): h reaches exactly 0 and 1 with a finite V."""

ADAROUND_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


@dataclass
class LayerRounding:
    """What AdaRound did to one layer; MSEs are of the layer output (after its activation) vs FP32."""

    name: str
    iterations: int
    nearest_mse: float
    adaround_mse: float
    flipped_fraction: float  # weights rounded the other way than nearest rounding would
    seconds: float


@dataclass
class AdaRoundResult:
    layers: list[LayerRounding] = field(default_factory=list)
    collect_seconds: float = 0.0
    optimize_seconds: float = 0.0
    bytes_spilled: int = 0

    def summary(self) -> str:
        lines = [f"{'layer':<40} {'iters':>6} {'nearest MSE':>12} {'AdaRound MSE':>12} {'flipped':>8} {'s':>6}"]
        for r in self.layers:
            lines.append(
                f"{r.name:<40} {r.iterations:>6} {r.nearest_mse:>12.4g} {r.adaround_mse:>12.4g} "
                f"{r.flipped_fraction:>8.2%} {r.seconds:>6.2f}"
            )
        lines.append(f"data collection {self.collect_seconds:.2f} s, optimisation {self.optimize_seconds:.2f} s")
        return "\n".join(lines)


@dataclass
class _Target:
    name: str
    layer: QuantizedModule
    quantizer: Quantizer
    chain: list[tuple[nn.Module, tuple, dict]]  # ops applied to the layer output before the loss


@dataclass(frozen=True)
class AdaRoundSettings:
    """How `adaround` rounds (the loss, its optimisation, the seed) and collects layer data; its keywords are
    these field names (``adaround(sim, data, num_iterations=300)``).

    ``per_layer_iterations`` overrides ``num_iterations`` by layer name (``0`` leaves that layer to nearest
    rounding). ``learning_rate`` is Adam's on V (the paper's 1e-3 suits 10k iterations; with a few hundred, V
    cannot move far enough to flip many roundings). ``refresh_inputs`` and ``memory_budget_mb``: see the module
    doc.
    """

    num_iterations: int = 10000
    reg_param: float = 0.01
    beta_range: tuple[float, float] = (20.0, 2.0)
    warm_start: float = 0.2
    batch_size: int = 32
    learning_rate: float = 1e-3
    per_layer_iterations: dict[str, int] | None = None
    seed: int = 0
    num_batches: int | None = None
    memory_budget_mb: float = 1024.0
    refresh_inputs: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.num_iterations < 0:
            raise ValueError(f"num_iterations must be >= 0, got {self.num_iterations}")
        if not 0.0 <= self.warm_start < 1.0:
            raise ValueError(
                f"warm_start is the unregularised fraction of iterations, in [0, 1); got {self.warm_start}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if len(self.beta_range) != 2 or min(self.beta_range) <= 0:
            raise ValueError(f"beta_range must be (start, end) with positive values, got {self.beta_range}")
        for name, count in (self.per_layer_iterations or {}).items():
            if count < 0:
                raise ValueError(f"per_layer_iterations[{name!r}] must be >= 0, got {count}")


def adaround(
    sim: QuantSim, data: Iterable[Any], settings: AdaRoundSettings | None = None, **keywords: Any
) -> AdaRoundResult:
    """Learn the rounding of every Conv1d/Conv2d/ConvTranspose2d/Linear weight of ``sim`` (in place) with
    ``settings``, or the settings the keywords name (with ``settings``, they replace its fields).

    ``data`` yields calibration batches as `QuantSim.calibrate` accepts them (labels ignored); it is iterated
    once, and once more per layer (up to that layer only) with ``refresh_inputs=True``. Weight encodings are
    the sim's (computed from the weights where absent); activation quantizers without an encoding are left
    off while collecting inputs.
    Afterwards each rounded layer's weight holds its quantized-dequantized AdaRounded value and its weight
    encoding is frozen, so later calibration keeps it.
    The FP32 reference is the sim with its quantizers off, so run AdaRound once, on a sim whose weights are
    still the float ones.
    """
    settings = replace(settings or AdaRoundSettings(), **keywords)
    targets = _find_targets(sim)
    iterations = _iterations_per_layer(targets, settings.num_iterations, settings.per_layer_iterations)
    targets = [t for t in targets if iterations[t.name] > 0]
    result = AdaRoundResult()
    if not targets:
        warnings.warn("adaround: the sim has no enabled Conv/Linear weight quantizer to round", stacklevel=2)
        return result
    _prepare_encodings(sim, targets)
    generator = torch.Generator(device=sim.device).manual_seed(settings.seed)
    # BatchNorm must use its running statistics, in the passes and in the activation chains
    with training_mode(sim.model, False):
        _run(sim, data, targets, iterations, result, generator, settings)
    return result


def _prepare_encodings(sim: QuantSim, targets: list[_Target]) -> None:
    """Weight encodings from the weights where absent (an integer grid is required); a warning for activation
    quantizers that will be left off for lack of an encoding."""
    for target in targets:
        target.quantizer.require_integer_grid("AdaRound")
        if target.quantizer.encoding is None:
            target.quantizer.encode_from(target.layer.weight)
    uncalibrated = [name for name, q in sim.quantizers().items() if q.enabled and q.encoding is None]
    if uncalibrated:
        warnings.warn(
            f"adaround: {len(uncalibrated)} quantizers have no encoding and are left off while collecting layer "
            f"inputs (e.g. {uncalibrated[0]}); calibrate the sim first to include activation quantization",
            stacklevel=3,
        )


def _run(sim: QuantSim, data: Iterable[Any], targets: list[_Target], iterations: dict[str, int],
         result: AdaRoundResult, generator: torch.Generator, settings: AdaRoundSettings) -> None:
    """Collect, then round layer by layer in execution order, filling ``result``; with ``progress``, one bar over all
    iterations (its ETA includes the input refreshes) and, once the first layer is rounded, the projected total."""
    with LayerCache(settings.memory_budget_mb) as cache:
        start = time.perf_counter()
        targets = _collect(sim, targets, data, settings.num_batches, cache,
                           collect_inputs=not settings.refresh_inputs, progress=settings.progress)
        pass_seconds = time.perf_counter() - start
        result.collect_seconds += pass_seconds
        counts = [iterations[t.name] for t in targets]
        with tqdm(total=sum(counts), desc="adaround", unit="it", disable=not settings.progress) as bar:
            for target in targets:
                bar.set_postfix_str(target.name)
                if settings.refresh_inputs:
                    start = time.perf_counter()
                    _collect_inputs_up_to(sim, target, data, settings.num_batches, cache)
                    result.collect_seconds += time.perf_counter() - start
                start = time.perf_counter()
                inputs = cache.get((target.name, "input"), sim.device)
                outputs = cache.get((target.name, "target"), sim.device)
                cache.drop((target.name, "input"))
                cache.drop((target.name, "target"))
                layer_result = _round_layer(target, inputs, outputs, iterations[target.name], settings, generator,
                                            bar)
                layer_result.seconds = time.perf_counter() - start
                result.optimize_seconds += layer_result.seconds
                result.layers.append(layer_result)
                if settings.progress and len(result.layers) == 1:
                    elapsed = result.collect_seconds + result.optimize_seconds
                    bar.write(time_estimate(layer_result, elapsed, pass_seconds if settings.refresh_inputs else 0.0,
                                            counts))
        result.bytes_spilled = cache.bytes_spilled


def time_estimate(first: LayerRounding, elapsed: float, pass_seconds: float, iterations: list[int]) -> str:
    """One line projecting the whole run from its first rounded layer, so a user learns early whether the
    iteration count fits the machine (the paper's 10,000 per layer take hours on a CPU).

    ``elapsed``: seconds so far; ``iterations``: per layer, in the order rounded. Each later layer is taken to cost
    the first one's time per iteration, plus refreshing its inputs: ``k / L`` of ``pass_seconds`` (one pass over
    the data; 0 without refreshed inputs) for the k-th of L layers, as the model runs up to that layer.
    """
    per_iteration = first.seconds / max(first.iterations, 1)
    count = len(iterations)
    refreshes = pass_seconds * sum(k / count for k in range(1, count))
    total = elapsed + per_iteration * sum(iterations[1:]) + refreshes
    return (f"adaround: first layer ({first.name}, {first.iterations:,} iterations) done after {_duration(elapsed)}; "
            f"all {count} layers ({sum(iterations):,} iterations) will take about {_duration(total)}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# -- which layers, and what follows them ------------------------------------------------------------------
def _find_targets(sim: QuantSim) -> list[_Target]:
    chains = _activation_chains(sim)
    targets = []
    for name, module in sim.quantized_modules().items():
        quantizer = param_quantizer(module)
        if isinstance(module, ADAROUND_LAYER_TYPES) and quantizer is not None and quantizer.enabled:
            targets.append(_Target(name, module, quantizer, chains.get(name, [])))
    return targets


def _activation_chains(sim: QuantSim) -> dict[str, list[tuple[nn.Module, tuple, dict]]]:
    """For each layer: the BatchNorm(s) and ReLU/ReLU6 the graph says are fused after it, with their non-tensor
    arguments.

    This is the fused supergroup activation the hardware applies before writing the output, so AdaRound
    reconstructs the tensor after it (a negative pre-activation error below zero costs nothing).
    """
    graph = sim.graph()
    chains = {}
    for node in graph.module_nodes():
        chain = [_chain_step(fused) for fused in graph.fused_after(node)]
        if chain:
            chains[node.name] = chain
    return chains


def _chain_step(node: GraphNode) -> tuple[nn.Module, tuple, dict]:
    if node.call is None:  # read from an untraceable nn.Sequential: called with the tensor alone
        return node.module, (), {}
    return node.module, tuple(node.call.args[1:]), dict(node.call.kwargs)


def _iterations_per_layer(
    targets: list[_Target], num_iterations: int, per_layer_iterations: dict[str, int] | None
) -> dict[str, int]:
    iterations = {t.name: num_iterations for t in targets}
    for name, count in (per_layer_iterations or {}).items():
        if name not in iterations:
            raise ValueError(
                f"per_layer_iterations names {name!r}, which is not a layer AdaRound rounds; "
                f"use one of: {', '.join(iterations) or '(none)'}"
            )
        iterations[name] = count
    return iterations


# -- float computations on the sim's modules ----------------------------------------------------------------
def _float_forward(module: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The module's original (unquantized) forward, bypassing its quantizers."""
    if isinstance(module, QuantizedModule):
        return super(QuantizedModule, module).forward(*args, **kwargs)
    return module(*args, **kwargs)


def _layer_output(target: _Target, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Layer (with ``weight`` in place of its own, bias not trained) followed by its activation chain."""
    layer = target.layer
    original = dict(layer._parameters)
    layer._parameters["weight"] = weight
    if layer._parameters.get("bias") is not None:
        layer._parameters["bias"] = original["bias"].detach()
    try:
        out = _float_forward(layer, x)
    finally:
        layer._parameters.update(original)
    return _apply_chain(target, out)


def _apply_chain(target: _Target, out: torch.Tensor) -> torch.Tensor:
    for module, args, kwargs in target.chain:
        out = _float_forward(module, out, *args, **kwargs)
    return out


def _encoded_quantizers_only(sim: QuantSim):  # noqa: ANN202 - a context manager
    """Quantizers on as configured, except those that have no encoding yet."""
    return sim.quantizers_enabled(False, [q for q in sim.quantizers().values() if q.encoding is None])


def _layer_input(layer: QuantizedModule, args: tuple) -> torch.Tensor:
    if not args or not isinstance(args[0], torch.Tensor):
        raise ValueError(f"adaround: layer {type(layer).__name__} was called without a tensor input")
    quantizer = layer.input_quantizers["0"] if "0" in layer.input_quantizers else None
    return quantizer(args[0]) if quantizer is not None else args[0]


# -- data collection -------------------------------------------------------------------------------------
def _collect(
    sim: QuantSim, targets: list[_Target], data: Iterable[Any], num_batches: int | None, cache: LayerCache,
    collect_inputs: bool, progress: bool,
) -> list[_Target]:
    """One pass: FP32 targets (and quantized inputs) of every layer; returns the layers in execution order."""
    calls: dict[str, int] = {}
    order: list[str] = []
    handles = []
    recording = {"fp32": False}

    def on_input(target: _Target):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple) -> None:
            if recording["fp32"]:
                calls[target.name] = calls.get(target.name, 0) + 1
                if target.name not in order:
                    order.append(target.name)
            elif collect_inputs:
                cache.add((target.name, "input"), _layer_input(module, args))
        return hook

    def on_output(target: _Target):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if recording["fp32"]:  # the activation is applied here, not hooked: ReLU modules are often shared
                cache.add((target.name, "target"), _apply_chain(target, output))
        return hook

    for target in targets:
        handles.append(target.layer.register_forward_pre_hook(on_input(target)))
        handles.append(target.layer.register_forward_hook(on_output(target)))
    try:
        with torch.no_grad():
            for args, kwargs in sim.batches(data, num_batches, progress=progress, desc="adaround: caching layer data"):
                calls.clear()
                recording["fp32"] = True
                with quantizers_disabled(sim.model):
                    sim.model(*args, **kwargs)
                recording["fp32"] = False
                if collect_inputs:
                    with _encoded_quantizers_only(sim):
                        sim.model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    by_name = {t.name: t for t in targets}
    shared = [name for name, count in calls.items() if count > 1]
    if shared:
        warnings.warn(f"adaround: skipping layers called more than once per forward: {shared}", stacklevel=3)
    unused = [t.name for t in targets if t.name not in calls]
    if unused:
        warnings.warn(f"adaround: skipping layers the data never reaches: {unused}", stacklevel=3)
    return [by_name[name] for name in order if name not in shared]


def _collect_inputs_up_to(
    sim: QuantSim, target: _Target, data: Iterable[Any], num_batches: int | None, cache: LayerCache
) -> None:
    """Quantized inputs of one layer with all earlier layers as rounded so far; the run stops at the layer."""

    def hook(module: nn.Module, args: tuple) -> None:
        cache.add((target.name, "input"), _layer_input(module, args))
        raise StopForward

    handle = target.layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), _encoded_quantizers_only(sim):
            run_until_stopped(sim.model, sim.batches(data, num_batches, desc=f"adaround: inputs of {target.name}"))
    finally:
        handle.remove()


# -- the optimisation ------------------------------------------------------------------------------------
def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) of the paper: a sigmoid stretched to (gamma, zeta) and clipped to [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _initial_v(fraction: torch.Tensor) -> torch.Tensor:
    """V with h(V) = fraction (fraction in [0, 1), so the logit argument stays inside (0, 1))."""
    p = (fraction - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1.0 - p))


def _beta(iteration: int, num_iterations: int, warm_start: float, beta_range: tuple[float, float]) -> float:
    """Cosine annealing from beta_range[0] to beta_range[1] over the iterations after the warm start."""
    warm_end = warm_start * num_iterations
    progress = (iteration - warm_end) / max(num_iterations - warm_end, 1.0)
    start, end = beta_range
    return end + 0.5 * (start - end) * (1.0 + math.cos(progress * math.pi))


def weight_grid(encoding: Encoding, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale and lowest/highest grid integer of a weight encoding, shaped to broadcast against ``weight`` (per block:
    repeated over each block, so the rounding is learned element for element as per channel)."""
    scale, low = (v.to(weight.device) for v in encoding.broadcast_to(weight.shape))
    return scale, low, low + encoding.num_steps


def _reconstruction_loss(out: torch.Tensor, target: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Squared error summed over output channels, averaged over samples and positions (as in AIMET)."""
    channel_dim = -1 if isinstance(layer, nn.Linear) or out.dim() <= 2 else 1
    return (out - target).square().sum(dim=channel_dim).mean()


def _round_layer(
    target: _Target, inputs: torch.Tensor, outputs: torch.Tensor, num_iterations: int, settings: AdaRoundSettings,
    generator: torch.Generator, bar: tqdm,
) -> LayerRounding:
    layer, encoding = target.layer, target.quantizer.encoding
    weight = layer.weight.detach()
    scale, low, high = weight_grid(encoding, weight)
    scaled = weight.float() / scale
    floor = torch.floor(scaled)
    v = nn.Parameter(_initial_v(scaled - floor))
    optimizer = torch.optim.Adam([v], lr=settings.learning_rate)
    warm_end = int(settings.warm_start * num_iterations)
    num_samples, batch = inputs.shape[0], min(settings.batch_size, inputs.shape[0])
    for iteration in range(num_iterations):
        index = torch.randint(num_samples, (batch,), device=inputs.device, generator=generator)
        h = rectified_sigmoid(v)
        soft_weight = (torch.clamp(floor + h, low, high) * scale).to(weight.dtype)
        loss = _reconstruction_loss(_layer_output(target, inputs[index], soft_weight), outputs[index], layer)
        if iteration >= warm_end:
            beta = _beta(iteration, num_iterations, settings.warm_start, settings.beta_range)
            loss = loss + settings.reg_param * (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update()
    with torch.no_grad():
        rounded = (torch.clamp(floor + (v >= 0).float(), low, high) * scale).to(weight.dtype)
        nearest = quantize_dequantize(weight, scale, low, encoding.bitwidth, strict_symmetric=encoding.strict_symmetric)
        nearest_mse = _output_mse(target, inputs, outputs, nearest)
        adaround_mse = _output_mse(target, inputs, outputs, rounded)
        flipped = float((rounded != nearest).float().mean())
        layer.weight.copy_(rounded)
    target.quantizer.frozen = True
    return LayerRounding(target.name, num_iterations, nearest_mse, adaround_mse, flipped, 0.0)


def _output_mse(target: _Target, inputs: torch.Tensor, outputs: torch.Tensor, weight: torch.Tensor,
                chunk: int = 256) -> float:
    """Reconstruction loss over all cached samples (chunked to bound memory)."""
    total = 0.0
    for start in range(0, inputs.shape[0], chunk):
        out = _layer_output(target, inputs[start:start + chunk], weight)
        total += float(_reconstruction_loss(out, outputs[start:start + chunk], target.layer)) * out.shape[0]
    return total / inputs.shape[0]

