"""AIMET's own per-block and LPBQ encodings (tests/fixtures/aimet-2.42/per_block, written by AIMET 2.42 with
set_blockwise_quantization_for_weights / set_grouped_blockwise_quantization_for_weights) load into an edgequant sim
of the same float model with AIMET's granularity, AIMET's scales and multipliers exactly, and reproduce AIMET's
simulated outputs bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from aimet_fixtures import FIXTURES, BlockModel
from onnx import numpy_helper

import edgequant as eq
from edgequant.export import LoadReport
from edgequant.quantization import Lpbq, PerBlock

PER_BLOCK = FIXTURES / "per_block"
LAYERS = {"conv": (16, 2), "fc": (4, 2)}  # (output channels, blocks of 32 input channels) of each weight
VERSIONS = ["1.0.0", "2.0.0"]


def _load(name: str) -> torch.Tensor:
    return torch.load(PER_BLOCK / name, weights_only=True)


def _sim_from(kind: str, version: str) -> tuple[eq.QuantSim, LoadReport]:
    model = BlockModel()
    model.load_state_dict(torch.load(PER_BLOCK / "float_state_dict.pt", weights_only=True))
    sim = eq.QuantSim(model.eval(), _load("input.pt")[:1], config="per_channel")
    return sim, sim.load_encodings(PER_BLOCK / f"{kind}_{version}/model.encodings")


def _file_entries(kind: str, version: str) -> dict[str, dict]:
    document = json.loads((PER_BLOCK / f"{kind}_{version}/model.encodings").read_text())
    assert document["version"] == version and document["producer"] == {"package": "aimet-torch", "version": "2.42.0"}
    entries = document["param_encodings"] if version == "1.0.0" else document["encodings"]
    return {e["name"]: e for e in entries if e["name"] in ("conv.weight", "fc.weight")}


def _float32(values: list) -> torch.Tensor:
    return torch.tensor(np.asarray(values, dtype=np.float64).reshape(-1), dtype=torch.float32)


def _check_report(report: LoadReport, version: str) -> None:
    assert sorted(report.loaded) == sorted([
        "model_input_quantizers.0", "relu.output_quantizers.0", "fc.output_quantizers.0",
        "conv.param_quantizers.weight", "fc.param_quantizers.weight"])
    # the flatten output repeats the ReLU's encoding; 2.0.0 adds AIMET's int32 bias grids (the sim keeps biases float)
    assert set(report.skipped) == {"/Flatten_output_0"} | ({"conv.bias", "fc.bias"} if version == "2.0.0" else set())
    assert not report.without_encoding and not report.added


@pytest.mark.parametrize("version", VERSIONS)
def test_aimet_per_block_encodings_load_exactly(version: str) -> None:
    sim, report = _sim_from("per_block", version)
    _check_report(report, version)
    entries = _file_entries("per_block", version)
    for layer, (channels, blocks) in LAYERS.items():
        entry, quantizer = entries[f"{layer}.weight"], sim.quantizer(f"{layer}.param_quantizers.weight")
        assert entry["block_size"] == 32
        assert quantizer.granularity == PerBlock(32, 0, 1) and quantizer.bitwidth == 4
        assert quantizer.encoding.symmetric
        if version == "1.0.0":
            assert (entry["enc_type"], entry["bw"], entry["is_sym"]) == ("PER_BLOCK", 4, True)
            assert entry["offset"] == [-8] * (channels * blocks)
            file_scale = _float32(entry["scale"])
        else:
            assert (entry["output_dtype"], entry["axis"]) == ("int4", 1) and "y_zero_point" not in entry
            assert np.shape(entry["y_scale"]) == (channels, blocks) + (1, 1) * (layer == "conv")
            file_scale = _float32(entry["y_scale"])
        assert len(set(file_scale.tolist())) == channels * blocks  # a scale of its own for every block
        assert torch.equal(quantizer.scale.reshape(-1), file_scale)  # (channel, block) order, every bit
        assert torch.equal(quantizer.encoding.offset, torch.full_like(quantizer.scale, -8.0))
    with torch.no_grad():
        assert torch.equal(sim.model(_load("input.pt")), _load("sim_output_per_block.pt"))


@pytest.mark.parametrize("version", VERSIONS)
def test_aimet_lpbq_encodings_load_exactly(version: str) -> None:
    sim, report = _sim_from("lpbq", version)
    _check_report(report, version)
    entries = _file_entries("lpbq", version)
    for layer, (channels, blocks) in LAYERS.items():
        entry, quantizer = entries[f"{layer}.weight"], sim.quantizer(f"{layer}.param_quantizers.weight")
        granularity = quantizer.granularity
        assert entry["block_size"] == 32
        assert granularity == Lpbq(32, 0, 1, decompressed_bw=8) and quantizer.bitwidth == 4
        if version == "1.0.0":  # the channel scale on the 8-bit grid, the 4-bit blocks as integer multiples of it
            assert (entry["enc_type"], entry["bw"], entry["compressed_bw"], entry["is_sym"]) == ("LPBQ", 8, 4, True)
            assert entry["offset"] == [-128] * channels
            channel_scale, multipliers = _float32(entry["scale"]), entry["per_block_int_scale"]
        else:
            assert (entry["output_dtype"], entry["axis"]) == ("int4", 1)
            assert np.shape(entry["per_channel_float_scale"]) == (channels, 1) + (1, 1) * (layer == "conv")
            assert np.shape(entry["per_block_int_scale"]) == (channels, blocks) + (1, 1) * (layer == "conv")
            channel_scale = _float32(entry["per_channel_float_scale"])
            multipliers = np.asarray(entry["per_block_int_scale"]).reshape(-1).tolist()
        assert len(channel_scale) == channels and len(multipliers) == channels * blocks
        assert max(multipliers) == 16 and min(multipliers) < 16  # the widest block of a channel is 16 steps
        assert torch.equal(granularity.channel_scale(quantizer.scale, 4).reshape(-1), channel_scale)
        assert granularity.multipliers(quantizer.scale, 4).reshape(-1).tolist() == multipliers
        # the block scales are the channel scale times the multiplier, computed in float32 as AIMET does
        block_scale = channel_scale.repeat_interleave(blocks) * torch.tensor(multipliers, dtype=torch.float32)
        assert torch.equal(quantizer.scale.reshape(-1), block_scale)
        assert torch.equal(quantizer.encoding.offset, torch.full_like(quantizer.scale, -8.0))
    with torch.no_grad():
        assert torch.equal(sim.model(_load("input.pt")), _load("sim_output_lpbq.pt"))


def test_edgequant_lpbq_rule_gives_aimets_multipliers_from_aimets_block_scales() -> None:
    """AIMET calibrated both sims on the same weights with min-max: its per-block file holds each block's own scale,
    and edgequant's LPBQ projection of those (largest block / 16, multipliers rounded half to even in [1, 16]) is
    AIMET's LPBQ encoding, bit for bit; the two LPBQ versions state the same encoding."""
    per_block, _ = _sim_from("per_block", "1.0.0")
    lpbq_1, _ = _sim_from("lpbq", "1.0.0")
    lpbq_2, _ = _sim_from("lpbq", "2.0.0")
    for layer in LAYERS:
        name = f"{layer}.param_quantizers.weight"
        projected = Lpbq(32, 0, 1, decompressed_bw=8).project(per_block.quantizer(name).scale, 4)
        assert torch.equal(projected, lpbq_1.quantizer(name).scale)
        assert lpbq_1.quantizer(name).encoding.equals(lpbq_2.quantizer(name).encoding)


def test_fixture_files_are_small() -> None:
    sizes = [path.stat().st_size for path in PER_BLOCK.rglob("*") if path.is_file()]
    assert sum(sizes) < 1_000_000


def test_fixture_loads_without_aimet() -> None:
    """The stored tensors are plain (weights_only=True loads them) and of the README's shapes."""
    assert _load("input.pt").shape == (16, 64, 4, 4)
    assert _load("sim_output_per_block.pt").shape == _load("sim_output_lpbq.pt").shape == (16, 4)
    assert type(_load("sim_output_lpbq.pt")) is torch.Tensor


@pytest.mark.parametrize("kind", ["per_block", "lpbq"])
@pytest.mark.parametrize("version", VERSIONS)
def test_our_export_of_aimets_blocked_encodings_matches_aimets_file(tmp_path: Path, kind: str, version: str) -> None:
    """Loaded and exported again, every entry is AIMET's (field names, types, values, layout), the int32 bias
    grids AIMET 2.0.0 lists for blocked weights included."""
    sim, _ = _sim_from(kind, version)
    result = sim.export(tmp_path, _load("input.pt")[:1], encoding_version=version)
    ours = json.loads(result.encodings.read_text())
    aimets = json.loads((PER_BLOCK / f"{kind}_{version}/model.encodings").read_text())
    ours.pop("producer"), aimets.pop("producer")
    if version == "2.0.0":  # same entries (AIMET orders them differently)
        aimet_entries = {e["name"]: e for e in aimets.pop("encodings")}
        assert [aimet_entries[b]["output_dtype"] for b in ("conv.bias", "fc.bias")] == ["int32", "int32"]
        assert {e["name"]: e for e in ours.pop("encodings")} == aimet_entries
    assert ours == aimets


@pytest.mark.parametrize("kind", ["per_block", "lpbq"])
def test_aimets_int32_bias_grid_for_blocked_weights(kind: str) -> None:
    """What AIMET 2.0.0 states as the int32 bias grid of a blocked weight (edgequant skips these entries on loading,
    LoadReport.skipped): input scale x the channel's scale on the decompressed 8-bit grid for LPBQ (every 4-bit value
    times its block's multiplier is an integer on that grid, so the accumulator's grid is exactly this), and input
    scale x the channel's largest block scale for per-block weights (a grid that only the widest block's products
    lie on)."""
    entries = {e["name"]: e for e in json.loads((PER_BLOCK / f"{kind}_2.0.0/model.encodings").read_text())[
        "encodings"]}
    for layer, input_tensor in [("conv", "input"), ("fc", "/relu/Relu_output_0")]:
        bias, weight = entries[f"{layer}.bias"], entries[f"{layer}.weight"]
        assert set(bias) == {"name", "output_dtype", "y_scale", "axis"}
        assert (bias["output_dtype"], bias["axis"]) == ("int32", 0)
        channels = LAYERS[layer][0]
        if kind == "per_block":
            channel_scale = _float32(weight["y_scale"]).reshape(channels, -1).amax(dim=1)
        else:
            channel_scale = _float32(weight["per_channel_float_scale"])
        input_scale = torch.tensor(entries[input_tensor]["y_scale"], dtype=torch.float32)
        assert torch.equal(_float32(bias["y_scale"]), input_scale * channel_scale)


@pytest.mark.parametrize("kind", ["per_block", "lpbq"])
@pytest.mark.parametrize("version", VERSIONS)
def test_sim_weights_are_the_ones_in_aimets_onnx(kind: str, version: str) -> None:
    """AIMET's ONNX export holds each weight quantize-dequantized under its encoding: edgequant's blocked quantizers,
    loaded from the file beside it, give the same numbers (AIMET writes +0.0 where a weight rounds to zero, edgequant
    keeps the sign: compared as numbers). 2.0.0 also rounds each bias onto its int32 grid (1.0.0 keeps it float)."""
    sim, _ = _sim_from(kind, version)
    graph = onnx.load(str(PER_BLOCK / f"{kind}_{version}/model.onnx"))
    initializers = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.graph.initializer}
    entries = {e["name"]: e for e in json.loads((PER_BLOCK / f"{kind}_{version}/model.encodings").read_text()).get(
        "encodings", [])}
    for layer in LAYERS:
        module = sim.model.get_submodule(layer)
        with torch.no_grad():
            weight = sim.quantizer(f"{layer}.param_quantizers.weight")(module.weight)
        assert torch.equal(weight, initializers[f"{layer}.weight"])
        assert len(weight.unique()) > 2 * LAYERS[layer][0]  # not a degenerate grid
        bias = module.bias.detach()
        if version == "2.0.0":
            bias_scale = _float32(entries[f"{layer}.bias"]["y_scale"])
            bias = torch.round(bias / bias_scale) * bias_scale
        assert torch.equal(bias, initializers[f"{layer}.bias"])
