"""How a quantized language model compares with its float original: perplexity, next-token agreement and
greedy generation."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from edgequant.sim import QuantSim


def perplexity(model: nn.Module | QuantSim, ids: torch.Tensor, *, batch_size: int = 1, progress: bool = True) -> float:
    """exp of the mean next-token negative log-likelihood over every position of the sequences ``ids`` [N, T]."""
    total, count = 0.0, 0
    with _evaluating(model) as network:
        for batch in tqdm(_check_ids(ids).split(batch_size), desc="perplexity", disable=not progress, leave=False):
            logits = _logits(network, batch)[:, :-1].float()
            targets = batch[:, 1:]
            total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                       reduction="sum"))
            count += targets.numel()
    return math.exp(total / count)


@dataclass(frozen=True)
class TokenAgreement:
    """Share of positions whose most likely next token is the same in both models."""

    agreeing: int
    positions: int

    @property
    def share(self) -> float:
        return self.agreeing / self.positions


def next_token_agreement(reference: nn.Module | QuantSim, candidate: nn.Module | QuantSim, ids: torch.Tensor, *,
                         batch_size: int = 1, progress: bool = True) -> TokenAgreement:
    """Top-1 next-token agreement of ``candidate`` with ``reference`` at every position of ``ids`` [N, T]."""
    agreeing, positions = 0, 0
    with _evaluating(reference) as first, _evaluating(candidate) as second:
        for batch in tqdm(_check_ids(ids).split(batch_size), desc="next-token agreement", disable=not progress,
                          leave=False):
            same = _logits(first, batch).argmax(-1) == _logits(second, batch).argmax(-1)
            agreeing, positions = agreeing + int(same.sum()), positions + same.numel()
    return TokenAgreement(agreeing, positions)


def greedy_generate(model: nn.Module | QuantSim, prompt_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The ``max_new_tokens`` token ids greedy decoding appends to ``prompt_ids`` [1, T], one step at a time with a
    KV cache (prefill, then one token per forward)."""
    from transformers import DynamicCache  # noqa: PLC0415 - transformers is needed only for language models

    generated = []
    with _evaluating(model) as network:
        cache = DynamicCache()
        cache_keyword = "cache" if "cache" in inspect.signature(network.forward).parameters else "past_key_values"
        step_ids = _check_ids(prompt_ids)
        position = 0
        for _ in range(max_new_tokens):
            positions = torch.arange(position, position + step_ids.shape[1]).unsqueeze(0)
            output = network(input_ids=step_ids, use_cache=True, position_ids=positions, **{cache_keyword: cache})
            position += step_ids.shape[1]
            step_ids = output.logits[:, -1:].argmax(-1)
            generated.append(step_ids)
    return torch.cat(generated, dim=1)


@dataclass(frozen=True)
class GenerationMatch:
    """How many greedily generated tokens equal the reference model's, prompt by prompt (up to the first
    difference counts as matching; later tokens follow from different contexts)."""

    matching_prefix: tuple[int, ...]
    identical: tuple[int, ...]
    new_tokens: int

    @property
    def share_identical(self) -> float:
        return sum(self.identical) / (self.new_tokens * len(self.identical))


def generation_match(reference: nn.Module | QuantSim, candidate: nn.Module | QuantSim, prompts: list[torch.Tensor],
                     max_new_tokens: int = 32, progress: bool = True) -> GenerationMatch:
    """Greedy generation of ``max_new_tokens`` after each prompt [1, T] by both models, compared token by token."""
    prefixes, identical = [], []
    for prompt in tqdm(prompts, desc="generation", disable=not progress, leave=False):
        first = greedy_generate(reference, prompt, max_new_tokens)[0]
        second = greedy_generate(candidate, prompt, max_new_tokens)[0]
        same = first == second
        identical.append(int(same.sum()))
        prefixes.append(int(same.cumprod(0).sum()))
    return GenerationMatch(tuple(prefixes), tuple(identical), max_new_tokens)


@contextmanager
def _evaluating(model: nn.Module | QuantSim) -> Iterator[nn.Module]:
    network = model.model if isinstance(model, QuantSim) else model
    was_training = network.training
    network.eval()
    frozen = model.frozen_weights() if isinstance(model, QuantSim) and not model.weights_frozen else nullcontext()
    try:
        with torch.no_grad(), frozen:
            yield network
    finally:
        network.train(was_training)


def _logits(network: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return network(input_ids=ids, use_cache=False).logits


def _check_ids(ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("token ids must be a LongTensor [N, T] (N sequences of T tokens)")
    return ids.long()
