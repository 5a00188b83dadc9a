"""ONNX nodes no torch converter handles (a vendor's domain, an op onnx2torch lacks), run by ONNX Runtime in float.

The node is kept as it is in the user's graph and executed on its own, so the rest of the model still converts and
quantizes; it stays in float (the coverage report says so) and passes no gradient, as a pre-compiled op would not.
"""

from __future__ import annotations

import base64
import functools

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from onnx2torch.node_converters import add_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node
from torch import nn

FALLBACK_DOMAIN = "edgequant_onnxruntime"  # no dot: onnx2torch names modules after it
FALLBACK_OP = "OnnxRuntimeNode"
_NODE_ATTRIBUTE = "node"
_OPSETS_ATTRIBUTE = "opsets"


def wrap_for_onnxruntime(node: onnx.NodeProto, opsets: dict[str, int]) -> onnx.NodeProto:
    """A stand-in node of the fallback domain that carries ``node`` (and the opsets it needs) serialized."""
    opset_text = ",".join(f"{domain}={version}" for domain, version in sorted(opsets.items()))
    node_text = base64.b64encode(node.SerializeToString()).decode()  # onnx2torch reads string attributes as UTF-8
    return helper.make_node(
        FALLBACK_OP, list(node.input), list(node.output), name=node.name, domain=FALLBACK_DOMAIN,
        **{_NODE_ATTRIBUTE: node_text, _OPSETS_ATTRIBUTE: opset_text},
    )


def wrapped_node(wrapper: onnx.NodeProto) -> onnx.NodeProto:
    """The original node a `wrap_for_onnxruntime` stand-in carries."""
    text = next(attribute.s for attribute in wrapper.attribute if attribute.name == _NODE_ATTRIBUTE)
    return onnx.NodeProto.FromString(base64.b64decode(text))


class OnnxRuntimeNode(nn.Module):
    """One ONNX node, computed by ONNX Runtime's CPU kernels on the inputs' dtypes."""

    float_reason = "no torch converter for this op: run by ONNX Runtime in float, without gradient"

    def __init__(self, node_bytes: bytes, opsets: str) -> None:
        super().__init__()
        self.node_bytes = node_bytes
        self.opsets = opsets

    def extra_repr(self) -> str:
        node = onnx.NodeProto.FromString(self.node_bytes)
        return f"{node.domain or 'ai.onnx'}:{node.op_type}"

    def forward(self, *inputs: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        present = [x for x in inputs if x is not None]
        dtypes = tuple(str(x.dtype) for x in present)
        session, names = _session(self.node_bytes, self.opsets, dtypes, tuple(x is not None for x in inputs))
        device = present[0].device if present else torch.device("cpu")
        feeds = {name: x.detach().cpu().numpy() for name, x in zip(names, present, strict=True)}
        outputs = [torch.from_numpy(np.array(value)).to(device) for value in session.run(None, feeds)]  # 0-d kept
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


@add_converter(operation_type=FALLBACK_OP, version=1, domain=FALLBACK_DOMAIN)
def _convert_wrapped_node(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    opsets = next(attribute.s for attribute in node.proto.attribute if attribute.name == _OPSETS_ATTRIBUTE)
    module = OnnxRuntimeNode(wrapped_node(node.proto).SerializeToString(), opsets.decode())
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


@functools.lru_cache(maxsize=64)
def _session(
    node_bytes: bytes, opsets: str, dtypes: tuple[str, ...], present: tuple[bool, ...]
) -> tuple[ort.InferenceSession, list[str]]:
    node = onnx.NodeProto.FromString(node_bytes)
    names = [name for name, given in zip(node.input, present, strict=False) if name and given]
    inputs = [helper.make_tensor_value_info(name, _ELEMENT_TYPES[dtype], None)
              for name, dtype in zip(names, dtypes, strict=True)]
    outputs = [helper.make_value_info(name, onnx.TypeProto()) for name in node.output if name]
    imports = [helper.make_opsetid(domain, int(version)) for domain, version in
               (entry.split("=") for entry in opsets.split(","))]
    model = helper.make_model(helper.make_graph([node], "node", inputs, outputs), opset_imports=imports)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, names


_ELEMENT_TYPES = {
    "torch.float32": TensorProto.FLOAT, "torch.float16": TensorProto.FLOAT16, "torch.float64": TensorProto.DOUBLE,
    "torch.bfloat16": TensorProto.BFLOAT16, "torch.int64": TensorProto.INT64, "torch.int32": TensorProto.INT32,
    "torch.int8": TensorProto.INT8, "torch.uint8": TensorProto.UINT8, "torch.bool": TensorProto.BOOL,
}


def runtime_node_supported(node: onnx.NodeProto) -> bool:
    """Whether ONNX Runtime registers a kernel schema for ``node``'s domain and op type."""
    return (node.domain if node.domain != "ai.onnx" else "", node.op_type) in _onnxruntime_ops()


@functools.cache
def _onnxruntime_ops() -> frozenset[tuple[str, str]]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state  # ORT's own schema registry

    return frozenset((schema.domain, schema.name) for schema in state.get_all_operator_schema())
