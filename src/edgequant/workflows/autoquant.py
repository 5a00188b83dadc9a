"""AutoQuant: try the post-training techniques in order of cost and stop as soon as the metric is good enough.

Order (cheapest first, as AIMET's AutoQuant): FP32 -> calibration scheme search -> weights-vs-activations
diagnosis (W32 and A32 evaluations) -> BN folding -> cross-layer equalization -> bias correction -> AdaRound.
Each step is evaluated with the user's ``eval_fn`` (higher is better) and logged with its time and the layers
it touched. Every finished step is cached in ``results_dir/<settings hash>/`` (its sim state via `QuantSim.save`
plus a JSON log), so a rerun with the same model, data and settings resumes instead of recomputing; the float
models of the BN-fold/CLE stages are rebuilt on resume (deterministic and cheap next to calibration and
AdaRound). When nothing meets the target, a per-layer sensitivity sweep (one layer's quantizers off at a
time) backs a concrete recommendation instead of an empty result.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from edgequant.analysis.result import BATCH_NORM
from edgequant.config import HardwareConfig
from edgequant.mixed_precision import choose_mixed_precision
from edgequant.ptq.adaround import adaround
from edgequant.quantization import MethodSpec
from edgequant.sim import QuantSim
from edgequant.workflows.autoquant_report import write_report
from edgequant.workflows.autoquant_result import AutoQuantResult, StepRecord

DEFAULT_SCHEMES = ("minmax", "sqnr", "percentile")
MAX_BITWIDTH = 16
LOG_NAME = "autoquant_log.json"


@dataclass(frozen=True)
class QuantSimSettings:
    """The sims every step builds and calibrates: bit widths, hardware config, calibration batches, and whether
    the model's BatchNorms are folded first (as deployment does: no step then quantizes a BatchNorm or ranks
    one in the sensitivity sweep, and the ``bn_fold`` step is left out)."""

    param_bw: int = 8
    output_bw: int = 8
    config: str | Path | dict | HardwareConfig = "default"
    num_batches: int | None = None
    fold_bn: bool = False


@dataclass(frozen=True)
class AutoQuantSettings:
    """What AutoQuant searches: the allowed drop, the calibration schemes, the AdaRound step, the mixed-precision
    candidates tried last, the sensitivity metric, and the sims they run on; where finished steps are cached.

    ``sensitivity_eval_fn`` (default: the run's ``eval_fn``) is called once per layer when the target is missed;
    pass a cheaper one for big models. ``mixed_precision_candidates`` (``(param_bw, output_bw)`` pairs): when no
    step meets the target, a last step chooses per-layer bit widths among them on the best sim
    (`edgequant.mixed_precision.choose_mixed_precision`).
    """

    allowed_accuracy_drop: float = 0.01
    schemes: tuple[MethodSpec, ...] = DEFAULT_SCHEMES
    adaround_iterations: int = 10000
    adaround_kwargs: dict[str, Any] | None = None
    mixed_precision_candidates: Sequence[Sequence[int]] | None = None
    sensitivity_eval_fn: Callable[[nn.Module], float] | None = None
    sim: QuantSimSettings = field(default_factory=QuantSimSettings)
    results_dir: str | Path = "autoquant_results"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.allowed_accuracy_drop < 0:
            raise ValueError(f"allowed_accuracy_drop must be >= 0, got {self.allowed_accuracy_drop}")
        if not self.schemes:
            raise ValueError("schemes must name at least one calibration scheme")

    @classmethod
    def build(cls, base: AutoQuantSettings | None = None, **keywords: Any) -> AutoQuantSettings:
        """``base`` (None: the defaults) with each keyword replacing the field of that name, `QuantSimSettings`'
        included, so that a call reads ``autoquant(model, dummy, data, eval_fn, param_bw=4, schemes=("sqnr",))``."""
        base = base or cls()
        sim_names = {f.name for f in fields(QuantSimSettings)}
        sim = replace(base.sim, **{k: v for k, v in keywords.items() if k in sim_names})
        return replace(base, sim=sim, **{k: v for k, v in keywords.items() if k not in sim_names})

    def cache_key(self, config: HardwareConfig) -> dict[str, Any]:
        """The settings that change a step's result, hashed (with the model and data) into the cache folder."""
        return {
            "param_bw": self.sim.param_bw, "output_bw": self.sim.output_bw, "config": config.raw,
            "schemes": list(self.schemes), "num_batches": self.sim.num_batches,
            "allowed_accuracy_drop": self.allowed_accuracy_drop, "adaround_iterations": self.adaround_iterations,
            "adaround_kwargs": self.adaround_kwargs or {},
            "mixed_precision_candidates": [list(c) for c in self.mixed_precision_candidates or []],
            "fold_bn": self.sim.fold_bn,
        }


def autoquant(
    model: nn.Module, dummy_input: Any, data: Iterable[Any], eval_fn: Callable[[nn.Module], float],
    settings: AutoQuantSettings | None = None, **keywords: Any,
) -> AutoQuantResult:
    """Quantize ``model`` to meet ``eval_fn(fp32) - allowed_accuracy_drop`` with as little work as possible, with
    ``settings``, or the settings the keywords name (``allowed_accuracy_drop=0.01, param_bw=4``: the fields of
    `AutoQuantSettings` and `QuantSimSettings`; with ``settings``, they replace its fields).

    ``data`` yields calibration batches (re-iterable: it is used by every step); ``eval_fn(model) -> float``
    is higher-is-better. The user's model is not modified.
    """
    settings = AutoQuantSettings.build(settings, **keywords)
    folded: list[str] = []
    if settings.sim.fold_bn:
        model = copy.deepcopy(model).eval()
        folded = _fold_batch_norms(model, dummy_input)
    run = _Run(model, dummy_input, data, eval_fn, settings)
    run.open_log(Path(settings.results_dir), settings.cache_key(run.config))
    described = f"FP32 model, {len(folded)} BatchNorms folded" if settings.sim.fold_bn else "FP32 model"
    fp32 = run.step("fp32", lambda: (None, f"{described}, no quantization", folded, run.evaluate(model)),
                    diagnostic=True)
    run.target = fp32.metric - settings.allowed_accuracy_drop
    _run_steps(run)
    best = run.best()
    sim = run.restore(best)
    result = AutoQuantResult(
        sim, fp32.metric, run.target, best.name, best.metric, best.metric >= run.target,
        run.directory / best.state_file, run.directory / "autoquant_report.html", run.steps,
    )
    if not result.target_met:
        result.sensitivity = run.sensitivity(sim, best, settings.sensitivity_eval_fn or eval_fn)
        result.recommendation = _recommend(result, settings.sim.param_bw, settings.sim.output_bw)
    write_report(result, result.report_path)
    return result


def _run_steps(run: _Run) -> None:
    """The ladder of techniques; returns as soon as a candidate meets the target. With ``fold_bn`` the model's
    BatchNorms are already folded, so the best calibration is the folded stage."""
    calibrated = [
        run.step(f"calibration:{s}", lambda s=s: run.calibrated("original", s, "calibrated"))
        for s in run.settings.schemes
    ]
    best = max(calibrated, key=lambda s: s.metric)
    scheme = best.scheme
    run.diagnose(best)
    if run.met(best):
        return
    folded = best
    if not run.settings.sim.fold_bn:
        folded = run.step("bn_fold", lambda: run.calibrated("bn_fold", scheme, "BatchNorms folded, then calibrated"))
        if run.met(folded):
            return
    equalized = run.step("cle", lambda: run.calibrated("cle", scheme, "cross-layer equalized, then calibrated"))
    if run.met(equalized):
        return
    stage = "cle" if equalized.metric >= folded.metric else folded.stage
    corrected = run.step("bias_correction", lambda: run.bias_corrected(stage, scheme))
    if corrected.metric is not None and run.met(corrected):
        return
    run.step("adaround", lambda: run.adarounded(stage, scheme))


class _Run:
    """State shared by the steps: the data, the stage models, the cache directory and the log."""

    def __init__(self, model: nn.Module, dummy_input: Any, data: Iterable[Any], eval_fn: Callable,
                 settings: AutoQuantSettings) -> None:
        self.model, self.dummy_input, self.data, self.eval_fn = model, dummy_input, data, eval_fn
        self.settings, self.config = settings, HardwareConfig.load(settings.sim.config)
        self.param_bw, self.output_bw = settings.sim.param_bw, settings.sim.output_bw
        self.num_batches, self.progress = settings.sim.num_batches, settings.progress
        self.steps: list[StepRecord] = []
        self.target = float("-inf")
        self._stages: dict[str, tuple[nn.Module, list[str], str]] = {}
        self._log: dict[str, Any] = {}
        self._current_stage = "original"

    # -- cache -------------------------------------------------------------------------------------------
    def open_log(self, results_dir: Path, settings: dict) -> None:
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
        key.update(_fingerprint(self.model, self.dummy_input, self.data, self.eval_fn))
        self.directory = results_dir / key.hexdigest()[:16]
        self.directory.mkdir(parents=True, exist_ok=True)
        log_path = self.directory / LOG_NAME
        if log_path.exists():
            self._log = json.loads(log_path.read_text())
        self._log.setdefault("settings", json.loads(json.dumps(settings, default=str)))
        self._log.setdefault("steps", {})

    def _save_log(self) -> None:
        (self.directory / LOG_NAME).write_text(json.dumps(self._log, indent=1))

    def step(self, name: str, compute: Callable[[], tuple], diagnostic: bool = False) -> StepRecord:
        """Run (or load from the cache) one step; ``compute`` returns (sim, description, layers, metric)."""
        cached = self._log["steps"].get(name)
        state_file = cached and cached["state_file"]
        if cached is not None and (state_file is None or (self.directory / state_file).exists()):
            record = StepRecord(**{**cached, "cached": True})
        else:
            start = time.perf_counter()
            sim, description, layers, metric = compute()
            record = StepRecord(name, description, metric, 0.0, layers, diagnostic=diagnostic)
            if sim is not None:
                record.state_file = f"{name.replace(':', '_')}.sim.pt"
                record.stage, record.scheme = self._current_stage, sim.quant_scheme.to_json()
                sim.save(self.directory / record.state_file)
            record.seconds = time.perf_counter() - start
            self._log["steps"][name] = {k: v for k, v in asdict(record).items() if k != "cached"}
            self._save_log()
        record.meets_target = record.metric is not None and not record.diagnostic and record.metric >= self.target
        self.steps.append(record)
        if self.progress:
            tqdm.write(f"autoquant: {name}: {_describe(record.metric)}{' (cached)' if record.cached else ''}")
        return record

    def met(self, record: StepRecord) -> bool:
        return record.metric is not None and record.metric >= self.target

    def best(self) -> StepRecord:
        """The best candidate so far; when it misses the target and mixed-precision candidates are given, the
        better of it and the mixed-precision step."""
        best = max((s for s in self.steps if not s.diagnostic and s.metric is not None), key=lambda s: s.metric)
        candidates = self.settings.mixed_precision_candidates
        if candidates and not self.met(best):
            mixed = self.step("mixed_precision", lambda: self.mixed_precision(best, candidates))
            best = max((best, mixed), key=lambda s: s.metric)
        return best

    # -- models and sims ---------------------------------------------------------------------------------
    def stage_model(self, stage: str) -> tuple[nn.Module, list[str], str]:
        """Float model of a stage (built once per run), the layers the stage changed, and what it did."""
        if stage not in self._stages:
            model = copy.deepcopy(self.model).eval()
            if stage == "original":
                self._stages[stage] = (model, [], "")
            elif stage == "bn_fold":
                layers = _fold_batch_norms(model, self.dummy_input)
                self._stages[stage] = (model, layers, f"{len(layers)} BatchNorms folded")
            elif stage == "cle":
                from edgequant.ptq.cross_layer_equalization import equalize

                report = equalize(model, self.dummy_input)
                layers = [f"{p.first} -> {p.second}" for p in report.equalized]
                layers += [f"skipped {p.first} -> {p.second}: {p.reason}" for p in report.not_equalized]
                self._stages[stage] = (model, layers, report.summary().splitlines()[0])
            else:
                raise ValueError(f"unknown stage {stage!r}")
        return self._stages[stage]

    def new_sim(self, stage: str, scheme: MethodSpec) -> QuantSim:
        self._current_stage = stage
        return QuantSim(self.stage_model(stage)[0], self.dummy_input, param_bw=self.param_bw,
                        output_bw=self.output_bw, quant_scheme=scheme, config=self.config)

    def evaluate(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float(self.eval_fn(model))

    def calibrated(self, stage: str, scheme: MethodSpec, what: str) -> tuple:
        sim = self.new_sim(stage, scheme)
        sim.calibrate(self.data, self.num_batches, progress=self.progress)
        _, layers, done = self.stage_model(stage)
        description = f"{done + '; ' if done else ''}{what} with the {sim.quant_scheme} scheme"
        return sim, description, layers, self.evaluate(sim.model)

    def bias_corrected(self, stage: str, scheme: MethodSpec) -> tuple:
        try:
            from edgequant.ptq.bias_correction import correct_bias
        except ImportError:
            return None, "bias correction is not available in this build", [], None
        sim, description, _, _ = self.calibrated(stage, scheme, "calibrated")
        report = correct_bias(sim, self.data, progress=self.progress)
        return sim, f"{description}; empirical bias correction", _layer_names(report), self.evaluate(sim.model)

    def adarounded(self, stage: str, scheme: MethodSpec) -> tuple:
        sim, description, _, _ = self.calibrated(stage, scheme, "calibrated")
        iterations = self.settings.adaround_iterations
        result = adaround(sim, self.data, num_iterations=iterations, num_batches=self.num_batches,
                          progress=self.progress, **(self.settings.adaround_kwargs or {}))
        sim.calibrate(self.data, self.num_batches, progress=False)  # activations see the rounded weights
        layers = [f"{r.name}: output MSE {r.nearest_mse:.4g} -> {r.adaround_mse:.4g}, {r.flipped_fraction:.1%} "
                  f"flipped" for r in result.layers]
        return sim, f"{description}; AdaRound ({iterations} iterations per layer)", layers, self.evaluate(sim.model)

    def mixed_precision(self, best: StepRecord, candidates: Sequence[Sequence[int]]) -> tuple:
        # from the plain calibration of the best step's stage: bias correction and AdaRound fit one bit width
        sim, description, _, _ = self.calibrated(best.stage, best.scheme, "calibrated")
        result = choose_mixed_precision(sim, self.data, self.eval_fn, candidates, self.settings.allowed_accuracy_drop,
                                        out_dir=self.directory / "mixed_precision", progress=self.progress)
        layers = [f"{group}: W{c[0]}A{c[1]}" for group, c in result.choice.items()]
        description = (f"{description}; mixed precision among {list(map(tuple, candidates))} "
                       f"(relative BitOps {result.relative_bitops:.3f})")
        return sim, description, layers, result.metric

    def restore(self, record: StepRecord) -> QuantSim:
        sim = self.new_sim(record.stage, record.scheme)
        sim.load(self.directory / record.state_file)
        return sim

    # -- diagnostics -------------------------------------------------------------------------------------
    def diagnose(self, calibrated: StepRecord) -> None:
        """W32/A-bits and W-bits/A32 evaluations: which side of the quantization loses the metric."""
        for name, kinds, what in (("w32", ("param",), f"weights in float, activations {self.output_bw}-bit"),
                                  ("a32", ("input", "output"), f"activations in float, weights {self.param_bw}-bit")):
            def compute(kinds: tuple = kinds, what: str = what) -> tuple:
                sim = self.restore(calibrated)
                sim.set_enabled(False, kinds=kinds)
                return None, f"diagnostic: {what} ({sim.quant_scheme} encodings)", [], self.evaluate(sim.model)
            self.step(name, compute, diagnostic=True)

    def sensitivity(self, sim: QuantSim, best: StepRecord, eval_fn: Callable) -> list[tuple[str, float]]:
        """Metric with one layer's quantizers disabled at a time, most helpful first (cached in the log)."""
        key = f"sensitivity:{best.name}"
        if key not in self._log:
            scores = {}
            layers = [
                n for n, m in sim.quantized_modules().items() if any(q.enabled for q in m.quantizers().values())
            ]
            for name in tqdm(layers, desc="autoquant: layer sensitivity", disable=not self.progress):
                quantizers = sim.model.get_submodule(name).quantizers().values()
                with sim.quantizers_enabled(False, quantizers), torch.no_grad():
                    scores[name] = float(eval_fn(sim.model))
            self._log[key] = sorted(scores.items(), key=lambda item: -item[1])
            self._save_log()
        return [(name, metric) for name, metric in self._log[key]]


def _fold_batch_norms(model: nn.Module, dummy_input: Any) -> list[str]:
    """Fold ``model``'s BatchNorms in place; the folds as ``"bn -> layer"``."""
    from edgequant.ptq.batch_norm_fold import fold_batch_norms

    names = {id(m): n for n, m in model.named_modules()}
    return [f"{names.get(id(bn), '?')} -> {names.get(id(layer), '?')}"
            for layer, bn in fold_batch_norms(model, dummy_input)]


def _recommend(result: AutoQuantResult, param_bw: int, output_bw: int) -> str:
    steps = {s.name: s.metric for s in result.steps}
    lines = [
        f"No configuration reached {result.target_metric:.4f}; best: {result.best_step} ({result.best_metric:.4f})."
    ]
    w32, a32 = steps.get("w32"), steps.get("a32")
    if w32 is not None and a32 is not None:
        if w32 >= result.target_metric and a32 < result.target_metric:
            remedies = ["a per-channel config (config='per_channel')"] if _per_tensor_weights(result.sim) else []
            remedies += [f"param_bw > {param_bw}"] if param_bw < MAX_BITWIDTH else []
            tried = f"try {' or '.join(remedies)}" if remedies else "the weights are per-channel and 16-bit already"
            lines.append(f"Weights are the problem (activations alone, W32A{output_bw}: {w32:.4f}): {tried}.")
        elif a32 >= result.target_metric and w32 < result.target_metric:
            remedies = [f"output_bw > {output_bw}"] if output_bw < MAX_BITWIDTH else []
            others = [name for name in ("percentile", "sqnr") if name != result.sim.quant_scheme.name]
            remedies.append(f"the {'/'.join(others)} scheme for the layers listed below")
            lines.append(f"Activations are the problem (weights alone, W{param_bw}A32: {a32:.4f}): try "
                         f"{' or '.join(remedies)}.")
        else:
            lines.append(f"Both weights (W32: {w32:.4f}) and activations (A32: {a32:.4f}) lose accuracy.")
    helpful = [(n, m) for n, m in result.sensitivity if m > result.best_metric][:3]
    modules = result.sim.quantized_modules()
    batch_norms = [n for n, _ in helpful if n in modules and modules[n].onnx_op_type == BATCH_NORM]
    if batch_norms:  # deployment folds a BatchNorm into its conv: it cannot be kept wider there
        lines.append(f"{', '.join(batch_norms)} {'is a BatchNorm' if len(batch_norms) == 1 else 'are BatchNorms'} "
                     "simulated unfolded, which deployment folds into the preceding layer: rerun with fold_bn=True "
                     "(the CLI's default) instead of keeping it in float.")
    helpful = [(n, m) for n, m in helpful if n not in batch_norms]
    if helpful:
        listed = ", ".join(f"{n} ({m - result.best_metric:+.4f})" for n, m in helpful)
        lines.append(f"Keep the most sensitive layers at a higher bitwidth (e.g. 16-bit): {listed}.")
    lines.append("Quantization-aware training (fine-tune the best sim's model, encodings saved at "
                 f"{result.sim_state_path}) usually recovers the rest.")
    return "\n".join(lines)


def _per_tensor_weights(sim: QuantSim) -> bool:
    """Whether an enabled quantizer of a weight matrix or kernel (not a bias) has a single scale: per-channel
    scales are then worth suggesting."""
    return any(
        q.enabled and q.encoding is not None and q.encoding.scale.numel() == 1
        and getattr(sim.layer_of(q), q.key).dim() > 1
        for q in sim.quantizers(role="param").values()
    )


def _describe(metric: float | None) -> str:
    return "skipped" if metric is None else f"{metric:.4f}"


def _layer_names(report: Any) -> list[str]:
    """Layer names from another technique's report, whatever its shape (list, dict or object with layers)."""
    if report is None:
        return []
    if isinstance(report, dict):
        return [str(k) for k in report]
    if isinstance(report, (list, tuple)):
        return [str(getattr(item, "name", item)) for item in report]
    for attribute in ("layers", "corrected"):
        if hasattr(report, attribute):
            return _layer_names(getattr(report, attribute))
    return [str(report)]


def _fingerprint(model: nn.Module, dummy_input: Any, data: Iterable[Any], eval_fn: Callable) -> bytes:
    """Hash of the weights, the first calibration batch and the eval function's name (for the cache key)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    first = next(iter(data), None)
    for value in (dummy_input, first):
        if isinstance(value, dict):
            value = list(value.values())
        tensors = value if isinstance(value, (tuple, list)) else [value]
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(getattr(eval_fn, "__qualname__", repr(type(eval_fn))).encode())
    return digest.digest()
