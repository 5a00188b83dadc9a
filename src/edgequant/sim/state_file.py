"""Reading and writing the files a sim's state travels in, without ever running code from them.

Sim states, QAT checkpoints and best-state files are what teams pass around, so an unrestricted ``torch.load``
of one is a way to run an attacker's code. Every such file is read with ``torch.load(weights_only=True)``:
tensors, numbers, strings and plain containers only; anything else is refused before any of it is used.
A sim state carries its settings as JSON text and one checksum over settings and tensors, checked before the
settings reach the caller.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SIM_STATE_FORMAT = "edgequant-sim-state"
SIM_STATE_VERSION = 4
READABLE_SIM_STATE_VERSIONS = (2, 3, 4)
"""Version 2: settings as separate keys, checksum over the tensors only; 3: settings as JSON under the checksum;
4: quantizers' extra state holds their granularity (`edgequant.quantization.quantizer.EXTRA_STATE_VERSION`), which
this reader also reads in the older ``axis`` form."""
REWRITE_HINT = "rerun `edgequant quantize` (or QuantSim.save) to write it again"


class UnsafeFileError(ValueError):
    """A file holds Python objects that only unrestricted unpickling could build (and so could run code)."""


def tensors_checksum(tensors: dict[str, torch.Tensor], settings_text: str = "") -> str:
    """SHA-256 over ``settings_text`` and the names, dtypes, shapes and bytes of ``tensors``, in name order
    (detects corrupted or edited files)."""
    digest = hashlib.sha256(settings_text.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def load_without_code(path: str | Path, what: str, hint: str) -> Any:
    """``torch.load`` restricted to tensors and plain values; every failure is one ValueError naming ``path``,
    ``what`` it should have been, and ``hint`` (what to do)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{what} file {path} does not exist") from None
    except pickle.UnpicklingError as error:
        if "weights only load failed" in str(error).lower():
            blocked = _blocked_global(str(error))
            raise UnsafeFileError(
                f"{path} is refused: it holds Python objects ({blocked}) that loading would have to execute, and "
                f"a {what} never needs any; do not use a file from an untrusted source — {hint}"
            ) from None
        raise ValueError(f"{path} is not a readable {what} (UnpicklingError); the file is truncated or foreign — "
                         f"{hint}") from None
    except Exception as error:  # torch raises many kinds for truncated or foreign files
        first_line = (str(error).strip().splitlines() or [""])[0][:120]
        raise ValueError(
            f"{path} is not a readable {what} ({type(error).__name__}: {first_line}); the file is truncated or "
            f"foreign — {hint}"
        ) from None


def _blocked_global(message: str) -> str:
    """The global torch's safe unpickler refused, as it names it (``GLOBAL os.system``), else a generic word."""
    for line in message.splitlines():
        if "GLOBAL" in line:
            words = line.split("GLOBAL", 1)[1].split()
            if words:
                return words[0].rstrip(".,")
    return "non-tensor objects"


@dataclass(frozen=True)
class SimState:
    """What a sim-state file holds once its format, version and checksum were checked."""

    settings: dict[str, Any]  # config (the quantsim-config dict), param_bw, output_bw, quant_scheme
    state_dict: dict[str, Any]  # ``sim.model.state_dict()``
    origin: str  # the file it was read from, for messages


def write_sim_state(path: str | Path, settings: dict[str, Any], state_dict: dict[str, Any]) -> None:
    """Write settings (as JSON text) and a state dict with one checksum over both."""
    settings_text = json.dumps(settings, sort_keys=True)
    torch.save({
        "format": SIM_STATE_FORMAT, "version": SIM_STATE_VERSION, "settings": settings_text,
        "state_dict": state_dict, "checksum": tensors_checksum(tensors_of(state_dict), settings_text),
    }, path)


def read_sim_state(path: str | Path) -> SimState:
    """Read a file `write_sim_state` wrote (or an older version of it), checking format, version and checksum before
    anything in it is returned."""
    state = load_without_code(path, "sim state", REWRITE_HINT)
    if not isinstance(state, dict) or state.get("format") != SIM_STATE_FORMAT:
        raise ValueError(f"{path} is not an edgequant sim state (written by QuantSim.save)")
    version = state.get("version")
    if version not in READABLE_SIM_STATE_VERSIONS:
        raise ValueError(
            f"{path} has sim-state format version {version}; this edgequant reads versions "
            f"{', '.join(map(str, READABLE_SIM_STATE_VERSIONS))}: {REWRITE_HINT} with this version"
        )
    state_dict = state.get("state_dict")
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} is corrupted: it has no state dict — {REWRITE_HINT}")
    if version == 2:
        settings_text = ""
        settings = {key: state.get(key) for key in ("config", "param_bw", "output_bw", "quant_scheme")}
    else:
        settings_text = state.get("settings")
        if not isinstance(settings_text, str):
            raise ValueError(f"{path} is corrupted: its settings are missing — {REWRITE_HINT}")
    if tensors_checksum(tensors_of(state_dict), settings_text) != state.get("checksum"):
        raise ValueError(f"{path} is corrupted: its contents do not match the checksum written with them — "
                         f"{REWRITE_HINT}")
    if version != 2:
        settings = json.loads(settings_text)
    return SimState(settings, state_dict, str(path))


def tensors_of(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor entries of a state dict (extra states included), which the checksums cover."""
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
