"""What the sim keeps of an ONNX model it was built from: the user's graph, and which node each layer computes.

`edgequant.onnx` fills these in when it converts a file; the sim carries them and the export reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx


@dataclass(frozen=True)
class OnnxNodeRef:
    """The ONNX node a converted module computes, by the graph's own tensor names.

    ``inputs[i]`` is the tensor the module's positional input ``i`` holds, ``outputs[j]`` its ``j``-th output;
    ``params`` maps a module parameter (``weight``, ``bias``) to the node input it came from and ``transposed``
    names the parameters stored transposed in the graph (a Gemm's or MatMul's ``[in, out]`` weight).
    """

    name: str
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[str, str] = field(default_factory=dict)
    transposed: frozenset[str] = frozenset()

    def describe(self) -> str:
        domain = f"{self.domain}:" if self.domain not in ("", "ai.onnx") else ""
        return f"node '{self.name}' ({domain}{self.op_type})"


ONNX_NODE_ATTRIBUTE = "onnx_node"
"""Attribute of a converted module holding its `OnnxNodeRef`."""


@dataclass
class OnnxSource:
    """The user's ONNX model as read (never modified), and what the conversion left in float.

    A copied sim shares it (``copy.deepcopy`` returns the same object): the graph can be large and is only read.
    """

    model: onnx.ModelProto
    path: Path | None
    external_data: bool = False  # its tensors were in files beside it: exports keep them so
    float_nodes: dict[str, str] = field(default_factory=dict)  # node name -> why it runs in float

    def __deepcopy__(self, memo: dict) -> OnnxSource:
        return self

    @property
    def input_names(self) -> list[str]:
        initializers = {i.name for i in self.model.graph.initializer}
        return [i.name for i in self.model.graph.input if i.name not in initializers]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.model.graph.output]

    @property
    def opset(self) -> int:
        return next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 1)


ONNX_SOURCE_ATTRIBUTE = "onnx_source"
"""Attribute of a converted model holding its `OnnxSource`; `QuantSim` picks it up."""
