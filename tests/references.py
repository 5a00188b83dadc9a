"""Independent references the tests compare edgequant with: ONNX Runtime's QuantizeLinear/DequantizeLinear, and a
weight grid shaped by hand from an encoding (not with edgequant's own helpers)."""

from __future__ import annotations

import math

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


def assert_within_grid_steps(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray,
                             scale: float | torch.Tensor, max_steps: int = 1, max_share: float = 0.0) -> None:
    """Two dequantized outputs of the same grid (step ``scale``) agree: at most ``max_share`` of the elements differ,
    each by a whole number of steps, at most ``max_steps``; every other element is bit for bit the same.

    For comparisons where either side computes in float (ONNX Runtime's unoptimised Q/DQ graph, torch's convolutions
    on another CPU or device): the summation order of float kernels depends on the CPU's SIMD width and the thread
    count, so a value within rounding error of a grid midpoint can round to the neighbouring step on one machine and
    not on another. An absolute tolerance below one step makes the verdict depend on the CPU; this one does not, and
    still fails a wrong grid (values off the grid, two steps off, or one step off on many elements)."""
    got = np.asarray(actual.detach().cpu() if isinstance(actual, torch.Tensor) else actual, dtype=np.float64)
    want = np.asarray(expected.detach().cpu() if isinstance(expected, torch.Tensor) else expected, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    step = float(scale)
    steps = np.round((got - want) / step)
    # each side is k * step rounded to float32 once: a difference that is not a whole number of steps up to those
    # two roundings is a value off the grid, not a rounding flip
    residual = np.abs(got - want - steps * step)
    off_grid = residual > FLOAT32_EPS * (np.abs(got) + np.abs(want))
    assert not off_grid.any(), f"{int(off_grid.sum())} values are not a whole number of steps ({step:g}) apart"
    worst = float(np.abs(steps).max(initial=0))
    assert worst <= max_steps, f"{worst:g} steps apart (at most {max_steps} allowed), step {step:g}"
    differing = int((got != want).sum())
    allowed = math.floor(max_share * got.size + 1e-9)
    assert differing <= allowed, (
        f"{differing} of {got.size} values differ (at most {allowed}: {max_share:.2%}); "
        f"steps apart: {_counts(steps[got != want])}")


def _counts(values: np.ndarray) -> dict[float, int]:
    """How often each value occurs, for failure messages."""
    unique, counts = np.unique(values, return_counts=True)
    return {float(v): int(n) for v, n in zip(unique, counts, strict=True)}


def assert_within(actual: torch.Tensor, expected: np.ndarray, bound: np.ndarray) -> None:
    error = np.abs(actual.detach().double().numpy() - expected)
    assert (error <= bound).all(), (error.max(), error[error > bound], bound[error > bound])


# near-zero variances (0 and 1e-7, below eps), negative and tiny gammas
