"""`QuantSim.split_at_layers`: running the forward from a cut before a layer gives exactly the full forward's
output, on graphs with skip connections and in-place ops, under whatever quantizer settings hold at each cut."""

from __future__ import annotations

import torch
from torch import nn

from edgequant.sim import QuantSim


class Residual(nn.Module):
    """A skip connection across three layers, an in-place ReLU on a tensor live across a cut, two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.stem(x)
        y = self.conv2(self.relu(self.conv1(skip)))
        pooled = (y + skip).mean((2, 3))
        return self.head(pooled), pooled


class Branching(nn.Module):
    """Data-dependent control flow: the root cannot be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else -self.conv(x)


def _sim(model: nn.Module, batches: list[torch.Tensor]) -> QuantSim:
    sim = QuantSim(model, batches[0][:1], param_bw=4, output_bw=4)
    sim.calibrate(batches, progress=False)
    return sim


def test_every_cut_reproduces_the_full_forward_under_the_settings_of_its_moment() -> None:
    torch.manual_seed(0)
    batches = [torch.randn(2, 3, 6, 6) for _ in range(2)]
    sim = _sim(Residual(), batches)
    layers = list(sim.quantized_modules())
    segmented = sim.split_at_layers(layers)
    assert segmented is not None and set(segmented.layers) == set(layers)
    assert segmented.layers[:4] == ["stem", "conv1", "relu", "conv2"]  # in graph order
    x = batches[1]
    with torch.no_grad():
        with sim.quantizers_enabled(False):
            fp32 = sim.model(x)
        quantized = sim.model(x)
        for upstream_on in (False, True):
            with sim.quantizers_enabled(upstream_on):
                for cut in segmented.cuts((x,), {}):
                    layer = sim.model.get_submodule(cut.layer)
                    # the layer toggled against the rest: the full forward with the same flags agrees
                    with sim.quantizers_enabled(not upstream_on, layer.quantizers().values()):
                        got, expected = segmented.run_from(cut), sim.model(x)
                    for a, b in zip(got, expected, strict=True):
                        assert torch.equal(a, b), cut.layer
                    assert torch.equal(segmented.run_from(cut)[0], (quantized if upstream_on else fp32)[0])
    conv2_cut = next(cut for cut in segmented.cuts((x,), {}) if cut.layer == "conv2")
    assert len(conv2_cut.values) == 2  # the ReLU output and the skip tensor both cross the cut


def test_no_cut_where_the_root_is_not_one_graph_and_none_for_layers_it_does_not_call() -> None:
    batches = [torch.rand(2, 3, 6, 6)]
    assert _sim(Branching(), batches).split_at_layers(["conv"]) is None
    sim = _sim(Residual(), [torch.randn(2, 3, 6, 6)])
    assert sim.split_at_layers(["conv2", "no.such.layer"]).layers == ["conv2"]
