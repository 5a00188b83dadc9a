"""Layer-by-layer techniques run each decoder block from its cached inputs, with the whole-model results."""

from __future__ import annotations

import pytest
import torch
from tiny_llm import sharing_check_sim
from torch import nn
from transformers import DynamicCache

import edgequant.llm.block_inputs as block_inputs
from edgequant.llm import GptqSettings, SequentialMseSettings, gptq, sequential_mse


def _whole_model_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_inputs, "decoder_blocks", lambda model, names: [])


@pytest.mark.parametrize("technique, budget_mb", [("gptq", 1024.0), ("sequential_mse", 1024.0), ("gptq", 0.0)],
                         ids=["gptq", "sequential_mse", "gptq-disk"])
def test_cached_block_inputs_give_the_whole_model_results(technique: str, budget_mb: float,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    caches = []

    class Recorded(block_inputs.LayerCache):
        def __init__(self, memory_budget_mb: float) -> None:
            super().__init__(memory_budget_mb)
            caches.append(self)

    monkeypatch.setattr(block_inputs, "LayerCache", Recorded)
    monkeypatch.setattr(block_inputs.BlockForwards.__init__, "__defaults__", (budget_mb,))
    cached, batches, cached_forwards, make_sim = sharing_check_sim()
    run = {"gptq": lambda sim: gptq(sim, batches, GptqSettings(progress=False)),
           "sequential_mse": lambda sim: sequential_mse(sim, batches, SequentialMseSettings(progress=False))}[technique]
    run(cached)
    _whole_model_only(monkeypatch)
    whole = make_sim()
    whole_forwards = []
    whole.model.register_forward_pre_hook(lambda *_: whole_forwards.append(1))
    run(whole)
    assert len(cached_forwards) < len(whole_forwards)
    assert any(cache.bytes_spilled for cache in caches) == (budget_mb == 0)
    for name, module in cached.quantized_modules().items():
        if isinstance(module, nn.Linear):
            assert torch.equal(module.weight, whole.model.get_submodule(name).weight), name
    for name, quantizer in cached.quantizers("param").items():
        assert torch.equal(quantizer.scale, whole.quantizer(name).scale), name


def test_a_stack_whose_blocks_take_other_arguments_runs_the_whole_model() -> None:
    """Blocks called with arguments of their own (not the previous block's output and block 0's others) cannot
    be chained from a cache: every pass runs the model."""

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8)) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for index, layer in enumerate(self.layers):
                x = layer(x * (index + 1))  # each block reads a new tensor, not the previous block's output
            if float(x.abs().sum()) < 0:  # data-dependent: fx cannot trace the stack, which keeps its ModuleList
                raise AssertionError
            return x

    from edgequant import QuantSim  # noqa: PLC0415

    x = torch.randn(4, 8)
    sim = QuantSim(Stack().eval(), x, param_bw=4, config="per_channel")
    sim.calibrate([x], progress=False)
    names = [f"layers.{i}.0" for i in range(3)]
    assert [name for name, _ in block_inputs.decoder_blocks(sim.model, names)] == ["layers.0", "layers.1", "layers.2"]
    assert block_inputs.BlockForwards(sim, list(sim.batches([x])), names).blocks == []


def test_block_inputs_on_disk_come_back_bit_for_bit_and_the_folder_goes_with_them() -> None:
    hidden, mask = torch.randn(2, 5, 8), torch.zeros(2, 1, 5, 5)
    cos_sin = (torch.randn(2, 5, 4), torch.randn(2, 5, 4))
    with block_inputs.BlockInputs(memory_budget_mb=0) as inputs:
        inputs.append((hidden, mask), {"position_embeddings": cos_sin, "cache": DynamicCache(), "use_cache": True})
        (args, kwargs), folder = inputs[0], inputs.store._spill_dir
        assert torch.equal(args[0], hidden) and torch.equal(args[1], mask) and kwargs["cache"] is None
        assert kwargs["use_cache"] is True and all(map(torch.equal, kwargs["position_embeddings"], cos_sin))
        inputs.set_hidden_states(0, hidden + 1)
        assert torch.equal(inputs.hidden_states(0), hidden + 1) and torch.equal(inputs[0][0][1], mask)
        assert inputs.store.bytes_in_memory == 0 and len(list(folder.iterdir())) == 4
    assert not folder.exists()
