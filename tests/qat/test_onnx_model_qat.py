"""Quantization-aware training of a sim built from an ONNX file, exported back into that file's graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx_models import conv_batch_norm, save

from edgequant import QuantSim, load_onnx
from edgequant.qat import finetune


def test_range_learning_on_an_onnx_model_exports_what_onnx_runtime_computes(tmp_path: Path) -> None:
    path = save(conv_batch_norm(), tmp_path / "model.onnx")
    sim = QuantSim.from_onnx(path, config="per_channel")
    data = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sim.compute_encodings(lambda model: model(data))
    before = {name: q.encoding.scale.clone() for name, q in sim.quantizers().items()}
    result = finetune(sim, data, epochs=2, batch_size=16, lr=1e-3, mode="range_learning",
                      teacher=load_onnx(path), progress=False)
    assert result.setup.folded_batch_norms == [("conv1", "bn")]
    assert any(not torch.equal(before[name], q.encoding.scale) for name, q in sim.quantizers().items())
    export = sim.export(tmp_path / "out")
    assert [n.name for n in onnx.load(export.float_model).graph.node] == ["conv1", "relu", "conv2"]
    session = ort.InferenceSession(str(export.qdq_model), providers=["CPUExecutionProvider"])
    sim.emulate("onnxruntime")
    with torch.no_grad():
        emulated = sim.model(data).numpy()
    sim.emulate(None)
    np.testing.assert_array_equal(session.run(None, {"image": data.numpy()})[0], emulated)
