"""`load_encodings`: put the encodings of an AIMET-format file (ours or AIMET's) into a sim's quantizers.

Each entry of the file names a tensor of the exporter's ONNX graph. It is placed, in this order:

1. by name: parameter encodings by parameter name (``conv.weight``), activation encodings by ONNX tensor name
   through the same quantizer-to-tensor mapping the export uses, so a sim reloaded from its own export
   reproduces its outputs bit for bit;
2. through the graph: when the exporter's names are not ours (AIMET names tensors after its prepared model:
   ``/net/features/features.3/module_add/Add_output_0``, ``getitem_12``, ``855``), the ONNX graph written beside
   the file (``model.onnx`` next to ``model.encodings``) is matched structurally against our own export
   (`edgequant.export.graph_align`): the entry goes to the quantizer of our tensor that computes the same values.

Where the file quantizes a tensor that this sim leaves in float (AIMET fuses Conv+BN but quantizes a depthwise
BN's output that our config fuses into Conv+BN+ReLU6), the module producing it gets an output quantizer. Entries
that cannot be placed are reported with the reason. Loaded encodings are frozen (later calibration keeps them).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
from torch import nn

from edgequant.export.bias import BIAS_BITWIDTH, install_bias_quantizer
from edgequant.export.encodings_io import EncodingsFileError, TensorEncoding, read_encodings
from edgequant.export.graph_align import TRANSPARENT_OPS, align_tensors, load_reference_graph
from edgequant.export.graph_map import TracedSim, consumers, node_by_output
from edgequant.export.original_graph import trace_any
from edgequant.quantization import Encoding, FloatFormat, PerBlock, PerChannel, Quantizer
from edgequant.quantization.granularity import PER_TENSOR
from edgequant.sim.batches import split_model_input
from edgequant.sim.capture import record_calls
from edgequant.sim.ops import weight_input_axis, weight_output_axis

if TYPE_CHECKING:
    from edgequant.sim.quantsim import QuantSim


@dataclass
class LoadReport:
    """Where each entry of the file went, which quantizers got an encoding, and what was left out (and why)."""

    version: str
    loaded: list[str] = field(default_factory=list)
    placed: dict[str, list[str]] = field(default_factory=dict)  # file entry -> quantizers that took its encoding
    matched_by_graph: list[str] = field(default_factory=list)  # entries placed through the ONNX graph, not by name
    added: list[str] = field(default_factory=list)  # quantizers created for tensors the sim left in float
    skipped: dict[str, str] = field(default_factory=dict)
    without_encoding: list[str] = field(default_factory=list)  # sim quantizers the file has no encoding for
    disabled: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"AIMET {self.version} encodings: {len(self.placed)} entries placed on {len(self.loaded)} quantizers "
            f"({len(self.matched_by_graph)} through the ONNX graph, {len(self.added)} new quantizers)"
        ]
        if self.added:
            lines.append(f"  new quantizers (tensors this sim left in float): {', '.join(self.added)}")
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        if self.disabled:
            lines.append(f"  disabled (no encoding in the file): {', '.join(self.disabled)}")
        elif self.without_encoding:
            lines.append(f"  kept without an encoding from the file: {', '.join(self.without_encoding)}")
        return "\n".join(lines)


def _param_quantizer_name(tensor: str) -> str:
    owner, _, param = tensor.rpartition(".")
    return f"{owner}.param_quantizers.{param}"




def _fit_to_quantizer(
    entry: TensorEncoding, quantizer_name: str, quantizer: Quantizer, sim: QuantSim, path: Path
) -> Encoding:
    """Check the entry's shape against the tensor and give per-channel and per-block entries the layer's axes."""
    encoding = entry.encoding
    if encoding.granularity == PER_TENSOR:
        return encoding
    if quantizer.role != "param":
        raise ValueError(
            f"{path}: '{entry.name}' has a {encoding.granularity.describe()} encoding but '{quantizer_name}' quantizes "
            "an activation, which edgequant quantizes per tensor; re-export the encodings with per-tensor activations"
        )
    module = sim.layer_of(quantizer)
    param = module._parameters[quantizer.key]
    if isinstance(encoding.granularity, PerBlock):
        return _fit_per_block(entry, quantizer_name, param, module, path)
    if isinstance(quantizer.granularity, PerChannel):
        granularity = quantizer.granularity
    elif entry.is_param is None:  # 2.0.0 files state the axis
        granularity = encoding.granularity
    else:  # 0.6.1 / 1.0.0 do not: the layer's output-channel axis, as the sim would choose it
        granularity = PerChannel(weight_output_axis(module, param) or 0)
    try:
        fits = granularity.scale_shape(param.shape) == tuple(encoding.scale.shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{path}: '{entry.name}' has {encoding.scale.numel()} per-channel encodings but the parameter has shape "
            f"{tuple(param.shape)} ({granularity.describe()}); the file was written for a different model"
        )
    return Encoding(
        encoding.scale, encoding.offset, encoding.bitwidth, encoding.symmetric, granularity, encoding.strict_symmetric
    )


def _fit_per_block(entry: TensorEncoding, quantizer_name: str, param: nn.Parameter, module: nn.Module,
                   path: Path) -> Encoding:
    """A per-block entry on the layer's axes (channels: its output channels; blocks: along its inputs where the file
    does not say); 1.0.0 values come flat in (channel, block) order, 2.0.0 values with the tensor's layout."""
    encoding = entry.encoding
    granularity = encoding.granularity.bind(weight_output_axis(module, param), weight_input_axis(module, param))
    try:
        if encoding.scale.dim() == 1:
            scale, offset = (granularity.from_channel_major(v, param.shape, quantizer_name)
                             for v in (encoding.scale, encoding.offset))
        elif granularity.scale_shape(param.shape, quantizer_name) == tuple(encoding.scale.shape):
            scale, offset = encoding.scale, encoding.offset
        else:
            raise ValueError(f"per-block scales of shape {tuple(encoding.scale.shape)}")
    except ValueError as error:
        raise ValueError(
            f"{path}: '{entry.name}' ({granularity.describe()}) does not fit the parameter of shape "
            f"{tuple(param.shape)} ({error}); the file was written for a different model"
        ) from None
    return Encoding(scale, offset, encoding.bitwidth, encoding.symmetric, granularity, encoding.strict_symmetric)


def _install_output_probes(sim: QuantSim, dummy_input: Any) -> dict[str, tuple[nn.Module, str]]:
    """Give every float output of a quantized module that has no output quantizer a disabled one (a *probe*),
    so that tracing tells which tensor it would quantize. Returns probe name -> (module, output key)."""
    with sim.quantizers_enabled(False):  # run the float model to count each module's float outputs
        records = record_calls(sim.model, *split_model_input(dummy_input))
    probes = {}
    for module_name, module in sim.quantized_modules().items():
        record = records.get(module_name)
        for index in range(record.num_float_outputs if record is not None else 0):
            key = str(index)
            if key in module.output_quantizers:
                continue
            probe = Quantizer(sim.output_bw, False, PER_TENSOR, sim.quant_scheme, role="output", owner=module_name,
                              key=key)
            probe.enabled = False
            name = probe.name
            module.output_quantizers[key] = probe
            probes[name] = (module, key)
    return probes


class _Placer:
    """Decides which quantizers each file entry goes to (see the module docstring)."""

    def __init__(
        self, entries: list[TensorEncoding], traced: TracedSim, quantizers: dict[str, Quantizer], probes: set[str],
        reference: onnx.ModelProto | None, reference_path: Path | None,
    ) -> None:
        self.traced, self.quantizers, self.probes = traced, quantizers, probes
        self.reference, self.reference_path = reference, reference_path
        self.weight_encodings = {e.name: e.encoding for e in entries if e.is_param is not False}
        self.reference_producers = node_by_output(reference) if reference is not None else {}
        self.reference_consumers = consumers(reference) if reference is not None else {}
        self.placed: dict[str, list[str]] = {}
        self.by_graph: list[str] = []
        self.skipped: dict[str, str] = {}
        self.unplaced: dict[str, str] = {}
        self.taken: dict[str, TensorEncoding] = {}  # quantizer -> entry whose encoding it takes

    @functools.cached_property
    def aligned(self) -> dict[str, list[str]] | None:
        """Exporter's tensor -> our tensors holding its values (None without the exporter's graph); computed
        only when some name is not ours."""
        if self.reference is None:
            return None
        params = {site.tensor for site in self.traced.sites if site.is_param}
        return align_tensors(self.reference, self.traced.float_model, params, self.weight_encodings)

    def candidates(self, entry: TensorEncoding) -> tuple[list[str], list[str], bool]:
        """(real quantizers, probes, found through the graph) acting on the entry's tensor."""
        name = entry.name
        if entry.is_param is not False and _param_quantizer_name(name) in self.quantizers:
            return [_param_quantizer_name(name)], [], False
        found = self.traced.quantizers_of(name)
        by_graph = False
        if not found and self.aligned is not None and name not in self.traced.propagated:
            found = [q for tensor in self.aligned.get(name, []) for q in self.traced.quantizers_of(tensor)]
            by_graph = True
        real = list(dict.fromkeys(q for q in found if q not in self.probes))
        return real, list(dict.fromkeys(q for q in found if q in self.probes)), by_graph

    def is_transparent_output(self, name: str) -> bool:
        producer = self.reference_producers.get(name)
        return producer is not None and producer.op_type in TRANSPARENT_OPS

    def int32_bias_name(self, entry: TensorEncoding) -> str | None:
        """Our name of the bias an int32 entry encodes (its own name, or the bias it matches in the graph)."""
        if entry.encoding.bitwidth != BIAS_BITWIDTH or entry.is_param is False:
            return None
        names = [entry.name] if self.aligned is None else [entry.name, *self.aligned.get(entry.name, [])]
        return next((name for name in names if name.endswith(".bias")), None)

    def place(self, entries: list[TensorEncoding], bias_entry: Callable[[TensorEncoding, str], None]) -> None:
        # tensors made by data movement last: their encoding repeats the one of the tensor they copy
        ordered = sorted(entries, key=lambda e: self.is_transparent_output(e.name))
        probe_only = []
        for entry in ordered:
            real, probes, by_graph = self.candidates(entry)
            if real:
                self.take(entry, real, by_graph)
            elif entry.name in self.traced.propagated:
                self.skipped[entry.name] = (
                    f"inherits the encoding of '{self.traced.propagated[entry.name]}' (data movement)"
                )
            elif self.int32_bias_name(entry) is not None:
                bias_entry(entry, self.int32_bias_name(entry))
            elif probes:
                probe_only.append((entry, probes, by_graph))
            else:
                self.unplaced[entry.name] = self.why_unplaced(entry.name)
        for entry, probes, by_graph in probe_only:  # after the real quantizers: may repeat a fused group's output
            repeated = self.repeated_group_output(entry)
            if repeated is not None:
                self.skipped[entry.name] = repeated
            else:
                self.take(entry, probes[:1], by_graph)

    def take(self, entry: TensorEncoding, targets: list[str], by_graph: bool) -> None:
        for target in targets:
            previous = self.taken.get(target)
            if previous is None:
                continue
            if previous.encoding.equals(entry.encoding):
                self.skipped[entry.name] = f"same values and encoding as '{previous.name}' (data movement)"
            else:
                self.unplaced[entry.name] = (
                    f"holds the same values as '{previous.name}' (quantizer {target}) but has another encoding"
                )
            return
        for target in targets:
            self.taken[target] = entry
        self.placed[entry.name] = targets
        if by_graph:
            self.by_graph.append(entry.name)

    def repeated_group_output(self, entry: TensorEncoding) -> str | None:
        """AIMET's ONNX exporter writes a supergroup's output encoding on the group's inner tensors too
        (``getitem`` = BN output before the fused ReLU6). Such an entry needs no quantizer where ours fuses
        the same ops: the reason to skip it, or None."""
        users = self.reference_consumers.get(entry.name, [])
        if len(users) != 1 or not users[0].output:
            return None
        group_output = users[0].output[0]
        owner = next((q for q, e in self.taken.items() if e.name == group_output and q not in self.probes), None)
        if owner is None or not self.taken[owner].encoding.equals(entry.encoding):
            return None
        return (
            f"repeats the encoding of '{group_output}', the output of the fused group it feeds "
            f"({users[0].op_type}, quantized by {owner}); this sim fuses them too"
        )

    def why_unplaced(self, name: str) -> str:
        if self.aligned is None:
            return (
                "no tensor or parameter of this sim has this name, and no ONNX graph of the exporter was found "
                "beside the file to match it through (pass onnx_model=...)"
            )
        if name not in self.aligned:
            return f"not a tensor of the exporter's ONNX graph {self.reference_path or '(onnx_model)'}"
        producer = self.reference_producers.get(name)
        ours = self.aligned[name]
        if producer is None and not ours:
            return (
                "matches no parameter of this sim: not by name, nor by its values in the exporter's ONNX graph "
                "(absent from the file, or of another model)"
            )
        what = f"{producer.op_type} node '{producer.name}'" if producer is not None else "input or weight"
        if not ours:
            return f"no tensor of this sim computes the values of the exporter's {what}: the models differ there"
        return (
            f"this sim's tensor '{ours[0]}' holds its values ({what}) but is made by an op that has no quantized "
            "module (see sim.coverage_summary())"
        )


def _reference_graph(path: Path, onnx_model: str | Path | onnx.ModelProto | None) -> tuple[Any, Path | None]:
    """The exporter's ONNX graph: ``onnx_model``, else ``<file>.onnx`` beside the encodings file if present."""
    if isinstance(onnx_model, onnx.ModelProto):
        return onnx_model, None
    candidate = Path(onnx_model) if onnx_model is not None else path.with_suffix(".onnx")
    if not candidate.is_file():
        if onnx_model is not None:
            raise FileNotFoundError(f"onnx_model {candidate} does not exist")
        return None, None
    try:
        return load_reference_graph(candidate), candidate
    except Exception as error:  # noqa: BLE001 - any unreadable file: say which and go on by names only
        message = f"cannot read the ONNX graph {candidate} ({type(error).__name__}: {error})"
        if onnx_model is not None:
            raise EncodingsFileError(message) from None
        warnings.warn(message + "; matching encodings by name only", stacklevel=3)
        return None, None


def load_encodings(
    sim: QuantSim,
    path: str | Path,
    strict: bool = True,
    partial: bool = True,
    dummy_input: Any = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    onnx_model: str | Path | onnx.ModelProto | None = None,
) -> LoadReport:
    """Load an AIMET encodings file (0.6.1 / 1.0.0 / 2.0.0) into ``sim``.

    ``strict``: an entry that cannot be placed is an error (else a warning). ``partial``: quantizers the file has
    no encoding for keep their state (else they are disabled, the file being the whole truth: use it for a
    complete export of another tool). ``onnx_model``: the ONNX graph the file's tensor names refer to, to match
    names that are not ours through the graph (default: ``<file>.onnx`` beside the file, as AIMET writes it).
    Input/output names must be the ones the file was exported with (default ``input``/``output``).
    """
    path = Path(path)
    version, entries = read_encodings(path)
    reference, reference_path = _reference_graph(path, onnx_model)
    dummy_input = sim.dummy_input if dummy_input is None else dummy_input
    probes = _install_output_probes(sim, dummy_input)
    kept_probes: set[str] = set()
    try:
        traced = trace_any(sim, dummy_input, include_disabled=True, input_names=input_names, output_names=output_names)
        quantizers = sim.quantizers()
        device = sim.device
        report = LoadReport(version)
        placer = _Placer(entries, traced, quantizers, set(probes), reference, reference_path)
        placer.place(entries, lambda entry, bias: _load_int32_bias(sim, entry, bias, version, device, report))
        if placer.unplaced:
            listed = "; ".join(f"'{name}': {why}" for name, why in list(placer.unplaced.items())[:8])
            message = (
                f"{path}: {len(placer.unplaced)} encodings could not be placed on this sim: {listed}. The file "
                "was written for another model, another config, or with other input/output names"
            )
            if strict:
                raise ValueError(message + " (strict=False skips them)")
            warnings.warn(message, stacklevel=2)
            report.skipped.update(placer.unplaced)
        by_name = {entry.name: entry for entry in entries}
        for entry_name, targets in placer.placed.items():
            entry = by_name[entry_name]
            for name in targets:
                if isinstance(entry.encoding, FloatFormat):  # a float16 tensor: the format is all there is to load
                    quantizers[name].number_format = entry.encoding
                    quantizers[name].frozen = True
                else:
                    encoding = _fit_to_quantizer(entry, name, quantizers[name], sim, path)
                    sim.set_encoding(name, encoding.to(device) if device is not None else encoding, freeze=True)
                quantizers[name].enabled = True
                report.loaded.append(name)
                if name in probes:
                    kept_probes.add(name)
                    report.added.append(name)
        report.placed.update(placer.placed)
        report.matched_by_graph = placer.by_graph
        report.skipped.update(placer.skipped)
    finally:
        for name, (module, key) in probes.items():
            if name not in kept_probes:
                del module.output_quantizers[key]
    loaded = set(report.loaded)
    for name, quantizer in sim.quantizers().items():
        if name in loaded or not quantizer.enabled:
            continue
        report.without_encoding.append(name)
        if not partial:
            quantizer.enabled = False
            report.disabled.append(name)
    uncalibrated = [name for name in report.without_encoding if partial and not sim.quantizers()[name].ready]
    if uncalibrated:
        listed = ", ".join(uncalibrated[:3]) + (", ..." if len(uncalibrated) > 3 else "")
        warnings.warn(
            f"{path}: {len(uncalibrated)} quantizers of this sim have no encoding, in the file or of their own "
            f"({listed}): pass partial=False to take the file as the whole truth (they are disabled), or "
            "calibrate them",
            stacklevel=2,
        )
    return report


def _load_int32_bias(
    sim: QuantSim, entry: TensorEncoding, bias: str, version: str, device: Any, report: LoadReport
) -> None:
    """AIMET 2.0.0 files list the int32 bias grid of every layer (informational for a float bias); 0.6.1/1.0.0
    files only list biases the exporting sim quantized, so the bias (``bias``: our name) gets an int32 quantizer."""
    if version == "2.0.0":
        report.skipped[entry.name] = f"int32 bias grid (s_x·s_w) of a bias this sim keeps in float ({bias})"
        return
    layer = bias.rsplit(".", 1)[0]
    try:
        sim.model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"encoding '{entry.name}' names a layer '{layer}' that this sim does not have") from None
    encoding = entry.encoding.to(device) if device is not None else entry.encoding
    install_bias_quantizer(sim, layer, encoding)
    report.loaded.append(f"{layer}.param_quantizers.bias")
    report.placed[entry.name] = [f"{layer}.param_quantizers.bias"]
