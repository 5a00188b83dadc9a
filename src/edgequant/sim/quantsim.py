"""`QuantSim`: a copy of the user's model with quantizers wherever the target hardware quantizes."""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.fx as fx
from torch import nn

from edgequant.config import HardwareConfig
from edgequant.quantization import (
    CalibrationError,
    Encoding,
    Granularity,
    MethodSpec,
    PerTensor,
    Quantizer,
    calibration_method,
)
from edgequant.quantization.encoding import check_bitwidth
from edgequant.quantization.number_format import NumberFormat
from edgequant.quantization.quantizer import ROLES
from edgequant.sim.batches import ModelInput, iterate_batches, model_device
from edgequant.sim.capture import (
    CallRecord,
    CoverageNote,
    functionalize_graph,
    is_leaf,
    record_calls,
    try_trace,
)
from edgequant.sim.compile_numerics import compile_with_eager_division
from edgequant.sim.distributed import synchronize_statistics
from edgequant.sim.emulation import EmulationPlan, RuntimeModel, install, plan_emulation, runtime_model, uninstall
from edgequant.sim.graph import ModelGraph, build_graph
from edgequant.sim.interception import intercept_functional_ops
from edgequant.sim.model_inputs import quantize_model_inputs
from edgequant.sim.model_outputs import model_output_producers
from edgequant.sim.modes import quantizers_enabled
from edgequant.sim.multihead_attention import quantizable_multihead_attention
from edgequant.sim.onnx_source import ONNX_SOURCE_ATTRIBUTE, OnnxSource
from edgequant.sim.ops import (
    function_name,
    is_custom_module,
    is_data_movement,
    is_pass_through,
    is_zero_padding,
    module_op_type,
    weight_input_axis,
    weight_output_axis,
)
from edgequant.sim.quantized_module import QuantizedModule, make_quantized
from edgequant.sim.segments import SegmentedForward, split_at_layers
from edgequant.sim.services import service
from edgequant.sim.state_file import SimState, read_sim_state, write_sim_state
from edgequant.sim.window_attention import quantizable_window_attention


@dataclass
class CoverageEntry:
    """One tensor of the model: is it quantized, by which quantizer, and if not, why."""

    tensor: str
    op: str
    quantized: bool
    quantizer: str | None
    reason: str
    category: str  # "quantized", "by design" (the hardware keeps it so too) or "left in float" (a gap)
    granularity: str = ""  # the quantizer's (`Granularity.describe`), empty where none quantizes the tensor
    number_format: str = ""  # the quantizer's (``int8 sym``, ``float16``...), empty where none quantizes the tensor


class QuantSim:
    """Quantization simulation of ``model`` for fixed-point hardware.

    ``sim.model`` is an ordinary ``nn.Module`` (a copy unless ``in_place=True``) whose layers and functional
    ops carry `Quantizer` modules as the hardware ``config`` dictates; calibrate it with `compute_encodings`
    or `calibrate`, then evaluate or train it like the original. ``quant_scheme`` is the calibration method: a
    registered name (``"sqnr"``), a method with its settings (``Percentile(99.9)``) or its JSON form;
    ``sim.quant_scheme`` is the method object (``str()`` gives its name and changed settings).
    """

    def __init__(
        self,
        model: nn.Module,
        dummy_input: Any,
        *,
        param_bw: int = 8,
        output_bw: int = 8,
        quant_scheme: MethodSpec = "minmax",
        config: str | Path | dict | HardwareConfig = "default",
        in_place: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"QuantSim expects an nn.Module, got {type(model).__name__}")
        scheme = calibration_method(quant_scheme)
        check_bitwidth(param_bw, "param_bw")
        check_bitwidth(output_bw, "output_bw")
        self.param_bw, self.output_bw, self.quant_scheme = param_bw, output_bw, scheme
        self.config = HardwareConfig.load(config)
        self.onnx_source: OnnxSource | None = getattr(model, ONNX_SOURCE_ATTRIBUTE, None)
        """The ONNX model ``model`` was converted from (`edgequant.onnx.load_onnx`): export writes into its graph."""
        self.model_input = ModelInput.of(dummy_input)
        self._in_place = in_place
        self.model = model if in_place else copy.deepcopy(model)
        self._notes: list[CoverageNote] = []
        self._supergroup_members: dict[str, str] = {}
        self._inputs_fused: dict[str, str] = {}  # layer -> the supergroup pass that fuses all of its inputs
        self._model_outputs: dict[str, set[int]] = {}  # layer -> its float outputs that are the model's outputs
        self._emulation: EmulationPlan | None = None
        self._prepare()

    @classmethod
    def from_onnx(cls, model: str | Path | onnx.ModelProto, dummy_input: Any = None, **options: Any) -> QuantSim:
        """A sim of the ONNX model ``model`` (a path or a ``ModelProto``), converted with `edgequant.onnx.load_onnx`.

        ``dummy_input`` defaults to one batch of the graph inputs' declared shapes (`onnx_dummy_input`); the other
        options are `QuantSim`'s. ``sim.export`` then writes Q/DQ into the original graph, under its own names.
        """
        converted = service("load_onnx", "edgequant.onnx")(model)
        if dummy_input is None:
            dummy_input = service("onnx_dummy_input", "edgequant.onnx")(getattr(converted, ONNX_SOURCE_ATTRIBUTE))
        return cls(converted, dummy_input, **{"in_place": True, **options})  # the converted module is ours

    # -- preparation -----------------------------------------------------------------------------------
    def _prepare(self) -> None:
        training = {name: m.training for name, m in self.model.named_modules()}
        self.model.eval()
        try:
            records = record_calls(self.model, self.model_input.args, self.model_input.kwargs)
        except Exception as error:
            raise ValueError(
                f"the model does not run on dummy_input ({type(error).__name__}: {error}); pass an input with "
                "the shape, dtype and device the model expects (a tuple for several inputs, a dict for kwargs)"
            ) from None
        rewritten = [*quantizable_multihead_attention(self.model, records),
                     *quantizable_window_attention(self.model, records)]
        if rewritten:  # their own calls and outputs, recorded again
            records = record_calls(self.model, self.model_input.args, self.model_input.kwargs)
        captured = self._capture(self.model, "", records)
        if captured is not self.model and self._in_place:  # keep the user's object: it becomes the traced graph
            self.model.__class__, self.model.__dict__ = captured.__class__, captured.__dict__
        else:
            self.model = captured
        records = record_calls(self.model, self.model_input.args, self.model_input.kwargs)
        if self.config.model_output_quantized or self.config.model_output_float:
            self._find_model_outputs()
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
            if "MatmulAdd" in self.config.supergroup_pass_list:
                self._find_matmul_add(traced, prefix)
            return traced
        for child_name, child in list(module.named_children()):  # before interception: it hooks the children
            replacement = self._capture(child, f"{prefix}{child_name}.", records)
            if replacement is not child:
                setattr(module, child_name, replacement)
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
        return module

    def _find_supergroups(self, traced: fx.GraphModule, prefix: str) -> None:
        """Mark ops whose output the hardware never materialises (fused into the next op of a supergroup)."""
        graph = ModelGraph.of_traced(traced, prefix.rstrip("."))
        self._supergroup_members.update(graph.supergroup_members(self.config.supergroups))

    def _find_matmul_add(self, traced: fx.GraphModule, prefix: str) -> None:
        """AIMET's MatmulAdd pass: a MatMul with a constant operand whose only consumer is an Add of a constant
        rank-1 tensor is a Linear layer; the MatMul's output and the Add's inputs (that output and the bias) get
        no quantizer, as AIMET disables them."""
        def op_type(node: fx.Node) -> str | None:
            return module_op_type(traced.get_submodule(node.target)) if node.op == "call_module" else None

        for node in traced.graph.nodes:
            if op_type(node) != "MatMul" or all(_constant(traced, arg) is None for arg in node.args):
                continue
            users = list(node.users)
            if len(users) != 1 or op_type(users[0]) != "Add" or users[0].kwargs or len(users[0].args) != 2:
                continue
            add = users[0]
            bias = _constant(traced, add.args[1] if add.args[0] is node else add.args[0])
            if bias is not None and bias.dim() == 1:
                self._supergroup_members[f"{prefix}{node.target}"] = "pass MatmulAdd"
                self._inputs_fused[f"{prefix}{add.target}"] = "MatmulAdd"

    def _find_model_outputs(self) -> None:
        """Which layers compute the model's outputs (for the config's model_output section)."""
        def quantizable(module: nn.Module) -> bool:
            return module_op_type(module) is not None and not is_pass_through(module)

        self._model_outputs, untraced = model_output_producers(
            self.model, self.model_input.args, self.model_input.kwargs, quantizable
        )
        setting = '"True"' if self.config.model_output_quantized else '"False"'
        for position in untraced:
            warnings.warn(
                f"model output {position} is not computed by a quantizable op (it is a model input, or a copy made by "
                f"data movement such as contiguous()): model_output.is_output_quantized {setting} does not apply to it",
                stacklevel=4,
            )

    def _wrap(self, name: str, module: nn.Module, records: dict[str, CallRecord]) -> None:
        if isinstance(module, QuantizedModule) or not is_leaf(module) or not name:
            return
        if type(module) is nn.Module or type(module).__name__ == "GuardsFn":
            return  # parameter holders and input-shape guards of torch.export graphs compute nothing to quantize
        record = records.get(name)
        if is_pass_through(module):
            note = CoverageNote(name, type(module).__name__, "pass-through: output holds input values", True)
            self._notes.append(note)
            return
        if is_zero_padding(module):
            reason = "zero padding: the runtime folds it into the next convolution's padding"
            self._notes.append(CoverageNote(name, type(module).__name__, reason, True))
            return
        op_type = module_op_type(module)
        float_reason = getattr(module, "float_reason", None)  # a module that says why it cannot be quantized
        if float_reason is not None:
            self._notes.append(CoverageNote(name, type(module).__name__, float_reason))
            return
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
                self._notes.append(CoverageNote(f"{name}.{param_name}", op_type, "not quantized by the config", True))
                continue
            granularity = _param_granularity(rule.granularity, module, param, f"{name}.{param_name}")
            module.param_quantizers[param_name] = Quantizer(
                rule.bitwidth or self.param_bw, rule.symmetric, granularity, self.quant_scheme, role="param",
                owner=name, key=param_name, strict_symmetric=rule.strict_symmetric,
                unsigned_symmetric=rule.unsigned_symmetric, float_format=rule.float_format,
            )
        input_rule = self.config.input_rule(op_type)
        if input_rule.quantized and name in self._inputs_fused:
            reason = f"inputs fused into this op (supergroup pass {self._inputs_fused[name]})"
            self._notes.append(CoverageNote(f"{name}.inputs", op_type, reason, True))
        elif input_rule.quantized:
            for index in record.float_inputs:
                module.input_quantizers[str(index)] = self._activation_quantizer(input_rule, "input", name, index)
        output_rule = self.config.output_rule(op_type)
        fused_into = self._supergroup_members.get(name)
        model_outputs = self._model_outputs.get(name, set())
        for index in range(record.num_float_outputs):
            tensor = f"{name}.output[{index}]" if record.num_float_outputs > 1 else name
            forced = index in model_outputs and self.config.model_output_quantized
            if index in model_outputs and self.config.model_output_float:
                reason = 'model output, and the config\'s model_output.is_output_quantized is "False"'
                self._notes.append(CoverageNote(tensor, op_type, reason, True))
            elif fused_into and not forced:
                reason = f"fused with the next op (supergroup {fused_into})"
                self._notes.append(CoverageNote(tensor, op_type, reason, True))
            elif not output_rule.quantized and not forced:
                reason = f"the config does not quantize {op_type} outputs"
                self._notes.append(CoverageNote(tensor, op_type, reason, True))
            else:
                quantizer = self._activation_quantizer(output_rule, "output", name, index)
                # built-in ops return fresh tensors; a user's module might return its input unchanged
                quantizer.reuse_input_memory = not is_custom_module(module)
                module.output_quantizers[str(index)] = quantizer

    def _activation_quantizer(self, rule: Any, role: str, owner: str, key: int | str) -> Quantizer:
        return Quantizer(
            rule.bitwidth or self.output_bw, rule.symmetric, rule.granularity, self.quant_scheme, role=role,
            owner=owner, key=str(key), min_constraint=rule.min_constraint, max_constraint=rule.max_constraint,
            strict_symmetric=rule.strict_symmetric, unsigned_symmetric=rule.unsigned_symmetric,
            float_format=rule.float_format,
        )

    def _add_model_input_quantizers(self, record: CallRecord | None) -> None:
        if not self.config.model_input_quantized or record is None:
            return
        quantizers = nn.ModuleDict()
        rule = self.config.output_rule("__model_input__")
        for index in record.float_inputs:
            quantizers[str(index)] = self._activation_quantizer(rule, "model_input", "", index)
        for key, value in self.model_input.kwargs.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                quantizers[key] = self._activation_quantizer(rule, "model_input", "", key)
        if quantizers and isinstance(self.model, nn.Sequential):  # a child would join the Sequential's pipeline
            self._notes.append(CoverageNote("<model input>", "input", "untraceable nn.Sequential root: not quantized"))
        elif quantizers:
            quantize_model_inputs(self.model, quantizers)

    # -- inspection ------------------------------------------------------------------------------------
    def quantizers(self, role: str | Iterable[str] | None = None) -> dict[str, Quantizer]:
        """Quantizers by full name (e.g. ``layer1.0.conv1.param_quantizers.weight``), optionally only those of
        ``role`` (``"model_input"``, ``"input"``, ``"param"``, ``"output"``, or several)."""
        roles = _roles(role)
        return {
            name: m for name, m in self.model.named_modules() if isinstance(m, Quantizer) and m.role in roles
        }

    def quantized_modules(self) -> dict[str, QuantizedModule]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, QuantizedModule)}

    def layer_of(self, quantizer: Quantizer) -> nn.Module:
        """The module a quantizer belongs to (the root model for model-input quantizers)."""
        return self.model.get_submodule(quantizer.owner) if quantizer.owner else self.model

    def graph(self) -> ModelGraph:
        """Who feeds whom in ``sim.model`` (run on the dummy input, quantizers bypassed)."""
        with self._weights_unfrozen():  # PTQ techniques read the layers' weights through the graph
            return build_graph(self.model, self.dummy_input)

    def split_at_layers(self, layers: Iterable[str]) -> SegmentedForward | None:
        """``sim.model``'s forward split before the first call of each of ``layers``, to rerun only what lies
        downstream of a layer (see `edgequant.sim.segments`); None where the model is not one traced graph."""
        return split_at_layers(self.model, list(layers))

    @property
    def dummy_input(self) -> Any:
        """The example input the sim was built with (a dict for keyword inputs, else a tuple)."""
        return self.model_input.example

    @property
    def device(self) -> torch.device:
        """Where ``sim.model`` lives (batches are moved there)."""
        return model_device(self.model)

    def coverage(self) -> list[CoverageEntry]:
        """Every tensor of the captured model: quantized or not, and why not."""
        entries = []
        for name, quantizer in self.quantizers().items():
            op = getattr(self.layer_of(quantizer), "onnx_op_type", "model input") if quantizer.owner else "model input"
            reason = "" if quantizer.enabled else "quantizer disabled"
            category = "quantized" if quantizer.enabled else "left in float"
            entries.append(CoverageEntry(name, op, quantizer.enabled, name, reason, category,
                                         quantizer.granularity.describe(), quantizer.number_format.describe()))
        entries += [
            CoverageEntry(n.tensor, n.op, False, None, n.reason, "by design" if n.by_design else "left in float")
            for n in self._notes
        ]
        return entries

    def coverage_summary(self) -> str:
        """Human-readable coverage report: counts, the gaps (left in float) first, then what is float by design."""
        entries = self.coverage()
        gaps = [e for e in entries if e.category == "left in float"]
        by_design = [e for e in entries if e.category == "by design"]
        quantized = len(entries) - len(gaps) - len(by_design)
        lines = [f"{quantized} of {len(entries)} tensors quantized, {len(by_design)} float by design, "
                 f"{len(gaps)} left in float"]
        weights = Counter(q.granularity.describe() for q in self.quantizers(role="param").values() if q.enabled)
        if weights:
            lines.append("parameters: " + ", ".join(f"{count} {kind}" for kind, count in sorted(weights.items())))
        enabled = [q for q in self.quantizers().values() if q.enabled]
        if any(q.float_format is not None for q in enabled):  # all-integer sims keep the summary they always had
            formats = Counter(q.number_format.describe() for q in enabled)
            lines.append("formats: " + ", ".join(f"{count} {kind}" for kind, count in sorted(formats.items())))
        for title, group in (("left in float (gaps):", gaps), ("float by design:", by_design)):
            if group:
                lines.append(title)
                lines += [f"  {e.tensor:<50} {e.op:<20} {e.reason}" for e in group]
        return "\n".join(lines)

    # -- batches ---------------------------------------------------------------------------------------
    def batches(
        self, data: Iterable[Any], num_batches: int | None = None, *, progress: bool = False, desc: str = "batches",
        error: type[Exception] = ValueError,
    ) -> Iterator[tuple[tuple, dict]]:
        """Up to ``num_batches`` batches of ``data`` as ``(args, kwargs)`` for ``sim.model``, on its device.

        Batches are tensors, tuples whose leading items are the model inputs (labels are ignored), or dicts of
        keyword inputs. No batch at all, or one with NaN/inf inputs, raises ``error`` naming the batch."""
        return iterate_batches(data, self.model_input, self.device, num_batches=num_batches, progress=progress,
                               desc=desc, error=error)

    # -- calibration -----------------------------------------------------------------------------------
    @contextmanager
    def calibrating(self) -> Iterator[None]:
        """Observe what the model computes inside the block, then compute the encodings on exit.

        ``with sim.calibrating(): my_loop(sim.model)`` — the model runs in float (quantizers only observe)
        and without gradients. Frozen encodings are kept. In an initialised ``torch.distributed`` process
        group the statistics of all ranks are merged, so every rank ends with the same encodings."""
        with self._weights_unfrozen(), self._observing():  # calibration runs the float weights
            yield

    @contextmanager
    def _observing(self) -> Iterator[None]:
        activation_quantizers = [q for q in self.quantizers(role=("model_input", "input", "output")).values()
                                 if not q.frozen]
        observing = [q for q in self.quantizers().values() if not q.frozen]
        for quantizer in activation_quantizers:
            quantizer.analyzer.reset()
        for quantizer in observing:  # the calibration pass runs the float model
            quantizer.calibrating = True
        try:
            with torch.no_grad():
                yield
        finally:
            for quantizer in observing:
                quantizer.calibrating = False
        synchronize_statistics(activation_quantizers)
        self._compute_param_encodings()
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
                    stacklevel=5,  # the user's `with sim.calibrating()` line
                )
        if failures:
            raise CalibrationError("calibration failed for:\n  " + "\n  ".join(failures))

    def compute_encodings(self, forward_fn: Callable[..., Any], *forward_args: Any) -> None:
        """Calibrate: ``forward_fn(sim.model, *forward_args)`` runs representative data (AIMET-style)."""
        with self.calibrating():
            forward_fn(self.model, *forward_args)

    def calibrate(self, data: Iterable[Any], num_batches: int | None = None, progress: bool = True,
                  engine: str = "auto") -> None:
        """Calibrate on an iterable of batches (see `batches`).

        ``engine="auto"``: a sim built from an ONNX file computes the min-max statistics ONNX Runtime can compute
        (the same float tensors) in one ORT session, which is faster than the converted module, and runs
        ``sim.model`` only for the other quantizers (see `edgequant.onnx.calibration`); other sims run ``sim.model``.
        ``engine="torch"``: always ``sim.model``."""
        if engine not in ("auto", "torch"):
            raise ValueError(f"engine must be 'auto' or 'torch', got {engine!r}")
        with self.calibrating():
            batches = self.batches(data, num_batches, progress=progress, desc="calibrating", error=CalibrationError)
            if engine == "auto" and self.onnx_source is not None:
                service("calibrate_in_onnxruntime", "edgequant.onnx")(self, batches, self._calibration_step)
                return
            for index, (args, kwargs) in enumerate(batches):
                self._calibration_step(index, args, kwargs)

    def _calibration_step(self, index: int, args: tuple, kwargs: dict) -> None:
        try:
            self.model(*args, **kwargs)
        except Exception as error:
            raise CalibrationError(
                f"calibration batch {index} does not run through the model ({type(error).__name__}: "
                f"{error}); batches must have the structure, shape and dtype of dummy_input"
            ) from error

    def compute_param_encodings(self) -> None:
        """(Re)compute the encodings of all non-frozen parameter quantizers from the current weights."""
        with self._weights_unfrozen():
            self._compute_param_encodings()

    def _compute_param_encodings(self) -> None:
        for quantizer in self.quantizers(role="param").values():
            if quantizer.frozen:
                continue
            param = getattr(self.layer_of(quantizer), quantizer.key)
            try:
                quantizer.encode_from(param)  # its analyzer counts the non-finite values it leaves out
            except CalibrationError:
                _require_finite_param(quantizer, param)  # the clearer error where NaN/inf left no data
                raise
            if quantizer.analyzer.num_nonfinite:
                _require_finite_param(quantizer, param)

    # -- editing ---------------------------------------------------------------------------------------
    def select(self, pattern: str = "*", kinds: Iterable[str] = ("input", "param", "output"),
               module_types: tuple[type, ...] | None = None) -> dict[str, Quantizer]:
        """Quantizers whose owning layer name matches the glob ``pattern``, of the roles ``kinds`` (``"input"``
        includes the model's inputs) and optional module types. Matching nothing is an error."""
        kinds = tuple(kinds)
        roles = set(_roles(kinds)) | ({"model_input"} if "input" in kinds else set())
        selected = {}
        for name, quantizer in self.quantizers(role=roles).items():
            if not fnmatch.fnmatchcase(quantizer.owner, pattern):
                continue
            if module_types is not None and not isinstance(self.layer_of(quantizer), module_types):
                continue
            selected[name] = quantizer
        if not selected:
            layers = sorted({q.owner for q in self.quantizers().values() if q.owner})
            close = [n for n in layers if pattern.strip("*").split(".")[0] in n][:5] or layers[:5]
            raise KeyError(
                f"no quantizer of kinds {list(kinds)} belongs to a layer matching {pattern!r}"
                + (f" of type {[t.__name__ for t in module_types]}" if module_types else "")
                + f"; layers are named like: {', '.join(close)}"
            )
        return selected

    def set_enabled(self, enabled: bool, pattern: str = "*", kinds: Iterable[str] = ("input", "param", "output"),
                    module_types: tuple[type, ...] | None = None) -> int:
        """Enable or disable quantizers by layer name glob / kind / module type; returns how many were selected."""
        selected = self.select(pattern, kinds, module_types)
        for quantizer in selected.values():
            quantizer.enabled = enabled
        return len(selected)

    def set_granularity(self, pattern: str, granularity: Granularity,
                        module_types: tuple[type, ...] | None = None) -> list[str]:
        """Rebuild the weight quantizers (parameters of 2 dims or more) of the layers matching the glob ``pattern``
        with ``granularity`` (``PerBlock(64)``, ``Lpbq(64, decompressed_bw=8)``, ``PerChannel()``...; axes left open
        are the layer's: channels on its output channels, blocks along its input channels). Bitwidth, symmetry,
        calibration method and enabled flag carry over; a quantizer that had an encoding gets a new one computed
        from its weight (frozen encodings are dropped: they were for the old layout). Returns the rebuilt
        quantizers' names; a pattern matching no weight quantizer, or a block size that does not divide a
        weight, is an error naming the layer."""
        selected = {name: q for name, q in self.select(pattern, ("param",), module_types).items()
                    if getattr(self.layer_of(q), q.key).dim() >= 2}
        if not selected:
            raise KeyError(f"the layers matching {pattern!r} have no quantized weight of 2 dims or more")
        rebuilt = {}
        for name, old in selected.items():  # check every layer before changing any
            module = self.layer_of(old)
            param = getattr(module, old.key)
            bound = _param_granularity(granularity, module, param, name)
            quantizer = Quantizer(
                old.bitwidth, old.symmetric, bound, old.calibration, role="param", owner=old.owner, key=old.key,
                min_constraint=old.min_constraint, max_constraint=old.max_constraint,
                strict_symmetric=old.strict_symmetric, unsigned_symmetric=old.unsigned_symmetric,
                float_format=old.float_format,
            )
            quantizer.enabled = old.enabled
            rebuilt[name] = (module, quantizer, old.scale is not None)
        with self._weights_unfrozen():
            for module, quantizer, had_encoding in rebuilt.values():
                module.param_quantizers[quantizer.key] = quantizer
                if had_encoding:
                    quantizer.encode_from(getattr(module, quantizer.key))
        return list(rebuilt)

    def set_format(self, pattern: str, number_format: NumberFormat,
                   kinds: Iterable[str] = ("input", "param", "output"),
                   module_types: tuple[type, ...] | None = None) -> list[str]:
        """Give the quantizers selected as in `select` the ``number_format`` (``FloatFormat("float16")``,
        ``FloatFormat("float8_e4m3")``, ``IntegerFormat(8, True)``...). Their encodings are for the old grid and go
        (frozen ones too); a quantizer that had one gets one in the new format, a weight's from its weight, an
        activation's from the statistics of the last calibration (without them, as in a loaded sim, it needs
        calibrating). Returns the selected quantizers' names; a format that does not fit a quantizer (an fp8 scale
        on blocks) fails before any changes."""
        selected = self.select(pattern, kinds, module_types)
        for quantizer in selected.values():  # check every quantizer before changing any
            quantizer.check_format(number_format)
        with self._weights_unfrozen():
            for quantizer in selected.values():
                had_encoding = quantizer.ready
                quantizer.number_format = number_format
                quantizer.frozen = False
                if not had_encoding:
                    continue
                if quantizer.role == "param":
                    quantizer.encode_from(getattr(self.layer_of(quantizer), quantizer.key))
                elif quantizer.analyzer.min is not None:
                    quantizer.compute_encoding()
        return list(selected)

    def quantizers_enabled(self, enabled: bool, quantizers: Iterable[Quantizer] | None = None):  # noqa: ANN201
        """Context manager: ``quantizers`` (default: all) on or off inside the block, restored after."""
        return quantizers_enabled(self.quantizers().values() if quantizers is None else quantizers, enabled)

    def freeze_encodings(self, pattern: str = "*") -> None:
        """Keep the selected encodings fixed through later calibration."""
        for quantizer in self.select(pattern).values():
            quantizer.frozen = True

    def set_encoding(self, quantizer_name: str, encoding: Encoding, freeze: bool = True) -> None:
        quantizer = self.quantizer(quantizer_name)
        with self._weights_unfrozen():
            quantizer.set_encoding(encoding)
        quantizer.frozen = freeze

    def quantizer(self, name: str) -> Quantizer:
        """One quantizer by full name; an unknown name raises a KeyError listing similar names."""
        quantizers = self.quantizers()
        if name not in quantizers:
            close = [n for n in quantizers if name.split(".")[0] in n][:5]
            raise KeyError(f"no quantizer named {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
        return quantizers[name]

    # -- frozen weights ----------------------------------------------------------------------------------
    def freeze_weights(self) -> None:
        """Fold the fake-quantized weights into the layers, as deployment does, so that evaluation quantizes no
        weight per forward (and ``torch.compile`` sees plain tensors). Evaluation only: run under
        ``torch.no_grad()``. Undo with `unfreeze_weights` (or use ``with sim.frozen_weights():``).

        The folded values cannot go stale: until unfrozen, the float weights and their encodings are sealed, so
        reading or writing them through the model (``.data`` edits and PTQ techniques included) raises
        `SealedTensorError` naming the way out; a disabled or calibrating quantizer runs its float weight;
        ``load_state_dict``, ``.to()`` and a changed bitwidth fold in again at the next forward; this sim's own
        methods that change weights or encodings unfreeze around themselves. State dicts hold the float weights."""
        for module in self.quantized_modules().values():
            module.freeze_quantized_params()

    def unfreeze_weights(self) -> None:
        """Put the float weights back (quantized per forward, trainable)."""
        for module in self.quantized_modules().values():
            module.thaw_quantized_params()

    @property
    def weights_frozen(self) -> bool:
        return any(module.params_frozen for module in self.quantized_modules().values())

    @contextmanager
    def frozen_weights(self) -> Iterator[None]:
        """``with sim.frozen_weights(): evaluate(sim.model)`` — `freeze_weights` inside the block only."""
        self.freeze_weights()
        try:
            yield
        finally:
            self.unfreeze_weights()

    # -- compilation -----------------------------------------------------------------------------------
    def compile(self, **kwargs: Any) -> nn.Module:
        """``torch.compile(sim.model, **kwargs)`` that reproduces the eager sim bit for bit on CUDA too.

        Inductor's Triton code divides approximately unless its ``eager_numerics.division_rounding`` is set;
        this passes it as an option of the returned module only, so other models the process compiles keep
        Inductor's defaults (see `edgequant.sim.compile_numerics`). A plain ``torch.compile(sim.model)`` is one
        graph too, and bit-identical on the CPU."""
        return compile_with_eager_division(self.model, **kwargs)

    @contextmanager
    def _weights_unfrozen(self) -> Iterator[None]:
        """For methods that read the float weights or write weights or encodings: fold in again after them."""
        was_frozen = self.weights_frozen
        self.unfreeze_weights()
        try:
            yield
        finally:
            if was_frozen:
                self.freeze_weights()

    # -- persistence -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Save the settings and ``sim.model.state_dict()`` (weights, encodings, quantizer flags), with one
        checksum over both; `load` reads it without running any code from the file."""
        settings = {"config": self.config.raw, "param_bw": self.param_bw, "output_bw": self.output_bw,
                    "quant_scheme": self.quant_scheme.to_json()}
        write_sim_state(path, settings, self.model.state_dict())

    def load(self, source: str | Path | SimState) -> None:
        """Restore a state written by `save` into this sim (built from the same model architecture).

        The file is read with ``torch.load(weights_only=True)``: one holding anything but tensors and plain values
        is refused (`UnsafeFileError`) before any of it is used; format, version and checksum are checked next.
        ``source`` may also be a `SimState` already read with `read_sim_state`."""
        state = source if isinstance(source, SimState) else read_sim_state(source)
        quantizers = self.quantizers()
        saved = {k.removesuffix("._extra_state") for k in state.state_dict if k.endswith("._extra_state")}
        missing, unexpected = set(quantizers) - saved, saved - set(quantizers)
        if missing or unexpected:
            raise ValueError(
                f"{state.origin} was saved from a different model: quantizers missing in the file: "
                f"{sorted(missing)[:5]}, unknown to this sim: {sorted(unexpected)[:5]}"
            )
        result = self.model.load_state_dict(state.state_dict, strict=False)  # frozen weights fold in again after it
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{state.origin} does not fit this model: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )

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
        plan = plan_emulation(self.model, runtime_model(runtime), self.model_input.args, self.model_input.kwargs)
        install(plan)
        self._emulation = plan
        return plan

    @property
    def emulation(self) -> EmulationPlan | None:
        """The active emulation plan (``.runtime.name``, ``.ops``, ``.summary()``), None for the default sim."""
        return self._emulation

    # -- services of higher layers (registered by edgequant.export) -------------------------------------
    def export(self, out_dir: str | Path, dummy_input: Any = None, name: str = "model", **options: Any) -> Any:
        """Write the float ONNX model, AIMET encodings and the QDQ model; see `edgequant.export.export_onnx`."""
        with self._weights_unfrozen():
            return service("export", "edgequant.export")(self, out_dir, dummy_input, name, **options)

    def load_encodings(self, path: str | Path, **options: Any) -> Any:
        """Load an AIMET encodings file (0.6.1/1.0.0/2.0.0); see `edgequant.export.load_encodings`."""
        with self._weights_unfrozen():
            return service("load_encodings", "edgequant.export")(self, path, **options)


def _constant(traced: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The parameter or buffer ``node`` reads, through data movement (``w.t()``); None for computed values."""
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and is_data_movement(node.target):
        if len(node.all_input_nodes) != 1:
            return None
        node = node.all_input_nodes[0]
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    owner, _, attribute = node.target.rpartition(".")
    value = getattr(traced.get_submodule(owner), attribute, None)
    return value if isinstance(value, torch.Tensor) else None


def _param_granularity(requested: Granularity, module: nn.Module, param: torch.Tensor, what: str) -> Granularity:
    """``requested`` with the axes it leaves open taken from the layer; a parameter without channels (fewer than 2
    dims: biases, norms' scales) is per tensor. A shape the granularity does not fit fails here, naming ``what``."""
    if param.dim() < 2:
        return PerTensor()
    granularity = requested.bind(weight_output_axis(module, param), weight_input_axis(module, param))
    granularity.scale_shape(param.shape, what)
    return granularity


def _require_finite_param(quantizer: Quantizer, param: torch.Tensor) -> None:
    if not bool(torch.isfinite(param.detach()).all()):
        raise CalibrationError(f"parameter '{quantizer.owner}.{quantizer.key}' contains NaN/inf values; "
                               "fix the model's weights before quantizing")


def _roles(role: str | Iterable[str] | None) -> tuple[str, ...]:
    roles = ROLES if role is None else ((role,) if isinstance(role, str) else tuple(role))
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown quantizer role(s) {unknown}; roles are {', '.join(ROLES)}")
    return roles
