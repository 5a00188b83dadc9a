"""`finetune`: the QAT training loop, label-free by default, resumable, and aware of torch.distributed.

Its settings are `FinetuneSettings`, grouped as `TrainingSchedule`, `LossSettings`, `EvalSettings` and
`CheckpointSettings`; ``finetune``'s keywords are their field names (``finetune(sim, data, epochs=3, lr=1e-4)``).

* Loss: ``loss_fn(model_output, batch)`` when given (``batch`` as the data yielded it, labels included), else
  distillation from the FP32 model (the sim's model with quantizers off, copied before training, or
  ``teacher``), see `edgequant.qat.distillation`. When distilling, the student trains with dropout and
  stochastic depth off, like its eval-mode teacher (``dropout=None``, the default; ``True``/``False`` force it):
  on a few hundred unlabeled images a student with dropout chases the noise of its own dropped units instead of
  the teacher (EfficientNet-Lite0 W4A8 in benchmarks/README.md: top-1 agreement with FP32 on other crops 54.7 %
  with dropout, 64.8 % without). With ``loss_fn`` the model trains in its usual train mode. Kept BatchNorms
  train either way.
* Optimizer: Adam by default (``optimizer=`` takes a factory of parameter groups); each learned scale has its own
  group whose rate is ``range_lr`` times its calibrated size, offsets ``range_lr`` grid steps (`DEFAULT_RANGE_LR`).
  Learning rate: linear warm-up then cosine decay to 0 (``schedule``).
* Evaluation: ``eval_fn(model) -> float`` (higher is better) on the calibrated start, every ``eval_every`` steps
  and after each epoch; the best state is kept (``checkpoint_dir/best_sim.pt``) and restored at the end
  (``restore_best``), the start included, so a run that only worsens the metric ends where it began.
* Checkpoints: every ``checkpoint_every`` steps and after each epoch into ``checkpoint_dir/last.pt``;
  ``resume=True`` continues from it and ends bit-identical to an uninterrupted run (same machine and threads).
* Distributed: in an initialised process group the model trains as ``DistributedDataParallel``; a dataset
  (or tensor) is split with a ``DistributedSampler``, an iterable of batches round-robin (batch ``i`` to rank
  ``i % world_size``, all ranks taking the same number of steps); only rank 0 shows progress, evaluates and
  writes files, and the metric is broadcast so every rank keeps the same best state.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, TensorDataset
from tqdm.auto import tqdm

from edgequant.qat.checkpoint import TrainingProgress, load_checkpoint, save_checkpoint
from edgequant.qat.distillation import distillation_loss
from edgequant.qat.prepare import QatSetup, prepare_qat, qat_setup
from edgequant.sim import QuantSim
from edgequant.sim.distributed import is_distributed
from edgequant.sim.modes import quantizers_disabled, training_mode
from edgequant.sim.state_file import read_sim_state

SCHEDULES = ("cosine", "constant")
DEFAULT_RANGE_LR = 3e-2
"""Learning rate of learned ranges, relative to each calibrated scale (offsets: grid steps). Measured on the
digits MobileNetV2, W4A4, 3 epochs (benchmarks/README.md): one absolute rate 1e-4 for everything 83.3 %,
relative 1e-3 84.4 %, 1e-2 88.2 %, 3e-2 and 1e-1 92.7 % test accuracy."""
LAST_CHECKPOINT, BEST_STATE = "last.pt", "best_sim.pt"


@dataclass
class FinetuneResult:
    setup: QatSetup
    steps: int
    history: list[dict[str, Any]]
    """One entry per epoch: ``epoch``, mean ``loss``, ``seconds``, and ``metric`` when evaluated."""
    best_metric: float | None
    best_step: int | None
    resumed_from_step: int
    start_metric: float | None = None
    """``eval_fn`` on the calibrated sim before the first step (None without ``eval_fn`` or when resumed)."""

    @property
    def kept_start(self) -> bool:
        """No evaluation after training beat the start, so the start state is what the sim holds (with
        ``restore_best``)."""
        return self.best_step == 0


@dataclass(frozen=True)
class TrainingSchedule:
    """How long and how fast: epochs, batches, optimizer and learning rates, and the shuffling seed."""

    epochs: int
    lr: float
    batch_size: int = 64
    range_lr: float = DEFAULT_RANGE_LR
    optimizer: Callable[[list[dict]], torch.optim.Optimizer] | None = None
    schedule: str = "cosine"
    warmup_steps: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or not self.lr > 0:
            raise ValueError(f"finetune needs epochs >= 1 and lr > 0, got epochs={self.epochs}, lr={self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")


@dataclass(frozen=True)
class LossSettings:
    """``loss_fn(output, batch)``, or distillation from ``teacher`` (default: the sim's FP32 model) without it."""

    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    teacher: nn.Module | None = None
    distillation: str = "auto"
    temperature: float = 1.0
    dropout: bool | None = None
    """Dropout and stochastic depth in the trained model; None: off when distilling, on with ``loss_fn``."""

    @property
    def student_dropout(self) -> bool:
        return self.dropout if self.dropout is not None else self.loss_fn is not None


@dataclass(frozen=True)
class EvalSettings:
    """``eval_fn(model) -> float`` (higher is better) after each epoch and every ``eval_every`` steps; the best
    state is restored at the end when ``restore_best``."""

    eval_fn: Callable[[nn.Module], float] | None = None
    eval_every: int | None = None
    restore_best: bool = True


@dataclass(frozen=True)
class CheckpointSettings:
    """``checkpoint_dir/last.pt`` after each epoch and every ``checkpoint_every`` steps; ``resume`` continues
    from it."""

    checkpoint_dir: str | Path | None = None
    checkpoint_every: int | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (where the run wrote last.pt)")


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything `finetune` is told, by group; `finetune`'s keywords are the groups' field names."""

    training: TrainingSchedule
    loss: LossSettings = field(default_factory=LossSettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    checkpoints: CheckpointSettings = field(default_factory=CheckpointSettings)
    mode: str = "range_learning"
    """How a sim not yet prepared is prepared (`prepare_qat`); a prepared sim keeps its setup."""
    progress: bool = True

    @classmethod
    def build(cls, base: FinetuneSettings | None = None, **keywords: Any) -> FinetuneSettings:
        """``base`` (None: the defaults) with each keyword (``epochs=``, ``eval_fn=``, ``mode=``...) replacing the
        field of that name, so that a call reads ``finetune(sim, data, epochs=3, lr=1e-4)``."""
        unknown = sorted(set(keywords) - {name for group in _GROUPS.values() for name in _fields(group)}
                         - _fields(cls))
        if unknown:
            raise TypeError(f"finetune() got unexpected keyword arguments: {', '.join(unknown)}")
        parts = {}
        for name, group in _GROUPS.items():
            given = {k: v for k, v in keywords.items() if k in _fields(group)}
            parts[name] = group(**given) if base is None else replace(getattr(base, name), **given)
        own = {k: v for k, v in keywords.items() if k in _fields(cls)}
        return cls(**parts, **own) if base is None else replace(base, **parts, **own)


_GROUPS = {"training": TrainingSchedule, "loss": LossSettings, "evaluation": EvalSettings,
           "checkpoints": CheckpointSettings}


def _fields(dataclass_type: type) -> set[str]:
    return {f.name for f in fields(dataclass_type)}


def finetune(
    sim: QuantSim, data: Iterable[Any] | Dataset | torch.Tensor, settings: FinetuneSettings | None = None,
    **keywords: Any,
) -> FinetuneResult:
    """Quantization-aware fine-tuning of ``sim`` on ``data`` (see the module doc) with ``settings``, or the
    settings the keywords name (``epochs=3, lr=1e-4, eval_fn=...``; with ``settings``, they replace its fields).

    ``data``: an iterable of batches (as for `QuantSim.calibrate`), or a ``Dataset``/tensor split into shuffled
    batches of ``batch_size``.
    """
    run = _Run(sim, data, FinetuneSettings.build(settings, **keywords))
    try:
        if run.progress.step == 0:  # the calibrated start competes for best: training never silently worsens it
            run.start_metric = run.evaluate()
        while run.progress.epoch < run.training.epochs:
            run.epoch()
    finally:
        run.close()
    return run.result()


class _Run:
    """The state of one `finetune` run: optimizer, schedule, progress and best state, and the steps on them."""

    def __init__(self, sim: QuantSim, data: Any, settings: FinetuneSettings) -> None:
        self.sim, self.settings, self.training = sim, settings, settings.training
        self.setup = qat_setup(sim) or prepare_qat(sim, settings.mode)
        self.rank = dist.get_rank() if is_distributed() else 0
        self.batches = _EpochBatches(data, self.training.batch_size, self.training.seed)
        total_steps = self.training.epochs * self.batches.steps_per_epoch()
        loss = settings.loss
        teacher = loss.teacher if loss.teacher is not None else sim.model
        self.teacher = _frozen_teacher(teacher) if loss.loss_fn is None else None
        self.optimizer = _optimizer(sim, self.setup, self.training)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_factor(self.training.schedule, self.training.warmup_steps, total_steps))
        directory = settings.checkpoints.checkpoint_dir
        self.directory = Path(directory) if directory is not None else None
        self.progress, self.best_state = self._resumed()
        self.resumed_from = self.progress.step
        self.start_metric: float | None = None
        self.model = torch.nn.parallel.DistributedDataParallel(sim.model) if is_distributed() else sim.model
        self.bar = tqdm(total=total_steps, initial=self.progress.step, desc="QAT", leave=False,
                        disable=not settings.progress or self.rank != 0)

    def _resumed(self) -> tuple[TrainingProgress, dict[str, torch.Tensor] | None]:
        """Progress and best state of the checkpointed run to resume, or a fresh start."""
        if not self.settings.checkpoints.resume:
            return TrainingProgress(), None
        progress = TrainingProgress()
        if (self.directory / LAST_CHECKPOINT).exists():
            progress = load_checkpoint(self.directory / LAST_CHECKPOINT, self.sim.model, self.optimizer,
                                       self.scheduler)
            self.setup.training_forwards = progress.training_forwards
        return progress, _best_state(self.directory) if progress.best_step is not None else None

    def epoch(self) -> None:
        """The rest of the current epoch, then its record, evaluation and checkpoint."""
        started, losses = time.perf_counter(), []
        for index, batch in enumerate(self.batches.of_epoch(self.progress.epoch)):
            if index >= self.progress.batch_in_epoch:  # earlier ones were done before the checkpoint resumed from
                losses.append(self.step(index, batch))
        record = {"epoch": self.progress.epoch, "loss": sum(losses) / max(len(losses), 1),
                  "seconds": time.perf_counter() - started}
        self.progress.epoch, self.progress.batch_in_epoch = self.progress.epoch + 1, 0
        metric = self.evaluate()
        if metric is not None:
            record["metric"] = metric
        self.progress.history.append(record)
        self.checkpoint()

    def step(self, index: int, batch: Any) -> float:
        """One optimizer step on ``batch`` (the ``index``-th of its epoch); evaluates and checkpoints when due."""
        loss = self.loss(index, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.progress.step += 1
        self.progress.batch_in_epoch = index + 1
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss.item():.4g}")
        evaluation, checkpoints = self.settings.evaluation, self.settings.checkpoints
        if evaluation.eval_every and self.progress.step % evaluation.eval_every == 0:
            self.evaluate()
        if checkpoints.checkpoint_every and self.progress.step % checkpoints.checkpoint_every == 0:
            self.checkpoint()
        return loss.item()

    def loss(self, index: int, batch: Any) -> torch.Tensor:
        """The student's loss on ``batch``: ``loss_fn``, or distillation from the teacher."""
        settings = self.settings.loss
        args, kwargs = self.sim.model_input.to_call(batch, index, self.sim.device)
        _student_mode(self.sim.model, self.setup, settings.student_dropout)
        output = self.model(*args, **kwargs)
        if settings.loss_fn is not None:
            loss = settings.loss_fn(output, batch)
        else:
            with torch.no_grad():
                target = self.teacher(*args, **kwargs)
            loss = distillation_loss(output, target, settings.distillation, settings.temperature)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"QAT step {self.progress.step}: the loss is {loss.item()}; lower lr (now {self.training.lr}) or "
                "range_lr, or check the data and loss_fn")
        return loss

    def evaluate(self) -> float | None:
        """``eval_fn`` on rank 0, shared with every rank; a new best is kept (and saved as ``best_sim.pt``)."""
        eval_fn = self.settings.evaluation.eval_fn
        if eval_fn is None:
            return None
        self.setup.sync_weight_encodings()
        metric = [None]
        if self.rank == 0:
            with training_mode(self.sim.model, False), torch.no_grad():
                metric[0] = float(eval_fn(self.sim.model))
        if is_distributed():
            dist.broadcast_object_list(metric, src=0)
        if self.progress.best_metric is None or metric[0] > self.progress.best_metric:
            self.progress.best_metric, self.progress.best_step = metric[0], self.progress.step
            self.best_state = {k: v.detach().clone() for k, v in self.sim.model.state_dict().items()}
            if self.directory is not None and self.rank == 0:
                self.directory.mkdir(parents=True, exist_ok=True)
                self.sim.save(self.directory / BEST_STATE)
        return metric[0]

    def checkpoint(self) -> None:
        """``last.pt`` from rank 0, its encodings matching its weights; every rank waits for it."""
        self.setup.sync_weight_encodings()
        if self.directory is not None and self.rank == 0:
            self.progress.training_forwards = self.setup.training_forwards
            save_checkpoint(self.directory / LAST_CHECKPOINT, self.sim.model, self.optimizer, self.scheduler,
                            self.progress)
        if is_distributed():
            dist.barrier()

    def close(self) -> None:
        self.bar.close()
        self.sim.model.eval()

    def result(self) -> FinetuneResult:
        """The best state restored (``restore_best``), the encodings synced, and what the run did."""
        if self.settings.evaluation.restore_best and self.best_state is not None:
            self.sim.model.load_state_dict(self.best_state)
        self.setup.sync_weight_encodings()
        progress = self.progress
        return FinetuneResult(self.setup, progress.step, progress.history, progress.best_metric,
                              progress.best_step, self.resumed_from, self.start_metric)


def _optimizer(sim: QuantSim, setup: QatSetup, training: TrainingSchedule) -> torch.optim.Optimizer:
    """Adam (or ``training.optimizer``) on the parameter groups, attached to ``setup`` so that learned ranges are
    valid right after each step (checkpoints, best state)."""
    groups = _parameter_groups(sim, setup, training.lr, training.range_lr)
    if not groups:
        raise ValueError("nothing to train: no parameter of sim.model requires grad")
    optimizer = training.optimizer(groups) if training.optimizer is not None else torch.optim.Adam(groups)
    setup.attach_optimizer(optimizer)
    return optimizer


def _parameter_groups(sim: QuantSim, setup: QatSetup, lr: float, range_lr: float) -> list[dict]:
    """Weights at ``lr``; each learned scale at ``range_lr`` times its calibrated size (Adam moves every value by
    about its learning rate per step whatever the gradient's size, so one absolute rate would shift a small
    per-channel scale by far more, relatively, than a large activation scale); offsets, in grid steps, at
    ``range_lr``."""
    learned = {id(p) for r in setup.learned.values() for p in (r.quantizer.scale, r.quantizer.offset)}
    groups = [{"params": [p for p in sim.model.parameters() if p.requires_grad and id(p) not in learned], "lr": lr}]
    for learned_range in setup.learned.values():
        scale, offset = learned_range.quantizer.scale, learned_range.quantizer.offset
        groups.append({"params": [scale], "lr": range_lr * float(learned_range.initial_scale.mean())})
        if offset.requires_grad:
            groups.append({"params": [offset], "lr": range_lr})
    return [g for g in groups if g["params"]]


def _student_mode(model: nn.Module, setup: QatSetup, dropout: bool) -> None:
    """Train mode for the step; with ``dropout=False`` every submodule but the kept BatchNorms is in eval mode,
    so dropout and stochastic depth (which read their module's ``training``) are off and the student computes the
    function the teacher is compared with. The root stays in train mode: the QAT setup counts training forwards
    on it to freeze kept BatchNorms."""
    model.train()
    if dropout:
        return
    kept = {id(m) for m in setup.kept_batch_norms.values()}
    for module in model.modules():
        if module is not model and id(module) not in kept:
            module.training = False


def _frozen_teacher(model: nn.Module) -> Callable[..., Any]:
    """A fixed FP32 copy of ``model`` (its quantizers off) in eval mode: the distillation target."""
    frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def teach(*args: Any, **kwargs: Any) -> Any:
        with quantizers_disabled(frozen):
            return frozen(*args, **kwargs)

    return teach


def _best_state(directory: Path) -> dict[str, torch.Tensor] | None:
    path = directory / BEST_STATE
    return read_sim_state(path).state_dict if path.exists() else None


def _lr_factor(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class _EpochBatches:
    """The batches of one epoch, the same for a given (seed, epoch) on every run, sharded across ranks."""

    def __init__(self, data: Any, batch_size: int, seed: int) -> None:
        if isinstance(data, torch.Tensor):
            data = TensorDataset(data)
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.is_dataset = isinstance(data, Dataset) and not isinstance(data, DataLoader)
        self.world, self.rank = (dist.get_world_size(), dist.get_rank()) if is_distributed() else (1, 0)

    def steps_per_epoch(self) -> int:
        if self.is_dataset:
            per_rank = math.ceil(len(self.data) / self.world)
            return math.ceil(per_rank / self.batch_size)
        if not hasattr(self.data, "__len__"):
            raise ValueError("finetune needs data with a length (a list of batches, a DataLoader or a Dataset)")
        steps = len(self.data) // self.world
        if steps == 0:
            raise ValueError(f"finetune: {len(self.data)} batches cannot feed {self.world} processes")
        return steps

    def of_epoch(self, epoch: int) -> Iterator[Any]:
        if self.is_dataset:
            if self.world > 1:
                sampler = DistributedSampler(self.data, self.world, self.rank, shuffle=True, seed=self.seed)
                sampler.set_epoch(epoch)
            else:
                sampler = RandomSampler(self.data, generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from DataLoader(self.data, batch_size=self.batch_size, sampler=sampler)
            return
        steps = self.steps_per_epoch()
        for index, batch in enumerate(self.data):
            if index >= steps * self.world:
                return
            if index % self.world == self.rank:
                yield batch
