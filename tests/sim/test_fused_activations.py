"""A ReLU, ReLU6 or Hardtanh whose output is quantized runs inside its quantizer's fused CPU pass in evaluation:
the same values bit for bit, written where the activation alone writes them (into its input when in place), and
the quantizer's hooks still see the call."""

import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.quantization import fused_cpu


class Blocks(nn.Module):
    """Three clamping activations, in place and not, with the activation's input read again afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.relu6 = nn.ReLU6(inplace=True)
        self.relu = nn.ReLU()
        self.hardtanh = nn.Hardtanh(-0.5, 0.75, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        z = self.relu6(y)  # writes into y
        w = y * 2.0 - 1.0
        return self.relu(w) + z + self.hardtanh(w - 0.25) + w


@pytest.fixture
def fused_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_cpu, "_disabled", False)


def calibrated_sim(images: torch.Tensor) -> eq.QuantSim:
    torch.manual_seed(0)
    model = Blocks().eval()
    model.bn.running_mean.normal_()
    sim = eq.QuantSim(model, images[:1])
    sim.calibrate([images], progress=False)
    return sim


def activation_inputs(sim: eq.QuantSim) -> tuple[dict[str, torch.Tensor], list]:
    """What each activation's output quantizer is called with (pre-hooks, as the export check uses)."""
    seen: dict[str, torch.Tensor] = {}

    def record(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, args[0].min())

        return hook

    handles = [sim.model.get_submodule(name).output_quantizers["0"].register_forward_pre_hook(record(name))
               for name in ("relu6", "relu", "hardtanh")]
    return seen, handles


def test_fused_activations_are_bit_identical_and_quantizers_still_see_the_call(fused_path, monkeypatch):
    images = torch.randn(4, 3, 128, 128)  # 1 M values per activation: every thread takes part
    sim = calibrated_sim(images)
    seen, handles = activation_inputs(sim)
    with torch.no_grad():
        fused = sim.model(images)
        with monkeypatch.context() as patch:
            patch.setattr(fused_cpu, "_disabled", True)
            expected = sim.model(images.clone())
    for handle in handles:
        handle.remove()
    assert torch.equal(fused, expected)
    # each quantizer was called with the activation's input (values below the clamp): the clamp ran in its pass
    assert seen["relu6"] < 0 and seen["relu"] < 0 and seen["hardtanh"] < -0.5


@pytest.mark.parametrize("name", ["relu6", "relu", "hardtanh"])
def test_each_activation_writes_where_it_would_on_its_own(fused_path, monkeypatch, name):
    images = torch.randn(4, 3, 128, 128)
    activation = calibrated_sim(images).model.get_submodule(name)
    x = torch.randn(4, 16, 128, 128) * 3
    with torch.no_grad():
        with monkeypatch.context() as patch:
            patch.setattr(fused_cpu, "_disabled", True)
            alone = x.clone()
            expected = activation(alone)
        fused_input = x.clone()
        fused = activation(fused_input)
    assert torch.equal(fused, expected) and torch.equal(fused_input, alone)
    assert torch.equal(fused_input, fused) if activation.inplace else torch.equal(fused_input, x)
