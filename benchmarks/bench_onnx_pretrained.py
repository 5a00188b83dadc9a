"""Pretrained ONNX files from PyPI, written by another framework's exporter: PaddleOCR's PP-OCRv4 text detector and
its text-direction classifier as the `rapidocr_onnxruntime` wheel ships them (paddle2onnx, opsets 12 and 11).

Each file is converted to opset 13 with ``onnx.version_converter`` (per-channel Q/DQ need it; `QuantSim.from_onnx`
refuses lower opsets with that advice), loaded with `load_onnx`, its BatchNorms folded as ``edgequant quantize``
does, quantized W8A8 ``per_channel`` with min-max calibration on 32 crops (half of ``skimage.data.text()``'s printed
page, half natural photos), and evaluated on 64 others: the detector by the mean cosine of its text-probability map
with FP32's, the classifier by top-1 agreement.
FP32 is ONNX Runtime running the converted file. Columns as in ``bench_onnx_input.py``: ORT parity of the exported
original-graph QDQ model against the emulating sim, and aimet-onnx 2.42 on the same file and data (optional).

    pip install --no-deps rapidocr_onnxruntime==1.4.4   # the model files only; its own dependencies are not needed
    OMP_NUM_THREADS=1 python -m benchmarks.bench_onnx_pretrained [--aimet-python PYTHON]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import skimage.data
import torch
import torch.nn.functional as F
from onnx import version_converter

from benchmarks.bench_onnx_input import (
    Case,
    aimet_python,
    calibrate,
    identical_share,
    max_diff,
    ort_and_emulated,
    ort_session,
    run_aimet,
    run_ort,
    run_torch,
)
from benchmarks.real_models import natural_image_crops
from edgequant import QuantSim, load_onnx
from edgequant.ptq import fold_batch_norms

MODELS = {  # file in the wheel -> (input height, width), what its output is, PaddleOCR's mean and std per channel
    "ch_PP-OCRv4_det_infer.onnx": ((256, 256), "detector", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": ((48, 192), "classifier", ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))),
}
OPSET = 13


def model_folder() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")  # finds the package without importing it (cv2 et al.)
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps rapidocr_onnxruntime==1.4.4 (it ships the ONNX files)")
    return Path(spec.origin).parent / "models"


def images(count: int, size: tuple[int, int], normalisation: tuple, seed: int) -> torch.Tensor:
    """Crops of ``skimage.data.text()`` (printed text on a textured page), mixed half and half with natural-image
    crops, resized to ``size`` and normalised as PaddleOCR does (``(x - mean) / std`` on [0, 1] pixels)."""
    generator = torch.Generator().manual_seed(seed)
    page = torch.from_numpy(skimage.data.text()).float().div(255.0)
    height, width = size
    crops = []
    for _ in range(count - count // 2):
        crop_height = int(torch.randint(page.shape[0] // 3, page.shape[0] + 1, (), generator=generator))
        crop_width = min(page.shape[1], crop_height * width // height)
        top = int(torch.randint(0, page.shape[0] - crop_height + 1, (), generator=generator))
        left = int(torch.randint(0, page.shape[1] - crop_width + 1, (), generator=generator))
        crop = page[top:top + crop_height, left:left + crop_width].expand(3, -1, -1)[None]
        crops.append(F.interpolate(crop, size=size, mode="bilinear", align_corners=False))
    photos = natural_image_crops(count // 2, size=max(size), seed=seed) * 128 / 255 + 127 / 255  # back to [0, 1]
    photos = F.interpolate(photos, size=size, mode="bilinear", align_corners=False)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalisation)
    return ((torch.cat([*crops, photos]) - mean) / std)[torch.randperm(count, generator=generator)]


def fidelity(kind: str, reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """Top-1 agreement (classifier) or the mean cosine of the probability maps (detector); NaN where FP32 finds no
    text at all (every probability below 0.01), which leaves nothing to compare."""
    ref, out = np.concatenate(reference), np.concatenate(outputs)
    if kind == "classifier":
        return float((ref.argmax(-1) == out.argmax(-1)).mean())
    if ref.max() < 0.01:
        return float("nan")
    ref, out = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    cosine = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1) + 1e-12)
    return float(cosine.mean())


def bench(file: Path, size: tuple[int, int], kind: str, normalisation: tuple, args: argparse.Namespace,
          work: Path) -> dict:
    original = onnx.load(file)
    path = work / file.name
    onnx.save(version_converter.convert_version(original, OPSET), path)
    calibration = images(args.calibration, size, normalisation, seed=1)
    evaluation = images(args.evaluation, size, normalisation, seed=2)
    case = Case(file.stem, None, ["x"], [], {}, (calibration[:1],),
                [(b,) for b in calibration.split(args.batch_size)], [(b,) for b in evaluation.split(args.batch_size)])
    row: dict = {"model": file.stem, "opset": next(o.version for o in original.opset_import if o.domain == ""),
                 "nodes": len(original.graph.node)}
    reference = run_ort(ort_session(path, args.threads), case)

    started = time.perf_counter()
    model = load_onnx(path)
    row["folded_bn"] = len(fold_batch_norms(model, case.dummy[0]))
    sim = QuantSim(model, case.dummy[0], config="per_channel", quant_scheme="minmax")
    row["setup_s"] = time.perf_counter() - started
    row["float_nodes"] = len(model.onnx_source.float_nodes)
    row["calibration_s"], row["calibration_cpu_s"], row["first_calibration_s"] = calibrate(
        sim, case, onnx_module=True, repeats=args.repeats)
    row["fidelity"] = fidelity(kind, reference, run_torch(sim.model, case, onnx_module=True))

    result = sim.export(work / f"{file.stem}_export")
    qdq = onnx.load(str(result.qdq_model))
    kept = {(n.name, n.op_type) for n in qdq.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")}
    original = {(n.name, n.op_type) for n in onnx.load(path).graph.node}
    removed = original - kept  # must be the folded BatchNorms, and nothing added
    row["names_kept"] = (kept <= original and {op for _, op in removed} <= {"BatchNormalization"}
                         and len(removed) == row["folded_bn"])
    ort_outputs, emulated, plan = ort_and_emulated(sim, case, qdq, args.threads)
    row["coverage"] = plan.coverage() if plan is not None else ""
    row["ort_identical"], row["ort_max_diff"] = identical_share(ort_outputs, emulated), max_diff(ort_outputs, emulated)
    row["ort_fidelity"] = fidelity(kind, reference, ort_outputs)
    if args.aimet_python:
        aimet = run_aimet(args.aimet_python, path, case, work / f"{file.stem}_aimet", args.threads, args.repeats)
        row["aimet_error"] = aimet.get("error")
        if "outputs" in aimet:
            row["aimet_calibration_s"] = aimet["calibration_s"]
            row["aimet_calibration_cpu_s"] = aimet["calibration_cpu_s"]
            row["aimet_fidelity"] = fidelity(kind, reference, aimet["outputs"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--evaluation", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--aimet-python", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.aimet_python = aimet_python(args.aimet_python)
    folder = model_folder()
    print("| model (opset as shipped) | BatchNorms folded; other nodes kept by name | float nodes | ops emulated | "
          "ORT QDQ vs emulating sim: identical (max diff) | fidelity: sim / ORT QDQ / aimet-onnx | "
          "calibration s, edgequant / aimet-onnx: wall (ratio); CPU (ratio) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for file, (size, kind, normalisation) in MODELS.items():
            row = bench(folder / file, size, kind, normalisation, args, Path(work))
            print(json.dumps(row, default=str), flush=True)
            aimet = f"{row['aimet_fidelity']:.4f}" if "aimet_fidelity" in row else row.get("aimet_error") or "—"
            timing = "; ".join(
                f"{row[key]:.2f} / {row['aimet_' + key]:.2f} ({row[key] / row['aimet_' + key]:.2f}×)"
                if "aimet_" + key in row else f"{row[key]:.2f} / —" for key in ("calibration_s", "calibration_cpu_s"))
            kept = "yes" if row["names_kept"] else "NO"
            print(f"| {row['model']} ({row['opset']}) | {row['folded_bn']}; {kept} | {row['float_nodes']} | "
                  f"{row['coverage']} | {row['ort_identical']:.2%} ({row['ort_max_diff']:.3g}) | "
                  f"{row['fidelity']:.4f} / {row['ort_fidelity']:.4f} / {aimet} | {timing} |", flush=True)


if __name__ == "__main__":
    main()
