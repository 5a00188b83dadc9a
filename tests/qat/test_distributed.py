"""Two real processes (gloo on the CPU): calibration statistics merged across ranks give the encodings of one
process that saw all data, bit for bit, and DistributedDataParallel QAT keeps the ranks identical."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.qat import finetune, prepare_qat
from edgequant.sim import QuantSim

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _sim(images):
    return QuantSim(load_pretrained("digits_cnn"), images[:1], param_bw=4, output_bw=4, config="per_channel")


def _encodings(sim):
    return {n: (q.scale.detach().clone(), q.offset.detach().clone()) for n, q in sim.quantizers().items()}


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        images, labels = load_digits_tensors("train")
        batches = list(images[:512].split(32))
        results = {}
        for mode in ("regular", "range_learning"):
            sim = _sim(images)
            sim.calibrate(batches[rank::WORLD_SIZE], progress=False)  # each rank sees half of the data
            results[f"{mode}/calibrated"] = _encodings(sim)
            prepare_qat(sim, mode)
            model = DistributedDataParallel(sim.model)
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            sim.model.train()
            for step in range(3):  # the user's own loop; every rank its own batch
                index = slice(64 * (2 * step + rank), 64 * (2 * step + rank + 1))
                loss = torch.nn.functional.cross_entropy(model(images[index]), labels[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            sim.model(images[:1])  # weight encodings follow the last step
            results[f"{mode}/trained"] = {k: v.clone() for k, v in sim.model.state_dict().items()}
        sim = _sim(images)
        sim.calibrate(batches[rank::WORLD_SIZE], progress=False)
        result = finetune(sim, images[:256], epochs=1, lr=1e-3, progress=False, mode="range_learning",
                          checkpoint_dir=out_dir / "finetune")
        results["finetune/steps"] = result.steps
        results["finetune/trained"] = {k: v.clone() for k, v in sim.model.state_dict().items()}
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_calibration_and_ddp_qat(tmp_path):
    mp.spawn(_worker, args=(_free_port(), tmp_path), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    images, _ = load_digits_tensors("train")
    single = _sim(images)
    single.calibrate(list(images[:512].split(32)), progress=False)  # one process, all the data
    expected = _encodings(single)
    for mode in ("regular", "range_learning"):
        for rank in ranks:
            calibrated = rank[f"{mode}/calibrated"]
            assert calibrated.keys() == expected.keys()
            for name, (scale, offset) in expected.items():
                assert torch.equal(calibrated[name][0], scale) and torch.equal(calibrated[name][1], offset), name
        trained = [rank[f"{mode}/trained"] for rank in ranks]
        assert any(not torch.equal(trained[0][k], single.model.state_dict()[k]) for k in trained[0])
        for key in trained[0]:
            assert torch.equal(trained[0][key], trained[1][key]), (mode, key)
    assert ranks[0]["finetune/steps"] == ranks[1]["finetune/steps"] == 2  # 4 batches of 64 split over 2 ranks
    for key, value in ranks[0]["finetune/trained"].items():
        assert torch.equal(value, ranks[1]["finetune/trained"][key]), key
    assert (tmp_path / "finetune" / "last.pt").exists()
