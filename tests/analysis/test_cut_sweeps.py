"""Per-layer sweeps of the default metric start at each layer's cut, and every figure still equals a full
evaluation with the public API (``sim.set_enabled`` + ``analyzer.metric``), skip connections included."""

from __future__ import annotations

import torch
from torch import nn

from edgequant.analysis import QuantAnalyzer
from edgequant.sim import QuantSim


def _remeasure(analyzer: QuantAnalyzer, name: str, only_this: bool) -> float:
    sim = analyzer.sim
    sim.set_enabled(not only_this)
    sim.set_enabled(only_this, pattern=name + "*")
    try:
        return analyzer.metric(sim.model)
    finally:
        sim.set_enabled(True)


def test_figures_from_cuts_equal_full_evaluations_on_a_residual_network(digits_cnn, digits_train, tmp_path) -> None:
    batches = list(digits_train[:192].split(64))
    sim = QuantSim(digits_cnn, digits_train[:1], param_bw=4, output_bw=8)
    sim.calibrate(batches, progress=False)
    assert "pool" in str(sim.model.graph.find_nodes(op="call_module", target="add")[0].args)  # the skip
    analyzer = QuantAnalyzer.from_sim(sim, batches, progress=False)
    calls = []
    handle = sim.model.get_submodule("conv1.0").register_forward_hook(lambda *_: calls.append(1))
    try:
        result = analyzer.analyze(tmp_path)
    finally:
        handle.remove()
    layers = [layer for layer in result.layers if layer.name in analyzer.layers()]
    assert len(layers) == 13
    # the first layer is not rerun by every evaluation: fewer calls than the two full sweeps per layer alone
    assert len(calls) < 2 * len(layers) * len(batches)
    for layer in layers:
        assert _remeasure(analyzer, layer.name, True) == layer.only_this_quantized, layer.name
        assert _remeasure(analyzer, layer.name, False) == layer.all_but_this_quantized, layer.name
    assert result.layer("conv2.0").only_this_quantized < 1.0  # the figures are not trivially FP32's
    assert not sim.weights_frozen  # the sweeps fold the weights in for their own duration only


class _Untraceable(nn.Module):
    """Control flow on a traced value in the root: no cut is defined, the sweeps evaluate the whole model."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.first(x)
        return self.second(hidden if hidden.shape[0] > 0 else -hidden)


def test_without_a_cut_the_sweeps_fall_back_to_full_evaluations(tmp_path) -> None:
    torch.manual_seed(0)
    batches = [torch.randn(8, 6) for _ in range(2)]
    analyzer = QuantAnalyzer(_Untraceable(), batches[0], batches, param_bw=4, output_bw=4, progress=False)
    assert analyzer.sim.split_at_layers(analyzer.layers()) is None
    result = analyzer.analyze(tmp_path, dump_samples=0)
    for name in ("first", "second"):
        layer = result.layer(name)
        assert _remeasure(analyzer, name, True) == layer.only_this_quantized < 1.0
        assert _remeasure(analyzer, name, False) == layer.all_but_this_quantized < 1.0
