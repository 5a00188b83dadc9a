"""`export_onnx`: the float ONNX model, its AIMET encodings file and the QDQ model of a calibrated sim."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from edgequant.export.bias import check_bias_encodings, derived_bias_encodings
from edgequant.export.encodings_io import Fp8Encoding, TensorEncoding, write_encodings
from edgequant.export.graph_map import TracedSim, trace_sim
from edgequant.export.original_graph import check_original_graph_opset, trace_original_graph
from edgequant.export.qdq import AnyEncoding, build_qdq_model
from edgequant.quantization import Encoding, Quantizer
from edgequant.quantization.granularity import PER_TENSOR
from edgequant.sim.quantized_module import param_quantizer

if TYPE_CHECKING:
    from edgequant.sim.quantsim import QuantSim

AIMET_SCHEME_NAMES = {"minmax": "min_max", "sqnr": "tf_enhanced"}


@dataclass
class ExportResult:
    """Paths of what `export_onnx` wrote, and what the encodings file holds."""

    float_model: Path
    qdq_model: Path
    encodings: Path
    encoding_version: str
    opset: int
    num_param_encodings: int
    num_activation_encodings: int

    def summary(self) -> str:
        return (
            f"wrote {self.float_model}, {self.qdq_model} (opset {self.opset}) and {self.encodings} "
            f"(AIMET {self.encoding_version}: {self.num_param_encodings} param + {self.num_activation_encodings} "
            "activation encodings)"
        )


def save_onnx(model: onnx.ModelProto, path: Path, external_data: bool) -> None:
    """Write ``model``; with ``external_data``, its tensors go to ``<file>.data`` beside it (models over 2 GB, and
    models the user gave that way)."""
    if external_data:
        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)  # onnx appends to an existing data file
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    else:
        onnx.save(model, path)


def model_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def tensor_encoding_entries(
    traced: TracedSim, by_tensor: dict[str, AnyEncoding], float_bias: dict[str, Encoding]
) -> list[TensorEncoding]:
    """One entry per quantized ONNX tensor (``by_tensor``: `TracedSim.tensor_encodings`), in graph order; each
    weight is followed by its layer's ``float_bias`` entry (``layer.bias`` -> int32 s_x·s_w encoding of a bias
    the sim leaves in float, as AIMET's 2.0.0 files list them)."""
    entries: list[TensorEncoding] = []
    seen: set[str] = set()
    for site in traced.sites:
        if site.tensor in seen:
            continue
        seen.add(site.tensor)
        entries.append(TensorEncoding(site.tensor, by_tensor[site.tensor], site.is_param))
        bias = f"{site.owner}.bias"
        if site.is_param and site.key == "weight" and bias in float_bias:
            tensor = traced.param_tensors.get(bias, bias)
            seen.add(tensor)
            entries.append(TensorEncoding(tensor, float_bias[bias], True))
    entries += [TensorEncoding(t, by_tensor[t], False) for t in traced.propagated if t not in seen]
    return entries


def export_encoding(quantizer: Quantizer) -> AnyEncoding:
    """What ``quantizer`` is exported as: its integer encoding, its 16-bit float format, or fp8 with its scale."""
    number_format = quantizer.float_format
    if number_format is None:
        return quantizer.encoding
    if number_format.scaled:
        return Fp8Encoding(number_format, quantizer.scale.detach().float().cpu().clone(), quantizer.granularity)
    return number_format


def _quantizer_args(sim: QuantSim, quantizers: dict[str, Quantizer]) -> dict[str, Any]:
    params = [q for q in quantizers.values() if q.role == "param"]
    return {
        "quant_scheme": AIMET_SCHEME_NAMES.get(sim.quant_scheme.name, sim.quant_scheme.name),
        "param_bitwidth": sim.param_bw,
        "activation_bitwidth": sim.output_bw,
        "dtype": "int",
        "is_symmetric": all(q.symmetric for q in params),
        "per_channel_quantization": any(q.granularity != PER_TENSOR for q in params),
    }


def export_onnx(
    sim: QuantSim,
    out_dir: str | Path,
    dummy_input: Any = None,
    name: str = "model",
    encoding_version: str = "1.0.0",
    opset: int | None = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_batch: bool = True,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> ExportResult:
    """Write ``{name}.onnx`` (float), ``{name}.encodings`` (AIMET ``encoding_version``) and ``{name}_qdq.onnx``.

    ``dummy_input`` defaults to the sim's; the single input is named ``input`` and a single output ``output``
    (AIMET's convention) unless ``input_names``/``output_names`` say otherwise. ``opset`` defaults to 17, or 21
    where fp8, int4 or int16 tensors need it. ``dynamic_axes`` (torch.onnx's, by input/output name;
    sequence and cache lengths of a language model) replaces the dynamic batch axis of ``dynamic_batch``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    quantizers = sim.quantizers()
    missing = [n for n, q in quantizers.items() if q.enabled and not q.ready]
    if missing:
        raise RuntimeError(
            f"{len(missing)} enabled quantizers have no encoding (e.g. {', '.join(missing[:3])}); calibrate the sim "
            "(sim.compute_encodings / sim.calibrate / sim.load_encodings) or disable them before exporting"
        )
    encodings = {n: export_encoding(q) for n, q in quantizers.items() if q.enabled}
    if sim.onnx_source is not None:
        check_original_graph_opset(sim, opset)
        traced, encodings = trace_original_graph(sim, encodings)
    else:
        traced = trace_sim(
            sim, sim.dummy_input if dummy_input is None else dummy_input, input_names, output_names, opset,
            dynamic_batch, dynamic_axes=dynamic_axes,
        )
    derived_bias = derived_bias_encodings(traced, encodings, sim)
    check_bias_encodings(quantizers, derived_bias)
    by_tensor = traced.tensor_encodings(encodings)
    opset_used = model_opset(traced.float_model)
    qdq_model = build_qdq_model(traced, encodings, by_tensor, opset_used)
    float_bias = {
        bias: encoding for bias, encoding in derived_bias.items()
        if encoding_version == "2.0.0" and param_quantizer(sim.model.get_submodule(bias.removesuffix(".bias")), "bias")
        is None
    }
    entries = tensor_encoding_entries(traced, by_tensor, float_bias)
    float_path, qdq_path = out_dir / f"{name}.onnx", out_dir / f"{name}_qdq.onnx"
    external = sim.onnx_source is not None and sim.onnx_source.external_data
    save_onnx(traced.float_model, float_path, external)
    save_onnx(qdq_model, qdq_path, external)
    encodings_path = write_encodings(
        entries, out_dir / f"{name}.encodings", encoding_version, _quantizer_args(sim, quantizers)
    )
    return ExportResult(
        float_path, qdq_path, encodings_path, encoding_version, opset_used,
        sum(bool(e.is_param) for e in entries), sum(not e.is_param for e in entries),
    )
