"""A sim built on a cross-layer equalized model (AutoQuant's cle stage: ReLU6 becomes per-channel clamps) is rebuilt
by export/verify from the float model and the summary.json beside its state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgequant import QuantSim
from edgequant.cli.data import InputSpec
from edgequant.cli.inputs import load_model
from edgequant.cli.sim_state import EQUALIZED_KEY, SOURCES_KEY, SUMMARY_FILE, sim_from_state
from edgequant.ptq import fold_batch_norms
from edgequant.ptq.cross_layer_equalization import equalize

MODEL = '''
import torch
from torch import nn


def relu6_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.weight.uniform_(0.1, 3.0)
            bn.running_var.uniform_(0.5, 2.0)
    return net.eval()
'''


@pytest.mark.parametrize("recorded", [True, False])
def test_the_equalized_model_is_rebuilt_from_the_summary(recorded: bool, tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text(MODEL)
    spec = f"{tmp_path / 'model.py'}:relu6_net"
    images = torch.rand(16, 3, 8, 8)
    model = load_model(spec, lambda: (images[:1],))
    fold_batch_norms(model, images[:1])
    equalize(model, images[:1])
    sim = QuantSim(model, images[:1])
    sim.calibrate([images], progress=False)
    sim.save(tmp_path / "sim_state.pt")
    InputSpec(shape=[1, 3, 8, 8], fold_bn=True).save(tmp_path)
    (tmp_path / SUMMARY_FILE).write_text(json.dumps({SOURCES_KEY: {"model": spec, "data": None, "eval": None},
                                                     EQUALIZED_KEY: recorded}))
    if not recorded:  # the float model alone has ReLU6 where the state holds per-channel clamps
        with pytest.raises(ValueError, match="different model"):
            sim_from_state(None, tmp_path / "sim_state.pt", None)
        return
    rebuilt, _ = sim_from_state(None, tmp_path / "sim_state.pt", None)  # --model from the summary
    with torch.no_grad():
        assert torch.equal(rebuilt.model(images), sim.model(images))
