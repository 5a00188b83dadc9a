"""Emulation of a Hugging Face BERT: the sim traces it piece by piece (each layer's dense blocks are fx graphs of
their own, its attention an untraced module whose ops are intercepted), and the planner follows tensors between
the pieces; the emulating sim then computes what ONNX Runtime computes, padded sentences included."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper

import edgequant as eq
from edgequant.export.verify import verify
from edgequant.sim.emulation import Grid, OnnxRuntimeCPU, plan_emulation, runtime_model

transformers = pytest.importorskip("transformers")

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _batch(size: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Random sentences of 2..``length`` tokens, padded to ``length`` (the first one unpadded)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, length + 1, (size,), generator=generator)
    lengths[0] = length
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = torch.randint(1, 100, (size, length), generator=generator) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _bert_sim(layers: int) -> tuple[eq.QuantSim, dict[str, torch.Tensor]]:
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    dummy = _batch(2, 8, 0)
    dummy["attention_mask"][1, -2:] = 0  # a padded row: BERT's masked path is the one the sim records
    sim = eq.QuantSim(transformers.BertModel(config).eval(), dummy, config="per_channel")
    calibration = [_batch(16, length, seed) for seed, length in ((1, 12), (2, 7))]
    sim.compute_encodings(lambda model: [model(**batch) for batch in calibration])
    return sim, dummy


@pytest.mark.parametrize("layers", [1, 2])
def test_bert_emulation_is_identical_to_onnxruntime(tmp_path: Path, layers: int) -> None:
    sim, dummy = _bert_sim(layers)
    sim.export(tmp_path, dummy, dynamic_axes={name: {0: "batch", 1: "sequence"} for name in INPUTS})
    data = [_batch(16, length, 100 + length) for length in (5, 9, 13)]
    default = verify(tmp_path, sim, data, batch_size=16, progress=False)
    plan = sim.emulate("onnxruntime")
    # per layer: query/key/value/output/intermediate/output Linear, both attention matmuls, the softmax, the two
    # residual adds and the two LayerNorms; the embeddings' two adds and LayerNorm. The mask add and the 1/sqrt(d)
    # product are float in ONNX Runtime as in the sim and are not candidates. The pooler's Linear reads the first
    # token, a Gather the export leaves after the DQ: a float Gemm in ORT, emulated as that
    assert not plan.skipped and len(plan.ops) == 13 * layers + 4
    assert {op.kind for op in plan.ops} == {"Gemm", "MatMul", "Softmax", "Add", "LayerNormalization", "GatheredGemm"}
    report = verify(tmp_path, sim, data, batch_size=16, progress=False)
    assert report.integer_kernels.get("QLinearMatMul") == 2 * layers
    assert report.integer_kernels.get("QLinearSoftmax") == layers
    assert report.first_difference is None and all(t.share_identical == 1.0 for t in report.tensors)
    assert all(output.share_identical == 1.0 for output in report.outputs)
    if layers == 2:  # without emulation the sim rounds some levels otherwise
        assert default.first_difference is not None


def test_without_an_input_the_planner_follows_the_graphs_only() -> None:
    """Between BERT's graphs no fx graph says where a tensor comes from: the run on the dummy input does."""
    sim, dummy = _bert_sim(1)
    runtime = runtime_model("onnxruntime")
    graphs_only = plan_emulation(sim.model, runtime)
    dense = "encoder.layer.0.attention.output.dense"
    # 5: the pooler's Linear, a float Gemm in ORT, needs no input grid and is planned from the graphs alone
    assert "does not come from a quantizer" in graphs_only.skipped[dense] and len(graphs_only.skipped) == 5
    followed = plan_emulation(sim.model, runtime, (), dummy)
    planned = next(op for op in followed.ops if op.name == dense)
    assert planned.inputs == [sim.quantizer("encoder.layer.0.attention.self.matmul_1.output_quantizers.0")]
    scores = next(op for op in followed.ops if op.name == "encoder.layer.0.attention.self.matmul")
    assert scores.inputs == [sim.quantizer(f"encoder.layer.0.attention.self.{name}.output_quantizers.0")
                             for name in ("query", "key")]


def _softmax_qdq(input_grid: tuple[float, int], output_scale: float, length: int) -> ort.InferenceSession:
    """DQ → Softmax(axis -1) → Q on uint8 grids, which ORT fuses into its QLinearSoftmax."""
    inits = [helper.make_tensor("x_s", TensorProto.FLOAT, [], [input_grid[0]]),
             helper.make_tensor("x_z", TensorProto.UINT8, [], [input_grid[1]]),
             helper.make_tensor("y_s", TensorProto.FLOAT, [], [output_scale]),
             helper.make_tensor("y_z", TensorProto.UINT8, [], [0])]
    nodes = [helper.make_node("DequantizeLinear", ["x", "x_s", "x_z"], ["x_f"]),
             helper.make_node("Softmax", ["x_f"], ["y_f"], axis=-1),
             helper.make_node("QuantizeLinear", ["y_f", "y_s", "y_z"], ["y"])]
    graph = helper.make_graph(nodes, "softmax", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", length])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_attention_softmax_rounds_as_onnxruntime_next_to_ties() -> None:
    """QLinearSoftmax's last step rounds ``e·floor(1/s_y) / sum``; where that lies within a float32 step of a
    half, the float32 rounding of the product or quotient, or the table's shift taken with a log in double, would
    decide otherwise than ORT. Rows of attention-like scores (half of them near the maximum) are screened for such
    outputs, and those rows compared."""
    rng = np.random.default_rng(0)
    runtime, compared = OnnxRuntimeCPU(), 0
    for length, x_scale, output_scale in ((21, 0.1875, 1 / 256), (64, 0.05078125, 1 / 255), (97, 0.21875, 1 / 255)):
        levels = rng.integers(0, 256, (200_000, length))
        levels[:, :length // 2] = levels[:, :length // 2] // 8 + 220
        rows = torch.from_numpy(levels).double()
        exps = torch.exp((rows - rows.amax(-1, keepdim=True)) * x_scale)
        ratio = exps / exps.sum(-1, keepdim=True) * math.floor(1 / np.float32(output_scale))
        near = ((ratio - ratio.floor() - 0.5).abs() < 1e-5).any(-1)
        levels = levels[near.numpy()].astype(np.uint8)
        source, output = Grid(torch.tensor(x_scale), torch.tensor(-7.0), 255, False), Grid(
            torch.tensor(output_scale), torch.tensor(0.0), 255, False)
        expected = _softmax_qdq((x_scale, 7), output_scale, length).run(None, {"x": levels})[0]
        emulated = runtime.softmax(source.values(torch.from_numpy(levels).float() - 7), source, output, -1)
        assert np.array_equal(emulated.numpy(), expected)
        compared += len(levels)
    assert compared > 100


@pytest.mark.parametrize(("width", "with_bias"), [(32, True), (384, True), (64, False)])
def test_layer_norm_is_onnxruntimes_float_kernel(width: int, with_bias: bool) -> None:
    """ORT's float LayerNormalization rounds otherwise than PyTorch's layer_norm in the last bit on a third of its
    outputs (so an element next to a grid boundary quantizes one step apart); the emulation's order is ORT's."""
    rng = np.random.default_rng(width)
    x = (rng.integers(-128, 128, (2000, width)) * np.float32(0.0371)).astype(np.float32)
    scale = (rng.integers(-128, 128, width) * np.float32(0.01)).astype(np.float32)
    bias = rng.normal(0, 0.1, width).astype(np.float32)
    inputs, initializers = ["x", "scale"], [numpy_helper.from_array(scale, "scale")]
    if with_bias:
        inputs, initializers = [*inputs, "bias"], [*initializers, numpy_helper.from_array(bias, "bias")]
    node = helper.make_node("LayerNormalization", inputs, ["y"], axis=-1, epsilon=1e-12)
    inputs_info = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])]
    graph = helper.make_graph([node], "layer_norm", inputs_info,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    bias_tensor = torch.from_numpy(bias) if with_bias else None
    emulated = OnnxRuntimeCPU().layer_norm(torch.from_numpy(x), torch.from_numpy(scale), bias_tensor, 1e-12)
    assert np.array_equal(emulated.numpy(), expected)
    pytorch = torch.nn.functional.layer_norm(torch.from_numpy(x), (width,), torch.from_numpy(scale), bias_tensor, 1e-12)
    assert not np.array_equal(pytorch.numpy(), expected)


class _ChannelsLastBlock(torch.nn.Module):
    """ConvNeXt's block order: a depthwise conv, a permute module the sim knows nothing of, then LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.permute = torchvision.ops.misc.Permute([0, 2, 3, 1])
        self.norm = torch.nn.LayerNorm(16, eps=1e-6)
        self.head = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.permute(self.conv(x))))


def test_layer_norm_reads_values_whatever_grid_they_come_from(tmp_path: Path) -> None:
    """A float op between DQ and Q needs no input grid: the LayerNorm after an unknown module is emulated too."""
    torch.manual_seed(0)
    model = _ChannelsLastBlock().eval()
    torch.nn.init.uniform_(model.norm.weight, 0.5, 1.5)
    data = torch.randn(64, 16, 8, 8)
    sim = eq.QuantSim(model, data[:1], config="per_channel")
    sim.calibrate(data.split(32), progress=False)
    sim.export(tmp_path, data[:1])
    plan = sim.emulate("onnxruntime")
    assert not plan.skipped and "norm" in {op.name for op in plan.ops}
    report = verify(tmp_path, sim, torch.randn(64, 16, 8, 8), progress=False)
    assert report.first_difference is None and report.outputs[0].share_identical == 1.0


class _SharedLayer(torch.nn.Module):
    """An untraceable forward (it branches on a value) that calls one Linear on the outputs of two others."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.shared = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:
            return self.shared(self.first(x)) * 2.0 + self.shared(self.second(x))
        return x


def test_a_layer_called_on_inputs_of_several_quantizers_is_not_emulated() -> None:
    """One emulated forward serves every call of a module: it must read one input grid in all of them."""
    torch.manual_seed(0)
    data = torch.randn(32, 8)
    sim = eq.QuantSim(_SharedLayer().eval(), data[:1], config="per_channel")
    sim.calibrate([data], progress=False)
    plan = sim.emulate("onnxruntime")
    assert {op.name for op in plan.ops} >= {"first", "second"}
    assert "called more than once" in plan.skipped["shared"]
