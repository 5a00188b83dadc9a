"""After QAT the sim still exports, and ONNX Runtime's integer kernels reproduce it as before QAT."""

import onnx
import pytest
import torch

from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.export import export_onnx, quantize_bias_int32
from edgequant.export.encodings_io import read_encodings
from edgequant.export.verify import verify
from edgequant.qat import finalize, finetune, prepare_qat
from edgequant.sim import QuantSim


@pytest.mark.parametrize("mode", ["regular", "range_learning"])
def test_parity_with_onnx_runtime_after_qat(tmp_path, mode):
    images, _ = load_digits_tensors("train")
    test_images, _ = load_digits_tensors("test")
    torch.manual_seed(0)
    sim = QuantSim(load_pretrained("digits_cnn"), images[:1], config="per_channel")
    sim.calibrate(images[:128].split(32), progress=False)
    setup = prepare_qat(sim, mode)
    calibrated = {n: q.encoding.to_dict() for n, q in sim.quantizers().items()}
    finetune(sim, images[:256], epochs=2, lr=1e-3, progress=False)
    finalize(sim)
    changed = [n for n, q in sim.quantizers().items() if q.encoding.to_dict() != calibrated[n]]
    assert changed  # training moved the grids (weights in both modes, activations too with range learning)
    if mode == "range_learning":
        assert any(calibrated[n]["scale"] != r.quantizer.encoding.to_dict()["scale"]
                   for n, r in setup.learned.items() if r.quantizer.role == "output")  # activation grids learned
        for learned in setup.learned.values():  # finalize stores the learned offsets as the integers used
            assert torch.equal(learned.quantizer.offset, learned.quantizer.offset.round())
    quantize_bias_int32(sim)
    result = export_onnx(sim, tmp_path, images[:1])
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(result.qdq_model).graph.node}
    exported = read_encodings(result.encodings)
    assert exported  # the encodings file reads back
    report = verify(tmp_path, sim, test_images, progress=False)
    assert report.integer_kernels.get("QLinearConv", 0) == 3
    output = report.outputs[0]
    assert output.share_within_1_lsb >= 0.99 and output.top1_agreement >= 0.995
    assert all(t.sqnr_db > 30 for t in report.tensors)
