"""The job every quantizing command runs (quantize, demo, qat, analyze, autoquant), built in one place from the
options they share: the user's model, data and metric (or the bundled digits demo without them), the device, and
the quantization settings. `pass_job_options` also adds ``--weight-granularity`` to each of them: that option and its
parsing live here, beside the settings it fills."""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import click
import torch
from torch import nn

from edgequant.cli.data import InputSpec, resolve_data, resolve_device
from edgequant.cli.errors import one_line
from edgequant.cli.inputs import dtype_name, forward_failure, load_model, load_object, one_line_of
from edgequant.ptq import fold_batch_norms
from edgequant.quantization.granularity import Granularity, Lpbq, PerBlock, PerChannel, PerTensor
from edgequant.sim import QuantSim
from edgequant.sim.batches import move_to

DEMO_MODEL = "digits_cnn"

WEIGHT_GRANULARITY_OPTION = "--weight-granularity"
GRANULARITY_SPELLINGS = "per-tensor, per-channel, per-block:B or lpbq:B[:DECOMPRESSED_BW]"
BLOCKED_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""The layers ``--weight-granularity`` changes (their weights have output and input channels)."""


@dataclass(frozen=True)
class JobOptions:
    """The model, data, metric and device options as typed (None: not given)."""

    model_spec: str | None = None
    data_spec: str | None = None
    eval_spec: str | None = None
    input_shape: str | None = None
    batch_size: int | None = None
    num_batches: int | None = None
    mean: str | None = None
    std: str | None = None
    device: str = "auto"


@dataclass(frozen=True)
class SimSettings:
    """The quantization choices: bit widths, calibration scheme (autoquant compares several instead), config and
    the weight granularities."""

    param_bw: int = 8
    output_bw: int = 8
    scheme: str = "minmax"
    config: str = "default"
    weight_granularity: tuple[str, ...] = ()
    """``--weight-granularity`` values as typed (``[LAYERS=]GRANULARITY``), applied in order after the config."""

    @property
    def label(self) -> str:
        return f"W{self.param_bw}A{self.output_bw}"

    def quantsim_kwargs(self) -> dict[str, Any]:
        """The keywords `QuantSim` (and `QuantAnalyzer`) take for these settings; weight granularities have none,
        so a command building its sims from these keywords refuses them."""
        if self.weight_granularity:
            raise click.UsageError(
                f"{WEIGHT_GRANULARITY_OPTION} {' '.join(self.weight_granularity)} (typed, or recorded by the run "
                "--from names) is not taken here: this command builds its sims from --param-bw, --output-bw, "
                "--scheme and --config only; quantize, demo and qat take it")
        return {"param_bw": self.param_bw, "output_bw": self.output_bw, "quant_scheme": self.scheme,
                "config": self.config}

    def sim(self, model: nn.Module, dummy_input: Any) -> QuantSim:
        """The sim of these settings, its Conv/Linear weights at the granularities asked for."""
        sim = QuantSim(model, dummy_input, param_bw=self.param_bw, output_bw=self.output_bw,
                       quant_scheme=self.scheme, config=self.config)
        for text in self.weight_granularity:
            layers, granularity = parse_weight_granularity(text)
            try:
                sim.set_granularity(layers, granularity, BLOCKED_WEIGHT_LAYERS)
            except (KeyError, ValueError) as error:  # no such layer, a block that does not divide, LPBQ widths
                message = error.args[0] if isinstance(error, KeyError) else one_line(error)
                raise click.BadParameter(f"{text!r}: {message}", param_hint=f"'{WEIGHT_GRANULARITY_OPTION}'") from None
        return sim


def parse_weight_granularity(text: str) -> tuple[str, Granularity]:
    """``[LAYERS=]GRANULARITY`` as (layer-name glob, granularity): ``per-block:64`` for every Conv/Linear layer,
    ``'fc*=lpbq:64:8'`` for those matching ``fc*``. A malformed value is a `click.BadParameter` naming the option."""
    layers, _, spelled = text.rpartition("=")
    kind, *numbers = spelled.strip().split(":")
    try:
        sizes = [int(number) for number in numbers]
        granularity = _GRANULARITY_PARSERS[kind](*sizes)
    except (KeyError, TypeError, ValueError):
        raise click.BadParameter(f"{text!r} is not a granularity; use {GRANULARITY_SPELLINGS}, optionally after "
                                 "LAYERS= (a layer-name glob)", param_hint=f"'{WEIGHT_GRANULARITY_OPTION}'") from None
    return layers.strip() or "*", granularity


_GRANULARITY_PARSERS: dict[str, Callable[..., Granularity]] = {
    "per-tensor": lambda: PerTensor(),
    "per-channel": lambda: PerChannel(),  # the layer's output channels
    "per-block": lambda block_size: PerBlock(block_size),
    "lpbq": lambda block_size, decompressed_bw=8: Lpbq(block_size, decompressed_bw=decompressed_bw),
}
"""Each spelling's granularity from the integers after it (a wrong count is a TypeError)."""


def _checked_granularities(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    for text in values:
        parse_weight_granularity(text)
    return values


weight_granularity_option = click.option(
    WEIGHT_GRANULARITY_OPTION, "weight_granularity", metavar="[LAYERS=]GRANULARITY", multiple=True,
    callback=_checked_granularities,
    help=f"Weight granularity of the Conv/Linear layers: {GRANULARITY_SPELLINGS} (LPBQ's channel grid defaults to "
         "8 bits); after LAYERS= only the layers matching that name glob. Repeatable, applied in order after "
         "--config. Recorded in the sim state, so export and verify reuse it.")


@dataclass
class Job:
    """Everything a command runs on, however the user described it."""

    model: nn.Module
    model_name: str
    data_name: str
    batches: Iterable[Any]
    dummy_input: Any
    evaluate: Callable[[nn.Module], float] | None
    metric_name: str
    spec: InputSpec
    settings: SimSettings = field(default_factory=SimSettings)
    num_batches: int | None = None
    load_s: float = 0.0

    def float_model(self, fold_bn: bool) -> nn.Module:
        """The float model to simulate, recorded in ``spec``: with ``fold_bn`` a copy with each BatchNorm folded into
        its Conv/Linear, as deployment does (a sim of the unfolded model quantizes BN weights and the tensor between
        a conv and its BN, which the target never computes, and ranks BNs the export removes)."""
        self.spec.fold_bn = fold_bn
        if not fold_bn:
            return self.model
        model = copy.deepcopy(self.model)
        folded = fold_batch_norms(model, self.dummy_input)
        click.echo(f"folded {len(folded)} BatchNorm layers (--no-fold-bn keeps them)")
        return model


def pass_job_options(command: Callable) -> Callable:
    """Hand ``command`` the shared options it has flags for as ``(options: JobOptions, settings: SimSettings,
    **its_own_options)``, instead of one parameter per flag; adds `weight_granularity_option`."""

    @functools.wraps(command)
    def gathered(**params: Any) -> Any:
        options, settings = (type_(**{f.name: params.pop(f.name) for f in fields(type_) if f.name in params})
                             for type_ in (JobOptions, SimSettings))
        return command(options, settings, **params)

    return weight_granularity_option(gathered)


def build_job(
    options: JobOptions, settings: SimSettings, *, demo_batch_size: int, eval_required: bool = False,
    single_pass: bool = False,
) -> Job:
    """The user's model, data and metric, or the bundled digits demo when none is given, on ``options.device``.

    ``eval_required``: ``--model`` needs ``--eval`` too. ``single_pass``: the command reads the batches once
    (calibration only), so they stream; otherwise they are listed, for every step or epoch to read them again.
    """
    started = time.perf_counter()
    device = resolve_device(options.device)
    if options.model_spec is None:
        if options.data_spec or options.eval_spec:
            raise click.UsageError("--data and --eval need --model (without them, the bundled digits demo runs)")
        job = _demo_job(options.batch_size or demo_batch_size)
    else:
        if options.data_spec is None or (eval_required and options.eval_spec is None):
            raise click.UsageError("--model needs --data" + (" and --eval" if eval_required else ""))
        job = _user_job(options, single_pass)
    return replace(job, model=job.model.to(device), dummy_input=move_to(job.dummy_input, device), settings=settings,
                   num_batches=options.num_batches, load_s=time.perf_counter() - started)


def _demo_job(batch_size: int) -> Job:
    from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors, load_pretrained

    train_images, _ = load_digits_tensors("train")
    test_images, test_labels = load_digits_tensors("test")
    return Job(
        model=load_pretrained(DEMO_MODEL), model_name=f"edgequant.demo.digits:load_pretrained (bundled {DEMO_MODEL})",
        data_name="sklearn digits, train split", batches=list(train_images.split(batch_size)),
        dummy_input=train_images[:1], evaluate=lambda model: evaluate_accuracy(model, test_images, test_labels),
        metric_name="accuracy", spec=InputSpec(shape=[1, 1, 8, 8], batch_size=batch_size),
    )


def _user_job(options: JobOptions, single_pass: bool) -> Job:
    data = resolve_data(options.data_spec, options.input_shape, options.batch_size, options.num_batches,
                        options.mean, options.std)
    dummy = data.dummy_input
    model = load_model(options.model_spec, lambda: dummy if isinstance(dummy, tuple) else (dummy,))
    _check_model_runs(model, dummy, options)
    return Job(
        model=model, model_name=options.model_spec, data_name=options.data_spec,
        batches=data.batches if single_pass else list(data.batches), dummy_input=dummy,
        evaluate=_evaluation(options.eval_spec) if options.eval_spec else None, metric_name="metric", spec=data.spec,
    )


def _check_model_runs(model: nn.Module, dummy_input: Any, options: JobOptions) -> None:
    """One forward on an input made like the data before anything else, so that a failure names ``--data`` (and
    ``--input-shape``) rather than ``dummy_input``, an API term the command-line user never typed."""
    error = forward_failure(model, dummy_input)
    if error is None:
        return
    described = (f"shape {list(dummy_input.shape)}, {dtype_name(dummy_input)}"
                 if isinstance(dummy_input, torch.Tensor) else type(dummy_input).__name__)
    shape = f" at --input-shape {options.input_shape}" if options.input_shape else ""
    raise ValueError(
        f"--model {options.model_spec} does not run on the samples of --data {options.data_spec}{shape} "
        f"({described}): {type(error).__name__}: {one_line_of(error)}; {_input_hint(model, dummy_input)}"
    ) from error


def _input_hint(model: nn.Module, example: Any) -> str:
    """What to change in the data, judged from the example input and the model's weights."""
    weights = dtype_name(next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32))
    if isinstance(example, torch.Tensor):
        if not example.is_floating_point():
            return (f"the samples are {dtype_name(example)}: save them as {weights}, scaled and normalised as in "
                    "training (8-bit images: x.float() / 255 first)")
        if dtype_name(example) != weights:
            return f"the samples are {dtype_name(example)}, the model's weights {weights}: save x.to(torch.{weights})"
        if example.dim() == 4 and example.shape[-1] in (1, 3, 4) and example.shape[1] not in (1, 3, 4):
            return "the samples look channels-last (N, H, W, C): save x.permute(0, 3, 1, 2) (N, C, H, W)"
    return "save the inputs the model takes, as in training ((N, C, H, W) float32 for images)"


def _evaluation(spec: str) -> Callable[[nn.Module], float]:
    """The user's metric, its failures and non-numbers reported as ``--eval``'s (not as edgequant's)."""
    function = load_object(spec, "--eval")
    if not callable(function):
        raise click.UsageError(f"--eval {spec!r} is a {type(function).__name__}, not callable")

    @functools.wraps(function)  # its name keys AutoQuant's cache
    def evaluate(model: nn.Module) -> float:
        try:
            value = function(model)
        except Exception as error:
            raise ValueError(f"--eval {spec} raised {type(error).__name__}: {one_line_of(error)}; it is called as "
                             "function(model) -> float on the float model and on the sim (--debug shows where "
                             "it failed)") from error
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"--eval {spec} returned {type(value).__name__}; it must return a number") from None
        if not math.isfinite(number):
            raise ValueError(f"--eval {spec} returned {number}; check it on the float model first")
        return number

    return evaluate
