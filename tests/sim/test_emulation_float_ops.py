"""Float ops ONNX Runtime runs between DQ and Q with its own float32 formulas (ConvNeXt's GELU and channels-first
LayerNorm): the emulation computes them as ORT does, where PyTorch's float32 results differ in the last bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import torchvision
from emulation_parity import export_then_emulate
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import edgequant as eq
from edgequant.export.runtime_cpu import ORT_SESSION_CONFIG
from edgequant.export.verify import verify
from edgequant.quantization.number_format import IntegerFormat
from edgequant.sim.emulation import KERNELS, Grid, OnnxRuntimeCPU
from edgequant.sim.emulation.arithmetic import mlas_erf


def _session(nodes: list, inputs: list, initializers: list, output_type: int, opset: int = 17) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", output_type, None)], initializers)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _gelu_session(grid: tuple[float, int], output: tuple[float, int] | None) -> ort.InferenceSession:
    """GELU as exported: DQ → Div(√2) → Erf → Add(1) → Mul(x, ·) → Mul(0.5) → Q (float output without ``output``),
    x read through a DQ of its own by each consumer, as the QDQ export writes it."""
    constants = {"sqrt2": np.float32(np.sqrt(2)), "one": np.float32(1), "half": np.float32(0.5),
                 "x_s": np.float32(grid[0]), "x_z": np.uint8(grid[1])}
    if output is not None:
        constants |= {"y_s": np.float32(output[0]), "y_z": np.uint8(output[1])}
    nodes = [helper.make_node("DequantizeLinear", ["x", "x_s", "x_z"], ["xa"]),
             helper.make_node("DequantizeLinear", ["x", "x_s", "x_z"], ["xb"]),
             helper.make_node("Div", ["xa", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["xb", "a"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["g" if output is not None else "y"])]
    if output is not None:
        nodes.append(helper.make_node("QuantizeLinear", ["g", "y_s", "y_z"], ["y"]))
    initializers = [numpy_helper.from_array(np.array(v), k) for k, v in constants.items()]
    return _session(nodes, [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 256])], initializers,
                    TensorProto.UINT8 if output is not None else TensorProto.FLOAT)


def test_erf_is_mlas_erf_bit_for_bit() -> None:
    """MLAS's erf polynomial (both branches, the saturation beyond 3.925, signed zeros) on two million values."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 2, 1_000_000), rng.uniform(-6, 6, 1_000_000),
                        [0.0, -0.0, 0.921875, -0.921875, 3.925, 40.0, -40.0]]).astype(np.float32)
    session = _session([helper.make_node("Erf", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])], [], TensorProto.FLOAT)
    expected = session.run(None, {"x": x})[0]
    assert np.array_equal(mlas_erf(torch.from_numpy(x)).numpy().view(np.int32), expected.view(np.int32))
    assert not np.array_equal(torch.erf(torch.from_numpy(x)).numpy(), expected)


def test_gelu_matches_onnxruntime_on_every_input_level() -> None:
    """On random grids every input level's float output is ORT's bit for bit (PyTorch's gelu rounds some apart)
    and so is every output level."""
    rng = np.random.default_rng(1)
    runtime = OnnxRuntimeCPU()
    pytorch_differs = 0
    for _ in range(40):
        levels = rng.permutation(256).astype(np.uint8)[None]  # the kernel tabulates the levels: any order
        grid = (float(10 ** rng.uniform(-3, 0)), int(rng.integers(0, 256)))
        output = (grid[0] * float(rng.choice([0.5, 1.0, rng.uniform(0.2, 2)])), int(rng.integers(0, 256)))
        source = Grid(torch.tensor(grid[0]), torch.tensor(-float(grid[1])), 255, False)
        x = source.values(torch.from_numpy(levels.astype(np.float32) - grid[1]))
        emulated = KERNELS["Gelu"].compute(torch.nn.GELU(), runtime, (x,), [source], Grid(
            torch.tensor(output[0]), torch.tensor(-float(output[1])), 255, False))
        expected = _gelu_session(grid, None).run(None, {"x": levels})[0]
        assert np.array_equal(emulated.numpy().view(np.int32), expected.view(np.int32))
        pytorch_differs += int((torch.nn.functional.gelu(x).numpy() != expected).sum())
        quantized = torch.clamp(torch.round(emulated / output[0]) + output[1], 0, 255).numpy()
        assert np.array_equal(quantized, _gelu_session(grid, output).run(None, {"x": levels})[0])
    assert pytorch_differs > 0


def test_channels_first_layer_norm_is_onnxruntimes_float_kernel() -> None:
    """torchvision's LayerNorm2d (permute, layer_norm, permute back): ORT's Transpose → LayerNormalization →
    Transpose, bit for bit on grid values, where PyTorch rounds some outputs apart."""
    torch.manual_seed(0)
    norm = torchvision.models.convnext.LayerNorm2d(96, eps=1e-6)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    torch.nn.init.uniform_(norm.bias, -0.2, 0.2)
    x = (torch.randint(-128, 128, (4, 96, 12, 12)) * 0.0371).float()
    initializers = [numpy_helper.from_array(norm.weight.detach().numpy(), "scale"),
                    numpy_helper.from_array(norm.bias.detach().numpy(), "bias")]
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("LayerNormalization", ["t", "scale", "bias"], ["n"], axis=-1, epsilon=1e-6),
             helper.make_node("Transpose", ["n"], ["y"], perm=[0, 3, 1, 2])]
    session = _session(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 96, 12, 12])],
                       initializers, TensorProto.FLOAT)
    expected = session.run(None, {"x": x.numpy()})[0]
    module = getattr(eq.QuantSim(torch.nn.Sequential(norm), x[:1]).model, "0")
    module.param_quantizers["weight"].enabled = False  # the float scale, as in the ORT graph above
    assert KERNELS["LayerNorm2d"].covers(module) and not KERNELS["LayerNormalization"].covers(module)
    emulated = KERNELS["LayerNorm2d"].compute(module, OnnxRuntimeCPU(), (x,), [], None)
    assert np.array_equal(emulated.numpy(), expected)
    with torch.no_grad():
        assert not np.array_equal(norm(x).numpy(), expected)


class _ConvNeXtStage(torch.nn.Module):
    """ConvNeXt's stem and a block, then its downsampling: Conv, LayerNorm2d, CNBlock (depthwise conv, LayerNorm,
    Linear, GELU, Linear, layer scale, residual Add), LayerNorm2d, strided Conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 4, stride=4),
                                        torchvision.models.convnext.LayerNorm2d(32, eps=1e-6))
        self.block = torchvision.models.convnext.CNBlock(32, 1.0, 0.0)
        self.down = torch.nn.Sequential(torchvision.models.convnext.LayerNorm2d(32, eps=1e-6),
                                        torch.nn.Conv2d(32, 16, 2, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.block(self.stem(x)))


def test_convnext_stage_is_identical_to_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _ConvNeXtStage().eval()
    for norm in (model.stem[1], model.down[0]):
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    data = torch.randn(64, 3, 32, 32)
    sim = eq.QuantSim(model, data[:1], config="per_channel")
    sim.calibrate(data.split(32), progress=False)
    sim.export(tmp_path, data[:1])
    plan = sim.emulate("onnxruntime")
    kinds = [op.kind for op in plan.ops]
    assert not plan.skipped and kinds.count("LayerNorm2d") == 2 and kinds.count("Gelu") == 1
    report = verify(tmp_path, sim, torch.randn(64, 3, 32, 32), progress=False)
    assert report.first_difference is None and report.outputs[0].share_identical == 1.0


def _matmul_session(a_shape: list[int], b: torch.Tensor | None, bits: int, weight_scale: torch.Tensor | None,
                    block: int | None = None, b_shape: list[int] | None = None,
                    transposed: bool = False, bias: torch.Tensor | None = None) -> ort.InferenceSession:
    """``y = a @ b``: two float inputs (``b`` None, of shape ``b_shape``; with ``transposed`` fed as its transpose
    and transposed back by a Transpose node), or ``b`` a ``bits``-bit integer initializer behind a DQ per output
    column or per ``block`` of the reduction (which ORT fuses into MatMulNBits), plus ``bias``, in a session with
    `ORT_SESSION_CONFIG`."""
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, a_shape)]
    nodes, initializers = [helper.make_node("MatMul", ["a", "b"], ["y"])], []
    if bias is not None:
        nodes = [helper.make_node("MatMul", ["a", "b"], ["m"]), helper.make_node("Add", ["m", "bias"], ["y"])]
        initializers.append(numpy_helper.from_array(bias.numpy(), "bias"))
    if b is None and transposed:
        held = [*b_shape[:-2], b_shape[-1], b_shape[-2]]
        inputs.append(helper.make_tensor_value_info("b_t", TensorProto.FLOAT, held))
        perm = [*range(len(b_shape) - 2), len(b_shape) - 1, len(b_shape) - 2]
        nodes.insert(0, helper.make_node("Transpose", ["b_t"], ["b"], perm=perm))
    elif b is None:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, b_shape))
    else:
        axis = {"axis": 0, "block_size": block} if block else {"axis": 1}
        nodes.insert(0, helper.make_node("DequantizeLinear", ["b_q", "b_s"], ["b"], **axis))
        initializers += [helper.make_tensor("b_q", TensorProto.INT8 if bits == 8 else TensorProto.INT4, list(b.shape),
                                           b.flatten().tolist()),
                        numpy_helper.from_array(weight_scale.float().numpy(), "b_s")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializers)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in ORT_SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_float_matmul_is_mlas_sgemm_bit_for_bit() -> None:
    """A float MatMul (batched, as attention's q·kᵀ and probs·v) in MLAS's SGEMM order, including its reduction
    slices of 128 to 1024 terms as the column count shrinks, and a single row in MLAS's M = 1 kernels, for a plain
    second operand and for a transposed one (a Transpose ORT fuses into the MatMul, as for q·kᵀ while decoding):
    every output equal to ORT's, where PyTorch's float32 matmul differs on most."""
    runtime, generator = OnnxRuntimeCPU(), torch.Generator().manual_seed(0)
    torch_differs = 0
    for a_shape, b_shape, transposed in [
            ([2, 3, 5, 64], [2, 3, 64, 7], False), ([4, 576], [576, 40], False), ([3, 1024], [1024, 10], False),
            ([6, 600], [600, 65], False), ([1, 9, 32, 64], [1, 9, 64, 32], False),
            ([1, 9, 1, 40], [1, 9, 40, 64], False), ([1, 577], [577, 13], False), ([200, 576], [576, 1], False),
            ([1, 9, 1, 64], [1, 9, 64, 40], True), ([2, 1, 60], [2, 60, 13], True)]:
        a, b = torch.randn(a_shape, generator=generator), torch.randn(b_shape, generator=generator)
        if transposed:  # b held as its transpose, read through a transposed view / a Transpose node
            b = b.transpose(-1, -2).contiguous().transpose(-1, -2)
        session = _matmul_session(a_shape, None, 32, None, b_shape=b_shape, transposed=transposed)
        feed = {"b_t": b.transpose(-1, -2).contiguous().numpy()} if transposed else {"b": b.numpy()}
        expected = torch.from_numpy(session.run(None, {"a": a.numpy(), **feed})[0])
        assert torch.equal(runtime.float_matmul(a, b), expected), (a_shape, b_shape, transposed)
        torch_differs += int(not torch.equal(a @ b, expected))
    assert torch_differs >= 5


@pytest.mark.parametrize(("bits", "block", "with_bias"), [(8, None, False), (4, None, False), (4, 64, False),
                                                         (4, 32, False), (4, 16, False), (8, None, True),
                                                         (4, 64, True)])
def test_float_linear_is_matmulnbits_at_accuracy_level_1(bits: int, block: int | None, with_bias: bool) -> None:
    """ORT fuses an 8- or 4-bit weight's DQ (per output column, or per block of the reduction), its MatMul and a
    bias Add into MatMulNBits; at accuracy level 1 it multiplies the float input by the dequantized weight: 8-bit
    weights in the SGEMM order onto the bias, a single row in the transposed-B M1 kernel, 4-bit ones in one FMA
    chain before the bias, a single row in sqnbitgemm's 16-lane kernel. Identical on 16-bit-grid inputs."""
    runtime, generator = OnnxRuntimeCPU(), torch.Generator().manual_seed(bits + (block or 0))
    for rows, depth, columns in [(64, 576, 192), (3, 1536, 576), (1, 576, 192), (1, 577, 13)]:
        if depth % (block or depth):
            continue
        weight = torch.randint(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), (depth, columns), generator=generator)
        scales = torch.rand(depth // (block or depth), columns, generator=generator) * 0.01 + 1e-3
        bias = torch.randn(columns, generator=generator) if with_bias else None
        x = torch.randint(-32768, 32768, (1, rows, depth), generator=generator).float() * 1e-3
        dequantized = (weight.float() * scales.repeat_interleave(block or depth, dim=0)).t()
        got = runtime.float_linear(x[0], dequantized, bias, bits, as_matmul=True)
        session = _matmul_session([1, rows, depth], weight, bits, scales if block else scales[0], block, bias=bias)
        expected = torch.from_numpy(session.run(None, {"a": x.numpy()})[0])[0]
        assert torch.equal(got, expected), (rows, depth)
        if rows > 1 and bias is None:
            assert not torch.equal(runtime.float_linear(x[0], dequantized, None, 12 - bits, True), expected)


class _SmallCnn(nn.Module):
    """A stem conv with bias and ReLU, a depthwise stride-2 conv, a pointwise conv, a grouped conv, a 1×1 conv of
    the pooled map and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16), nn.ReLU6())
        self.pointwise = nn.Conv2d(16, 160, 1)
        self.grouped = nn.Conv2d(160, 32, 3, padding=1, groups=2)
        self.squeeze = nn.Conv2d(32, 32, 1)  # on the pooled 1×1 map, as a squeeze-excitation block's
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(self.pointwise(self.depthwise(self.stem(x))))
        return self.head(torch.flatten(self.squeeze(F.adaptive_avg_pool2d(x, 1)), 1))


def test_4_bit_convolutions_are_onnxruntimes_float_conv(tmp_path: Path) -> None:
    """4-bit weights under 8-bit activations: ORT has no integer Conv for them and runs a float Conv on the
    dequantized input and weight (im2col and MLAS's SGEMM; a depthwise conv one single-row product per channel),
    and a float Gemm for the head. Every op emulated and every quantized tensor identical to ORT's."""
    torch.manual_seed(0)
    model = _SmallCnn().eval()
    calibration, data = torch.randn(16, 3, 20, 20), torch.randn(32, 3, 20, 20)
    sim = eq.QuantSim(model, calibration[:1], config="per_channel")
    sim.set_format("*", IntegerFormat(4, True), kinds=("param",), module_types=(nn.Conv2d, nn.Linear))
    default, plan = export_then_emulate(sim, calibration, data, tmp_path)
    assert [op.kind for op in plan.ops].count("FloatConv") == 5 and "FloatGemm" in {op.kind for op in plan.ops}
    report = verify(tmp_path, sim, data, progress=False)
    assert report.first_difference is None, report.tensor_table()
    assert default.first_difference is not None


@pytest.mark.parametrize("shape", [(2, 16, 7, 7), (1, 32, 14, 14), (2, 24, 5, 5), (3, 5, 13, 11), (2, 8, 1, 3)])
def test_float_global_average_pool_is_onnxruntimes(shape: tuple[int, ...]) -> None:
    """ORT's float GlobalAveragePool on a 16-bit DQ's output, as in a QDQ model (MlasPool's four-lane kernel);
    PyTorch's mean rounds otherwise on most channels of these shapes."""
    rng = np.random.default_rng(sum(shape))
    levels = rng.integers(-32768, 32768, shape).astype(np.int16)
    scale = np.float32(10 ** rng.uniform(-4, -1))
    session = _session([helper.make_node("DequantizeLinear", ["x", "s"], ["d"]),
                        helper.make_node("GlobalAveragePool", ["d"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.INT16, list(shape))],
                       [numpy_helper.from_array(np.array(scale), "s")], TensorProto.FLOAT, opset=21)
    expected = session.run(None, {"x": levels})[0]
    values = torch.from_numpy(levels.astype(np.float32)) * torch.tensor(scale)
    emulated = OnnxRuntimeCPU().float_global_average(values).numpy()
    assert emulated.shape == expected.shape
    assert np.array_equal(emulated.view(np.int32), expected.view(np.int32))
    assert shape[2] * shape[3] < 8 or not np.array_equal(values.mean((2, 3), keepdim=True).numpy(), expected)


class _HardSwishSqueezeNet(nn.Module):
    """Conv+HardSwish (an htp supergroup: the Conv's output is not quantized), a squeeze-excitation block and a
    global average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.Hardswish())
        self.reduce, self.expand = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.body = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        scale = F.hardsigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        x = self.body(x * scale)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_16_bit_cnn_ops_are_onnxruntimes_float_ops(tmp_path: Path) -> None:
    """W8A16 (``htp``): ORT runs every op in float between DQ and Q, the Conv feeding its supergroup's HardSwish
    without a Q at all. Every op emulated and every quantized tensor identical to ORT's."""
    torch.manual_seed(0)
    model = _HardSwishSqueezeNet().eval()
    calibration, data = torch.randn(16, 3, 20, 20), torch.randn(32, 3, 20, 20)
    sim = eq.QuantSim(model, calibration[:1], config="htp", param_bw=8, output_bw=16)
    default, plan = export_then_emulate(sim, calibration, data, tmp_path)
    kinds = [op.kind for op in plan.ops]
    assert kinds.count("FloatGlobalAveragePool") == 2 and {"HardSwish", "HardSigmoid", "FloatMul"} <= set(kinds)
    assert next(op for op in plan.ops if op.name == "stem.0").output is None  # the supergroup's float Conv
    report = verify(tmp_path, sim, data, progress=False)
    assert report.first_difference is None, report.tensor_table()
    assert default.first_difference is not None


@pytest.mark.parametrize(("size", "kernel", "stride", "padding"), [
    ((8, 8), 2, 2, 0), ((7, 9), 3, 2, 1), ((10, 10), 3, 1, 1), ((14, 14), 3, 3, 0), ((9, 11), 5, 2, 2)])
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("count_include_pad", [False, True])
def test_float_average_pool_is_onnxruntimes(size: tuple[int, int], kernel: int, stride: int, padding: int,
                                            ceil_mode: bool, count_include_pad: bool) -> None:
    """ORT's float AveragePool on a 16-bit DQ's output: row-major window sums; with ``count_include_pad`` a ceil-mode
    window past the padding counts only what lies inside the padded input (its integer kernel counts the kernel)."""
    rng = np.random.default_rng(kernel * 100 + stride * 10 + padding)
    levels = rng.integers(-32768, 32768, (2, 5, *size)).astype(np.int16)
    scale = np.float32(0.00731)
    node = helper.make_node("AveragePool", ["d"], ["y"], kernel_shape=[kernel] * 2, strides=[stride] * 2,
                            pads=[padding] * 4, ceil_mode=int(ceil_mode), count_include_pad=int(count_include_pad))
    session = _session([helper.make_node("DequantizeLinear", ["x", "s"], ["d"]), node],
                       [helper.make_tensor_value_info("x", TensorProto.INT16, list(levels.shape))],
                       [numpy_helper.from_array(np.array(scale), "s")], TensorProto.FLOAT, opset=21)
    expected = session.run(None, {"x": levels})[0]
    grid = Grid(torch.tensor(scale), torch.tensor(-32768.0), 65535, True)
    module = nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    values = torch.from_numpy(levels.astype(np.float32)) * torch.tensor(scale)
    emulated = KERNELS["FloatAveragePool"].compute(module, OnnxRuntimeCPU(), (values,), [grid], None)
    assert emulated.shape == expected.shape
    assert np.array_equal(emulated.numpy().view(np.int32), expected.view(np.int32))


def test_float_softmax_is_onnxruntimes_at_16_bits() -> None:
    """A softmax over the last axis of a 16-bit DQ's output: a float Softmax in ORT (QLinearSoftmax takes 8-bit
    grids only), MLAS's kernel; PyTorch's softmax rounds otherwise on some rows."""
    rng = np.random.default_rng(7)
    levels = rng.integers(-32768, 32768, (4, 3, 37, 50)).astype(np.int16)
    scale = np.float32(0.000417)
    session = _session([helper.make_node("DequantizeLinear", ["x", "s"], ["d"]),
                        helper.make_node("Softmax", ["d"], ["y"], axis=-1)],
                       [helper.make_tensor_value_info("x", TensorProto.INT16, list(levels.shape))],
                       [numpy_helper.from_array(np.array(scale), "s")], TensorProto.FLOAT, opset=21)
    expected = session.run(None, {"x": levels})[0]
    grid = Grid(torch.tensor(scale), torch.tensor(-32768.0), 65535, True)
    values = torch.from_numpy(levels.astype(np.float32)) * torch.tensor(scale)
    emulated = KERNELS["FloatSoftmax"].compute(nn.Softmax(-1), OnnxRuntimeCPU(), (values, -1), [grid], None)
    assert np.array_equal(emulated.numpy().view(np.int32), expected.view(np.int32))
    assert not np.array_equal(torch.softmax(values, -1).numpy(), expected)
