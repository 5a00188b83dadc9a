"""Which quantizable op computed each of the model's outputs, for the config's ``model_output`` section.

One forward of the dummy input with hooks on the quantizable leaves finds them by storage: a model output is the
tensor a leaf returned, a view of it, or the result of an in-place op on it (all share its storage), and the last
leaf that returned a tensor on that storage is the op whose output quantizer is the model's. The hooked outputs
are kept until the forward ends, so that a storage freed and reused by another tensor cannot be mistaken for it.
An output that is a copy made by data movement (``contiguous()``), or a model input, has no such leaf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from edgequant.sim.quantized_module import is_float_tensor


def _float_tensors(value: Any) -> list[torch.Tensor]:
    """The float tensors of a (nested) output, in the order the sim numbers a module's float outputs."""
    return [t for t in tree_flatten(value)[0] if is_float_tensor(t)]


def model_output_producers(
    model: nn.Module, args: tuple, kwargs: dict, is_quantizable: Callable[[nn.Module], bool]
) -> tuple[dict[str, set[int]], list[int]]:
    """``({leaf name: indices of its float outputs that are model outputs}, [positions of the model's float outputs
    no quantizable leaf computed])``."""
    produced: dict[int, tuple[str, int]] = {}  # storage address -> the last (leaf, float output index) on it
    kept: list[torch.Tensor] = []  # alive until the end, so that no storage address is reused meanwhile

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            for index, tensor in enumerate(_float_tensors(output)):
                if tensor.numel():
                    produced[tensor.untyped_storage().data_ptr()] = (name, index)
                    kept.append(tensor)

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n and is_quantizable(m)]
    try:
        with torch.no_grad():
            outputs = _float_tensors(model(*args, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    producers: dict[str, set[int]] = {}
    untraced = []
    for position, tensor in enumerate(outputs):
        found = produced.get(tensor.untyped_storage().data_ptr()) if tensor.numel() else None
        if found is None:
            untraced.append(position)
        else:
            producers.setdefault(found[0], set()).add(found[1])
    return producers, untraced
