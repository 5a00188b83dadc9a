"""Loading a Hugging Face causal language model from disk, for simulation on fixed-point hardware.

`load_causal_lm` takes a transformers model folder or a GGUF file (llama.cpp's format, which transformers reads and
dequantizes with the ``gguf`` package) and returns a float model in eval mode with its tokenizer. It never reaches
the network, and anything it cannot load fails with one line naming the path and what to do, because the caller is
usually the command line.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GGUF_MAGIC = b"GGUF"
_INSTALL_HINT = "pip install edgequant[llm]"
_GGUF_ADVICE = (
    "convert it to a transformers folder (config.json + weights + tokenizer), or to a GGUF with "
    "F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/K-quant tensors of an architecture transformers reads (llama, mistral, "
    "qwen2, qwen3, phi3, gemma2, ...)"
)


class ModelLoadError(ValueError):
    """A model path that exists but cannot be loaded; the one-line message names it and what to do."""


class ModelNotFoundError(FileNotFoundError):
    """A model path that does not exist."""


def load_causal_lm(
    path: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The causal LM and its tokenizer stored at ``path``: a transformers folder, a ``.gguf`` file, or a folder
    holding exactly one ``.gguf`` file (and no config.json).

    The model comes back in eval mode, in ``dtype``, with every weight dequantized to a plain ``nn.Linear`` /
    ``nn.Embedding`` (the sim quantizes it itself) and eager attention by default, so that its attention is made
    of ops the sim sees. Only local files are read (``local_files_only``).
    """
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(
            f"{path}: no such file or folder (expected a transformers model folder or a .gguf file)"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        gguf_files = sorted(path.glob("*.gguf"))
        if not gguf_files:
            raise ModelLoadError(
                f"{path}: neither a transformers model folder (no config.json) nor a folder with a .gguf file"
            )
        if len(gguf_files) > 1:
            names = ", ".join(file.name for file in gguf_files)
            raise ModelLoadError(f"{path} holds several .gguf files ({names}): pass the path of the one to load")
        path = gguf_files[0]
    _require("transformers", "accelerate")
    if path.is_dir():
        return _load_folder(path, dtype, attn_implementation)
    return _load_gguf(path, dtype, attn_implementation)


def _require(*packages: str) -> None:
    missing = []
    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"loading a language model needs {' and '.join(missing)}: {_INSTALL_HINT}")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _load_folder(
    folder: Path, dtype: torch.dtype, attn_implementation: str
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"{folder}: transformers cannot load this model: {_first_line(error)}") from error
    _check_complete(folder, info)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(
            f"{folder}: no usable tokenizer in the folder ({_first_line(error)}); "
            "save the model's tokenizer there with tokenizer.save_pretrained(folder)"
        ) from error
    return model.eval(), tokenizer


def _load_gguf(file: Path, dtype: torch.dtype, attn_implementation: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    with file.open("rb") as stream:
        magic = stream.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{file}: not a GGUF file (it does not start with b'GGUF'); {_GGUF_ADVICE}")
    _require("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers import GgufConfig
    except ImportError:  # transformers before GgufConfig always dequantizes a GGUF's weights
        keep_float = {}
    else:  # without it, transformers keeps quantized blocks in its own GgufLinear where a kernel is installed
        keep_float = {"quantization_config": GgufConfig(dequantize=True)}
    folder, name = str(file.parent), file.name
    # transformers' GGUF reader raises whatever its parsing hits first (ValueError, NotImplementedError for a
    # tensor type gguf cannot dequantize, KeyError for missing metadata, struct.error for a truncated file...)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True,
            output_loading_info=True, **keep_float,
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except Exception as error:
        raise ModelLoadError(
            f"{file}: transformers cannot load this GGUF ({type(error).__name__}: {_first_line(error)}); {_GGUF_ADVICE}"
        ) from error
    _check_complete(file, info)
    return model.eval(), tokenizer


def _check_complete(path: Path, info: dict) -> None:
    """transformers initialises weights missing from the file at random and only logs it: refuse instead."""
    missing = sorted(info.get("missing_keys") or ()) + sorted(info.get("mismatched_keys") or ())
    if missing:
        shown = ", ".join(map(str, missing[:3])) + (", ..." if len(missing) > 3 else "")
        raise ModelLoadError(
            f"{path}: {len(missing)} weight{'s' if len(missing) > 1 else ''} of the model missing from the file or "
            f"of the wrong shape ({shown}); it would run with random weights"
        )
