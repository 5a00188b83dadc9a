"""Number formats: float16/bfloat16 quantize-dequantize is torch's cast bit for bit, fp8 divides by a calibrated
scale, and a quantizer's format is set from a config or from Python and survives its state_dict."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.config import ConfigError, HardwareConfig
from edgequant.mixed_precision.groups import apply_bitwidths
from edgequant.ptq.batch_norm_fold import fold_batch_norms_to_scale
from edgequant.qat import prepare_qat
from edgequant.quantization import FloatFormat, IntegerFormat, PerBlock, Quantizer


def _hard_values() -> torch.Tensor:
    """Values around float16's edges: overflow, the largest finite, subnormals, underflow, ties, signed zero."""
    return torch.tensor([
        7e4, -7e4, 65504.0, 65520.0, 65519.0, 6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8, 1e-10, -0.0, 1.0 + 2.0**-11,
        1.0 + 3 * 2.0**-11, 3.14159, -2.71828, 1e38, float("inf"), float("-inf"),
    ])


@pytest.mark.parametrize(("name", "cast"), [("float16", torch.Tensor.half), ("bfloat16", torch.Tensor.bfloat16)])
def test_16_bit_qdq_is_the_cast_bit_for_bit(name: str, cast: Callable[[torch.Tensor], torch.Tensor]) -> None:
    x = torch.cat([_hard_values(), torch.randn(1000) * 1e3, torch.randn(1000) * 1e-6])
    expected = cast(x).float()
    assert torch.equal(FloatFormat(name).quantize_dequantize(x), expected)
    quantizer = Quantizer(role="output", float_format=FloatFormat(name))
    assert torch.equal(quantizer(x), expected)  # no calibration needed


def test_float16_overflows_to_inf_and_keeps_subnormals() -> None:
    out = FloatFormat("float16").quantize_dequantize(torch.tensor([65520.0, 65519.0, 2.0**-24, 2.0**-26, 1e-30]))
    assert out[0] == float("inf") and out[1] == 65504.0
    assert out[2] == 2.0**-24 and out[3] == 0.0 and out[4] == 0.0  # smallest subnormal kept, below it flushed


def test_float_qdq_gradient_is_straight_through() -> None:
    x = torch.tensor([1.0001, 7e4, -3.0], requires_grad=True)
    FloatFormat("float16").quantize_dequantize(x).mul(torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0]))


def test_fp8_e4m3_by_hand_with_a_known_scale() -> None:
    fp8 = FloatFormat("float8_e4m3")
    assert fp8.max == 448.0 and fp8.dtype == torch.float8_e4m3fn
    x = torch.tensor([0.3, 1.0, -2.0, 5.0, 0.0173])
    # x / 0.01 = 30 (exact in e4m3), 100 (tie between 96 and 104: even mantissa 96), -200 (-192 or -208: tie ->
    # -192), 500 (beyond 448: clamped), 1.73 (1.75 = 1 + 6/8)
    out = fp8.quantize_dequantize(x, torch.tensor(0.01))
    assert torch.allclose(out, torch.tensor([0.30, 0.96, -1.92, 4.48, 0.0175]), rtol=0, atol=1e-7)


def test_fp8_saturates_beyond_the_scale() -> None:
    out = FloatFormat("float8_e5m2").quantize_dequantize(torch.tensor([1e6, -1e6]), torch.tensor(1.0))
    assert out.tolist() == [57344.0, -57344.0]  # torch's own e5m2 cast would give inf


def test_fp8_calibrates_scale_from_amax() -> None:
    quantizer = Quantizer(role="output", float_format=FloatFormat("float8_e5m2"))
    quantizer.encode_from(torch.tensor([-114.688, 3.0]))
    assert torch.isclose(quantizer.scale, torch.tensor(114.688 / 57344.0))
    assert quantizer.encoding is None  # no integer grid
    assert quantizer(torch.tensor([-114.688]))[0] == pytest.approx(-114.688, rel=1e-6)  # amax maps to the dtype max
    uncalibrated = Quantizer(role="output", float_format=FloatFormat("float8_e4m3"))
    with pytest.raises(RuntimeError, match="has no encoding"):
        uncalibrated(torch.ones(2))


def test_fp8_per_channel_weight_scale() -> None:
    x = torch.randn(4, 3, 8, 8)
    sim = eq.QuantSim(_net(), x[:1], config="per_channel")
    sim.compute_encodings(lambda m: m(x))
    sim.set_format("0", FloatFormat("float8_e4m3"), kinds=("param",))
    quantizer = sim.quantizer("0.param_quantizers.weight")
    weight = sim.model.get_submodule("0").weight.detach()
    amax = weight.abs().amax(dim=(1, 2, 3))
    assert torch.equal(quantizer.scale, amax / 448.0)
    scale = quantizer.scale.reshape(-1, 1, 1, 1)
    expected = (weight / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(quantizer(weight), expected)


def test_formats_are_values_and_bad_names_are_refused() -> None:
    assert FloatFormat("float16") == FloatFormat("float16") and FloatFormat("float16").bitwidth == 16
    assert not FloatFormat("float16").scaled and FloatFormat("float8_e4m3").scaled
    with pytest.raises(ValueError, match="float8_e4m3fnuz.*float16, bfloat16, float8_e4m3, float8_e5m2"):
        FloatFormat("float8_e4m3fnuz")
    quantizer = Quantizer(8, True, role="param")
    assert quantizer.number_format == IntegerFormat(8, True)
    quantizer.number_format = FloatFormat("bfloat16")
    assert quantizer.number_format == FloatFormat("bfloat16") and "bfloat16" in repr(quantizer)
    quantizer.number_format = IntegerFormat(4, True)
    assert quantizer.number_format == IntegerFormat(4, True) and quantizer.float_format is None


def test_state_dict_round_trip_and_old_versions_still_load() -> None:
    for number_format in (FloatFormat("float16"), FloatFormat("float8_e4m3")):
        saved = Quantizer(role="output", float_format=number_format)
        saved.encode_from(torch.tensor([-3.0, 2.0]))
        loaded = Quantizer(role="output")
        loaded.load_state_dict(saved.state_dict())
        assert loaded.number_format == number_format
        x = torch.linspace(-4, 4, 101)
        assert torch.equal(loaded(x), saved(x))
    version_2 = Quantizer(4, True, role="param")
    version_2.set_extra_state(torch.tensor([-2, 1, 0, 4, 1, 0, 0, 0]))  # integer grid, per tensor, no format code
    assert version_2.number_format == IntegerFormat(4, True)
    with pytest.raises(ValueError, match="float format code 9"):
        version_2.set_extra_state(torch.tensor([-3, 1, 0, 8, 1, 0, 0, 9, 0]))


def test_sim_save_and_load_keep_the_formats(tmp_path: Path) -> None:
    x = torch.randn(4, 3, 8, 8)
    sim = eq.QuantSim(_net(), x[:1])
    sim.compute_encodings(lambda m: m(x))
    sim.set_format("0", FloatFormat("float8_e5m2"), kinds=("param",))
    sim.set_format("2", FloatFormat("bfloat16"))
    sim.save(tmp_path / "sim.pt")
    fresh = eq.QuantSim(_net(), x[:1])
    fresh.load(tmp_path / "sim.pt")
    assert fresh.quantizer("0.param_quantizers.weight").number_format == FloatFormat("float8_e5m2")
    assert fresh.quantizer("2.output_quantizers.0").number_format == FloatFormat("bfloat16")
    with torch.no_grad():
        assert torch.equal(fresh.model(x), sim.model(x))


def test_integer_techniques_refuse_a_float_quantizer() -> None:
    quantizer = Quantizer(role="output", owner="fc", float_format=FloatFormat("float16"))
    with pytest.raises(ValueError, match=r"range learning \(LSQ\) needs an integer grid; quantizer 'fc.*float16"):
        quantizer.enable_range_learning()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def _float16_conv_config() -> dict:
    config = copy.deepcopy(HardwareConfig.load("default").raw)
    config.setdefault("op_type", {})["Conv"] = {"supported_kernels": [
        {"activation": {"bitwidth": 16, "dtype": "float"}, "param": {"bitwidth": 16, "dtype": "float"}},
        {"activation": {"bitwidth": 8, "dtype": "int"}, "param": {"bitwidth": 8, "dtype": "int"}},
    ]}
    return config


def test_config_float_kernel_gives_float16_quantizers() -> None:
    x = torch.randn(4, 3, 8, 8)
    sim = eq.QuantSim(_net(), x[:1], config=_float16_conv_config())
    sim.compute_encodings(lambda m: m(x))
    conv_weight = sim.quantizer("0.param_quantizers.weight")
    assert conv_weight.number_format == FloatFormat("float16")
    assert sim.quantizer("0.output_quantizers.0").number_format == FloatFormat("float16")
    assert sim.quantizer("2.param_quantizers.weight").number_format == IntegerFormat(8, True)
    weight = sim.model.get_submodule("0").weight.detach()
    assert torch.equal(weight.half().float(), conv_weight(weight))
    assert "float16" in sim.coverage_summary()
    assert {e.number_format for e in sim.coverage() if e.quantized and e.tensor.startswith("0.")} == {"float16"}


def test_config_float_kernel_of_another_bitwidth_is_one_error_naming_the_key() -> None:
    config = _float16_conv_config()
    config["op_type"]["Conv"]["supported_kernels"][0]["activation"]["bitwidth"] = 8
    with pytest.raises(ConfigError, match=r"op_type\.Conv\.supported_kernels\[0\]\.activation\.bitwidth.*float16"):
        HardwareConfig.from_dict(json.loads(json.dumps(config)))


def test_set_format_from_python() -> None:
    x = torch.randn(4, 3, 8, 8)
    sim = eq.QuantSim(_net(), x[:1])
    sim.compute_encodings(lambda m: m(x))
    names = sim.set_format("2", FloatFormat("float8_e4m3"), kinds=("param",))
    assert "2.param_quantizers.weight" in names and all(name.startswith("2.param_quantizers.") for name in names)
    weight_quantizer = sim.quantizer("2.param_quantizers.weight")
    weight = sim.model.get_submodule("2").weight.detach()
    assert torch.equal(weight_quantizer.scale, weight.abs().max() / 448.0)  # re-encoded from the weight
    sim.set_format("0", FloatFormat("float16"))
    assert sim.quantizer("0.output_quantizers.0").ready
    sim.set_format("0", FloatFormat("float8_e4m3"), kinds=("output",))  # from the calibration's statistics
    with torch.no_grad():
        amax = _net()[0](x).abs().max()
    assert torch.equal(sim.quantizer("0.output_quantizers.0").scale, amax / 448.0)
    with pytest.raises(ValueError, match="per-tensor or per-channel"):
        sim.set_granularity("2", PerBlock(8))


def test_mixed_precision_and_frozen_bn_folding_refuse_float_quantizers() -> None:
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(0)
    sim = eq.QuantSim(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), x[:1])
    sim.compute_encodings(lambda m: m(x))
    sim.set_format("0", FloatFormat("float16"), kinds=("param",))
    with pytest.raises(ValueError, match="mixed precision needs an integer grid; quantizer '0.param_quantizers.weig"):
        apply_bitwidths(sim, {"0.param_quantizers.weight": 4})
    sim.set_format("0", FloatFormat("float8_e4m3"), kinds=("param",))
    sim.freeze_encodings("0")
    weight = sim.model.get_submodule("0").weight.detach().clone()
    with pytest.raises(ValueError, match="batch norm folding into a frozen encoding needs an integer grid"):
        fold_batch_norms_to_scale(sim)
    assert torch.equal(sim.model.get_submodule("0").weight, weight)  # refused before folding anything


def test_range_learning_qat_learns_the_integer_ranges_and_trains_through_float_ones() -> None:
    x = torch.randn(4, 3, 8, 8)
    sim = eq.QuantSim(_net(), x[:1], config=_float16_conv_config())
    sim.compute_encodings(lambda m: m(x))
    setup = prepare_qat(sim, "range_learning")
    assert "2.param_quantizers.weight" in setup.learned
    assert not any(name.startswith("0.") for name in setup.learned)  # float16: no range to learn
    sim.model.train()
    sim.model(x).square().sum().backward()
    conv = sim.model.get_submodule("0")
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0  # straight through the float16 casts


def test_adaround_refuses_a_float_weight_and_emulation_leaves_fp8_layers_to_the_sim() -> None:
    from edgequant.ptq import adaround

    x = torch.randn(4, 3, 8, 8)
    sim = eq.QuantSim(_net(), x[:1])
    sim.compute_encodings(lambda m: m(x))
    sim.set_format("2", FloatFormat("float8_e4m3"))
    with pytest.raises(ValueError, match=r"AdaRound needs an integer grid; quantizer '2\.param_quantizers\.weight'"):
        adaround(sim, [x], num_iterations=1, progress=False)
    plan = sim.emulate("onnxruntime")
    emulated = {op.name for op in plan.ops}
    assert "0" in emulated and "2" not in emulated  # an fp8 scale is not an integer grid
    assert plan.skipped["2"].endswith("has the float format float8_e4m3")
