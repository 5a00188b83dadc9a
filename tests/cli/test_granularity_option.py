"""``--weight-granularity``: the Conv/Linear weights of the sim at the granularity asked for (all layers, or those a
name glob selects), recorded in summary.json and the sim state, reused by export; bad values are one line naming
the option."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edgequant.cli import main
from edgequant.cli.job import parse_weight_granularity
from edgequant.quantization.granularity import Lpbq, PerBlock, PerChannel, PerTensor
from edgequant.sim.state_file import read_sim_state

MODEL = "edgequant.demo.digits:load_pretrained"


@pytest.mark.parametrize(("text", "expected"), [
    ("per-tensor", ("*", PerTensor())),
    ("per-channel", ("*", PerChannel())),
    ("per-block:64", ("*", PerBlock(64))),
    ("lpbq:64", ("*", Lpbq(64, decompressed_bw=8))),
    ("fc*=lpbq:32:16", ("fc*", Lpbq(32, decompressed_bw=16))),
])
def test_spellings(text: str, expected: tuple) -> None:
    assert parse_weight_granularity(text) == expected


@pytest.mark.parametrize("text", ["per-block", "per-block:x", "blocks:8", "per-channel:3", "lpbq:8:8:9", "per-tensor:1",
                                  "per-block:0"])
def test_malformed_spellings_are_refused(text: str) -> None:
    with pytest.raises(click.BadParameter, match="is not a granularity"):
        parse_weight_granularity(text)


def test_quantize_records_the_granularities_and_export_reuses_them(tmp_path: Path) -> None:
    out = tmp_path / "q"
    result = CliRunner().invoke(main, ["quantize", "--quiet", "--param-bw", "4", "--out", str(out),
                                       "--weight-granularity", "conv[23]*=per-block:8",
                                       "--weight-granularity", "fc=lpbq:8"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["settings"]["weight_granularity"] == [
        "conv[23]*=per-block:8", "fc=lpbq:8"]
    encodings = json.loads((out / "quantizer_encodings.json").read_text())
    conv1, conv2, fc = (encodings[f"{layer}.param_quantizers.weight"] for layer in ("conv1.0", "conv2.0", "fc"))
    assert conv1["granularity"] == {"kind": "per_tensor"}  # the default config's, not matched by the globs
    assert conv2["granularity"] == {"kind": "per_block", "block_size": 8, "channel_axis": 0, "block_axis": 1}
    assert fc["granularity"]["kind"] == "lpbq" and fc["granularity"]["decompressed_bw"] == 8

    # the sim state holds the per-block grid: conv2's 32 x 16 x 3 x 3 weight has 16 / 8 = 2 blocks per channel, each
    # scaled by its largest magnitude over 7 (4-bit symmetric min-max)
    state = read_sim_state(out / "sim_state.pt").state_dict
    weight = state["conv2.0.weight"]
    blocks = weight.reshape(32, 2, 8, 9).abs().amax(dim=(2, 3))
    scale = state["conv2.0.param_quantizers.weight.scale"].reshape(32, 2)
    assert scale.sub(blocks / 7).abs().max() < 1e-6

    exported = tmp_path / "export"
    result = CliRunner().invoke(main, ["export", "--model", MODEL, "--sim-state", str(out / "sim_state.pt"),
                                       "--out", str(exported)])
    assert result.exit_code == 0, result.output
    params = {e["name"]: e for e in json.loads((exported / "model.encodings").read_text())["param_encodings"]}
    assert params["conv1.0.weight"]["enc_type"] == "PER_TENSOR"
    assert params["conv2.0.weight"]["enc_type"] == "PER_BLOCK" and params["conv2.0.weight"]["block_size"] == 8
    assert params["fc.weight"]["enc_type"] == "LPBQ" and params["fc.weight"]["compressed_bw"] == 4


@pytest.mark.parametrize(("args", "expected"), [
    (["quantize", "--weight-granularity", "blocks:8"], "'blocks:8' is not a granularity; use per-tensor"),
    (["quantize", "--weight-granularity", "per-block:5"], "conv1.0.param_quantizers.weight: .* blocks of 5"),
    (["quantize", "--weight-granularity", "fc=lpbq:8"], "LPBQ needs a bitwidth below decompressed_bw=8, got 8"),
    (["quantize", "--weight-granularity", "nolayer=per-channel"], "matching 'nolayer'"),
    (["analyze", "--weight-granularity", "per-channel"], "per-channel .* not taken here: .* qat take it"),
])
def test_bad_values_are_one_line_naming_the_option(args: list[str], expected: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path)])
    assert result.exit_code in (1, 2) and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "--weight-granularity" in errors[0], result.output
    assert re.search(expected, errors[0]), errors[0]
