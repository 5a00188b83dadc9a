"""Which tensor of our ONNX graph holds the values of a tensor of another exporter's ONNX graph.

Encodings written by AIMET are named after the tensors of AIMET's ONNX export of *its* prepared model
(``/net/features/features.3/module_add/Add_output_0``, ``getitem_12``, ``855``); ours are named by our exporter.
When the names differ, the two graphs still compute the same function of the same weights, so we match them
structurally, by value numbering (hash-consing) over both graphs at once:

* graph inputs match by position;
* weights match by initializer name, else as quantized copies (AIMET's ONNX holds quantize-dequantize(weight)
  under the file's encoding), else by content;
* small constants (Clip bounds, axes, shapes) match by value, wherever they live (Constant node or initializer);
* an op output's number is (canonical op type, numbers of its inputs) — inputs sorted for commutative ops;
* data-movement ops (Flatten/Reshape, Expand/Tile, Identity, Dropout) are transparent: their output is numbered
  like their first input (it holds the same values, so it takes the same encoding).

Two tensors with the same number compute the same values. Attributes are left out of the number (exporters
differ in which defaults they write); the weights already tell convolutions apart.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgequant.export.graph_map import DATA_MOVEMENT_OPS
from edgequant.quantization import Encoding

TRANSPARENT_OPS = DATA_MOVEMENT_OPS | {"Dropout"}
"""Ops whose output holds values of their first input (matched as the same tensor)."""

COMMUTATIVE_OPS = frozenset({"Add", "Mul", "Sum", "Max", "Min", "Mean"})

EQUIVALENT_OPS = {"ReduceMean": "GlobalAveragePool"}
"""Exporters write ``x.mean((2, 3), keepdim=True)`` / ``adaptive_avg_pool2d(x, 1)`` either way."""

SMALL_CONSTANT = 64
"""Tensors with at most this many elements are matched by value (Clip bounds, shapes), larger ones as weights."""


def load_reference_graph(path: str | Path) -> onnx.ModelProto:
    """An ONNX file with its external weights when they are beside it (without them when absent: weights then
    match by initializer name only)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError):
        for tensor in model.graph.initializer:  # keep dims and names; drop the unresolved references
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
    return model


def _values(tensor: onnx.TensorProto) -> np.ndarray | None:
    """The tensor's values, or None when the file does not hold them (weights stored elsewhere)."""
    try:
        values = numpy_helper.to_array(tensor)
    except (ValueError, TypeError):
        return None
    expected = int(np.prod(tensor.dims)) if tensor.dims else 1
    return values if values.size == expected else None


def _digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


class _Numbering:
    """Value numbers shared by the two graphs."""

    def __init__(self) -> None:
        self._ids: dict[tuple, int] = {}

    def __call__(self, key: tuple) -> int:
        return self._ids.setdefault(key, len(self._ids))


def _constant_key(values: np.ndarray) -> tuple:
    flat = values.reshape(-1)
    if flat.dtype.kind in "fiub":
        return ("const", tuple(float(v) for v in flat.astype(np.float64)))
    return ("const", str(flat.tolist()))


def _number_graph(
    model: onnx.ModelProto, numbering: _Numbering, weight_key: dict[str, tuple]
) -> dict[str, int]:
    """Value number of every tensor of ``model`` (``weight_key``: initializer name -> key of the weight)."""
    graph = model.graph
    numbers: dict[str, int] = {}
    initializers = {t.name for t in graph.initializer}
    real_inputs = [i.name for i in graph.input if i.name not in initializers]
    for position, name in enumerate(real_inputs):
        numbers[name] = numbering(("input", position))
    for tensor in graph.initializer:
        numbers[tensor.name] = numbering(weight_key[tensor.name])
    numbers[""] = numbering(("absent",))  # omitted optional inputs
    for node in graph.node:  # ONNX nodes are topologically sorted
        if node.op_type == "Constant":
            value = next((a for a in node.attribute if a.name in ("value", "value_float", "value_floats",
                                                                   "value_int", "value_ints")), None)
            if value is not None:
                array = (numpy_helper.to_array(value.t) if value.name == "value"
                         else np.asarray(onnx.helper.get_attribute_value(value)))
                numbers[node.output[0]] = numbering(_constant_key(array))
                continue
        inputs = [numbers.get(name, numbering(("unknown", name))) for name in node.input]
        if node.op_type in TRANSPARENT_OPS and inputs:
            for output in node.output:
                numbers[output] = inputs[0]
            continue
        op_type = EQUIVALENT_OPS.get(node.op_type, node.op_type)
        if op_type in COMMUTATIVE_OPS:
            inputs = sorted(inputs)
        if op_type == "GlobalAveragePool":
            inputs = inputs[:1]  # ReduceMean's axes
        for index, output in enumerate(node.output):
            numbers[output] = numbering((op_type, tuple(inputs), index))
    return numbers


def _quantized_match(values: np.ndarray, encoding: Encoding, candidates: list[tuple[str, np.ndarray]]) -> str | None:
    """The candidate weight that ``values`` is a quantized copy of (AIMET's ONNX export writes each quantized
    weight as quantize-dequantize(weight)): within half a step of the encoding everywhere, the closest one."""
    try:
        scale_shape = encoding.granularity.scale_shape(values.shape)
    except ValueError:  # written for a tensor of another rank, or blocks that do not divide it
        return None
    if math.prod(scale_shape) != encoding.scale.numel():
        return None
    scale = encoding.granularity.broadcast(encoding.scale.reshape(scale_shape), values.shape).double().numpy()
    best, best_error = None, np.inf
    for name, ours in candidates:
        error = np.abs(values.astype(np.float64) - ours) / scale
        worst = float(error.max()) if error.size else 0.0
        if worst <= 0.5 + 1e-4 and worst < best_error:
            best, best_error = name, worst
    return best


def _weight_keys(
    reference: onnx.ModelProto, ours: onnx.ModelProto, our_params: set[str], weight_encodings: dict[str, Encoding]
) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Keys of the initializers of both graphs: small constants by value; weights (our parameters and large
    tensors) by the initializer of ours they are (same name, else a quantized copy under the file's encoding,
    else the same content)."""
    our_keys: dict[str, tuple] = {}
    by_digest: dict[str, str] = {}
    by_shape: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    for tensor in ours.graph.initializer:
        values = _values(tensor)
        if values is not None and values.size <= SMALL_CONSTANT and tensor.name not in our_params:
            our_keys[tensor.name] = _constant_key(values)
            continue
        our_keys[tensor.name] = ("weight", tensor.name)
        if values is not None:
            by_digest.setdefault(_digest(values), tensor.name)
            by_shape.setdefault(values.shape, []).append((tensor.name, values.astype(np.float64)))
    reference_keys: dict[str, tuple] = {}
    for tensor in reference.graph.initializer:
        values = _values(tensor)
        if tensor.name in our_keys and (values is None or our_keys[tensor.name][0] == "weight"):
            reference_keys[tensor.name] = our_keys[tensor.name]  # same name (the values may be quantized copies)
            continue
        match = None
        if values is not None and tensor.name in weight_encodings:
            match = _quantized_match(values, weight_encodings[tensor.name], by_shape.get(values.shape, []))
        if match is None and values is not None:
            match = by_digest.get(_digest(values))
        if match is not None:
            reference_keys[tensor.name] = ("weight", match)
        elif values is not None and values.size <= SMALL_CONSTANT:
            reference_keys[tensor.name] = _constant_key(values)
        else:
            reference_keys[tensor.name] = ("reference weight", tensor.name)
    return reference_keys, our_keys


def align_tensors(
    reference: onnx.ModelProto,
    ours: onnx.ModelProto,
    our_params: set[str] | None = None,
    weight_encodings: dict[str, Encoding] | None = None,
) -> dict[str, list[str]]:
    """Reference tensor name -> our tensors that hold the same values (empty list: none does).

    ``our_params``: our initializers that are parameters (matched as weights however small);
    ``weight_encodings``: the file's encodings of reference weights, to recognise quantized copies of ours."""
    numbering = _Numbering()
    reference_keys, our_keys = _weight_keys(reference, ours, our_params or set(), weight_encodings or {})
    our_numbers = _number_graph(ours, numbering, our_keys)
    reference_numbers = _number_graph(reference, numbering, reference_keys)
    by_number: dict[int, list[str]] = {}
    for name, number in our_numbers.items():
        if name:
            by_number.setdefault(number, []).append(name)
    return {name: by_number.get(number, []) for name, number in reference_numbers.items() if name}
