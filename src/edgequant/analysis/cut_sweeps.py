"""Per-layer sensitivities of the default metric, each evaluation starting at the layer's cut, not at the input.

With only layer L's quantizers on, everything upstream of L's first call computes FP32 values; with every
quantizer on but L's, everything upstream computes the fully quantized sim's values. So per batch, one FP32 and
one quantized forward run segment by segment (`QuantSim.split_at_layers`) give every layer's input cut, and each
figure costs only the forward from its layer on. Noise powers are summed per batch in the order
`OutputFidelity` sums them over full forwards, so each figure is the one a full evaluation gives (re-measure
it with ``sim.set_enabled`` and ``analyzer.metric``). A user's ``eval_fn`` sees the whole model: it gets full
evaluations instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from edgequant.analysis.fidelity import OutputFidelity
from edgequant.quantization import Quantizer
from edgequant.sim import QuantSim
from edgequant.sim.modes import training_mode
from edgequant.sim.segments import SegmentedForward


def sensitivities_from_cuts(
    sim: QuantSim,
    segmented: SegmentedForward,
    fidelity: OutputFidelity,
    active: list[Quantizer],
    own: dict[str, list[Quantizer]],
    step: Callable[[float], None],
) -> dict[str, tuple[float, float]]:
    """``(only_this_quantized, all_but_this_quantized)`` of each layer of ``segmented`` (``own[layer]``: its
    quantizers, ``active``: all the analysed ones); ``step(fraction)`` after each evaluation of one batch."""
    noise = {only_this: dict.fromkeys(segmented.layers, 0.0) for only_this in (True, False)}
    share = 1.0 / len(fidelity.batches)
    with torch.no_grad(), training_mode(sim.model, False):
        for index, (args, kwargs) in enumerate(fidelity.batches):
            for only_this in (True, False):
                with sim.quantizers_enabled(not only_this, active):  # upstream: FP32, or the quantized sim
                    for cut in segmented.cuts(args, kwargs):
                        with sim.quantizers_enabled(only_this, own[cut.layer]):
                            noise[only_this][cut.layer] += fidelity.batch_noise(index, segmented.run_from(cut))
                        step(share)
    return {layer: (fidelity.from_noise(noise[True][layer]), fidelity.from_noise(noise[False][layer]))
            for layer in segmented.layers}
