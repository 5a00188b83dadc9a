"""Calibrating a decoder stack one block at a time, with the encodings of `QuantSim.calibrate`, bit for bit.

`QuantSim.calibrate` runs every batch through the whole model. Here the batches are embedded once, each decoder
block's inputs are kept in a `LayerCache` (`BlockInputs`: in memory up to a budget, on disk beyond), every block
observes all of its cached inputs and its outputs become the next block's, and the layers after the stack (final
norm, ``lm_head``) run last, fed the last block's outputs. Calibration observes the float model (every quantizer
passes its input through), so a block computes the same outputs whichever order the batches and blocks run in, and
each quantizer sees the same batches in the same order as in the whole-model pass: the statistics, hence the
encodings, are the same.

The first batch runs through the whole model as in `QuantSim.calibrate`, which also checks the structure relied on
(`block_inputs.chained`: each block receives the previous block's output and block 0's other arguments, and
every layer outside the stack runs either before it or after it). Where that does not hold, the other batches
run through the whole model as well. The layers after the stack run by running the model with every block
replaced by the cached result and the quantizers of the layers before the stack silent, so that the model's own
code between the stack and its output (slicing, the head) is what runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from edgequant.llm.block_inputs import (
    BLOCK_INPUTS_MEMORY_MB,
    BlockCall,
    BlockInputs,
    capture_block_inputs,
    chained,
    decoder_blocks,
    recording_blocks,
    run_block,
)
from edgequant.quantization import CalibrationError, Quantizer
from edgequant.sim import QuantSim


@dataclass(frozen=True)
class BlockCalibrationSettings:
    """``memory_budget_mb``: the block inputs kept in memory, beyond which they go to a temporary folder;
    ``progress``: a progress bar with one step per block."""

    memory_budget_mb: float = BLOCK_INPUTS_MEMORY_MB
    progress: bool = True


@dataclass
class BlockCalibrationReport:
    """``blocks``: the decoder blocks calibrated one at a time (0: every batch ran through the whole model);
    ``spilled_mb``: the block inputs written to disk, all blocks together."""

    blocks: int
    batches: int
    spilled_mb: float
    seconds: float


def calibrate_by_block(sim: QuantSim, data: Iterable[Any],
                       settings: BlockCalibrationSettings = BlockCalibrationSettings()) -> BlockCalibrationReport:
    """Calibrate ``sim`` on the batches ``data`` (what `QuantSim.calibrate` takes) with the encodings the
    whole-model pass gives, holding the activations of one decoder block at a time (see the module doc).

    Memory: the model's weights, one batch through one block (or through the layers after the stack), and the
    hidden states of all batches at one point of the stack, in memory up to ``settings.memory_budget_mb`` and on
    disk beyond."""
    start = time.perf_counter()
    with sim.calibrating():
        batches = list(sim.batches(data, error=CalibrationError))
        blocks = decoder_blocks(sim.model, list(sim.quantized_modules()))
        before = _run_first_batch(sim, blocks, batches[0])
        if before is None:
            for index, (args, kwargs) in enumerate(batches[1:], start=1):
                _run(index, sim.model, *args, **kwargs)
            return BlockCalibrationReport(0, len(batches), 0.0, time.perf_counter() - start)
        with BlockInputs(settings.memory_budget_mb) as inputs, tqdm(
                total=len(blocks) + 2, desc="calibrating by block", disable=not settings.progress, leave=False) as bar:
            bar.set_postfix_str("inputs")
            for index, batch in enumerate(batches[1:], start=1):
                _run(index, capture_block_inputs, sim.model, blocks[0][1], [batch], inputs)
            bar.update()
            for name, block in blocks:
                bar.set_postfix_str(name)
                run_block(block, inputs)
                bar.update()
            bar.set_postfix_str("head")
            observing = [quantizer for quantizer in before if quantizer.calibrating]  # frozen ones keep quantizing
            with sim.quantizers_enabled(False, observing), _replaying(blocks) as replay:
                for index, (args, kwargs) in enumerate(batches[1:]):
                    replay.hidden_states = inputs.hidden_states(index)
                    sim.model(*args, **kwargs)
            bar.update()
            spilled = inputs.store.bytes_spilled / 2**20
    return BlockCalibrationReport(len(blocks), len(batches), spilled, time.perf_counter() - start)


def _run(index: int, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """``function(*args, **kwargs)``, its failure reported as calibration batch ``index``'s."""
    try:
        function(*args, **kwargs)
    except Exception as error:
        raise CalibrationError(
            f"calibration batch {index} does not run through the model ({type(error).__name__}: {error}); batches "
            "must have the structure, shape and dtype of dummy_input"
        ) from error


def _run_first_batch(sim: QuantSim, blocks: list[tuple[str, nn.Module]], batch: BlockCall) -> list[Quantizer] | None:
    """Calibrate on ``batch`` through the whole model, watching the blocks and the quantizers outside them.
    Where the blocks can be calibrated one at a time, the quantizers outside them that ran before the stack;
    else None."""
    ran: dict[str, set[Quantizer]] = {"before": set(), "between": set(), "after": set()}
    inside = tuple(name + "." for name, _ in blocks)
    with recording_blocks(blocks) as record:

        def phase() -> str:  # where the model is, relative to the stack (exact where every block runs once, in order)
            if not record.calls:
                return "before"
            return "after" if len(record.outputs) == len(blocks) else "between"

        handles = [quantizer.register_forward_pre_hook(lambda q, _args: ran[phase()].add(q))
                   for name, quantizer in sim.quantizers().items() if not name.startswith(inside)]
        try:
            _run(0, sim.model, *batch[0], **batch[1])
        finally:
            for handle in handles:
                handle.remove()
    if (not blocks or record.order != list(range(len(blocks))) or not isinstance(record.outputs[-1], torch.Tensor)
            or ran["between"] or ran["before"] & ran["after"] or not chained(record.calls, record.outputs)):
        return None
    return list(ran["before"])


class _Replay:
    """The cached output of the stack, which every block returns in place of running (see `_replaying`)."""

    hidden_states: torch.Tensor | None = None


@contextmanager
def _replaying(blocks: list[tuple[str, nn.Module]]) -> Iterator[_Replay]:
    """Inside the block, each of ``blocks`` returns ``replay.hidden_states`` instead of running: the model then
    runs its layers before the stack (again) and after it (on the stack's cached output)."""
    replay = _Replay()

    def forward(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        return replay.hidden_states

    own = [module.__dict__.get("forward") for _, module in blocks]  # a forward set on the instance, if any
    for _, module in blocks:
        module.forward = forward
    try:
        yield replay
    finally:
        for (_, module), forward_before in zip(blocks, own, strict=True):
            if forward_before is None:
                del module.forward
            else:
                module.forward = forward_before
