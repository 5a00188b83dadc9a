"""A dummy input for an ONNX model, from the shapes and types its graph inputs declare."""

from __future__ import annotations

import numpy as np
import torch
from onnx import helper

from edgequant.onnx.reading import OnnxModelError
from edgequant.sim.onnx_source import OnnxSource


def onnx_dummy_input(
    source: OnnxSource, batch_size: int = 1, dims: dict[str, int] | None = None
) -> tuple[torch.Tensor, ...]:
    """One tensor per graph input: random normal for floats, ones for integers (valid token ids and masks).

    A named dynamic dimension takes its size from ``dims``; an unnamed or unlisted one on axis 0 is the batch.
    """
    dims = dims or {}
    tensors = []
    initializers = {i.name for i in source.model.graph.initializer}
    for value in source.model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
            elif dim.dim_param in dims:
                shape.append(dims[dim.dim_param])
            elif axis == 0:
                shape.append(batch_size)
            else:
                raise OnnxModelError(
                    f"graph input '{value.name}' has a dynamic dimension {dim.dim_param or '?'!r} on axis {axis}: "
                    "pass a dummy input of the shape to use (dummy_input=..., or --input-shape on the command line)"
                )
        torch_dtype = torch.from_numpy(np.zeros(0, helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))).dtype
        if torch_dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch_dtype))
        else:
            tensors.append(torch.ones(shape, dtype=torch_dtype))
    if not tensors:
        raise OnnxModelError("the ONNX model has no graph input; there is nothing to calibrate on")
    return tuple(tensors)
