"""Layers back from ATen ops: a model saved with torch.export is a graph of ``aten.conv2d(x, weight, ...)``
calls on parameters, with no ``nn.Conv2d`` left. Rebuilding the layer modules around the same parameters
gives them weight quantizers and their original names (``conv1.0.weight``), as for an eager model."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

_ATEN = torch.ops.aten


def _constant(node: fx.Node, index: int, default: object) -> object:
    return node.args[index] if len(node.args) > index else default


def _conv(node: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module | None:
    """aten.conv{1,2,3}d(x, w, b, stride, padding, dilation, groups) or
    aten.convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)."""
    general = node.target == _ATEN.convolution.default
    if general and _constant(node, 6, False):
        return None  # transposed convolution: left as a functional op
    groups = int(_constant(node, 8 if general else 6, 1))
    conv_type = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[weight.dim()]
    spatial = weight.dim() - 2
    return conv_type(
        weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
        stride=tuple(_constant(node, 3, [1] * spatial)), padding=tuple(_constant(node, 4, [0] * spatial)),
        dilation=tuple(_constant(node, 5, [1] * spatial)), groups=groups, bias=bias is not None,
        device="meta",
    )


def _linear(node: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    return nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")


_BUILDERS = {_ATEN.conv1d.default: _conv, _ATEN.conv2d.default: _conv, _ATEN.conv3d.default: _conv,
             _ATEN.convolution.default: _conv, _ATEN.linear.default: _linear}


def _as_parameter(tensor: torch.Tensor) -> nn.Parameter:
    """TorchScript conversions keep weights as constants; a layer needs them as (frozen) parameters."""
    if isinstance(tensor, nn.Parameter):
        return tensor
    return nn.Parameter(tensor.detach(), requires_grad=False)


def lift_aten_layers(traced: fx.GraphModule) -> list[str]:
    """Replace ``aten.conv*/linear`` calls on parameters by layer modules owning those parameters."""
    lifted = []
    for node in list(traced.graph.nodes):
        builder = _BUILDERS.get(node.target) if node.op == "call_function" else None
        weight_node = node.args[1] if builder and len(node.args) > 1 else None
        if not (isinstance(weight_node, fx.Node) and weight_node.op == "get_attr"):
            continue
        bias_node = node.args[2] if len(node.args) > 2 else None
        if bias_node is not None and not (isinstance(bias_node, fx.Node) and bias_node.op == "get_attr"):
            continue
        owner, _, weight_name = weight_node.target.rpartition(".")
        if not owner or weight_name != "weight" or (bias_node is not None and bias_node.target != f"{owner}.bias"):
            continue
        holder = traced.get_submodule(owner)
        held = {name for name, _ in holder.named_parameters()} | {name for name, _ in holder.named_buffers()}
        if held - {"weight", "bias"} or any(True for _ in holder.children()):
            continue  # the holder keeps other state: replacing it would lose that
        weight = _as_parameter(holder.weight)
        bias = _as_parameter(holder.bias) if bias_node is not None else None
        layer = builder(node, weight, bias)
        if layer is None:
            continue
        layer.weight = weight
        if bias is not None:
            layer.bias = bias
        traced.add_submodule(owner, layer)  # same owner path: the parameters keep their names
        with traced.graph.inserting_before(node):
            replacement = traced.graph.call_module(owner, (node.args[0],))
        node.replace_all_uses_with(replacement)
        traced.graph.erase_node(node)
        lifted.append(owner)
    for node in list(traced.graph.nodes):
        if node.op == "get_attr" and not node.users:
            traced.graph.erase_node(node)
    return lifted
