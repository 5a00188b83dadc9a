"""Calibrating one decoder block at a time gives the whole-model pass's encodings bit for bit, each quantizer
observing each batch once, with the block inputs in memory or on disk; a stack that cannot be chained runs whole."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import edgequant.llm as llm
from edgequant import QuantSim
from edgequant.llm.block_calibration import BlockCalibrationSettings, calibrate_by_block
from edgequant.llm.quantize import apply_recipe
from edgequant.llm.recipes import recipe_named
from edgequant.quantization import Quantizer

VOCAB = 80


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()


def tiny_qwen3() -> Qwen3ForCausalLM:
    torch.manual_seed(1)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        tie_word_embeddings=False)).eval()


def batches() -> list[torch.Tensor]:
    ids = torch.randint(0, VOCAB, (5, 10), generator=torch.Generator().manual_seed(2))
    return [ids[:2], ids[2:3], ids[3:]]  # batches of 2, 1 and 2 sequences


def make_sim(model: nn.Module, scheme: str) -> QuantSim:
    prepared = llm.prepare_causal_lm(model)
    sim = QuantSim(prepared, (batches()[0],), config="htp", param_bw=8, output_bw=16, quant_scheme=scheme,
                   in_place=True)
    apply_recipe(sim, recipe_named("w4a16-lpbq"), block_size=16, kv_cache_bw=8)
    return sim


def observations(sim: QuantSim) -> dict[str, int]:
    """Counts, per quantizer, the calls it gets while calibrating (filled as the sim runs)."""
    counts = dict.fromkeys(sim.quantizers(), 0)
    for name, quantizer in sim.quantizers().items():
        quantizer.register_forward_pre_hook(
            lambda q, _args, name=name: counts.__setitem__(name, counts[name] + q.calibrating))
    return counts


def assert_same_encodings(sim: QuantSim, reference: QuantSim) -> None:
    for name, quantizer in reference.quantizers().items():
        other = sim.quantizer(name)
        assert (other.scale is None) == (quantizer.scale is None), name
        if quantizer.scale is not None:
            assert torch.equal(other.scale, quantizer.scale) and torch.equal(other.offset, quantizer.offset), name


@pytest.mark.parametrize("make, scheme, budget_mb", [(tiny_llama, "minmax", 64.0), (tiny_llama, "percentile", 0.0),
                                                     (tiny_qwen3, "sqnr", 0.0)], ids=["llama", "llama-disk", "qwen3"])
def test_block_by_block_gives_the_whole_model_encodings_bit_for_bit(make, scheme, budget_mb) -> None:
    whole, by_block = make_sim(make(), scheme), make_sim(make(), scheme)
    whole_counts, block_counts = observations(whole), observations(by_block)
    whole.calibrate(batches(), progress=False)
    report = calibrate_by_block(by_block, batches(), BlockCalibrationSettings(memory_budget_mb=budget_mb,
                                                                              progress=False))
    assert report.blocks == len(by_block.model.model.layers) and report.batches == 3
    assert (report.spilled_mb > 0) == (budget_mb == 0)
    assert block_counts == whole_counts and {"model.embed_tokens.output_quantizers.0": 3,
                                             "lm_head.output_quantizers.0": 3}.items() <= block_counts.items()
    assert_same_encodings(by_block, whole)


def test_frozen_encodings_outside_the_stack_keep_quantizing() -> None:
    """A frozen embedding output quantizer rounds the block inputs in both passes: the same encodings after."""
    sims = [make_sim(tiny_llama(), "minmax") for _ in range(2)]
    for sim in sims:
        sim.calibrate(batches()[:1], progress=False)
        sim.freeze_encodings("model.embed_tokens")
    sims[0].calibrate(batches(), progress=False)
    calibrate_by_block(sims[1], batches(), BlockCalibrationSettings(progress=False))
    assert_same_encodings(sims[1], sims[0])


class Unchained(nn.Module):
    """A stack whose blocks each read a new tensor (not the previous block's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x * (index + 1))
        if float(x.abs().sum()) < 0:  # data-dependent: fx cannot trace the stack, which keeps its ModuleList
            raise AssertionError
        return self.head(x)


def test_a_stack_that_cannot_be_chained_runs_through_the_whole_model() -> None:
    data = [torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    torch.manual_seed(0)
    model = Unchained().eval()
    whole, by_block = (QuantSim(model, data[0], param_bw=4, config="per_channel") for _ in range(2))
    whole.calibrate(data, progress=False)
    assert calibrate_by_block(by_block, data, BlockCalibrationSettings(progress=False)).blocks == 0
    assert_same_encodings(by_block, whole)


def test_in_place_quantizes_the_given_model_with_the_encodings_of_a_copy() -> None:
    ids = torch.cat(batches()[1:])
    copied = llm.quantize(tiny_llama(), ids, recipe="w4a16-lpbq", block_size=16, progress=False)
    model = tiny_llama()
    sim = llm.quantize(model, ids, recipe="w4a16-lpbq", block_size=16, progress=False,
                       memory=llm.MemorySettings(in_place=True, block_inputs_mb=0))
    assert sim.model is model and isinstance(model.model.layers[0].self_attn.rope_k.add, nn.Module)
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied: the grids differ
    assert_same_encodings(sim, copied)
    assert all(isinstance(q, Quantizer) for q in sim.quantizers().values())
