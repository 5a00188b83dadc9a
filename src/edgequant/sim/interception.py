"""Quantizing the functional ops of modules that torch.fx cannot trace.

Hugging Face attention, for example, builds shapes from ``tensor.shape`` tuples, which fx cannot follow. For
such a module we record, on the dummy input, the sequence of math ops its ``forward`` calls itself (not
inside child modules): ``matmul, mul, add, softmax, matmul``. Each becomes a `FunctionalOp` child module
(so it has quantizers and a name, like an op from a traced graph), and while the module runs, a
``TorchFunctionMode`` routes the k-th such call to the k-th op module.

If a later call takes another path (the op at position k is not the recorded one), the remaining ops of that
call run in float and a warning names the module: a different path is never quantized wrongly.
"""

from __future__ import annotations

import functools
import warnings

from torch import nn
from torch.overrides import TorchFunctionMode

from edgequant.sim.ops import function_name, function_op_type, is_float_math_call
from edgequant.sim.quantized_module import FunctionalOp


class InterceptedModule(nn.Module):
    """Mixin placed before the original class of an untraceable module (see the module docstring)."""

    functional_op_names: list[str]
    child_depth: int

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003 - same signature as the wrapped module
        self.child_depth = 0
        with _OpRouter(self):
            return super().forward(*args, **kwargs)


class _OpRouter(TorchFunctionMode):
    def __init__(self, owner: InterceptedModule) -> None:
        super().__init__()
        self.owner = owner
        self.position = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        owner = self.owner
        if owner.child_depth or not is_float_math_call(func, args, kwargs):
            return func(*args, **kwargs)
        names = owner.functional_op_names
        if self.position < len(names):
            op = getattr(owner, names[self.position])
            if op.target is func:
                self.position += 1
                return op(*args, **kwargs)
            warnings.warn(
                f"{type(owner).__name__}: op {self.position} is {function_name(func)}, not the recorded "
                f"{function_name(op.target)} (another code path than with dummy_input); its remaining ops run in float",
                stacklevel=2,
            )
            self.position = len(names)
        return func(*args, **kwargs)


def _enter_child(owner: InterceptedModule, *_: object) -> None:
    owner.child_depth += 1


def _leave_child(owner: InterceptedModule, *_: object) -> None:
    owner.child_depth -= 1


_INTERCEPTED_CLASSES: dict[type, type] = {}


def intercept_functional_ops(module: nn.Module, recorded_ops: list[object]) -> list[str]:
    """Give ``module``'s own functional ops (in recorded call order) `FunctionalOp` children; returns their names."""
    names = []
    for func in recorded_ops:
        base = function_name(func).strip("_")
        name, index = base, 1
        while hasattr(module, name):
            name, index = f"{base}_{index}", index + 1
        module.add_module(name, FunctionalOp(func, function_op_type(func)))
        names.append(name)
    for child_name, child in module.named_children():
        if child_name not in names:
            child.register_forward_pre_hook(functools.partial(_enter_child, module))
            child.register_forward_hook(functools.partial(_leave_child, module))
    cls = type(module)
    if cls not in _INTERCEPTED_CLASSES:
        _INTERCEPTED_CLASSES[cls] = type(cls.__name__, (InterceptedModule, cls), {})
    module.__class__ = _INTERCEPTED_CLASSES[cls]
    module.functional_op_names = names
    module.child_depth = 0
    return names
