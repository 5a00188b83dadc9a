"""The one set of data options every command that reads data takes, and the input spec that ``quantize``
records so that ``export``, ``verify``, ``autoquant`` (and later commands) preprocess exactly the same way."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import torch

from edgequant.cli.inputs import dtype_name, dummy_from_batch, is_object_spec, load_batches, parse_shape, peek

SPEC_FILE = "input_spec.json"


@dataclass
class InputSpec:
    """How the model's input is made from the user's data (recorded in ``input_spec.json``)."""

    shape: list[int] | None = None
    dtype: str = "float32"
    layout: str = "NCHW"
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    batch_size: int = 32
    fold_bn: bool = True

    def save(self, folder: Path) -> Path:
        path = folder / SPEC_FILE
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def beside(cls, sim_state: Path | None) -> InputSpec | None:
        """The spec recorded next to a ``sim_state.pt`` (None for a state written without one)."""
        path = sim_state.parent / SPEC_FILE if sim_state is not None else None
        if path is None or not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path} is not an input spec written by 'edgequant quantize' ({error})") from None


def data_options(command: Callable) -> Callable:
    """--data, --input-shape, --batch-size, --num-batches, --mean, --std (defaults: the recorded spec)."""
    options = [
        click.option("--data", "-d", "data_spec", metavar="SPEC",
                     help="Data: a folder of images, a .pt/.npy tensor file, or 'module:function' returning an "
                          "iterable of batches."),
        click.option("--input-shape", metavar="N,C,H,W",
                     help="Model input shape: images are resized to H,W; tensor data must have it. Default: the "
                          "recorded spec, else the first batch; required for image folders."),
        click.option("--batch-size", type=click.IntRange(min=1),
                     help="Batch size for tensor files and image folders [default: recorded, else 32]."),
        click.option("--num-batches", type=click.IntRange(min=1), help="Use at most this many batches."),
        click.option("--mean", metavar="M[,M...]",
                     help="Per-channel mean subtracted from images scaled to [0, 1] (image folders only) "
                          "[default: recorded, else 0]."),
        click.option("--std", metavar="S[,S...]",
                     help="Per-channel std dividing images scaled to [0, 1] (image folders only) "
                          "[default: recorded, else 1]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _floats(text: str, option: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected comma-separated numbers such as 0.485,0.456,0.406") from None
    if option == "--std" and any(v == 0 for v in values):
        raise ValueError(f"--std {text!r}: a standard deviation of 0 divides by zero; use the data's std (e.g. 0.229)")
    return values


@dataclass
class Data:
    """Batches ready for the model, one example input, and the spec they were made with."""

    batches: Iterable[Any]
    dummy_input: Any
    spec: InputSpec
    num_batches: int | None


def resolve_data(
    data_spec: str | None, input_shape: str | None, batch_size: int | None, num_batches: int | None,
    mean: str | None, std: str | None, recorded: InputSpec | None = None,
) -> Data:
    """Load the data the options describe; options not given fall back to ``recorded`` (the quantize run's).

    Every option given either takes effect or is refused: an image folder takes them all; a tensor file is used as
    saved (``--input-shape`` must match its samples, ``--mean``/``--std`` are refused); a ``module:function``'s
    batches are used as it yields them (``--input-shape`` must match, ``--batch-size``, ``--mean`` and ``--std``
    are refused). What ``input_spec.json`` records is thus what was done.
    """
    if data_spec is None:
        raise click.UsageError("--data is required: a folder of images, a .pt/.npy tensor file or 'module:function'")
    images = Path(data_spec).is_dir()
    _refuse_options_that_do_not_apply(data_spec, images, batch_size=batch_size, mean=mean, std=std)
    base = recorded or InputSpec()
    shape = parse_shape(input_shape) if input_shape else (tuple(base.shape) if base.shape else None)
    spec = InputSpec(shape=list(shape) if shape else None, batch_size=batch_size or base.batch_size,
                     fold_bn=base.fold_bn)
    if images:  # the only source normalised here (other sources keep the identity mean and std)
        spec.mean = _floats(mean, "--mean") if mean else base.mean
        spec.std = _floats(std, "--std") if std else base.std
        if shape is None:
            raise ValueError(
                f"--data {data_spec}: images are resized to the model's input size; pass --input-shape N,C,H,W "
                "(e.g. 1,3,224,224)"
            )
        for name, values in (("--mean", spec.mean), ("--std", spec.std)):
            if len(values) not in (1, shape[-3]):
                raise ValueError(
                    f"{name} has {len(values)} values but the input has {shape[-3]} channels; give 1 or {shape[-3]}"
                )
    batches = load_batches(data_spec, spec.batch_size, shape, tuple(spec.mean), tuple(spec.std))
    first, batches = peek(batches)
    example = dummy_from_batch(first)
    if isinstance(example, torch.Tensor):
        if not torch.isfinite(example).all():
            raise ValueError(f"--data {data_spec}: the first batch contains NaN or inf values; clean the data")
        spec.dtype = dtype_name(example)
        if spec.shape is None:
            spec.shape = [1, *example.shape[1:]]
        elif not images and list(example.shape[1:]) != spec.shape[1:]:
            given, fix = ((f"--input-shape {input_shape}", "pass data of that shape, or leave --input-shape out")
                          if input_shape else (f"the input shape recorded in {SPEC_FILE}",
                                               "pass data of the shape the model was quantized at"))
            raise ValueError(
                f"--data {data_spec} holds samples of shape {tuple(example.shape[1:])} but {given} says "
                f"{tuple(spec.shape[1:])}; only image folders are resized: {fix}"
            )
    elif input_shape and not images:
        raise ValueError(f"--input-shape describes one tensor input, but --data {data_spec} yields "
                         f"{type(example).__name__} batches; leave --input-shape out")
    dummy = torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype)) if spec.shape else example
    return Data(batches, dummy, spec, num_batches)


def _refuse_options_that_do_not_apply(data_spec: str, images: bool, **given: str | int | None) -> None:
    """One line for the data options this kind of source cannot take, instead of recording and ignoring them."""
    tensor_file = Path(data_spec).is_file()
    if images or not (tensor_file or is_object_spec(data_spec)):  # a spec that names nothing fails on loading
        return
    applicable = {"batch_size"} if tensor_file else set()
    refused = [f"--{name.replace('_', '-')}" for name, value in given.items()
               if value is not None and name not in applicable]
    if not refused:
        return
    why = ("a tensor file is used as saved (save the tensors preprocessed)" if tensor_file
           else "its batches are used as the function yields them (batch and preprocess them there)")
    named = refused[0] if len(refused) == 1 else f"{', '.join(refused[:-1])} and {refused[-1]}"
    raise ValueError(f"{named} {'does' if len(refused) == 1 else 'do'} not apply to --data {data_spec}: {why}; "
                     f"leave {'it' if len(refused) == 1 else 'them'} out")


def device_option(command: Callable) -> Callable:
    return click.option("--device", default="auto", show_default=True,
                        help="'cpu', 'cuda', 'cuda:1'... ('auto': a GPU when there is one).")(command)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> a GPU when available; a CUDA device without a GPU is one clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device name such as cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                         "use --device cpu, or install a CUDA build of torch")
    return device


def quiet_option(command: Callable) -> Callable:
    return click.option("--quiet", is_flag=True, help="No progress bars.")(command)


demo_model_option = click.option(
    "--model", "-m", "model_spec", metavar="SPEC",
    help="'package.module:factory', 'file.py:factory', an ONNX file (exported into its own graph), a .pt2 or a "
         "TorchScript file; default: the bundled digits CNN with its test-set accuracy as metric. A factory spec "
         "imports and runs that Python code and a TorchScript file is a program: give only models you trust (.onnx "
         "and .pt2 files are read without running code).")


def bitwidth_options(command: Callable) -> Callable:
    """--param-bw, --output-bw and --config, as every quantizing command takes them."""
    from edgequant.config import HardwareConfig

    options = [
        click.option("--param-bw", type=click.IntRange(2, 16), default=8, show_default=True,
                     help="Bit width of weights and other parameters."),
        click.option("--output-bw", type=click.IntRange(2, 16), default=8, show_default=True,
                     help="Bit width of activations (layer outputs and model inputs)."),
        click.option("--config", default="default", show_default=True,
                     help=f"Hardware config: a preset ({', '.join(HardwareConfig.preset_names())}) or a "
                          "quantsim-config JSON file."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


fold_bn_option = click.option(
    "--fold-bn/--no-fold-bn", default=True, show_default=True,
    help="Fold BatchNorm into the preceding Conv/Linear first, as deployment toolchains do.")
