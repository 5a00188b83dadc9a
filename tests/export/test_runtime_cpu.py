"""ORT's u8×s8 saturation on CPUs without VNNI, and the identical uint8-weight model that its exact kernels run."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from edgequant.export import runtime_cpu
from edgequant.export.verify import verify
from edgequant.sim import QuantSim


@pytest.fixture()
def saturating_export(tmp_path):
    """A conv whose u8×s8 pair sums (255·127 + 255·127) overflow int16: every weight at the grid's end, every
    input at 255."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 2, 3, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.fill_(0.05)
    data = torch.rand(8, 4, 6, 6)
    data[:, :, 0, 0] = 0.0  # the input grid starts at 0 (zero point 0)
    data[:4] = 1.0  # half the samples sit at the grid's top (255) everywhere
    sim = QuantSim(model, data[:1], config="per_channel")
    sim.calibrate([data], progress=False)
    sim.export(tmp_path, data[:1])
    return tmp_path, sim, data


def _float_outputs(path_or_model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # DequantizeLinear in float
    model = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_unsigned_weights_are_the_same_model(saturating_export):
    out_dir, _, data = saturating_export
    original = onnx.load(out_dir / "model_qdq.onnx")
    rewritten, count = runtime_cpu.with_unsigned_weights(original)
    dequantized = {n.input[0] for n in original.graph.node if n.op_type == "DequantizeLinear"}
    int8_weights = [i for i in original.graph.initializer if i.data_type == TensorProto.INT8 and i.name in dequantized]
    assert count == len(int8_weights) == 1
    by_name = {i.name: i for i in rewritten.graph.initializer}
    for weight in int8_weights:
        unsigned = numpy_helper.to_array(by_name[weight.name])
        assert unsigned.dtype == np.uint8
        assert np.array_equal(unsigned.astype(np.int16) - 128, numpy_helper.to_array(weight))
    x = data.numpy()
    assert np.array_equal(_float_outputs(rewritten, x), _float_outputs(out_dir / "model_qdq.onnx", x))


def test_verify_measures_the_sim_not_the_cpus_saturation(saturating_export):
    out_dir, sim, data = saturating_export
    report = verify(out_dir, sim, data, progress=False)
    assert report.outputs[0].max_lsb_diff <= 1
    assert report.integer_kernels.get("QLinearConv", 0) == 1  # still ORT's integer kernel, not a float fallback
    assert bool(report.unsigned_weights) == runtime_cpu.u8s8_saturates()
    as_exported = verify(out_dir, sim, data, progress=False, unsigned_weights=False)
    if runtime_cpu.u8s8_saturates():  # the reason for the rewrite, seen on this very CPU
        assert as_exported.outputs[0].max_lsb_diff > 1
        assert "no VNNI" in report.summary()
    else:
        assert as_exported.outputs[0].max_lsb_diff <= 1


@pytest.mark.parametrize(("machine", "flags", "saturates"), [
    ("x86_64", "fpu sse avx2 fma", True),
    ("x86_64", "fpu avx2 avx512f avx512_vnni", False),
    ("x86_64", "fpu avx2 avx_vnni", False),
    ("aarch64", "fp asimd", False),
])
def test_saturation_is_read_from_the_cpu_flags(monkeypatch, tmp_path, machine, flags, saturates):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(runtime_cpu, "_CPUINFO", cpuinfo)
    monkeypatch.setattr(runtime_cpu.platform, "machine", lambda: machine)
    runtime_cpu.u8s8_saturates.cache_clear()
    try:
        assert runtime_cpu.u8s8_saturates() is saturates
    finally:
        runtime_cpu.u8s8_saturates.cache_clear()
