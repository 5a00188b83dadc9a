"""SmoothQuant and AWQ scaling: the float function is unchanged, a planted activation outlier moves where α says, the
errors the methods minimise go down (measured here with the tests' own fake quantization), AWQ's α is the best of
its grid, and the scaled models still quantize."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import edgequant.llm as llm
from edgequant.llm.smoothing import AwqSettings, SmoothingSettings, awq_causal_lm, smooth_causal_lm

VOCAB, OUTLIER_CHANNEL, BLOCK = 96, 5, 16


def tiny_llama(outlier: float = 1.0) -> LlamaForCausalLM:
    """A random tiny Llama (GQA: 4 query heads on 2 key/value heads, norm weights at one); ``outlier`` multiplies one
    entry of the first layer's input norm weight, which plants an outlier channel in the q/k/v inputs."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(std=0.2)
        model.model.layers[0].input_layernorm.weight[OUTLIER_CHANNEL] *= outlier
    return model


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(3))


def qkv_inputs(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The input of the first layer's q/k/v projections over ``ids``, [tokens, hidden]."""
    captured = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda module, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return torch.cat(captured)


def qkv_weights(model: LlamaForCausalLM) -> list[torch.Tensor]:
    attention = model.model.layers[0].self_attn
    return [attention.q_proj.weight.detach(), attention.k_proj.weight.detach(), attention.v_proj.weight.detach()]


def symmetric_blocks(weight: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Symmetric min-max fake quantization, one scale per ``block`` input features of each row."""
    rows = weight.reshape(weight.shape[0], -1, block)
    top = 2 ** (bits - 1)
    scale = rows.abs().amax(-1, keepdim=True) / (top - 1)
    return (torch.round(rows / scale).clamp(-top, top - 1) * scale).reshape(weight.shape)


def asymmetric_tensor(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min-max fake quantization with one scale for the whole tensor (zero exact)."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / (2**bits - 1)
    offset = round(low / scale)
    return (torch.round(x / scale).clamp(offset, offset + 2**bits - 1)) * scale


def output_error(x: torch.Tensor, weights: list[torch.Tensor], quantized_x: torch.Tensor,
                 quantized_weights: list[torch.Tensor]) -> float:
    """Relative output error of the quantized matmuls against the float ones, summed over the Linears."""
    pairs = zip(weights, quantized_weights, strict=True)
    error = sum(float((quantized_x @ q.T - x @ w.T).square().sum()) for w, q in pairs)
    return error / sum(float((x @ w.T).square().sum()) for w in weights)


def w8a8_error(model: LlamaForCausalLM, ids: torch.Tensor) -> float:
    x, weights = qkv_inputs(model, ids), qkv_weights(model)
    return output_error(x, weights, asymmetric_tensor(x, 8), [symmetric_blocks(w, 8, w.shape[1]) for w in weights])


def w4_block_error(model: LlamaForCausalLM, ids: torch.Tensor) -> float:
    x, weights = qkv_inputs(model, ids), qkv_weights(model)
    return output_error(x, weights, x, [symmetric_blocks(w, 4, BLOCK) for w in weights])


def channel_max_ratio(values: torch.Tensor, dim: int) -> float:
    """Largest over median of the per-channel max |value| (channels along ``dim``)."""
    maxima = values.abs().amax(dim)
    return float(maxima.max() / maxima.median())


SCALERS = {
    "smoothquant": lambda model, ids: smooth_causal_lm(
        model, ids, SmoothingSettings(alpha=None, attention_output=True, mlp_down=True, progress=False)),
    "awq": lambda model, ids: awq_causal_lm(model, ids, AwqSettings(block_size=BLOCK, progress=False)),
}


@pytest.mark.parametrize("method", SCALERS)
def test_scaled_float_model_gives_the_same_logits(method, ids) -> None:
    model = tiny_llama(outlier=30.0)
    scaled = copy.deepcopy(model)
    report = SCALERS[method](scaled, ids)
    assert [g.name.rsplit(".", 1)[-1] for g in report.groups[:4]] == [
        "input_layernorm", "v_proj", "post_attention_layernorm", "up_proj"]
    assert len(report.groups) == 8 and report.tokens == ids.numel()
    for name, parameter in scaled.named_parameters():  # every scaled place moved: the check below is not vacuous
        if any(part in name for part in ("layernorm", "proj")):
            assert not torch.equal(parameter, model.get_parameter(name)), name
    with torch.no_grad():
        reference, logits = model(ids).logits, scaled(ids).logits
    assert (logits - reference).abs().max() < 1e-4 * reference.abs().max()


def test_smoothquant_lowers_the_w8a8_error_of_qkv_on_a_planted_outlier(ids) -> None:
    model = tiny_llama(outlier=30.0)
    smoothed = copy.deepcopy(model)
    report = smooth_causal_lm(smoothed, ids, SmoothingSettings(alpha=0.5, progress=False))
    before, after = w8a8_error(model, ids), w8a8_error(smoothed, ids)
    assert after < 0.5 * before
    first = report.groups[0]
    assert first.name == "model.layers.0.input_layernorm" and first.alpha == 0.5
    assert first.error_before == pytest.approx(before, rel=0.05) and first.error_after == pytest.approx(after, rel=0.05)


def test_alpha_zero_keeps_the_outlier_in_the_activations_and_alpha_one_moves_it_to_the_weights(ids) -> None:
    model = tiny_llama(outlier=30.0)
    original_ratio = channel_max_ratio(qkv_inputs(model, ids), 0)
    assert original_ratio > 10.0  # the planted outlier
    weight_ratio = channel_max_ratio(torch.cat(qkv_weights(model)), 0)
    scaled = {}
    for alpha in (0.0, 1.0):
        scaled[alpha] = copy.deepcopy(model)
        smooth_causal_lm(scaled[alpha], ids, SmoothingSettings(alpha=alpha, progress=False))
    kept = qkv_inputs(scaled[0.0], ids)
    assert channel_max_ratio(kept, 0) == pytest.approx(original_ratio, rel=0.2)  # moved by the weights' spread only
    assert channel_max_ratio(torch.cat(qkv_weights(scaled[0.0])), 0) == pytest.approx(1.0)  # weights flat instead
    moved = qkv_inputs(scaled[1.0], ids).abs().amax(0)
    assert torch.allclose(moved, torch.ones_like(moved), rtol=1e-4)  # max|X_j / s_j| = 1 for every channel
    assert channel_max_ratio(torch.cat(qkv_weights(scaled[1.0])), 0) > 5.0 * weight_ratio


def test_awq_alpha_is_the_best_of_its_grid_and_lowers_the_4_bit_block_error(ids) -> None:
    model = tiny_llama(outlier=30.0)
    x, weights = qkv_inputs(model, ids), qkv_weights(model)
    brute_force = {}
    for i in range(20):
        scale = x.abs().mean(0).pow(i / 20).clamp_min(1e-4)
        scale = scale / (scale.max() * scale.min()).sqrt()
        brute_force[i / 20] = output_error(x, weights, x / scale,
                                           [symmetric_blocks(w * scale, 4, BLOCK) for w in weights])
    best = min(brute_force, key=brute_force.get)
    scaled = copy.deepcopy(model)
    first = awq_causal_lm(scaled, ids, AwqSettings(block_size=BLOCK, progress=False)).groups[0]
    assert first.alpha == best and first.alpha > 0.0
    assert first.error_after == pytest.approx(brute_force[best], rel=1e-3)
    assert first.error_before == pytest.approx(brute_force[0.0], rel=1e-3)
    assert first.error_after <= first.error_before
    assert w4_block_error(scaled, ids) < 0.8 * w4_block_error(model, ids)


def w4_block_a8_error(model: LlamaForCausalLM, ids: torch.Tensor) -> float:
    x, weights = qkv_inputs(model, ids), qkv_weights(model)
    return output_error(x, weights, asymmetric_tensor(x, 8), [symmetric_blocks(w, 4, BLOCK) for w in weights])


@pytest.mark.parametrize(("outlier", "scaled"), [(30.0, True), (1.0, False)])
def test_smoothquant_search_keeps_the_best_of_no_scaling_and_its_alphas_for_4_bit_blocks(outlier, scaled,
                                                                                          ids) -> None:
    """With 4-bit block weights, smoothing can cost the weights more than it saves the activations: the search
    then leaves the group as it is (no outlier), and scales it where an outlier makes 8-bit activations lose more."""
    model = tiny_llama(outlier=outlier)
    settings = SmoothingSettings(alpha=None, weight_bw=4, weight_block_size=BLOCK, progress=False)
    brute_force = {None: w4_block_a8_error(model, ids)}
    for alpha in settings.alpha_grid:
        candidate = copy.deepcopy(model)
        smooth_causal_lm(candidate, ids, SmoothingSettings(alpha=alpha, weight_bw=4, weight_block_size=BLOCK,
                                                           progress=False))
        brute_force[alpha] = w4_block_a8_error(candidate, ids)
    best = min(brute_force, key=brute_force.get)
    searched = copy.deepcopy(model)
    first = smooth_causal_lm(searched, ids, settings).groups[0]
    assert first.alpha == best and (best is not None) == scaled
    assert first.error_after == pytest.approx(brute_force[best], rel=1e-3)
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(searched.get_parameter(norm), model.get_parameter(norm)) != scaled


@pytest.mark.parametrize("method", SCALERS)
def test_scaled_model_quantizes_with_a_block_recipe(method, ids) -> None:
    model = tiny_llama(outlier=30.0)
    SCALERS[method](model, ids)
    sim = llm.quantize(model, ids, recipe="w4a16-block", block_size=BLOCK, progress=False)
    assert math.isfinite(llm.perplexity(sim, ids, progress=False))


def test_bad_settings_and_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="alpha"):
        SmoothingSettings(alpha=1.5)
    with pytest.raises(ValueError, match="weight_block_size"):
        SmoothingSettings(weight_block_size=0)
    with pytest.raises(ValueError, match="block_size"):
        AwqSettings(block_size=0)
    with pytest.raises(ValueError, match="LongTensor"):
        smooth_causal_lm(tiny_llama(), torch.zeros(3, 4), SmoothingSettings(progress=False))
    with pytest.raises(ValueError, match="divide"):
        awq_causal_lm(tiny_llama(), torch.zeros(1, 4, dtype=torch.long), AwqSettings(block_size=48, progress=False))


def down_proj_a8_error(model: LlamaForCausalLM, ids: torch.Tensor) -> float:
    """Relative output error of the first layer's down_proj (float weights) on its 8-bit per-tensor min-max input,
    the grid `Recipe.linear_input_bw` gives it: under R4 the input is the rotated product ``x·H``."""
    captured = []
    down_proj = model.model.layers[0].mlp.down_proj
    handle = down_proj.register_forward_pre_hook(lambda module, args: captured.append(args[0].reshape(-1, 128)))
    with torch.no_grad():
        model(ids)
    handle.remove()
    x, weight = torch.cat(captured), down_proj.weight.detach()
    return output_error(x, [weight], asymmetric_tensor(x, 8), [weight])


@pytest.mark.parametrize("method", SCALERS)
def test_scaling_into_down_proj_under_the_online_rotation_keeps_the_logits(method, ids) -> None:
    model = tiny_llama(outlier=30.0)
    llm.rotate_causal_lm(model, llm.RotationSettings(mlp_online=True))
    scaled = copy.deepcopy(model)
    SCALERS[method](scaled, ids)
    for name in ("up_proj", "down_proj"):
        assert not torch.equal(scaled.model.layers[0].mlp.get_parameter(f"{name}.weight"),
                               model.model.layers[0].mlp.get_parameter(f"{name}.weight"))
    with torch.no_grad():
        reference, logits = model(ids).logits, scaled(ids).logits
    assert (logits - reference).abs().max() < 1e-4 * reference.abs().max()


def test_smoothquant_before_r4_lowers_down_projs_8_bit_input_error_on_a_planted_outlier(ids) -> None:
    """An up_proj row 40x the others makes one channel of the gated product an outlier; R4 spreads it over every
    channel of the tokens that carry it, so the per-tensor grid widens for all. Dividing it out before H narrows
    the grid: down_proj's output error on its 8-bit input falls."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[OUTLIER_CHANNEL] *= 40.0
    llm.rotate_causal_lm(model, llm.RotationSettings(mlp_online=True))
    smoothed = copy.deepcopy(model)
    report = smooth_causal_lm(smoothed, ids, SmoothingSettings(alpha=0.5, mlp_down=True, progress=False))
    before, after = down_proj_a8_error(model, ids), down_proj_a8_error(smoothed, ids)
    assert after < 0.25 * before
    down = next(g for g in report.groups if g.name == "model.layers.0.mlp.up_proj")
    assert down.consumers == ("model.layers.0.mlp.down_proj",) and down.error_after < down.error_before
