"""`QuantAnalyzer`: where and why a quantized model loses accuracy, in one JSON file and one HTML page."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from edgequant.analysis.fidelity import OutputFidelity
from edgequant.analysis.layer_pass import LayerPassResult, run_layer_pass
from edgequant.analysis.onnx_names import layer_tensor_names
from edgequant.analysis.report import write_report
from edgequant.analysis.result import BATCH_NORM, ActivationRange, AnalysisResult, LayerAnalysis, encoding_dict
from edgequant.analysis.sweeps import LayerSensitivity, Sweeps
from edgequant.analysis.weights import weight_ranges
from edgequant.config import HardwareConfig
from edgequant.quantization import MethodSpec, Quantizer
from edgequant.sim import QuantSim

JSON_NAME, REPORT_NAME, DUMP_NAME = "analysis.json", "report.html", "layer_outputs.npz"
MODEL_INPUT = "<model input>"


class QuantAnalyzer:
    """Analyse the quantization of ``model``: sensitivities, output error along the network, ranges.

    The sim is exactly ``QuantSim(model, dummy_input, param_bw=..., output_bw=..., quant_scheme=..., config=...)``
    calibrated on all of ``calibration_data`` (no folding or other transform: do those first, e.g.
    `edgequant.ptq.fold_batch_norms` as deployment does, or analyse your own sim with `from_sim`; BatchNorms left
    unfolded are listed in ``settings["batch_norms_unfolded"]`` and the advice says so); ``model`` itself is
    never modified. ``eval_fn(model) -> float`` (higher is
    better) is called on ``sim.model`` with quantizers switched on and off; without it the metric is
    `OutputFidelity` (1 - NMSE of the model outputs vs FP32) on the analysis batches, and each per-layer
    sweep starts at the layer's cut instead of the model input (`cut_sweeps`: same figures, about half the
    forwards). ``analyzer.sim`` and ``analyzer.metric`` re-measure any figure of the result.
    """

    def __init__(
        self,
        model: nn.Module,
        dummy_input: Any,
        calibration_data: Iterable[Any],
        eval_fn: Callable[[nn.Module], float] | None = None,
        *,
        param_bw: int = 8,
        output_bw: int = 8,
        quant_scheme: MethodSpec = "minmax",
        config: str | Path | dict | HardwareConfig = "default",
        progress: bool = True,
    ) -> None:
        data = _reiterable(calibration_data)
        started = time.perf_counter()
        sim = QuantSim(model, dummy_input, param_bw=param_bw, output_bw=output_bw, quant_scheme=quant_scheme,
                       config=config)
        sim.calibrate(data, progress=progress)
        self._setup(sim, data, eval_fn, progress, config if isinstance(config, str) else "custom")
        self.timings["build_and_calibrate_s"] = time.perf_counter() - started

    @classmethod
    def from_sim(cls, sim: QuantSim, calibration_data: Iterable[Any],
                 eval_fn: Callable[[nn.Module], float] | None = None, *, progress: bool = True) -> QuantAnalyzer:
        """Analyse an existing, calibrated sim as it is (its enabled quantizers are "quantized"); the sim's
        flags and encodings are the same after the analysis."""
        missing = [n for n, q in sim.quantizers().items() if q.enabled and not q.ready]
        if missing:
            raise ValueError(f"{len(missing)} enabled quantizers of the sim have no encoding (e.g. {missing[0]}); "
                             "calibrate the sim (sim.calibrate(data)) before analysing it")
        analyzer = cls.__new__(cls)
        analyzer._setup(sim, _reiterable(calibration_data), eval_fn, progress, "from sim")
        return analyzer

    def _setup(self, sim: QuantSim, data: Iterable[Any], eval_fn: Callable | None, progress: bool,
               config_name: str) -> None:
        self.sim, self.data, self.eval_fn, self.progress = sim, data, eval_fn, progress
        self.metric: Callable[[nn.Module], float] | None = eval_fn
        self.settings = {"param_bw": sim.param_bw, "output_bw": sim.output_bw, "quant_scheme": str(sim.quant_scheme),
                         "config": config_name, "batch_norms_unfolded": [
                             name for name, module in sim.quantized_modules().items()
                             if module.onnx_op_type == BATCH_NORM]}
        self.timings: dict[str, float] = {}

    def layers(self) -> dict[str, nn.Module]:
        """The sim layers that own at least one enabled quantizer, by name."""
        return {name: module for name, module in self.sim.quantized_modules().items()
                if any(q.enabled for q in module.quantizers().values())}

    def analyze(self, out_dir: str | Path, *, num_batches: int | None = None, dump_samples: int = 1) -> AnalysisResult:
        """Measure everything, write ``analysis.json``, ``report.html`` and ``layer_outputs.npz`` (the first
        batch's first ``dump_samples`` samples of every layer output, FP32 and sim, keyed ``fp32:<ONNX tensor>``
        / ``sim:<ONNX tensor>``, plus ``input:<ONNX input>``; 0: no dump). ``num_batches`` limits the batches of
        the per-layer pass and of the default metric (``eval_fn`` sees whatever data it uses itself)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        clock = time.perf_counter()
        batches = list(self.sim.batches(self.data, num_batches, desc="analysis batches"))
        layers = self.layers()
        tensor_names, input_names = layer_tensor_names(self.sim, layers)
        if not tensor_names:
            tensor_names = {name: [(0, name)] for name in layers}
        self.timings["onnx_names_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        activations = {n: q for n, q in self.sim.quantizers(role=("model_input", "input", "output")).items()
                       if q.enabled}
        passed = run_layer_pass(self.sim, batches, layers, activations, tensor_names, input_names, dump_samples,
                                self.progress)
        if self.eval_fn is None:
            self.metric = OutputFidelity(batches, passed.reference_outputs)
        metric_name = OutputFidelity.name if self.eval_fn is None else "eval_fn"
        self.timings["layer_pass_s"] = time.perf_counter() - clock

        clock = time.perf_counter()
        model_inputs = [q for q in activations.values() if q.role == "model_input"]
        sweeps = Sweeps(self.sim, self.metric, 4 + 2 * (len(layers) + bool(model_inputs)), self.progress)
        ordered = passed.order + [name for name in layers if name not in passed.order]
        own = {name: [q for q in layers[name].quantizers().values() if q.enabled] for name in ordered}
        try:
            with self._weights_for_sweeps():
                totals = sweeps.global_metrics()
                sensitivities = sweeps.layers(own)
                input_sensitivity = sweeps.layer(model_inputs) if model_inputs else None
        finally:
            sweeps.close()
        entries = [self._layer(name, layers[name], own[name], sensitivities[name], passed, tensor_names)
                   for name in ordered]
        model_input = self._model_input(model_inputs, input_sensitivity, passed) if input_sensitivity else None
        self.timings["sweeps_s"] = time.perf_counter() - clock

        result = AnalysisResult(metric_name, totals.fp32, totals.quantized, totals.weights_only,
                                totals.activations_only, entries, model_input, self.settings, len(batches),
                                self.timings)
        clock = time.perf_counter()
        result.files = [out_dir / JSON_NAME, out_dir / REPORT_NAME]
        if passed.dump:
            np.savez(out_dir / DUMP_NAME, **passed.dump)
            result.files.append(out_dir / DUMP_NAME)
        write_report(result, out_dir / REPORT_NAME)
        self.timings["write_s"] = time.perf_counter() - clock
        result.write_json(out_dir / JSON_NAME)
        return result

    def _weights_for_sweeps(self) -> AbstractContextManager:
        """The default metric runs under ``no_grad`` only: fold the fake-quantized weights in once for the sweeps
        (`QuantSim.frozen_weights`, the same values) instead of quantizing every weight again in every forward.
        A user's ``eval_fn`` may need the float weights or gradients: it gets the sim as it is."""
        if self.eval_fn is not None or self.sim.weights_frozen:
            return nullcontext()
        return self.sim.frozen_weights()

    def _layer(self, name: str, layer: nn.Module, quantizers: list[Quantizer], sensitivity: LayerSensitivity,
               passed: LayerPassResult, tensor_names: dict[str, list[tuple[int, str]]]) -> LayerAnalysis:
        error = passed.errors.get(name)
        return LayerAnalysis(
            name, layer.onnx_op_type, [q.name for q in quantizers], sensitivity.only_this_quantized,
            sensitivity.all_but_this_quantized, error.sqnr_db if error is not None else None,
            [tensor for _, tensor in tensor_names.get(name, [])],
            [weight_ranges(self.sim, q) for q in quantizers if q.role == "param"],
            [_activation_range(q, passed) for q in quantizers if q.role != "param"],
            {q.name: encoding_dict(q.encoding) for q in quantizers},
        )

    def _model_input(self, quantizers: list[Quantizer], sensitivity: LayerSensitivity,
                     passed: LayerPassResult) -> LayerAnalysis:
        return LayerAnalysis(
            MODEL_INPUT, "input", [q.name for q in quantizers], sensitivity.only_this_quantized,
            sensitivity.all_but_this_quantized, None, [], [], [_activation_range(q, passed) for q in quantizers],
            {q.name: encoding_dict(q.encoding) for q in quantizers},
        )


def _activation_range(quantizer: Quantizer, passed: LayerPassResult) -> ActivationRange:
    stats = passed.activations[quantizer.name]
    return ActivationRange(quantizer.name, quantizer.role, stats.minimum, stats.maximum, stats.clipped_fraction,
                           stats.histogram(quantizer.encoding))


def _reiterable(data: Iterable[Any]) -> Iterable[Any]:
    """Calibration and analysis both read the data: a one-shot iterator is kept as a list."""
    return list(data) if iter(data) is data else data
