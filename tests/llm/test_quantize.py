"""Causal LMs in the sim: the prepared model computes the float function, recipes put each tensor on its grid, the
KV cache holds values on its quantizers' grids, and prefill + decode agrees with a full-sequence forward."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import edgequant.llm as llm
from edgequant.quantization import Lpbq, PerBlock, PerChannel

VOCAB = 96


def tiny_llama(attn: str = "eager", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def tiny_qwen3() -> Qwen3ForCausalLM:
    torch.manual_seed(1)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         tie_word_embeddings=False, attn_implementation="eager")
    return Qwen3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("make", [tiny_llama, lambda: tiny_llama("sdpa"), tiny_qwen3], ids=["llama", "sdpa", "qwen3"])
def test_prepared_model_computes_the_float_function_and_leaves_the_users_model_alone(make, ids) -> None:
    model = make()
    before = copy.deepcopy(model.state_dict())
    attention_class = type(model.model.layers[0].self_attn)
    prepared = llm.prepare_causal_lm(model)
    with torch.no_grad():
        assert torch.allclose(prepared(ids).logits, model(ids).logits, atol=1e-5)
    assert type(model.model.layers[0].self_attn) is attention_class
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.lm_head.weight is model.model.embed_tokens.weight or not model.config.tie_word_embeddings


@pytest.mark.parametrize("recipe, grid, bits", [("w8a16", PerChannel, 8), ("w8a16-rotated", PerChannel, 8),
                                                ("w4a16", PerChannel, 4),
                                                ("w4a16-block", PerBlock, 4), ("w4a16-lpbq", Lpbq, 4),
                                                ("w4a16-rotated-gptq", Lpbq, 4),
                                                ("w4a16-rotated-seqmse-gptq", Lpbq, 4)])
def test_recipes_put_every_linear_lm_head_included_on_their_grid(recipe, grid, bits, ids) -> None:
    sim = llm.quantize(tiny_llama(), ids, recipe=recipe, block_size=16, progress=False)
    weights = {q.owner: q for q in sim.quantizers("param").values()}
    linears = [name for name, m in sim.model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "lm_head" in linears and len(linears) == 15
    for name in linears:
        assert type(weights[name].granularity) is grid and weights[name].bitwidth == bits, name
        if grid is not PerChannel:
            assert weights[name].granularity.block_size == 16
    assert weights["model.embed_tokens"].bitwidth == 8 and isinstance(weights["model.embed_tokens"].granularity,
                                                                        PerChannel)
    norms = [q for owner, q in weights.items() if owner.endswith("norm")]
    assert len(norms) == 5 and all(q.bitwidth == 8 and not q.symmetric for q in norms)
    activations = sim.quantizers(("output",)).values()
    assert {q.bitwidth for q in activations if q.enabled} == {16}
    assert all(q.ready for q in sim.quantizers().values() if q.enabled)


def test_kv_cache_holds_the_hand_quantized_keys_and_values(ids) -> None:
    sim = llm.quantize(tiny_llama(), ids, recipe="w8a16", kv_cache_bw=8, progress=False)
    names = llm.kv_cache_quantizers(sim)
    assert sorted(names) == [0, 1]
    key_quantizer, value_quantizer = sim.quantizer(names[1].key), sim.quantizer(names[1].value)
    assert key_quantizer.bitwidth == value_quantizer.bitwidth == 8
    prompt = ids[:1, :10]
    with torch.no_grad():
        float_cache = DynamicCache()
        with sim.quantizers_enabled(False, [key_quantizer, value_quantizer]):
            sim.model(input_ids=prompt, cache=float_cache, use_cache=True)
        cache = DynamicCache()
        sim.model(input_ids=prompt, cache=cache, use_cache=True)
    for stored, unquantized, quantizer in ((cache.layers[1].keys, float_cache.layers[1].keys, key_quantizer),
                                           (cache.layers[1].values, float_cache.layers[1].values, value_quantizer)):
        scale, offset = float(quantizer.scale), float(quantizer.offset)
        by_hand = torch.clamp(torch.round(unquantized / scale), offset, offset + 255) * scale
        assert torch.equal(stored, by_hand)
        levels = stored / scale
        assert torch.allclose(levels, levels.round(), atol=1e-3) and len(levels.round().unique()) > 20


@pytest.mark.parametrize("recipe, kv_bits", [("w8a16", 8), ("w4a16-lpbq", 16)])
def test_prefill_then_decoding_agrees_with_a_full_sequence_forward(recipe, kv_bits, ids) -> None:
    sim = llm.quantize(tiny_llama(), ids, recipe=recipe, block_size=16, kv_cache_bw=kv_bits, progress=False)
    sequence = ids[1:2, :16]
    with torch.no_grad(), sim.frozen_weights():
        full = sim.model(input_ids=sequence, use_cache=False).logits
        cache = DynamicCache()
        steps = [sim.model(input_ids=sequence[:, :8], cache=cache, use_cache=True).logits]
        for position in range(8, 16):
            steps.append(sim.model(input_ids=sequence[:, position:position + 1], cache=cache,
                                   use_cache=True, position_ids=torch.tensor([[position]])).logits)
    incremental = torch.cat(steps, dim=1)
    step = float(sim.quantizer("lm_head.output_quantizers.0").scale)
    assert (incremental - full).abs().max() <= 2 * step  # one 16-bit rounding may flip in a reordered sum
    assert torch.equal(incremental.argmax(-1), full.argmax(-1))


def test_greedy_generation_and_agreement_figures(ids) -> None:
    model = tiny_llama()
    sim = llm.quantize(model, ids, recipe="w8a16", progress=False)
    prompt = ids[:1, :6]
    tokens = llm.greedy_generate(model, prompt, 5)
    expected = model.generate(prompt, max_new_tokens=5, do_sample=False)[:, 6:]
    assert torch.equal(tokens, expected)
    match = llm.generation_match(model, model, [prompt], max_new_tokens=5, progress=False)
    assert match.identical == (5,) and match.share_identical == 1.0
    agreement = llm.next_token_agreement(model, sim, ids, progress=False)
    assert agreement.positions == ids.numel() and 0.9 <= agreement.share <= 1.0


def test_perplexity_equals_the_models_own_loss(ids) -> None:
    model = tiny_llama()
    with torch.no_grad():
        losses = [float(model(input_ids=row[None], labels=row[None]).loss) for row in ids]
    assert llm.perplexity(model, ids, progress=False) == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_w4_costs_more_than_w8_and_techniques_bring_lpbq_closer_to_float(ids) -> None:
    model = tiny_llama(seed=5)
    calibration = torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = model(ids).logits
    error = {}
    for recipe in ("w8a16", "w4a16", "w4a16-lpbq", "w4a16-lpbq-seqmse", "w4a16-lpbq-gptq"):
        sim = llm.quantize(model, calibration, recipe=recipe, block_size=16, technique_batches=None, progress=False)
        with torch.no_grad():
            error[recipe] = float((sim.model(ids).logits - reference).pow(2).mean())
    assert error["w8a16"] < error["w4a16-lpbq"] < error["w4a16"]
    assert error["w4a16-lpbq-seqmse"] < error["w4a16-lpbq"]
    assert error["w4a16-lpbq-gptq"] < error["w4a16-lpbq"]


def test_bad_input_is_one_line() -> None:
    with pytest.raises(ValueError, match="unknown recipe 'w3'.*w8a16"):
        llm.quantize(tiny_llama(), torch.zeros(1, 4, dtype=torch.long), recipe="w3", progress=False)
    with pytest.raises(ValueError, match=r"LongTensor \[N, T\]"):
        llm.quantize(tiny_llama(), torch.zeros(4), progress=False)
    with pytest.raises(ValueError, match="no Llama-family attention"):
        llm.quantize(torch.nn.Sequential(torch.nn.Embedding(4, 4)), torch.zeros(1, 4, dtype=torch.long),
                     progress=False)


@pytest.mark.parametrize("recipe", ["w4a8-strict", "w4a8-strict-r4"])
def test_w4a8_strict_gives_linear_outputs_8_bits_and_keeps_the_htp_16_bit_ops(recipe, ids) -> None:
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    sim = llm.quantize(model, ids, recipe=recipe, block_size=16, progress=False)
    bits = {q.owner: q.bitwidth for q in sim.quantizers("output").values() if q.enabled}
    assert bits["model.layers.0.self_attn.q_proj"] == bits["model.layers.1.mlp.down_proj"] == 8
    assert bits["model.layers.0.self_attn.attend.softmax"] == bits["model.layers.0.add"] == 16
    rotations = [name for name in bits if name.endswith("down_rotation.rotate")]
    if recipe == "w4a8-strict-r4":  # down_proj's input is the online rotation's output, at the activation bits
        assert rotations == ["model.layers.0.mlp.down_rotation.rotate", "model.layers.1.mlp.down_rotation.rotate"]
        assert all(bits[name] == 8 for name in rotations)
        assert not [name for name in sim.quantizers("param") if "down_rotation" in name]  # its constant stays float
    else:
        assert rotations == []
    assert math.isfinite(llm.perplexity(sim, ids, progress=False))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # rotated and smoothed: a copy


def test_lm_head_bits_override_the_recipe(ids) -> None:
    sim = llm.quantize(tiny_llama(), ids, recipe="w4a16-lpbq", block_size=16, lm_head_bw=8, progress=False)
    lm_head = sim.quantizer("lm_head.param_quantizers.weight")
    assert lm_head.bitwidth == 8 and type(lm_head.granularity) is PerChannel and lm_head.ready
    assert type(sim.quantizer("model.layers.0.mlp.up_proj.param_quantizers.weight").granularity) is Lpbq
