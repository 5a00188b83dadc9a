"""Integer-kernel emulation of a Llama decoder block: ORT's float RMSNorm and masked softmax, and a whole block
tensor for tensor against ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from emulation_parity import export_then_emulate
from onnx import TensorProto, helper
from tiny_llm import FirstDecoderBlock, tiny_llama, tiny_tokenizer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import edgequant as eq
import edgequant.llm as llm
from edgequant.export.verify import verify
from edgequant.quantization.granularity import Lpbq
from edgequant.quantization.number_format import IntegerFormat
from edgequant.sim.emulation import OnnxRuntimeCPU

EPS = 1e-5


def _float_graph(nodes: list, initializers: list, length: int) -> ort.InferenceSession:
    """A float graph of uint8 levels ``x0`` (DQ by ``x_s``, ``x_z``) ending in float ``y``, as ORT_ENABLE_ALL
    optimizes it."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.UINT8, ["r", length])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _grid_inputs(rng: np.random.Generator, rows: int, length: int) -> tuple[np.ndarray, list, torch.Tensor]:
    """Random uint8 levels on a random grid, its DQ initializers and the dequantized float32 values."""
    scale, zero_point = float(10 ** rng.uniform(-3, 0)), int(rng.integers(0, 256))
    levels = rng.integers(0, 256, (rows, length)).astype(np.uint8)
    values = (torch.from_numpy(levels.astype(np.float32)) - zero_point) * torch.tensor(scale, dtype=torch.float32)
    initializers = [helper.make_tensor("x_s", TensorProto.FLOAT, [], [scale]),
                    helper.make_tensor("x_z", TensorProto.UINT8, [], [zero_point])]
    return levels, initializers, values


@pytest.mark.parametrize("length", [576, 64, 100, 12])
def test_rms_norm_is_bit_identical_to_onnxruntime(length: int) -> None:
    """Llama's RMSNorm as exported (Pow, ReduceMean, Add, Sqrt, Div(1, ·), Mul, Mul by the dequantized scale; ORT
    makes x / sqrt of it): every float output of ORT, on 20 random grids, where PyTorch's x·rsqrt differs."""
    rng = np.random.default_rng(length)
    runtime = OnnxRuntimeCPU()
    pytorch_differs = 0
    for _ in range(20):
        levels, initializers, x = _grid_inputs(rng, 500, length)
        weight = torch.from_numpy(rng.integers(-127, 128, length).astype(np.float32)) * float(rng.uniform(0.001, 0.05))
        initializers += [helper.make_tensor("w", TensorProto.FLOAT, [length], weight.tolist()),
                         helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
                         helper.make_tensor("eps", TensorProto.FLOAT, [], [EPS]),
                         helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])]
        nodes = [helper.make_node("DequantizeLinear", ["x0", "x_s", "x_z"], ["x"]),
                 helper.make_node("Pow", ["x", "two"], ["squares"]),
                 helper.make_node("ReduceMean", ["squares"], ["mean"], axes=[-1], keepdims=1),
                 helper.make_node("Add", ["mean", "eps"], ["variance"]),
                 helper.make_node("Sqrt", ["variance"], ["root"]),
                 helper.make_node("Div", ["one", "root"], ["inverse"]),
                 helper.make_node("Mul", ["x", "inverse"], ["normalized"]),
                 helper.make_node("Mul", ["w", "normalized"], ["y"])]
        expected = _float_graph(nodes, initializers, length).run(None, {"x0": levels})[0]
        got = runtime.rms_norm(x, weight, EPS)
        assert np.array_equal(got.numpy(), expected)
        pytorch = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))
        pytorch_differs += int((pytorch.numpy() != expected).sum())
    assert pytorch_differs > 0


@pytest.mark.parametrize("length", [5, 16, 32, 47, 48, 100])
def test_masked_softmax_is_bit_identical_to_onnxruntime(length: int) -> None:
    """Add of a causal mask (0 or float32's lowest) and a float Softmax, as a decoder's attention exports it: every
    float output of ORT (MLAS's exp, its lane sums and 1/sum), on 20 random grids, where torch.softmax differs."""
    rng = np.random.default_rng(length)
    runtime = OnnxRuntimeCPU()
    mask = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)
    pytorch_differs = 0
    for _ in range(20):
        levels, initializers, x = _grid_inputs(rng, length * 8, length)
        initializers.append(helper.make_tensor("mask", TensorProto.FLOAT, [length * 8, length],
                                               mask.repeat(8, 1).flatten().tolist()))
        nodes = [helper.make_node("DequantizeLinear", ["x0", "x_s", "x_z"], ["x"]),
                 helper.make_node("Add", ["x", "mask"], ["masked"]),
                 helper.make_node("Softmax", ["masked"], ["y"], axis=-1)]
        expected = _float_graph(nodes, initializers, length).run(None, {"x0": levels})[0]
        masked = x + mask.repeat(8, 1)
        assert np.array_equal(runtime.float_softmax(masked).numpy(), expected)
        pytorch_differs += int((torch.softmax(masked, -1).numpy() != expected).sum())
    assert pytorch_differs > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_llama_decoder_block_is_identical_to_onnxruntime(tmp_path: Path, seed: int) -> None:
    """A random tiny Llama's first decoder layer (grouped-query attention, rotary products, masked softmax, SiLU
    gate), W8A8 per-channel: every op emulated and every quantized tensor identical to ORT's."""
    torch.manual_seed(seed)
    block = FirstDecoderBlock(llm.prepare_causal_lm(tiny_llama(tiny_tokenizer())), 24).eval()
    calibration, data = torch.randn(16, 24, 64), torch.randn(48, 24, 64)
    sim = eq.QuantSim(block, calibration[:1], config="per_channel")
    default, plan = export_then_emulate(sim, calibration, data, tmp_path)
    assert {"RMSNormalization", "MaskedSoftmax", "MatMul", "Silu"} <= {op.kind for op in plan.ops}
    report = verify(tmp_path, sim, data, progress=False)
    assert report.first_difference is None, report.tensor_table()
    assert default.first_difference is not None  # the default sim's float formulas round some levels otherwise


def test_w8a16_block_is_identical_to_onnxruntime(tmp_path: Path) -> None:
    """At 16-bit activations ORT has no integer kernels: the projections are MatMulNBits on their 8-bit weights
    (accuracy level 1, `ORT_SESSION_CONFIG`, as `verify` runs it), q·kᵀ and probs·v float MatMuls (MLAS SGEMM),
    the norms, softmax, SiLU, adds, products and concats float ops between DQ and Q. Every op emulated and every
    quantized tensor identical to ORT's, where the default sim's float32 sums differ. The same with 4-bit LPBQ
    projections (W4A16: ORT's 4-bit MatMulNBits sums in one FMA chain); a 3-bit one is reported as not emulated."""
    torch.manual_seed(0)
    block = FirstDecoderBlock(llm.prepare_causal_lm(tiny_llama(tiny_tokenizer())), 24).eval()
    calibration, data = torch.randn(16, 24, 64), torch.randn(48, 24, 64)
    sim = eq.QuantSim(block, calibration[:1], config="htp", param_bw=8, output_bw=16)
    default, plan = export_then_emulate(sim, calibration, data, tmp_path)
    assert {"FloatGemm", "FloatMatMul", "FloatAdd", "FloatMul", "RMSNormalization", "MaskedSoftmax"} <= {
        op.kind for op in plan.ops}
    report = verify(tmp_path, sim, data, progress=False)
    assert report.first_difference is None, report.tensor_table()
    assert default.first_difference is not None
    sim.emulate(None)
    sim.set_format("*", IntegerFormat(4, True), kinds=("param",), module_types=(nn.Linear,))
    sim.set_granularity("*", Lpbq(32, decompressed_bw=8), module_types=(nn.Linear,))
    sim.compute_param_encodings()
    sim.export(tmp_path / "w4a16", calibration[:1])
    plan = sim.emulate("onnxruntime")
    assert not plan.skipped, plan.summary()
    report = verify(tmp_path / "w4a16", sim, data, progress=False)
    assert report.first_difference is None, report.tensor_table()
    sim.emulate(None)
    projection = next(name for name, m in sim.model.named_modules() if name.endswith("mlp.down_proj"))
    sim.set_format(projection, IntegerFormat(3, True), kinds=("param",))
    with pytest.warns(UserWarning, match="not emulated"):
        plan = sim.emulate("onnxruntime")
    assert "3-bit weight" in plan.skipped[projection]


def test_w4a8_block_is_identical_to_onnxruntime(tmp_path: Path) -> None:
    """8-bit activations with 4-bit LPBQ projections: ORT has no integer kernel for the 4-bit weights and runs
    each projection as MatMulNBits on the dequantized 8-bit input (the attention's matmuls, adds and products stay
    integer kernels): every op emulated and every quantized tensor identical to ORT's."""
    torch.manual_seed(1)
    block = FirstDecoderBlock(llm.prepare_causal_lm(tiny_llama(tiny_tokenizer())), 24).eval()
    calibration, data = torch.randn(16, 24, 64), torch.randn(48, 24, 64)
    sim = eq.QuantSim(block, calibration[:1], config="per_channel")
    sim.set_format("*", IntegerFormat(4, True), kinds=("param",), module_types=(nn.Linear,))
    sim.set_granularity("*", Lpbq(32, decompressed_bw=8), module_types=(nn.Linear,))
    sim.calibrate(calibration.split(8), progress=False)
    sim.export(tmp_path, calibration[:1])
    plan = sim.emulate("onnxruntime")
    assert not plan.skipped, plan.summary()
    assert {"FloatGemm", "MatMul", "Add"} <= {op.kind for op in plan.ops}
    report = verify(tmp_path, sim, data, progress=False)
    assert report.first_difference is None, report.tensor_table()


@pytest.mark.parametrize("granularity", [Lpbq(64, decompressed_bw=8), None])
def test_w4a16_projections_wider_than_one_sgemm_slice(tmp_path: Path, granularity: Lpbq | None) -> None:
    """4-bit projections over 192 input features (two of MLAS's SGEMM reduction slices): a blocked weight is
    exported as DQ then Transpose, which ORT runs as a float MatMul (the SGEMM, slice by slice), a per-channel one
    as DQ into the MatMul, which it fuses into MatMulNBits (one FMA chain); the emulation tells them apart."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=192, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=3, num_key_value_heads=1, initializer_range=0.2)
    block = FirstDecoderBlock(llm.prepare_causal_lm(LlamaForCausalLM(config).eval()), 24).eval()
    calibration, data = torch.randn(16, 24, 192), torch.randn(16, 24, 192)
    sim = eq.QuantSim(block, calibration[:1], config="htp", param_bw=8, output_bw=16)
    sim.set_format("*", IntegerFormat(4, True), kinds=("param",), module_types=(nn.Linear,))
    if granularity is not None:
        sim.set_granularity("*", granularity, module_types=(nn.Linear,))
    sim.calibrate(calibration.split(8), progress=False)
    sim.export(tmp_path, calibration[:1])
    plan = sim.emulate("onnxruntime")
    assert not plan.skipped, plan.summary()
    report = verify(tmp_path, sim, data, progress=False)
    assert report.first_difference is None, report.tensor_table()



@pytest.mark.parametrize(("input_bits", "output_bits", "bias"), [(8, 16, False), (16, 8, True)])
def test_projection_between_grids_of_different_widths_one_row_at_a_time(tmp_path: Path, input_bits: int,
                                                                         output_bits: int, bias: bool) -> None:
    """A per-channel 8-bit Linear whose input and output grids differ in width (SmolLM2's v_proj: 16-bit input, the
    8-bit KV cache as output; 8 into 16 bits flips more output levels on a float32 rounding), one row per call as
    a decoding step. Without a bias ORT does not fuse the weight's DQ into MatMulNBits: a float MatMul reads the
    dequantized ``[K, N]`` weight, MLAS's plain M = 1 kernel, whose order rounds some outputs otherwise than
    MatMulNBits' transposed one; with a bias Add in between it fuses as usual. Every output identical to ORT's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 128, bias=bias)).eval()
    calibration, data = torch.randn(16, 1, 384), torch.randn(64, 1, 384)
    sim = eq.QuantSim(model, calibration[:1], config="htp", param_bw=8, output_bw=16)
    sim.set_format("*", IntegerFormat(input_bits, False), kinds=("input",))
    sim.set_format("*", IntegerFormat(output_bits, False), kinds=("output",))
    sim.calibrate(calibration.split(8), progress=False)
    sim.export(tmp_path, calibration[:1])
    plan = sim.emulate("onnxruntime")
    assert [op.kind for op in plan.ops] == ["FloatGemm"]
    report = verify(tmp_path, sim, data, batch_size=1, progress=False)  # one row per ORT call: its M = 1 kernels
    assert report.first_difference is None, report.tensor_table()
    if not bias:  # MatMulNBits' order would have differed
        with torch.no_grad():
            rows = sim.quantizer("model_input_quantizers.0")(data).reshape(-1, 384)
            weight = sim.quantizer("0.param_quantizers.weight")(model[0].weight)
        output = sim.quantizer("0.output_quantizers.0")
        products = {path: torch.cat([OnnxRuntimeCPU().float_linear(row[None], weight, None, 8, True, path)
                                     for row in rows]) for path in ("dequantized", "fused")}
        assert not torch.equal(output(products["dequantized"]), output(products["fused"]))


def test_an_8_bit_projection_with_a_bias_into_a_wider_grid_is_reported() -> None:
    """8-bit input and weight, a bias and a 16-bit output: ORT runs MatMulIntegerToFloat and a float Add, whose
    order is not modelled, so the plan says so instead of claiming the float MatMul."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 256)).eval()
    calibration = torch.randn(16, 1, 384)
    sim = eq.QuantSim(model, calibration[:1], config="htp", param_bw=8, output_bw=16)
    sim.set_format("*", IntegerFormat(8, False), kinds=("input",))
    sim.calibrate(calibration.split(8), progress=False)
    with pytest.warns(UserWarning, match="not emulated"):
        plan = sim.emulate("onnxruntime")
    assert "MatMulIntegerToFloat" in plan.skipped["0"]
