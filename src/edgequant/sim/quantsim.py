"""`QuantSim`: a copy of the user's model with quantizers wherever the target hardware quantizes."""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from edgequant.config import HardwareConfig
from edgequant.quantization import QUANT_SCHEMES, CalibrationError, Encoding, Quantizer
from edgequant.quantization.analyzers import SCHEME_ALIASES
from edgequant.sim.capture import (
    CallRecord,
    CoverageNote,
    functionalize_graph,
    is_leaf,
    record_calls,
    try_trace,
)
from edgequant.sim.emulation import EmulationPlan, RuntimeModel, install, plan_emulation, runtime_model, uninstall
from edgequant.sim.interception import intercept_functional_ops
from edgequant.sim.ops import function_name, is_custom_module, is_pass_through, module_op_type
from edgequant.sim.quantized_module import QuantizedModule, make_quantized

STATE_FORMAT = "edgequant-sim-state"


@dataclass
class CoverageEntry:
    """One tensor of the model: is it quantized, by which quantizer, and if not, why."""

    tensor: str
    op: str
    quantized: bool
    quantizer: str | None
    reason: str


def split_model_input(dummy_input: Any) -> tuple[tuple, dict]:
    """A model input as (args, kwargs): a dict is keyword inputs, a tuple/list positional ones, else one input."""
    if isinstance(dummy_input, dict):
        return (), dict(dummy_input)
    if isinstance(dummy_input, (tuple, list)):
        return tuple(dummy_input), {}
    return (dummy_input,), {}


def _quantize_model_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of the root: quantize the model's float inputs (config ``model_input``)."""
    quantizers = module.model_input_quantizers
    args = tuple(quantizers[str(i)](a) if str(i) in quantizers else a for i, a in enumerate(args))
    kwargs = {k: quantizers[k](v) if k in quantizers else v for k, v in kwargs.items()}
    return args, kwargs


def _split_quantizer_name(name: str) -> tuple[str, str, str]:
    """``a.b.param_quantizers.weight`` -> (``a.b``, ``param_quantizers``, ``weight``); root owner is ``""``."""
    head, key = name.rsplit(".", 1)
    owner, _, group = head.rpartition(".")
    return owner, group, key


class QuantSim:
    """Quantization simulation of ``model`` for fixed-point hardware.

    ``sim.model`` is an ordinary ``nn.Module`` (a copy unless ``in_place=True``) whose layers and functional
    ops carry `Quantizer` modules as the hardware ``config`` dictates; calibrate it with `compute_encodings`
    or `calibrate`, then evaluate or train it like the original.
    """

    def __init__(
        self,
        model: nn.Module,
        dummy_input: Any,
        *,
        param_bw: int = 8,
        output_bw: int = 8,
        quant_scheme: str = "minmax",
        config: str | Path | dict | HardwareConfig = "default",
        in_place: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"QuantSim expects an nn.Module, got {type(model).__name__}")
        scheme = SCHEME_ALIASES.get(quant_scheme, quant_scheme)
        if scheme not in QUANT_SCHEMES:
            raise ValueError(f"unknown quant_scheme {quant_scheme!r}; choose one of {', '.join(QUANT_SCHEMES)}")
        for label, bits in (("param_bw", param_bw), ("output_bw", output_bw)):
            if not isinstance(bits, int) or not 2 <= bits <= 16:
                raise ValueError(f"{label}={bits!r} is not supported; use an integer between 2 and 16")
        self.param_bw, self.output_bw, self.quant_scheme = param_bw, output_bw, scheme
        self.config = HardwareConfig.load(config)
        self._dummy_args, self._dummy_kwargs = split_model_input(dummy_input)
        self._in_place = in_place
        self.model = model if in_place else copy.deepcopy(model)
        self._notes: list[CoverageNote] = []
        self._supergroup_members: dict[str, str] = {}
        self._emulation: EmulationPlan | None = None
        self._prepare()

    # -- preparation -----------------------------------------------------------------------------------
    def _prepare(self) -> None:
        training = {name: m.training for name, m in self.model.named_modules()}
        self.model.eval()
        try:
            records = record_calls(self.model, self._dummy_args, self._dummy_kwargs)
        except Exception as error:
            raise ValueError(
                f"the model does not run on dummy_input ({type(error).__name__}: {error}); pass an input with "
                "the shape, dtype and device the model expects (a tuple for several inputs, a dict for kwargs)"
            ) from None
        captured = self._capture(self.model, "", records)
        if captured is not self.model and self._in_place:  # keep the user's object: it becomes the traced graph
            self.model.__class__, self.model.__dict__ = captured.__class__, captured.__dict__
        else:
            self.model = captured
        records = record_calls(self.model, self._dummy_args, self._dummy_kwargs)
        for name, module in list(self.model.named_modules()):
            self._wrap(name, module, records)
        self._add_model_input_quantizers(records.get(""))
        for name, module in self.model.named_modules():  # modules the capture added follow the root
            module.training = training.get(name, training[""])

    def _capture(self, module: nn.Module, prefix: str, records: dict[str, CallRecord]) -> nn.Module:
        """Trace ``module`` (or, failing that, its children); returns the module to put in its place."""
        name = prefix.rstrip(".")
        record = records.get(name)
        if is_leaf(module):
            return module
        traced, reason = try_trace(module, record) if record is not None else (None, "")
        if traced is not None:
            self._notes.extend(functionalize_graph(traced, prefix))
            self._find_supergroups(traced, prefix)
            return traced
        own_ops = record.float_ops if record is not None else []
        if own_ops and not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            intercept_functional_ops(module, own_ops)
        else:
            for op_name, count in sorted(Counter(function_name(op) for op in own_ops).items()):
                self._notes.append(
                    CoverageNote(
                        f"{name or '<model>'}:{op_name}", op_name,
                        f"called {count}x by a container that could not be traced ({reason}): stays in float",
                    )
                )
        for child_name, child in list(module.named_children()):
            replacement = self._capture(child, f"{prefix}{child_name}.", records)
            if replacement is not child:
                setattr(module, child_name, replacement)
        return module

    def _find_supergroups(self, traced: fx.GraphModule, prefix: str) -> None:
        """Mark ops whose output the hardware never materialises (fused into the next op of a supergroup)."""
        def op_type(node: fx.Node) -> str | None:
            if node.op != "call_module":
                return None
            return module_op_type(traced.get_submodule(node.target))

        def is_pass_through_node(node: fx.Node) -> bool:
            return node.op == "call_module" and is_pass_through(traced.get_submodule(node.target))

        for node in traced.graph.nodes:
            for pattern in self.config.supergroups:
                chain = [node]
                while len(chain) < len(pattern) and op_type(chain[-1]) == pattern[len(chain) - 1]:
                    users = list(chain[-1].users)
                    while len(users) == 1 and is_pass_through_node(users[0]):  # Dropout/Identity between fused ops
                        users = list(users[0].users)
                    if len(users) != 1:
                        break
                    chain.append(users[0])
                if len(chain) == len(pattern) and [op_type(n) for n in chain] == list(pattern):
                    for member in chain[:-1]:
                        self._supergroup_members[f"{prefix}{member.target}"] = "+".join(pattern)

    def _wrap(self, name: str, module: nn.Module, records: dict[str, CallRecord]) -> None:
        if isinstance(module, QuantizedModule) or not is_leaf(module) or not name:
            return
        if type(module) is nn.Module or type(module).__name__ == "GuardsFn":
            return  # parameter holders and input-shape guards of torch.export graphs compute nothing to quantize
        record = records.get(name)
        if is_pass_through(module):
            self._notes.append(CoverageNote(name, type(module).__name__, "pass-through: output holds input values"))
            return
        op_type = module_op_type(module)
        if op_type is None:
            self._notes.append(
                CoverageNote(
                    name, type(module).__name__,
                    "no quantization rule for this module type: stays in float "
                    "(edgequant.register_module(type) quantizes it as a leaf)",
                )
            )
            return
        if record is None:
            self._notes.append(CoverageNote(name, op_type, "not executed with dummy_input: left unquantized"))
            return
        make_quantized(module, op_type)
        for param_name, param in list(module.named_parameters(recurse=False)):
            rule = self.config.param_rule(op_type, param_name)
            if not rule.quantized:
                self._notes.append(CoverageNote(f"{name}.{param_name}", op_type, "not quantized by the config"))
                continue
            axis = self._channel_axis(module, param) if rule.per_channel else None
            module.param_quantizers[param_name] = Quantizer(
                rule.bitwidth or self.param_bw, rule.symmetric, axis, self.quant_scheme, for_params=True,
                name=f"{name}.param_quantizers.{param_name}",
            )
        input_rule = self.config.input_rule(op_type)
        if input_rule.quantized:
            for index in record.float_inputs:
                module.input_quantizers[str(index)] = self._activation_quantizer(
                    input_rule, f"{name}.input_quantizers.{index}"
                )
        output_rule = self.config.output_rule(op_type)
        fused_into = self._supergroup_members.get(name)
        for index in range(record.num_float_outputs):
            tensor = f"{name}.output[{index}]" if record.num_float_outputs > 1 else name
            if fused_into:
                self._notes.append(CoverageNote(tensor, op_type, f"fused with the next op (supergroup {fused_into})"))
            elif not output_rule.quantized:
                self._notes.append(CoverageNote(tensor, op_type, f"the config does not quantize {op_type} outputs"))
            else:
                quantizer = self._activation_quantizer(output_rule, f"{name}.output_quantizers.{index}")
                # built-in ops return fresh tensors; a user's module might return its input unchanged
                quantizer.reuse_input_memory = not is_custom_module(module)
                module.output_quantizers[str(index)] = quantizer

    def _activation_quantizer(self, rule: Any, name: str) -> Quantizer:
        return Quantizer(
            rule.bitwidth or self.output_bw, rule.symmetric, None, self.quant_scheme,
            min_constraint=rule.min_constraint, max_constraint=rule.max_constraint, name=name,
        )

    @staticmethod
    def _channel_axis(module: nn.Module, param: torch.Tensor) -> int | None:
        """Output-channel axis of a weight (1 for transposed convs); 1-D params stay per-tensor."""
        if param.dim() < 2:
            return None
        return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0

    def _add_model_input_quantizers(self, record: CallRecord | None) -> None:
        if not self.config.model_input_quantized or record is None:
            return
        quantizers = nn.ModuleDict()
        rule = self.config.output_rule("__model_input__")
        for index in record.float_inputs:
            quantizers[str(index)] = self._activation_quantizer(rule, f"model_input_quantizers.{index}")
        for key, value in self._dummy_kwargs.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                quantizers[key] = self._activation_quantizer(rule, f"model_input_quantizers.{key}")
        if quantizers and isinstance(self.model, nn.Sequential):  # a child would join the Sequential's pipeline
            self._notes.append(CoverageNote("<model input>", "input", "untraceable nn.Sequential root: not quantized"))
        elif quantizers:
            self.model.model_input_quantizers = quantizers
            self.model.register_forward_pre_hook(_quantize_model_inputs, with_kwargs=True)

    # -- inspection ------------------------------------------------------------------------------------
    def quantizers(self) -> dict[str, Quantizer]:
        """Every quantizer by its full name, e.g. ``layer1.0.conv1.param_quantizers.weight``."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, Quantizer)}

    def quantized_modules(self) -> dict[str, QuantizedModule]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, QuantizedModule)}

    def coverage(self) -> list[CoverageEntry]:
        """Every tensor of the captured model: quantized or not, and why not."""
        entries = []
        for name, quantizer in self.quantizers().items():
            owner, _, _ = _split_quantizer_name(name)
            op = getattr(self.model.get_submodule(owner), "onnx_op_type", "model input") if owner else "model input"
            reason = "" if quantizer.enabled else "quantizer disabled"
            entries.append(CoverageEntry(name, op, quantizer.enabled, name, reason))
        entries += [CoverageEntry(n.tensor, n.op, False, None, n.reason) for n in self._notes]
        return entries

    def coverage_summary(self) -> str:
        """Human-readable coverage report: counts, then every tensor left in float with its reason."""
        entries = self.coverage()
        quantized = sum(e.quantized for e in entries)
        lines = [f"{quantized} of {len(entries)} tensors quantized; not quantized:"]
        lines += [f"  {e.tensor:<50} {e.op:<20} {e.reason}" for e in entries if not e.quantized]
        return "\n".join(lines)

    # -- calibration -----------------------------------------------------------------------------------
    def compute_encodings(self, forward_fn: Callable[..., Any], *forward_args: Any) -> None:
        """Calibrate: ``forward_fn(sim.model, *forward_args)`` runs representative data (AIMET-style)."""
        activation_quantizers = self._activation_quantizers_to_calibrate()
        observing = [q for q in self.quantizers().values() if not q.frozen]
        for quantizer in activation_quantizers:
            quantizer.analyzer.reset()
        for quantizer in observing:  # the calibration pass runs the float model
            quantizer.calibrating = True
        try:
            with torch.no_grad():
                forward_fn(self.model, *forward_args)
        finally:
            for quantizer in observing:
                quantizer.calibrating = False
        self.compute_param_encodings()
        failures = []
        for quantizer in activation_quantizers:
            try:
                quantizer.compute_encoding()
            except CalibrationError as error:
                failures.append(str(error))
            if quantizer.analyzer.num_nonfinite:
                warnings.warn(
                    f"quantizer '{quantizer.name}' ignored {quantizer.analyzer.num_nonfinite} non-finite values "
                    "(NaN/inf) during calibration",
                    stacklevel=2,
                )
        if failures:
            raise CalibrationError("calibration failed for:\n  " + "\n  ".join(failures))

    def compute_param_encodings(self) -> None:
        """(Re)compute the encodings of all non-frozen parameter quantizers from the current weights."""
        for module in self.quantized_modules().values():
            for param_name, quantizer in module.param_quantizers.items():
                if quantizer.frozen:
                    continue
                param = module._parameters[param_name]
                if not torch.isfinite(param).all():
                    raise CalibrationError(
                        f"parameter '{quantizer.name.replace('.param_quantizers', '')}' contains NaN/inf values; "
                        "fix the model's weights before quantizing"
                    )
                quantizer.analyzer.reset()
                quantizer.analyzer.observe(param.detach())
                quantizer.compute_encoding()

    def _activation_quantizers_to_calibrate(self) -> list[Quantizer]:
        return [
            q for name, q in self.quantizers().items()
            if ".param_quantizers." not in name and not q.frozen
        ]

    def calibrate(self, data: Iterable[Any], num_batches: int | None = None, progress: bool = True) -> None:
        """Calibrate on an iterable of batches (tensors, tuples whose leading items are the model inputs
        — labels are ignored — or dicts of keyword inputs)."""

        def run(model: nn.Module) -> None:
            seen = 0
            total = num_batches if num_batches is not None else (len(data) if hasattr(data, "__len__") else None)
            for index, batch in enumerate(tqdm(data, total=total, desc="calibrating", disable=not progress)):
                if num_batches is not None and index >= num_batches:
                    break
                args, kwargs = self._batch_to_call(batch, index)
                try:
                    model(*args, **kwargs)
                except Exception as error:
                    raise CalibrationError(
                        f"calibration batch {index} does not run through the model ({type(error).__name__}: "
                        f"{error}); batches must have the structure, shape and dtype of dummy_input"
                    ) from error
                seen += 1
            if seen == 0:
                raise CalibrationError("the calibration data yielded no batch; pass at least one batch")

        self.compute_encodings(run)

    def _batch_to_call(self, batch: Any, index: int) -> tuple[tuple, dict]:
        device = next((t.device for t in self._dummy_args if isinstance(t, torch.Tensor)), None)
        if isinstance(batch, dict):
            kwargs = {k: batch[k] for k in self._dummy_kwargs} if self._dummy_kwargs else dict(batch)
            args: tuple = ()
        elif isinstance(batch, (tuple, list)):
            args, kwargs = tuple(batch[: max(1, len(self._dummy_args))]), {}
        else:
            args, kwargs = (batch,), {}
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise CalibrationError(
                    f"calibration batch {index} contains NaN or inf values; clean the data before calibrating"
                )
        if device is not None:
            args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return args, kwargs

    # -- editing ---------------------------------------------------------------------------------------
    def select(self, pattern: str = "*", kinds: Iterable[str] = ("input", "param", "output"),
               module_types: tuple[type, ...] | None = None) -> dict[str, Quantizer]:
        """Quantizers whose owning module name matches the glob ``pattern`` (and optional module types)."""
        groups = {f"{kind}_quantizers" for kind in kinds}
        selected = {}
        for name, quantizer in self.quantizers().items():
            owner, group, _ = _split_quantizer_name(name)
            kind = "input_quantizers" if group == "model_input_quantizers" else group
            if kind not in groups or not fnmatch.fnmatchcase(owner, pattern):
                continue
            if module_types is not None:
                owner_module = self.model.get_submodule(owner) if owner else self.model
                if not isinstance(owner_module, module_types):
                    continue
            selected[name] = quantizer
        return selected

    def set_enabled(self, enabled: bool, pattern: str = "*", kinds: Iterable[str] = ("input", "param", "output"),
                    module_types: tuple[type, ...] | None = None) -> int:
        """Enable or disable quantizers by module name glob / kind / module type; returns how many changed."""
        selected = self.select(pattern, kinds, module_types)
        for quantizer in selected.values():
            quantizer.enabled = enabled
        return len(selected)

    def freeze_encodings(self, pattern: str = "*") -> None:
        """Keep the selected encodings fixed through later calibration."""
        for quantizer in self.select(pattern).values():
            quantizer.frozen = True

    def set_encoding(self, quantizer_name: str, encoding: Encoding, freeze: bool = True) -> None:
        quantizer = self._quantizer(quantizer_name)
        quantizer.set_encoding(encoding)
        quantizer.frozen = freeze

    def _quantizer(self, name: str) -> Quantizer:
        quantizers = self.quantizers()
        if name not in quantizers:
            close = [n for n in quantizers if name.split(".")[0] in n][:5]
            raise KeyError(f"no quantizer named {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
        return quantizers[name]

    # -- persistence -----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        quantizer_states = {}
        for name, q in self.quantizers().items():
            encoding = q.encoding
            quantizer_states[name] = {
                "enabled": q.enabled, "frozen": q.frozen, "bitwidth": q.bitwidth, "symmetric": q.symmetric,
                "axis": q.axis, "encoding": encoding.to_dict() if encoding is not None else None,
            }
        quantizer_names = set(quantizer_states)
        weights = {
            k: v for k, v in self.model.state_dict().items()
            if not any(k.startswith(q + ".") for q in quantizer_names)
        }
        return {
            "format": STATE_FORMAT, "version": 1, "config": self.config.raw, "param_bw": self.param_bw,
            "output_bw": self.output_bw, "quant_scheme": self.quant_scheme, "quantizers": quantizer_states,
            "model_state": weights,
        }

    def save(self, path: str | Path) -> None:
        """Save encodings, config, which quantizers are on, and the (possibly AdaRounded) weights."""
        torch.save(self.state(), path)

    def load(self, path: str | Path) -> None:
        """Restore a state written by `save` into this sim (built from the same model architecture)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError) as error:
            raise ValueError(f"cannot read sim state from {path}: {error}") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not an edgequant sim state (written by QuantSim.save)")
        quantizers = self.quantizers()
        missing, unexpected = set(quantizers) - set(state["quantizers"]), set(state["quantizers"]) - set(quantizers)
        if missing or unexpected:
            raise ValueError(
                f"{path} was saved from a different model: quantizers missing in the file: {sorted(missing)[:5]}, "
                f"unknown to this sim: {sorted(unexpected)[:5]}"
            )
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self.model.load_state_dict(state["model_state"], strict=False)
        for name, saved in state["quantizers"].items():
            quantizer = quantizers[name]
            quantizer.enabled, quantizer.frozen = saved["enabled"], saved["frozen"]
            quantizer.bitwidth, quantizer.symmetric = saved["bitwidth"], saved["symmetric"]
            quantizer.axis = saved["axis"]
            encoding = saved["encoding"]
            quantizer.set_encoding(Encoding.from_dict(encoding).to(device) if encoding is not None else None)

    # -- integer-kernel emulation (implemented in edgequant.sim.emulation) ---------------------------------
    def emulate(self, runtime: str | RuntimeModel | None) -> EmulationPlan | None:
        """Compute every op the named integer runtime fuses as that runtime does (``"onnxruntime"``,
        ``"fixed-point"`` or a `RuntimeModel`), for output-for-output prediction; ``None`` switches back to the
        default fake-quantized sim. Returns what is emulated and what is not (``plan.summary()``)."""
        if self._emulation is not None:
            uninstall(self._emulation)
            self._emulation = None
        if runtime is None:
            return None
        plan = plan_emulation(self.model, runtime_model(runtime))
        install(plan)
        self._emulation = plan
        return plan

    @property
    def emulation(self) -> EmulationPlan | None:
        """The active emulation plan (``.runtime.name``, ``.ops``, ``.summary()``), None for the default sim."""
        return self._emulation

    # -- export (implemented in edgequant.export) ------------------------------------------------------
    @property
    def dummy_input(self) -> Any:
        """The example input the sim was built with (a dict for keyword inputs, else a tuple)."""
        return dict(self._dummy_kwargs) if self._dummy_kwargs else self._dummy_args

    def export(self, out_dir: str | Path, dummy_input: Any = None, name: str = "model", **options: Any) -> Any:
        """Write the float ONNX model, AIMET encodings and the QDQ model; see `edgequant.export.export_onnx`."""
        from edgequant.export.onnx_export import export_onnx

        return export_onnx(self, out_dir, dummy_input, name, **options)

    def load_encodings(self, path: str | Path, **options: Any) -> Any:
        """Load an AIMET encodings file (0.6.1/1.0.0/2.0.0); see `edgequant.export.load_encodings`."""
        from edgequant.export.load import load_encodings

        return load_encodings(self, path, **options)
