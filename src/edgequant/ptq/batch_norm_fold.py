"""Batch-norm folding: merge each inference-mode BatchNorm into the Conv/ConvTranspose/Linear next to it.

``bn(x) = x * f + t`` per channel with ``f = gamma / sqrt(var + eps)`` and ``t = beta - mean * f``. Folded into
the layer before it, output channel ``c`` of that layer is scaled by ``f[c]`` and its bias becomes
``(b - mean) * f + beta``; folded into the layer after it (when nothing foldable precedes the BN), input
channel ``c`` is scaled by ``f[c]`` and ``W @ t`` is added to the bias, which is exact only when the layer
never pads its input (checked). The BN is replaced by ``nn.Identity`` so the model keeps its structure.

Hardware folds BN anyway; folding before quantization makes the simulation quantize the weights the
hardware will actually use, and gives equalization the true per-channel weight ranges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgequant.ptq.graph_patterns import find_batch_norm_folds, set_submodule
from edgequant.ptq.layer_channels import add_to_bias, scale_input_channels, scale_output_channels, weights_times_input
from edgequant.quantization import PerChannel
from edgequant.sim.graph import ModelGraph, build_graph
from edgequant.sim.ops import weight_output_axis
from edgequant.sim.quantized_module import QuantizedModule, param_quantizer
from edgequant.sim.quantsim import QuantSim


@dataclass
class FoldedBatchNorm:
    """One fold, with the BN's learned output statistics (``beta``, ``|gamma|``) kept for later use by
    high-bias absorption and analytical bias correction."""

    layer: str
    bn: str
    direction: str  # "preceding": BN was after the layer; "following": BN was before it
    layer_module: nn.Module
    bn_module: nn.Module
    beta: torch.Tensor
    gamma: torch.Tensor


def _affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(factor, shift, beta, gamma) of an inference-mode BN, in float64."""
    variance = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(variance)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(variance)
    factor = gamma / torch.sqrt(variance + bn.eps)
    shift = beta - bn.running_mean.detach().double() * factor
    return factor, shift, beta, gamma


def fold_into_preceding(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``bn(layer(x))`` -> ``layer'(x)``; returns the per-channel factor applied to the weights."""
    factor, shift, _, _ = _affine(bn)
    scale_output_channels(layer, factor)  # also scales an existing bias: b * f
    add_to_bias(layer, shift)
    return factor


def fold_into_following(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """``layer(bn(x))`` -> ``layer'(x)`` (the caller checked the layer does not pad)."""
    factor, shift, _, _ = _affine(bn)
    bias_shift = weights_times_input(layer.weight, layer, shift)
    scale_input_channels(layer, factor)
    add_to_bias(layer, bias_shift)


def _folded_away(bn: nn.Module) -> nn.Identity:
    """What replaces a folded BatchNorm: an ``nn.Identity`` in the BN's mode, so an eval model stays in eval mode
    (a fresh module is in training mode, which would send an ONNX sim's calibration to the torch pass)."""
    return nn.Identity().train(bn.training)


def fold_batch_norm_records(
    model: nn.Module, dummy_input: Any, graph: ModelGraph | None = None
) -> list[FoldedBatchNorm]:
    """`fold_batch_norms` with the names, directions and BN statistics of each fold; a given ``graph`` of
    the model is reused and kept up to date (its folded BN nodes then hold the ``nn.Identity``)."""
    graph = graph or build_graph(model, dummy_input)
    folds = find_batch_norm_folds(graph)
    records = []
    with torch.no_grad():
        for fold in folds:
            layer, bn = model.get_submodule(fold.layer), model.get_submodule(fold.bn)
            _, _, beta, gamma = _affine(bn)
            if fold.direction == "preceding":
                fold_into_preceding(layer, bn)
            else:
                fold_into_following(layer, bn)
            set_submodule(model, fold.bn, _folded_away(bn))
            for node in graph.module_nodes():
                if node.name == fold.bn:
                    node.module = model.get_submodule(fold.bn)
            records.append(FoldedBatchNorm(fold.layer, fold.bn, fold.direction, layer, bn, beta, gamma.abs()))
    return records


def fold_batch_norms(model: nn.Module, dummy_input: Any) -> list[tuple[nn.Module, nn.Module]]:
    """Fold every foldable BatchNorm of ``model`` (in place) into an adjacent Conv/ConvTranspose/Linear.

    Uses the BN running statistics (inference semantics). Folded BNs become ``nn.Identity``. Returns the
    ``(layer, bn)`` module pairs that were folded; BNs with no single-use neighbouring layer, shared BNs and
    BNs without running statistics are left in place.
    """
    return [(record.layer_module, record.bn_module) for record in fold_batch_norm_records(model, dummy_input)]


def fold_batch_norms_to_scale(sim: QuantSim) -> list[tuple[str, str]]:
    """Fold the BatchNorms left in a sim into the preceding layers and their weight quantizers (for QAT
    after BN re-estimation), in place on ``sim.model``.

    A frozen weight encoding (AdaRound, loaded) must be per-channel symmetric on the output axis: its
    scale is multiplied by ``|f|`` so that the quantized weights are the old ones times ``f`` (channels with
    ``f < 0`` map the grid's lowest value -2^(b-1) to 2^(b-1)-1). Other weight encodings are recomputed from
    the folded weights. The BN's output quantizers become the layer's. Returns (layer, bn) names. A frozen fp8
    weight scale is refused (its calibrated scale would not follow the folded weights); a float16 weight has no scale
    and folds as a float weight does.
    """
    folds = find_batch_norm_folds(sim.graph(), allow_following=False)
    for fold in folds:
        layer, bn = sim.model.get_submodule(fold.layer), sim.model.get_submodule(fold.bn)
        quantizer = param_quantizer(layer)
        if quantizer is not None and quantizer.frozen and quantizer.float_format and quantizer.float_format.scaled:
            quantizer.require_integer_grid("batch norm folding into a frozen encoding")
        if quantizer is not None and quantizer.frozen and quantizer.encoding is not None:
            encoding = quantizer.encoding
            if encoding.granularity != PerChannel(weight_output_axis(layer, layer.weight)) or not encoding.signed:
                raise ValueError(
                    f"cannot fold {fold.bn} into the frozen weight encoding of {fold.layer}: it must be per-channel "
                    "(axis of the output channels) and signed symmetric (no unsigned channel, whose grid cannot hold "
                    "negated weights); unfreeze it or use the per_channel config"
                )
    with torch.no_grad():
        for fold in folds:
            layer, bn = sim.model.get_submodule(fold.layer), sim.model.get_submodule(fold.bn)
            factor = fold_into_preceding(layer, bn)
            quantizer = param_quantizer(layer)
            if quantizer is not None and quantizer.frozen and quantizer.encoding is not None:
                encoding = quantizer.encoding
                encoding.scale = (encoding.scale.double() * factor.abs().to(encoding.scale.device)).float()
                quantizer.set_encoding(encoding)
            if isinstance(layer, QuantizedModule) and isinstance(bn, QuantizedModule):
                layer.output_quantizers = bn.output_quantizers
                for moved in layer.output_quantizers.values():
                    moved.owner = fold.layer
            set_submodule(sim.model, fold.bn, _folded_away(bn))
    sim.compute_param_encodings()
    return [(fold.layer, fold.bn) for fold in folds]
