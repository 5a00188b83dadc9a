"""Quantizing the model's own inputs inside its forward, not in a forward pre-hook.

A hook is an extra Python call per forward, `torch.compile` traces it as a graph of its own, and
``copy.deepcopy`` of an fx ``GraphModule`` drops forward hooks (so a copied sim silently stopped quantizing its
inputs). For a traced root (the usual case) the quantizers become nodes of its graph, right after the inputs;
any other root gets a subclass whose ``forward`` quantizes the inputs and calls the original one.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn


class QuantizedInputsModel(nn.Module):
    """Mixin placed before the class of an untraced root model (see the module docstring)."""

    model_input_quantizers: nn.ModuleDict

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003 - same signature as the wrapped model
        quantizers = self.model_input_quantizers
        args = tuple(quantizers[str(i)](a) if str(i) in quantizers else a for i, a in enumerate(args))
        kwargs = {k: quantizers[k](v) if k in quantizers else v for k, v in kwargs.items()}
        return super().forward(*args, **kwargs)


_QUANTIZED_INPUT_CLASSES: dict[type, type] = {}


def quantize_model_inputs(model: nn.Module, quantizers: nn.ModuleDict) -> None:
    """Make ``model`` run ``quantizers`` (keyed by input position, or keyword name) on its inputs."""
    model.model_input_quantizers = quantizers
    if isinstance(model, fx.GraphModule) and _insert_into_graph(model, list(quantizers)):
        return
    cls = type(model)
    if cls not in _QUANTIZED_INPUT_CLASSES:
        _QUANTIZED_INPUT_CLASSES[cls] = type(cls.__name__, (QuantizedInputsModel, cls), {})
    model.__class__ = _QUANTIZED_INPUT_CLASSES[cls]


def _insert_into_graph(model: fx.GraphModule, keys: list[str]) -> bool:
    """Feed each quantized input through ``model_input_quantizers.<key>``; False where inputs do not map one to
    one to placeholders (``*args``/``**kwargs`` signatures), for the subclass to handle."""
    placeholders = [node for node in model.graph.nodes if node.op == "placeholder"]
    if any(str(node.target).startswith("*") for node in placeholders):
        return False
    by_name = {node.target: node for node in placeholders}
    inputs = {}
    for key in keys:
        node = placeholders[int(key)] if key.isdigit() and int(key) < len(placeholders) else by_name.get(key)
        if node is None:
            return False
        inputs[key] = node
    with model.graph.inserting_after(placeholders[-1]):
        for key, node in inputs.items():
            quantized = model.graph.call_module(f"model_input_quantizers.{key}", (node,))
            node.replace_all_uses_with(quantized, delete_user_cb=lambda user, q=quantized: user is not q)
    model.recompile()
    return True
