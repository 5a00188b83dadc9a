"""`edgequant quantize` with the default config suggests --config per_channel only where per-tensor weights lose
clearly more on the calibration data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edgequant.cli import main

MODELS = '''
import torch
from torch import nn


def _net(channel_scales):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    scales = torch.tensor(channel_scales)
    with torch.no_grad():  # conv output channels at the given scales, each equally important to the output
        net[0].weight.mul_(scales.view(-1, 1, 1, 1))
        net[0].bias.mul_(scales)
        net[2].weight.div_(scales.view(1, -1, 1, 1))
    return net.eval()


def uneven():
    return _net([1.0] + [0.01] * 7)


def even():
    return _net([1.0] * 8)
'''


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    torch.save(torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1)), tmp_path / "data.pt")
    return path


def _quantize(model_file: Path, factory: str, *options: str) -> str:
    out = model_file.parent / f"out_{factory}"
    result = CliRunner().invoke(main, ["quantize", "--model", f"{model_file}:{factory}", "--data",
                                       str(model_file.parent / "data.pt"), "--param-bw", "4", "--quiet",
                                       "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    return result.output


def test_uneven_channel_ranges_get_the_hint_and_the_written_sim_keeps_per_tensor_weights(model_file: Path) -> None:
    hints = [line for line in _quantize(model_file, "uneven").splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and hints[0].endswith("try --config per_channel"), hints
    default_db, per_channel_db = (float(word) for word in hints[0].split() if word.replace(".", "").isdigit())
    assert per_channel_db - default_db >= 3.0
    encodings = json.loads((model_file.parent / "out_uneven" / "quantizer_encodings.json").read_text())
    weight = encodings["0.param_quantizers.weight"]
    assert weight["granularity"] == {"kind": "per_tensor"} and isinstance(weight["scale"], float)


def test_even_channel_ranges_and_an_explicit_config_get_none(model_file: Path) -> None:
    assert "hint:" not in _quantize(model_file, "even")
    assert "hint:" not in _quantize(model_file, "uneven", "--config", "per_channel")
