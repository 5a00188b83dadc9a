"""`load_encodings`: put the encodings of an AIMET-format file (ours or AIMET's) into a sim's quantizers.

Parameter encodings are matched by parameter name (``conv.weight``); activation encodings by ONNX tensor name,
through the same quantizer-to-tensor mapping the export uses, so a sim reloaded from its own export reproduces
its outputs bit for bit. Loaded encodings are frozen (later calibration keeps them).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgequant.export.bias import BIAS_BITWIDTH, install_bias_quantizer
from edgequant.export.encodings_io import TensorEncoding, read_encodings
from edgequant.export.graph_map import trace_sim
from edgequant.quantization import Encoding, Quantizer
from edgequant.sim.ops import weight_output_axis

if TYPE_CHECKING:
    from edgequant.sim.quantsim import QuantSim


@dataclass
class LoadReport:
    """Which quantizers got an encoding, and which file entries were skipped (and why)."""

    version: str
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    disabled: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"AIMET {self.version} encodings: {len(self.loaded)} quantizers loaded"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        if self.disabled:
            lines.append(f"  disabled (no encoding in the file): {', '.join(self.disabled)}")
        return "\n".join(lines)


def _param_quantizer_name(tensor: str) -> str:
    owner, _, param = tensor.rpartition(".")
    return f"{owner}.param_quantizers.{param}"


def _fit_to_quantizer(
    entry: TensorEncoding, quantizer_name: str, quantizer: Quantizer, sim: QuantSim, path: Path
) -> Encoding:
    """Check the entry's shape against the tensor and give per-channel entries the quantizer's channel axis."""
    encoding = entry.encoding
    is_param = quantizer.role == "param"
    if encoding.axis is None:
        return encoding
    if not is_param:
        raise ValueError(
            f"{path}: '{entry.name}' has a per-channel encoding but '{quantizer_name}' quantizes an activation, "
            "which edgequant quantizes per tensor; re-export the encodings with per-tensor activations"
        )
    module = sim.layer_of(quantizer)
    param = module._parameters[quantizer.key]
    if quantizer.axis is not None:
        axis = quantizer.axis
    elif entry.is_param is None:  # 2.0.0 files state the axis
        axis = encoding.axis
    else:  # 0.6.1 / 1.0.0 do not: the layer's output-channel axis, as the sim would choose it
        axis = weight_output_axis(module, param) or 0
    if param.dim() <= axis or param.shape[axis] != encoding.scale.numel():
        raise ValueError(
            f"{path}: '{entry.name}' has {encoding.scale.numel()} per-channel encodings but the parameter has shape "
            f"{tuple(param.shape)} (channel axis {axis}); the file was written for a different model"
        )
    return Encoding(encoding.scale, encoding.offset, encoding.bitwidth, encoding.symmetric, axis)


def load_encodings(
    sim: QuantSim,
    path: str | Path,
    strict: bool = True,
    partial: bool = True,
    dummy_input: Any = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
) -> LoadReport:
    """Load an AIMET encodings file (0.6.1 / 1.0.0 / 2.0.0) into ``sim``.

    ``strict``: a name that matches no quantizer is an error (else a warning). ``partial``: quantizers the file has
    no encoding for keep their state (else they are disabled, the file being the whole truth). Input/output names
    must be the ones the file was exported with (default ``input``/``output`` as in `export_onnx`).
    """
    path = Path(path)
    version, entries = read_encodings(path)
    traced = trace_sim(
        sim, sim.dummy_input if dummy_input is None else dummy_input, input_names, output_names, include_disabled=True,
    )
    quantizers = sim.quantizers()
    device = sim.device
    report = LoadReport(version)
    unknown = []
    for entry in entries:
        targets = traced.quantizers_of(entry.name)
        param_quantizer = _param_quantizer_name(entry.name)
        if entry.is_param is not False and param_quantizer in quantizers:
            targets = [param_quantizer]
        if targets:
            for name in targets:
                encoding = _fit_to_quantizer(entry, name, quantizers[name], sim, path)
                sim.set_encoding(name, encoding.to(device) if device is not None else encoding, freeze=True)
                quantizers[name].enabled = True
                report.loaded.append(name)
        elif entry.name in traced.propagated:
            report.skipped[entry.name] = f"inherits the encoding of '{traced.propagated[entry.name]}' (data movement)"
        elif entry.name.endswith(".bias") and entry.encoding.bitwidth == BIAS_BITWIDTH and entry.is_param is not False:
            _load_int32_bias(sim, entry, version, device, report)
        else:
            unknown.append(entry.name)
    if unknown:
        message = (
            f"{path}: {len(unknown)} encodings match no quantizer of this sim: {', '.join(unknown[:8])}. The file was "
            "written for another model, another config, or with other input/output names"
        )
        if strict:
            raise ValueError(message + " (strict=False skips them)")
        warnings.warn(message, stacklevel=2)
        report.skipped.update(dict.fromkeys(unknown, "no matching quantizer"))
    if not partial:
        loaded = set(report.loaded)
        for name, quantizer in quantizers.items():
            if name not in loaded and quantizer.enabled:
                quantizer.enabled = False
                report.disabled.append(name)
    return report


def _load_int32_bias(sim: QuantSim, entry: TensorEncoding, version: str, device: Any, report: LoadReport) -> None:
    """AIMET 2.0.0 files list the int32 bias grid of every layer (informational for a float bias); 0.6.1/1.0.0
    files only list biases the exporting sim quantized, so the bias gets an int32 quantizer."""
    if version == "2.0.0":
        report.skipped[entry.name] = "int32 bias grid (s_x·s_w) of a bias this sim keeps in float"
        return
    layer = entry.name.rsplit(".", 1)[0]
    try:
        sim.model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"encoding '{entry.name}' names a layer '{layer}' that this sim does not have") from None
    encoding = entry.encoding.to(device) if device is not None else entry.encoding
    install_bias_quantizer(sim, layer, encoding)
    report.loaded.append(f"{layer}.param_quantizers.bias")
