"""What the held-out architectures of the emulation table needed (a vision transformer: its class token, the
shape arithmetic of its attention, the head on the class token): the emulating sim computes what ONNX Runtime
computes there too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper

import edgequant as eq
from edgequant.export import export_onnx
from edgequant.export.verify import verify
from edgequant.sim.emulation import OnnxRuntimeCPU
from edgequant.sim.emulation.arithmetic import mlas_sgemm


def _float_gemm_session(weight: np.ndarray, weight_scale: np.ndarray, bias: np.ndarray) -> ort.InferenceSession:
    """Gemm(x, DQ(weight), bias, transB = 1) on a float input, as ORT runs a Linear whose input a Gather took
    after its DQ; one thread, so that MLAS's slices are those of the whole product."""
    initializers = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(weight_scale, "w_s"),
                    numpy_helper.from_array(np.zeros(len(weight_scale), np.int8), "w_z"),
                    numpy_helper.from_array(bias, "b")]
    nodes = [helper.make_node("DequantizeLinear", ["w", "w_s", "w_z"], ["w_f"], axis=0),
             helper.make_node("Gemm", ["x", "w_f", "b"], ["y"], transB=1)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", weight.shape[1]])]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("rows", "depth", "columns", "slices"), [(16, 64, 1000, 1), (5, 300, 10, 1),
                                                                   (8, 200, 200, 2)])
def test_float_gemm_is_mlas_sgemm_onto_the_bias_bit_for_bit(rows: int, depth: int, columns: int, slices: int) -> None:
    """The bias first, then each slice's FMA chain added (one slice; a long one for few columns; 128 + 72 terms):
    correctly rounded, or with two slices summed first and the bias added last, some float32 outputs differ."""
    rng = np.random.default_rng(depth)
    weight = rng.integers(-127, 128, (columns, depth)).astype(np.int8)
    weight_scale = (rng.random(columns) * 0.01 + 1e-3).astype(np.float32)
    bias = rng.normal(size=columns).astype(np.float32)
    x = rng.normal(size=(rows, depth)).astype(np.float32)
    expected = _float_gemm_session(weight, weight_scale, bias).run(None, {"x": x})[0]
    dequantized = torch.from_numpy(weight).float() * torch.from_numpy(weight_scale)[:, None]
    got = OnnxRuntimeCPU().float_linear(torch.from_numpy(x), dequantized, torch.from_numpy(bias), 8, as_matmul=False)
    assert np.array_equal(got.numpy(), expected)
    exact = (torch.from_numpy(x).double() @ dequantized.double().t() + torch.from_numpy(bias).double()).float()
    assert not np.array_equal(exact.numpy(), expected)  # the order matters
    bias_last = mlas_sgemm(torch.from_numpy(x), dequantized.t()) + torch.from_numpy(bias)
    assert np.array_equal(bias_last.numpy(), expected) == (slices == 1)
    single_row = OnnxRuntimeCPU().float_linear(torch.from_numpy(x[:1]), dequantized, torch.from_numpy(bias), 8,
                                               as_matmul=False)  # MLAS's M1 kernel, then the bias
    session = _float_gemm_session(weight, weight_scale, bias)
    assert np.array_equal(single_row.numpy(), session.run(None, {"x": x[:1]})[0])


class _ClassTokenNet(torch.nn.Module):
    """A vision transformer's pieces: a class token before the embedded patches, attention scaled by a number the
    graph computes from the input's shape, a LayerNorm and a head on the class token (``x[:, 0]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Linear(12, 32), torch.nn.Linear(32, 10)
        self.token = torch.nn.Parameter(torch.randn(1, 1, 32))
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.token.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
        scores = tokens @ tokens.transpose(1, 2) * tokens.shape[-1] ** -0.5
        return self.head(self.norm(scores.softmax(-1) @ tokens + tokens)[:, 0])


def test_class_token_net_is_identical_to_onnxruntime(tmp_path: Path) -> None:
    """The concat with the (float) class token and the products by shape arithmetic are float in ORT as in the sim:
    not candidates; the head on the class token is ORT's float Gemm, emulated."""
    torch.manual_seed(0)
    calibration = torch.randn(32, 7, 12)
    sim = eq.QuantSim(_ClassTokenNet().eval(), calibration[:1], config="per_channel")
    sim.calibrate(calibration.split(16), progress=False)
    export_onnx(sim, tmp_path, calibration[:1])
    plan = sim.emulate("onnxruntime")
    assert not plan.skipped
    assert sorted(op.kind for op in plan.ops) == ["Add", "GatheredGemm", "Gemm", "LayerNormalization", "MatMul",
                                                  "MatMul", "Softmax"]
    report = verify(tmp_path, sim, torch.randn(256, 7, 12), batch_size=16, progress=False)
    assert report.float_kernels.get("Gemm") == 1  # the head; the concat and the products are float too
    assert report.outputs[0].share_identical == 1.0 and report.first_difference is None


def _float_mixing(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A function fx does not trace into (as torchvision's ``shifted_window_attention``): float in the sim and in
    ORT. Its own float ops are not emulated (a product here, the same in both; Swin's attention is not)."""
    return x * weight


torch.fx.wrap("_float_mixing")


class _WindowNet(torch.nn.Module):
    """Swin's pieces: channels-last blocks between ``Permute`` modules, a residual add of a wrapped function's
    float output through ``StochasticDepth``, a global average pool after the permute back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 2, stride=2)
        self.to_last, self.to_first = torchvision.ops.Permute([0, 2, 3, 1]), torchvision.ops.Permute([0, 3, 1, 2])
        self.norm, self.mixing = torch.nn.LayerNorm(16), torch.nn.Parameter(torch.randn(16))
        self.drop = torchvision.ops.StochasticDepth(0.1, "row")
        self.pool, self.head = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_last(self.conv(x))
        x = x + self.drop(_float_mixing(self.norm(x), self.mixing))
        return self.head(torch.flatten(self.pool(self.to_first(x)), 1))


def test_window_net_is_identical_to_onnxruntime(tmp_path: Path) -> None:
    """The add of the wrapped function's float output is float in ORT (no DQ on it), but what the function
    computes is not modelled: reported as not emulated, with why; the pool reads the add's grid through the
    permute (ORT moves the Transpose past it: QLinearGlobalAveragePool), emulated."""
    torch.manual_seed(0)
    calibration = torch.randn(32, 3, 16, 16)
    sim = eq.QuantSim(_WindowNet().eval(), calibration[:1], config="per_channel")
    sim.calibrate(calibration.split(16), progress=False)
    export_onnx(sim, tmp_path, calibration[:1])
    with pytest.warns(UserWarning, match="4 of 5 ops emulated"):
        plan = sim.emulate("onnxruntime")
    assert plan.skipped == {"add": "input 1 is the float output of _float_mixing, which the sim does not quantize: "
                                   "the runtime computes it with its own float kernels (not modelled)"}
    assert sorted(op.kind for op in plan.ops) == ["Conv", "Gemm", "GlobalAveragePool", "LayerNormalization"]
    report = verify(tmp_path, sim, torch.randn(256, 3, 16, 16), batch_size=16, progress=False)
    assert report.integer_kernels.get("QLinearGlobalAveragePool") == 1 and report.float_kernels.get("Add") == 1
    assert report.outputs[0].share_identical == 1.0 and report.first_difference is None


class _UntracedAttentionNet(torch.nn.Module):
    """PyTorch's ``nn.MultiheadAttention`` with extra key/value rows (``add_bias_kv``: the sim leaves it in float) in
    a model fx cannot trace whole."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Linear(12, 32), torch.nn.Linear(32, 10)
        self.attention = torch.nn.MultiheadAttention(32, 4, batch_first=True, add_bias_kv=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if x.sum() > -1e9:  # data-dependent control flow: traced module by module
            x = x + self.attention(x, x, x, need_weights=False)[0]
        return self.head(x)


def test_an_add_of_multihead_attentions_float_output_is_reported_not_emulated() -> None:
    """ORT computes the attention with its own float kernels: the residual add after it cannot be emulated
    exactly, and the plan says so instead of counting it as a float Add of a constant."""
    torch.manual_seed(0)
    calibration = torch.randn(16, 7, 12)
    sim = eq.QuantSim(_UntracedAttentionNet().eval(), calibration[:1], config="per_channel")
    sim.calibrate([calibration], progress=False)
    with pytest.warns(UserWarning, match="2 of 3 ops emulated"):
        plan = sim.emulate("onnxruntime")
    assert [op.kind for op in plan.ops] == ["Gemm", "Gemm"]
    assert list(plan.skipped.values()) == ["input 1 is the float output of attention, which the sim does not "
                                           "quantize: the runtime computes it with its own float kernels (not "
                                           "modelled)"]
