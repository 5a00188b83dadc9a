"""Hardware configuration: which tensors get quantized, and how, on the target device.

The file format is AIMET's quantsim config JSON, so that users can bring the files they already have for
their hardware. Only the fields edgequant acts on are interpreted; everything is validated up front so that a
typo in a config fails loudly at load time instead of silently producing a different simulation.

Resolution order for a tensor (later wins), as in AIMET::

    defaults  <  params[name]  <  op_type[X]  <  op_type[X].params[name]

``op_type[X]`` contributes to parameter rules only through ``per_channel_quantization`` and
``supported_kernels``; its ``is_symmetric`` / ``is_input_quantized`` / ``is_output_quantized`` describe the
op's activations.

``supported_kernels`` semantics (edgequant's reading of the AIMET field): when ``op_type[X]`` lists supported
kernels, the FIRST entry fixes that op's activation bitwidth (inputs and outputs) and its parameter
bitwidth. Without op-level kernels the sim-wide defaults apply, which a resolved rule expresses as
``bitwidth=None`` ("use the sim's output_bw / param_bw"). Kernels listed under ``defaults`` are validated but
do not override the sim-wide bitwidths. A float kernel (``"dtype": "float"``) first in an op's list makes that op's
activations (``activation``) or parameters (``param``) float16 (`FloatFormat`): AIMET spells float formats only as
``"dtype": "float", "bitwidth": 16``, so a float kernel of any other bitwidth is refused naming its key (bfloat16
and fp8 are set from Python: ``QuantSim.set_format``). Float kernels further down the list are validated only.

Sim-wide keys, with AIMET's meaning (its config docs, ``quantization_configuration.rst``, and the code named):

* ``defaults.strict_symmetric`` (default False): symmetric quantizers use the grid symmetric around zero with one
  level fewer, ``[-(2**(b-1) - 1), 2**(b-1) - 1] * scale``, ``scale = max|x| / (2**(b-1) - 1)`` (libpymo
  ``getComputedEncodings``: ``numSteps - 1``, ``offset = -ceil(numSteps / 2)``).
* ``defaults.unsigned_symmetric`` (default False, as AIMET's ``TensorQuantizer`` and config docs have it): a
  symmetric quantizer whose calibrated range starts at 0 (all data non-negative, e.g. after a ReLU) uses the
  unsigned grid: offset 0, ``scale = max / (2**b - 1)`` (same function: such a range is computed as asymmetric).
  The two are exclusive (AIMET's encoding analyzers assert it): a config setting both is refused.
* ``supergroup_pass_list``: AIMET's graph passes by registered name (``aimet_onnx.graph_passes``). ``MatmulAdd``
  is applied: a MatMul with a constant operand whose only consumer is an Add of a constant rank-1 tensor (a
  Linear written as ``x @ w + b``) gets no quantizer on the MatMul's output nor on that Add's inputs, the
  quantizers AIMET's pass disables. Any other name (AIMET's ``LayerNormalization`` and ``RMSNormalization``, which
  keep the intermediate outputs of a normalization written out as elementwise ops in float) is not implemented:
  loading warns once per pass with a `ConfigWarning` naming it, and those intermediates stay quantized.
* ``model_output.is_output_quantized``: ``"True"`` quantizes the outputs of the ops that produce the model's
  outputs even where their op type's rule or a supergroup would not (AIMET's ``_set_model_output_configs``);
  absent, the op rules decide. AIMET refuses ``"False"`` (``json_config_importer``: "can only be set to True");
  edgequant reads it literally: the model's outputs stay float, and the coverage report says why.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgequant.quantization.encoding import MAX_BITWIDTH, MIN_BITWIDTH, check_bitwidth
from edgequant.quantization.granularity import Granularity, PerChannel, PerTensor
from edgequant.quantization.number_format import FloatFormat

__all__ = ["ConfigError", "ConfigWarning", "HardwareConfig", "TensorRule", "known_op_types", "register_op_types"]

_PRESET_DIR = Path(__file__).resolve().parent / "configs"

_TOP_KEYS = (
    "defaults",
    "params",
    "op_type",
    "supergroups",
    "supergroup_pass_list",
    "model_input",
    "model_output",
)
_DEFAULTS_KEYS = (
    "ops",
    "params",
    "strict_symmetric",
    "unsigned_symmetric",
    "per_channel_quantization",
    "hw_version",
    "supported_kernels",
)
_OPS_KEYS = ("is_output_quantized", "is_input_quantized", "is_symmetric")
_PARAM_KEYS = ("is_quantized", "is_symmetric")
_OP_TYPE_KEYS = (
    "is_output_quantized",
    "is_input_quantized",
    "is_symmetric",
    "per_channel_quantization",
    "params",
    "encoding_constraints",
    "supported_kernels",
)
_CONSTRAINT_KEYS = ("min", "max")
_KERNEL_KEYS = ("activation", "param")
_KERNEL_TENSOR_KEYS = ("bitwidth", "dtype")
_KERNEL_DTYPES = ("int", "float")
_AIMET_OP_TYPES = frozenset({
    "BatchPermutation", "BatchToSpace", "ChannelShuffle", "CropAndResize", "SpaceToBatch",  # not ONNX ops
    "RMSNormalization",  # ONNX from opset 23 only
    "defaults",  # backend-aware configs: an ``op_type.defaults`` section (read as an op type no op has)
})
"""Op type names AIMET's shipped configs (2.x, htp/backend-aware/lpai/eai) use that ONNX does not define."""
_registered_op_types: set[str] = set()

SUPERGROUP_PASSES = ("MatmulAdd",)
"""``supergroup_pass_list`` entries the simulation applies (see the module docstring)."""
_AIMET_PASSES = {
    "LayerNormalization": "keeps the intermediate outputs of a LayerNorm written out as elementwise ops in float",
    "RMSNormalization": "keeps the intermediate outputs of an RMSNorm written out as elementwise ops in float",
}
"""AIMET passes edgequant does not implement, and what AIMET does with them."""


def register_op_types(*names: str) -> None:
    """Accept ``names`` as op types in configs besides ONNX's (the sim's own names, and the names given to
    `edgequant.register_module`)."""
    _registered_op_types.update(names)


@functools.cache
def _onnx_op_types() -> frozenset[str]:
    import onnx  # only needed to validate op type names

    return frozenset(s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain in ("", "ai.onnx"))


def known_op_types() -> frozenset[str]:
    """Op type names a config may use: ONNX operators, AIMET's extra names, and registered ones."""
    return _onnx_op_types() | _AIMET_OP_TYPES | frozenset(_registered_op_types)


def _unimplemented_pass(source: str, name: str) -> str:
    """The warning for a ``supergroup_pass_list`` entry the simulation does not apply."""
    if name in _AIMET_PASSES:
        what = f"AIMET's {name!r} pass {_AIMET_PASSES[name]}"
    else:
        close = difflib.get_close_matches(name, [*SUPERGROUP_PASSES, *_AIMET_PASSES], n=1)
        what = f"{_show(name)} is not a pass edgequant knows" + (f" (did you mean {_show(close[0])}?)" if close else "")
    return (
        f"{source}: supergroup_pass_list: {what}; edgequant does not implement it, so the tensors it would leave in "
        f"float stay quantized as the rest of the config says (implemented: {', '.join(SUPERGROUP_PASSES)})"
    )


def _key_path(path: str, key: str) -> str:
    """``path.key``, the key JSON-quoted when it holds characters that would break the message's line."""
    shown = key if key.isprintable() else json.dumps(key)
    return f"{path}.{shown}" if path else shown


class ConfigWarning(UserWarning):
    """A config entry edgequant reads but does not act on (it says which, and what stays different)."""


class ConfigError(ValueError):
    """A hardware config that cannot be used; the message says where, what, and what is allowed."""

    def __init__(self, source: str, key_path: str, message: str) -> None:
        self.source = source
        self.key_path = key_path
        where = f"{source}: {key_path}: " if key_path else f"{source}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class TensorRule:
    """How one tensor (a parameter, or an op's input/output activation) is to be quantized."""

    quantized: bool
    symmetric: bool
    granularity: Granularity  # per_channel_quantization: PerChannel() (the layer's output channels) or PerTensor()
    bitwidth: int | None  # None -> sim default (param_bw / output_bw)
    min_constraint: float | None = None  # from encoding_constraints (activations only)
    max_constraint: float | None = None
    strict_symmetric: bool = False  # defaults.strict_symmetric (applies when symmetric)
    unsigned_symmetric: bool = False  # defaults.unsigned_symmetric (applies when symmetric)
    float_format: FloatFormat | None = None  # a float first kernel ("dtype": "float"); None: the integer grid


@dataclass(frozen=True)
class _OpSettings:
    """Validated content of one ``op_type`` entry; None means "not set here, fall back"."""

    output_quantized: bool | None
    input_quantized: bool | None
    symmetric: bool | None
    per_channel: bool | None
    params: dict[str, dict[str, bool]]
    min_constraint: float | None
    max_constraint: float | None
    activation_bitwidth: int | None
    param_bitwidth: int | None
    activation_format: FloatFormat | None = None
    param_format: FloatFormat | None = None


def _show(value: Any) -> str:
    """Render a bad value the way it appears in the JSON file, so users can grep for it."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


class _Validator:
    """Walks the parsed JSON once, producing normalized values and path-qualified errors."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(self.source, path, f"got {_show(value)}; expected {expected}")

    def obj(self, value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, value, "a JSON object")
        for key in value:
            if key not in allowed:
                allowed_txt = ", ".join(f'"{k}"' for k in allowed)
                raise ConfigError(
                    self.source,
                    _key_path(path, key),
                    f"unknown key {_show(key)}; allowed keys here: {allowed_txt}",
                )
        return value

    def mapping(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, value, "a JSON object")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if isinstance(value, bool):
            return value
        if value == "True":
            return True
        if value == "False":
            return False
        raise self.fail(path, value, '"True" or "False"')

    def opt_bool(self, entry: dict[str, Any], key: str, path: str) -> bool | None:
        return self.boolean(entry[key], f"{path}.{key}") if key in entry else None

    def number(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(path, value, "a finite number")
        return float(value)

    def bitwidth(self, value: Any, path: str) -> int:
        try:
            check_bitwidth(value, "bitwidth")
        except ValueError:
            raise self.fail(path, value, f"an integer bitwidth in {MIN_BITWIDTH}..{MAX_BITWIDTH}") from None
        return value

    def string_list(self, value: Any, path: str, min_len: int = 0) -> list[str]:
        what = "a list of strings" if min_len == 0 else f"a list of at least {min_len} op type strings"
        if not isinstance(value, list) or len(value) < min_len:
            raise self.fail(path, value, what)
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.fail(f"{path}[{i}]", item, "a non-empty string")
        return list(value)

    def param_entry(self, value: Any, path: str) -> dict[str, bool]:
        entry = self.obj(value, path, _PARAM_KEYS)
        return {k: self.boolean(entry[k], f"{path}.{k}") for k in _PARAM_KEYS if k in entry}

    def param_table(self, value: Any, path: str) -> dict[str, dict[str, bool]]:
        table = self.mapping(value, path)
        return {name: self.param_entry(entry, _key_path(path, name)) for name, entry in table.items()}

    def op_type(self, name: str, path: str) -> str:
        """``name`` if it is a known op type, else an error that lists the closest valid names."""
        known = known_op_types()
        if name in known:
            return name
        close = [k for k in sorted(known) if k.lower() == name.lower()]
        close += [k for k in difflib.get_close_matches(name, sorted(known), n=4, cutoff=0.6) if k not in close]
        hint = (
            f"did you mean {', '.join(_show(k) for k in close)}?" if close
            else 'op types are ONNX operator names such as "Conv", "Gemm", "Relu", "Add"'
        )
        raise ConfigError(
            self.source, path,
            f"unknown op type {_show(name)}; {hint} (a module registered with edgequant.register_module(cls, "
            "op_type) adds its op type)",
        )

    def constraints(self, value: Any, path: str) -> tuple[float | None, float | None]:
        entry = self.obj(value, path, _CONSTRAINT_KEYS)
        lo = self.number(entry["min"], f"{path}.min") if "min" in entry else None
        hi = self.number(entry["max"], f"{path}.max") if "max" in entry else None
        if lo is not None and hi is not None and lo >= hi:
            raise self.fail(path, entry, "min < max")
        return lo, hi

    def kernels(self, value: Any, path: str) -> list[dict[str, tuple[int, str]]]:
        """Validate a supported_kernels list; returns [{"activation": (bw, dtype), "param": (bw, dtype)}]."""
        if not isinstance(value, list) or not value:
            raise self.fail(path, value, 'a non-empty list of {"activation": {...}, "param": {...}} objects')
        out = []
        for i, kernel in enumerate(value):
            kpath = f"{path}[{i}]"
            kernel = self.obj(kernel, kpath, _KERNEL_KEYS)
            parsed = {}
            for role in _KERNEL_KEYS:
                if role not in kernel:
                    raise ConfigError(
                        self.source, f"{kpath}.{role}", 'missing; expected {"bitwidth": int, "dtype": ...}'
                    )
                tpath = f"{kpath}.{role}"
                spec = self.obj(kernel[role], tpath, _KERNEL_TENSOR_KEYS)
                if "bitwidth" not in spec:
                    raise ConfigError(
                        self.source, f"{tpath}.bitwidth", "missing; expected an integer bitwidth"
                    )
                bw = self.bitwidth(spec["bitwidth"], f"{tpath}.bitwidth")
                dtype = spec.get("dtype", "int")
                if dtype not in _KERNEL_DTYPES:
                    raise self.fail(f"{tpath}.dtype", dtype, '"int" or "float"')
                parsed[role] = (bw, dtype)
            out.append(parsed)
        return out

    def op_settings(self, value: Any, path: str) -> _OpSettings:
        entry = self.obj(value, path, _OP_TYPE_KEYS)
        lo = hi = None
        if "encoding_constraints" in entry:
            lo, hi = self.constraints(entry["encoding_constraints"], f"{path}.encoding_constraints")
        act_bw = param_bw = None
        formats: dict[str, FloatFormat | None] = {role: None for role in _KERNEL_KEYS}
        if "supported_kernels" in entry:
            kpath = f"{path}.supported_kernels"
            first = self.kernels(entry["supported_kernels"], kpath)[0]
            for role in _KERNEL_KEYS:
                bitwidth, dtype = first[role]
                if dtype == "float" and bitwidth != 16:
                    raise self.fail(
                        f"{kpath}[0].{role}.bitwidth", bitwidth,
                        '16 with "dtype": "float" (the float kernel AIMET configs describe is float16)',
                    )
                formats[role] = FloatFormat("float16") if dtype == "float" else None
            act_bw, param_bw = first["activation"][0], first["param"][0]
        params = self.param_table(entry["params"], f"{path}.params") if "params" in entry else {}
        return _OpSettings(
            output_quantized=self.opt_bool(entry, "is_output_quantized", path),
            input_quantized=self.opt_bool(entry, "is_input_quantized", path),
            symmetric=self.opt_bool(entry, "is_symmetric", path),
            per_channel=self.opt_bool(entry, "per_channel_quantization", path),
            params=params,
            min_constraint=lo,
            max_constraint=hi,
            activation_bitwidth=act_bw,
            param_bitwidth=param_bw,
            activation_format=formats["activation"],
            param_format=formats["param"],
        )

    def supergroups(self, value: Any, path: str) -> list[tuple[str, ...]]:
        if not isinstance(value, list):
            raise self.fail(path, value, 'a list of {"op_list": [...]} objects')
        groups = []
        for i, group in enumerate(value):
            gpath = f"{path}[{i}]"
            group = self.obj(group, gpath, ("op_list",))
            if "op_list" not in group:
                raise ConfigError(
                    self.source, f"{gpath}.op_list", "missing; expected a list of op type strings"
                )
            op_list = self.string_list(group["op_list"], f"{gpath}.op_list", min_len=2)
            groups.append(tuple(self.op_type(op, f"{gpath}.op_list[{j}]") for j, op in enumerate(op_list)))
        return groups


class HardwareConfig:
    """A validated hardware config that answers "how is this tensor quantized?" for the simulator.

    Construct with :meth:`load` (preset name, JSON path, dict, or an existing config) or :meth:`from_dict`.
    """

    source: str
    strict_symmetric: bool
    unsigned_symmetric: bool
    model_input_quantized: bool
    model_output_quantized: bool  # model_output.is_output_quantized is "True": quantize the model's outputs
    model_output_float: bool  # ... is "False": leave them float (AIMET refuses this value)
    supergroups: list[tuple[str, ...]]
    supergroup_pass_list: list[str]
    raw: dict

    def __init__(self) -> None:
        # Private: the public way in is load()/from_dict(), which validate.
        self._default_ops: dict[str, bool] = {}
        self._default_params: dict[str, bool] = {}
        self._default_per_channel = False
        self._params: dict[str, dict[str, bool]] = {}
        self._op_types: dict[str, _OpSettings] = {}

    # ------------------------------------------------------------------ construction

    @staticmethod
    def preset_names() -> list[str]:
        """Names accepted by :meth:`load` besides file paths (the JSON files shipped in edgequant/configs)."""
        return sorted(p.stem for p in _PRESET_DIR.glob("*.json"))

    @classmethod
    def load(cls, config: str | os.PathLike | dict | HardwareConfig) -> HardwareConfig:
        """Accept what users naturally pass: a preset name, a JSON file path, a parsed dict, or a config."""
        if isinstance(config, HardwareConfig):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        if isinstance(config, str) and config in cls.preset_names():
            return cls._from_file(_PRESET_DIR / f"{config}.json", source=f"preset {config!r}")
        if isinstance(config, (str, os.PathLike)):
            return cls._from_file(Path(config), source=os.fspath(config))
        raise TypeError(
            f"hardware config must be a preset name, a path to a .json file, a dict or a HardwareConfig; "
            f"got {type(config).__name__}"
        )

    @classmethod
    def _from_file(cls, path: Path, source: str) -> HardwareConfig:
        if not path.is_file():
            presets = ", ".join(cls.preset_names())
            reason = "is a directory, not a JSON file" if path.is_dir() else "does not exist"
            raise ConfigError(
                source,
                "",
                f"hardware config file {str(path)!r} {reason}; give a path to a quantsim config .json file "
                f"or one of the presets: {presets}",
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(source, "", f"cannot read hardware config file: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                source, "", f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from exc
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> HardwareConfig:
        """Validate an already-parsed quantsim config; ``source`` only labels error messages."""
        v = _Validator(source)
        top = v.obj(data, "", _TOP_KEYS)
        if "defaults" not in top:
            raise ConfigError(source, "defaults", 'missing; a quantsim config needs a "defaults" section')

        cfg = cls()
        cfg.source = source
        cfg.raw = copy.deepcopy(data)

        defaults = v.obj(top["defaults"], "defaults", _DEFAULTS_KEYS)
        if "ops" in defaults:
            ops = v.obj(defaults["ops"], "defaults.ops", _OPS_KEYS)
            cfg._default_ops = {k: v.boolean(ops[k], f"defaults.ops.{k}") for k in _OPS_KEYS if k in ops}
        if "params" in defaults:
            cfg._default_params = v.param_entry(defaults["params"], "defaults.params")
        cfg._default_per_channel = bool(v.opt_bool(defaults, "per_channel_quantization", "defaults"))
        cfg.strict_symmetric = bool(v.opt_bool(defaults, "strict_symmetric", "defaults"))
        cfg.unsigned_symmetric = bool(v.opt_bool(defaults, "unsigned_symmetric", "defaults"))
        if cfg.strict_symmetric and cfg.unsigned_symmetric:
            raise ConfigError(
                source, "defaults",
                'strict_symmetric and unsigned_symmetric are both "True"; they are exclusive grids (AIMET\'s encoding '
                "analyzers assert so): set one of them",
            )
        if "hw_version" in defaults and not isinstance(defaults["hw_version"], str):
            raise v.fail("defaults.hw_version", defaults["hw_version"], 'a string such as "V73"')
        if "supported_kernels" in defaults:
            v.kernels(defaults["supported_kernels"], "defaults.supported_kernels")

        if "params" in top:
            cfg._params = v.param_table(top["params"], "params")

        if "op_type" in top:
            table = v.mapping(top["op_type"], "op_type")
            cfg._op_types = {
                v.op_type(name, _key_path("op_type", name)): v.op_settings(entry, _key_path("op_type", name))
                for name, entry in table.items()
            }

        cfg.supergroups = v.supergroups(top["supergroups"], "supergroups") if "supergroups" in top else []
        cfg.supergroup_pass_list = (
            v.string_list(top["supergroup_pass_list"], "supergroup_pass_list")
            if "supergroup_pass_list" in top
            else []
        )
        for name in dict.fromkeys(cfg.supergroup_pass_list):
            if name not in SUPERGROUP_PASSES:
                warnings.warn(_unimplemented_pass(source, name), ConfigWarning, stacklevel=3)

        model_input = v.obj(top.get("model_input", {}), "model_input", ("is_input_quantized",))
        cfg.model_input_quantized = bool(v.opt_bool(model_input, "is_input_quantized", "model_input"))
        model_output = v.obj(top.get("model_output", {}), "model_output", ("is_output_quantized",))
        output_setting = v.opt_bool(model_output, "is_output_quantized", "model_output")
        cfg.model_output_quantized = output_setting is True
        cfg.model_output_float = output_setting is False
        return cfg

    # ------------------------------------------------------------------ resolution

    def param_rule(self, op_type: str, param_name: str) -> TensorRule:
        """Rule for parameter ``param_name`` (e.g. "weight", "bias") of an op of ONNX type ``op_type``."""
        merged = {"is_quantized": True, "is_symmetric": True}
        merged.update(self._default_params)
        merged.update(self._params.get(param_name, {}))
        op = self._op_types.get(op_type)
        per_channel = self._default_per_channel
        bitwidth = float_format = None
        if op is not None:
            merged.update(op.params.get(param_name, {}))
            if op.per_channel is not None:
                per_channel = op.per_channel
            bitwidth, float_format = op.param_bitwidth, op.param_format
        return TensorRule(
            quantized=merged["is_quantized"],
            symmetric=merged["is_symmetric"],
            granularity=PerChannel() if per_channel else PerTensor(),
            bitwidth=bitwidth,
            strict_symmetric=self.strict_symmetric,
            unsigned_symmetric=self.unsigned_symmetric,
            float_format=float_format,
        )

    def _activation_rule(self, op_type: str, key: str, with_constraints: bool) -> TensorRule:
        op = self._op_types.get(op_type)
        quantized = self._default_ops.get(key, False)
        symmetric = self._default_ops.get("is_symmetric", False)
        variants = {"strict_symmetric": self.strict_symmetric, "unsigned_symmetric": self.unsigned_symmetric}
        if op is None:
            return TensorRule(quantized=quantized, symmetric=symmetric, granularity=PerTensor(), bitwidth=None,
                              **variants)
        op_quantized = op.output_quantized if key == "is_output_quantized" else op.input_quantized
        return TensorRule(
            quantized=quantized if op_quantized is None else op_quantized,
            symmetric=symmetric if op.symmetric is None else op.symmetric,
            granularity=PerTensor(),
            bitwidth=op.activation_bitwidth,
            float_format=op.activation_format,
            min_constraint=op.min_constraint if with_constraints else None,
            max_constraint=op.max_constraint if with_constraints else None,
            **variants,
        )

    def output_rule(self, op_type: str) -> TensorRule:
        """Rule for the output activation of an op; carries the op's encoding_constraints (output range)."""
        return self._activation_rule(op_type, "is_output_quantized", with_constraints=True)

    def input_rule(self, op_type: str) -> TensorRule:
        """Rule for an op's input activations (off unless asked for); constraints describe outputs only."""
        return self._activation_rule(op_type, "is_input_quantized", with_constraints=False)

    def __repr__(self) -> str:
        return (
            f"HardwareConfig(source={self.source!r}, op_types={len(self._op_types)}, "
            f"supergroups={len(self.supergroups)})"
        )
