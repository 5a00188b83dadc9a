"""Hugging Face decoder attention written with one module per op, so that the sim quantizes each op.

Llama-family attention (Llama, Mistral, Qwen2, Qwen3, SmolLM) calls ``apply_rotary_pos_emb``, the cache's
``update`` and an attention function chosen by name from inside its ``forward``, where the sim's op
interception would see another op sequence whenever the cache is used differently. `make_quantizable` gives
an attention instance (on the sim's copy of the model; the user's class is not edited) a forward that computes
the same function as the eager attention with every math op a `FunctionalOp` child:

``q_proj → (q_norm) → rope_q``, ``k_proj → (k_norm) → rope_k → key cache``, ``v_proj → value cache``,
``scores = q·kᵀ``, ``scaled = scores · scaling``, ``probs = softmax(scaled + mask)``, ``context = probs·v``,
``o_proj``.

The keys stored in the cache are ``rope_k``'s output and the values ``v_proj``'s output, so their output
quantizers are the KV cache's quantizers: a cache holds values on their grids, and a full-sequence forward and a
prefill followed by step-by-step decoding see the same keys and values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgequant.llm.mixins import mix_in
from edgequant.sim import FunctionalOp
from edgequant.sim.ops import masked_softmax


class RotaryApplication(nn.Module):
    """``x·cos + rotate_half(x)·sin`` (the rotary position embedding of Su et al.) as quantizable ops."""

    def __init__(self) -> None:
        super().__init__()
        self.times_cos = FunctionalOp(torch.mul, "Mul")
        self.negate = FunctionalOp(torch.neg, "Neg")
        self.rotate = FunctionalOp(torch.cat, "Concat")
        self.times_sin = FunctionalOp(torch.mul, "Mul")
        self.add = FunctionalOp(torch.add, "Add")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        first_half, second_half = x.chunk(2, dim=-1)
        rotated = self.rotate((self.negate(second_half), first_half), dim=-1)
        return self.add(self.times_cos(x, cos), self.times_sin(rotated, sin))


class ScaledDotProductAttention(nn.Module):
    """Eager attention: ``softmax(q·kᵀ·scaling + mask)·v`` with keys and values repeated for grouped queries."""

    def __init__(self) -> None:
        super().__init__()
        self.scores = FunctionalOp(torch.matmul, "MatMul")
        self.scale = FunctionalOp(torch.mul, "Mul")
        self.softmax = FunctionalOp(masked_softmax, "Softmax")
        self.context = FunctionalOp(torch.matmul, "MatMul")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                scaling: float) -> torch.Tensor:
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
        value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
        scores = self.scale(self.scores(query, key.transpose(2, 3)), scaling)
        mask = mask[:, :, :, : key.shape[-2]] if mask is not None else torch.zeros((), dtype=scores.dtype)
        return self.context(self.softmax(scores, mask), value)


class CacheWrite(nn.Module):
    """Appends this step's keys and values to a Hugging Face cache and returns all of them (no arithmetic)."""

    holds_input_values = True

    def forward(self, cache: Any, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
                cache_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return cache.update(key, value, layer_idx, cache_kwargs)


class QuantizableAttention(nn.Module):
    """Mixin placed before a Llama-family attention class (see the module docstring)."""

    rope_q: RotaryApplication
    rope_k: RotaryApplication
    attend: ScaledDotProductAttention
    cache_write: CacheWrite

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, cache: Any = None, **kwargs: Any
                ) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else kwargs.pop("past_key_values", kwargs.pop("past_key_value", None))
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape)
        key = self.k_proj(hidden_states).view(shape)
        if hasattr(self, "q_norm"):
            query, key = self.q_norm(query), self.k_norm(key)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        query = self.rope_q(query.transpose(1, 2), cos, sin)
        key = self.rope_k(key.transpose(1, 2), cos, sin)
        if cache is not None:
            cache_kwargs = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
            key, value = self.cache_write(cache, key, value, self.layer_idx, cache_kwargs)
        context = self.attend(query, key, value, attention_mask, self.scaling)
        context = context.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(context), None


_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")


def is_llama_attention(module: nn.Module) -> bool:
    """A Llama-family self-attention: separate q/k/v/o projections, rotary positions, a layer index for the cache."""
    return all(hasattr(module, part) for part in _ATTENTION_PARTS) and not isinstance(module, QuantizableAttention)


def make_quantizable(attention: nn.Module) -> nn.Module:
    """Give ``attention`` (in place) the op-per-module forward of `QuantizableAttention`."""
    mix_in(attention, QuantizableAttention, "Quantizable")
    attention.rope_q = RotaryApplication()
    attention.rope_k = RotaryApplication()
    attention.attend = ScaledDotProductAttention()
    attention.cache_write = CacheWrite()
    return attention
