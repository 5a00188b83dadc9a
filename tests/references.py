"""Independent references the tests compare edgequant with: ONNX Runtime's QuantizeLinear/DequantizeLinear, and a
weight grid shaped by hand from an encoding (not with edgequant's own helpers)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from torch import nn

from edgequant.quantization import Encoding

ONNX_TYPES = {(8, True): TensorProto.INT8, (8, False): TensorProto.UINT8,
              (16, True): TensorProto.INT16, (16, False): TensorProto.UINT16,
              (4, True): TensorProto.INT4, (4, False): TensorProto.UINT4}


def ort_qdq(x: torch.Tensor, encoding: Encoding) -> np.ndarray:
    attrs = {"axis": encoding.axis} if encoding.axis is not None else {}
    zero_point = encoding.onnx_zero_point.to(torch.int64).flatten().tolist()
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        initializer=[
            helper.make_tensor("s", TensorProto.FLOAT, list(encoding.scale.shape), encoding.scale.flatten().tolist()),
            helper.make_tensor("z", ONNX_TYPES[(encoding.bitwidth, encoding.symmetric)],
                               list(encoding.scale.shape), zero_point),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


def grid_from_encoding(encoding: Encoding, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale, lowest and highest integer of a weight encoding, shaped by hand from its axis."""
    shape = [1] * weight.dim()
    if encoding.axis is not None:
        shape[encoding.axis] = -1
    scale, low = encoding.scale.view(shape), encoding.offset.view(shape)
    return scale, low, low + 2**encoding.bitwidth - 1


FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def set_batch_norm(bn: nn.modules.batchnorm._BatchNorm, mean: list, var: list, gamma: list, beta: list) -> None:
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor(mean))
        bn.running_var.copy_(torch.tensor(var))
        bn.weight.copy_(torch.tensor(gamma))
        bn.bias.copy_(torch.tensor(beta))
    bn.eval()


def bn_factor_and_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[np.ndarray, np.ndarray]:
    """f = gamma / sqrt(var + eps), t = beta - mean * f, in float64 numpy."""
    gamma, beta = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    factor = gamma / np.sqrt(var + bn.eps)
    return factor, beta - mean * factor


def assert_within(actual: torch.Tensor, expected: np.ndarray, bound: np.ndarray) -> None:
    error = np.abs(actual.detach().double().numpy() - expected)
    assert (error <= bound).all(), (error.max(), error[error > bound], bound[error > bound])


# near-zero variances (0 and 1e-7, below eps), negative and tiny gammas
