"""Calibrating a sim of an ONNX model in ONNX Runtime: the float graph runs in ORT's kernels, and every quantizer
observes the tensor it quantizes, read off the session's outputs.

Calibration runs the model in float (quantizers only observe), so the statistics are those of the float graph;
ORT computes it several times faster on a CPU than the converted torch modules do. Its float kernels may round a
last bit differently from torch's, so an encoding can differ from `QuantSim.calibrate`'s by that much.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import onnxruntime as ort
import torch
from onnx import helper
from tqdm.auto import tqdm

from edgequant.export.onnx_export import save_onnx
from edgequant.export.original_graph import trace_original_graph

if TYPE_CHECKING:
    from edgequant.sim.quantsim import QuantSim


def calibrate_in_onnxruntime(sim: QuantSim, data: Iterable[Any], num_batches: int | None = None,
                             progress: bool = True, session_options: ort.SessionOptions | None = None) -> None:
    """Calibrate ``sim`` (built from an ONNX model: `QuantSim.from_onnx`) on ``data`` (batches as
    `QuantSim.calibrate` takes them) with its float graph running in ONNX Runtime (``session_options``: threads,
    optimization level)."""
    if sim.onnx_source is None:
        raise ValueError("calibrate_in_onnxruntime needs a sim of an ONNX model (QuantSim.from_onnx); calibrate "
                         "other sims with sim.calibrate")
    traced, _ = trace_original_graph(sim)
    observed: dict[str, list[str]] = {}  # tensor -> the quantizers that observe it (params are read off weights)
    for site in traced.sites:
        if not site.is_param:
            observed.setdefault(site.tensor, []).append(site.quantizer)
    graph_outputs = {output.name for output in traced.float_model.graph.output}
    traced.float_model.graph.output.extend(
        helper.make_value_info(tensor, onnx.TypeProto()) for tensor in observed if tensor not in graph_outputs)
    names = list(observed)
    quantizers = sim.quantizers()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "calibration.onnx"
        save_onnx(traced.float_model, path, sim.onnx_source.external_data)
        session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
    inputs = traced.input_names
    with sim.calibrating():
        for args, kwargs in tqdm(sim.batches(data, num_batches), desc="calibrating in ONNX Runtime",
                                 disable=not progress, leave=False):
            feed = {name: value.detach().cpu().numpy() for name, value in zip(inputs, args, strict=False)}
            feed.update({name: value.detach().cpu().numpy() for name, value in kwargs.items()})
            for tensor, value in zip(names, session.run(names, feed), strict=True):
                values = torch.from_numpy(value)
                for quantizer in observed[tensor]:
                    quantizers[quantizer](values)
