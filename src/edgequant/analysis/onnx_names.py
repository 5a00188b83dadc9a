"""Names of the sim's layer outputs in the exported ONNX model, so a dump can be compared with the device.

The mapping is read off the same marker graph that `sim.export` uses (`trace_any`), never guessed from
module names: a layer's output is the tensor its output quantizer quantizes; a layer without one (a
convolution fused with the next op) produces the output of the ONNX node that consumes its quantized weight.
"""

from __future__ import annotations

import warnings

from torch import nn

from edgequant.export.graph_map import consumers
from edgequant.export.original_graph import trace_any
from edgequant.sim import QuantSim


def layer_tensor_names(sim: QuantSim, layers: dict[str, nn.Module]) -> tuple[dict[str, list[tuple[int, str]]],
                                                                           list[str]]:
    """``{layer: [(output index, ONNX tensor name)]}`` and the ONNX input names; empty (with a warning) when
    the sim cannot be exported to ONNX."""
    try:
        traced = trace_any(sim, include_disabled=True)
    except RuntimeError as error:
        warnings.warn(f"layer outputs are dumped under sim layer names: {error}", stacklevel=3)
        return {}, []
    readers = consumers(traced.float_model)
    names: dict[str, list[tuple[int, str]]] = {}
    for layer_name, layer in layers.items():
        found = [(int(key), tensor) for key, quantizer in layer.output_quantizers.items()
                 for tensor in traced.tensors_of(quantizer.name)[:1]]
        if not found:
            for quantizer in layer.param_quantizers.values():
                nodes = [node for tensor in traced.tensors_of(quantizer.name) for node in readers.get(tensor, [])]
                if nodes:
                    found = [(0, nodes[0].output[0])]
                    break
        if found:
            names[layer_name] = found
    return names, list(traced.input_names)
