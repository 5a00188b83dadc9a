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
from segmentation_models import UNet
from torch import nn

import edgequant as eq
from edgequant.cli.export_commands import verify as verify_command
from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.export import export_onnx
from edgequant.export.verify import verify
from edgequant.ptq.batch_norm_fold import fold_batch_norms
from edgequant.quantization.number_format import IntegerFormat
from edgequant.quantization.sealing import SealedTensorError
from edgequant.sim.emulation import (
    KERNELS,
    FixedPointRequantization,
    Grid,
    Interpolation,
    OnnxRuntimeCPU,
    _average_pool,
    quantize_multiplier,
)
from edgequant.sim.quantized_module import FunctionalOp


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


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_emulation_reads_frozen_weights(weight_bits: int) -> None:
    """Inside ``sim.frozen_weights()`` the float weights and their encodings are sealed; the emulated integer kernels
    (8-bit weights) and float convolutions (4-bit) read them all the same and compute what they compute unfrozen,
    and the weights stay sealed after the forward."""
    images, _ = load_digits_tensors("test")
    sim = _folded_sim(load_pretrained("digits_cnn"), images[:64])
    sim.set_format("*", IntegerFormat(weight_bits, True), kinds=("param",), module_types=(nn.Conv2d, nn.Linear))
    sim.calibrate(images[:64].split(32), progress=False)
    sim.emulate("onnxruntime")
    with torch.no_grad():
        unfrozen = sim.model(images[:32])
        with sim.frozen_weights():
            frozen = sim.model(images[:32])
            with pytest.raises(SealedTensorError):
                sim.model.get_submodule("fc").weight  # noqa: B018 - the access is what is checked
    assert torch.equal(frozen, unfrozen)


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


def _single_op_qdq(op: str, grids: list[tuple[float, int]], shape: list[int] | list[list[int]],
                   constants: tuple[list[float] | None, ...] = (), **attrs: object) -> bytes:
    """DQ(inputs) → op → Q(output) with uint8 grids ``(scale, zero point)``: ORT fuses it into its integer kernel.
    ``shape``: of every input, or a list of one shape per input; ``constants``: float inputs after the quantized
    ones (None: an omitted input, as Resize's roi)."""
    names = [f"x{i}" for i in range(len(grids) - 1)]
    shapes = shape if isinstance(shape[0], list) else [shape] * len(names)
    inits = [helper.make_tensor(f"c{i}", TensorProto.FLOAT, [len(c)], c) for i, c in enumerate(constants) if c]
    for name, (scale, zero_point) in zip([*names, "y"], grids, strict=True):
        inits += [helper.make_tensor(f"{name}_s", TensorProto.FLOAT, [], [scale]),
                  helper.make_tensor(f"{name}_z", TensorProto.UINT8, [], [zero_point])]
    nodes = [helper.make_node("DequantizeLinear", [n, f"{n}_s", f"{n}_z"], [f"{n}_f"]) for n in names]
    constant_inputs = [f"c{i}" if c else "" for i, c in enumerate(constants)]
    nodes.append(helper.make_node(op, [*(f"{n}_f" for n in names), *constant_inputs], ["y_f"], **attrs))
    nodes.append(helper.make_node("QuantizeLinear", ["y_f", "y_s", "y_z"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.UINT8, input_shape)
                                           for n, input_shape in zip(names, shapes, strict=True)],
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


def _levels_of(values: torch.Tensor, grid: tuple[float, int]) -> np.ndarray:
    """uint8 levels of float values, as QuantizeLinear stores them (true division, half to even)."""
    return torch.clamp(torch.round(values / grid[0]) + grid[1], 0, 255).numpy()


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
    assert "\n  emulating onnxruntime: 3 of 6 ops emulated (50%); not emulated: conv1.0," in result.output
    assert "|diff| in LSB" in result.output  # the per-tensor table
    result = CliRunner().invoke(verify_command, ["--emulate", "onnxruntime", "--data", str(tmp_path / "data.pt"),
                                                 "--export-dir", str(tmp_path / "out")])
    assert result.exit_code != 0 and "--emulate needs the sim" in result.output


def _all_levels(shape: list[int]) -> np.ndarray:
    """uint8 levels 0..255 laid along the last axes that hold 256 elements, repeated along the others."""
    axis, count = len(shape), 1
    while count < 256:
        axis -= 1
        count *= shape[axis]
    return np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(shape[axis:]), shape).copy()


@pytest.mark.parametrize("op", ["Add", "Mul"])
@pytest.mark.parametrize("shapes", [([256, 256], [256, 1]), ([256, 1], [256, 256]), ([1, 256, 16, 16], [1, 256, 1, 1])])
def test_broadcast_binary_kernels_match_onnxruntime_on_every_input_pair(op: str, shapes: tuple[list[int], ...]) -> None:
    """One operand broadcast along the innermost axes (an SE block's [N, C, 1, 1]), as the first or second input:
    ORT's broadcaster gives the kernel one scalar per span, and a scalar first input swaps the operands' roles."""
    rng = np.random.default_rng(2)
    feeds = [_all_levels(shape) for shape in shapes]  # every pair of levels meets in the output
    runtime = OnnxRuntimeCPU()
    for _ in range(8):
        grids = _random_grids(rng, 3)
        if op == "Mul":
            grids[2] = (grids[0][0] * grids[1][0] * float(rng.uniform(20, 60)), grids[2][1])
        expected = _run_ort(_single_op_qdq(op, grids, list(shapes)), {"x0": feeds[0], "x1": feeds[1]})
        indices = [torch.tensor(v.astype(np.int64) - zero_point, dtype=torch.float32)
                   for v, (_, zero_point) in zip(feeds, grids[:2], strict=True)]
        method = runtime.add if op == "Add" else runtime.mul
        got = method(indices[0], _as_grid(*grids[0]), indices[1], _as_grid(*grids[1]), _as_grid(*grids[2]))
        assert np.array_equal(got.numpy() + grids[2][1], expected)


def test_concat_leaky_relu_and_ceil_mode_pools_match_onnxruntime() -> None:
    rng = np.random.default_rng(3)
    runtime = OnnxRuntimeCPU()
    levels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    for _ in range(8):
        grids = _random_grids(rng, 3)
        x = [_as_grid(*grid).values(torch.tensor(levels.astype(np.int64) - grid[1], dtype=torch.float32))
             for grid in grids[:2]]
        concat = KERNELS["Concat"].compute(FunctionalOp(torch.cat, "Concat"), runtime, ([x[0], x[1]], 1),
                                           [_as_grid(*g) for g in grids[:2]], _as_grid(*grids[2]))
        expected = _run_ort(_single_op_qdq("Concat", grids, [1, 1, 16, 16], axis=1), {"x0": levels, "x1": levels})
        assert np.array_equal(_levels_of(concat, grids[2]), expected)
        leaky = KERNELS["LeakyRelu"].compute(torch.nn.LeakyReLU(0.15), runtime, (x[0],), [_as_grid(*grids[0])],
                                             _as_grid(*grids[2]))
        expected = _run_ort(_single_op_qdq("LeakyRelu", [grids[0], grids[2]], [1, 1, 16, 16], alpha=0.15),
                            {"x0": levels})
        assert np.array_equal(_levels_of(leaky, grids[2]), expected)
        shuffled = rng.permutation(levels.reshape(-1)).reshape(1, 1, 16, 16)
        source = _as_grid(*grids[0])
        values = source.values(torch.tensor(shuffled.astype(np.int64) - grids[0][1], dtype=torch.float32))
        for include_pad in (True, False):  # the last window of each row runs past the padding: 9 outputs, not 8
            pool = torch.nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=include_pad)
            model = _single_op_qdq("AveragePool", [grids[0], grids[2]], [1, 1, 16, 16], kernel_shape=[3, 3],
                                   strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=int(include_pad))
            expected = _run_ort(model, {"x0": shuffled})
            got = _average_pool(pool, runtime, values, source, _as_grid(*grids[2]))
            assert got.shape == pool(values).shape == expected.shape == (1, 1, 9, 9)
            assert np.array_equal(got.numpy() + grids[2][1], expected)


class _SqueezeExcitation(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = torch.nn.Conv2d(channels, 4, 1)
        self.expand = torch.nn.Conv2d(4, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.expand(torch.relu(self.reduce(torch.nn.functional.adaptive_avg_pool2d(x, 1)))))
        return x * scale


class _TfStyleNet(torch.nn.Module):
    """TF-style "same" padding as explicit zero pads before the convolutions (EfficientNet-Lite ports), an SE
    block, a broadcast bias add, a two-branch concat, LeakyReLU and ceil-mode average pools."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_pad = torch.nn.ZeroPad2d((0, 1, 0, 1))
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.depthwise_pad = torch.nn.ZeroPad2d(1)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, groups=8)
        self.excite = _SqueezeExcitation(8)
        self.branch_a = torch.nn.Conv2d(8, 8, 1)
        self.branch_b = torch.nn.Conv2d(8, 8, 3)
        self.leaky = torch.nn.LeakyReLU(0.1)
        self.pool = torch.nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.pool_no_pad = torch.nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.relu6(self.stem(self.stem_pad(x)))
        x = torch.relu(self.depthwise(self.depthwise_pad(x)))
        x = self.excite(x)
        x = x + torch.nn.functional.adaptive_avg_pool2d(x, 1)
        branches = [torch.relu(self.branch_a(x)), self.leaky(self.branch_b(torch.nn.functional.pad(x, (1, 1, 1, 1))))]
        x = self.pool_no_pad(self.pool(torch.cat(branches, dim=1)))
        return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_padded_squeeze_excitation_concat_net_is_identical_to_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sim = _folded_sim(_TfStyleNet().eval(), torch.randn(32, 3, 33, 33))
    export_onnx(sim, tmp_path, torch.randn(1, 3, 33, 33))
    plan = sim.emulate("onnxruntime")
    assert not plan.skipped, plan.summary()
    emulated = {op.name for op in plan.ops}
    assert {"stem", "depthwise", "mul", "add", "cat", "leaky", "pool", "pool_no_pad"} <= emulated
    assert plan.coverage() == f"emulating onnxruntime: every op emulated ({len(plan.ops)} of {len(plan.ops)})"
    assert "\n  models: ONNX Runtime 1.32's CPU kernels on x86-64 with AVX2 and FMA" in plan.summary()
    report = verify(tmp_path, sim, torch.randn(64, 3, 33, 33), progress=False)
    assert {"QLinearConcat", "QLinearMul", "QLinearAdd", "QLinearAveragePool", "QLinearLeakyRelu"} <= set(
        report.integer_kernels)
    assert report.integer_kernels["QLinearConv"] == 6  # the zero pads folded into the convolutions
    assert report.outputs[0].share_identical == 1.0 and report.first_difference is None
    assert plan.coverage() in report.summary()


def test_padding_the_runtime_keeps_apart_is_not_emulated_and_warns(tmp_path: Path) -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pad = torch.nn.ZeroPad2d(1)
            self.filled = torch.nn.ConstantPad2d(1, 0.5)
            self.a, self.b, self.c = (torch.nn.Conv2d(3, 3, 3) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            padded = self.pad(x)  # two consumers: ORT keeps the Pad, and the convolutions stay float
            return self.a(padded) + self.b(padded) + self.c(self.filled(x))  # a non-zero pad value is not folded

    sim = _folded_sim(Net().eval(), torch.randn(8, 3, 8, 8))
    export_onnx(sim, tmp_path, torch.randn(1, 3, 8, 8))
    assert "QLinearConv" not in verify(tmp_path, sim, torch.randn(4, 3, 8, 8), progress=False).integer_kernels
    with pytest.warns(UserWarning, match=r"^emulating onnxruntime: 2 of 5 ops emulated \(40%\); "
                                         r"not emulated: a, b, c \(plan.summary\(\) says why\)$"):
        plan = sim.emulate("onnxruntime")
    assert [op.kind for op in plan.ops] == ["Add", "Add"]
    assert all("input 0 does not come from a quantizer" in why for why in plan.skipped.values())


def test_a_fused_clamp_with_unknown_bounds_is_not_emulated() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.clamp(self.conv(x), 0.0, 4.0)  # fused into the conv's group, bounds held by the call

    sim = _folded_sim(Net().eval(), torch.randn(8, 3, 8, 8))
    with pytest.warns(UserWarning, match="0 of 1 ops emulated"):
        plan = sim.emulate("onnxruntime")
    assert plan.skipped == {"conv": "the bounds of its fused Clip are not known to the emulation"}


def test_linear_layers_on_sequences_are_identical_to_onnxruntime(tmp_path: Path) -> None:
    """A Linear on [N, T, C] is exported as MatMul + Add: ORT runs MatMulIntegerToFloat and a float Add (with a
    bias) or QLinearMatMul (without), not QGemm."""
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c = torch.nn.Linear(64, 256), torch.nn.Linear(64, 32)
            self.b = torch.nn.Linear(256, 64, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(2)
    sim = _folded_sim(Net().eval(), torch.randn(32, 10, 64))
    export_onnx(sim, tmp_path, torch.randn(1, 10, 64))
    sim.emulate("onnxruntime")
    report = verify(tmp_path, sim, torch.randn(64, 10, 64), progress=False)
    assert report.integer_kernels == {"MatMulIntegerToFloat": 2, "QLinearMatMul": 1}
    assert report.outputs[0].share_identical == 1.0 and report.first_difference is None


def _silu_qdq(grids: list[tuple[float, int]], shape: list[int]) -> bytes:
    """DQ → Sigmoid → Mul(x, ·) → Q: SiLU as exported, float between DQ and Q in ORT."""
    (scale_x, zero_x), (scale_y, zero_y) = grids
    inits = [helper.make_tensor("x_s", TensorProto.FLOAT, [], [scale_x]),
             helper.make_tensor("x_z", TensorProto.UINT8, [], [zero_x]),
             helper.make_tensor("y_s", TensorProto.FLOAT, [], [scale_y]),
             helper.make_tensor("y_z", TensorProto.UINT8, [], [zero_y])]
    nodes = [helper.make_node("DequantizeLinear", ["x0", "x_s", "x_z"], ["x"]),
             helper.make_node("Sigmoid", ["x"], ["sigmoid"]), helper.make_node("Mul", ["x", "sigmoid"], ["silu"]),
             helper.make_node("QuantizeLinear", ["silu", "y_s", "y_z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.UINT8, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_hard_sigmoid_hard_swish_and_silu_follow_onnxruntime_formulas() -> None:
    """Float ops between DQ and Q in ORT, computed with its own formulas: on scales from 1e-8 to 1 (tiny ones are
    what random weights produce) PyTorch's HardSwish and SiLU round some levels otherwise, the runtime model's
    formulas none."""
    rng = np.random.default_rng(5)
    runtime = OnnxRuntimeCPU()
    levels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    pytorch_differs = {"HardSigmoid": 0, "HardSwish": 0, "Silu": 0}
    for _ in range(60):
        scale = float(10 ** rng.uniform(-8, 0))
        ratio = float(rng.choice([0.5, 1.0, 2.0, rng.uniform(0.3, 3)]))  # output steps of the input's: many ties
        grids = [(scale, int(rng.integers(0, 256))), (scale * ratio, int(rng.integers(0, 256)))]
        x = _as_grid(*grids[0]).values(torch.tensor(levels.astype(np.int64) - grids[0][1], dtype=torch.float32))
        hard_sigmoid = _single_op_qdq("HardSigmoid", grids, [1, 1, 16, 16], alpha=1 / 6, beta=0.5)
        for kind, model, pytorch in (("HardSigmoid", hard_sigmoid, torch.nn.functional.hardsigmoid),
                                     ("HardSwish", _single_op_qdq("HardSwish", grids, [1, 1, 16, 16]),
                                      torch.nn.functional.hardswish),
                                     ("Silu", _silu_qdq(grids, [1, 1, 16, 16]), torch.nn.functional.silu)):
            expected = _run_ort(model, {"x0": levels})
            got = KERNELS[kind].compute(torch.nn.Identity(), runtime, (x,), [_as_grid(*grids[0])], _as_grid(*grids[1]))
            assert np.array_equal(_levels_of(got, grids[1]), expected), kind
            pytorch_differs[kind] += int((_levels_of(pytorch(x), grids[1]) != expected).sum())
    assert pytorch_differs["HardSwish"] > 0 and pytorch_differs["Silu"] > 0, pytorch_differs


@pytest.mark.parametrize("value", [0.0, None])
def test_functional_zero_pad_without_its_own_quantizer(tmp_path: Path, value: float | None) -> None:
    """DQ → Pad → Conv: ORT folds the Pad into the convolution when its constant value is given (F.pad without
    one is exported without the input PadFusion reads, and the Pad and the Conv stay float)."""
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            padding = (0, 1, 0, 1)
            padded = torch.nn.functional.pad(x, padding) if value is None else torch.nn.functional.pad(
                x, padding, value=value)
            return self.conv(padded)

    torch.manual_seed(0)
    sim = _folded_sim(Net().eval(), torch.randn(32, 3, 17, 17))
    (pad,) = [m for m in sim.model.modules() if isinstance(m, FunctionalOp) and m.onnx_op_type == "Pad"]
    pad.output_quantizers["0"].enabled = False
    export_onnx(sim, tmp_path, torch.randn(1, 3, 17, 17))
    report = verify(tmp_path, sim, torch.randn(4, 3, 17, 17), progress=False)
    if value is None:
        assert "QLinearConv" not in report.integer_kernels
        with pytest.warns(UserWarning, match="0 of 1 ops emulated"):
            sim.emulate("onnxruntime")
        return
    assert report.integer_kernels == {"QLinearConv": 1}
    plan = sim.emulate("onnxruntime")
    assert [op.name for op in plan.ops] == ["conv"]
    assert verify(tmp_path, sim, torch.randn(64, 3, 17, 17), progress=False).outputs[0].share_identical == 1.0


def test_softmax_matches_onnxruntime() -> None:
    """QLinearSoftmax: a float32 exp table of the distance to the row's maximum level, a float32 sum, and the
    output scale read as floor(1 / s_y)."""
    rng = np.random.default_rng(6)
    runtime = OnnxRuntimeCPU()
    for length in (4, 10, 64, 197):
        for output_grid in ((1 / 255, 0), (1 / 256, 0), (float(rng.uniform(0.001, 0.01)), 3)):
            source = (float(rng.uniform(0.01, 0.3)), int(rng.integers(0, 256)))
            levels = rng.integers(0, 256, size=(2, length, 8)).astype(np.uint8)  # softmax over the middle axis
            model = _single_op_qdq("Softmax", [source, output_grid], [2, length, 8], axis=1)
            expected = _run_ort(model, {"x0": levels})
            x = _as_grid(*source).values(torch.tensor(levels.astype(np.int64) - source[1], dtype=torch.float32))
            got = runtime.softmax(x, _as_grid(*source), _as_grid(*output_grid), 1)
            assert np.array_equal(got.numpy() + output_grid[1], expected)


class _Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v)


def test_attention_block_is_identical_to_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(1)
    sim = _folded_sim(_Attention().eval(), torch.randn(32, 16, 32))
    export_onnx(sim, tmp_path, torch.randn(1, 16, 32))
    data = torch.randn(64, 16, 32)
    default = verify(tmp_path, sim, data, progress=False)
    plan = sim.emulate("onnxruntime")
    assert sorted(op.kind for op in plan.ops) == ["Gemm", "Gemm", "MatMul", "MatMul", "Softmax"]
    report = verify(tmp_path, sim, data, progress=False)
    assert report.integer_kernels == {"MatMulIntegerToFloat": 2, "QLinearMatMul": 2, "QLinearSoftmax": 1}
    assert default.outputs[0].share_identical < 0.9  # the default sim's float softmax is not QLinearSoftmax
    assert report.outputs[0].share_identical == 1.0 and report.first_difference is None


def test_products_with_float_constants_are_float_in_the_runtime(tmp_path: Path) -> None:
    """A layer scale (ConvNeXt) or a number has no DQ in the export: ORT multiplies in float32 as the sim does, so
    these are neither emulated nor reported as missing."""
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.layer_scale = torch.nn.Parameter(torch.rand(8, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.layer_scale * self.conv(x)) * 0.5 + 1.0

    torch.manual_seed(0)
    sim = _folded_sim(Net().eval(), torch.randn(32, 3, 8, 8))
    export_onnx(sim, tmp_path, torch.randn(1, 3, 8, 8))
    plan = sim.emulate("onnxruntime")
    assert [op.kind for op in plan.ops] == ["Conv"] and not plan.skipped
    report = verify(tmp_path, sim, torch.randn(64, 3, 8, 8), progress=False)
    assert report.integer_kernels == {"QLinearConv": 1} and report.float_kernels.get("Mul") == 2
    assert report.outputs[0].share_identical == 1.0 and report.first_difference is None


def test_a_dead_channels_int32_bias_overflows_as_in_onnxruntime(tmp_path: Path) -> None:
    """A channel with weights near 0 (its scale at the floor) and a large bias: ``b / (s_x·s_w)`` leaves int32, ORT
    converts it to INT32_MIN whatever its sign, and the int32 accumulator wraps around."""
    bias = OnnxRuntimeCPU().bias_to_int32(torch.tensor([1.0, 2.0, 3.0, -3.0]), torch.tensor(2.0**-10),
                                          torch.tensor(2.0**-20))
    assert bias.tolist() == [2**30, -(2**31), -(2**31), -(2**31)]  # 2**31 and beyond: INT32_MIN, not saturated

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight[1].mul_(1e-7)  # dead channel with a large bias of either sign
        model[0].bias[1] = 40.0
        model[0].weight[2].mul_(1e-7)
        model[0].bias[2] = -40.0
    sim = _folded_sim(model, torch.randn(32, 3, 8, 8))
    export_onnx(sim, tmp_path, torch.randn(1, 3, 8, 8))
    data = torch.randn(16, 3, 8, 8)
    default = verify(tmp_path, sim, data, progress=False)
    sim.emulate("onnxruntime")
    report = verify(tmp_path, sim, data, progress=False)
    assert default.first_difference is not None and default.first_difference.max_lsb_diff > 1
    assert report.first_difference is None and report.outputs[0].share_identical == 1.0


@pytest.mark.parametrize(("call", "scales", "attributes"), [
    (Interpolation(scale_factor=2, mode="bilinear", align_corners=False), [2.0, 2.0],
     {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}),
    (Interpolation(scale_factor=(1.5, 2.5), mode="bilinear", align_corners=False), [1.5, 2.5],
     {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}),
    (Interpolation(scale_factor=2, mode="bilinear", align_corners=True), [2.0, 2.0],
     {"mode": "linear", "coordinate_transformation_mode": "align_corners"}),
    (Interpolation(scale_factor=0.5, mode="nearest"), [0.5, 0.5],
     {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
    (Interpolation(scale_factor=3, mode="nearest"), [3.0, 3.0],
     {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
])
def test_resize_matches_onnxruntime_on_every_input_level(call: Interpolation, scales: list[float],
                                                         attributes: dict[str, str]) -> None:
    """DQ → Resize → Q, as ``F.interpolate`` exports it: float in ORT between DQ and Q, with its own source
    coordinates and tap weights (bilinear: four taps summed left to right, where PyTorch lerps twice)."""
    rng = np.random.default_rng(7)
    runtime = OnnxRuntimeCPU()
    pytorch_differs = 0
    for _ in range(20):
        grids = _random_grids(rng, 2)
        ratio = float(rng.choice([0.5, 1.0, 2.0, rng.uniform(0.3, 3)]))  # output steps of the input's: many ties
        grids[1] = (grids[0][0] * ratio, grids[1][1])
        levels = rng.permutation(np.arange(256, dtype=np.uint8).repeat(2)).reshape(1, 2, 16, 16)
        model = _single_op_qdq("Resize", grids, [1, 2, 16, 16], (None, [1.0, 1.0, *scales]), **attributes)
        expected = _run_ort(model, {"x0": levels})
        x = _as_grid(*grids[0]).values(torch.tensor(levels.astype(np.int64) - grids[0][1], dtype=torch.float32))
        got = KERNELS["Resize"].compute(FunctionalOp(torch.nn.functional.interpolate, "Resize"), runtime, (x, *call),
                                        [_as_grid(*grids[0])], _as_grid(*grids[1]))
        assert np.array_equal(_levels_of(got, grids[1]), expected)
        pytorch = torch.nn.functional.interpolate(x, scale_factor=call.scale_factor, mode=call.mode,
                                                  align_corners=call.align_corners)
        pytorch_differs += int((_levels_of(pytorch, grids[1]) != expected).sum())
    assert (pytorch_differs > 0) == (call.mode == "bilinear")  # PyTorch's nearest copies what ORT's does here


@pytest.mark.parametrize("layer", [
    {"kernel_size": 2, "stride": 2},  # a U-Net's up-sampling: the taps do not overlap
    {"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1},  # overlapping taps, cropped, padded out
    {"kernel_size": 4, "stride": 2, "padding": 1, "groups": 2},
    {"kernel_size": 2, "stride": 2, "in_channels": 160},  # MLAS sums the 160 input channels in two slices
])
def test_conv_transpose_matches_onnxruntime_on_every_input_level(tmp_path: Path, layer: dict[str, int]) -> None:
    """DQ → ConvTranspose → Q: float in ORT, an MLAS SGEMM (FMA chains) and Col2im in tap order, plus the bias ORT
    quantizes to int32 and dequantizes itself."""
    torch.manual_seed(0)
    in_channels = layer.pop("in_channels", 16)
    model = torch.nn.Sequential(torch.nn.ConvTranspose2d(in_channels, 8, **layer)).eval()
    calibration = torch.randn(16, in_channels, 8, 8)
    sim = _folded_sim(model, calibration)
    export_onnx(sim, tmp_path, calibration[:1])
    grid = Grid.of(sim.model.model_input_quantizers["0"])
    levels = torch.randperm(4 * in_channels * 64) % 256  # every input level, in random places
    data = grid.values(levels.float().add(grid.offset).reshape(4, in_channels, 8, 8))
    plan = sim.emulate("onnxruntime")
    assert [op.kind for op in plan.ops] == ["ConvTranspose"]
    report = verify(tmp_path, sim, data, progress=False)
    assert report.outputs[0].share_identical == 1.0 and report.first_difference is None


@pytest.mark.parametrize("upsample", [
    torch.nn.Upsample(scale_factor=2, mode="bilinear"),
    torch.nn.UpsamplingBilinear2d(scale_factor=2),  # align_corners
    torch.nn.Upsample(size=(20, 28), mode="bilinear"),  # exported with sizes: ORT's scales are out / in
    torch.nn.Upsample(scale_factor=1.5, mode="nearest"),
], ids=["bilinear", "align_corners", "size", "nearest"])
def test_upsample_modules_are_identical_to_onnxruntime(tmp_path: Path, upsample: torch.nn.Module) -> None:
    torch.manual_seed(0)
    calibration = torch.randn(16, 3, 12, 12)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), upsample, torch.nn.Conv2d(8, 4, 1)).eval()
    sim = _folded_sim(model, calibration)
    export_onnx(sim, tmp_path, calibration[:1])
    plan = sim.emulate("onnxruntime")
    assert [op.kind for op in plan.ops] == ["Conv", "Resize", "Conv"]
    report = verify(tmp_path, sim, torch.randn(8, 3, 12, 12), progress=False)
    assert report.outputs[0].share_identical == 1.0 and report.first_difference is None


def test_unet_is_identical_to_onnxruntime(tmp_path: Path) -> None:
    """ConvTranspose, bilinear and nearest Resize between DQ and Q, QLinearConv and QLinearConcat: every quantized
    tensor identical; the default sim rounds some outputs otherwise."""
    torch.manual_seed(0)
    calibration = torch.randn(16, 3, 32, 32)
    sim = _folded_sim(UNet().eval(), calibration)
    export_onnx(sim, tmp_path, calibration[:1])
    data = torch.randn(8, 3, 32, 32)
    default = verify(tmp_path, sim, data, progress=False)
    plan = sim.emulate("onnxruntime")
    assert not plan.skipped and sum(op.kind == "Resize" for op in plan.ops) == 2
    assert {op.kind for op in plan.ops} == {"Conv", "ConvTranspose", "Resize", "Concat"}
    report = verify(tmp_path, sim, data, progress=False)
    assert report.outputs[0].share_identical == 1.0 and report.first_difference is None
    assert default.outputs[0].share_identical < 1.0
