"""PyTorch's ``nn.MultiheadAttention`` as quantizable ops.

The module computes attention inside one fused call (``F.multi_head_attention_forward`` or the native fast path),
which the sim can neither trace nor intercept; left as it is, it stays float, and the runtime computes it with its
own float kernels. As AIMET swaps it for its quantizable multi-head attention, the sim's copy of the model gets a
`QuantizableMultiheadAttention` in its place: the same function, written as layers and ops that each get their
quantizers and that fx traces (so a model around it is one graph):

``linear_Q(query)``, ``linear_K(key)``, ``linear_V(value)`` split into heads, ``scores = q·kᵀ``,
``scaled = scores · head_dim^-½``, ``probabilities = softmax(scaled)`` (``softmax(scaled + mask)`` where the
module is called with a mask), ``context = probabilities·v``, ``out_proj(context)``.

Modules with ``add_bias_kv`` or ``add_zero_attn`` (extra key/value rows) keep PyTorch's module, in float.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.fx as fx
from torch import nn

from edgequant.sim.capture import CallRecord
from edgequant.sim.ops import masked_softmax
from edgequant.sim.quantized_module import FunctionalOp


def additive_attention_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int,
                            heads: int, dtype: torch.dtype) -> torch.Tensor:
    """The masks ``nn.MultiheadAttention`` takes, as the one additive float mask ``[batch, heads | 1, L, S]`` it adds
    to the scaled scores: a boolean mask is ``-inf`` where True, a float one is added as it is; an ``[L, S]``
    attention mask serves every sequence and head, a ``[batch·heads, L, S]`` one each head; the key padding mask
    ``[batch, S]`` each sequence."""
    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    merged = torch.zeros((), dtype=dtype)
    if attn_mask is not None:
        mask = additive(attn_mask)
        merged = mask.reshape(batch, heads, *mask.shape[-2:]) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        merged = merged + additive(key_padding_mask).reshape(batch, 1, 1, -1)
    return merged


additive_attention_mask.float_by_design = "the attention mask: added in float inside the softmax (masked_softmax)"
fx.wrap("additive_attention_mask")  # one call in a traced graph: the masks' dtypes and ranks choose its path


class QuantizableMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward (same arguments, same outputs) with every projection a Linear and every
    product and softmax an op of its own (see the module docstring); ``masked``: its softmax adds a mask."""

    def __init__(self, attention: nn.MultiheadAttention, masked: bool) -> None:
        super().__init__()
        width = attention.embed_dim
        self.embed_dim, self.num_heads, self.batch_first = width, attention.num_heads, attention.batch_first
        self.head_dim = attention.head_dim
        self.scaling = math.sqrt(1.0 / self.head_dim)
        self.masked = masked
        weights = ((attention.in_proj_weight[:width], attention.in_proj_weight[width:2 * width],
                    attention.in_proj_weight[2 * width:]) if attention._qkv_same_embed_dim else
                   (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight))
        bias = attention.in_proj_bias
        for index, (name, weight) in enumerate(zip(("linear_Q", "linear_K", "linear_V"), weights, strict=True)):
            linear = nn.Linear(weight.shape[1], width, bias=bias is not None, device=weight.device, dtype=weight.dtype)
            linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            if bias is not None:
                linear.bias = nn.Parameter(bias[index * width:(index + 1) * width].detach().clone(),
                                           requires_grad=bias.requires_grad)
            self.add_module(name, linear)
        self.scores = FunctionalOp(torch.matmul, "MatMul")
        self.scale = FunctionalOp(torch.mul, "Mul")
        self.softmax = FunctionalOp(masked_softmax if masked else torch.softmax, "Softmax")
        self.dropout = nn.Dropout(attention.dropout)
        self.context = FunctionalOp(torch.matmul, "MatMul")
        self.out_proj = nn.Linear(width, width, bias=attention.out_proj.bias is not None,
                                  device=attention.out_proj.weight.device, dtype=attention.out_proj.weight.dtype)
        self.out_proj.load_state_dict(attention.out_proj.state_dict())

    def _heads(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        return x.reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward`` on batched inputs (``is_causal`` is a hint: ``attn_mask`` holds the
        causal mask)."""
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch = query.size(0)
        q = self._heads(self.linear_Q(query), batch)
        k = self._heads(self.linear_K(key), batch)
        v = self._heads(self.linear_V(value), batch)
        scaled = self.scale(self.scores(q, k.transpose(-2, -1)), self.scaling)
        if self.masked:
            mask = additive_attention_mask(attn_mask, key_padding_mask, batch, self.num_heads, scaled.dtype)
            probabilities = self.softmax(scaled, mask)
        elif attn_mask is not None or key_padding_mask is not None:
            raise ValueError("this attention was quantized for calls without a mask (dummy_input's call had none); "
                             "build the QuantSim with a dummy_input whose call passes the mask")
        else:
            probabilities = self.softmax(scaled, -1)
        probabilities = self.dropout(probabilities)
        context = self.context(probabilities, v).transpose(1, 2).reshape(batch, -1, self.embed_dim)
        output = self.out_proj(context)
        if not self.batch_first:
            output = output.transpose(0, 1)
        if not need_weights:
            return output, None
        return output, probabilities.mean(dim=1) if average_attn_weights else probabilities


_MASKS = ("key_padding_mask", "attn_mask")


def _called_with_mask(arguments: dict) -> bool:
    return any(arguments.get(name) is not None for name in _MASKS)


def _called_unbatched(arguments: dict) -> bool:
    """Was the query 2-D (PyTorch's unbatched call)? The rewrite computes batched calls only: such a module stays
    PyTorch's, in float."""
    query = arguments.get("query")
    rank = query.dim() if isinstance(query, torch.Tensor) else len(query) if isinstance(query, torch.Size) else None
    return rank == 2


def quantizable_multihead_attention(model: nn.Module, records: dict[str, CallRecord]) -> list[str]:
    """Put a `QuantizableMultiheadAttention` in place of every ``nn.MultiheadAttention`` inside ``model`` that ran
    in ``records`` (the model's calls on the dummy input, by module name); returns their names."""
    replaced = []
    for name, module in list(model.named_modules()):
        record = records.get(name)
        if not name or type(module) is not nn.MultiheadAttention or record is None or module.bias_k is not None or (
                module.add_zero_attn):
            continue
        arguments = inspect.signature(module.forward).bind(*record.args, **record.kwargs).arguments
        if _called_unbatched(arguments):
            continue
        replacement = QuantizableMultiheadAttention(module, _called_with_mask(arguments))
        replacement.train(module.training)
        model.set_submodule(name, replacement)
        replaced.append(name)
    return replaced
