"""`finetune`: the QAT training loop, label-free by default, resumable, and aware of torch.distributed.

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
* Evaluation: ``eval_fn(model) -> float`` (higher is better) every ``eval_every`` steps and after each epoch;
  the best state is kept (``checkpoint_dir/best_sim.pt``) and restored at the end (``restore_best``).
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
from dataclasses import dataclass
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


def finetune(
    sim: QuantSim,
    data: Iterable[Any] | Dataset | torch.Tensor,
    *,
    epochs: int,
    lr: float,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    mode: str = "range_learning",
    batch_size: int = 64,
    range_lr: float = DEFAULT_RANGE_LR,
    optimizer: Callable[[list[dict]], torch.optim.Optimizer] | None = None,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    teacher: nn.Module | None = None,
    distillation: str = "auto",
    temperature: float = 1.0,
    dropout: bool | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    eval_every: int | None = None,
    restore_best: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> FinetuneResult:
    """Quantization-aware fine-tuning of ``sim`` on ``data`` for ``epochs`` epochs (see the module doc).

    ``dropout``: dropout and stochastic depth active in the trained model; by default off when distilling (it
    generalises better, see the module doc) and on with ``loss_fn``.

    ``data``: an iterable of batches (as for `QuantSim.calibrate`), or a ``Dataset``/tensor split into shuffled
    batches of ``batch_size``. A sim not yet prepared is prepared with ``mode``; a prepared one keeps its setup.
    """
    if epochs < 1 or not lr > 0:
        raise ValueError(f"finetune needs epochs >= 1 and lr > 0, got epochs={epochs}, lr={lr}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (where the run wrote last.pt)")
    setup = qat_setup(sim) or prepare_qat(sim, mode)
    rank = dist.get_rank() if is_distributed() else 0
    batches = _EpochBatches(data, batch_size, seed)
    steps_per_epoch = batches.steps_per_epoch()
    total_steps = epochs * steps_per_epoch
    if loss_fn is None:
        teacher = _frozen_teacher(teacher if teacher is not None else sim.model)
    if dropout is None:
        dropout = loss_fn is not None

    groups = _parameter_groups(sim, setup, lr, range_lr)
    if not groups:
        raise ValueError("nothing to train: no parameter of sim.model requires grad")
    optim = optimizer(groups) if optimizer is not None else torch.optim.Adam(groups)
    setup.attach_optimizer(optim)  # learned ranges valid right after each step (checkpoints, best state)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, _lr_factor(schedule, warmup_steps, total_steps))

    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state = TrainingProgress()
    if resume and (directory / LAST_CHECKPOINT).exists():
        state = load_checkpoint(directory / LAST_CHECKPOINT, sim.model, optim, scheduler)
        setup.training_forwards = state.training_forwards
    resumed_from = state.step
    best_state = _best_state(directory) if resume and state.best_step is not None else None

    model = torch.nn.parallel.DistributedDataParallel(sim.model) if is_distributed() else sim.model

    def checkpoint() -> None:
        setup.sync_weight_encodings()  # saved encodings match the saved weights
        if directory is not None and rank == 0:
            state.training_forwards = setup.training_forwards
            save_checkpoint(directory / LAST_CHECKPOINT, sim.model, optim, scheduler, state)
        if is_distributed():
            dist.barrier()

    def evaluate() -> float | None:
        nonlocal best_state
        if eval_fn is None:
            return None
        setup.sync_weight_encodings()
        metric = [None]
        if rank == 0:
            with training_mode(sim.model, False), torch.no_grad():
                metric[0] = float(eval_fn(sim.model))
        if is_distributed():
            dist.broadcast_object_list(metric, src=0)
        if state.best_metric is None or metric[0] > state.best_metric:
            state.best_metric, state.best_step = metric[0], state.step
            best_state = {k: v.detach().clone() for k, v in sim.model.state_dict().items()}
            if directory is not None and rank == 0:
                directory.mkdir(parents=True, exist_ok=True)
                sim.save(directory / BEST_STATE)
        return metric[0]

    bar = tqdm(total=total_steps, initial=state.step, desc="QAT", disable=not progress or rank != 0, leave=False)
    try:
        while state.epoch < epochs:
            started, losses = time.perf_counter(), []
            for index, batch in enumerate(batches.of_epoch(state.epoch)):
                if index < state.batch_in_epoch:
                    continue  # done before the checkpoint this run resumed from
                args, kwargs = sim.model_input.to_call(batch, index, sim.device)
                _student_mode(sim.model, setup, dropout)
                output = model(*args, **kwargs)
                if loss_fn is not None:
                    loss = loss_fn(output, batch)
                else:
                    with torch.no_grad():
                        target = teacher(*args, **kwargs)
                    loss = distillation_loss(output, target, distillation, temperature)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"QAT step {state.step}: the loss is {loss.item()}; lower lr (now {lr}) or range_lr, or check "
                        "the data and loss_fn")
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                scheduler.step()
                state.step += 1
                state.batch_in_epoch = index + 1
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
                if eval_every and state.step % eval_every == 0:
                    evaluate()
                if checkpoint_every and state.step % checkpoint_every == 0:
                    checkpoint()
            record = {"epoch": state.epoch, "loss": sum(losses) / max(len(losses), 1),
                      "seconds": time.perf_counter() - started}
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            metric = evaluate()
            if metric is not None:
                record["metric"] = metric
            state.history.append(record)
            checkpoint()
    finally:
        bar.close()
        sim.model.eval()
    if restore_best and best_state is not None:
        sim.model.load_state_dict(best_state)
    setup.sync_weight_encodings()
    return FinetuneResult(setup, state.step, state.history, state.best_metric, state.best_step, resumed_from)


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
