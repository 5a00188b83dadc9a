"""ONNX export of a quantized causal LM with its KV cache as graph inputs and outputs.

A runtime decodes with such a graph one call per step: the prefill takes the prompt and empty past tensors (past
length 0), each later call takes one token and the previous call's ``present_*`` outputs as its ``past_*`` inputs.
The graph is `edgequant.export.export_onnx`'s QDQ model of the sim, traced through a forward that builds a
transformers ``DynamicCache`` from the past tensors, so that the keys and values appended to the cache are the
sim's quantized ``rope_k``/``v_proj`` outputs (see `edgequant.llm.attention`) and the past a runtime feeds back is
already on those grids.

The attention mask is the additive float mask the eager attention adds to its scores, ``[B, 1, S, P + S]``: 0
where a query may attend to a key, the float32 minimum elsewhere (`causal_mask`). Taking it as an input keeps
transformers' mask construction out of the traced graph and leaves padding and batching to the caller.

ONNX Runtime runs the graph as the sim computes at every optimization level once `ORT_SESSION_CONFIG` is set:
from ``ORT_ENABLE_EXTENDED`` on, it fuses an int8 weight's DequantizeLinear and its MatMul into ``MatMulNBits``,
which by default (accuracy level 4) rounds the layer's input to int8, not to the sim's 16-bit grid.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgequant.export.runtime_cpu import ORT_SESSION_CONFIG
from edgequant.sim import QuantSim

INPUT_IDS, POSITION_IDS, ATTENTION_MASK, LOGITS = "input_ids", "position_ids", "attention_mask", "logits"
_TRACE_BATCH, _TRACE_LENGTH, _TRACE_PAST = 2, 3, 2  # not 0 or 1, which the tracer would bake into the graph


@dataclass(frozen=True)
class CausalLmExport:
    """What `export_causal_lm` wrote and the graph's input and output names, in order."""

    onnx_path: Path  # the QDQ model a runtime runs
    float_path: Path
    encodings_path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def empty_past(self, batch: int = 1) -> dict[str, torch.Tensor]:
        """The ``past_*`` inputs of a prefill: no cached positions yet."""
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return {name: torch.zeros(shape) for name in self.input_names[3:]}


def cache_names(kind: str, num_layers: int) -> list[str]:
    """``{kind}_key_0, {kind}_value_0, {kind}_key_1...`` (``kind``: past or present), the order of the graph's
    cache inputs and outputs."""
    return [f"{kind}_{part}_{layer}" for layer in range(num_layers) for part in ("key", "value")]


def causal_mask(past_length: int, length: int, batch: int = 1) -> torch.Tensor:
    """The additive mask ``[batch, 1, length, past_length + length]`` of ``length`` new tokens after
    ``past_length`` cached ones: each token sees the cache and itself and the new tokens before it."""
    queries = torch.arange(length).unsqueeze(1) + past_length
    keys = torch.arange(past_length + length).unsqueeze(0)
    mask = torch.zeros(length, past_length + length)
    mask[keys > queries] = torch.finfo(torch.float32).min
    return mask.expand(batch, 1, length, past_length + length).contiguous()


def export_causal_lm(sim: QuantSim, out_dir: str | Path, *, name: str = "model", opset: int = 21,
                     encoding_version: str = "2.0.0") -> CausalLmExport:
    """Write ``{name}.onnx`` (float), ``{name}_qdq.onnx`` and ``{name}.encodings`` for the sim of a causal LM
    (`edgequant.llm.quantize`) with inputs ``input_ids``, ``position_ids`` [B, S], ``attention_mask``
    [B, 1, S, P + S] (`causal_mask`) and ``past_key_<i>``/``past_value_<i>`` [B, kv_heads, P, head_dim], and
    outputs ``logits`` [B, S, vocab] and ``present_key_<i>``/``present_value_<i>`` (the past and this call's
    keys and values, P + S positions). Batch, sequence and past lengths are dynamic. The encodings are AIMET's
    ``encoding_version`` format (2.0.0, with LPBQ entries, is what Qualcomm's converter reads for blocked weights)."""
    interface = _GraphInterface.of(sim)
    with _cache_as_tensors(sim.model, interface.num_layers), _rotary_tables(sim.model):
        result = sim.export(out_dir, interface.dummy_input(), name, opset=opset, input_names=interface.input_names,
                            output_names=interface.output_names, dynamic_axes=interface.dynamic_axes(),
                            encoding_version=encoding_version)
    return CausalLmExport(result.qdq_model, result.float_model, result.encodings, tuple(interface.input_names),
                          tuple(interface.output_names), interface.num_layers, interface.num_kv_heads,
                          interface.head_dim)


def load_causal_lm_encodings(sim: QuantSim, path: str | Path, *, strict: bool = True) -> Any:
    """Load the encodings file `export_causal_lm` wrote (or one written for its ONNX graph by another tool) into
    the sim of the same causal LM: tensors are matched through the graph with the KV cache as inputs and
    outputs, as it was exported. Returns the loader's report (`edgequant.export.LoadReport`)."""
    interface = _GraphInterface.of(sim)
    with _cache_as_tensors(sim.model, interface.num_layers), _rotary_tables(sim.model):
        return sim.load_encodings(path, strict=strict, dummy_input=interface.dummy_input(),
                                  input_names=interface.input_names, output_names=interface.output_names)


@dataclass(frozen=True)
class _GraphInterface:
    """The exported graph's inputs and outputs for a causal LM's config, and a small input to trace it with."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def of(cls, sim: QuantSim) -> _GraphInterface:
        config = sim.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.num_key_value_heads, head_dim, config.vocab_size)

    @property
    def input_names(self) -> list[str]:
        return [INPUT_IDS, POSITION_IDS, ATTENTION_MASK, *cache_names("past", self.num_layers)]

    @property
    def output_names(self) -> list[str]:
        return [LOGITS, *cache_names("present", self.num_layers)]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            INPUT_IDS: {0: "batch", 1: "sequence"}, POSITION_IDS: {0: "batch", 1: "sequence"},
            ATTENTION_MASK: {0: "batch", 2: "sequence", 3: "total_length"}, LOGITS: {0: "batch", 1: "sequence"},
            **{past: {0: "batch", 2: "past_length"} for past in cache_names("past", self.num_layers)},
            **{present: {0: "batch", 2: "total_length"} for present in cache_names("present", self.num_layers)},
        }

    def dummy_input(self) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(0)
        past = [torch.randn(_TRACE_BATCH, self.num_kv_heads, _TRACE_PAST, self.head_dim, generator=generator)
                for _ in range(2 * self.num_layers)]
        return (
            torch.randint(0, self.vocab_size, (_TRACE_BATCH, _TRACE_LENGTH), generator=generator),
            torch.arange(_TRACE_PAST, _TRACE_PAST + _TRACE_LENGTH).expand(_TRACE_BATCH, -1),
            causal_mask(_TRACE_PAST, _TRACE_LENGTH, _TRACE_BATCH),
            *past,
        )


@contextmanager
def _rotary_tables(model: nn.Module) -> Iterator[None]:
    """Let the rotary embeddings read their cos and sin from tables of every position the model takes
    (``max_position_embeddings``), computed by the module itself, for a while: the graph gathers rows of
    constants by ``position_ids`` instead of computing Cos and Sin, whose float32 results differ from PyTorch's
    in the last bit on about one value in seven, so that the runtime rotates by the sim's very values (device
    toolchains take the rotary tables as inputs or constants for the same reason)."""
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "inv_freq")]
    length = model.config.max_position_embeddings
    for rotary in rotaries:
        original = rotary.forward
        probe = torch.zeros(1, dtype=torch.float32)
        with torch.no_grad():
            cos_table, sin_table = original(probe, torch.arange(length).unsqueeze(0))

        def forward(x: torch.Tensor, position_ids: torch.Tensor, cos_table: torch.Tensor = cos_table[0],
                    sin_table: torch.Tensor = sin_table[0]) -> tuple[torch.Tensor, torch.Tensor]:
            return cos_table[position_ids].to(x.dtype), sin_table[position_ids].to(x.dtype)

        rotary.forward = forward
    try:
        yield
    finally:
        for rotary in rotaries:
            del rotary.forward


@contextmanager
def _cache_as_tensors(model: nn.Module, num_layers: int) -> Iterator[None]:
    """Let ``model`` take (input_ids, position_ids, attention_mask, *past) and return (logits, *present) for a
    while: an instance attribute, so that parameter names and module scopes, which name the graph's tensors and
    the sim's quantizers, stay as they are."""
    from transformers import DynamicCache  # noqa: PLC0415 - transformers is needed only for language models

    original = model.forward
    parameters = inspect.signature(original).parameters
    cache_keyword = "cache" if "cache" in parameters else "past_key_values"  # older transformers

    def forward(input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache()
        for layer in range(num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        output = original(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          use_cache=True, **{cache_keyword: cache})
        return output.logits, *(tensor for layer in cache.layers for tensor in (layer.keys, layer.values))

    model.forward = forward
    try:
        yield
    finally:
        del model.forward


def onnxruntime_session(export: CausalLmExport, optimization: str = "all") -> Any:
    """An ONNX Runtime CPU session of the exported graph (``optimization``: ``"basic"`` or ``"all"``), with
    `ORT_SESSION_CONFIG` set so that it computes what the sim computes."""
    import onnxruntime as ort  # noqa: PLC0415 - the runtime is needed only here

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise ValueError(f"optimization must be one of {', '.join(levels)}, got {optimization!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    for key, value in ORT_SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(export.onnx_path), options, providers=["CPUExecutionProvider"])


def prefill_feeds(export: CausalLmExport, prompt_ids: torch.Tensor) -> dict[str, Any]:
    """The graph's inputs (numpy arrays) for a prefill of ``prompt_ids`` [B, T]: positions from 0, the causal
    mask and empty past tensors."""
    batch, length = prompt_ids.shape
    feeds = {INPUT_IDS: prompt_ids.long(), POSITION_IDS: torch.arange(length).expand(batch, -1),
             ATTENTION_MASK: causal_mask(0, length, batch), **export.empty_past(batch)}
    return {name: value.numpy() for name, value in feeds.items()}


def onnxruntime_generate(export: CausalLmExport, prompt_ids: torch.Tensor, max_new_tokens: int, *,
                         optimization: str = "all") -> torch.Tensor:
    """Greedy decoding of ``prompt_ids`` [B, T] with the exported graph in ONNX Runtime (`onnxruntime_session`):
    a prefill, then one token per call with the present keys and values fed back as the past. Returns the
    ``max_new_tokens`` new token ids [B, N], as `edgequant.llm.greedy_generate` does for the sim."""
    session = onnxruntime_session(export, optimization)
    batch = prompt_ids.shape[0]
    feeds, position, generated = prefill_feeds(export, prompt_ids), 0, []
    for _ in range(max_new_tokens):
        logits, *present = session.run(None, feeds)
        step = torch.from_numpy(logits[:, -1]).argmax(-1, keepdim=True)
        generated.append(step)
        position += feeds[INPUT_IDS].shape[1]
        feeds = {INPUT_IDS: step.numpy(), POSITION_IDS: torch.full((batch, 1), position).numpy(),
                 ATTENTION_MASK: causal_mask(position, 1, batch).numpy(),
                 **dict(zip(cache_names("past", export.num_layers), present, strict=True))}
    return torch.cat(generated, dim=1)
