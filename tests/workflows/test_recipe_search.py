"""The language-model recipe search returns the cheapest recipe within the perplexity budget, trying cheap ones
first, and the lowest perplexity when none meets it."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import edgequant.llm as llm
from edgequant.workflows import choose_recipe, weight_bits

RECIPES = ["w8a16", "w4a16-lpbq", "w4a16"]


def _progressions(count: int, seed: int) -> torch.Tensor:
    """Sequences counting up by a step of 1 to 3 (mod 96): a model trained on them has something to lose."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 96, (count, 1), generator=generator)
    step = torch.randint(1, 4, (count, 1), generator=generator)
    return (start + step * torch.arange(24)) % 96


@pytest.fixture(scope="module")
def setup() -> tuple[LlamaForCausalLM, torch.Tensor, torch.Tensor, dict[str, float]]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        batch = _progressions(16, step)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    calibration, evaluation = _progressions(8, 1000), _progressions(4, 1001)
    reference = llm.perplexity(model, evaluation, progress=False)
    increase = {name: llm.perplexity(llm.quantize(model, calibration, recipe=name, block_size=16, progress=False),
                                     evaluation, progress=False) / reference - 1 for name in RECIPES}
    return model, calibration, evaluation, increase


def test_bits_per_weight_count_the_block_scales() -> None:
    assert weight_bits(llm.RECIPES["w8a16"], 64) == 8
    assert weight_bits(llm.RECIPES["w4a16-lpbq"], 64) == 4 + 4 / 64
    assert weight_bits(llm.RECIPES["w4a16-block"], 64) == 4 + 16 / 64


def test_the_cheapest_recipe_within_the_budget_is_chosen_after_trying_only_cheaper_ones(setup) -> None:
    model, calibration, evaluation, increase = setup
    assert increase["w4a16"] > increase["w4a16-lpbq"] > increase["w8a16"]  # the premise of the budgets below
    budget = (increase["w4a16-lpbq"] + increase["w4a16"]) / 2
    choice = choose_recipe(model, calibration, evaluation, max_increase=budget, recipes=RECIPES, block_size=16,
                           progress=False)
    assert choice.within_budget and choice.recipe == "w4a16-lpbq"
    assert [t.recipe for t in choice.trials] == ["w4a16", "w4a16-lpbq"]
    assert choice.trials[1].increase == pytest.approx(increase["w4a16-lpbq"], rel=1e-9)
    assert llm.perplexity(choice.sim, evaluation, progress=False) == pytest.approx(choice.trials[1].perplexity)


def test_no_recipe_within_the_budget_gives_the_lowest_perplexity(setup) -> None:
    model, calibration, evaluation, increase = setup
    four_bit = ["w4a16-lpbq", "w4a16"]
    choice = choose_recipe(model, calibration, evaluation, max_increase=min(increase[n] for n in four_bit) / 2,
                           recipes=four_bit, block_size=16, progress=False)
    assert not choice.within_budget and choice.recipe == "w4a16-lpbq" and len(choice.trials) == 2
    assert "no recipe met the budget" in choice.summary()


def test_unknown_recipes_and_negative_budgets_are_refused(setup) -> None:
    model, calibration, evaluation, _ = setup
    with pytest.raises(ValueError, match=r"\['w2'\] are not known"):
        choose_recipe(model, calibration, evaluation, recipes=["w2"], progress=False)
    with pytest.raises(ValueError, match="max_increase must be >= 0"):
        choose_recipe(model, calibration, evaluation, max_increase=-0.1, progress=False)
