"""all-MiniLM-L6-v2 in ONNX Runtime's integer kernels against the emulating sim, by both ways into edgequant.

* PyTorch path: ``QuantSim`` of the Hugging Face ``BertModel`` (eager attention), exported with ``sim.export``.
* ONNX path: ``QuantSim.from_onnx`` of the same model exported by torch (``torchscript``: the TorchScript
  exporter, opset 17; ``dynamo``: the dynamo exporter, its default opset), exported with ``sim.export`` into that
  graph.

Both: W8A8, ``per_channel`` config, min-max calibration on 32 generated sentences (seed 1); the QDQ model run by
ONNX Runtime (CPU, ``ORT_ENABLE_ALL``, 1 thread; dynamic batch and sequence axes) on 64 other sentences (seed 0)
in batches of 16, each padded to its longest sentence. Printed per path: the ops the emulation covers, the share
of last-hidden-state elements equal on the output grid (all tokens, and real tokens only) for the default and
the emulating sim, and `edgequant.export.verify`'s first quantized tensor that differs while emulating.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m benchmarks.bench_minilm_emulation [--paths torch torchscript dynamo]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.real_models import load_minilm, sentences
from edgequant import QuantSim
from edgequant.export.verify import verify

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _Positional(nn.Module):
    """BertModel called with positional inputs, returning its last hidden state (what torch's exporter needs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def batches(tokenizer: object, texts: list[str], size: int) -> list[dict[str, torch.Tensor]]:
    return [{k: v for k, v in tokenizer(texts[i:i + size], padding=True, return_tensors="pt").items() if k in INPUTS}
            for i in range(0, len(texts), size)]


def last_hidden(sim: QuantSim, data: list[dict[str, torch.Tensor]], positional: bool) -> list[np.ndarray]:
    with torch.no_grad():
        if positional:
            return [sim.model(*(b[k] for k in INPUTS)).numpy() for b in data]
        return [sim.model(**b).last_hidden_state.numpy() for b in data]


def compare(name: str, outputs: list[np.ndarray], reference: list[np.ndarray], step: float,
            data: list[dict[str, torch.Tensor]]) -> str:
    steps = np.concatenate([np.abs(o - r).ravel() for o, r in zip(outputs, reference, strict=True)]) / step
    real = np.concatenate([np.broadcast_to(b["attention_mask"].bool().numpy()[..., None], o.shape).ravel()
                           for b, o in zip(data, outputs, strict=True)])
    return (f"{name}: identical {np.mean(steps < 0.5):.4%} (real tokens {np.mean(steps[real] < 0.5):.4%}), "
            f"max {steps.max():.0f} steps (real tokens {steps[real].max():.0f})")


def run_path(path: str, model: nn.Module, tokenizer: object, calibration: list, evaluation: list,
             work: Path) -> None:
    positional = path != "torch"
    dummy = {k: v[:2] for k, v in evaluation[0].items()}  # a padded row: BERT's masked path is the one recorded
    assert (dummy["attention_mask"] == 0).any(), "the dummy input needs a padded sentence"
    dynamic = {k: {0: "batch", 1: "sequence"} for k in INPUTS}
    if positional:
        onnx_file = work / "minilm.onnx"
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            opset = {"opset_version": 17} if path == "torchscript" else {}
            torch.onnx.export(_Positional(model), tuple(dummy[k] for k in INPUTS), str(onnx_file),
                              dynamo=path == "dynamo", input_names=list(INPUTS), output_names=["last_hidden_state"],
                              dynamic_axes={**dynamic, "last_hidden_state": {0: "batch", 1: "sequence"}}, **opset)
        sim = QuantSim.from_onnx(onnx_file, tuple(dummy[k] for k in INPUTS), config="per_channel")
        sim.compute_encodings(lambda m: [m(*(b[k] for k in INPUTS)) for b in calibration])
        export = sim.export(work / path, tuple(dummy[k] for k in INPUTS))
        data = [tuple(b[k] for k in INPUTS) for b in evaluation]
    else:
        sim = QuantSim(model, dummy, config="per_channel")
        sim.compute_encodings(lambda m: [m(**b) for b in calibration])
        export = sim.export(work / "torch_path", dummy, dynamic_axes=dynamic)
        data = evaluation
    out_dir = Path(export.qdq_model).parent
    name = Path(export.qdq_model).name.removesuffix("_qdq.onnx")
    default_report = verify(out_dir, sim, data, name=name, batch_size=16, progress=False)
    default = last_hidden(sim, evaluation, positional)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = sim.emulate("onnxruntime")
    report = verify(out_dir, sim, data, name=name, batch_size=16, progress=False)
    emulated = last_hidden(sim, evaluation, positional)
    sim.emulate(None)
    kernels = ", ".join(f"{k}×{n}" for k, n in sorted(report.integer_kernels.items()))
    label = "PyTorch path" if path == "torch" else f"ONNX path ({path} export)"
    print(f"\n== {label}: {plan.coverage()}\n  ORT integer kernels: {kernels}", flush=True)
    for line in plan.summary().splitlines()[2:6]:  # what is emulated, and the first ops that are not
        print("  " + line.strip())
    reference = ort_outputs(out_dir / f"{name}_qdq.onnx", data)
    step = float(np.min(np.diff(np.unique(np.concatenate([r.ravel() for r in reference])))))  # the output grid's
    print("  " + compare("default sim  ", default, reference, step, evaluation))
    print("  " + compare("emulating sim", emulated, reference, step, evaluation))
    for label, parity in (("default", default_report), ("emulating", report)):
        first = parity.first_difference
        differing = sum(t.share_identical < 1.0 for t in parity.tensors)
        where = "none" if first is None else f"{first.tensor} ({first.share_identical:.4%} identical)"
        print(f"  {label}: {differing} of {len(parity.tensors)} quantized tensors differ; first: {where}")
    print(report.tensor_table() if report.first_difference is not None else "", flush=True)


def ort_outputs(qdq: Path, data: list) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(qdq), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = [b if isinstance(b, dict) else dict(zip(INPUTS, b, strict=True)) for b in data]
    return [session.run(None, {n: f[n].numpy() for n in names})[0] for f in feeds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", nargs="+", default=["torch", "torchscript", "dynamo"],
                        choices=["torch", "torchscript", "dynamo"])
    parser.add_argument("--calibration-sentences", type=int, default=32)
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_minilm()
    calibration = batches(tokenizer, sentences(args.calibration_sentences, seed=1), args.batch_size)
    evaluation = batches(tokenizer, sentences(args.sentences, seed=0), args.batch_size)
    with tempfile.TemporaryDirectory() as work:
        for path in args.paths:
            run_path(path, model, tokenizer, calibration, evaluation, Path(work))


if __name__ == "__main__":
    main()
