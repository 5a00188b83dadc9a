"""AIMET config keys that change the simulation: strict_symmetric, unsigned_symmetric, supergroup_pass_list and
model_output, by hand-computed encodings, through config files, in the encodings files and in ONNX Runtime."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import edgequant as eq
from edgequant.config import ConfigError, ConfigWarning, HardwareConfig
from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.export import export_onnx, runtime_cpu
from edgequant.export.encodings_io import TensorEncoding, encodings_document, read_encodings, write_encodings
from edgequant.quantization import Encoding, PerChannel, Quantizer, quantize
from edgequant.sim.quantsim import CoverageEntry

F32 = np.float32
AIMET_CONFIGS = Path(__file__).resolve().parent / "fixtures/aimet-2.42/configs"

SYMMETRIC = {
    "defaults": {
        "ops": {"is_output_quantized": "True", "is_symmetric": "True"},
        "params": {"is_quantized": "True", "is_symmetric": "True"},
    },
    "params": {"bias": {"is_quantized": "False"}},
    "model_input": {"is_input_quantized": "True"},
}
"""Symmetric weights and activations, no supergroups: every quantizer the keys below can change."""


def _config(**defaults: str) -> dict:
    config = copy.deepcopy(SYMMETRIC)
    config["defaults"].update(defaults)
    return config


class Halve(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.identity = nn.Identity()  # a model without children is one leaf, not a traced graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.identity(x) * 0.5


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConvRelu(Conv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def _calibrated(model: nn.Module, data: torch.Tensor, config: dict | str) -> eq.QuantSim:
    sim = eq.QuantSim(model, data[:1], config=config)
    sim.compute_encodings(lambda m: m(data))
    return sim


# ------------------------------------------------------------------------------------- strict_symmetric


def test_strict_symmetric_grid_by_hand() -> None:
    quantizer = Quantizer(8, symmetric=True, strict_symmetric=True)
    encoding = quantizer.encode_from(torch.tensor([-1.0, 0.5]))
    scale = F32(F32(1.0) / F32(127))  # max|x| / 127
    assert encoding.scale.item() == scale and encoding.offset.item() == -127 and encoding.strict_symmetric
    assert encoding.num_steps == 254
    assert (encoding.min.item(), encoding.max.item()) == (F32(-127 * scale), F32(127 * scale))
    steps = torch.arange(-130, 131, dtype=torch.float32)
    x = steps * encoding.scale
    levels = quantize(x, encoding.scale, encoding.offset, 8, strict_symmetric=True) + encoding.offset
    assert torch.equal(levels, steps.clamp(-127, 127))  # -128 is not on the grid
    assert torch.equal(quantizer(x), steps.clamp(-127, 127) * encoding.scale)
    plain = Quantizer(8, symmetric=True)
    plain.encode_from(torch.tensor([-1.0, 0.5]))
    assert plain.offset.item() == -128 and plain(x).min().item() == F32(-128 * scale)


def test_strict_symmetric_from_the_config() -> None:
    data = torch.linspace(-1.0, 0.5, 31)
    sim = _calibrated(Halve(), data, _config(strict_symmetric="True"))
    assert all(q.strict_symmetric and q.strict_grid for q in sim.quantizers().values())
    model_input = sim.quantizer("model_input_quantizers.0")
    assert model_input.scale.item() == F32(F32(1.0) / F32(127)) and model_input.offset.item() == -127
    with torch.no_grad():
        out = sim.model(torch.tensor([-9.0, 9.0]))
    output = sim.quantizer("mul.output_quantizers.0").encoding
    assert output.strict_symmetric and output.offset.item() == -127
    assert torch.equal(out, torch.tensor([-127.0, 127.0]) * output.scale)
    assert HardwareConfig.load(_config(strict_symmetric="True")).param_rule("Conv", "weight").strict_symmetric


def test_strict_symmetric_leaves_asymmetric_quantizers_alone() -> None:
    config = _config(strict_symmetric="True")
    config["defaults"]["ops"]["is_symmetric"] = "False"
    sim = _calibrated(Halve(), torch.linspace(-1.0, 0.5, 31), config)
    encoding = sim.quantizer("model_input_quantizers.0").encoding
    assert not encoding.symmetric and not encoding.strict_symmetric and encoding.num_steps == 255


# ------------------------------------------------------------------------------------- unsigned_symmetric


def test_unsigned_symmetric_grid_by_hand() -> None:
    data = torch.tensor([0.0, 1.0, 2.55])
    unsigned = Quantizer(8, True, unsigned_symmetric=True)
    encoding = unsigned.encode_from(data)
    assert encoding.symmetric and encoding.offset.item() == 0 and encoding.scale.item() == F32(F32(2.55) / 255)
    assert not encoding.signed and encoding.onnx_zero_point.item() == 0
    x = torch.tensor([-1.0, 0.0, 1.0, 2.55, 9.0])
    levels = quantize(x, encoding.scale, encoding.offset, 8)
    assert levels.tolist() == [0.0, 0.0, 100.0, 255.0, 255.0]
    signed = Quantizer(8, True).encode_from(data)  # unsigned_symmetric off: half the grid is never used
    assert signed.offset.item() == -128 and signed.scale.item() == F32(F32(2.55) / 127)
    negative = Quantizer(8, True, unsigned_symmetric=True).encode_from(torch.tensor([-0.01, 2.55]))
    assert negative.offset.item() == -128  # one negative value: the signed grid


def test_unsigned_symmetric_per_channel_and_with_a_histogram_method() -> None:
    weight = torch.tensor([[0.0, 2.55], [-1.27, 0.5]])
    quantizer = Quantizer(8, True, granularity=PerChannel(0), role="param", unsigned_symmetric=True)
    encoding = quantizer.encode_from(weight)
    assert encoding.offset.tolist() == [0.0, -128.0]
    assert encoding.scale.tolist() == [F32(F32(2.55) / 255), F32(F32(1.27) / 127)]
    assert not encoding.signed
    relu_like = torch.rand(4096) * 3.0
    sqnr = Quantizer(8, True, scheme="sqnr", unsigned_symmetric=True)
    sqnr.analyzer.observe(relu_like)
    assert sqnr.compute_encoding().offset.item() == 0


def test_unsigned_symmetric_from_the_config() -> None:
    torch.manual_seed(0)
    model, data = ConvRelu().eval(), torch.randn(8, 2, 6, 6)
    with torch.no_grad():
        relu_max = float(model(data).max())
    on = _calibrated(model, data, _config(unsigned_symmetric="True"))
    off = _calibrated(model, data, _config(unsigned_symmetric="False"))
    relu_on, relu_off = on.quantizer("relu.output_quantizers.0"), off.quantizer("relu.output_quantizers.0")
    assert relu_on.offset.item() == 0 and relu_on.scale.item() == F32(F32(relu_max) / 255)
    assert relu_off.offset.item() == -128 and relu_off.scale.item() == F32(F32(relu_max) / 127)
    assert on.quantizer("conv.output_quantizers.0").offset.item() == -128  # signed data keeps the signed grid
    assert on.quantizer("relu.output_quantizers.0").unsigned_symmetric


def test_strict_and_unsigned_symmetric_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="strict_symmetric and unsigned_symmetric are both"):
        HardwareConfig.from_dict(_config(strict_symmetric="True", unsigned_symmetric="True"))


def test_grid_refresh_in_place_matches_a_fresh_encoding() -> None:
    weight = torch.tensor([[0.0, 2.55, 1.0], [-1.27, 0.5, 0.25]])
    for variants in ({"strict_symmetric": True}, {"unsigned_symmetric": True}):
        fresh = Quantizer(8, True, granularity=PerChannel(0), role="param", **variants)
        refreshed = Quantizer(8, True, granularity=PerChannel(0), role="param", **variants)
        refreshed.encode_from(weight * 3.0)
        refreshed.refresh_from(weight)
        assert refreshed.encoding.equals(fresh.encode_from(weight)), variants


def test_presets_keep_the_signed_grid() -> None:
    torch.manual_seed(0)
    data = torch.rand(4, 2, 6, 6)  # non-negative inputs: an unsigned grid would show on the input quantizer
    for preset in HardwareConfig.preset_names():
        config = HardwareConfig.load(preset)
        assert not (config.strict_symmetric or config.unsigned_symmetric), preset
        sim = _calibrated(ConvRelu().eval(), data, preset)
        for name, quantizer in sim.quantizers().items():
            assert not (quantizer.strict_symmetric or quantizer.unsigned_symmetric), (preset, name)
            if quantizer.symmetric:
                assert quantizer.encoding.signed and quantizer.encoding.num_steps == 255, (preset, name)


def test_flags_survive_save_and_load(tmp_path: Path) -> None:
    data = torch.linspace(-1.0, 0.5, 31)
    sim = _calibrated(Halve(), data, _config(strict_symmetric="True"))
    sim.save(tmp_path / "sim.pt")
    fresh = eq.QuantSim(Halve(), data[:1], config=_config())
    fresh.load(tmp_path / "sim.pt")
    name = "model_input_quantizers.0"
    assert fresh.quantizer(name).encoding.equals(sim.quantizer(name).encoding)
    with torch.no_grad():
        assert torch.equal(fresh.model(data * 9), sim.model(data * 9))
    old = Quantizer(8, True, strict_symmetric=True)
    old.set_extra_state(torch.tensor([1, 0, 8, 1, -1]))  # written before the two flags existed
    assert not (old.strict_symmetric or old.unsigned_symmetric)


# ------------------------------------------------------------------------------------- encodings files


def test_encodings_files_mark_the_grids_as_aimet_does(tmp_path: Path) -> None:
    strict = Encoding.from_range(torch.tensor(-1.0), torch.tensor(0.5), 8, True, strict_symmetric=True)
    unsigned = Encoding.from_range(torch.tensor(0.0), torch.tensor(2.55), 8, True, unsigned_symmetric=True)
    entries = [TensorEncoding("a", strict, False), TensorEncoding("b", unsigned, False)]
    document = encodings_document(entries, "1.0.0")
    a, b = document["activation_encodings"]
    assert (a["is_sym"], a["offset"], b["is_sym"], b["offset"]) == (True, [-127], True, [0])
    for version in ("1.0.0", "0.6.1"):
        path = write_encodings(entries, tmp_path / f"{version}.encodings", version)
        read_a, read_b = read_encodings(path)[1]
        assert read_a.encoding.equals(strict) and read_b.encoding.equals(unsigned), version
    with pytest.raises(ValueError, match="strict symmetric encoding .*2.0.0"):
        encodings_document(entries[:1], "2.0.0")
    (entry,) = encodings_document(entries[1:], "2.0.0")["encodings"]
    assert entry["output_dtype"] == "uint8" and "y_zero_point" not in entry


# ------------------------------------------------------------------------------------- ONNX Runtime


def _ort(path: Path, feed: torch.Tensor, probes: list[str], optimize: bool) -> dict[str, np.ndarray]:
    """The QDQ model's outputs and the ``probes`` tensors; optimized: ORT's integer kernels, as `_run_qdq` of
    test_export runs them; not: every Q/DQ node as written, float ops in between."""
    model = onnx.load(path)
    model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in probes)
    options = ort.SessionOptions()
    if optimize and runtime_cpu.u8s8_saturates():
        model, _ = runtime_cpu.with_unsigned_weights(model)
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": feed.numpy()}), strict=True))


def _dequantized(model: onnx.ModelProto, quantized: str) -> str:
    return next(n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == quantized)


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(i for i in model.graph.initializer if i.name == name)


def _assert_runtime_matches(sim: eq.QuantSim, path: Path, x: torch.Tensor, output_quantizer: str) -> None:
    (output,) = _ort(path, x, [], optimize=True).values()
    with torch.no_grad():
        expected = sim.model(x).numpy()
    lsbs = np.abs(output - expected) / float(sim.quantizer(output_quantizer).scale)
    # ORT requantizes with a float32 multiplier where the sim divides: ties may land one step apart
    assert lsbs.max() <= 1.001 and (output == expected).mean() >= 0.95


def test_strict_symmetric_export_runs_the_same_grid_in_onnx_runtime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, data = Conv().eval(), torch.randn(16, 2, 6, 6) * 0.5
    config = _config(strict_symmetric="True", per_channel_quantization="True")
    sim = _calibrated(model, data, config)
    result = export_onnx(sim, tmp_path, data[:1])
    qdq = onnx.load(result.qdq_model)
    input_encoding = sim.quantizer("model_input_quantizers.0").encoding
    clip = next(n for n in qdq.graph.node if n.op_type == "Clip" and n.input[0] == "input")
    assert onnx.numpy_helper.to_array(_initializer(qdq, clip.input[1])) == F32(input_encoding.min)
    weight = _initializer(qdq, "conv.weight_quantized")
    values = onnx.numpy_helper.to_array(weight)
    assert weight.data_type == TensorProto.INT8 and values.min() >= -127 and values.max() <= 127
    x = torch.randn(8, 2, 6, 6) * 3.0  # far beyond the calibrated range, on both sides
    assert float((x / input_encoding.scale).round().min()) < -128  # a plain int8 Q would produce -128 here
    probes = [_dequantized(qdq, "input_quantized"), _dequantized(qdq, "conv.weight_quantized")]
    ran = _ort(result.qdq_model, x, probes, optimize=False)
    with torch.no_grad():
        quantized_input = sim.quantizer("model_input_quantizers.0")(x)
        quantized_weight = sim.quantizer("conv.param_quantizers.weight")(sim.model.conv.weight)
    assert np.array_equal(ran[probes[0]], quantized_input.numpy())
    assert ran[probes[0]].min() == F32(-127 * input_encoding.scale.item())
    assert np.array_equal(ran[probes[1]], quantized_weight.numpy())
    _assert_runtime_matches(sim, result.qdq_model, x, "conv.output_quantizers.0")


def test_unsigned_symmetric_export_runs_the_same_grid_in_onnx_runtime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, data = ConvRelu().eval(), torch.rand(16, 2, 6, 6)  # non-negative inputs: an unsigned input grid
    with torch.no_grad():
        model.conv.weight[0] = model.conv.weight[0].abs()  # one all-positive output channel
    config = _config(unsigned_symmetric="True", per_channel_quantization="True")
    sim = _calibrated(model, data, config)
    weight_encoding = sim.quantizer("conv.param_quantizers.weight").encoding
    assert weight_encoding.offset.tolist() == [0.0, -128.0, -128.0]
    assert sim.quantizer("relu.output_quantizers.0").offset.item() == 0
    result = export_onnx(sim, tmp_path, data[:1])
    qdq = onnx.load(result.qdq_model)
    weight = _initializer(qdq, "conv.weight_quantized")
    assert weight.data_type == TensorProto.UINT8
    dequantize = next(n for n in qdq.graph.node if n.input[:1] == ["conv.weight_quantized"])
    assert onnx.numpy_helper.to_array(_initializer(qdq, dequantize.input[2])).tolist() == [0, 128, 128]
    x = torch.rand(8, 2, 6, 6) * 3.0 - 0.5  # beyond the calibrated maximum, and below 0
    probes = [_dequantized(qdq, "input_quantized"), _dequantized(qdq, "conv.weight_quantized")]
    ran = _ort(result.qdq_model, x, probes, optimize=False)
    with torch.no_grad():
        quantized_input = sim.quantizer("model_input_quantizers.0")(x)
        quantized_weight = sim.quantizer("conv.param_quantizers.weight")(sim.model.conv.weight)
    scale = sim.quantizer("model_input_quantizers.0").scale.item()
    assert np.array_equal(ran[probes[0]], quantized_input.numpy())
    assert ran[probes[0]].min() == 0 and ran[probes[0]].max() == F32(255 * scale)
    assert np.array_equal(ran[probes[1]], quantized_weight.numpy())
    _assert_runtime_matches(sim, result.qdq_model, x, "relu.output_quantizers.0")


@pytest.mark.parametrize("key", ["strict_symmetric", "unsigned_symmetric"])
def test_digits_cnn_with_the_grid_runs_the_same_in_onnx_runtime(key: str, tmp_path: Path) -> None:
    images, _ = load_digits_tensors("test")
    config = _config(**{key: "True"}, per_channel_quantization="True")
    config["supergroups"] = [{"op_list": ["Conv", "BatchNormalization", "Relu"]}, {"op_list": ["Conv", "Relu"]}]
    sim = _calibrated(load_pretrained("digits_cnn"), images[:64], config)
    offsets = {int(o) for q in sim.quantizers().values() for o in q.offset.flatten()}
    assert offsets == ({-127} if key == "strict_symmetric" else {-128, 0})  # the grids are in use
    result = export_onnx(sim, tmp_path, images[:1])
    _assert_runtime_matches(sim, result.qdq_model, images[:200], "fc.output_quantizers.0")


# ------------------------------------------------------------------------------------- supergroup_pass_list


class LinearByHand(nn.Module):
    """A Linear written as ``x @ w + b`` (the MatmulAdd pattern), then a matmul that no Add follows."""

    def __init__(self) -> None:
        super().__init__()
        self.identity = nn.Identity()  # a model without children is one leaf, not a traced graph
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.bias = nn.Parameter(torch.randn(3))
        self.head = nn.Parameter(torch.randn(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.identity(x) @ self.weight.t() + self.bias) @ self.head


def _coverage(sim: eq.QuantSim) -> dict[str, CoverageEntry]:
    return {entry.tensor: entry for entry in sim.coverage()}


def test_matmul_add_pass_leaves_the_matmul_output_to_the_add() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    config = _config()
    config["op_type"] = {"Add": {"is_input_quantized": "True"}}
    plain = _calibrated(LinearByHand(), x, config)
    assert "matmul.output_quantizers.0" in plain.quantizers()
    assert {"add.input_quantizers.0", "add.input_quantizers.1"} <= set(plain.quantizers())
    config["supergroup_pass_list"] = ["MatmulAdd"]
    fused = _calibrated(LinearByHand(), x, config)
    names = set(fused.quantizers())
    assert "matmul.output_quantizers.0" not in names and not any(n.startswith("add.input") for n in names)
    assert {"add.output_quantizers.0", "matmul_1.output_quantizers.0"} <= names  # no Add after the head
    coverage = _coverage(fused)
    assert coverage["matmul"].reason == "fused with the next op (supergroup pass MatmulAdd)"
    assert coverage["add.inputs"].category == "by design"
    with torch.no_grad():  # the Add's output is the first rounding: the float x @ w + b, quantized once
        add_input = fused.quantizer("model_input_quantizers.0")(x) @ fused.model.weight.t() + fused.model.bias
        linear = fused.quantizer("add.output_quantizers.0")(add_input)
        expected = fused.quantizer("matmul_1.output_quantizers.0")(linear @ fused.model.head)
        assert torch.equal(fused.model(x), expected)


def test_matmul_add_pass_needs_constant_weight_and_rank_one_bias() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.identity = nn.Identity()
            self.bias = nn.Parameter(torch.randn(4))
            self.weight = nn.Parameter(torch.randn(3, 4))
            self.full_bias = nn.Parameter(torch.randn(4, 4))  # rank 2: not a bias

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = self.identity(x)
            return x @ x.transpose(0, 1) + self.bias, x @ self.weight + self.full_bias

    sim = _calibrated(Dynamic(), torch.randn(4, 3), {**_config(), "supergroup_pass_list": ["MatmulAdd"]})
    assert {"matmul.output_quantizers.0", "matmul_1.output_quantizers.0"} <= set(sim.quantizers())


def test_unimplemented_passes_warn_once_each_by_name() -> None:
    with pytest.warns(ConfigWarning) as caught:
        config = HardwareConfig.load(AIMET_CONFIGS / "htp_quantsim_config_v73.json")
    messages = [str(w.message) for w in caught if w.category is ConfigWarning]
    assert len(messages) == 2
    assert "'LayerNormalization' pass" in messages[0] and "'RMSNormalization' pass" in messages[1]
    assert all("does not implement it" in m and "htp_quantsim_config_v73.json" in m for m in messages)
    assert config.supergroup_pass_list == ["LayerNormalization", "RMSNormalization", "MatmulAdd"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HardwareConfig.load(AIMET_CONFIGS / "default_config.json")  # ["MatmulAdd"]: implemented, no warning
    with pytest.warns(ConfigWarning, match='"MatMulAdd" is not a pass edgequant knows .*did you mean "MatmulAdd"'):
        HardwareConfig.load({**_config(), "supergroup_pass_list": ["MatMulAdd", "MatMulAdd"]})


# ------------------------------------------------------------------------------------- model_output


class SoftmaxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(x), dim=-1)


def test_model_output_true_quantizes_an_output_the_op_rule_leaves_float() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    config = _config()
    config["op_type"] = {"Softmax": {"is_output_quantized": "False"}}
    plain = _calibrated(SoftmaxHead(), x, config)
    assert "softmax.output_quantizers.0" not in plain.quantizers()
    assert _coverage(plain)["softmax"].reason == "the config does not quantize Softmax outputs"
    config["model_output"] = {"is_output_quantized": "True"}
    forced = _calibrated(SoftmaxHead(), x, config)
    assert "softmax.output_quantizers.0" in forced.quantizers()
    assert HardwareConfig.load(config).model_output_quantized


def test_model_output_false_leaves_the_last_op_float_and_says_why() -> None:
    torch.manual_seed(0)
    model, x = SoftmaxHead(), torch.randn(16, 4)
    quantized = _calibrated(model, x, _config())
    config = {**_config(), "model_output": {"is_output_quantized": "False"}}
    float_output = _calibrated(model, x, config)
    assert "softmax.output_quantizers.0" not in float_output.quantizers()
    assert "fc.output_quantizers.0" in float_output.quantizers()
    entry = _coverage(float_output)["softmax"]
    assert entry.reason == 'model output, and the config\'s model_output.is_output_quantized is "False"'
    assert entry.category == "by design" and not entry.quantized
    last = quantized.quantizer("softmax.output_quantizers.0")
    with torch.no_grad(), quantized.quantizers_enabled(False, [last]):
        assert torch.equal(float_output.model(x), quantized.model(x))
    assert not torch.equal(float_output.model(x), quantized.model(x))


def test_model_output_is_found_through_views_and_copies_are_named() -> None:
    class Flattened(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).flatten(1)

    class Copied(Flattened):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).transpose(1, 2).contiguous()

    config = {**_config(), "model_output": {"is_output_quantized": "False"}}
    x = torch.randn(2, 2, 6, 6)
    sim = eq.QuantSim(Flattened(), x, config=config)
    assert "conv.output_quantizers.0" not in sim.quantizers()
    with pytest.warns(UserWarning, match=r'model output 0 is not computed by a quantizable op .*"False" does not'):
        copied = eq.QuantSim(Copied(), x, config=config)
    assert "conv.output_quantizers.0" in copied.quantizers()


def test_aimet_model_output_section_stays_a_no_op_when_empty() -> None:
    config = HardwareConfig.load(AIMET_CONFIGS / "default_config.json")
    assert config.raw["model_output"] == {}
    assert not (config.model_output_quantized or config.model_output_float)
    document = json.loads((AIMET_CONFIGS / "default_config.json").read_text())
    document["model_output"] = {"is_output_quantized": "False"}
    assert HardwareConfig.load(document).model_output_float
