"""A tiny random Llama and a byte-level BPE tokenizer trained on a few pydoc topics, for the tests of
`edgequant.llm` and of ``edgequant llm`` (built in milliseconds, no download)."""

from __future__ import annotations

from pydoc_data.topics import topics

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HEADS, KV_HEADS, LAYERS, HIDDEN = 4, 2, 2, 64
SPECIALS = ("<s>", "</s>")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of 300 tokens trained on a few pydoc topics (any text encodes: bytes are in the vocabulary)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([topics[name] for name in sorted(topics)[:10]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIALS[0], eos_token=SPECIALS[1])


def tiny_llama(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A random tiny Llama with untied head; every weight random, the norms included (they start at one)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, rms_norm_eps=1e-5, rope_theta=10000.0,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.2)
    return model



def sharing_check_sim(recipe: str = "w4a16-block") -> tuple[object, list[torch.Tensor], list[int], object]:
    """A 2-layer Llama (hidden 32) quantized for ``recipe`` with blocks of 16, its 3 calibration batches, a list
    that grows by one per forward of the sim, and a function making a second, identical sim: for checking that
    techniques gathering inputs layer by layer share passes between layers that read the same input."""
    import edgequant.llm as llm  # noqa: PLC0415 - the sim is the subject of the tests that import this

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))

    def make() -> object:
        return llm.quantize(model, ids, recipe=recipe, block_size=16, progress=False)

    sim, forwards = make(), []
    sim.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    return sim, list(ids.split(1)), forwards, make


class FirstDecoderBlock(torch.nn.Module):
    """The first decoder layer of a causal LM prepared by `edgequant.llm.prepare_causal_lm` (its attention made of
    quantizable ops) on the hidden states of one window of ``tokens`` positions (0 to tokens-1, causal mask):
    one block of a language model as a model of its own, for the emulation's comparisons with ONNX Runtime."""

    def __init__(self, prepared: torch.nn.Module, tokens: int) -> None:
        super().__init__()
        self.layer = prepared.model.layers[0]
        cos, sin = prepared.model.rotary_emb(torch.zeros(1), torch.arange(tokens)[None])
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.register_buffer("mask", torch.full((tokens, tokens), torch.finfo(torch.float32).min).triu(1)[None, None])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layer(hidden_states, attention_mask=self.mask, position_embeddings=(self.cos, self.sin))
