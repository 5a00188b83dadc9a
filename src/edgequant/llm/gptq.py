"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Round-to-nearest minimises each weight's own error; GPTQ rounds the input columns of a Linear weight one after the
other and spreads each column's rounding error over the columns not yet rounded, weighted by the inverse of the
layer's input Hessian ``H = 2 X Xᵀ``, so that the layer's output on the calibration inputs moves as little as
possible (the Optimal Brain Surgeon update, done in the order of the paper's Algorithm 1: dampening
``damping * mean(diag H)`` on the diagonal, optional act-order, the upper Cholesky factor of ``H⁻¹``, lazy updates of
``block_size`` columns at a time).

The grid is the sim's: GPTQ chooses the integers, the weight quantizer's existing encoding (per tensor, per channel,
per block or LPBQ) gives the scales and offsets, fixed before any column is rounded (with act-order and blocks this
is the "static groups" variant). Each Linear's ``H`` comes from its inputs as the sim computes them: quantized
activations, and the weights of the layers before it already rounded by GPTQ. Layers are done one at a time in
execution order, each with a pass over the calibration batches that stops once the layer has run, so only one
Hessian is held at a time.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from edgequant.llm.block_inputs import BlockForwards
from edgequant.llm.input_sharing import input_sharing_groups
from edgequant.llm.resume import open_progress
from edgequant.quantization import Quantizer, quantize_dequantize
from edgequant.sim import QuantSim
from edgequant.sim.modes import training_mode
from edgequant.sim.quantized_module import param_quantizer


@dataclass(frozen=True)
class GptqSettings:
    """How `gptq` rounds. ``damping`` is the paper's percdamp (a fraction of the mean Hessian diagonal added to the
    diagonal, so that ``H`` inverts stably); ``act_order`` rounds the columns with the largest Hessian diagonal first;
    ``block_size`` is the number of columns between two lazy batch updates (speed only, the result is the same up to
    float rounding); ``num_batches`` limits the calibration batches used. With ``resume_dir``, each rounded layer is
    kept there as it finishes and a rerun of the same rounding goes on from where the last one stopped
    (`edgequant.llm.resume`)."""

    damping: float = 0.01
    act_order: bool = True
    block_size: int = 128
    num_batches: int | None = None
    progress: bool = True
    resume_dir: str | Path | None = None

    def __post_init__(self) -> None:
        if not self.damping >= 0.0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_batches is not None and self.num_batches < 1:
            raise ValueError(f"num_batches must be None or >= 1, got {self.num_batches}")


@dataclass
class GptqLayer:
    """What GPTQ did to one Linear: the relative error ``||X Wqᵀ - X Wᵀ||² / ||X Wᵀ||²`` of its matmul output (bias
    excluded) on the calibration inputs ``X``, with the encoding's nearest rounding and with GPTQ's."""

    name: str
    tokens: int
    nearest_error: float
    gptq_error: float
    seconds: float


@dataclass
class GptqReport:
    layers: list[GptqLayer] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{'layer':<40} {'tokens':>8} {'nearest err':>12} {'GPTQ err':>12} {'s':>7}"]
        for r in self.layers:
            lines.append(f"{r.name:<40} {r.tokens:>8} {r.nearest_error:>12.4g} {r.gptq_error:>12.4g} {r.seconds:>7.2f}")
        lines.append(f"total {self.seconds:.2f} s")
        return "\n".join(lines)


class _LayerDone(Exception):
    """Raised by a hook once the layer of interest has run its last call: the rest of the model need not run."""


def gptq(sim: QuantSim, batches: Iterable[Any], settings: GptqSettings = GptqSettings(), *,
         layers: Iterable[str] | None = None) -> GptqReport:
    """Round the weights of every ``nn.Linear`` of ``sim.model`` (or of the named ``layers``) whose weight quantizer
    is enabled and has an integer encoding, with GPTQ on the encoding's grid, in place.

    ``batches`` are calibration batches as `QuantSim.calibrate` takes them (tensors, tuples of inputs, dicts of
    keyword inputs); the first ``num_batches`` are held and run once per group of layers up to that group, from the
    cached inputs of its decoder block where the model is a decoder stack (`BlockForwards`). Calibrate the sim
    before: activation quantizers without an encoding are left off while the inputs are collected. Afterwards each
    rounded weight holds its dequantized GPTQ values, which its quantizer maps onto the same integers, and its
    encoding is frozen so that later calibration keeps the grid GPTQ rounded onto. Linears whose weight another
    module shares (tied embeddings) are skipped: rounding them would change that module too.
    """
    start = time.perf_counter()
    data = list(batches) if isinstance(batches, Iterator) else batches
    report = GptqReport()
    was_frozen = sim.weights_frozen
    sim.unfreeze_weights()  # the float weights and their encodings are read and written
    try:
        targets = _targets(sim, layers)
        with torch.no_grad(), training_mode(sim.model, False), _encoded_quantizers_only(sim):
            sharing = input_sharing_groups(_execution_order(sim, targets, data), calls=lambda entry: entry[1],
                                           first_input=lambda entry: entry[2])
            groups = [[(name, calls) for name, calls, _ in group] for group in sharing]  # inputs only compared
            del sharing
            bar = tqdm(total=sum(len(group) for group in groups), desc="gptq", disable=not settings.progress,
                       leave=False)
            held = list(sim.batches(data, settings.num_batches))
            forwards = BlockForwards(sim, held, targets)
            progress = open_progress("gptq", settings, [name for group in groups for name, _ in group], held, sim)
            for group in groups:
                bar.set_postfix_str(group[0][0])
                pending, restored = progress.unfinished(group, lambda entry: entry[0], lambda entry: targets[entry[0]])
                report.layers.extend(GptqLayer(**fields) for fields in restored)
                bar.update(len(restored))
                if not pending:
                    continue
                hessians = _hessians(forwards, {name: (targets[name], calls) for name, calls in pending})
                for name, _ in pending:
                    report.layers.append(_round_layer(name, targets[name], *hessians[name], settings))
                    progress.save(name, targets[name], dataclasses.asdict(report.layers[-1]))
                    bar.update()
            bar.close()
    finally:
        if was_frozen:
            sim.freeze_weights()
    report.seconds = time.perf_counter() - start
    return report


# -- which layers, in which order ------------------------------------------------------------------------------
def _targets(sim: QuantSim, layers: Iterable[str] | None) -> dict[str, nn.Linear]:
    """The Linears to round by name; a named layer that cannot be rounded is an error, others are skipped."""
    modules = sim.quantized_modules()
    shared = _shared_weights(sim.model)
    if layers is None:
        chosen = {name: m for name, m in modules.items() if isinstance(m, nn.Linear) and _rounding_problem(m) is None}
        tied = [name for name in chosen if name in shared]
        if tied:
            warnings.warn(f"gptq: skipping Linears whose weight other modules share: {tied}", stacklevel=3)
        return {name: m for name, m in chosen.items() if name not in shared}
    chosen = {}
    for name in layers:
        module = modules.get(name)
        problem = ("is not a layer of the sim" if module is None else "is not an nn.Linear"
                   if not isinstance(module, nn.Linear) else _rounding_problem(module)
                   or (f"shares its weight with {shared[name]}" if name in shared else None))
        if problem:
            raise ValueError(f"gptq: layer {name!r} {problem}")
        chosen[name] = module
    return chosen


def _rounding_problem(layer: nn.Linear) -> str | None:
    """Why GPTQ cannot round ``layer``'s weight, or None."""
    quantizer = param_quantizer(layer)
    if quantizer is None or not quantizer.enabled:
        return "has no enabled weight quantizer"
    if quantizer.encoding is None:
        return "has a weight quantizer without an integer encoding (calibrate the sim first)"
    return None


def _shared_weights(model: nn.Module) -> dict[str, str]:
    """Module name -> another module holding the same weight tensor (tied weights)."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        module, _, attribute = name.rpartition(".")
        if attribute == "weight":
            owners.setdefault(id(param), []).append(module)
    return {name: next(o for o in names if o != name) for names in owners.values() if len(names) > 1
            for name in names}


def _encoded_quantizers_only(sim: QuantSim):  # noqa: ANN202 - a context manager
    """Quantizers on as configured, except those that cannot quantize yet (no encoding)."""
    return sim.quantizers_enabled(False, [q for q in sim.quantizers().values() if not q.ready])


def _execution_order(sim: QuantSim, targets: dict[str, nn.Linear],
                     data: Iterable[Any]) -> list[tuple[str, int, torch.Tensor]]:
    """(name, calls per forward, its first input tensor) of the targets in the order the first batch first reaches
    them; layers it never reaches are skipped with a warning. Holding the inputs keeps their memory from being
    reused, so that the same object means the same input."""
    calls: dict[str, int] = {}
    first_input: dict[str, torch.Tensor] = {}

    def counter(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple) -> None:
            calls[name] = calls.get(name, 0) + 1
            first_input.setdefault(name, args[0])
        return hook

    handles = [layer.register_forward_pre_hook(counter(name)) for name, layer in targets.items()]
    try:
        for args, kwargs in sim.batches(data, 1):
            sim.model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    unused = [name for name in targets if name not in calls]
    if unused:
        warnings.warn(f"gptq: skipping Linears the data never reaches: {unused}", stacklevel=3)
    return [(name, count, first_input[name]) for name, count in calls.items()]


# -- one layer ----------------------------------------------------------------------------------------------
def _round_layer(name: str, layer: nn.Linear, hessian: torch.Tensor, tokens: int, seconds: float,
                 settings: GptqSettings) -> GptqLayer:
    start = time.perf_counter()
    quantizer = param_quantizer(layer)
    weight = layer.weight.detach().float()
    rounded = gptq_round(weight, hessian, quantizer, settings.damping, settings.act_order, settings.block_size)
    nearest = quantizer(layer.weight.detach()).float()
    nearest_error = _relative_error(weight, nearest, hessian)
    gptq_error = _relative_error(weight, rounded, hessian)
    layer.weight.copy_(rounded.to(layer.weight.dtype))
    quantizer.frozen = True
    return GptqLayer(name, tokens, nearest_error, gptq_error, seconds + time.perf_counter() - start)


def _hessians(forwards: BlockForwards, layers: dict[str, tuple[nn.Linear, int]]
              ) -> dict[str, tuple[torch.Tensor, int, float]]:
    """Per layer, ``Σ x xᵀ`` (float64) over the tokens of its quantized inputs (constant factors cancel in GPTQ),
    the token count and the seconds its share of the pass took; each forward (from the layers' decoder block where
    there is one) stops after the last call of the last of ``layers``."""
    start = time.perf_counter()
    hessians = {name: torch.zeros(layer.in_features, layer.in_features, device=layer.weight.device,
                                  dtype=torch.float64) for name, (layer, _) in layers.items()}
    tokens = dict.fromkeys(layers, 0)
    seen = dict.fromkeys(layers, 0)

    def collector(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple) -> None:
            quantizers = module.input_quantizers
            x = quantizers["0"](args[0]) if "0" in quantizers else args[0]
            x = x.detach().reshape(-1, module.in_features).double()  # float32 sums over many tokens lose digits
            hessians[name].addmm_(x.T, x)
            tokens[name] += x.shape[0]
            seen[name] += 1
            if all(seen[other] == count for other, (_, count) in layers.items()):
                raise _LayerDone
        return hook

    handles = [layer.register_forward_pre_hook(collector(name)) for name, (layer, _) in layers.items()]
    try:
        forwards.run(list(layers), _LayerDone, before_each=lambda: seen.update(dict.fromkeys(layers, 0)))
    finally:
        for handle in handles:
            handle.remove()
    share = (time.perf_counter() - start) / len(layers)
    return {name: (hessians[name], tokens[name], share) for name in layers}


def _relative_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||X (Wq - W)ᵀ||² / ||X Wᵀ||²`` from ``H = Σ x xᵀ`` alone: ``tr(Δ H Δᵀ) / tr(W H Wᵀ)``."""
    h = hessian.double()
    delta, w = (rounded - weight).double(), weight.double()
    denominator = float(((w @ h) * w).sum())
    return float(((delta @ h) * delta).sum()) / denominator if denominator > 0 else 0.0


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, quantizer: Quantizer, damping: float = 0.01,
               act_order: bool = True, block_size: int = 128) -> torch.Tensor:
    """GPTQ's rounding of a Linear ``weight`` (out, in) onto ``quantizer``'s encoding, for the input Hessian
    ``hessian`` (in, in); returns the dequantized rounded weight (float32), which ``quantizer`` maps to itself.
    ``hessian`` is not modified."""
    quantizer.require_integer_grid("GPTQ")
    encoding = quantizer.encoding
    weight = weight.float().clone()
    scale, offset = (v.to(weight.device).expand(weight.shape) for v in encoding.broadcast_to(weight.shape))
    h = hessian.double().clone()  # factorised in float64, the columns are rounded in float32
    dead = torch.diagonal(h) == 0  # inputs that are always zero: their weights do not matter, round them to 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    columns = weight.shape[1]
    perm = (torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order
            else torch.arange(columns, device=weight.device))
    weight, scale, offset, h = weight[:, perm], scale[:, perm], offset[:, perm], h[perm][:, perm]
    h.diagonal().add_(damping * float(torch.diagonal(h).mean()))
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
    if int(info) != 0:
        raise ValueError(f"gptq: the Hessian of layer {quantizer.owner!r} is not positive definite after damping "
                         f"{damping}; use a larger damping")
    factor = factor.float()
    rounded = torch.empty_like(weight)
    for first in range(0, columns, block_size):
        last = min(first + block_size, columns)
        block = weight[:, first:last]  # a view: the columns' updates land in `weight`
        errors = torch.empty_like(block)
        inverse = factor[first:last, first:last]
        for i in range(last - first):
            j = first + i
            column = block[:, i]
            q = quantize_dequantize(column, scale[:, j], offset[:, j], encoding.bitwidth,
                                    strict_symmetric=encoding.strict_symmetric)
            rounded[:, j] = q
            errors[:, i] = (column - q) / inverse[i, i]
            block[:, i + 1:] -= errors[:, i:i + 1] * inverse[i:i + 1, i + 1:]
        weight[:, last:] -= errors @ factor[first:last, last:]
    return rounded[:, torch.argsort(perm)]
