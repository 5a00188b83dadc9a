"""`prepare_qat`: make a calibrated sim trainable, and say exactly which tensors train and which are recomputed.

Modes (the strings are part of the API):

* ``"regular"``: weights and biases train. Activation encodings stay as calibrated. Weight encodings follow
  the weights: before every forward of ``sim.model`` whose weights changed since the last one (an optimizer
  step, a loaded checkpoint), the weight quantizers' encodings are recomputed from the current weights with
  their own calibration scheme. The check is a tensor version counter, so evaluation forwards cost nothing.
* ``"range_learning"``: weights train and every enabled quantizer of at most 16 bits has a trainable scale
  (and, when asymmetric, offset) with the LSQ gradient scale (see `edgequant.qat.lsq`). Parameter quantizers
  that do not learn (int32 biases) are recomputed as in regular QAT.

BatchNorm: ``batch_norm="fold"`` (default) folds every BN that follows a Conv/Linear into it (and the BN's output
quantizer becomes the layer's) before training, so training sees the weights the device will run. With
``"keep"`` the BNs train with batch statistics until ``freeze_bn_after`` training forwards, then run on frozen
running statistics; `finalize` re-estimates them on the quantized model and folds them into the weights and the
weight encodings. BNs that nothing precedes cannot be folded either way: they are frozen and reported.

Afterwards train ``sim.model`` in any loop with any optimizer over
``[p for p in sim.model.parameters() if p.requires_grad]``, or call `edgequant.qat.finetune`; then `finalize`.
Learned ranges are made valid before every forward of ``sim.model``; ``setup.attach_optimizer(optimizer)`` also
does it right after each step of that optimizer (`finetune` attaches its own). Nothing is installed process-wide:
other optimizers and models in the process are left alone.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgequant.ptq.batch_norm_fold import fold_batch_norms_to_scale
from edgequant.ptq.bn_reestimation import reestimate_bn
from edgequant.qat.lsq import (
    DEFAULT_MIN_SCALE_FRACTION,
    MAX_LEARNED_BITWIDTH,
    LearnedRange,
    has_unsigned_grid,
    learn_range,
    lsq_grad_scale,
    values_per_scale,
)
from edgequant.quantization import PerChannel, Quantizer
from edgequant.sim import QuantSim
from edgequant.sim.modes import training_mode
from edgequant.sim.ops import CLAMP_ACTIVATIONS, clamp_bounds, weight_output_axis

MODES = ("regular", "range_learning")
BATCH_NORM_CHOICES = ("fold", "keep")
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class QatSetup:
    """What `prepare_qat` did to a sim: which quantizers learn, which follow the weights, which are constant."""

    sim: QuantSim
    mode: str
    learned: dict[str, LearnedRange] = field(default_factory=dict)
    """Quantizers whose scale/offset train (range learning), with their gradient scale."""
    recomputed: dict[str, Quantizer] = field(default_factory=dict)
    """Parameter quantizers whose encoding is recomputed from the current weights before each forward."""
    constant: dict[str, Quantizer] = field(default_factory=dict)
    """Enabled quantizers whose encoding does not change during training."""
    folded_batch_norms: list[tuple[str, str]] = field(default_factory=list)
    kept_batch_norms: dict[str, nn.Module] = field(default_factory=dict)
    freeze_bn_after: int | None = None
    training_forwards: int = 0
    _versions: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)
    _handles: list[Any] = field(default_factory=list, repr=False)

    # -- what trains ------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[str]:
        """Names of the parameters of ``sim.model`` that require grad."""
        return [name for name, p in self.sim.model.named_parameters() if p.requires_grad]

    def describe(self) -> str:
        """One line per quantizer: learned (with its gradient scale), recomputed every step, or constant."""
        lines = [f"QAT mode {self.mode}: {len(self.learned)} quantizers learn their range, {len(self.recomputed)} "
                 f"follow the weights, {len(self.constant)} are constant"]
        lines += [f"  learned     g={r.grad_scale:.3g}  {name}" for name, r in self.learned.items()]
        lines += [f"  recomputed each step  {name}" for name in self.recomputed]
        lines += [f"  constant    {name}" for name in self.constant]
        if self.folded_batch_norms:
            lines.append("  batch norms folded: " + ", ".join(bn for _, bn in self.folded_batch_norms))
        if self.kept_batch_norms:
            lines.append(f"  batch norms kept (frozen after {self.freeze_bn_after} training forwards): "
                         + ", ".join(self.kept_batch_norms))
        return "\n".join(lines)

    # -- what happens around each step ----------------------------------------------------------------
    def constrain_ranges(self) -> None:
        """Project every learned scale/offset onto valid values (runs before each forward of ``sim.model`` and
        after each step of the optimizers given to `attach_optimizer`)."""
        for learned in self.learned.values():
            learned.constrain()

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.utils.hooks.RemovableHandle:
        """Constrain the learned ranges right after each ``optimizer.step()``, so that they are valid before any
        use, not only before the next forward (an export, a saved checkpoint). The hook is this optimizer's own;
        `remove` (or preparing the sim again) detaches it, as does the returned handle."""
        handle = optimizer.register_step_post_hook(self._after_step)
        self._handles.append(handle)
        return handle

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.constrain_ranges()

    def sync_weight_encodings(self, force: bool = False) -> int:
        """Recompute the encodings of the weight-following quantizers whose weights changed; returns how many."""
        count = 0
        for name, quantizer in self.recomputed.items():
            param = getattr(self.sim.layer_of(quantizer), quantizer.key)
            version = (id(param), param._version)
            if force or self._versions.get(name) != version:
                quantizer.refresh_from(param)
                self._versions[name] = version
                count += 1
        return count

    def forget_removed_quantizers(self) -> None:
        """Drop quantizers no longer in the sim (folded BatchNorms) and rename moved ones (BN outputs)."""
        live = {id(q) for q in self.sim.quantizers().values()}
        self.learned = {r.quantizer.name: r for r in self.learned.values() if id(r.quantizer) in live}
        self.recomputed = {q.name: q for q in self.recomputed.values() if id(q) in live}
        self.constant = {q.name: q for q in self.constant.values() if id(q) in live}
        self._versions.clear()

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if module is not self.sim.model:
            return
        self.constrain_ranges()  # whatever changed them: an optimizer step, a loaded checkpoint, an edit by hand
        self.sync_weight_encodings()
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation, calibration, BN re-estimation: leave the modes alone
        self.training_forwards += 1
        if self.freeze_bn_after is not None and self.training_forwards > self.freeze_bn_after:
            for norm in self.kept_batch_norms.values():
                norm.eval()  # running statistics frozen (model.train() by the user's loop is undone here)

    def remove(self) -> None:
        """Detach the hooks (the quantizers keep their current state)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        _SETUPS.pop(self.sim.model, None)


_SETUPS: weakref.WeakKeyDictionary[nn.Module, QatSetup] = weakref.WeakKeyDictionary()


def qat_setup(sim: QuantSim) -> QatSetup | None:
    """The setup `prepare_qat` installed on ``sim`` (None if it was not prepared)."""
    return _SETUPS.get(sim.model)


def prepare_qat(
    sim: QuantSim,
    mode: str = "regular",
    *,
    batch_norm: str = "fold",
    freeze_bn_after: int | None = None,
    grad_scale: str | float = "lsq",
    min_scale_fraction: float = DEFAULT_MIN_SCALE_FRACTION,
) -> QatSetup:
    """Make the calibrated ``sim`` ready for quantization-aware training in ``mode`` (see the module doc).

    ``grad_scale`` is ``"lsq"`` (``1/sqrt(N*Qp)`` per quantizer, the default) or one number for all learned
    ranges (``1.0``: plain gradients). Preparing again replaces the previous setup. Only ``sim.model`` gets hooks;
    give your optimizer to ``setup.attach_optimizer`` to have the ranges constrained after each of its steps too.
    """
    if mode not in MODES:
        raise ValueError(f"QAT mode {mode!r} is not one of {', '.join(MODES)}")
    if batch_norm not in BATCH_NORM_CHOICES:
        raise ValueError(f"batch_norm={batch_norm!r}: choose 'fold' (train folded) or 'keep' (fold after training)")
    if not (grad_scale == "lsq" or (isinstance(grad_scale, (int, float)) and grad_scale > 0)):
        raise ValueError(f"grad_scale={grad_scale!r}: use 'lsq' or a positive number")
    if not 0 < min_scale_fraction < 1:
        raise ValueError(f"min_scale_fraction={min_scale_fraction}: use a number in (0, 1)")
    uncalibrated = [n for n, q in sim.quantizers().items() if q.enabled and not q.ready]
    if uncalibrated:
        raise RuntimeError(
            f"prepare_qat needs a calibrated sim; {len(uncalibrated)} enabled quantizers have no encoding (e.g. "
            f"{uncalibrated[0]}): call sim.calibrate(data) first"
        )
    previous = qat_setup(sim)
    if previous is not None:
        previous.remove()
    setup = QatSetup(sim, mode)
    if batch_norm == "fold":
        setup.folded_batch_norms = fold_batch_norms_to_scale(sim)
    setup.kept_batch_norms = {n: m for n, m in sim.model.named_modules() if isinstance(m, _BATCH_NORMS)}
    setup.freeze_bn_after = 0 if batch_norm == "fold" else freeze_bn_after

    shapes = _quantized_shapes(sim)
    for name, quantizer in sim.quantizers().items():
        if not quantizer.enabled or not quantizer.ready:
            continue
        is_param = quantizer.role == "param"  # a float format has no range to learn: its weights are re-encoded
        learnable = quantizer.float_format is None and quantizer.bitwidth <= MAX_LEARNED_BITWIDTH
        if mode == "range_learning" and learnable and name in shapes:
            factor = grad_scale if grad_scale != "lsq" else lsq_grad_scale(
                values_per_scale(quantizer, shapes[name], batched=not is_param), quantizer.bitwidth,
                quantizer.symmetric, unsigned=has_unsigned_grid(quantizer))
            layer = sim.layer_of(quantizer)
            clamped = quantizer.role == "output" and isinstance(layer, CLAMP_ACTIVATIONS)
            setup.learned[name], handles = learn_range(quantizer, float(factor), min_scale_fraction,
                                                       clamp_bounds(layer) if clamped else None)
            setup._handles += handles
            continue
        if quantizer.range_learning:  # learned by an earlier setup: now fixed
            quantizer.scale.requires_grad_(False)
            quantizer.offset.requires_grad_(False)
        if is_param and not quantizer.frozen:
            setup.recomputed[name] = quantizer
        else:
            setup.constant[name] = quantizer
    setup.sync_weight_encodings(force=True)
    # first among the root's pre-hooks: the model-input quantizers (another pre-hook) must see the constrained grid
    setup._handles.append(sim.model.register_forward_pre_hook(setup._before_forward, prepend=True))
    _SETUPS[sim.model] = setup
    return setup


def _quantized_shapes(sim: QuantSim) -> dict[str, torch.Size]:
    """Shape of the tensor each quantizer sees (parameters directly, activations on the dummy input)."""
    shapes: dict[str, torch.Size] = {}
    handles = []
    for name, quantizer in sim.quantizers().items():
        if quantizer.role == "param":
            shapes[name] = getattr(sim.layer_of(quantizer), quantizer.key).shape
        else:
            def record(module: nn.Module, args: tuple, name: str = name) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    shapes[name] = args[0].shape
            handles.append(quantizer.register_forward_pre_hook(record))
    try:
        with training_mode(sim.model, False), torch.no_grad():
            args, kwargs = sim.model_input.to_call(sim.dummy_input, 0, sim.device)
            sim.model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def finalize(
    sim: QuantSim, data: Iterable[Any] | None = None, num_batches: int = 100, progress: bool = True
) -> list[tuple[str, str]]:
    """End QAT: weight encodings from the final weights, learned offsets stored as integers, and BatchNorms kept
    during training re-estimated on ``data`` and folded into the weights and weight encodings (returns the
    ``(layer, bn)`` pairs folded). Warns about any BatchNorm left, which would appear in the export."""
    setup = qat_setup(sim)
    if setup is None:
        raise RuntimeError("finalize: this sim was not prepared with edgequant.qat.prepare_qat")
    setup.constrain_ranges()
    setup.sync_weight_encodings()
    with torch.no_grad():
        for learned in setup.learned.values():
            learned.quantizer.offset.round_()
    folded: list[tuple[str, str]] = []
    live_norms = {n: m for n, m in setup.kept_batch_norms.items() if sim.model.get_submodule(n) is m}
    if live_norms:
        if data is None:
            raise ValueError("finalize: the BatchNorms kept during QAT must be re-estimated; pass calibration data")
        # learned per-channel symmetric weight scales are rescaled by the fold instead of recomputed
        keep = [r.quantizer for r in setup.learned.values() if r.quantizer.role == "param" and r.quantizer.symmetric
                and r.quantizer.granularity == PerChannel(weight_output_axis(
                    sim.layer_of(r.quantizer), getattr(sim.layer_of(r.quantizer), r.quantizer.key)))]
        saved = [(q, q.frozen) for q in keep]
        for quantizer in keep:
            quantizer.frozen = True
        try:
            folded = reestimate_bn(sim, data, num_batches, fold_to_scale=True, progress=progress).folded
        finally:
            for quantizer, frozen in saved:
                quantizer.frozen = frozen
        setup.forget_removed_quantizers()
        setup.kept_batch_norms = {n: m for n, m in live_norms.items() if sim.model.get_submodule(n) is m}
        setup.sync_weight_encodings(force=True)
    left = [n for n, m in sim.model.named_modules() if isinstance(m, _BATCH_NORMS)]
    if left:
        warnings.warn(f"{len(left)} BatchNorms could not be folded (no Conv/Linear before them) and will appear in "
                      f"the export: {', '.join(left[:5])}", stacklevel=2)
    return folded
