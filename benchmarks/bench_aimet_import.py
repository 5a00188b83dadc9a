"""AIMET interoperability on a real network: AIMET 2.42's export of a whole MobileNetV2
(tests/fixtures/aimet-2.42/mobilenet_v2_digits) imported into an edgequant sim of the same float model.

Prints, for each of AIMET's two exporters: how the 134 encodings were placed (by name / through the ONNX graph /
new quantizers), the sim's output against AIMET's simulated output (max abs diff, in LSBs of the output encoding,
share identical), ONNX Runtime running our QDQ export of the imported sim against AIMET's output, and our own
min-max calibration with AIMET's quantizer placement against AIMET's encodings.
Run: python benchmarks/bench_aimet_import.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import aimet_fixtures as fixtures  # noqa: E402 - the fixture helpers live with the tests

import edgequant as eq  # noqa: E402


def compare(name: str, ours: np.ndarray, aimets: np.ndarray, scale: float) -> None:
    diff = np.abs(ours - aimets)
    print(f"  {name}: max abs diff {diff.max():.3g} = {diff.max() / scale:.3g} LSB, "
          f"identical {100 * (diff == 0).mean():.2f} %, top-1 agreement "
          f"{100 * (ours.argmax(1) == aimets.argmax(1)).mean():.1f} %")


def main() -> None:
    images = fixtures.load_fixture_tensor(fixtures.MOBILENET / "input.pt")
    aimets = fixtures.load_fixture_tensor(fixtures.MOBILENET / "sim_output_w8a8_pt_minmax.pt")
    calibration = fixtures.load_fixture_tensor(fixtures.MOBILENET / "calibration_input.pt")
    for folder in ("legacy_1.0.0", "onnx_api"):
        sim = eq.QuantSim(fixtures.mobilenet(), images[:1])
        start = time.perf_counter()
        report = sim.load_encodings(fixtures.MOBILENET / folder / "model.encodings", partial=False,
                                    onnx_model=fixtures.aimet_onnx_graph(folder))
        seconds = time.perf_counter() - start
        print(f"{folder}: {len(report.placed)} entries placed ({len(report.matched_by_graph)} through AIMET's ONNX "
              f"graph, {len(report.added)} on new quantizers), {len(report.skipped)} accounted for without a "
              f"quantizer, {len(report.disabled)} sim quantizers disabled; load {seconds:.1f} s")
        scale = float(sim.quantizers()["net.classifier.1.output_quantizers.0"].encoding.scale)
        with torch.no_grad():
            ours = sim.model(images)
        compare("sim vs AIMET sim", ours.numpy(), aimets.numpy(), scale)
        if folder != "legacy_1.0.0":
            continue
        with tempfile.TemporaryDirectory() as out:
            result = sim.export(out)
            session = ort.InferenceSession(str(result.qdq_model), providers=["CPUExecutionProvider"])
            runtime = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
        compare("ONNX Runtime (our QDQ export) vs AIMET sim", runtime, aimets.numpy(), scale)
        for quantized_weights in (False, True):
            calibrated = eq.QuantSim(fixtures.mobilenet(), images[:1])
            calibrated.load_encodings(fixtures.MOBILENET / folder / "model.encodings", partial=False)
            for quantizer_name, quantizer in calibrated.quantizers().items():  # AIMET's placement, our calibration
                quantizer.frozen = quantized_weights and ".param_quantizers." in quantizer_name
            calibrated.calibrate(calibration.split(32), progress=False)
            reference = sim.quantizers()
            enabled = {n: q for n, q in calibrated.quantizers().items() if q.enabled}
            same = sum(q.encoding.equals(reference[n].encoding) for n, q in enabled.items())
            with torch.no_grad():
                output = calibrated.model(images)
            how = "weights quantized while observing activations" if quantized_weights else "float weights"
            print(f"  our min-max calibration ({how}): {same} of {len(enabled)} encodings identical to AIMET's")
            compare("   its output vs AIMET sim", output.numpy(), aimets.numpy(), scale)


if __name__ == "__main__":
    main()
