"""AIMET encodings files: AIMET's own files reproduce AIMET's simulation; ours match AIMET's byte for byte
(up to the producer field); hand-written files load; sim -> export -> import -> identical outputs."""

from __future__ import annotations

import json
from pathlib import Path

import aimet_fixtures
import pytest
import torch
from aimet_fixtures import FIXTURES
from torch import nn

import edgequant as eq
from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.export import EncodingsFileError, quantize_bias_int32, read_encodings


class FixtureModel(nn.Module):
    """The model the AIMET fixtures were written for (see the fixture README)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu, self.fc = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


def load_fixture_tensor(name: str) -> torch.Tensor:
    return aimet_fixtures.load_fixture_tensor(FIXTURES / name)


def fixture_model() -> nn.Module:
    model = FixtureModel()
    model.load_state_dict(torch.load(FIXTURES / "float_state_dict.pt"))
    return model.eval()


@pytest.mark.parametrize("config, folder", [("per_channel", "default"), ("htp", "htp_v73")])
@pytest.mark.parametrize("version", ["0.6.1", "1.0.0", "2.0.0"])
def test_aimet_encodings_reproduce_aimet_simulation(config: str, folder: str, version: str) -> None:
    inputs = load_fixture_tensor("input.pt")
    expected = load_fixture_tensor(f"sim_output_{folder}.pt")
    sim = eq.QuantSim(fixture_model(), inputs[:1], config=config)
    report = sim.load_encodings(FIXTURES / f"{folder}_{version}/model.encodings")
    assert len(report.loaded) == 5 and all(q.frozen for q in sim.quantizers().values())
    with torch.no_grad():
        assert torch.equal(sim.model(inputs), expected)


@pytest.mark.parametrize("version", ["0.6.1", "1.0.0", "2.0.0"])
def test_our_encodings_files_match_aimets(tmp_path: Path, version: str) -> None:
    inputs = load_fixture_tensor("input.pt")
    sim = eq.QuantSim(fixture_model(), inputs[:1], config="per_channel")
    sim.load_encodings(FIXTURES / "default_1.0.0/model.encodings")
    result = sim.export(tmp_path, encoding_version=version)
    ours = json.loads(result.encodings.read_text())
    aimets = json.loads((FIXTURES / f"default_{version}/model.encodings").read_text())
    ours.pop("producer"), aimets.pop("producer")
    if version == "2.0.0":  # same entries (AIMET orders them differently)
        by_name = {e["name"]: e for e in ours["encodings"]}
        assert by_name == {e["name"]: e for e in aimets["encodings"]}
        ours.pop("encodings"), aimets.pop("encodings")
    assert ours == aimets  # field names, types, values and section layout


def test_hand_written_aimet_file_loads(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 2, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.3, -0.2], [0.05, 0.11]]))
    document = {
        "version": "1.0.0",
        "activation_encodings": [
            {"name": "input", "dtype": "INT", "bw": 8, "is_sym": False, "scale": [0.01], "offset": [-100],
             "enc_type": "PER_TENSOR"},
            {"name": "output", "dtype": "INT", "bw": 8, "is_sym": False, "scale": [0.004], "offset": [-128],
             "enc_type": "PER_TENSOR"},
        ],
        "param_encodings": [
            {"name": "0.weight", "dtype": "INT", "bw": 4, "is_sym": True, "scale": [0.1, 0.02], "offset": [-8, -8],
             "enc_type": "PER_CHANNEL"},
        ],
    }
    path = tmp_path / "hand.encodings"
    path.write_text(json.dumps(document))
    x = torch.tensor([[0.5, -0.333]])
    sim = eq.QuantSim(model, x)
    sim.load_encodings(path)
    # by hand: x -> [0.5, -0.33]; W -> [[0.3, -0.2], [0.04, 0.12]] (0.05/0.02 = 2.5 rounds half to even: 2);
    # y = [0.216, -0.0196] -> on the grid of 0.004: [54, -4.9 -> -5] steps
    with torch.no_grad():
        torch.testing.assert_close(sim.model(x), torch.tensor([[0.216, -0.020]]), rtol=0, atol=1e-6)
    weight_quantizer = sim.quantizers()["0.param_quantizers.weight"]
    assert weight_quantizer.bitwidth == 4 and weight_quantizer.axis == 0


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 3)).eval()
    sim = eq.QuantSim(model, torch.randn(1, 2))
    unknown = tmp_path / "unknown.encodings"
    unknown.write_text(json.dumps({"version": "2.0.0", "encodings": [
        {"name": "/no/such/tensor", "output_dtype": "uint8", "y_scale": 0.1}]}))
    with pytest.raises(ValueError, match="/no/such/tensor"):
        sim.load_encodings(unknown)
    with pytest.warns(UserWarning, match="/no/such/tensor"):
        sim.load_encodings(unknown, strict=False)
    wrong_shape = tmp_path / "shape.encodings"
    wrong_shape.write_text(json.dumps({"version": "2.0.0", "encodings": [
        {"name": "0.weight", "output_dtype": "int8", "y_scale": [0.1, 0.1], "axis": 0}]}))
    with pytest.raises(ValueError, match="0.weight.*shape"):
        sim.load_encodings(wrong_shape)
    bad_version = tmp_path / "v.encodings"
    bad_version.write_text(json.dumps({"version": "9.9.9"}))
    with pytest.raises(EncodingsFileError, match="9.9.9"):
        read_encodings(bad_version)


def _digits_sim() -> tuple[eq.QuantSim, torch.Tensor]:
    images, _ = load_digits_tensors("test")
    sim = eq.QuantSim(load_pretrained("digits_cnn"), images[:1], config="per_channel")
    sim.compute_encodings(lambda model: model(images[:64]))
    return sim, images[:128]


@pytest.mark.parametrize("version", ["0.6.1", "1.0.0", "2.0.0"])
def test_round_trip_is_bit_exact(tmp_path: Path, version: str) -> None:
    sim, images = _digits_sim()
    if version == "1.0.0":
        assert quantize_bias_int32(sim) == ["fc.bias"]  # the convs have no bias
    sim.export(tmp_path, encoding_version=version)
    fresh = eq.QuantSim(load_pretrained("digits_cnn"), images[:1], config="per_channel")
    fresh.load_encodings(tmp_path / "model.encodings", partial=False)
    with torch.no_grad():
        assert torch.equal(fresh.model(images), sim.model(images))
