"""One pass over the analysis batches that measures every layer's output error along the network.

Per batch, the sim runs once with its quantizers off (FP32) and once as configured; forward hooks on the
quantized layers cache the FP32 outputs of that batch and compare the sim's outputs against them as they are
produced, so each layer's SQNR is "everything up to here quantized" at the cost of two forwards per batch and
one batch of activations in memory. The FP32 run also feeds the activation statistics (ranges, clipping,
histograms), gives the reference outputs of the default metric, and the first batch's tensors are kept for
the dump that users compare with the device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from edgequant.analysis.fidelity import float_leaves, power, sqnr_db
from edgequant.analysis.tensor_stats import ActivationStats
from edgequant.quantization import Quantizer
from edgequant.sim import QuantSim
from edgequant.sim.modes import training_mode

SAMPLES_PER_TENSOR = 1 << 16
"""Values kept per activation quantizer for its histogram (spread evenly over the analysed batches)."""


@dataclass
class LayerError:
    """Output error of one layer, sim vs FP32, accumulated over every call and analysed batch."""

    signal_power: float = 0.0
    noise_power: float = 0.0

    @property
    def sqnr_db(self) -> float:
        return sqnr_db(self.signal_power, self.noise_power)


@dataclass
class LayerPassResult:
    """What the pass measured; ``order`` lists the layers as the forward first ran them."""

    order: list[str]
    errors: dict[str, LayerError]
    activations: dict[str, ActivationStats]
    reference_outputs: list[Any]
    dump: dict[str, np.ndarray] = field(default_factory=dict)


class _Hooks:
    """Forward hooks on the quantized layers, in one of two modes: cache FP32 outputs, or compare with them."""

    def __init__(self, layers: dict[str, nn.Module], activations: dict[str, ActivationStats]) -> None:
        self.layers, self.activations = layers, activations
        self.mode = "fp32"
        self.cache: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.calls: dict[str, int] = {}
        self.order: list[str] = []
        self.errors = {name: LayerError() for name in layers}
        self.kept: dict[tuple[str, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.keep_outputs = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        handles = []
        for name, layer in self.layers.items():
            handles.append(layer.register_forward_hook(self._output_hook(name)))
            if layer.input_quantizers:
                handles.append(layer.register_forward_pre_hook(self._input_hook(layer)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def start(self, mode: str) -> None:
        self.mode, self.calls = mode, {}

    def _input_hook(self, layer: nn.Module) -> Any:
        def observe(_module: nn.Module, args: tuple) -> None:
            if self.mode != "fp32":
                return
            for key, quantizer in layer.input_quantizers.items():
                stats = self.activations.get(quantizer.name)  # disabled quantizers are not analysed
                if stats is not None and int(key) < len(args) and isinstance(args[int(key)], torch.Tensor):
                    stats.observe(args[int(key)], quantizer.encoding)
        return observe

    def _output_hook(self, name: str) -> Any:
        layer = self.layers[name]

        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            key = (name, call)
            if self.mode == "fp32":
                if name not in self.order:
                    self.order.append(name)
                leaves = tree_leaves(output)
                for index, quantizer in layer.output_quantizers.items():
                    stats = self.activations.get(quantizer.name)
                    if stats is not None and int(index) < len(leaves) and isinstance(leaves[int(index)], torch.Tensor):
                        stats.observe(leaves[int(index)], quantizer.encoding)
                # clone: an in-place op later in the forward (ReLU(inplace=True)) would change the cached values
                self.cache[key] = [leaf.detach().clone() for leaf in float_leaves(output)]
                return
            expected = self.cache.pop(key, None)
            got = float_leaves(output)
            if expected is None or len(expected) != len(got):
                return  # the sim took another path than FP32 (data-dependent control flow): no comparison
            error = self.errors[name]
            for sim_leaf, fp32_leaf in zip(got, expected, strict=True):
                error.signal_power += power(fp32_leaf)
                error.noise_power += power(sim_leaf - fp32_leaf)
            if self.keep_outputs:
                self.kept[key] = (expected, [leaf.detach().clone() for leaf in got])

        return hook


def run_layer_pass(
    sim: QuantSim,
    batches: Sequence[tuple[tuple, dict]],
    layers: dict[str, nn.Module],
    activation_quantizers: dict[str, Quantizer],
    tensor_names: dict[str, list[tuple[int, str]]],
    input_names: list[str],
    dump_samples: int = 1,
    progress: bool = False,
) -> LayerPassResult:
    """Run the pass (see the module docstring). ``tensor_names[layer]`` lists ``(output leaf, ONNX name)``
    pairs to dump; the first batch's first ``dump_samples`` samples are dumped (0: no dump)."""
    per_batch = max(1, SAMPLES_PER_TENSOR // max(1, len(batches)))
    activations = {name: ActivationStats(per_batch) for name in activation_quantizers}
    hooks = _Hooks(layers, activations)
    model_inputs = [q for q in activation_quantizers.values() if q.role == "model_input"]
    reference_outputs = []
    dump: dict[str, np.ndarray] = {}
    with torch.no_grad(), training_mode(sim.model, False), hooks.installed():
        for index, (args, kwargs) in enumerate(tqdm(batches, desc="analysis: layer outputs", disable=not progress,
                                                    leave=False)):
            for quantizer in model_inputs:
                value = args[int(quantizer.key)] if quantizer.key.isdigit() else kwargs.get(quantizer.key)
                if isinstance(value, torch.Tensor):
                    activations[quantizer.name].observe(value, quantizer.encoding)
            hooks.start("fp32")
            with sim.quantizers_enabled(False):
                reference_outputs.append(_detached(sim.model(*args, **kwargs)))
            hooks.start("sim")
            hooks.keep_outputs = index == 0 and dump_samples > 0
            sim.model(*args, **kwargs)
            hooks.cache.clear()
            if hooks.keep_outputs:
                dump = _dump(hooks.kept, tensor_names, input_names, args, kwargs, dump_samples)
                hooks.kept.clear()
                hooks.keep_outputs = False
    return LayerPassResult(hooks.order, {n: hooks.errors[n] for n in hooks.order}, activations, reference_outputs,
                           dump)


def _detached(output: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, output)


def _dump(kept: dict, tensor_names: dict[str, list[tuple[int, str]]], input_names: list[str], args: tuple,
          kwargs: dict, samples: int) -> dict[str, np.ndarray]:
    """``fp32:<tensor>`` / ``sim:<tensor>`` arrays of the first call of each named layer output, and the model
    inputs as ``input:<name>`` (the batch's first ``samples`` samples)."""
    arrays: dict[str, np.ndarray] = {}
    inputs = [*args, *kwargs.values()]
    for name, value in zip(input_names, inputs, strict=False):
        if isinstance(value, torch.Tensor):
            arrays[f"input:{name}"] = value[:samples].cpu().numpy()
    for layer, names in tensor_names.items():
        if (layer, 0) not in kept:
            continue
        fp32, sim = kept[(layer, 0)]
        for leaf, tensor in names:
            if leaf < len(fp32) and f"fp32:{tensor}" not in arrays:
                arrays[f"fp32:{tensor}"] = fp32[leaf][:samples].float().cpu().numpy()
                arrays[f"sim:{tensor}"] = sim[leaf][:samples].float().cpu().numpy()
    return arrays
