"""Bad input of every kind the newcomer audit tried: one clear line naming the file/option/layer, exit code 1 or 2,
never a traceback, NaN or silent wrong result."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgequant.cli import main
from edgequant.demo.digits import load_digits_tensors, load_pretrained

MODEL = "edgequant.demo.digits:load_pretrained"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_input")
    images, _ = load_digits_tensors("train")
    torch.save(images[:64], folder / "calib.pt")
    nan = images[:64].clone()
    nan[0, 0, 0, 0] = float("nan")
    torch.save(nan, folder / "nan.pt")
    torch.save(load_pretrained("digits_cnn").state_dict(), folder / "weights.pth")
    (folder / "factories.py").write_text(
        "def broken():\n    raise RuntimeError('weights file missing on this machine')\n"
        "def nan_metric(model):\n    return float('nan')\n"
        "def not_a_number(model):\n    return 'good'\n"
    )
    (folder / "not_a_tensor.npy").write_bytes(b"garbage")
    np.save(folder / "empty.npy", np.zeros((0, 1, 8, 8), dtype=np.float32))
    images_dir = folder / "images"
    images_dir.mkdir()
    (images_dir / "readme.txt").write_text("no images here")
    (folder / "truncated_state.pt").write_bytes(b"PK\x03\x04truncated")
    return {p.stem: p for p in folder.iterdir()}


CASES = {
    "model spec without colon": (["quantize", "--model", "nonsense", "--data", "{calib}"], "neither an existing file"),
    "model module missing": (["quantize", "--model", "no_such_pkg:f", "--data", "{calib}"], "cannot import"),
    "model attribute missing": (["quantize", "--model", "edgequant.demo.digits:nope", "--data", "{calib}"],
                                "has no attribute 'nope'"),
    "factory raises": (["quantize", "--model", "{factories}:broken", "--data", "{calib}"],
                       "model factory .* raised RuntimeError: weights file missing"),
    "state_dict as model": (["quantize", "--model", "{weights}", "--data", "{calib}"], "holds a state_dict"),
    "data missing": (["quantize", "--model", MODEL, "--data", "nowhere/"], "is not a folder, a file"),
    "data not a tensor": (["quantize", "--model", MODEL, "--data", "{not_a_tensor}"], "not_a_tensor.npy"),
    "data empty": (["quantize", "--model", MODEL, "--data", "{empty}"], "holds no samples"),
    "data with NaN": (["quantize", "--model", MODEL, "--data", "{nan}"], "NaN or inf"),
    "folder without images": (["quantize", "--model", MODEL, "--data", "{images}", "--input-shape", "1,1,8,8"],
                              "contains no images"),
    "folder without shape": (["quantize", "--model", MODEL, "--data", "{images}"], "pass --input-shape"),
    "std zero": (["quantize", "--model", MODEL, "--data", "{images}", "--input-shape", "1,3,8,8", "--std", "0"],
                 "--std '0': a standard deviation of 0"),
    "mean of wrong length": (["quantize", "--model", MODEL, "--data", "{images}", "--input-shape", "1,3,8,8",
                              "--mean", "0.5,0.5"], "--mean has 2 values but the input has 3 channels"),
    "mean not numbers": (["quantize", "--model", MODEL, "--data", "{images}", "--input-shape", "1,3,8,8",
                          "--mean", "a,b"], "expected comma-separated numbers"),
    "shape not integers": (["quantize", "--model", MODEL, "--data", "{calib}", "--input-shape", "1,x"],
                           "--input-shape"),
    "shape not the data's": (["quantize", "--model", MODEL, "--data", "{calib}", "--input-shape", "1,3,8,8"],
                             r"holds samples of shape \(1, 8, 8\) but --input-shape 1,3,8,8 says \(3, 8, 8\)"),
    "eval returns NaN": (["quantize", "--model", MODEL, "--data", "{calib}", "--eval", "{factories}:nan_metric"],
                         "returned nan"),
    "eval returns text": (["quantize", "--model", MODEL, "--data", "{calib}", "--eval",
                           "{factories}:not_a_number"], "returned str"),
    "unknown config preset": (["quantize", "--config", "fastest"], "fastest"),
    "cuda without gpu": (["quantize", "--model", MODEL, "--data", "{calib}", "--device", "cuda:0"],
                         "no CUDA GPU is visible"),
    "bad device name": (["quantize", "--model", MODEL, "--data", "{calib}", "--device", "tpu9"],
                        "not a torch device name"),
    "model without data": (["quantize", "--model", MODEL], "--model needs --data"),
    "eval without model": (["quantize", "--eval", "{factories}:nan_metric"], "--data and --eval need --model"),
    "eval not callable": (["quantize", "--model", MODEL, "--data", "{calib}", "--eval", "edgequant.cli.job:DEMO_MODEL"],
                          "--eval 'edgequant.cli.job:DEMO_MODEL' is a str, not callable"),
    "bit width out of range": (["quantize", "--param-bw", "1"], "1 is not in the range"),
    "unknown scheme": (["quantize", "--scheme", "best"], "'best' is not one of"),
    "truncated sim state": (["export", "--model", MODEL, "--sim-state", "{truncated_state}",
                             "--input-shape", "1,1,8,8"], "truncated_state.pt"),
    "export without model": (["export", "--sim-state", "{truncated_state}"], "needs --model and --sim-state"),
    "autoquant data without model": (["autoquant", "--data", "{calib}"], "need --model"),
    "mixed precision candidates": (["autoquant", "--mixed-precision", "8;x"], "expected param,output bit-width pairs"),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the 'cuda without gpu' case needs a machine without a GPU")
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clear_line(case: str, files: dict[str, Path]) -> None:
    args, expected = CASES[case]
    argv = [arg.format(**files) for arg in args]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    assert re.search(expected, result.output.replace("\n", " ")), result.output
