"""ONNX models as input: edgequant's sim of an ONNX file made by another tool, against the PyTorch path, ONNX Runtime
and aimet-onnx.

For each ONNX file (torchvision mobilenet_v3_large / resnet50 with random weights and re-estimated BatchNorm
statistics, exported by torch's TorchScript exporter and by its dynamo exporter; EfficientNet-Lite0 (ImageNet) and
all-MiniLM-L6-v2 exported with dynamic axes), W8A8, ``per_channel`` config, min-max calibration:

1. ONNX path vs PyTorch path on the same weights (BatchNorms folded in torch before exporting): the encodings (as a
   multiset of (scale, offset) vectors) and the sims' outputs;
2. the exported ``model_qdq.onnx`` (the user's graph with Q/DQ) run by ONNX Runtime's integer kernels against the
   emulating sim (share of identical output values), and the sim's accuracy against FP32 (ONNX Runtime on the
   user's file): top-1 agreement (CNNs) or the mean cosine of sentence embeddings (MiniLM);
3. aimet-onnx 2.42 (its ``QuantizationSimModel`` on the same file, its ``default_config_per_channel.json``, min-max,
   the same calibration and evaluation data), run in a subprocess with the Python given by ``--aimet-python`` (or
   ``$AIMET_ONNX_PYTHON``): its sim-construction and calibration times and its accuracy. Without it the AIMET
   columns are skipped.

Calibration time is edgequant's ``sim.calibrate`` (min-max statistics computed inside ONNX Runtime where they are
the torch module's, see `edgequant.onnx.calibration`) and AIMET's ``compute_encodings`` (all calibration batches,
weights and activations), the median of ``--repeats`` calls, wall and CPU time of the process (CPU time is steadier
on a shared machine), and each toolkit's first call (edgequant builds its ORT calibration session there; both pay
ONNX Runtime's first run, which allocates its memory); the ONNX-path sim is also
calibrated once through its torch module (``engine="torch"``) to count the encodings ORT's float rounding changes;
"setup" is building the sim from the file (edgequant: conversion + tracing; AIMET: graph preparation + ONNX Runtime
session).

    python -m benchmarks.bench_onnx_input [--models mobilenet_v3_large,resnet50,efficientnet_lite0,minilm]
        [--exporters torchscript,dynamo] [--calibration 32] [--evaluation 64] [--batch-size 16]
        [--aimet-python /tmp/aimet_onnx_venv/bin/python] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.real_models import load_efficientnet_lite0, load_minilm, natural_image_crops, sentences
from edgequant import QuantSim
from edgequant.export.runtime_cpu import u8s8_saturates, with_unsigned_weights
from edgequant.ptq import fold_batch_norms

CNNS = ("mobilenet_v3_large", "resnet50", "efficientnet_lite0")
MODELS = (*CNNS, "minilm")
EXPORTERS = ("torchscript", "dynamo")  # also "dynamo-opset17": the dynamo exporter asked for opset 17
OPSET = 17  # TorchScript exporter; the dynamo exporter writes its own default opset

# --------------------------------------------------------------------------------------------------
# models, data and their ONNX files
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One model: the torch module (BatchNorms folded), its inputs and how its outputs are scored."""

    name: str
    model: nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic: dict[str, dict[int, str]]
    dummy: tuple[torch.Tensor, ...]
    calibration: list[tuple[torch.Tensor, ...]]
    evaluation: list[tuple[torch.Tensor, ...]]
    folded_bn: int = 0
    text: bool = False
    notes: list[str] = field(default_factory=list)


def _re_estimate_batch_norms(model: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    """Running statistics of a randomly initialised net as training would leave them: the cumulative mean and
    variance of each BatchNorm's input over natural-image crops (momentum None), so activations stay normalised."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for batch in images.split(batch_size):
            model(batch)
    model.eval()


def image_case(name: str, args: argparse.Namespace) -> Case:
    import torchvision

    if name == "efficientnet_lite0":
        model = load_efficientnet_lite0()
    else:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None).eval()
        _re_estimate_batch_norms(model, natural_image_crops(32, seed=2), args.batch_size)
    calibration = natural_image_crops(args.calibration, seed=1)
    evaluation = natural_image_crops(args.evaluation, seed=0)
    folded = len(fold_batch_norms(model, evaluation[:1]))
    return Case(
        name, model.eval(), ["image"], ["logits"], {"image": {0: "batch"}, "logits": {0: "batch"}},
        (evaluation[:1],), [(b,) for b in calibration.split(args.batch_size)],
        [(b,) for b in evaluation.split(args.batch_size)], folded_bn=folded,
    )


def minilm_case(args: argparse.Namespace) -> Case:
    model, tokenizer = load_minilm()

    def batches(texts: list[str]) -> list[tuple[torch.Tensor, ...]]:
        out = []
        for start in range(0, len(texts), args.batch_size):
            encoded = tokenizer(texts[start : start + args.batch_size], padding=True, return_tensors="pt")
            out.append((encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"]))
        return out

    evaluation = batches(sentences(args.evaluation, seed=0))
    # a padded row in the dummy: without one BERT records its no-mask path (see bench_per_block)
    dummy = batches(sentences(args.evaluation, seed=0)[:2])[0]
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names}
    dynamic["last_hidden_state"] = {0: "batch", 1: "sequence"}
    dynamic["pooler_output"] = {0: "batch"}
    return Case(
        "minilm", model, names, ["last_hidden_state", "pooler_output"], dynamic, dummy,
        batches(sentences(args.calibration, seed=1)), evaluation, text=True,
    )


class _Positional(nn.Module):
    """BertModel called with positional (input_ids, attention_mask, token_type_ids), returning plain tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor):  # noqa: ANN201
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state, out.pooler_output


def export_onnx(case: Case, exporter: str, path: Path) -> float:
    """Write ``case.model`` to ``path`` with torch's ``exporter``; returns the seconds it took."""
    model = _Positional(case.model) if case.text else case.model
    started = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(model, case.dummy, str(path), dynamo=False, opset_version=OPSET,
                              input_names=case.input_names, output_names=case.output_names,
                              dynamic_axes=case.dynamic)
        else:  # "dynamo": its default opset; "dynamo-opset17": converted down by onnxscript's version converter
            opset = {"opset_version": 17} if exporter == "dynamo-opset17" else {}
            torch.onnx.export(model, case.dummy, str(path), dynamo=True, input_names=case.input_names,
                              output_names=case.output_names, dynamic_axes=case.dynamic, **opset)
    return time.perf_counter() - started


# --------------------------------------------------------------------------------------------------
# running and scoring
# --------------------------------------------------------------------------------------------------


def ort_session(path: str | Path | onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = path.SerializeToString() if isinstance(path, onnx.ModelProto) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_ort(session: ort.InferenceSession, case: Case) -> list[np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    return [session.run(None, dict(zip(names, (x.numpy() for x in batch), strict=True)))[0]
            for batch in case.evaluation]


def float_forward_seconds(session: ort.InferenceSession, case: Case, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of the float model over the calibration batches in ONNX Runtime: the least any
    calibration that runs the model once costs on this CPU (ORT is the fastest float engine here)."""
    names = [i.name for i in session.get_inputs()]
    feeds = [dict(zip(names, (x.numpy() for x in batch), strict=True)) for batch in case.calibration]
    times, cpu_times = [], []
    for _ in range(repeats + 1):  # the first run warms the session up and is not counted
        started, cpu_started = time.perf_counter(), time.process_time()
        for feed in feeds:
            session.run(None, feed)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    return float(np.median(times[1:])), float(np.median(cpu_times[1:]))


def run_torch(model: nn.Module, case: Case, onnx_module: bool) -> list[np.ndarray]:
    """First output per evaluation batch (logits, or BERT's last hidden state)."""
    outputs = []
    with torch.no_grad():
        for batch in case.evaluation:
            if case.text and not onnx_module:
                out = model(input_ids=batch[0], attention_mask=batch[1], token_type_ids=batch[2]).last_hidden_state
            else:
                out = model(*batch)
                out = out[0] if isinstance(out, (tuple, list)) else out
            outputs.append(out.numpy().copy())
    return outputs


def calibrate(sim: QuantSim, case: Case, onnx_module: bool, repeats: int = 1, engine: str = "auto"
              ) -> tuple[float, float, float]:
    """Median wall and CPU seconds of ``repeats`` full calibrations, and the first call's wall seconds (the ONNX
    path builds its ORT calibration session there); each must leave the encodings of the first. The ONNX path
    runs ``sim.calibrate`` with ``engine`` (``"auto"``: ONNX Runtime), the torch path ``sim.compute_encodings``."""

    def forward(model: nn.Module) -> None:
        for batch in case.calibration:
            if case.text and not onnx_module:
                model(input_ids=batch[0], attention_mask=batch[1], token_type_ids=batch[2])
            else:
                model(*batch)

    times, cpu_times, first = [], [], None
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        if onnx_module:
            sim.calibrate(case.calibration, progress=False, engine=engine)
        else:
            sim.compute_encodings(forward)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
        first = encoding_multiset(sim) if first is None else first
    if encoding_multiset(sim) != first:
        raise RuntimeError("a repeated calibration changed the encodings: the timing repeats are not neutral")
    return float(np.median(times)), float(np.median(cpu_times)), times[0]


def scale_difference(sim: QuantSim, case: Case) -> tuple[float, int, int]:
    """The ONNX-path sim calibrated by ONNX Runtime against the same sim calibrated through its torch module: the
    largest relative difference of an activation scale, how many activation encodings differ at all, of how many;
    the sim is left with its ONNX Runtime encodings."""
    def scales(engine: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        sim.calibrate(case.calibration, progress=False, engine=engine)
        return {name: (q.scale.clone(), q.offset.clone()) for name, q in sim.quantizers().items()
                if q.role != "param" and q.scale is not None}

    torch_scales, ort_scales = scales("torch"), scales("auto")
    worst, differing = 0.0, 0
    for name, (scale, offset) in torch_scales.items():
        other_scale, other_offset = ort_scales[name]
        worst = max(worst, float(((other_scale - scale).abs() / scale).max()))
        differing += int(not (torch.equal(scale, other_scale) and torch.equal(offset, other_offset)))
    return worst, differing, len(torch_scales)


def accuracy(case: Case, reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """Top-1 agreement with FP32 (CNNs) or the mean cosine of mean-pooled, normalised embeddings (MiniLM)."""
    if not case.text:
        ref, out = np.concatenate(reference), np.concatenate(outputs)
        return float((ref.argmax(-1) == out.argmax(-1)).mean())
    cosines = []
    for batch, ref, out in zip(case.evaluation, reference, outputs, strict=True):
        mask = batch[1].unsqueeze(-1).float()

        def pool(hidden: np.ndarray, mask: torch.Tensor = mask) -> torch.Tensor:
            pooled = (torch.from_numpy(hidden) * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            return F.normalize(pooled, dim=-1)

        cosines.append((pool(ref) * pool(out)).sum(-1))
    return float(torch.cat(cosines).mean())


def identical_share(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    equal = sum(int((x == y).sum()) for x, y in zip(a, b, strict=True))
    return equal / sum(x.size for x in a)


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def encoding_multiset(sim: QuantSim) -> Counter:
    keys: Counter = Counter()
    for quantizer in sim.quantizers().values():
        if quantizer.enabled and quantizer.scale is not None:
            keys[(tuple(quantizer.scale.flatten().tolist()), tuple(quantizer.offset.flatten().tolist()))] += 1
    return keys


# --------------------------------------------------------------------------------------------------
# aimet-onnx, in its own interpreter
# --------------------------------------------------------------------------------------------------

AIMET_RUNNER = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np, onnx
    spec = json.loads(open(sys.argv[1]).read())
    from aimet_onnx.quantsim import QuantizationSimModel
    import aimet_onnx
    config = os.path.join(os.path.dirname(aimet_onnx.__file__), "common", "quantsim_config",
                          "default_config_per_channel.json")
    data = np.load(spec["data"])
    def batches(kind):
        count = int(data[kind + "_count"])
        return [{n: data[f"{kind}{i}_{n}"] for n in spec["inputs"]} for i in range(count)]
    calibration, evaluation = batches("cal"), batches("eval")
    model = onnx.load(spec["model"])
    started = time.perf_counter()
    sim = QuantizationSimModel(model, param_type="int8", activation_type="int8", quant_scheme="min_max",
                               config_file=config, providers=["CPUExecutionProvider"],
                               session_options_kwargs={"intra_op_num_threads": spec["threads"]})
    setup = time.perf_counter() - started
    times, cpu_times, outputs = [], [], None
    for _ in range(spec["repeats"]):
        started, cpu_started = time.perf_counter(), time.process_time()
        sim.compute_encodings(calibration)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
        if outputs is None:  # accuracy after one calibration, as a user runs it
            outputs = {f"out{i}": sim.session.run(None, feed)[0] for i, feed in enumerate(evaluation)}
    calibration_s, calibration_cpu_s = float(np.median(times)), float(np.median(cpu_times))
    again = [sim.session.run(None, feed)[0] for feed in evaluation]
    repeat_changes = any(not np.array_equal(a, outputs[f"out{i}"]) for i, a in enumerate(again))
    np.savez(spec["outputs"], **outputs)
    import importlib.metadata as md
    json.dump({"setup_s": setup, "calibration_s": calibration_s, "calibration_cpu_s": calibration_cpu_s,
               "first_calibration_s": times[0],
               "repeat_changes": repeat_changes, "version": md.version("aimet-onnx")}, open(spec["result"], "w"))
    """
)


def ort_and_emulated(sim: QuantSim, case: Case, qdq: onnx.ModelProto, threads: int) -> tuple[list, list, object]:
    """The exported QDQ model's outputs in ONNX Runtime's integer kernels (run by the exact u8 x u8 kernels where
    this CPU's u8s8 ones saturate, see runtime_cpu), the emulating sim's, and its emulation plan."""
    if u8s8_saturates():
        qdq, _ = with_unsigned_weights(qdq)
    ort_outputs = run_ort(ort_session(qdq, threads), case)
    plan = sim.emulate("onnxruntime")
    try:
        emulated = run_torch(sim.model, case, onnx_module=True)
    finally:
        sim.emulate(None)
    return ort_outputs, emulated, plan


def run_aimet(python: str, onnx_path: Path, case: Case, work: Path, threads: int, repeats: int) -> dict:
    work.mkdir(exist_ok=True)
    arrays: dict[str, np.ndarray] = {"cal_count": np.array(len(case.calibration)),
                                     "eval_count": np.array(len(case.evaluation))}
    for kind, batches in (("cal", case.calibration), ("eval", case.evaluation)):
        for i, batch in enumerate(batches):
            for name, x in zip(case.input_names, batch, strict=True):
                arrays[f"{kind}{i}_{name}"] = x.numpy()
    np.savez(work / "aimet_data.npz", **arrays)
    (work / "aimet_runner.py").write_text(AIMET_RUNNER)
    spec = {"model": str(onnx_path), "data": str(work / "aimet_data.npz"), "inputs": case.input_names,
            "outputs": str(work / "aimet_outputs.npz"), "result": str(work / "aimet_result.json"), "threads": threads,
            "repeats": repeats}
    (work / "aimet_spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([python, str(work / "aimet_runner.py"), str(work / "aimet_spec.json")], env=env,
                          capture_output=True, text=True, cwd=work)
    if done.returncode != 0:
        last = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"error": last[-1] if last else f"exit code {done.returncode}"}
    result = json.loads((work / "aimet_result.json").read_text())
    with np.load(work / "aimet_outputs.npz") as saved:
        result["outputs"] = [saved[f"out{i}"] for i in range(len(case.evaluation))]
    return result


def aimet_python(option: str | None) -> str | None:
    python = option or os.environ.get("AIMET_ONNX_PYTHON")
    if not python or not Path(python).exists():
        return None
    probe = subprocess.run([python, "-c", "import aimet_onnx.quantsim"], capture_output=True, text=True)
    return python if probe.returncode == 0 else None


# --------------------------------------------------------------------------------------------------
# one (model, exporter) row
# --------------------------------------------------------------------------------------------------


def bench(case: Case, exporter: str, args: argparse.Namespace, torch_path: dict, work: Path) -> dict:
    row: dict = {"model": case.name, "exporter": exporter}
    path = work / f"{case.name}_{exporter}.onnx"
    try:
        row["export_s"] = export_onnx(case, exporter, path)
    except Exception as error:  # noqa: BLE001 - recorded in the table
        row["error"] = f"torch.onnx.export: {type(error).__name__}: {str(error).strip().splitlines()[0]}"
        return row
    graph = onnx.load(str(path))
    row["opset"] = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    row["nodes"] = len(graph.graph.node)
    float_session = ort_session(path, args.threads)
    reference = run_ort(float_session, case)  # FP32: the user's file in ONNX Runtime
    row["float_forward_s"], row["float_forward_cpu_s"] = float_forward_seconds(float_session, case, args.repeats)

    started = time.perf_counter()
    try:
        sim = QuantSim.from_onnx(path, case.dummy, config="per_channel", quant_scheme="minmax")
    except Exception as error:  # noqa: BLE001
        row["error"] = f"QuantSim.from_onnx: {type(error).__name__}: {str(error).strip().splitlines()[0]}"
        row["traceback"] = traceback.format_exc()
        return row
    row["setup_s"] = time.perf_counter() - started
    row["calibration_s"], row["calibration_cpu_s"], row["first_calibration_s"] = calibrate(
        sim, case, onnx_module=True, repeats=args.repeats)
    row["engine_worst"], row["engine_differing"], row["engine_quantizers"] = scale_difference(sim, case)
    row["float_gaps"] = [f"{e.tensor} ({e.op})" for e in sim.coverage() if e.category == "left in float"]
    outputs = run_torch(sim.model, case, onnx_module=True)
    row["accuracy"] = accuracy(case, reference, outputs)

    # 1. the PyTorch path on the same weights
    onnx_encodings, torch_encodings = encoding_multiset(sim), torch_path["encodings"]
    row["quantizers"] = (sum(onnx_encodings.values()), sum(torch_encodings.values()))
    row["encodings"] = (len(set(onnx_encodings) & set(torch_encodings)), len(onnx_encodings), len(torch_encodings))
    row["torch_accuracy"] = accuracy(case, reference, torch_path["outputs"])
    row["torch_identical"] = identical_share(outputs, torch_path["outputs"])
    row["torch_max_diff"] = max_diff(outputs, torch_path["outputs"])

    # 2. the exported original graph with Q/DQ, in ONNX Runtime's integer kernels, against the emulating sim
    started = time.perf_counter()
    try:
        result = sim.export(work / f"{case.name}_{exporter}_export")
    except Exception as error:  # noqa: BLE001
        row["export_error"] = f"sim.export: {type(error).__name__}: {str(error).strip().splitlines()[0]}"
    else:
        row["sim_export_s"] = time.perf_counter() - started
        qdq = onnx.load(str(result.qdq_model))
        original_nodes = {(n.name, n.op_type) for n in graph.graph.node}
        kept = {(n.name, n.op_type) for n in qdq.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")}
        row["names_kept"] = kept == original_nodes
        ort_outputs, emulated, plan = ort_and_emulated(sim, case, qdq, args.threads)
        row["emulation_summary"] = plan.summary() if plan is not None else ""
        row["ort_identical"] = identical_share(ort_outputs, emulated)
        row["ort_max_diff"] = max_diff(ort_outputs, emulated)
        row["ort_accuracy"] = accuracy(case, reference, ort_outputs)
        row["emulated_accuracy"] = accuracy(case, reference, emulated)

    # 3. aimet-onnx on the same file and data
    if args.aimet_python:
        aimet = run_aimet(args.aimet_python, path, case, work / f"{case.name}_{exporter}_aimet", args.threads,
                          args.repeats)
        if "error" in aimet:
            row["aimet_error"] = aimet["error"]
        else:
            row["aimet_setup_s"], row["aimet_calibration_s"] = aimet["setup_s"], aimet["calibration_s"]
            row["aimet_calibration_cpu_s"] = aimet["calibration_cpu_s"]
            row["aimet_first_calibration_s"] = aimet["first_calibration_s"]
            row["aimet_repeat_changes"] = aimet["repeat_changes"]
            row["aimet_accuracy"] = accuracy(case, reference, aimet["outputs"])
            row["aimet_version"] = aimet["version"]
    return row


def torch_path(case: Case, repeats: int) -> dict:
    """The PyTorch path: the same (folded) torch module, the same sim settings and calibration."""
    sim = QuantSim(case.model, case.dummy if not case.text else dict(zip(case.input_names, case.dummy, strict=True)),
                   config="per_channel", quant_scheme="minmax")
    calibration_s, _, _ = calibrate(sim, case, onnx_module=False, repeats=repeats)
    return {"encodings": encoding_multiset(sim), "outputs": run_torch(sim.model, case, onnx_module=False),
            "calibration_s": calibration_s}


# --------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------


def _f(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_rows(rows: list[dict], aimet: bool) -> None:
    print()
    print("| model | exporter | opset "
          "| ONNX path vs torch path: distinct encodings equal / outputs identical (max diff) "
          "| ORT QDQ vs emulating sim: identical (max diff) "
          "| accuracy: torch-path sim / ONNX-path sim / emulating / ORT QDQ "
          "| aimet-onnx accuracy | calibration s: edgequant / aimet-onnx (ratio); CPU s (ratio); torch path; "
          "ORT float forward, wall and CPU (× aimet-onnx's) "
          "| setup s: edgequant / aimet-onnx |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['model']} | {row['exporter']} | {row.get('opset', '—')} | **failed**: {row['error']} "
                  "| | | | | |")
            continue
        same, ours, theirs = row["encodings"]
        first = (f"{same} of {ours} (torch path: {theirs}) / {row['torch_identical']:.2%} "
                 f"({row['torch_max_diff']:.3g})")
        if "export_error" in row:
            second = f"**failed**: {row['export_error']}"
            third = f"{row['torch_accuracy']:.4f} / {row['accuracy']:.4f} / — / —"
        else:
            second = f"{row['ort_identical']:.2%} ({row['ort_max_diff']:.3g})"
            third = (f"{row['torch_accuracy']:.4f} / {row['accuracy']:.4f} / {row['emulated_accuracy']:.4f} / "
                     f"{row['ort_accuracy']:.4f}")
        if "aimet_calibration_s" in row:
            fourth = f"{row['aimet_accuracy']:.4f}" + (" (repeat calibration changes it)" * row["aimet_repeat_changes"])
            ratio = row["calibration_s"] / row["aimet_calibration_s"]
            cpu_ratio = row["calibration_cpu_s"] / row["aimet_calibration_cpu_s"]
            floor = row["float_forward_s"] / row["aimet_calibration_s"]
            cpu_floor = row["float_forward_cpu_s"] / row["aimet_calibration_cpu_s"]
            fifth = (f"{row['calibration_s']:.2f} / {row['aimet_calibration_s']:.2f} ({ratio:.2f}×; first call "
                     f"{row['first_calibration_s']:.2f} / {row['aimet_first_calibration_s']:.2f}); CPU "
                     f"{row['calibration_cpu_s']:.2f} / {row['aimet_calibration_cpu_s']:.2f} ({cpu_ratio:.2f}×); "
                     f"{row['torch_calibration_s']:.2f}; ORT float forward {row['float_forward_s']:.2f} "
                     f"({floor:.2f}×), CPU {row['float_forward_cpu_s']:.2f} ({cpu_floor:.2f}×)")
            sixth = f"{row['setup_s']:.2f} / {row['aimet_setup_s']:.2f}"
        else:
            fourth = f"failed: {row['aimet_error']}" if "aimet_error" in row else ("skipped" if not aimet else "—")
            fifth = (f"{row['calibration_s']:.2f} / —; CPU {row['calibration_cpu_s']:.2f}; "
                     f"{row['torch_calibration_s']:.2f}; ORT float forward {row['float_forward_s']:.2f}, CPU "
                     f"{row['float_forward_cpu_s']:.2f}")
            sixth = f"{row['setup_s']:.2f} / —"
        print(f"| {row['model']} | {row['exporter']} | {row['opset']} | {first} | {second} | {third} | {fourth} "
              f"| {fifth} | {sixth} |")
    print()
    for row in rows:
        label = f"{row['model']} / {row['exporter']}"
        if "traceback" in row:
            print(f"{label}: {row['error']}\n{textwrap.indent(row['traceback'].strip(), '    ')}")
        gaps = row.get("float_gaps")
        if gaps:
            print(f"{label}: left in float: {len(gaps)}: {', '.join(gaps[:6])}{' ...' if len(gaps) > 6 else ''}")
        if "names_kept" in row:
            print(f"{label}: QDQ keeps every original node name/op: {row['names_kept']}; "
                  f"sim.export {row['sim_export_s']:.1f} s; torch export {row['export_s']:.1f} s; {row['nodes']} nodes")
        if "engine_worst" in row:
            print(f"{label}: calibrated by ONNX Runtime vs by the torch module: {row['engine_differing']} of "
                  f"{row['engine_quantizers']} activation encodings differ, largest relative scale difference "
                  f"{row['engine_worst']:.2g}")
        if row.get("emulation_summary"):
            print(f"{label}: emulation: {row['emulation_summary'].splitlines()[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--exporters", default=",".join(EXPORTERS))
    parser.add_argument("--calibration", type=int, default=32, help="calibration images / sentences")
    parser.add_argument("--evaluation", type=int, default=64, help="evaluation images / sentences (others)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="calibrations timed (median), both toolkits")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and ONNX Runtime threads (edgequant and AIMET alike)")
    parser.add_argument("--aimet-python", default=None,
                        help="a Python with aimet-onnx installed (default: $AIMET_ONNX_PYTHON); skipped without")
    parser.add_argument("--work-dir", default=None, help="keep the ONNX files and exports here (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.aimet_python = aimet_python(args.aimet_python)
    if args.aimet_python is None:
        print("aimet-onnx not found (--aimet-python / $AIMET_ONNX_PYTHON): the AIMET columns are skipped")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_onnx_input_"))
    work.mkdir(parents=True, exist_ok=True)
    exporters = args.exporters.split(",")
    rows = []
    try:
        for name in args.models.split(","):
            started = time.perf_counter()
            case = minilm_case(args) if name == "minilm" else image_case(name, args)
            reference_path = torch_path(case, args.repeats)
            for exporter in exporters:
                row = bench(case, exporter, args, reference_path, work)
                row["torch_calibration_s"] = reference_path["calibration_s"]
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("traceback", "emulation_summary")},
                                 default=str), flush=True)
            print(f"# {name}: {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        print_rows(rows, args.aimet_python is not None)
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
