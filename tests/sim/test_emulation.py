"""Integer-kernel emulation: the emulating sim and ONNX Runtime agree output for output (W8A8 per-channel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from click.testing import CliRunner
from onnx import TensorProto, helper

import edgequant as eq
from edgequant.cli.export_commands import verify as verify_command
from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.export import export_onnx
from edgequant.export.verify import verify
from edgequant.ptq.batch_norm_fold import fold_batch_norms
from edgequant.sim.emulation import (
    FixedPointRequantization,
    Grid,
    OnnxRuntimeCPU,
    _average_pool,
    quantize_multiplier,
)


def _folded_sim(model: torch.nn.Module, calibration: torch.Tensor) -> eq.QuantSim:
    fold_batch_norms(model, calibration[:1])
    sim = eq.QuantSim(model, calibration[:1], config="per_channel")
    sim.calibrate(calibration.split(32), progress=False)
    return sim


def _grid(scale: float, offset: float, symmetric: bool = False) -> Grid:
    return Grid(torch.tensor(scale), torch.tensor(offset), 255, symmetric)


@pytest.mark.parametrize("name", ["digits_cnn", "digits_dwcnn"])
def test_digits_emulation_is_identical_to_onnxruntime(tmp_path: Path, name: str) -> None:
    images, _ = load_digits_tensors("test")
    sim = _folded_sim(load_pretrained(name), images[:128])
    export_onnx(sim, tmp_path, images[:1])
    default = verify(tmp_path, sim, images, progress=False)
    plan = sim.emulate("onnxruntime")
    assert {op.kind for op in plan.ops} >= {"Conv", "Gemm", "GlobalAveragePool"} and not plan.skipped
    emulated = verify(tmp_path, sim, images, progress=False)
    (output,) = emulated.outputs
    assert output.share_identical == 1.0 and output.max_lsb_diff == 0 and output.top1_agreement == 1.0
    assert emulated.first_difference is None and all(t.share_identical == 1.0 for t in emulated.tensors)
    assert "emulating onnxruntime" in emulated.summary()
    if name == "digits_cnn":  # the default sim rounds differently somewhere (ties of the float32 convolution)
        assert default.outputs[0].share_identical < 1.0 and default.first_difference is not None
        assert default.first_difference.lsb_histogram[1] > 0
        assert default.first_difference.tensor in default.tensor_table()


def test_resnet18_emulation_is_identical_to_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    sim = _folded_sim(model, torch.randn(16, 3, 64, 64))
    export_onnx(sim, tmp_path, torch.randn(1, 3, 64, 64))
    data = torch.randn(6, 3, 64, 64)
    with torch.no_grad():
        default_before = sim.model(data)
    plan = sim.emulate("onnxruntime")
    assert sum(op.kind == "Add" for op in plan.ops) == 8 and sum(op.kind == "Conv" for op in plan.ops) == 20
    report = verify(tmp_path, sim, data, progress=False)
    assert report.integer_kernels.get("QLinearAdd") == 8
    assert report.outputs[0].share_identical == 1.0 and report.first_difference is None
    sim.emulate(None)  # back to the default sim, bit for bit
    assert sim.emulation is None
    with torch.no_grad():
        assert torch.equal(sim.model(data), default_before)


def test_export_and_calibration_ignore_emulation(tmp_path: Path) -> None:
    images, _ = load_digits_tensors("test")
    sim = _folded_sim(load_pretrained("digits_cnn"), images[:64])
    export_onnx(sim, tmp_path / "default", images[:1])
    sim.emulate("onnxruntime")
    export_onnx(sim, tmp_path / "emulating", images[:1])  # traced through the default path
    assert (tmp_path / "default/model_qdq.onnx").read_bytes() == (tmp_path / "emulating/model_qdq.onnx").read_bytes()
    sim.calibrate(images[:64].split(32), progress=False)  # observes float values while calibrating
    assert verify(tmp_path / "emulating", sim, images[:64], progress=False).outputs[0].share_identical == 1.0


def test_unknown_runtime_is_one_clear_error() -> None:
    sim = eq.QuantSim(load_pretrained("digits_cnn"), torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="unknown runtime 'tflite'.*onnxruntime"):
        sim.emulate("tflite")


def test_onnxruntime_requantization_by_hand() -> None:
    runtime = OnnxRuntimeCPU()
    int8 = _grid(1.0, -128.0)
    # M = fl32(0.5·1) / 1 = 0.5: ties round half to even, then saturate to the grid
    acc = torch.tensor([1.0, 3.0, 5.0, -5.0, 600.0, -600.0], dtype=torch.float64)
    out = runtime.requantize(acc, torch.tensor(0.5), torch.tensor(1.0), int8)
    assert out.tolist() == [0.0, 2.0, 2.0, -2.0, 127.0, -128.0]
    assert runtime.bias_to_int32(torch.tensor([0.25, -0.75]), torch.tensor(0.5), torch.tensor(1.0)).tolist() == [
        0.0, -2.0]
    # GlobalAveragePool: M = 1 / (0.5·4) = 0.5 on sums of 4 indices
    assert runtime.average(torch.tensor([6.0, 10.0]), 4, int8, _grid(0.5, -10.0)).tolist() == [3.0, 5.0]
    # Add: 3·0.5 + 1·0.25 = 1.75 = 3.5 output steps; ORT rounds 3.5 + zero point 11 = 14.5 to 14, i.e. index 3
    # (rounding before adding the zero point would give 4)
    added = runtime.add(torch.tensor([3.0]), _grid(0.5, -4.0), torch.tensor([1.0]), _grid(0.25, 0.0),
                        _grid(0.5, -11.0))
    assert added.tolist() == [3.0]


def test_fixed_point_requantization_by_hand() -> None:
    assert quantize_multiplier(0.5) == (2**30, 0)
    assert quantize_multiplier(0.25) == (2**30, -1)
    assert quantize_multiplier(0.75) == (3 * 2**29, 0)
    runtime = FixedPointRequantization()
    int8 = _grid(1.0, -128.0)
    # M = 0.5 as (2**30, 0): gemmlowp's SaturatingRoundingDoublingHighMul rounds 2.5 -> 3, 3.5 -> 4, -2.5 -> -2
    acc = torch.tensor([5.0, -5.0, 7.0, 1000.0], dtype=torch.float64)
    out = runtime.requantize(acc, torch.tensor(0.5), torch.tensor(1.0), int8)
    assert out.tolist() == [3.0, -2.0, 4.0, 127.0]
    per_channel = runtime.requantize(torch.tensor([[6.0, 6.0]], dtype=torch.float64), torch.tensor(1.0),
                                     torch.tensor([0.5, 0.25]), int8, channel_axis=1)
    assert per_channel.tolist() == [[3.0, 2.0]]  # 6·0.25: high mul gives 3, RoundingDivideByPOT(3, 1) = 2
    # TFLite add: (3·2**20)·0.5 + ((1·2**20)·0.5 >> 1) = 1.75·2**20, times 2**-20 -> 1.75 -> 2
    added = runtime.add(torch.tensor([3.0]), _grid(0.5, -128.0), torch.tensor([1.0]), _grid(0.25, -128.0), int8)
    assert added.tolist() == [2.0]


def test_fixed_point_model_plugs_into_the_sim() -> None:
    images, _ = load_digits_tensors("test")
    sim = _folded_sim(load_pretrained("digits_cnn"), images[:64])
    with torch.no_grad():
        default = sim.model(images[:64])
        plan = sim.emulate("fixed-point")
        fixed_point = sim.model(images[:64])
    assert plan.runtime.name == "fixed-point" and len(plan.ops) == 6
    assert not torch.equal(default, fixed_point)
    assert (default.argmax(1) == fixed_point.argmax(1)).float().mean() > 0.95


@pytest.mark.parametrize("in_features", [64, 4096, 40000])  # float32, split float32, float64 accumulation
def test_wide_layers_accumulate_exactly(tmp_path: Path, in_features: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, 8)).eval()
    torch.nn.init.uniform_(model[1].weight, -1, 1)
    calibration = torch.rand(32, in_features)  # one-signed inputs: the accumulators grow with in_features
    sim = _folded_sim(model, calibration)
    export_onnx(sim, tmp_path, calibration[:1])
    sim.emulate("onnxruntime")
    report = verify(tmp_path, sim, torch.rand(16, in_features), progress=False)
    assert report.integer_kernels.get("QGemm") == 1 and report.outputs[0].share_identical == 1.0


def _single_op_qdq(op: str, grids: list[tuple[float, int]], shape: list[int], **attrs: object) -> bytes:
    """DQ(inputs) → op → Q(output) with uint8 grids ``(scale, zero point)``: ORT fuses it into its integer kernel."""
    names = [f"x{i}" for i in range(len(grids) - 1)]
    inits = []
    for name, (scale, zero_point) in zip([*names, "y"], grids, strict=True):
        inits += [helper.make_tensor(f"{name}_s", TensorProto.FLOAT, [], [scale]),
                  helper.make_tensor(f"{name}_z", TensorProto.UINT8, [], [zero_point])]
    nodes = [helper.make_node("DequantizeLinear", [n, f"{n}_s", f"{n}_z"], [f"{n}_f"]) for n in names]
    nodes.append(helper.make_node(op, [f"{n}_f" for n in names], ["y_f"], **attrs))
    nodes.append(helper.make_node("QuantizeLinear", ["y_f", "y_s", "y_z"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.UINT8, shape) for n in names],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _run_ort(model: bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _random_grids(rng: np.random.Generator, count: int) -> list[tuple[float, int]]:
    return [(float(rng.uniform(0.005, 0.2)), int(rng.integers(0, 256))) for _ in range(count)]


def _as_grid(scale: float, zero_point: int) -> Grid:
    return _grid(scale, -float(zero_point))


@pytest.mark.parametrize("op", ["Add", "Mul"])
def test_binary_kernels_match_onnxruntime_on_every_input_pair(op: str) -> None:
    rng = np.random.default_rng(0)
    a = np.repeat(np.arange(256, dtype=np.uint8), 256)[None]
    b = np.tile(np.arange(256, dtype=np.uint8), 256)[None]
    runtime = OnnxRuntimeCPU()
    for _ in range(12):
        grids = _random_grids(rng, 3)
        if op == "Mul":  # keep products inside the output range often enough to test rounding, not saturation
            grids[2] = (grids[0][0] * grids[1][0] * float(rng.uniform(20, 60)), grids[2][1])
        expected = _run_ort(_single_op_qdq(op, grids, [1, 65536]), {"x0": a, "x1": b})
        indices = [torch.tensor(v.astype(np.int64) - zero_point, dtype=torch.float32)
                   for v, (_, zero_point) in zip((a, b), grids[:2], strict=True)]
        method = runtime.add if op == "Add" else runtime.mul
        got = method(indices[0], _as_grid(*grids[0]), indices[1], _as_grid(*grids[1]), _as_grid(*grids[2]))
        assert np.array_equal(got.numpy() + grids[2][1], expected)


def test_sigmoid_and_average_pool_match_onnxruntime() -> None:
    rng = np.random.default_rng(1)
    runtime = OnnxRuntimeCPU()
    levels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    for _ in range(12):
        (scale_x, zero_x), (scale_y, zero_y) = _random_grids(rng, 2)
        sigmoid_grid = (float(rng.uniform(1 / 300, 1 / 200)), 0)
        expected = _run_ort(_single_op_qdq("Sigmoid", [(scale_x, zero_x), sigmoid_grid], [1, 1, 16, 16]),
                            {"x0": levels})
        x = _as_grid(scale_x, zero_x).values(torch.tensor(levels.astype(np.int64) - zero_x, dtype=torch.float32))
        got = torch.clamp(torch.round(runtime.sigmoid(x) / sigmoid_grid[0]), 0, 255)
        assert np.array_equal(got.numpy(), expected)
        pool = torch.nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        shuffled = rng.permutation(levels.reshape(-1)).reshape(1, 1, 16, 16)
        model = _single_op_qdq("AveragePool", [(scale_x, zero_x), (scale_y, zero_y)], [1, 1, 16, 16],
                               kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0)
        expected = _run_ort(model, {"x0": shuffled})
        x = _as_grid(scale_x, zero_x).values(torch.tensor(shuffled.astype(np.int64) - zero_x, dtype=torch.float32))
        got = _average_pool(pool, runtime, x, _as_grid(scale_x, zero_x), _as_grid(scale_y, zero_y))
        assert np.array_equal(got.numpy() + zero_y, expected)


def test_cli_verify_emulating(tmp_path: Path) -> None:
    images, _ = load_digits_tensors("test")
    sim = eq.QuantSim(load_pretrained("digits_cnn"), images[:1])
    sim.calibrate(images[:64].split(32), progress=False)
    sim.save(tmp_path / "sim_state.pt")
    export_onnx(sim, tmp_path / "out", images[:1])
    torch.save(images[:64], tmp_path / "data.pt")
    common = ["--model", "edgequant.demo.digits:load_pretrained", "--sim-state", str(tmp_path / "sim_state.pt"),
              "--input-shape", "1,1,8,8", "--data", str(tmp_path / "data.pt"), "--quiet", "--tensors"]
    result = CliRunner().invoke(verify_command, [*common, "--emulate", "onnxruntime", "--max-lsb", "0",
                                                 "--min-identical", "100", "--export-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "emulating onnxruntime" in result.output and "no tensor differs" in result.output
    assert "|diff| in LSB" in result.output  # the per-tensor table
    result = CliRunner().invoke(verify_command, ["--emulate", "onnxruntime", "--data", str(tmp_path / "data.pt"),
                                                 "--export-dir", str(tmp_path / "out")])
    assert result.exit_code != 0 and "--emulate needs the sim" in result.output
