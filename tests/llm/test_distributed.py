"""Two real processes (gloo on the CPU), each calibrating a causal LM on half of the sequences: the merged
statistics give every rank the encodings of one process that saw all of them, bit for bit."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

import edgequant.llm as llm

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _model_and_ids() -> tuple[LlamaForCausalLM, torch.Tensor]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(1))
    return LlamaForCausalLM(config).eval(), ids


def _encodings(sim) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (q.scale.clone(), q.offset.clone()) for n, q in sim.quantizers().items() if q.enabled}


def _worker(rank: int, port: int, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        model, ids = _model_and_ids()
        sim = llm.quantize(model, ids[rank::WORLD_SIZE], recipe="w4a16-lpbq", block_size=16, kv_cache_bw=8,
                           progress=False)
        results[rank] = _encodings(sim)
    finally:
        dist.destroy_process_group()


def test_ranks_calibrating_shards_end_with_the_encodings_of_all_the_data() -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=WORLD_SIZE, join=True)
        per_rank = [dict(results[rank]) for rank in range(WORLD_SIZE)]
    model, ids = _model_and_ids()
    single = _encodings(llm.quantize(model, ids, recipe="w4a16-lpbq", block_size=16, kv_cache_bw=8, progress=False))
    half = _encodings(llm.quantize(model, ids[0::2], recipe="w4a16-lpbq", block_size=16, kv_cache_bw=8,
                                   progress=False))
    assert set(per_rank[0]) == set(single) and len(single) > 70
    for name, (scale, offset) in single.items():
        for rank in range(WORLD_SIZE):
            assert torch.equal(per_rank[rank][name][0], scale) and torch.equal(per_rank[rank][name][1], offset), name
    assert any(not torch.equal(half[name][0], single[name][0]) for name in single)  # the shards do differ
