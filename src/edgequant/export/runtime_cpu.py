"""What ONNX Runtime's integer kernels do on *this* CPU, and the model that its exact kernels run.

On x86-64 CPUs without VNNI (AVX2 or AVX-512 only), ORT multiplies uint8 activations by int8 weights with
``vpmaddubsw``, which adds each pair of products into a *saturating* int16 (ORT's quantization docs: "this
instruction might suffer from saturation issues"). A pair ``255·127 + 255·127`` does not fit, so ORT's output there
is not the convolution the QDQ model describes, and a parity check would measure the CPU, not the simulation. Its
uint8×uint8 kernels widen to int16 before multiplying and accumulate exactly. A symmetric int8 weight ``q`` with zero
point 0 is the same value as the uint8 ``q + 128`` with zero point 128, so the model with weights stored that way is
the same model, which ORT runs exactly on every CPU. CPUs with VNNI (``avx512_vnni``, ``avx_vnni``, AMX) and ARM
accumulate u8×s8 exactly.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

ORT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}
"""ONNX Runtime session config entries (``SessionOptions.add_session_config_entry``) under which it computes what
the QDQ graph states: ORT fuses a MatMul and its 8- or 4-bit weight's DequantizeLinear into ``MatMulNBits``
(from ``ORT_ENABLE_EXTENDED`` on), which by default (accuracy level 4) rounds the MatMul's float input to int8 per
block; at level 1 it multiplies the input as given, in float32."""

_EXACT_U8S8_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}
_CPUINFO = Path("/proc/cpuinfo")


@functools.cache
def u8s8_saturates() -> bool:
    """True where ORT's u8×s8 kernels saturate int16 pair sums: an x86-64 CPU whose flags show no VNNI."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = _CPUINFO.read_text()
    except OSError:  # not Linux: no flags to read, assume a current (VNNI) CPU
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return not _EXACT_U8S8_FLAGS & set(flags)


def with_unsigned_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of the QDQ ``model`` whose int8 constant weights (DequantizeLinear of an initializer) are stored as
    uint8 ``q + 128`` with zero point ``z + 128``: the same dequantized values, run by ORT's exact u8×u8 kernels.
    Returns the copy and how many tensors were rewritten."""
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    initializers = {init.name: init for init in rewritten.graph.initializer}
    consumers: dict[str, int] = {}
    for node in rewritten.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    count = 0
    for node in rewritten.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        values, zero_point = initializers.get(node.input[0]), initializers.get(node.input[2])
        if values is None or zero_point is None or values.data_type != TensorProto.INT8:
            continue
        if consumers[node.input[0]] > 1 or consumers[node.input[2]] > 1:
            continue  # shared with another node: leave it as exported
        for init in (values, zero_point):
            shifted = numpy_helper.to_array(init).astype(np.int16) + 128
            init.CopyFrom(numpy_helper.from_array(shifted.astype(np.uint8), init.name))
        count += 1
    return rewritten, count
