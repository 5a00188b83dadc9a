"""Cost models of a bit-width configuration, measured once on the sim's dummy input.

* BitOps: for every multiply-accumulate layer (Conv, ConvTranspose, Linear, MatMul), its MACs on the dummy
  input times the bit width of its weight operand times the bit width of its activation operand (for a
  MatMul of two activations, both activation bit widths). A float operand counts 32 bits.
* Memory: the bytes of the quantized layers' parameters plus the bytes of every quantized activation tensor
  the dummy input produces (``numel * bits / 8``; float tensors count 4 bytes).

A model is a list of terms over quantizer names, so the cost of any configuration is a cheap sum that the
greedy search evaluates thousands of times without running the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from edgequant.mixed_precision.groups import model_input_sources, upstream_quantizer
from edgequant.quantization import Quantizer
from edgequant.sim import QuantSim
from edgequant.sim.graph import GraphNode, ModelGraph
from edgequant.sim.ops import function_name, is_data_movement
from edgequant.sim.quantized_module import FunctionalOp, param_quantizer

FLOAT_BITS = 32
MATMUL_FUNCTIONS = frozenset({"matmul", "bmm", "mm", "linear"})


@dataclass
class CostTerm:
    """``amount * bits(first) * bits(second)`` (BitOps) or ``amount * bits(first) / 8`` (bytes); None = float."""

    layer: str
    amount: float
    first: str | None
    second: str | None = None


class CostModel:
    """The cost of a configuration ``{quantizer name: bits}`` (quantizers not listed are float)."""

    def __init__(self, name: str, unit: str, terms: list[CostTerm], bits_product: bool) -> None:
        self.name, self.unit, self.terms, self.bits_product = name, unit, terms, bits_product

    def __call__(self, bitwidths: dict[str, int]) -> float:
        def bits(quantizer_name: str | None) -> int:
            return bitwidths.get(quantizer_name, FLOAT_BITS) if quantizer_name else FLOAT_BITS

        if self.bits_product:
            return float(sum(t.amount * bits(t.first) * bits(t.second) for t in self.terms))
        return float(sum(t.amount * bits(t.first) / 8 for t in self.terms))

    def effective_bits(self, bitwidths: dict[str, int]) -> float:
        """The uniform bit width with the same cost (BitOps: sqrt of the mean bits product; memory: mean bits)."""
        total = sum(t.amount for t in self.terms)
        if total == 0:
            return 0.0
        ratio = self(bitwidths) / total
        return math.sqrt(ratio) if self.bits_product else ratio * 8


def _macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> float:
    if isinstance(module, nn.modules.conv._ConvNd):
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        if module.transposed:  # every input value is scattered over out_channels/groups * kernel outputs
            return float(inputs[0].numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size))
        return float(output.numel() * per_output)
    if isinstance(module, nn.Linear):
        return float(output.numel() * module.in_features)
    return float(output.numel() * inputs[0].shape[-1])  # matmul-like functional op


def _is_mac_layer(module: nn.Module) -> bool:
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return True
    return isinstance(module, FunctionalOp) and function_name(module.target).strip("_") in MATMUL_FUNCTIONS


def _run_hooked(sim: QuantSim, hooks: dict[nn.Module, Callable]) -> None:
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    args, kwargs = (sim.dummy_input, {}) if isinstance(sim.dummy_input, tuple) else ((), sim.dummy_input)
    try:
        with torch.no_grad(), sim.quantizers_enabled(False):
            sim.model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def _own_input_quantizer(module: nn.Module, index: int) -> str | None:
    inputs = getattr(module, "input_quantizers", None) or {}
    quantizer = inputs[str(index)] if str(index) in inputs else None
    return quantizer.name if quantizer is not None and quantizer.enabled else None


def _graph_operand(node: GraphNode | None, index: int, sources: dict[int, Quantizer]) -> str | None:
    if node is None or index >= len(node.inputs):
        return None
    quantizer = upstream_quantizer(node.inputs[index], sources)
    return quantizer.name if quantizer is not None else None


class _FollowDataMovement(TorchFunctionMode):
    """Tags the results of data-movement ops (reshape, permute, contiguous, dropout...) with the quantizer that
    wrote their input, so a layer reading a copied view still finds its operand's encoding."""

    def __init__(self, written_by: dict[int, str], alive: list[torch.Tensor]) -> None:
        super().__init__()
        self.written_by, self.alive = written_by, alive

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        result = func(*args, **(kwargs or {}))
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if source is not None and is_data_movement(func):
            quantizer = self.written_by.get(source.untyped_storage().data_ptr())
            for value in result if isinstance(result, (tuple, list)) else (result,):
                if quantizer is not None and isinstance(value, torch.Tensor) and value.is_floating_point():
                    self.written_by.setdefault(value.untyped_storage().data_ptr(), quantizer)
                    self.alive.append(value)
        return result


def bitops_model(sim: QuantSim, graph: ModelGraph) -> CostModel:
    """BitOps of ``sim`` (see the module docstring); MACs measured by forward hooks on the dummy input.

    An activation operand's bit width is that of the quantizer whose output tensor (or a view of it: reshapes,
    transposes) the layer reads, found by storage in the same forward; where a copy hides it, the graph's
    producer is used instead."""
    layers = {module: name for name, module in sim.quantized_modules().items() if _is_mac_layer(module)}
    activation_quantizers = {q: q.name for q in sim.quantizers(role=("model_input", "output")).values() if q.enabled}
    written_by: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # keeps recorded storages from being reused within the forward
    macs: dict[str, float] = {}
    operands: dict[str, list[str | None]] = {}

    def record_output(quantizer: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(output, torch.Tensor):
            written_by[output.untyped_storage().data_ptr()] = activation_quantizers[quantizer]
            alive.append(output)

    def record_layer(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        name = layers[module]
        macs[name] = macs.get(name, 0.0) + _macs(module, inputs, output)
        if name not in operands:
            operands[name] = [
                _own_input_quantizer(module, index) or (
                    written_by.get(value.untyped_storage().data_ptr()) if isinstance(value, torch.Tensor) else None)
                for index, value in enumerate(inputs[:2])
            ]

    with _FollowDataMovement(written_by, alive):
        _run_hooked(sim, dict.fromkeys(activation_quantizers, record_output) | dict.fromkeys(layers, record_layer))
    sources = model_input_sources(sim, graph)
    nodes = {node.name: node for node in graph.module_nodes()}
    terms = []
    for module, name in layers.items():
        if name not in macs:
            continue
        found = operands[name] + [None] * (2 - len(operands[name]))
        first, second = (found[i] or _graph_operand(nodes.get(name), i, sources) for i in range(2))
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            weight = param_quantizer(module, "weight")
            second = weight.name if weight is not None and weight.enabled else None
        terms.append(CostTerm(name, macs[name], second, first))
    if not terms:
        raise ValueError("the model has no Conv, Linear or MatMul layer, so BitOps are zero; use cost='memory'")
    return CostModel("BitOps", "BitOps", terms, bits_product=True)


def memory_model(sim: QuantSim) -> CostModel:
    """Bytes of parameters and activations of ``sim`` on the dummy input (see the module docstring)."""
    terms = []
    for layer_name, layer in sim.quantized_modules().items():
        quantizers = getattr(layer, "param_quantizers", {}) or {}
        for param_name, param in layer.named_parameters(recurse=False):
            quantizer = quantizers[param_name] if param_name in quantizers else None
            name = quantizer.name if quantizer is not None and quantizer.enabled else None
            terms.append(CostTerm(f"{layer_name}.{param_name}", float(param.numel()), name))
    activations = {q: q.name for q in sim.quantizers(role=("model_input", "input", "output")).values() if q.enabled}
    sizes: dict[str, float] = {}

    def hook(quantizer: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        sizes[activations[quantizer]] = sizes.get(activations[quantizer], 0.0) + float(output.numel())

    _run_hooked(sim, dict.fromkeys(activations, hook))
    terms += [CostTerm(name, size, name) for name, size in sizes.items()]
    return CostModel("memory", "bytes", terms, bits_product=False)
