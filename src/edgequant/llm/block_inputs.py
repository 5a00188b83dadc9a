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
its keys and values again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from edgequant.sim import QuantSim

BlockCall = tuple[tuple, dict[str, Any]]


class _Captured(Exception):
    """Raised by the capturing hook: the rest of the model need not run."""


class BlockForwards:
    """The held calibration ``batches`` (``(args, kwargs)`` for ``sim.model``), run up to given layers."""

    def __init__(self, sim: QuantSim, batches: list[BlockCall], layer_names: Iterable[str]) -> None:
        self.sim = sim
        self.batches = batches
        self.blocks = _decoder_blocks(sim.model, list(layer_names))
        self.cached: list[BlockCall] | None = None
        self.cached_block = -1
        if self.blocks and not self._chained():
            self.blocks = []

    def run(self, layer_names: list[str], stop: type[Exception], before_each: Callable[[], None]) -> None:
        """Run every batch until a hook raises ``stop`` (its layers are done), from the block holding all of
        ``layer_names`` where there is one, else through the whole model; ``before_each`` runs before each batch."""
        block = self._block_of(layer_names)
        if block is None:
            calls = [(self.sim.model, args, kwargs) for args, kwargs in self.batches]
        else:
            module = self.blocks[block][1]
            calls = [(module, args, kwargs) for args, kwargs in self._inputs_of(block)]
        for module, args, kwargs in calls:
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
        calls: list[BlockCall] = []
        outputs: list[Any] = []
        handles = []
        for _, module in self.blocks:
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True))
            handles.append(module.register_forward_hook(lambda _m, _args, output: outputs.append(output)))
        try:
            args, kwargs = self.batches[0]
            self.sim.model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if len(calls) != len(self.blocks) or not calls[0][0]:
            return False
        first_args, first_kwargs = calls[0]
        for (args, kwargs), previous in zip(calls[1:], outputs, strict=False):
            if (args[0] is not _hidden_states(previous) or len(args) != len(first_args)
                    or any(a is not b for a, b in zip(args[1:], first_args[1:], strict=True))
                    or kwargs.keys() != first_kwargs.keys()
                    or any(kwargs[key] is not first_kwargs[key] for key in kwargs)):
                return False
        return True

    # -- the cache -------------------------------------------------------------------------------------------
    def _inputs_of(self, block: int) -> list[BlockCall]:
        """The batches as block ``block``'s inputs: captured from the model the first time (or for an earlier
        block), then moved on block by block with the blocks' current weights."""
        if self.cached is None or block < self.cached_block:
            self.cached, self.cached_block = self._capture(0), 0
        while self.cached_block < block:
            module = self.blocks[self.cached_block][1]
            self.cached = [((_hidden_states(module(*args, **kwargs)), *args[1:]), kwargs)
                           for args, kwargs in self.cached]
            self.cached_block += 1
        return self.cached

    def _capture(self, block: int) -> list[BlockCall]:
        captured: list[BlockCall] = []

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append((args, {key: None if isinstance(value, Cache) else value
                                    for key, value in kwargs.items()}))
            raise _Captured

        handle = self.blocks[block][1].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for args, kwargs in self.batches:
                try:
                    self.sim.model(*args, **kwargs)
                except _Captured:
                    pass
        finally:
            handle.remove()
        return captured


def _hidden_states(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _decoder_blocks(model: nn.Module, layer_names: list[str]) -> list[tuple[str, nn.Module]]:
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
