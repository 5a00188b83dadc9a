"""QuaRot-style rotations of a Llama-family causal LM (Ashkboos et al., 2024; Liu et al., 2024, SpinQuant).

A few channels of an LLM's residual stream carry activations a hundred times larger than the rest, and the
weights that read them have matching outlier columns: on a 4-bit or 8-bit grid those channels set the scale and
every other value rounds to a few steps. An orthogonal ``Q`` spreads each outlier over all channels while the
network computes the same function, because the residual stream is only ever written by Linear layers, read by
Linear layers after an RMSNorm, and an RMSNorm with unit weight commutes with ``Q`` (``‖xQ‖ = ‖x‖``).

`rotate_causal_lm` edits the weights, and adds one op only where asked, so the rotated model is a Hugging Face model
that `edgequant.llm.quantize` takes as it is:

1. each RMSNorm's weight moves into the Linear layers that read it (``W ← W·diag(w)``), the norm keeps weight 1;
2. R1 rotates the residual stream: the embedding, q/k/v/gate/up and ``lm_head`` as ``W ← W·Q``, the writers
   o_proj and down_proj as ``W ← Qᵀ·W`` (``b ← Qᵀ·b``);
3. R2 rotates each kv head's values: v_proj's output rows of kv head ``j`` by ``H_jᵀ``, and o_proj's input columns
   of every query head attending to kv head ``j`` by ``H_j`` (grouped-query attention shares ``H_j``);
4. R4 (``RotationSettings.mlp_online``) rotates down_proj's input, the SiLU·up product whose few huge channels set
   an 8-bit grid's scale: an `OnlineRotation` (a MatMul by the constant ``H``, one matrix shared by all layers)
   runs before down_proj, whose weight becomes ``W·H``. Nothing upstream can absorb ``H`` (the product is
   element-wise), so it is an op of the graph: the sim quantizes its output, down_proj's input, at the activation
   bits, its constant gets no weight quantizer, and the export writes it as a MatMul that ONNX Runtime runs.
   A scale of up_proj → down_proj (``mlp_down``) acts before ``H`` (the scaling does not commute with it):
   `smooth_causal_lm` and `awq_causal_lm` fold it as ``W·diag(s)·H`` on a rotated model.

Qwen3's per-head ``q_norm``/``k_norm`` are untouched and stay exact: R1 acts on the projections' inputs and R2 on
the values, and neither changes a query or a key.

The matrices are randomised Hadamard matrices ``diag(±1)·H`` (entries ``±1/√n``): Sylvester's for powers of two,
Kronecker products of a Paley matrix and a Sylvester one for sizes like 576 = 36·16 and 1536 = 12·128. A size
without such a construction gets the largest Hadamard factor it has, times a seeded random orthogonal matrix (QR
of a Gaussian) for the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from edgequant.llm.mixins import mix_in
from edgequant.sim import FunctionalOp


@dataclass(frozen=True)
class RotationSettings:
    """Which rotations `rotate_causal_lm` applies (R1 ``residual``, R2 ``heads``, R4 ``mlp_online``: an op at run
    time) and the seed of their random signs (and random factors)."""

    seed: int = 0
    residual: bool = True
    heads: bool = True
    mlp_online: bool = False


@dataclass(frozen=True)
class RotationReport:
    """What `rotate_causal_lm` did: ``rotations`` in order (``"norm fusion"``, ``"R1"``, ``"R2"``, ``"R4"``), how
    each size's matrices were built, and the largest |logit| change on the probe ids (None without a probe)."""

    rotations: tuple[str, ...]
    constructions: dict[int, str]
    max_logit_difference: float | None = None


def rotate_causal_lm(model: nn.Module, settings: RotationSettings = RotationSettings(),
                     probe_ids: torch.Tensor | None = None) -> RotationReport:
    """Rotate the Llama-family causal LM ``model`` IN PLACE (see the module docstring) into one that computes the
    same logits with outlier-free weights and residual activations.

    Pass a copy: the one `prepare_causal_lm` returns, or your own ``copy.deepcopy``. Tied embedding and
    ``lm_head`` weights are untied (the two no longer hold the same matrix) and the config says so. ``probe_ids``
    [N, T] measures the largest change of the logits."""
    parts = _parts(model)
    before = _logits(model, probe_ids)
    if parts.lm_head.weight is parts.embedding.weight:
        parts.lm_head.weight = nn.Parameter(parts.embedding.weight.detach().clone())
    if getattr(model, "config", None) is not None:
        model.config.tie_word_embeddings = False
    rotations, constructions = ["norm fusion"], {}
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        _fuse_norms(parts)
        if settings.residual:
            hidden = parts.embedding.weight.shape[1]
            q, constructions[hidden] = randomised_hadamard(hidden, generator)
            _rotate_residual(parts, q.to(parts.embedding.weight.device))
            rotations.append("R1")
        if settings.heads:
            for layer in parts.layers:
                constructions.update(_rotate_heads(layer.self_attn, generator))
            rotations.append("R2")
        if settings.mlp_online:
            intermediate = parts.layers[0].mlp.down_proj.in_features
            h, constructions[intermediate] = randomised_hadamard(intermediate, generator)
            _rotate_down_proj_inputs(parts, h.to(parts.embedding.weight.device))
            rotations.append("R4")
    after = _logits(model, probe_ids)
    difference = None if before is None else float((after - before).abs().max())
    return RotationReport(tuple(rotations), constructions, difference)


def hadamard(n: int) -> torch.Tensor:
    """The normalised ``n × n`` Hadamard matrix (entries ``±1/√n``, orthogonal) that `rotate_causal_lm` builds; a
    ValueError where no Sylvester/Paley Kronecker construction of that size exists."""
    paley = _paley_size(n)
    if paley is None:
        raise ValueError(f"no Hadamard construction of size {n}: sizes 2^k·h with h = 1, q+1 (prime q ≡ 3 mod 4) "
                         "or 2(q+1) (prime q ≡ 1 mod 4) have one")
    matrix = _sylvester(n // paley)
    if paley > 1:
        matrix = torch.kron(_paley(paley), matrix)
    return matrix / math.sqrt(n)


def randomised_hadamard(n: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """``diag(±1)·H``, an orthogonal float64 ``n × n`` matrix with random signs from ``generator``, and how it was
    built. ``H`` is `hadamard` (n) or, for sizes without one, the Kronecker product of the largest Hadamard factor
    of ``n`` and a random orthogonal matrix (QR of a Gaussian) of the remaining factor."""
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    if _paley_size(n) is not None:
        return signs[:, None] * hadamard(n), f"randomised Hadamard {_describe(n)}, entries ±1/√{n}"
    size = max(d for d in range(1, n + 1) if n % d == 0 and _paley_size(d) is not None)
    gaussian = torch.randn(n // size, n // size, generator=generator, dtype=torch.float64)
    orthogonal, upper = torch.linalg.qr(gaussian)
    orthogonal = (orthogonal * torch.sign(torch.diagonal(upper))).contiguous()  # Haar-distributed (Mezzadri, 2007)
    matrix = signs[:, None] * torch.kron(hadamard(size), orthogonal)
    return matrix, f"randomised Hadamard {_describe(size)} ⊗ random orthogonal {n // size} (QR of a Gaussian)"


class OnlineRotation(nn.Module):
    """``x·H`` for a constant orthogonal ``matrix`` H, as a `FunctionalOp` MatMul: the sim quantizes its output like
    any op's and leaves the constant in float (it is no layer's weight), and the export writes a MatMul."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)
        self.rotate = FunctionalOp(torch.matmul, "MatMul")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotate(x, self.matrix)


class RotatedInputMlp(nn.Module):
    """Mixin placed before a gated MLP class: ``down_proj(down_rotation(act_fn(gate_proj(x)) · up_proj(x)))``."""

    down_rotation: OnlineRotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.down_rotation(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


@dataclass(frozen=True)
class _Parts:
    embedding: nn.Embedding
    layers: list[nn.Module]
    norm: nn.Module
    lm_head: nn.Linear


def _parts(model: nn.Module) -> _Parts:
    """The modules a rotation edits, checked: a decoder (``model.model``) of embedding, layers and final norm, and
    ``lm_head``; each layer's two RMSNorms, attention projections and gated MLP."""
    decoder = getattr(model, "model", None)
    found = {name: getattr(decoder, name, None) for name in ("embed_tokens", "layers", "norm")}
    found["lm_head"] = getattr(model, "lm_head", None)
    missing = [name for name, module in found.items() if module is None]
    if missing:
        raise ValueError(f"{type(model).__name__} is not a Llama-family causal LM: no {', '.join(missing)} (expected "
                         "model.embed_tokens, model.layers, model.norm and lm_head)")
    layer_parts = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                   "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                   "mlp.act_fn")
    for index, layer in enumerate(found["layers"]):
        names = dict(layer.named_modules())
        absent = [part for part in layer_parts if part not in names]
        if absent:
            raise ValueError(f"decoder layer {index} has no {', '.join(absent)}: rotations need Llama-family layers")
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            _check_rms_norm(norm)
    _check_rms_norm(found["norm"])
    return _Parts(found["embed_tokens"], list(found["layers"]), found["norm"], found["lm_head"])


def _check_rms_norm(norm: nn.Module) -> None:
    """Norm fusion needs ``norm(x) = w·x/√(mean(x²)+ε)``: an offset weight (Gemma's ``1 + w``), a bias or a mean
    subtraction would make it wrong."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    weight = getattr(norm, "weight", None)
    exact = eps is not None and weight is not None
    if exact:
        probe = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device)
        with torch.no_grad():
            expected = weight.float() * probe * torch.rsqrt(probe.pow(2).mean(-1, keepdim=True) + eps)
            exact = torch.allclose(norm(probe.to(weight.dtype)).float(), expected, rtol=1e-3, atol=1e-5)
    if not exact:
        raise ValueError(f"{type(norm).__name__} is not an RMSNorm w·x/√(mean(x²)+ε): its weight cannot move into "
                         "the Linear layers that follow it")


def _fuse_norms(parts: _Parts) -> None:
    readers = [(layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj))
               for layer in parts.layers]
    readers += [(layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj)) for layer in parts.layers]
    readers.append((parts.norm, (parts.lm_head,)))
    for norm, linears in readers:
        for linear in linears:
            _set(linear.weight, linear.weight.double() * norm.weight.double())
        norm.weight.fill_(1.0)


def _rotate_residual(parts: _Parts, q: torch.Tensor) -> None:
    """R1: every reader of the residual stream ``W ← W·Q``, every writer ``W ← Qᵀ·W``."""
    readers = [parts.embedding, parts.lm_head]
    writers = []
    for layer in parts.layers:
        attention, mlp = layer.self_attn, layer.mlp
        readers += [attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj]
        writers += [attention.o_proj, mlp.down_proj]
    for module in readers:
        _set(module.weight, module.weight.double() @ q)
    for linear in writers:
        _set(linear.weight, q.T @ linear.weight.double())
        if linear.bias is not None:
            _set(linear.bias, q.T @ linear.bias.double())


def _rotate_heads(attention: nn.Module, generator: torch.Generator) -> dict[int, str]:
    """R2: kv head ``j``'s values ``v ← v·H_j`` (v_proj rows ``H_jᵀ·W``), and o_proj's input columns of each query
    head ``i`` ``W ← W·H_j`` with ``j = i // (query heads per kv head)``, as the attention repeats kv heads."""
    head_dim = attention.head_dim
    kv_heads = attention.v_proj.out_features // head_dim
    groups = attention.o_proj.in_features // head_dim // kv_heads
    matrices, constructions = zip(*(randomised_hadamard(head_dim, generator) for _ in range(kv_heads)), strict=True)
    per_kv_head = torch.stack(matrices).to(attention.v_proj.weight.device)  # [kv heads, head_dim, head_dim]
    transposed = per_kv_head.transpose(1, 2)
    _set(attention.v_proj.weight, transposed @ attention.v_proj.weight.double().view(kv_heads, head_dim, -1))
    if attention.v_proj.bias is not None:
        _set(attention.v_proj.bias, transposed @ attention.v_proj.bias.double().view(kv_heads, head_dim, 1))
    o_weight = attention.o_proj.weight.double().view(attention.o_proj.out_features, kv_heads * groups, head_dim)
    per_query_head = per_kv_head.repeat_interleave(groups, dim=0)
    _set(attention.o_proj.weight, torch.einsum("ohd,hde->ohe", o_weight, per_query_head))
    return {head_dim: constructions[0]}


def _rotate_down_proj_inputs(parts: _Parts, h: torch.Tensor) -> None:
    """R4: down_proj reads ``x·H`` from an `OnlineRotation` and its weight becomes ``W·H`` (``(x·H)·(W·H)ᵀ = x·Wᵀ``)."""
    matrix = h.to(parts.embedding.weight.dtype)  # one buffer for all layers: the export stores it once
    for layer in parts.layers:
        mlp = layer.mlp
        if isinstance(mlp, RotatedInputMlp):
            raise ValueError("down_proj's input is rotated already: apply R4 once")
        _set(mlp.down_proj.weight, mlp.down_proj.weight.double() @ h)
        mix_in(mlp, RotatedInputMlp, "Rotated")
        mlp.down_rotation = OnlineRotation(matrix)


def _set(parameter: torch.Tensor, value: torch.Tensor) -> None:
    parameter.copy_(value.reshape(parameter.shape).to(parameter.dtype))


def _logits(model: nn.Module, ids: torch.Tensor | None) -> torch.Tensor | None:
    if ids is None:
        return None
    with torch.no_grad():
        return model(ids).logits.double()


@cache
def _paley_size(n: int) -> int | None:
    """The smallest Paley size ``p`` (1: none) with ``n = p·2^k``, for ``H = Paley(p) ⊗ Sylvester(2^k)``; None where
    no such ``p`` exists."""
    twos = (n & -n).bit_length() - 1
    for power in range(twos, -1, -1):
        rest = n >> power
        if rest == 1 or _paley_prime(rest) is not None:
            return rest
    return None


def _sylvester(n: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < n:
        matrix = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), matrix)
    return matrix


def _paley_prime(n: int) -> tuple[str, int] | None:
    """Which Paley construction has size ``n`` and its prime: I for ``n = q + 1`` with ``q ≡ 3 mod 4``, II for
    ``n = 2(q + 1)`` with ``q ≡ 1 mod 4``."""
    if n % 4 == 0 and _is_prime(n - 1) and (n - 1) % 4 == 3:
        return "I", n - 1
    if n % 4 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return "II", n // 2 - 1
    return None


def _paley(n: int) -> torch.Tensor:
    """Paley's ±1 Hadamard matrix of size ``n`` (see `_paley_prime`)."""
    construction, q = _paley_prime(n)
    if construction == "I":
        return _paley_core(q, sign=-1.0) + torch.eye(n, dtype=torch.float64)
    pair = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(_paley_core(q, sign=1.0), pair) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def _paley_core(q: int, sign: float) -> torch.Tensor:
    """``[[0, 1ᵀ], [sign·1, J]]`` with ``J`` the Jacobsthal matrix ``J[a, b] = χ(b - a)`` of the quadratic character
    χ of the field of ``q`` elements (skew for ``sign`` -1 and q ≡ 3 mod 4, symmetric for +1 and q ≡ 1 mod 4)."""
    squares = {(x * x) % q for x in range(1, q)}
    character = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    core = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    core[0, 1:] = 1.0
    core[1:, 0] = sign
    core[1:, 1:] = character[(index[None, :] - index[:, None]) % q]
    return core


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _describe(n: int) -> str:
    paley = _paley_size(n)
    if paley == 1:
        return f"{n} = Sylvester {n}"
    construction, q = _paley_prime(paley)
    return f"{n} = Paley {construction} (q={q}) {paley}" + (f" ⊗ Sylvester {n // paley}" if n > paley else "")
