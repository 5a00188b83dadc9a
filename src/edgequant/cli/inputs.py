"""Turn what users type on the command line into a model, calibration batches and an evaluation function.

Specs understood:

* objects: ``package.module:attr`` or ``path/to/file.py:attr`` (``attr`` may be dotted);
* models: such an object (an ``nn.Module``, or a class/factory called without arguments), an ONNX file (``.onnx``,
  converted with onnx2torch; export then writes into its own graph), a saved ``torch.export`` program (``.pt2``)
  or a TorchScript file (``.pt``/``.ts``/``.jit``, converted with torch's
  TorchScript-to-export converter because hooks and graph capture cannot see inside ScriptModules);
* calibration data: a folder of images, a ``.pt``/``.pth`` or ``.npy`` tensor file (split into batches
  along dim 0), or an object whose call returns an iterable of batches.

What runs code: an object spec imports the named module and calls the factory (that is its purpose: pass only
code you trust). A ``.pt2`` program is read with torch's restricted unpickler only (torch's own loader falls back
to unrestricted unpickling for the example inputs it stores; here that fallback is refused). A TorchScript file is
a program that torch's TorchScript interpreter runs: load only models you trust. Tensor files are read with
``weights_only=True`` and ``.npy`` files without pickle.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import pickle
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgequant.onnx import load_onnx
from edgequant.sim.batches import split_model_input
from edgequant.sim.state_file import load_without_code

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")
TENSOR_SUFFIXES = (".pt", ".pth", ".npy")
EXPORTED_PROGRAM_SUFFIXES = (".pt2",)
ONNX_SUFFIX = ".onnx"
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".torchscript")
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def _import_module(module_spec: str) -> Any:
    if module_spec.endswith(".py"):
        path = Path(module_spec)
        if not path.is_file():
            raise FileNotFoundError(f"Python file {module_spec!r} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if "" not in sys.path and str(Path.cwd()) not in sys.path:  # like `python -m`: local modules importable
        sys.path.insert(0, str(Path.cwd()))
    return importlib.import_module(module_spec)


def load_object(spec: str, what: str) -> Any:
    """Resolve ``module:attr`` / ``file.py:attr``; ``what`` names the role in error messages."""
    module_spec, sep, attr_path = spec.rpartition(":")
    if not sep or not module_spec or not attr_path:
        raise ValueError(f"{what} {spec!r} is not of the form 'package.module:name' or 'path/file.py:name'")
    try:
        obj = _import_module(module_spec)
    except ModuleNotFoundError as error:
        raise ValueError(f"{what} {spec!r}: cannot import {error.name!r} (is it installed / on PYTHONPATH?)") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: {module_spec!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def is_object_spec(spec: str) -> bool:
    """``x.y:z`` is an object spec unless it names an existing file (Windows drive letters included)."""
    return ":" in spec and not Path(spec).exists()


def load_model(spec: str, example_inputs: Callable[[], tuple]) -> nn.Module:
    """Model in eval mode from a spec; ``example_inputs`` is only called for TorchScript conversion."""
    if is_object_spec(spec):
        obj = load_object(spec, "model")
        try:
            model = obj if isinstance(obj, nn.Module) else obj() if callable(obj) else obj
        except Exception as error:  # the user's factory: say that it is the factory that failed
            raise ValueError(f"model factory {spec!r} raised {type(error).__name__}: {one_line_of(error)}") from None
        if not isinstance(model, nn.Module):
            raise ValueError(f"model {spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
        return model.eval()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"model {spec!r} is neither an existing file (.pt2 / TorchScript) nor a 'package.module:factory' spec"
        )
    if path.suffix in EXPORTED_PROGRAM_SUFFIXES:
        return _load_exported_program(path)
    if path.suffix == ONNX_SUFFIX:
        return load_onnx(path).eval()
    if path.suffix in TORCHSCRIPT_SUFFIXES:
        _refuse_state_dict(path)
        return _load_torchscript(path, example_inputs)
    raise ValueError(
        f"model file {spec!r}: unknown suffix {path.suffix!r}; expected .onnx, .pt2 (torch.export.save) or "
        f"TorchScript ({', '.join(TORCHSCRIPT_SUFFIXES)})"
    )


def _load_exported_program(path: Path) -> nn.Module:
    """``torch.export.load`` with every ``torch.load`` inside it restricted to tensors and plain values."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"  # torch reads it at each load: covers the loader's unrestricted fallback
    try:
        program = torch.export.load(path)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"model file {path} is refused: it holds Python objects that loading would have to execute "
            f"({one_line_of(error)[:120]}); save the program again with torch.export.save from a trusted source"
        ) from None
    finally:
        if previous is None:
            del os.environ[FORCE_WEIGHTS_ONLY]
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous
    return program.module()


def _refuse_state_dict(path: Path) -> None:
    """A saved ``state_dict`` (weights without the architecture) is the commonest wrong ``--model`` file."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a plain tensor file (TorchScript archives fail here): let the TorchScript loader judge
        return
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(
            f"model file {path} holds a state_dict ({len(data)} tensors), i.e. weights without the architecture; "
            "pass --model package.module:factory where the factory builds the model and loads these weights"
        )
    raise ValueError(f"model file {path} holds a {type(data).__name__}, not a TorchScript or torch.export model")


def _load_torchscript(path: Path, example_inputs: Callable[[], tuple]) -> nn.Module:
    from torch._export.converter import TS2EPConverter

    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as error:
        raise ValueError(f"model file {path}: not a TorchScript archive ({one_line_of(error)})") from None
    try:
        program = TS2EPConverter(scripted, example_inputs()).convert()
    except Exception as error:  # the converter raises many types; all mean "re-save the model differently"
        raise ValueError(
            f"model file {path}: TorchScript could not be converted to a torch.export program "
            f"({type(error).__name__}: {one_line_of(error)}); save it with torch.export.save or give "
            "'package.module:factory'"
        ) from None
    return program.module()


def forward_failure(model: nn.Module, example: Any) -> Exception | None:
    """What one forward of ``model`` on ``example`` raises (None: it runs), for messages naming the user's options
    instead of the library's ``dummy_input``."""
    args, kwargs = split_model_input(example)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as error:  # the user's model raises whatever it raises
        return error
    return None


def one_line_of(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def parse_shape(text: str) -> tuple[int, ...]:
    """``1,3,224,224`` (or ``1x3x224x224``) -> (1, 3, 224, 224)."""
    try:
        shape = tuple(int(part) for part in re.split(r"[,x]", text.strip()))
    except ValueError:
        raise ValueError(f"--input-shape {text!r}: expected comma-separated integers such as 1,3,224,224") from None
    if not shape or any(size <= 0 for size in shape):
        raise ValueError(f"--input-shape {text!r}: every size must be a positive integer")
    return shape


class ImageFolderBatches:
    """Batches of images from a folder, decoded and resized lazily (memory stays one batch).

    Pixels become float32 in [0, 1] (divided by their type's maximum: 255 for 8-bit images, 65535 for 16-bit
    PNGs), then ``(x - mean) / std`` per channel, resized to ``(height, width)``.
    """

    def __init__(
        self, folder: Path, channels: int, size: tuple[int, int], batch_size: int,
        mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,),
    ) -> None:
        if channels not in (1, 3, 4):
            raise ValueError(f"image folder {folder}: the model input has {channels} channels; images need 1, 3 or 4")
        self.files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"image folder {folder} contains no images ({', '.join(IMAGE_SUFFIXES)})")
        self.channels, self.size, self.batch_size = channels, size, batch_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return -(-len(self.files) // self.batch_size)

    def _read(self, path: Path) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_image
        from torchvision.transforms.v2.functional import resize

        mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB, 4: ImageReadMode.RGB_ALPHA}[self.channels]
        try:
            image = decode_image(str(path), mode=mode)
        except RuntimeError as error:
            raise ValueError(f"cannot decode image {path}: {one_line_of(error)}") from None
        scaled = image.float() / torch.iinfo(image.dtype).max  # 8-bit: 255, 16-bit PNG: 65535
        image = resize(scaled, list(self.size), antialias=True)
        return (image - self.mean) / self.std

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.files), self.batch_size):
            yield torch.stack([self._read(p) for p in self.files[start : start + self.batch_size]])


def _tensor_from_file(path: Path) -> torch.Tensor:
    if path.suffix == ".npy":
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (ValueError, OSError) as error:
            raise ValueError(f"--data {path}: not a numeric .npy array ({one_line_of(error)})") from None
    data = load_without_code(path, "calibration tensor file", "save one tensor of inputs with torch.save")
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
        _refuse_labels_first(path, data)
        data = data[0]  # (inputs, labels)
    if not isinstance(data, torch.Tensor):
        raise ValueError(
            f"--data {path} holds a {type(data).__name__}; save one tensor of inputs (N, ...) "
            "or an (inputs, labels) tuple"
        )
    return data


def _refuse_labels_first(path: Path, items: tuple | list) -> None:
    """The first item of a saved tuple is what the model receives; a 1-D first item next to a many-dimensional
    one is the labels of an ``(labels, inputs)`` tuple, saved the wrong way round."""
    first = items[0]
    wider = next((item for item in items[1:] if isinstance(item, torch.Tensor) and item.dim() > 1), None)
    if first.dim() == 1 and wider is not None:
        raise ValueError(
            f"--data {path} holds a tuple whose first item (shape {tuple(first.shape)}, {dtype_name(first)}) looks "
            f"like labels and a later one (shape {tuple(wider.shape)}) like inputs; the first item is what the model "
            "receives: save (inputs, labels)"
        )


def dtype_name(value: torch.Tensor | torch.dtype) -> str:
    """``float32`` for ``torch.float32`` or a tensor of it, as users write it."""
    return str(value.dtype if isinstance(value, torch.Tensor) else value).removeprefix("torch.")


def load_batches(
    spec: str, batch_size: int, input_shape: tuple[int, ...] | None,
    mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,),
) -> Iterable[Any]:
    """Calibration batches from a folder of images, a tensor file, or a ``module:function`` spec."""
    path = Path(spec)
    if path.is_dir():
        if input_shape is not None and len(input_shape) < 3:
            raise ValueError(f"--input-shape {input_shape} has no (channels, height, width) for images")
        if input_shape is None:
            channels, size = 3, _first_image_size(path)
        else:
            channels, size = input_shape[-3], (input_shape[-2], input_shape[-1])
        return ImageFolderBatches(path, channels, size, batch_size, mean, std)
    if path.is_file():
        if path.suffix not in TENSOR_SUFFIXES:
            raise ValueError(f"--data {spec}: expected {', '.join(TENSOR_SUFFIXES)} or a folder of images")
        data = _tensor_from_file(path)
        if data.dim() == 0 or len(data) == 0:
            raise ValueError(f"--data {spec} holds no samples (shape {tuple(data.shape)})")
        return list(data.split(batch_size))
    if is_object_spec(spec):
        source = load_object(spec, "--data")
        batches = source() if callable(source) else source
        if not isinstance(batches, Iterable):
            raise ValueError(f"--data {spec!r} gave a {type(batches).__name__}, not an iterable of batches")
        return batches
    raise FileNotFoundError(f"--data {spec!r} is not a folder, a file or a 'module:function' spec")


def _first_image_size(folder: Path) -> tuple[int, int]:
    from torchvision.io import read_image

    first = next((p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES), None)
    if first is None:
        raise ValueError(f"image folder {folder} contains no images ({', '.join(IMAGE_SUFFIXES)})")
    return tuple(read_image(str(first)).shape[-2:])


def peek(batches: Iterable[Any]) -> tuple[Any, Iterable[Any]]:
    """(first batch, batches) where a one-shot iterator is re-chained so that no batch is lost."""
    iterator = iter(batches)
    first = next(iterator, _NO_BATCH)
    if first is _NO_BATCH:
        raise ValueError("--data yielded no batch; pass at least one batch")
    if iterator is batches:
        return first, itertools.chain([first], iterator)
    return first, batches


_NO_BATCH = object()


def dummy_from_batch(batch: Any) -> Any:
    """The model inputs of a calibration batch: a tensor, a dict of kwargs, or the leading items of a tuple."""
    if isinstance(batch, (tuple, list)):
        return batch[0]  # (inputs, labels): labels are not model inputs
    return batch
