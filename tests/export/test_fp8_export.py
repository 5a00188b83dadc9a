"""Export of fp8 tensors (QuantizeLinear → DequantizeLinear to float8, weights stored as float8 initializers) and of
bfloat16 tensors (Cast → Cast): ONNX Runtime computes the sim's values bit for bit; AIMET's 2.0.0 fp8 entries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx_models import branching_cnn, save
from torch import nn

import edgequant as eq
from edgequant.export import export_onnx, read_encodings
from edgequant.export.encodings_io import EncodingsFileError
from edgequant.quantization import FloatFormat, PerChannel

FP8_TYPES = {"float8_e4m3": TensorProto.FLOAT8E4M3FN, "float8_e5m2": TensorProto.FLOAT8E5M2}
UNFUSED_BIAS = ["WeightBiasQuantization"]
"""ORT's optimizer rounds a float Conv/Gemm bias after DequantizeLinear inputs to int32 on s_x·s_w (of any type,
float8 too); the sim keeps an fp8 layer's bias in float, so the comparison runs without that rewrite."""


class ConvReluLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


def _inputs() -> torch.Tensor:
    return torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _fp8_sim(format_name: str, per_channel: bool) -> eq.QuantSim:
    torch.manual_seed(0)
    inputs = _inputs()
    sim = eq.QuantSim(ConvReluLinear().eval(), inputs[:1])
    if per_channel:
        sim.set_granularity("*", PerChannel())
    sim.set_format("*", FloatFormat(format_name), kinds=("output", "param"))
    sim.compute_encodings(lambda m: m(inputs[:32]))
    return sim


def _run(path: Path, inputs: torch.Tensor, disabled_optimizers: list[str] | None = None) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"],
                                   disabled_optimizers=disabled_optimizers or [])
    (output,) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    return output


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("format_name", ["float8_e4m3", "float8_e5m2"])
def test_fp8_qdq_model_runs_in_ort_bit_for_bit(format_name: str, per_channel: bool, tmp_path: Path) -> None:
    sim = _fp8_sim(format_name, per_channel)
    inputs = _inputs()
    result = export_onnx(sim, tmp_path, inputs[:1], encoding_version="2.0.0")
    qdq = onnx.load(result.qdq_model)
    assert result.opset == 21
    initializers = {init.name: init for init in qdq.graph.initializer}
    for layer in ("conv", "fc"):  # the weight is a float8 initializer holding the sim's own rounding
        quantizer = sim.quantizers()[f"{layer}.param_quantizers.weight"]
        stored = initializers[f"{layer}.weight_quantized"]
        assert stored.data_type == FP8_TYPES[format_name] and f"{layer}.weight" not in initializers
        weight = sim.model.get_submodule(layer).weight.detach()
        scale = quantizer.granularity.group_scale(quantizer.scale, weight.dim())
        expected = (weight / scale).clamp(-quantizer.float_format.max, quantizer.float_format.max)
        expected = expected.to(quantizer.float_format.dtype).float().numpy()
        np.testing.assert_array_equal(numpy_helper.to_array(stored).astype(np.float32), expected)
        assert np.abs(expected).max() == quantizer.float_format.max
    quantize_nodes = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    fp8_outputs = {a.i for n in quantize_nodes for a in n.attribute if a.name == "output_dtype"}
    assert len(quantize_nodes) == 4 and fp8_outputs == {FP8_TYPES[format_name]}  # + the int8 model input
    weight_axes = {a.i for n in qdq.graph.node if n.input[0].endswith("weight_quantized") for a in n.attribute}
    assert weight_axes == ({0} if per_channel else set())

    with torch.no_grad():
        expected = sim.model(inputs).numpy()
    np.testing.assert_array_equal(_run(result.qdq_model, inputs, UNFUSED_BIAS), expected)
    assert not np.array_equal(_float_outputs(sim, inputs), expected)  # fp8 rounding is not a no-op here


def _float_outputs(sim: eq.QuantSim, inputs: torch.Tensor) -> np.ndarray:
    enabled = {name: q.enabled for name, q in sim.quantizers().items()}
    for quantizer in sim.quantizers().values():
        quantizer.enabled = False
    try:
        with torch.no_grad():
            return sim.model(inputs).numpy()
    finally:
        for name, quantizer in sim.quantizers().items():
            quantizer.enabled = enabled[name]


def test_relu_before_fp8_quantize_linear_survives_ort_optimizations(tmp_path: Path) -> None:
    """ORT removes a Relu in front of a QuantizeLinear whose zero point is not int8/uint8 (as if float8's zero were
    the bottom of the range); the export states the float8 type by output_dtype, so negative inputs stay zero."""
    sim = _fp8_sim("float8_e4m3", per_channel=False)
    result = export_onnx(sim, tmp_path, _inputs()[:1], encoding_version="2.0.0")
    with torch.no_grad():
        expected = sim.model(_inputs()).numpy()
    np.testing.assert_array_equal(_run(result.qdq_model, _inputs(), UNFUSED_BIAS), expected)
    relu_quantize = next(n for n in onnx.load(result.qdq_model).graph.node
                         if n.op_type == "QuantizeLinear" and n.input[0] == "/relu/Relu_output_0")
    assert len(relu_quantize.input) == 2


def _identity_fp8_sim(format_name: str) -> eq.QuantSim:
    """An identity Linear (exact in float32) whose output is quantized to ``format_name`` with scale 0.5."""
    layer = nn.Linear(6, 6)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(6))
        layer.bias.zero_()
    amax = FloatFormat(format_name).max / 2
    calibration = torch.tensor([[amax, -amax, 1.0, 0.0, 3.0, -5.0]])
    sim = eq.QuantSim(nn.Sequential(layer), calibration)
    sim.quantizers()["model_input_quantizers.0"].enabled = False
    sim.quantizers()["0.param_quantizers.weight"].enabled = False
    sim.set_format("*", FloatFormat(format_name), kinds=("output",))
    sim.compute_encodings(lambda m: m(calibration))
    assert float(sim.quantizers()["0.output_quantizers.0"].scale) == 0.5
    return sim


def _sim_ort_and_reference(sim: eq.QuantSim, x: torch.Tensor, tmp_path: Path) -> tuple[np.ndarray, ...]:
    result = export_onnx(sim, tmp_path, x[:1], encoding_version="2.0.0")
    with torch.no_grad():
        simulated = sim.model(x).numpy()
    (reference,) = ReferenceEvaluator(str(result.qdq_model)).run(None, {"input": x.numpy()})
    return simulated, _run(result.qdq_model, x), reference


def test_fp8_hand_computed_values_saturate_beyond_the_calibrated_range(tmp_path: Path) -> None:
    # x / 0.5 on e4m3: 0.6 -> 0.625 (step 1/16 in [0.5, 1)); -2.2 -> -2.25 (step 1/4); 200 is halfway between 192
    # and 208 and goes to the even mantissa, 192; 600 and -2000 are beyond the calibrated amax (448 * 0.5) and
    # saturate; 0.02 -> 0.01953125 (step 2^-9 just above the smallest normal 2^-6)
    x = torch.tensor([[0.3, -1.1, 100.0, 300.0, -1000.0, 0.01]])
    expected = np.array([[0.3125, -1.125, 96.0, 224.0, -224.0, 0.009765625]], np.float32)
    for computed in _sim_ort_and_reference(_identity_fp8_sim("float8_e4m3"), x, tmp_path):
        np.testing.assert_array_equal(computed, expected)


@pytest.mark.parametrize("format_name", ["float8_e4m3", "float8_e5m2"])
def test_fp8_rounding_of_every_value_and_midpoint_as_ort(format_name: str, tmp_path: Path) -> None:
    """Every finite fp8 value, the midpoints between neighbours (ties to even) and the floats either side of them,
    subnormals and values beyond the range included: the sim, ORT and ONNX's reference agree bit for bit."""
    dtype = FloatFormat(format_name).dtype
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = grid[grid.isfinite()].unique()
    midpoints = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, midpoints, midpoints.nextafter(grid[1:]), midpoints.nextafter(grid[:-1]),
                        grid * 1.5, torch.tensor([1e30, -1e30])])
    x = torch.nn.functional.pad(values * 0.5, (0, -len(values) % 6)).reshape(-1, 6)
    simulated, in_ort, reference = _sim_ort_and_reference(_identity_fp8_sim(format_name), x, tmp_path)
    np.testing.assert_array_equal(in_ort, simulated)
    np.testing.assert_array_equal(reference, simulated)
    assert (simulated != x.numpy()).sum() > len(grid)  # most midpoints and beyond-range values change


def test_fp8_needs_opset_21(tmp_path: Path) -> None:
    sim = _fp8_sim("float8_e5m2", per_channel=False)
    with pytest.raises(ValueError, match=r"quantizer '\S+' is float8_e5m2: .* from opset 21; pass opset=21"):
        export_onnx(sim, tmp_path, _inputs()[:1], opset=19)


def test_fp8_encodings_entries_as_aimet_writes_them(tmp_path: Path) -> None:
    sim = _fp8_sim("float8_e4m3", per_channel=True)
    result = export_onnx(sim, tmp_path / "v2", _inputs()[:1], encoding_version="2.0.0")
    entries = {e["name"]: e for e in json.loads(result.encodings.read_text())["encodings"]}
    conv_scale = sim.quantizers()["conv.param_quantizers.weight"].scale
    assert entries["conv.weight"] == {"name": "conv.weight", "output_dtype": "float8e4m3fn",
                                      "y_scale": conv_scale.tolist(), "axis": 0}
    relu_scale = float(sim.quantizers()["relu.output_quantizers.0"].scale)
    assert entries["/relu/Relu_output_0"] == {"name": "/relu/Relu_output_0", "output_dtype": "float8e4m3fn",
                                              "y_scale": relu_scale}
    assert entries["input"]["output_dtype"] == "uint8"  # the integer model input, as before

    with pytest.raises(EncodingsFileError, match=r'"conv.weight": output_dtype "float8e4m3fn" \(fp8\) is written but'):
        read_encodings(result.encodings)

    with pytest.warns(UserWarning, match="encodings version 1.0.0 has no form for bfloat16 or fp8 tensors; left out "
                                         "of the file: conv.weight, /relu/Relu_output_0, .*fc.weight"):
        version_1 = export_onnx(sim, tmp_path / "v1", _inputs()[:1])
    document = json.loads(version_1.encodings.read_text())
    assert [e["name"] for e in document["activation_encodings"] + document["param_encodings"]] == ["input"]


def test_bfloat16_casts_run_in_ort_bit_for_bit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    inputs = _inputs()
    sim = eq.QuantSim(ConvReluLinear().eval(), inputs[:1])
    sim.set_format("*", FloatFormat("bfloat16"))
    sim.compute_encodings(lambda m: m(inputs[:32]))
    with pytest.warns(UserWarning, match="no form for bfloat16"):
        result = export_onnx(sim, tmp_path, inputs[:1])
    qdq = onnx.load(result.qdq_model)
    narrowing = [a.i for n in qdq.graph.node if n.op_type == "Cast" for a in n.attribute if a.i != TensorProto.FLOAT]
    assert narrowing and set(narrowing) == {TensorProto.BFLOAT16}
    with torch.no_grad():
        expected = sim.model(inputs).numpy()
    np.testing.assert_array_equal(_run(result.qdq_model, inputs), expected)
    assert not np.array_equal(_float_outputs(sim, inputs), expected)


def test_fp8_of_an_onnx_model_below_opset_21_is_refused_with_the_fix(tmp_path: Path) -> None:
    """The original graph keeps its opset: fp8 Q/DQ need 21 (tests/export/test_original_graph.py exports them)."""
    sim = eq.QuantSim.from_onnx(save(branching_cnn(), tmp_path / "model.onnx"))
    sim.set_format("conv_a", FloatFormat("float8_e4m3"), kinds=("param",))
    sim.compute_encodings(lambda m: m(torch.randn(4, 3, 8, 8)))
    with pytest.raises(ValueError, match="quantizer 'conv_a.param_quantizers.weight' is float8_e4m3.*convert_version"):
        sim.export(tmp_path / "out")
