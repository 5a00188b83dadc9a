"""QuaRot-style rotations: the rotated model computes the original logits (R4 too, through its online op, which
exports as a MatMul that ONNX Runtime runs), its matrices are orthogonal Hadamard
matrices, a planted outlier channel is spread out of activations and weights, and the sim quantizes the result."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import edgequant.llm as llm
from edgequant.llm.rotation import RotationSettings, hadamard, randomised_hadamard, rotate_causal_lm

VOCAB, HIDDEN, OUTLIER = 96, 64, 5


def tiny_llama(tied: bool = True, biases: bool = False, hidden: int = HIDDEN, heads: int = 4,
               kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         tie_word_embeddings=tied, attention_bias=biases, mlp_bias=biases, attn_implementation="eager")
    return _randomised(LlamaForCausalLM(config).eval())


def tiny_qwen3() -> Qwen3ForCausalLM:
    torch.manual_seed(1)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         tie_word_embeddings=False, attn_implementation="eager")
    return _randomised(Qwen3ForCausalLM(config).eval())


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Norm weights away from one (fusion has something to move) and projections of the same size as the rest."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(std=0.2)
    return model


def planted_outlier_llama() -> LlamaForCausalLM:
    """Residual channel OUTLIER 50 times the others (embedding column, o_proj and down_proj output rows) and read
    through an input_layernorm weight of 50 there, as the massive activations of trained LLMs."""
    model = tiny_llama(tied=False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
        model.model.embed_tokens.weight[:, OUTLIER] *= 50
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[OUTLIER] *= 50
            layer.mlp.down_proj.weight[OUTLIER] *= 50
            layer.input_layernorm.weight[OUTLIER] = 50
    return model


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(3))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


MODELS = {"llama-tied": tiny_llama, "llama-untied": lambda: tiny_llama(tied=False),
          "llama-biases": lambda: tiny_llama(biases=True), "qwen3": tiny_qwen3,
          "smollm-shape": lambda: tiny_llama(hidden=72, heads=9, kv_heads=3),  # Paley 36 ⊗ 2, 3 query heads per kv
          "no-hadamard": lambda: tiny_llama(hidden=18, heads=3, kv_heads=1)}  # 2 ⊗ random 9, heads 2 ⊗ random 3


@pytest.mark.parametrize("prepared", [False, True], ids=["eager", "prepared"])
@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_rotated_model_computes_the_original_logits(make, prepared, ids) -> None:
    model = make()
    rotated = llm.prepare_causal_lm(model) if prepared else copy.deepcopy(model)
    report = rotate_causal_lm(rotated, probe_ids=ids)
    expected, got = _logits(model, ids), _logits(rotated, ids)
    assert report.rotations == ("norm fusion", "R1", "R2")
    assert torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max()), rtol=0)
    assert report.max_logit_difference == pytest.approx(float((got - expected).abs().max()), abs=1e-6)
    assert not torch.allclose(rotated.model.embed_tokens.weight, model.model.embed_tokens.weight, atol=1e-2)
    for name, parameter in rotated.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            assert torch.equal(parameter, torch.ones_like(parameter)), name
    if hasattr(model.model.layers[0].self_attn, "q_norm"):  # per-head norms stay as they are
        for layer, original in zip(rotated.model.layers, model.model.layers, strict=True):
            assert torch.equal(layer.self_attn.q_norm.weight, original.self_attn.q_norm.weight)


@pytest.mark.parametrize("residual, heads, rotations", [(True, False, ("norm fusion", "R1")),
                                                        (False, True, ("norm fusion", "R2")),
                                                        (False, False, ("norm fusion",))])
def test_each_rotation_alone_keeps_the_logits(residual, heads, rotations, ids) -> None:
    model = tiny_llama()
    fused, rotated = copy.deepcopy(model), copy.deepcopy(model)
    rotate_causal_lm(fused, RotationSettings(residual=False, heads=False))
    report = rotate_causal_lm(rotated, RotationSettings(residual=residual, heads=heads))
    expected = _logits(model, ids)
    assert report.rotations == rotations
    assert torch.allclose(_logits(rotated, ids), expected, atol=1e-4 * float(expected.abs().max()), rtol=0)
    changed = {name: not torch.allclose(parameter, fused.state_dict()[name], atol=1e-3)
               for name, parameter in rotated.state_dict().items()}
    assert changed["model.embed_tokens.weight"] == changed["model.layers.0.self_attn.q_proj.weight"] == residual
    assert changed["model.layers.0.self_attn.v_proj.weight"] == (residual or heads)
    assert changed["model.layers.0.self_attn.o_proj.weight"] == (residual or heads)


def test_rotation_is_deterministic_for_a_seed() -> None:
    first, second, other = tiny_llama(), tiny_llama(), tiny_llama()
    rotate_causal_lm(first)
    rotate_causal_lm(second)
    rotate_causal_lm(other, RotationSettings(seed=1))
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_tied_embedding_is_untied_and_the_rotated_model_saves_and_loads(tmp_path, ids) -> None:
    model = tiny_llama(tied=True)
    expected = _logits(model, ids)
    rotate_causal_lm(model)
    model.tie_weights()
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(_logits(loaded, ids), expected, atol=1e-4 * float(expected.abs().max()), rtol=0)


@pytest.mark.parametrize("n, paley", [(12, "Paley I (q=11) 12"), (36, "Paley II (q=17) 36"), (64, None),
                                      (576, "Paley II (q=17) 36 ⊗ Sylvester 16"),
                                      (1536, "Paley I (q=11) 12 ⊗ Sylvester 128")])
def test_hadamard_matrices_are_orthogonal_with_entries_one_over_root_n(n, paley) -> None:
    matrix = hadamard(n)
    assert torch.allclose(matrix @ matrix.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(matrix.abs(), torch.full_like(matrix, 1 / math.sqrt(n)), rtol=0, atol=1e-15)
    randomised, construction = randomised_hadamard(n, torch.Generator().manual_seed(0))
    assert torch.allclose(randomised @ randomised.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(randomised.abs(), matrix.abs()) and not torch.equal(randomised, matrix)
    assert (paley or f"Sylvester {n}") in construction


@pytest.mark.parametrize("n, hadamard_factor", [(9, 1), (100, 20)])
def test_sizes_without_a_hadamard_matrix_get_a_random_orthogonal_factor(n, hadamard_factor) -> None:
    with pytest.raises(ValueError, match=f"no Hadamard construction of size {n}"):
        hadamard(n)
    matrix, construction = randomised_hadamard(n, torch.Generator().manual_seed(0))
    assert torch.allclose(matrix @ matrix.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert f"Hadamard {hadamard_factor} =" in construction
    assert f"random orthogonal {n // hadamard_factor}" in construction


def test_rms_norm_with_unit_weight_commutes_with_an_orthogonal_matrix() -> None:
    norm = LlamaRMSNorm(HIDDEN)
    q = randomised_hadamard(HIDDEN, torch.Generator().manual_seed(0))[0].float()
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        assert torch.allclose(norm(x @ q), norm(x) @ q, atol=1e-5)
        norm.weight.uniform_(0.5, 1.5)  # why the weights move into the next Linear layers first
        assert not torch.allclose(norm(x @ q), norm(x) @ q, atol=1e-2)


def _q_proj_inputs(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    seen = []
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
             for layer in model.model.layers]
    _logits(model, ids)
    for hook in hooks:
        hook.remove()
    return seen


def _fake_quantized_4_bit(weight: torch.Tensor) -> torch.Tensor:
    """Round to nearest on a symmetric 4-bit grid per output channel."""
    scale = weight.abs().amax(dim=1, keepdim=True) / 7
    return torch.clamp(torch.round(weight / scale), -8, 7) * scale


def test_rotation_spreads_a_planted_outlier_channel_out_of_activations_and_weights(ids) -> None:
    fused = planted_outlier_llama()  # the same weights the rotated model quantizes, without the rotation
    rotate_causal_lm(fused, RotationSettings(residual=False, heads=False))
    rotated = planted_outlier_llama()
    rotate_causal_lm(rotated)
    for before, after in zip(_q_proj_inputs(fused, ids), _q_proj_inputs(rotated, ids), strict=True):
        ratio_before = float(before.abs().max() / before.pow(2).mean().sqrt())
        ratio_after = float(after.abs().max() / after.pow(2).mean().sqrt())
        assert ratio_before > 7 and ratio_after < ratio_before / 2, (ratio_before, ratio_after)
    for unrotated, layer in zip(fused.model.layers, rotated.model.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj"):
            weights = [getattr(layer_.self_attn, name).weight.detach() for layer_ in (unrotated, layer)]
            error_before, error_after = (float((w - _fake_quantized_4_bit(w)).norm() / w.norm()) for w in weights)
            assert error_after < 0.6 * error_before, (name, error_before, error_after)


def test_the_sim_quantizes_a_rotated_model(ids) -> None:
    rotated = tiny_llama()
    rotate_causal_lm(rotated)
    sim = llm.quantize(rotated, ids, recipe="w4a16", progress=False)
    quantized, float_ = llm.perplexity(sim, ids, progress=False), llm.perplexity(rotated, ids, progress=False)
    assert math.isfinite(quantized) and quantized == pytest.approx(float_, rel=0.5)


def test_models_it_cannot_rotate_exactly_are_refused_untouched() -> None:
    with pytest.raises(ValueError, match="not a Llama-family causal LM"):
        rotate_causal_lm(torch.nn.Linear(4, 4))
    model = tiny_llama()
    model.model.layers[1].input_layernorm = Gemma3RMSNorm(HIDDEN)  # (1 + w)·x/rms(x) cannot move into q/k/v
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="Gemma3RMSNorm is not an RMSNorm"):
        rotate_causal_lm(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_w8a16_rotated_narrows_the_residual_adds_grids_of_a_massive_activation(ids) -> None:
    steps = {}
    for recipe in ("w8a16", "w8a16-rotated"):
        sim = llm.quantize(planted_outlier_llama(), ids, recipe=recipe, progress=False)
        residual_adds = [q for q in sim.quantizers(("output",)).values()
                         if re.fullmatch(r"model\.layers\.\d+\.add(_1)?", q.owner)]
        assert len(residual_adds) == 4 and all(q.bitwidth == 16 for q in residual_adds)
        steps[recipe] = max(float(q.scale) for q in residual_adds)
    assert steps["w8a16-rotated"] < steps["w8a16"] / 3, steps


def _down_proj_inputs(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    captured = []
    handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
               for layer in model.model.layers]
    _logits(model, ids)
    for handle in handles:
        handle.remove()
    return captured


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen3, MODELS["smollm-shape"], MODELS["no-hadamard"]],
                         ids=["llama", "qwen3", "smollm-shape", "no-hadamard"])
def test_online_rotation_of_down_proj_inputs_keeps_the_logits(make, ids) -> None:
    """R4: down_proj reads its input times one orthogonal H through an op, its weight is W·H, the logits stay."""
    model = make()
    plain, rotated = llm.prepare_causal_lm(model), llm.prepare_causal_lm(model)
    rotate_causal_lm(plain)
    report = rotate_causal_lm(rotated, RotationSettings(mlp_online=True))
    expected = _logits(model, ids)
    assert report.rotations == ("norm fusion", "R1", "R2", "R4")
    assert torch.allclose(_logits(rotated, ids), expected, atol=1e-4 * float(expected.abs().max()), rtol=0)
    matrix = rotated.model.layers[0].mlp.down_rotation.matrix
    size = rotated.model.layers[0].mlp.down_proj.in_features
    assert size in report.constructions and matrix.shape == (size, size)
    assert torch.allclose(matrix.double() @ matrix.double().T, torch.eye(size, dtype=torch.float64), atol=1e-5)
    assert all(layer.mlp.down_rotation.matrix is matrix for layer in rotated.model.layers)  # stored once
    for before, after in zip(_down_proj_inputs(plain, ids), _down_proj_inputs(rotated, ids), strict=True):
        assert torch.allclose(after, before @ matrix, atol=1e-4 * float(before.abs().max()))
        assert not torch.allclose(after, before, atol=1e-2 * float(before.abs().max()))
    with pytest.raises(ValueError, match="rotated already"):
        rotate_causal_lm(rotated, RotationSettings(residual=False, heads=False, mlp_online=True))


def test_online_rotation_spreads_a_planted_down_proj_input_outlier(ids) -> None:
    """An up_proj row 50 times the others makes one channel of down_proj's input dominate; after R4 no channel
    does (the ratio of the largest channel's amplitude to the median drops by an order of magnitude)."""
    model = tiny_llama(tied=False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[OUTLIER] *= 50
    plain, rotated = copy.deepcopy(model), copy.deepcopy(model)
    rotate_causal_lm(plain)
    rotate_causal_lm(rotated, RotationSettings(mlp_online=True))

    def peak_to_median(inputs: torch.Tensor) -> float:
        amplitude = inputs.reshape(-1, inputs.shape[-1]).abs().amax(0)
        return float(amplitude.max() / amplitude.median())

    for before, after in zip(_down_proj_inputs(plain, ids), _down_proj_inputs(rotated, ids), strict=True):
        assert peak_to_median(before) > 20 and peak_to_median(after) < peak_to_median(before) / 10


def test_online_rotation_exports_as_a_matmul_that_onnx_runtime_runs(ids, tmp_path) -> None:
    """The sim of a w4a8-strict-r4 model exports; ORT's prefill logits match the sim's, and each layer's rotation is a
    MatMul reading one float constant of the intermediate size whose output is quantized."""
    ort = pytest.importorskip("onnxruntime")
    import onnx  # noqa: PLC0415 - with onnxruntime only
    from onnx import numpy_helper  # noqa: PLC0415

    from edgequant.llm.export import export_causal_lm, onnxruntime_session, prefill_feeds  # noqa: PLC0415

    assert ort is not None
    model = tiny_llama(tied=False)
    sim = llm.quantize(model, ids, recipe="w4a8-strict-r4", block_size=16, progress=False)
    export = export_causal_lm(sim, tmp_path)
    graph = onnx.load(export.onnx_path).graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    size = model.config.intermediate_size
    consumers = {name: [n for n in graph.node if name in n.input] for name in [o for n in graph.node for o in n.output]}
    rotations = [node for node in graph.node if node.op_type == "MatMul"
                 and any(initializers.get(i) is not None and initializers[i].shape == (size, size) for i in node.input)]
    assert len(rotations) == len(model.model.layers)
    assert len({i for node in rotations for i in node.input if i in initializers}) == 1  # one shared constant
    assert all(consumers[node.output[0]][0].op_type == "QuantizeLinear" for node in rotations)
    prompts = ids[:2, :8]
    logits = onnxruntime_session(export, "basic").run(None, prefill_feeds(export, prompts))[0]
    with torch.no_grad(), sim.frozen_weights():
        expected = sim.model(input_ids=prompts, use_cache=False).logits.numpy()
    scale = float(sim.model.lm_head.output_quantizers["0"].encoding.scale)
    assert float(abs(logits - expected).max()) <= 8 * scale
