"""Recipes' activation bits: QuaRot's W4A8 puts 8 bits on exactly the tensors a Linear layer reads (the operands of
the integer matmuls) and leaves every other activation at 16; the strict W4A8 puts 8 bits on every op's output the
htp config does not keep at 16."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import edgequant.llm as llm
from edgequant.quantization import PerTensor

VOCAB, LAYERS = 96, 2


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(3))


def _expected_feeds(down_input: str) -> dict[str, str]:
    """Linear layer -> the op whose output it reads, written out for the tiny Llama."""
    feeds = {"lm_head": "model.norm"}
    for i in range(LAYERS):
        layer = f"model.layers.{i}"
        feeds |= {f"{layer}.self_attn.{p}": f"{layer}.input_layernorm" for p in ("q_proj", "k_proj", "v_proj")}
        feeds[f"{layer}.self_attn.o_proj"] = f"{layer}.self_attn.attend.context"
        feeds |= {f"{layer}.mlp.{p}": f"{layer}.post_attention_layernorm" for p in ("gate_proj", "up_proj")}
        feeds[f"{layer}.mlp.down_proj"] = f"{layer}.mlp.{down_input}"
    return feeds


@pytest.mark.parametrize(("recipe", "down_input"), [("w4a8", "mul"), ("w4a8-r4", "down_rotation.rotate")])
def test_w4a8_puts_8_bits_on_exactly_the_linear_inputs(recipe, down_input, ids) -> None:
    sim = llm.quantize(tiny_llama(), ids, recipe=recipe, block_size=16, kv_cache_bw=8, progress=False)
    feeds = _expected_feeds(down_input)
    assert {name: q.owner for name, q in llm.linear_input_quantizers(sim).items()} == feeds
    kv_cache = {f"model.layers.{i}.self_attn.{op}" for i in range(LAYERS) for op in ("rope_k.add", "v_proj")}
    bits = {q.name: (q.owner, q.bitwidth) for q in sim.quantizers(("input", "output")).values() if q.enabled}
    eight = {owner for owner, bitwidth in bits.values() if bitwidth == 8}
    assert eight == set(feeds.values()) | kv_cache
    assert {bitwidth for owner, bitwidth in bits.values() if owner not in eight} == {16}
    assert sim.quantizer("lm_head.param_quantizers.weight").bitwidth == 4

    # what each Linear reads in a quantized forward lies on a 256-value grid; the residual stream does not
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):  # noqa: ANN202 - a hook factory
        def hook(module: nn.Module, args: tuple) -> None:
            seen[name] = args[0].detach()
        return hook

    modules = dict(sim.model.named_modules())
    handles = [modules[name].register_forward_pre_hook(keep(name)) for name in [*feeds, "model.layers.1.add_1"]]
    with torch.no_grad():
        sim.model(input_ids=ids[:1], use_cache=False)
    for handle in handles:
        handle.remove()
    assert all(seen[name].unique().numel() <= 256 for name in feeds)
    assert seen["model.layers.1.add_1"][0].unique().numel() > 256


def test_strict_w4a8_puts_8_bits_on_the_linear_outputs_too(ids) -> None:
    sim = llm.quantize(tiny_llama(), ids, recipe="w4a8-strict-r4", block_size=16, kv_cache_bw=8, progress=False)
    bits = {q.owner: q.bitwidth for q in sim.quantizers("output").values() if q.enabled}
    assert bits["model.layers.0.mlp.down_proj"] == bits["model.layers.0.mlp.act_fn"] == 8
    assert all(bits[q.owner] == 8 for q in llm.linear_input_quantizers(sim).values())
    assert bits["model.layers.0.add"] == bits["model.layers.0.mlp.mul"] == 16


def test_smoothquant_searches_alpha_on_the_grid_of_the_8_bit_linear_inputs(ids) -> None:
    """SmoothQuant divides a producer's output and searches α with that output quantized asymmetric, per tensor,
    ``activation_bw`` bits: in w4a8 that output is what its Linears read, on that very grid."""
    settings = llm.SmoothingSettings(alpha=None, progress=False)
    report = llm.smooth_causal_lm(llm.prepare_causal_lm(tiny_llama()), ids, settings)
    inputs = llm.linear_input_quantizers(llm.quantize(tiny_llama(), ids, recipe="w4a8", block_size=16,
                                                      progress=False))
    assert len(report.groups) == 2 * LAYERS
    for group in report.groups:
        for consumer in group.consumers:
            quantizer = inputs[consumer]
            assert quantizer.owner == group.name
            assert (quantizer.bitwidth, quantizer.symmetric) == (settings.activation_bw, False)
            assert type(quantizer.granularity) is PerTensor


def test_w4a8_recipes_smooth_down_projs_input_and_the_field_alone_decides(ids, monkeypatch) -> None:
    assert all(llm.RECIPES[r].smooth_down_proj for r in ("w4a8", "w4a8-r4", "w4a8-r4-seqmse-gptq"))
    smoothed = dataclasses.replace(llm.RECIPES["w4a8-r4"], name="smoothed", techniques=())
    for recipe in (smoothed, dataclasses.replace(smoothed, name="unsmoothed", smooth_down_proj=False)):
        monkeypatch.setitem(llm.RECIPES, recipe.name, recipe)
    mlps = [llm.quantize(tiny_llama(), ids, recipe=name, block_size=16, progress=False).model.model.layers[0].mlp
            for name in ("smoothed", "unsmoothed")]
    assert torch.equal(mlps[0].gate_proj.weight, mlps[1].gate_proj.weight)
    ratios = mlps[0].up_proj.weight / mlps[1].up_proj.weight  # each row divided by its channel's scale
    assert torch.allclose(ratios, ratios[:, :1].expand_as(ratios), rtol=1e-4)
    assert (ratios[:, 0] - 1).abs().max() > 0.05
