"""Tests for edgequant.config: AIMET config compatibility, rule resolution, presets and error messages."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from edgequant import QuantSim
from edgequant.config import ConfigError, HardwareConfig, TensorRule
from edgequant.quantization import PerChannel, PerTensor

AIMET_CONFIGS = Path(__file__).resolve().parent / "fixtures/aimet-2.42/configs"

MINIMAL = {
    "defaults": {
        "ops": {"is_output_quantized": "True"},
        "params": {"is_quantized": "True", "is_symmetric": "True"},
        "per_channel_quantization": "False",
    },
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {"Conv": {"per_channel_quantization": "True"}},
    "supergroups": [{"op_list": ["Conv", "Relu"]}],
    "model_input": {"is_input_quantized": "True"},
    "model_output": {},
}


def _minimal() -> dict:
    return copy.deepcopy(MINIMAL)


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        HardwareConfig.from_dict(data, source="my_cfg.json")
    msg = str(info.value)
    assert "my_cfg.json" in msg
    return msg


# ---------------------------------------------------------------------------------------------- AIMET files


@pytest.mark.parametrize(
    "name", ["default_config.json", "default_config_per_channel.json", "htp_quantsim_config_v73.json"]
)
def test_aimet_configs_load(name: str) -> None:
    path = AIMET_CONFIGS / name
    cfg = HardwareConfig.load(path)
    assert cfg.source == str(path)
    assert cfg.raw == json.loads(path.read_text())
    assert cfg.model_input_quantized is True
    assert cfg.model_output_quantized is False
    assert cfg.strict_symmetric is False
    assert ("Conv", "Relu") in cfg.supergroups
    assert "MatmulAdd" in cfg.supergroup_pass_list
    # Also loadable from a str path and from the parsed dict.
    assert HardwareConfig.load(str(path)).supergroups == cfg.supergroups
    assert HardwareConfig.load(json.loads(path.read_text())).supergroups == cfg.supergroups


def test_aimet_default_rules() -> None:
    cfg = HardwareConfig.load(AIMET_CONFIGS / "default_config.json")
    assert cfg.param_rule("Conv", "weight") == TensorRule(True, True, PerTensor(), None)
    assert cfg.param_rule("Conv", "bias").quantized is False
    assert cfg.param_rule("Gemm", "bias").quantized is False
    assert cfg.param_rule("BatchNormalization", "running_mean").quantized is False
    assert cfg.param_rule("BatchNormalization", "running_var").quantized is False
    assert cfg.param_rule("BatchNormalization", "weight").quantized is True
    assert cfg.output_rule("Conv") == TensorRule(True, False, PerTensor(), None)
    assert cfg.output_rule("Cast").quantized is False
    assert cfg.input_rule("Conv").quantized is False
    assert cfg.unsigned_symmetric is False
    assert len(cfg.supergroups) == 5


def test_aimet_per_channel_rules() -> None:
    cfg = HardwareConfig.load(AIMET_CONFIGS / "default_config_per_channel.json")
    for op in ("Conv", "ConvTranspose", "Gemm", "MatMul", "PRelu"):
        assert cfg.param_rule(op, "weight").granularity == PerChannel(), op
    assert cfg.param_rule("LayerNormalization", "weight").granularity == PerTensor()
    assert cfg.output_rule("Conv").granularity == PerTensor()


def test_aimet_htp_v73_rules() -> None:
    cfg = HardwareConfig.load(AIMET_CONFIGS / "htp_quantsim_config_v73.json")
    assert cfg.raw["defaults"]["hw_version"] == "V73"
    assert cfg.param_rule("Conv", "weight").granularity == PerChannel()
    assert cfg.param_rule("Add", "weight").granularity == PerTensor()
    assert cfg.param_rule("Conv", "bias").quantized is False
    assert cfg.param_rule("GroupNormalization", "bias").quantized is True  # op params beat global params
    ln = cfg.param_rule("LayerNormalization", "weight")
    assert (ln.quantized, ln.symmetric) == (True, False)
    assert cfg.param_rule("LayerNormalization", "bias").quantized is False
    softmax = cfg.output_rule("Softmax")
    assert (softmax.min_constraint, softmax.max_constraint) == (0.0, 1.0)
    assert softmax.quantized is True and softmax.bitwidth is None
    relu = cfg.output_rule("Relu")
    assert (relu.min_constraint, relu.max_constraint) == (0.0, None)
    assert (cfg.output_rule("Tanh").min_constraint, cfg.output_rule("Tanh").max_constraint) == (-1.0, 1.0)
    assert cfg.input_rule("Softmax").min_constraint is None
    assert cfg.output_rule("Gather").quantized is False
    assert cfg.output_rule("Conv").min_constraint is None
    assert ("Conv", "BatchNormalization", "HardSwish") in cfg.supergroups
    assert cfg.supergroup_pass_list == ["LayerNormalization", "RMSNormalization", "MatmulAdd"]


# ---------------------------------------------------------------------------------------------- resolution


def test_precedence_chain() -> None:
    data = {
        "defaults": {
            "ops": {"is_output_quantized": "True", "is_symmetric": "False"},
            "params": {"is_quantized": "True", "is_symmetric": "True"},
            "per_channel_quantization": "False",
        },
        "params": {"weight": {"is_symmetric": "False"}, "bias": {"is_quantized": "False"}},
        "op_type": {
            "Gemm": {"per_channel_quantization": "True", "is_symmetric": "True"},
            "Conv": {
                "per_channel_quantization": "True",
                "params": {"weight": {"is_symmetric": "True"}, "bias": {"is_quantized": "True"}},
            },
        },
    }
    cfg = HardwareConfig.from_dict(data)
    # defaults only
    assert cfg.param_rule("Mul", "scale") == TensorRule(True, True, PerTensor(), None)
    # defaults < params[name]
    assert cfg.param_rule("Mul", "weight").symmetric is False
    assert cfg.param_rule("Mul", "bias").quantized is False
    # params[name] < op_type[X] (per-channel) ; op-level is_symmetric is for activations only
    gemm_w = cfg.param_rule("Gemm", "weight")
    assert (gemm_w.granularity, gemm_w.symmetric) == (PerChannel(), False)
    assert cfg.output_rule("Gemm").symmetric is True
    assert cfg.output_rule("Conv").symmetric is False
    # op_type[X] < op_type[X].params[name]
    assert cfg.param_rule("Conv", "weight") == TensorRule(True, True, PerChannel(), None)
    assert cfg.param_rule("Conv", "bias").quantized is True


def _per_channel_config(default: str, conv: str) -> dict:
    """Defaults say ``default``, Conv says ``conv``; Gemm has an entry without the key, MatMul none at all."""
    return {
        "defaults": {
            "ops": {"is_output_quantized": "True"},
            "params": {"is_quantized": "True", "is_symmetric": "True"},
            "per_channel_quantization": default,
        },
        "params": {"bias": {"is_quantized": "False"}},
        "op_type": {"Conv": {"per_channel_quantization": conv}, "Gemm": {"is_symmetric": "False"}},
    }


def _granularity(per_channel: bool) -> PerChannel | PerTensor:
    """What ``per_channel_quantization`` asks for: one scale per output channel (the layer's axis), or per tensor."""
    return PerChannel() if per_channel else PerTensor()


@pytest.mark.parametrize(("default", "conv"), [("True", "False"), ("False", "True")])
def test_op_type_per_channel_overrides_the_default_both_ways(tmp_path: Path, default: str, conv: str) -> None:
    path = tmp_path / "quantsim_config.json"
    path.write_text(json.dumps(_per_channel_config(default, conv)))
    cfg = HardwareConfig.load(path)
    default_per_channel, conv_per_channel = default == "True", conv == "True"
    assert cfg.param_rule("Conv", "weight") == TensorRule(True, True, _granularity(conv_per_channel), None)
    # an op type entry without the key, and an op type without an entry, keep the default
    assert cfg.param_rule("Gemm", "weight") == TensorRule(True, True, _granularity(default_per_channel), None)
    assert cfg.param_rule("MatMul", "weight").granularity == _granularity(default_per_channel)

    # in a sim: the Conv's weights get one scale per output channel or one for the tensor, the Linear's the other
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Flatten(), nn.Linear(3 * 2 * 2, 4))
    x = torch.randn(1, 2, 2, 2)
    sim = QuantSim(model, x, config=path)
    sim.calibrate([x], progress=False)
    for layer, per_channel in (("0", conv_per_channel), ("2", default_per_channel)):
        quantizer = sim.quantizer(f"{layer}.param_quantizers.weight")
        weight = model.get_submodule(layer).weight.detach()
        abs_max = weight.abs().flatten(1).amax(dim=1) if per_channel else weight.abs().max()  # symmetric 8 bits
        assert quantizer.axis == (0 if per_channel else None), layer
        torch.testing.assert_close(quantizer.scale, abs_max / 127, rtol=1e-6, atol=0)


def test_builtin_defaults_when_keys_absent() -> None:
    cfg = HardwareConfig.from_dict({"defaults": {}})
    assert cfg.param_rule("Conv", "weight") == TensorRule(True, True, PerTensor(), None)
    assert cfg.output_rule("Conv") == TensorRule(False, False, PerTensor(), None)
    assert cfg.input_rule("Conv").quantized is False
    assert cfg.supergroups == [] and cfg.supergroup_pass_list == []
    assert cfg.model_input_quantized is False and cfg.model_output_quantized is False
    assert (cfg.strict_symmetric, cfg.unsigned_symmetric) == (False, False)


def test_real_json_booleans_accepted() -> None:
    data = {
        "defaults": {
            "ops": {"is_output_quantized": True, "is_input_quantized": True},
            "strict_symmetric": True,
        },
        "op_type": {"Conv": {"per_channel_quantization": True}},
    }
    cfg = HardwareConfig.from_dict(data)
    assert cfg.output_rule("X").quantized and cfg.input_rule("X").quantized
    assert cfg.strict_symmetric is True
    assert cfg.param_rule("Conv", "weight").granularity == PerChannel()


def test_supported_kernels_first_entry_sets_bitwidths() -> None:
    data = _minimal()
    data["defaults"]["supported_kernels"] = [
        {"activation": {"bitwidth": 8, "dtype": "int"}, "param": {"bitwidth": 8, "dtype": "int"}},
        {"activation": {"bitwidth": 16, "dtype": "float"}, "param": {"bitwidth": 16, "dtype": "float"}},
    ]
    data["op_type"]["Softmax"] = {
        "supported_kernels": [
            {"activation": {"bitwidth": 16, "dtype": "int"}, "param": {"bitwidth": 4, "dtype": "int"}},
            {"activation": {"bitwidth": 8, "dtype": "int"}, "param": {"bitwidth": 8, "dtype": "int"}},
        ]
    }
    cfg = HardwareConfig.from_dict(data)
    assert cfg.output_rule("Softmax").bitwidth == 16
    assert cfg.input_rule("Softmax").bitwidth == 16
    assert cfg.param_rule("Softmax", "weight").bitwidth == 4
    # defaults-level kernels do not override the sim-wide bitwidths
    assert cfg.output_rule("Conv").bitwidth is None
    assert cfg.param_rule("Conv", "weight").bitwidth is None


def test_raw_is_a_copy() -> None:
    data = _minimal()
    cfg = HardwareConfig.from_dict(data)
    data["defaults"]["ops"]["is_output_quantized"] = "False"
    assert cfg.raw["defaults"]["ops"]["is_output_quantized"] == "True"
    assert cfg.output_rule("Conv").quantized is True


def test_load_passthrough_and_bad_type() -> None:
    cfg = HardwareConfig.from_dict(_minimal())
    assert HardwareConfig.load(cfg) is cfg
    with pytest.raises(TypeError):
        HardwareConfig.load(42)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- presets


def test_preset_names() -> None:
    assert HardwareConfig.preset_names() == ["default", "htp", "per_channel"]


@pytest.mark.parametrize("name", ["default", "per_channel", "htp"])
def test_presets_load(name: str) -> None:
    cfg = HardwareConfig.load(name)
    assert name in cfg.source
    assert cfg.model_input_quantized is True
    assert cfg.param_rule("Conv", "bias").quantized is False
    assert cfg.param_rule("BatchNormalization", "running_mean").quantized is False
    assert cfg.param_rule("BatchNormalization", "running_var").quantized is False
    w = cfg.param_rule("Conv", "weight")
    assert (w.quantized, w.symmetric) == (True, True)
    assert w.granularity == _granularity(name != "default")
    out = cfg.output_rule("Conv")
    assert (out.quantized, out.symmetric) == (True, False)
    for group in [
        ("Conv", "Relu"),
        ("Conv", "Clip"),
        ("ConvTranspose", "Relu"),
        ("Add", "Relu"),
        ("Gemm", "Relu"),
        ("Conv", "BatchNormalization", "Relu"),
        ("Conv", "BatchNormalization", "Clip"),
        ("Gemm", "BatchNormalization", "Relu"),
    ]:
        assert group in cfg.supergroups, group


def test_htp_preset_specifics() -> None:
    cfg = HardwareConfig.load("htp")
    for op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        assert cfg.param_rule(op, "weight").granularity == PerChannel(), op
    for op in (
        "LayerNormalization",
        "Softmax",
        "Add",
        "Mul",
        "Sub",
        "Div",
        "Pow",
        "Sqrt",
        "ReduceMean",
        "Erf",
        "Gelu",
    ):
        assert cfg.output_rule(op).bitwidth == 16, op
    assert cfg.output_rule("Conv").bitwidth is None
    assert cfg.param_rule("LayerNormalization", "weight").symmetric is False
    for op in ("Softmax", "Sigmoid"):
        rule = cfg.output_rule(op)
        assert (rule.min_constraint, rule.max_constraint) == (0.0, 1.0), op
    assert (cfg.output_rule("Relu").min_constraint, cfg.output_rule("Relu").max_constraint) == (0.0, None)
    assert ("Conv", "BatchNormalization", "HardSwish") in cfg.supergroups
    assert ("Conv", "HardSwish") in cfg.supergroups


def test_preset_name_vs_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(_minimal()))
    monkeypatch.chdir(tmp_path)
    assert HardwareConfig.load("mine.json").source == "mine.json"
    assert HardwareConfig.load(path).param_rule("Conv", "weight").granularity == PerChannel()


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", ["Ture", "true", "1", 1, None])
def test_error_bad_boolean_string(bad) -> None:
    data = _minimal()
    data["op_type"]["Conv"]["per_channel_quantization"] = bad
    msg = _error(data)
    assert "op_type.Conv.per_channel_quantization" in msg
    assert json.dumps(bad) in msg
    assert '"True" or "False"' in msg


def test_error_bad_boolean_in_defaults() -> None:
    data = _minimal()
    data["defaults"]["params"]["is_symmetric"] = "yes"
    msg = _error(data)
    assert "defaults.params.is_symmetric" in msg and '"yes"' in msg


@pytest.mark.parametrize(
    ("mutate", "path", "key"),
    [
        (lambda d: d.__setitem__("op_types", {}), "op_types", "op_type"),
        (lambda d: d["defaults"].__setitem__("per_channel", "True"), "defaults.per_channel", "ops"),
        (
            lambda d: d["defaults"]["ops"].__setitem__("is_quantized", "True"),
            "defaults.ops.is_quantized",
            "is_output_quantized",
        ),
        (
            lambda d: d["params"]["bias"].__setitem__("quantized", "True"),
            "params.bias.quantized",
            "is_quantized",
        ),
        (
            lambda d: d["op_type"]["Conv"].__setitem__("per_chanel_quantization", "True"),
            "op_type.Conv.per_chanel_quantization",
            "per_channel_quantization",
        ),
        (
            lambda d: d["op_type"]["Conv"].__setitem__("params", {"weight": {"symmetric": "True"}}),
            "op_type.Conv.params.weight.symmetric",
            "is_symmetric",
        ),
    ],
)
def test_error_unknown_key(mutate, path: str, key: str) -> None:
    data = _minimal()
    mutate(data)
    msg = _error(data)
    assert path in msg
    assert "unknown key" in msg
    assert f'"{key}"' in msg  # lists what is allowed


def test_tolerated_keys() -> None:
    data = _minimal()
    data["defaults"]["hw_version"] = "V79"
    data["defaults"]["supported_kernels"] = [
        {"activation": {"bitwidth": 16, "dtype": "float"}, "param": {"bitwidth": 16, "dtype": "float"}}
    ]
    data["op_type"]["Softmax"] = {"encoding_constraints": {"min": 0, "max": 1}}
    cfg = HardwareConfig.from_dict(data)
    assert cfg.output_rule("Softmax").max_constraint == 1.0


@pytest.mark.parametrize("bad", [1, 33, 0, "8", 8.0, True])
def test_error_bad_bitwidth(bad) -> None:
    data = _minimal()
    data["op_type"]["Add"] = {
        "supported_kernels": [{"activation": {"bitwidth": bad, "dtype": "int"}, "param": {"bitwidth": 8}}]
    }
    msg = _error(data)
    assert "op_type.Add.supported_kernels[0].activation.bitwidth" in msg
    assert json.dumps(bad) in msg
    assert "2..32" in msg


def test_error_bad_dtype_and_float_first_kernel() -> None:
    data = _minimal()
    data["op_type"]["Add"] = {
        "supported_kernels": [{"activation": {"bitwidth": 16, "dtype": "fp"}, "param": {"bitwidth": 8}}]
    }
    msg = _error(data)
    assert "op_type.Add.supported_kernels[0].activation.dtype" in msg and '"int" or "float"' in msg
    data["op_type"]["Add"]["supported_kernels"][0]["activation"] = {"bitwidth": 8, "dtype": "float"}
    msg = _error(data)
    assert "op_type.Add.supported_kernels[0].activation.bitwidth" in msg and '"float"' in msg and "float16" in msg


def test_error_constraints_min_not_below_max() -> None:
    data = _minimal()
    data["op_type"]["Softmax"] = {"encoding_constraints": {"min": 1.0, "max": 1.0}}
    msg = _error(data)
    assert "op_type.Softmax.encoding_constraints" in msg and "min < max" in msg
    data["op_type"]["Softmax"] = {"encoding_constraints": {"min": "0"}}
    assert "op_type.Softmax.encoding_constraints.min" in _error(data)


@pytest.mark.parametrize(
    ("groups", "path"),
    [
        ([{"op_list": ["Conv"]}], "supergroups[0].op_list"),
        ([{"op_list": ["Conv", "Relu"]}, {"op_list": "Conv,Relu"}], "supergroups[1].op_list"),
        ([{"op_list": ["Conv", 3]}], "supergroups[0].op_list[1]"),
        ([{"ops": ["Conv", "Relu"]}], "supergroups[0].ops"),
        ({"op_list": ["Conv", "Relu"]}, "supergroups"),
    ],
)
def test_error_bad_supergroups(groups, path: str) -> None:
    data = _minimal()
    data["supergroups"] = groups
    assert path in _error(data)


def test_error_missing_defaults_and_non_object() -> None:
    assert "defaults" in _error({"params": {}})
    with pytest.raises(ConfigError, match="JSON object"):
        HardwareConfig.from_dict([1, 2], source="x.json")  # type: ignore[arg-type]


def test_error_broken_json_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "defaults": {\n    "ops": {"is_output_quantized": "True",}\n  }\n}\n')
    with pytest.raises(ConfigError) as info:
        HardwareConfig.load(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "line 3" in msg and "column" in msg


def test_error_missing_file_lists_presets(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as info:
        HardwareConfig.load(path)
    msg = str(info.value)
    assert str(path) in msg and "does not exist" in msg
    for preset in ("default", "per_channel", "htp"):
        assert preset in msg
    with pytest.raises(ConfigError, match="per_channel"):
        HardwareConfig.load("htp_v73")  # neither a preset nor a file
