"""Which quantizer produced each tensor argument of a module call, recorded by running the sim once.

The fx graphs of a sim do not always meet: where a model is traced piece by piece (Hugging Face's BERT: each
layer's dense blocks are graphs of their own, its attention an untraced module whose ops are intercepted at run
time), a graph's input comes from code no graph describes. One forward of the dummy input tells what no graph
does: every `Quantizer` call labels its output, data movement (``view``, ``transpose``, ``contiguous``...) and
pass-through modules hand the label on, and each module's first call keeps the labels of its arguments.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from edgequant.quantization import Quantizer
from edgequant.sim.modes import quantizers_disabled, training_mode
from edgequant.sim.ops import is_data_movement, is_pass_through
from edgequant.sim.quantized_module import QuantizedModule


@dataclass(frozen=True)
class RecordedTensor:
    """A tensor argument of a recorded call: the quantizer whose output it holds (None: no quantizer's), or the
    name of the `FLOAT_MODULES` module whose float output it holds."""

    quantizer: Quantizer | None
    float_source: str | None = None


FLOAT_MODULES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)
"""Modules the sim leaves in float that compute (PyTorch's fused attention where it adds key/value rows, which
`edgequant.sim.multihead_attention` does not rewrite): the export writes their ops in float, which the runtime
computes with its own float kernels, so what reads their output is not emulated."""


@dataclass
class RecordedCall:
    """A module's first call: its arguments, each tensor replaced by a `RecordedTensor`; ``uniform``: every later
    call in the run was alike (the same quantizers behind its tensors), so one emulated forward serves them all."""

    args: tuple
    kwargs: dict
    uniform: bool = True


class _Labels:
    """Tensor → quantizer whose output it holds. Tensors are held weakly (the forward frees its activations as
    usual); a label whose tensor is gone belongs to no later tensor that reuses its id."""

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[weakref.ref, Quantizer | str]] = {}

    def of(self, value: Any) -> Quantizer | str | None:
        """The label of ``value``: a quantizer, or the name of the float module that computed it."""
        found = self.by_id.get(id(value)) if isinstance(value, torch.Tensor) else None
        return found[1] if found is not None and found[0]() is value else None

    def label(self, output: Any, label: Quantizer | str | None) -> None:
        if label is None:
            return
        for leaf in tree_flatten(output)[0]:
            if isinstance(leaf, torch.Tensor):
                self.by_id[id(leaf)] = (weakref.ref(leaf), label)

    def recorded(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        label = self.of(value)
        return RecordedTensor(label, None) if isinstance(label, Quantizer) else RecordedTensor(None, label)


class _DataMovement(TorchFunctionMode):
    """Hands the label of a data-movement call's first argument on to its outputs, and the label its non-empty
    tensors share on to a concatenation's output (a KV cache appending keys of one grid to the past ones)."""

    def __init__(self, labels: _Labels) -> None:
        super().__init__()
        self.labels = labels

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        output = func(*args, **(kwargs or {}))
        if args and is_data_movement(func):
            self.labels.label(output, self.labels.of(args[0]))
        elif func in (torch.cat, torch.concat) and args and isinstance(args[0], (tuple, list)):
            shared = {self.labels.of(part) for part in args[0] if part.numel()}
            if len(shared) == 1:
                self.labels.label(output, shared.pop())
        return output


def record_calls(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, RecordedCall]:
    """Run ``model`` once in float on ``(args, kwargs)``; the first call of every quantized module and nested
    graph, by name, with the quantizer behind each tensor argument (and whether later calls were alike)."""
    labels, calls = _Labels(), {}
    handles = []

    def before(name: str):
        def hook(module: nn.Module, call_args: tuple, call_kwargs: dict) -> None:
            call = RecordedCall(tree_map(labels.recorded, call_args), tree_map(labels.recorded, call_kwargs))
            first = calls.setdefault(name, call)
            if first is not call and (first.args, first.kwargs) != (call.args, call.kwargs):
                first.uniform = False

        return hook

    def after(module: nn.Module, call_args: tuple, output: Any) -> None:
        if isinstance(module, Quantizer):
            labels.label(output, module)
        elif is_pass_through(module) and call_args:
            labels.label(output, labels.of(call_args[0]))

    def computed_in_float(name: str):
        return lambda module, call_args, output: labels.label(output, name)

    for name, module in model.named_modules():
        if name and isinstance(module, (QuantizedModule, fx.GraphModule)):
            handles.append(module.register_forward_pre_hook(before(name), with_kwargs=True))
        if isinstance(module, Quantizer) or is_pass_through(module):
            handles.append(module.register_forward_hook(after))
        elif isinstance(module, FLOAT_MODULES):
            handles.append(module.register_forward_hook(computed_in_float(name)))
    try:
        with torch.no_grad(), training_mode(model, False), quantizers_disabled(model), _DataMovement(labels):
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls
