"""Sequential MSE: weight encodings chosen by the error they cause in each layer's output, layer after layer.

Min-max weight encodings waste levels on outliers; at 4 bits a narrower range usually reproduces the layer's
output better. This follows AIMET's ``apply_seq_mse`` (``SeqMseParams(num_candidates=20, inp_symmetry="symqt",
loss_fn="mse")``): for every ``nn.Linear`` and ``nn.Conv2d`` with an enabled weight quantizer, in execution order,

* the layer's inputs ``x`` come from the sim with the earlier layers already on their chosen encodings
  (``inputs="quantized"``, AIMET's ``symqt``), or from the float model (``inputs="float"``, AIMET's ``symfp``);
  the reference output is ``x W`` and the candidate's ``x Q(W)`` on the same inputs;
* candidate ``i`` of ``num_candidates`` is the min-max range shrunk to ``i / num_candidates`` (min and max scaled
  together, so asymmetric weights are searched as well as symmetric ones); the last candidate is min-max;
* each scale of the weight quantizer gets the candidate that minimises its squared output error summed over the
  data: per output channel ``||x W_c - x Q(W_c)||^2``; per block, as AIMET does, the block's own contribution
  ``||x_b W_cb - x_b Q(W_cb)||^2`` (``x_b``: the inputs the block multiplies); per tensor, the whole output's error;
* LPBQ is searched as plain blocks and the chosen block scales are then put on the LPBQ grid (integer multiples
  of the per-channel scale), as AIMET does;
* the chosen encoding is installed and frozen, so a later calibration keeps it.

The squared errors are quadratic forms of the layer's input Gram matrix ``X^T X`` (per group of a grouped
convolution; a convolution's rows are its input patches): ``||X d||^2 = d^T (X^T X) d`` for a weight error ``d``.
So one layer's inputs are reduced to that matrix during one pass over the batches (the pass stops at the layer),
the memory does not grow with the data, and each candidate costs a product with the weight instead of a pass over
the data. It is accumulated in float64, so that near-equal candidates are told apart.

Differences from AIMET: activation quantizers that have an encoding stay on while the inputs are gathered (a
calibrated sim feeds each layer what it will feed it deployed; an uncalibrated one runs its activations in float,
as AIMET always does), and layers wider than 4 bits are searched too.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from edgequant.llm.block_inputs import BlockForwards
from edgequant.llm.input_sharing import input_sharing_groups
from edgequant.llm.resume import open_progress
from edgequant.quantization import Encoding, Lpbq, PerBlock, PerChannel, PerTensor, Quantizer, quantize_dequantize
from edgequant.sim import QuantizedModule, QuantSim
from edgequant.sim.modes import training_mode
from edgequant.sim.quantized_module import param_quantizer

INPUT_MODES = ("quantized", "float")
"""Where the layer inputs come from: the sim with earlier layers quantized (AIMET's ``symqt``) or the float model
(``symfp``)."""


@dataclass(frozen=True)
class SequentialMseSettings:
    """How `sequential_mse` searches: ``num_candidates`` ranges per scale, over the first ``num_batches`` batches
    (None: all), with ``inputs`` from the quantized sim or the float model (`INPUT_MODES`). With ``resume_dir``,
    each searched layer is kept there as it finishes and a rerun of the same search goes on from where the last one
    stopped (`edgequant.llm.resume`)."""

    num_candidates: int = 20
    num_batches: int | None = None
    inputs: str = "quantized"
    progress: bool = True
    resume_dir: str | Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_candidates, bool) or not isinstance(self.num_candidates, int) or \
                self.num_candidates < 1:
            raise ValueError(f"num_candidates must be an integer >= 1, got {self.num_candidates!r}")
        if self.num_batches is not None and self.num_batches < 1:
            raise ValueError(f"num_batches must be >= 1 (or None: all batches), got {self.num_batches}")
        if self.inputs not in INPUT_MODES:
            raise ValueError(f"inputs must be one of {', '.join(INPUT_MODES)}, got {self.inputs!r}")


@dataclass
class SequentialMseLayer:
    """One searched layer. MSEs are of the layer output (without bias) against its float weight, over the gathered
    inputs, with the whole weight on its min-max encoding and on the chosen one."""

    name: str
    minmax_mse: float
    chosen_mse: float
    mean_fraction: float  # mean over the scales of the chosen range / the min-max range
    candidate_counts: list[int]  # entry i: how many scales chose range (i + 1) / num_candidates
    seconds: float


@dataclass
class SequentialMseReport:
    layers: list[SequentialMseLayer] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{'layer':<40} {'min-max MSE':>12} {'chosen MSE':>12} {'range':>7} {'s':>6}"]
        for r in self.layers:
            lines.append(f"{r.name:<40} {r.minmax_mse:>12.4g} {r.chosen_mse:>12.4g} {r.mean_fraction:>7.1%} "
                         f"{r.seconds:>6.2f}")
        lines.append(f"total {self.seconds:.2f} s")
        return "\n".join(lines)


class _StopForward(Exception):
    """Raised by the layer's hook after its last call of a forward: the rest of the model need not run."""


@dataclass
class _Target:
    name: str
    layer: QuantizedModule
    quantizer: Quantizer
    calls: int = 0  # calls per forward, from the first batch
    first_input: torch.Tensor | None = None  # held during the order pass only: the same object, the same input


def sequential_mse(
    sim: QuantSim,
    batches: Iterable[Any],
    settings: SequentialMseSettings = SequentialMseSettings(),  # noqa: B008 - frozen, never mutated
    *,
    layers: Iterable[str] | None = None,
) -> SequentialMseReport:
    """Choose and freeze the weight encodings of ``sim``'s Linear and Conv2d layers (or of ``layers``, by name) that
    minimise each layer's output error; see the module doc.

    ``batches`` are what `QuantSim.calibrate` takes; the first ``num_batches`` are held for the run (one pass per
    group of layers, up to that group, from the cached inputs of its decoder block where the model is a decoder
    stack: `BlockForwards`). Weight encodings of every layer are computed from the weights first, as calibration
    would, so that the inputs carry the weight quantization of layers not searched here. Weight quantizers must be
    on an integer grid, per tensor, per output channel, or in blocks along the input channels (PerBlock, LPBQ)."""
    start = time.perf_counter()
    targets = _targets(sim, layers)
    report = SequentialMseReport()
    if not targets:
        warnings.warn("sequential_mse: no enabled Linear/Conv2d weight quantizer to search", stacklevel=2)
        return report
    was_frozen = sim.weights_frozen
    sim.unfreeze_weights()
    try:
        with torch.no_grad(), training_mode(sim.model, False):
            sim.compute_param_encodings()
            held = list(sim.batches(batches, settings.num_batches, progress=settings.progress,
                                    desc="sequential MSE: reading batches"))
            order = _in_execution_order(sim, targets, held[0])
            groups = input_sharing_groups(order, calls=lambda t: t.calls, first_input=lambda t: t.first_input)
            for target in order:
                target.first_input = None  # the order pass's tensors are no longer needed
            bar = tqdm(total=sum(len(group) for group in groups), desc="sequential MSE",
                       disable=not settings.progress, leave=False)
            names = [target.name for target in order]
            forwards = BlockForwards(sim, held, names)
            progress = open_progress("sequential_mse", settings, names, held, sim)
            for group in groups:
                pending, restored = progress.unfinished(group, lambda t: t.name, lambda t: t.layer)
                report.layers.extend(SequentialMseLayer(**fields) for fields in restored)
                bar.update(len(restored))
                if not pending:
                    continue
                group_start = time.perf_counter()
                grams = _input_grams(sim, forwards, pending, settings.inputs)
                share = (time.perf_counter() - group_start) / len(pending)
                for target, (gram, rows) in zip(pending, grams, strict=True):
                    layer_start = time.perf_counter()
                    result = _search(sim, target, gram, rows, settings.num_candidates)
                    result.seconds = share + time.perf_counter() - layer_start
                    report.layers.append(result)
                    progress.save(target.name, target.layer, dataclasses.asdict(result))
                    bar.update()
            bar.close()
    finally:
        if was_frozen:
            sim.freeze_weights()
    report.seconds = time.perf_counter() - start
    return report


# -- which layers ------------------------------------------------------------------------------------------
def _targets(sim: QuantSim, layers: Iterable[str] | None) -> list[_Target]:
    """The layers to search, checked before anything changes."""
    found = {}
    for name, module in sim.quantized_modules().items():
        quantizer = param_quantizer(module)
        if isinstance(module, (nn.Linear, nn.Conv2d)) and quantizer is not None and quantizer.enabled:
            found[name] = _Target(name, module, quantizer)
    if layers is not None:
        wanted = list(layers)
        unknown = [name for name in wanted if name not in found]
        if unknown:
            raise ValueError(f"sequential_mse: {unknown} are not Linear/Conv2d layers with an enabled weight "
                             f"quantizer; searchable layers: {', '.join(found) or '(none)'}")
        found = {name: found[name] for name in wanted}
    for target in found.values():
        _check_quantizer(target)
    return list(found.values())


def _check_quantizer(target: _Target) -> None:
    quantizer = target.quantizer
    quantizer.require_integer_grid("sequential MSE")
    granularity = quantizer.granularity
    supported = (
        isinstance(granularity, PerTensor)
        or (isinstance(granularity, PerChannel) and granularity.axes == (0,))
        or (isinstance(granularity, PerBlock) and (granularity.channel_axis, granularity.block_axis) == (0, 1))
    )
    if not supported:
        raise ValueError(
            f"sequential_mse: layer {target.name!r} has a {granularity.describe()} weight quantizer; supported are "
            "per tensor, per output channel, and blocks along the input channels (PerBlock, Lpbq)")


def _in_execution_order(sim: QuantSim, targets: list[_Target], batch: tuple[tuple, dict]) -> list[_Target]:
    """The targets in the order the float model first calls them on ``batch``, with their calls per forward; layers
    the batch does not reach are left out with a warning."""
    order: list[_Target] = []

    def counter(target: _Target) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            target.calls += 1
            if target.calls == 1:
                target.first_input = args[0]
                order.append(target)
        return hook

    handles = [t.layer.register_forward_pre_hook(counter(t)) for t in targets]
    try:
        with sim.quantizers_enabled(False):
            args, kwargs = batch
            sim.model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    unused = [t.name for t in targets if t.calls == 0]
    if unused:
        warnings.warn(f"sequential_mse: skipping layers the data never reaches: {unused}", stacklevel=3)
    return order


# -- the inputs ----------------------------------------------------------------------------------------------
def _input_grams(sim: QuantSim, forwards: BlockForwards, targets: list[_Target],
                 inputs: str) -> list[tuple[torch.Tensor, int]]:
    """Per target, ``X^T X`` of the layer's input rows, (groups, D, D) in float64, and the number of rows, from one
    pass per batch (from the targets' decoder block where there is one) that stops after the last call of the last
    target."""
    grams: list[list[torch.Tensor]] = [[] for _ in targets]
    rows_seen = [0] * len(targets)
    calls_seen = [0] * len(targets)

    def collector(index: int) -> Callable[[nn.Module, tuple], None]:
        layer = targets[index].layer

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if "0" in layer.input_quantizers:  # the quantizer the layer applies first (identity while it is off)
                x = layer.input_quantizers["0"](x)
            rows = _input_rows(layer, x).double()
            product = torch.bmm(rows.transpose(1, 2), rows)
            if grams[index]:
                grams[index][0] += product
            else:
                grams[index].append(product)
            rows_seen[index] += rows.shape[1]
            calls_seen[index] += 1
            if all(seen == target.calls for seen, target in zip(calls_seen, targets, strict=True)):
                raise _StopForward
        return hook

    off = sim.quantizers().values() if inputs == "float" else [q for q in sim.quantizers().values() if not q.ready]
    handles = [target.layer.register_forward_pre_hook(collector(index)) for index, target in enumerate(targets)]
    try:
        def new_batch() -> None:
            calls_seen[:] = [0] * len(targets)

        with sim.quantizers_enabled(False, off):
            forwards.run([target.name for target in targets], _StopForward, before_each=new_batch)
    finally:
        for handle in handles:
            handle.remove()
    return [(gram[0], rows) for gram, rows in zip(grams, rows_seen, strict=True)]


def _input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The vectors the layer multiplies by its flattened weight rows: (groups, rows, D) with D the size of one
    group's weight row (a Linear's inputs; a convolution's input patches, as ``F.unfold`` lays them out)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    if x.dim() == 3:  # an unbatched image
        x = x.unsqueeze(0)
    pads = _conv_pads(layer)
    if any(pads):
        x = F.pad(x, pads, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
    patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)  # (N, C*kh*kw, L)
    groups = layer.groups
    return patches.transpose(1, 2).reshape(-1, groups, patches.shape[1] // groups).transpose(0, 1)


def _conv_pads(layer: nn.Conv2d) -> tuple[int, int, int, int]:
    """The conv's padding as ``F.pad`` takes it (width first); ``"same"`` puts the odd pixel last, as torch does."""
    if layer.padding == "valid":
        return (0, 0, 0, 0)
    if layer.padding == "same":
        pads: list[int] = []
        for kernel, dilation in reversed(list(zip(layer.kernel_size, layer.dilation, strict=True))):
            total = dilation * (kernel - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    height, width = layer.padding
    return (width, width, height, height)


# -- the search ----------------------------------------------------------------------------------------------
def _search(sim: QuantSim, target: _Target, gram: torch.Tensor, rows: int, num_candidates: int) -> SequentialMseLayer:
    """Every candidate range per scale; install and freeze the best one."""
    quantizer = target.quantizer
    granularity = quantizer.granularity
    weight = target.layer.weight.detach().float()  # the grid math is float32, as the quantizer's
    # LPBQ is searched as plain blocks; its grid applies to the chosen scales
    search_granularity = (PerBlock(granularity.block_size, granularity.channel_axis, granularity.block_axis)
                          if isinstance(granularity, Lpbq) else granularity)
    num_blocks = granularity.num_blocks(weight.shape) if isinstance(granularity, PerBlock) else 1
    search_gram = gram * _block_mask(gram.shape[-1], num_blocks, gram) if num_blocks > 1 else gram
    scale_shape = granularity.scale_shape(weight.shape)
    ranges = search_granularity.rows(weight)
    low, high = ranges.amin(dim=1).reshape(scale_shape), ranges.amax(dim=1).reshape(scale_shape)
    fractions = torch.arange(1, num_candidates + 1, dtype=low.dtype, device=low.device) / num_candidates

    def encoding(fraction: torch.Tensor, layout: Any) -> Encoding:
        return Encoding.from_range(
            low * fraction, high * fraction, quantizer.bitwidth, quantizer.symmetric, layout,
            strict_symmetric=quantizer.strict_symmetric, unsigned_symmetric=quantizer.unsigned_symmetric,
        )

    losses = []
    for fraction in fractions:
        terms = _error_terms(search_gram, weight, encoding(fraction, search_granularity))
        per_block = terms.reshape(weight.shape[0], num_blocks, -1).sum(dim=-1)
        losses.append(per_block.sum() if isinstance(granularity, PerTensor) else per_block.reshape(scale_shape))
    best = torch.stack(losses).argmin(dim=0)
    chosen = encoding(fractions[best], granularity)
    sim.set_encoding(quantizer.name, chosen, freeze=True)
    outputs = rows * weight.shape[0]
    return SequentialMseLayer(
        name=target.name,
        minmax_mse=float(_error_terms(gram, weight, encoding(fractions[-1], granularity)).sum()) / outputs,
        chosen_mse=float(_error_terms(gram, weight, chosen).sum()) / outputs,
        mean_fraction=float(fractions[best].mean()),
        candidate_counts=torch.bincount(best.reshape(-1), minlength=num_candidates).tolist(),
        seconds=0.0,
    )


def _block_mask(size: int, num_blocks: int, like: torch.Tensor) -> torch.Tensor:
    """Ones on the diagonal blocks of a (size, size) matrix: what keeps each block's error to its own inputs."""
    block = torch.arange(size, device=like.device) // (size // num_blocks)
    return (block[:, None] == block[None, :]).to(like.dtype)


def _error_terms(gram: torch.Tensor, weight: torch.Tensor, encoding: Encoding) -> torch.Tensor:
    """Per weight element, its share ``d_j (G d)_j`` of the squared output error of its output channel, where ``d``
    is the channel's weight error under ``encoding`` and ``G`` its group's Gram matrix; (out channels, D)."""
    scale, offset = encoding.broadcast_to(weight.shape)
    strict = encoding.strict_symmetric
    quantized = quantize_dequantize(weight, scale, offset, encoding.bitwidth, strict_symmetric=strict)
    groups, size = gram.shape[0], gram.shape[-1]
    error = (weight - quantized).double().reshape(groups, -1, size)
    return (torch.bmm(error, gram) * error).reshape(weight.shape[0], size)
