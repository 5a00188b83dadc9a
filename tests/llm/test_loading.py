"""load_causal_lm on a tiny Llama saved as a transformers folder and written as a GGUF file, its one-line errors,
and the token sequences of text_data (pydoc topics split and user text)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from tiny_llm import HEADS, KV_HEADS, SPECIALS, tiny_llama, tiny_tokenizer  # noqa: E402
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from edgequant.llm.loading import ModelLoadError, ModelNotFoundError, load_causal_lm  # noqa: E402
from edgequant.llm.text_data import (  # noqa: E402
    EVALUATION_EVERY,
    TextDataError,
    TextSplit,
    pydoc_topics_split,
    token_sequences,
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return tiny_llama(tokenizer)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, model, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf reorders q/k rows for its rotary layout; transformers' reader undoes it."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape
    )


def write_gguf(
    path: Path,
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    *,
    architecture: str = "llama",
    leave_out: str | None = None,
    q8_1_tensor: str | None = None,
) -> Path:
    """The model as llama.cpp writes a llama GGUF: its metadata, a byte-level BPE vocabulary, F32 tensors."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIALS else 1 for token in tokens])  # 3: control
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(merge) for merge in merges])
    writer.add_bos_token_id(vocab[SPECIALS[0]])
    writer.add_eos_token_id(vocab[SPECIALS[1]])

    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
        "output.weight": state["lm_head.weight"],
    }
    for layer in range(config.num_hidden_layers):
        hf, block = f"model.layers.{layer}.", f"blk.{layer}."
        tensors.update({
            block + "attn_norm.weight": state[hf + "input_layernorm.weight"],
            block + "ffn_norm.weight": state[hf + "post_attention_layernorm.weight"],
            block + "attn_q.weight": _llama_cpp_permute(state[hf + "self_attn.q_proj.weight"], HEADS),
            block + "attn_k.weight": _llama_cpp_permute(state[hf + "self_attn.k_proj.weight"], KV_HEADS),
            block + "attn_v.weight": state[hf + "self_attn.v_proj.weight"],
            block + "attn_output.weight": state[hf + "self_attn.o_proj.weight"],
            block + "ffn_gate.weight": state[hf + "mlp.gate_proj.weight"],
            block + "ffn_up.weight": state[hf + "mlp.up_proj.weight"],
            block + "ffn_down.weight": state[hf + "mlp.down_proj.weight"],
        })
    for name, array in tensors.items():
        if name == leave_out:
            continue
        if name == q8_1_tensor:  # a type llama.cpp has but gguf cannot dequantize: zero blocks of the right size
            block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
            raw = np.zeros((array.shape[0], array.shape[1] // block_size * type_size), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _sample_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    return tokenizer.encode(topics["assert"][:400], add_special_tokens=False)[:48]


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def _assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message


# --- load_causal_lm --------------------------------------------------------------------------------------------


def test_folder_loads_the_saved_model_in_eval_float32_eager(model_folder, model, tokenizer):
    loaded, loaded_tokenizer = load_causal_lm(model_folder)
    ids = _sample_ids(tokenizer)
    assert loaded_tokenizer.encode(topics["assert"][:400], add_special_tokens=False)[:48] == ids
    assert not loaded.training
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.float32}
    assert loaded.config._attn_implementation == "eager"
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)


def test_folder_dtype_and_attention_are_passed_through(model_folder):
    loaded, _ = load_causal_lm(str(model_folder), dtype=torch.bfloat16, attn_implementation="sdpa")
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.bfloat16}
    assert loaded.config._attn_implementation == "sdpa"


def test_gguf_file_loads_the_written_weights_and_vocabulary(tmp_path, model, tokenizer):
    file = write_gguf(tmp_path / "tiny.gguf", model, tokenizer)
    loaded, loaded_tokenizer = load_causal_lm(file)
    ids = _sample_ids(tokenizer)
    assert loaded_tokenizer.encode(topics["assert"][:400], add_special_tokens=False)[:48] == ids
    assert not loaded.training
    assert {type(module) for module in loaded.modules() if "Linear" in type(module).__name__} == {torch.nn.Linear}
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.float32}
    loaded_weights = loaded.state_dict()
    for name, weight in model.state_dict().items():  # q/k included: the reader undoes llama.cpp's row order
        assert torch.equal(loaded_weights[name], weight), name
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)


def test_folder_with_one_gguf_loads_it(tmp_path, model, tokenizer):
    write_gguf(tmp_path / "tiny.gguf", model, tokenizer)
    loaded, _ = load_causal_lm(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_missing_path_is_one_line(tmp_path):
    missing = tmp_path / "no_model_here"
    with pytest.raises(ModelNotFoundError) as error:
        load_causal_lm(missing)
    assert isinstance(error.value, FileNotFoundError)
    _assert_one_line_naming(error, missing)


def test_folder_without_config_or_gguf_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="config.json") as error:
        load_causal_lm(tmp_path)
    _assert_one_line_naming(error, tmp_path)


def test_folder_with_two_ggufs_asks_for_one(tmp_path, model, tokenizer):
    write_gguf(tmp_path / "a.gguf", model, tokenizer)
    write_gguf(tmp_path / "b.gguf", model, tokenizer)
    with pytest.raises(ModelLoadError, match=r"a\.gguf, b\.gguf") as error:
        load_causal_lm(tmp_path)
    _assert_one_line_naming(error, tmp_path)


def test_non_gguf_file_is_one_line(tmp_path):
    file = tmp_path / "x.gguf"
    file.write_bytes(b"PK\x03\x04 a zip, not a GGUF" * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF file") as error:
        load_causal_lm(file)
    _assert_one_line_naming(error, file)


def test_truncated_gguf_is_one_line(tmp_path, model, tokenizer):
    file = write_gguf(tmp_path / "tiny.gguf", model, tokenizer)
    file.write_bytes(file.read_bytes()[:2000])
    with pytest.raises(ModelLoadError, match="convert it to a transformers folder") as error:
        load_causal_lm(file)
    _assert_one_line_naming(error, file)


def test_gguf_of_an_unsupported_architecture_is_one_line(tmp_path, model, tokenizer):
    file = write_gguf(tmp_path / "tiny.gguf", model, tokenizer, architecture="nosucharch")
    with pytest.raises(ModelLoadError, match="nosucharch.*convert it to a transformers folder") as error:
        load_causal_lm(file)
    _assert_one_line_naming(error, file)


def test_gguf_tensor_type_that_cannot_be_dequantized_is_one_line(tmp_path, model, tokenizer):
    file = write_gguf(tmp_path / "tiny.gguf", model, tokenizer, q8_1_tensor="blk.0.ffn_up.weight")
    with pytest.raises(ModelLoadError, match="Q8_0/Q4_0/Q4_1") as error:
        load_causal_lm(file)
    _assert_one_line_naming(error, file)


def test_gguf_missing_a_weight_is_refused_rather_than_randomly_initialised(tmp_path, model, tokenizer):
    file = write_gguf(tmp_path / "tiny.gguf", model, tokenizer, leave_out="blk.1.ffn_down.weight")
    with pytest.raises(ModelLoadError, match=r"1 weight of the model .*layers\.1\.mlp\.down_proj") as error:
        load_causal_lm(file)
    _assert_one_line_naming(error, file)


def test_folder_without_tokenizer_is_one_line(tmp_path, model):
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="tokenizer") as error:
        load_causal_lm(tmp_path)
    _assert_one_line_naming(error, tmp_path)


def test_folder_without_weights_is_one_line(tmp_path, model):
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="model.safetensors") as error:
        load_causal_lm(tmp_path)
    _assert_one_line_naming(error, tmp_path)


def test_missing_gguf_package_says_what_to_install(tmp_path, model, tokenizer, monkeypatch):
    file = write_gguf(tmp_path / "tiny.gguf", model, tokenizer)
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ImportError, match=r"gguf: pip install edgequant\[llm\]$") as error:
        load_causal_lm(file)
    assert "\n" not in str(error.value)


# --- text_data ---------------------------------------------------------------------------------------------------


def _own_split() -> tuple[list[str], list[str]]:
    names = sorted(topics)
    return names[1::4] + names[2::4] + names[3::4], names[0::4]


def test_pydoc_split_shapes_and_determinism(tokenizer):
    split = pydoc_topics_split(tokenizer, seq_len=32, num_calibration=5, num_evaluation=7)
    assert isinstance(split, TextSplit)
    assert split.calibration.shape == (5, 32) and split.evaluation.shape == (7, 32)
    assert split.calibration.dtype == split.evaluation.dtype == torch.long
    again = pydoc_topics_split(tokenizer, seq_len=32, num_calibration=5, num_evaluation=7)
    assert torch.equal(again.calibration, split.calibration) and torch.equal(again.evaluation, split.evaluation)


def test_pydoc_split_holds_every_fourth_sorted_topic_out_for_evaluation(tokenizer):
    calibration_names, evaluation_names = _own_split()
    assert EVALUATION_EVERY == 4 and not set(calibration_names) & set(evaluation_names)
    seq_len = 64
    split = pydoc_topics_split(tokenizer, seq_len=seq_len, num_calibration=40, num_evaluation=40)

    def stream(names: list[str]) -> list[int]:
        ordered = [name for name in sorted(topics) if name in names]
        return tokenizer.encode("\n\n".join(topics[name] for name in ordered), add_special_tokens=False)

    assert split.evaluation.flatten().tolist() == stream(evaluation_names)[: 40 * seq_len]
    assert split.calibration.flatten().tolist() == stream(calibration_names)[: 40 * seq_len]
    # each side starts with its first topic: sorted index 0 for evaluation, 1 for calibration
    first_evaluation = tokenizer.encode(topics[sorted(topics)[0]], add_special_tokens=False)[:seq_len]
    first_calibration = tokenizer.encode(topics[sorted(topics)[1]], add_special_tokens=False)[:seq_len]
    assert split.evaluation[0].tolist()[: len(first_evaluation) - 1] == first_evaluation[:-1]
    assert split.calibration[0].tolist()[: len(first_calibration) - 1] == first_calibration[:-1]


def test_pydoc_split_too_short_says_how_many_sequences_fit(tokenizer):
    total = len(tokenizer.encode("\n\n".join(topics[name] for name in _own_split()[1]), add_special_tokens=False))
    seq_len = 4096
    with pytest.raises(TextDataError, match=rf"only {total // seq_len} sequences of the 1000 asked for") as error:
        pydoc_topics_split(tokenizer, seq_len=seq_len, num_calibration=1, num_evaluation=1000)
    assert "\n" not in str(error.value)


def test_token_sequences_from_texts_file_and_folder_agree(tokenizer, tmp_path):
    texts = [topics["assert"], topics["if"], topics["while"]]
    expected = tokenizer.encode("\n\n".join(texts), add_special_tokens=False)
    from_texts = token_sequences(tokenizer, texts, 16, 5)
    assert from_texts.shape == (5, 16) and from_texts.dtype == torch.long
    assert from_texts.flatten().tolist() == expected[:80]
    everything = token_sequences(tokenizer, iter(texts), seq_len=16)
    assert everything.shape == (len(expected) // 16, 16)

    folder = tmp_path / "corpus"
    folder.mkdir()
    for index, text in enumerate(texts):
        (folder / f"{index:02d}.txt").write_text(text, encoding="utf-8")
    (folder / "ignored.md").write_text("not read")
    assert torch.equal(token_sequences(tokenizer, folder, 16), everything)
    assert torch.equal(token_sequences(tokenizer, str(folder / "00.txt"), 16, 2), from_texts[:2])


def test_token_sequences_errors_are_one_line(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.txt"):
        token_sequences(tokenizer, tmp_path / "no_such.txt", 16)
    with pytest.raises(TextDataError, match="no .txt file"):
        token_sequences(tokenizer, tmp_path, 16)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(TextDataError, match=r"short\.txt: \d tokens, only 0 sequences of 16 tokens") as error:
        token_sequences(tokenizer, short, 16)
    assert "\n" not in str(error.value)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(TextDataError, match="not UTF-8"):
        token_sequences(tokenizer, binary, 16)
