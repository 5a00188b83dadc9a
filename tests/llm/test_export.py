"""export_causal_lm: ONNX Runtime decodes the QDQ graph step by step (prefill, then one token per call with the
present keys and values fed back as the past) to the sim's greedy tokens and the sim's logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from edgequant.llm import greedy_generate, kv_cache_quantizers, quantize  # noqa: E402
from edgequant.llm.export import (  # noqa: E402
    ATTENTION_MASK,
    INPUT_IDS,
    POSITION_IDS,
    cache_names,
    causal_mask,
    export_causal_lm,
    load_causal_lm_encodings,
    onnxruntime_generate,
    onnxruntime_session,
    prefill_feeds,
)

NEW_TOKENS = 16
MAX_LOGITS_STEPS = 8
"""Measured: 1 step (w8a16), 4 steps (w4a16-lpbq). The graph's SiLU (Sigmoid, Mul) differs from torch's kernel in
the last float bit, one 16-bit activation in a thousand rounds to the next step, and the flips spread."""


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    """A random Llama whose greedy continuations vary from token to token (initializer_range 0.2; at the default
    0.02 it repeats one token, which a decoder that ignores its cache would reproduce too)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prompts() -> torch.Tensor:
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module", params=["w8a16", "w4a16-lpbq"])
def exported(request: pytest.FixtureRequest, tiny_llama: LlamaForCausalLM,
             tmp_path_factory: pytest.TempPathFactory) -> tuple:
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    sim = quantize(tiny_llama, calibration, recipe=request.param, block_size=32, progress=False)
    return request.param, sim, export_causal_lm(sim, tmp_path_factory.mktemp(request.param))


def _logits_scale(sim: object) -> float:
    return float(sim.model.lm_head.output_quantizers["0"].encoding.scale)


def _off_grid(values: np.ndarray, scale: float) -> float:
    """Largest distance to the grid of ``scale``, in steps, beyond float32's rounding of ``integer * scale``."""
    steps = values.astype(np.float64) / scale
    return float((np.abs(steps - np.round(steps)) - 1e-6 * np.abs(steps)).max())


def test_graph_has_cache_inputs_outputs_and_qdq(exported: tuple) -> None:
    recipe, _, export = exported
    assert export.float_path.is_file() and export.encodings_path.is_file()
    model = onnx.load(export.onnx_path)
    assert [i.name for i in model.graph.input] == list(export.input_names)
    assert [o.name for o in model.graph.output] == list(export.output_names)
    assert export.input_names[3:] == ("past_key_0", "past_value_0", "past_key_1", "past_value_1")
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*model.graph.input, *model.graph.output)}
    assert dims["past_key_0"] == ["batch", 2, "past_length", 16]
    assert dims[ATTENTION_MASK] == ["batch", 1, "sequence", "total_length"]
    assert dims["logits"][:2] == ["batch", "sequence"]
    assert [dims["present_value_1"][axis] for axis in (0, 2)] == ["batch", "total_length"]
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("QuantizeLinear") > 50 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    initializers = {init.name: init for init in model.graph.initializer}
    weights = {node.input[0]: node for node in model.graph.node
               if node.op_type == "DequantizeLinear" and node.input[0].endswith("proj.weight_quantized")}
    assert len(weights) == 14  # q, k, v, o, gate, up, down in each of the 2 layers
    for tensor, node in weights.items():
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if recipe == "w4a16-lpbq":
            assert initializers[tensor].data_type == onnx.TensorProto.INT4
            assert attributes == {"axis": 1, "block_size": 32}
            assert node.input[1] not in initializers  # block scales computed from uint8 multipliers, not stored
        else:
            assert initializers[tensor].data_type == onnx.TensorProto.INT8
            assert attributes == {"axis": 0}
    float_weights = [init.name for init in model.graph.initializer
                     if init.data_type == onnx.TensorProto.FLOAT and numpy_helper.to_array(init).size >= 64 * 64]
    assert float_weights == []  # the tied embedding's float copy is gone too


def test_rotary_tables_are_gathered_not_computed(exported: tuple, tiny_llama: LlamaForCausalLM) -> None:
    """The graph rotates by rows of the sim's own cos and sin tables (ORT's Cos and Sin round otherwise than
    PyTorch's on about one value in seven)."""
    _, _, export = exported
    graph = onnx.load(export.onnx_path).graph
    assert not {"Cos", "Sin"} & {node.op_type for node in graph.node}
    constants = [*graph.initializer, *(a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute)]
    tables = [numpy_helper.to_array(t) for t in constants
              if tuple(t.dims) == (tiny_llama.config.max_position_embeddings, 16)]
    assert len(tables) == 2
    positions = torch.arange(tiny_llama.config.max_position_embeddings)[None]
    cos, sin = tiny_llama.model.rotary_emb(torch.zeros(1), positions)
    assert {array.tobytes() for array in tables} == {cos[0].numpy().tobytes(), sin[0].numpy().tobytes()}


def test_present_keys_and_values_are_on_the_cache_grids(exported: tuple, prompts: torch.Tensor) -> None:
    """What the runtime feeds back as the past is what the sim's cache stores: the quantized keys and values."""
    _, sim, export = exported
    _, *present = onnxruntime_session(export, "basic").run(None, prefill_feeds(export, prompts))
    for layer, names in kv_cache_quantizers(sim).items():
        for name, values in zip((names.key, names.value), present[2 * layer: 2 * layer + 2], strict=True):
            scale = float(sim.quantizer(name).encoding.scale)
            assert _off_grid(values, scale) < 1e-3
            assert np.unique(np.round(values / scale)).size > 50  # not a constant


@pytest.mark.parametrize("level", ["basic", "all"])
def test_prefill_logits_match_the_sim(exported: tuple, prompts: torch.Tensor, level: str) -> None:
    _, sim, export = exported
    logits = onnxruntime_session(export, level).run(None, prefill_feeds(export, prompts))[0]
    with torch.no_grad(), sim.frozen_weights():
        expected = sim.model(input_ids=prompts, use_cache=False).logits.numpy()
    scale = _logits_scale(sim)
    assert np.abs(logits - expected).max() <= MAX_LOGITS_STEPS * scale
    assert _off_grid(logits, scale) < 1e-3  # ORT ran the logits' QuantizeLinear/DequantizeLinear


@pytest.mark.parametrize("level", ["basic", "all"])
def test_ort_greedy_decoding_equals_the_sim(exported: tuple, prompts: torch.Tensor, level: str) -> None:
    _, sim, export = exported
    expected = torch.cat([greedy_generate(sim, prompt.unsqueeze(0), NEW_TOKENS) for prompt in prompts]).numpy()
    assert all(np.unique(row).size >= 8 for row in expected)  # continuations that depend on the context
    np.testing.assert_array_equal(onnxruntime_generate(export, prompts, NEW_TOKENS, optimization=level).numpy(),
                                  expected)


@pytest.mark.parametrize("level", ["basic", "all"])
def test_emulating_sim_computes_what_ort_computes(exported: tuple, prompts: torch.Tensor, level: str) -> None:
    """`sim.emulate("onnxruntime")` on the whole causal LM (its KV cache included): every op emulated, the prefill
    logits identical to ORT's where the default sim's are not, and every greedily decoded token."""
    _, sim, export = exported
    logits = onnxruntime_session(export, level).run(None, prefill_feeds(export, prompts))[0]
    with torch.no_grad(), sim.frozen_weights():
        default = sim.model(input_ids=prompts, use_cache=False).logits.numpy()
    plan = sim.emulate("onnxruntime")
    try:
        assert not plan.skipped, plan.summary()
        with torch.no_grad(), sim.frozen_weights():
            emulated = sim.model(input_ids=prompts, use_cache=False).logits.numpy()
        np.testing.assert_array_equal(emulated, logits)
        assert not np.array_equal(default, logits)
        for prompt in prompts:  # one at a time in both: a batch changes the rows, and MLAS's kernels, of every product
            expected = greedy_generate(sim, prompt[None], NEW_TOKENS)
            assert torch.equal(onnxruntime_generate(export, prompt[None], NEW_TOKENS, optimization=level), expected)
    finally:
        sim.emulate(None)


def test_decode_step_reads_its_past(exported: tuple, prompts: torch.Tensor) -> None:
    """A decode step given the prefill's present differs from one given no past: the cache is a real input (at
    batch size 1, which the graph was not traced with)."""
    _, sim, export = exported
    session = onnxruntime_session(export, "basic")
    prompt = prompts[:1]
    _, *present = session.run(None, prefill_feeds(export, prompt))
    step = {INPUT_IDS: prompt[:, -1:].numpy(), POSITION_IDS: np.full((1, 1), 8)}
    with_past = session.run(None, {**step, ATTENTION_MASK: causal_mask(8, 1).numpy(),
                                   **dict(zip(cache_names("past", 2), present, strict=True))})[0]
    without = session.run(None, {**step, ATTENTION_MASK: causal_mask(0, 1).numpy(),
                                 **{k: v.numpy() for k, v in export.empty_past().items()}})[0]
    assert np.abs(with_past - without).max() > 10 * _logits_scale(sim)


def test_causal_mask() -> None:
    mask = causal_mask(2, 3, batch=2)
    assert mask.shape == (2, 1, 3, 5)
    allowed = mask[0, 0] == 0
    assert allowed.tolist() == [[True, True, True, False, False], [True, True, True, True, False],
                                [True, True, True, True, True]]
    assert (mask[~allowed.expand_as(mask)] == torch.finfo(torch.float32).min).all()


def test_encodings_are_aimet_2_with_lpbq_entries_for_the_blocked_weights(exported) -> None:
    recipe, sim, export = exported
    document = json.loads(export.encodings_path.read_text())
    assert document["version"] == "2.0.0"
    blocked = [entry for entry in document["encodings"] if "per_block_int_scale" in entry]
    if recipe == "w4a16-lpbq":
        assert len(blocked) == 15  # the 14 projections and lm_head
        assert all(entry["block_size"] == 32 and entry["output_dtype"] == "int4" for entry in blocked)
        lm_head = sim.quantizer("lm_head.param_quantizers.weight")
        entry = next(e for e in blocked if e["per_block_int_scale"] and len(e["per_channel_float_scale"]) == 128)
        assert len(entry["per_channel_float_scale"]) == lm_head.scale.shape[0]
    else:
        assert not blocked


def test_onnxruntime_generate_decodes_the_sims_tokens(exported, prompts) -> None:
    _, sim, export = exported
    expected = torch.cat([greedy_generate(sim, prompt[None], 6) for prompt in prompts])
    assert torch.equal(onnxruntime_generate(export, prompts, 6, optimization="basic"), expected)
    with pytest.raises(ValueError, match="optimization must be one of basic, all"):
        onnxruntime_generate(export, prompts, 1, optimization="extended")


def test_encodings_load_back_into_a_sim_calibrated_on_other_text(exported, tiny_llama) -> None:
    recipe, sim, export = exported
    other = quantize(tiny_llama, torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(9)),
                     recipe=recipe, block_size=32, progress=False)
    mine, theirs = sim.quantizers(), other.quantizers()
    enabled = [name for name, quantizer in mine.items() if quantizer.enabled]
    assert any(not torch.equal(mine[n].scale, theirs[n].scale) for n in enabled)  # the other text moved them
    report = load_causal_lm_encodings(other, export.encodings_path)
    assert sorted(report.loaded) == sorted(enabled)
    for name in enabled:
        assert torch.equal(mine[name].scale, theirs[name].scale) and torch.equal(mine[name].offset, theirs[name].offset)
