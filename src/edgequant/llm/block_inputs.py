"""Running the calibration batches up to a layer from the cached inputs of its decoder block.

Layer-by-layer techniques (GPTQ's Hessians, sequential MSE's Gram matrices) need each layer's inputs as the layers
before it, already rounded, produce them. Running the model from its first layer for every layer makes the work
grow with the square of the depth. A decoder stack calls every block with the previous block's output and the same
remaining arguments (mask, rotary embeddings, positions), so the inputs of block ``i + 1`` are block ``i`` run on
its own cached inputs: each block runs once per technique pass over it, and once more to move the cache on.

That structure is checked on the first batch before it is relied on (every block's other arguments are the very
objects block 0 received, and its first argument is the previous block's output); where it does not hold, or a
group of layers spans blocks or lies outside them (``lm_head``), the batches run through the whole model as before.
A cache object in the arguments (a Hugging Face ``Cache``) is passed as None: re-running a block must not append
its keys and values again. The cached inputs are kept in a `LayerCache` (`BlockInputs`): in memory up to a budget,
on disk beyond, so that many or long calibration sequences do not have to fit in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from transformers.cache_utils import Cache

from edgequant.ptq.layer_cache import LayerCache
from edgequant.sim import QuantSim

BlockCall = tuple[tuple, dict[str, Any]]

BLOCK_INPUTS_MEMORY_MB = 1024.0
"""Default memory budget of the cached block inputs: beyond it they are written to a temporary folder."""


@dataclass(frozen=True)
class _Stored:
    """Stands for a tensor argument kept in the `LayerCache`: where to put it back."""

    device: torch.device


class BlockInputs:
    """Each batch's arguments of one decoder block, in a `LayerCache` (memory up to ``memory_budget_mb``, then
    disk): the hidden states (the first argument), replaced as the inputs move on to the next block, and the
    other arguments (mask, rotary embeddings, positions), which every block receives unchanged. A cache object
    (a Hugging Face ``Cache``) is kept as None. Use as a context manager (the spilled files are removed on exit)."""

    def __init__(self, memory_budget_mb: float = BLOCK_INPUTS_MEMORY_MB) -> None:
        self.store = LayerCache(memory_budget_mb)
        self._layouts: list[tuple[Any, list[Any]]] = []

    def __enter__(self) -> BlockInputs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the cached tensors and remove the spilled files."""
        self.store.close()

    def __len__(self) -> int:
        return len(self._layouts)

    def append(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Keep one batch's block arguments (its hidden states first)."""
        if not args or not isinstance(args[0], torch.Tensor):
            raise ValueError("a decoder block's first argument must be its hidden states (a tensor)")
        leaves, spec = tree_flatten((args, {key: None if isinstance(value, Cache) else value
                                            for key, value in kwargs.items()}))
        index = len(self._layouts)
        for position, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                self.store.add((index, position), leaf)
                leaves[position] = _Stored(leaf.device)
        self._layouts.append((spec, leaves))

    def __getitem__(self, index: int) -> BlockCall:
        spec, leaves = self._layouts[index]
        return tree_unflatten([self.store.get((index, position), leaf.device) if isinstance(leaf, _Stored) else leaf
                               for position, leaf in enumerate(leaves)], spec)

    def hidden_states(self, index: int) -> torch.Tensor:
        """Batch ``index``'s hidden states alone."""
        return self.store.get((index, 0), self._layouts[index][1][0].device)

    def set_hidden_states(self, index: int, hidden_states: torch.Tensor) -> None:
        """Replace batch ``index``'s hidden states (with the previous block's output: the next block's inputs)."""
        self.store.drop((index, 0))
        self.store.add((index, 0), hidden_states)


class _Captured(Exception):
    """Raised by the capturing hook: the rest of the model need not run."""


class BlockForwards:
    """The held calibration ``batches`` (``(args, kwargs)`` for ``sim.model``), run up to given layers."""

    def __init__(self, sim: QuantSim, batches: list[BlockCall], layer_names: Iterable[str],
                 memory_budget_mb: float = BLOCK_INPUTS_MEMORY_MB) -> None:
        self.sim = sim
        self.batches = batches
        self.blocks = decoder_blocks(sim.model, list(layer_names))
        self.memory_budget_mb = memory_budget_mb
        self.cached: BlockInputs | None = None
        self.cached_block = -1
        if self.blocks and not self._chained():
            self.blocks = []

    def run(self, layer_names: list[str], stop: type[Exception], before_each: Callable[[], None]) -> None:
        """Run every batch until a hook raises ``stop`` (its layers are done), from the block holding all of
        ``layer_names`` where there is one, else through the whole model; ``before_each`` runs before each batch."""
        block = self._block_of(layer_names)
        if block is None:
            module, inputs = self.sim.model, self.batches
        else:
            module, inputs = self.blocks[block][1], self._inputs_of(block)
        for index in range(len(inputs)):
            args, kwargs = inputs[index]
            before_each()
            try:
                module(*args, **kwargs)
            except stop:
                pass

    # -- structure -------------------------------------------------------------------------------------------
    def _block_of(self, layer_names: list[str]) -> int | None:
        for index, (prefix, _) in enumerate(self.blocks):
            if all(name.startswith(prefix + ".") for name in layer_names):
                return index
        return None

    def _chained(self) -> bool:
        """On the first batch: block ``i + 1`` receives block ``i``'s output and block 0's other arguments."""
        with recording_blocks(self.blocks) as record:
            args, kwargs = self.batches[0]
            self.sim.model(*args, **kwargs)
        return len(record.calls) == len(self.blocks) and chained(record.calls, record.outputs)

    # -- the cache -------------------------------------------------------------------------------------------
    def _inputs_of(self, block: int) -> BlockInputs:
        """The batches as block ``block``'s inputs: captured from the model the first time (or for an earlier
        block), then moved on block by block with the blocks' current weights."""
        if self.cached is None or block < self.cached_block:
            if self.cached is not None:
                self.cached.close()
            self.cached, self.cached_block = capture_block_inputs(
                self.sim.model, self.blocks[0][1], self.batches, BlockInputs(self.memory_budget_mb)), 0
        while self.cached_block < block:
            run_block(self.blocks[self.cached_block][1], self.cached)
            self.cached_block += 1
        return self.cached


@dataclass
class BlockRecord:
    """What the blocks did on one run of the model: their ``calls`` (``(args, kwargs)``), in the ``order`` of the
    blocks' indices, and their ``outputs``."""

    calls: list[BlockCall] = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)


@contextmanager
def recording_blocks(blocks: list[tuple[str, nn.Module]]) -> Iterator[BlockRecord]:
    """Inside the block, every call of one of ``blocks`` is recorded in the yielded `BlockRecord`."""
    record = BlockRecord()
    handles = []
    for index, (_, module) in enumerate(blocks):
        def enter(_m: nn.Module, args: tuple, kwargs: dict, index: int = index) -> None:
            record.calls.append((args, kwargs))
            record.order.append(index)

        handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(module.register_forward_hook(lambda _m, _args, output: record.outputs.append(output)))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def chained(calls: list[BlockCall], outputs: list[Any]) -> bool:
    """Whether the blocks' ``calls`` on one batch (in order, with their ``outputs``) form a chain: each block
    receives the previous block's output and block 0's other arguments, the very same objects."""
    if not calls or not calls[0][0]:
        return False
    first_args, first_kwargs = calls[0]
    for (args, kwargs), previous in zip(calls[1:], outputs, strict=False):
        if (args[0] is not hidden_states_of(previous) or len(args) != len(first_args)
                or any(a is not b for a, b in zip(args[1:], first_args[1:], strict=True))
                or kwargs.keys() != first_kwargs.keys()
                or any(kwargs[key] is not first_kwargs[key] for key in kwargs)):
            return False
    return True


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: Iterable[BlockCall],
                         inputs: BlockInputs) -> BlockInputs:
    """Run each batch through ``model`` up to ``first_block`` (the rest of the model does not run) and keep what
    the block receives in ``inputs``."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.append(args, kwargs)
        raise _Captured

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for args, kwargs in batches:
            try:
                model(*args, **kwargs)
            except _Captured:
                pass
    finally:
        handle.remove()
    return inputs


def run_block(block: nn.Module, inputs: BlockInputs) -> None:
    """Run ``block`` on each batch's cached inputs, which become the next block's (its outputs)."""
    for index in range(len(inputs)):
        args, kwargs = inputs[index]
        inputs.set_hidden_states(index, hidden_states_of(block(*args, **kwargs)))


def hidden_states_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def decoder_blocks(model: nn.Module, layer_names: list[str]) -> list[tuple[str, nn.Module]]:
    """The children of the ``nn.ModuleList`` holding most of ``layer_names`` (a decoder stack), by name; none
    where no list holds two of them."""
    best: list[tuple[str, nn.Module]] = []
    best_count = 1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        children = [(f"{name}.{index}" if name else str(index), child) for index, child in enumerate(module)]
        count = sum(any(layer.startswith(prefix + ".") for prefix, _ in children) for layer in layer_names)
        if count > best_count:
            best, best_count = children, count
    return best
