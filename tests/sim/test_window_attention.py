"""torchvision's Swin window attention in the sim: quantized inside, the same float function as torchvision's, and
exported, run in ONNX Runtime and emulated exactly, with the windows shifted or not and the map padded or not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention

import edgequant as eq
from edgequant.export import export_onnx
from edgequant.export.verify import verify


class _SwinBlock(nn.Module):
    """A 4×4 patch embedding, then Swin's attention half (LayerNorm, window attention of 4×4 windows, residual add)
    and a head on the pooled map."""

    def __init__(self, shift: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.attention = ShiftedWindowAttention(16, [4, 4], [shift, shift], num_heads=2)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).permute(0, 2, 3, 1)
        x = x + self.attention(self.norm(x))
        return self.head(x.mean(dim=(1, 2)))


CASES = [(0, 32), (2, 32), (0, 24), (2, 24)]
"""(shift, input size): windows not shifted / shifted, on an 8×8 map (whole windows) or a 6×6 one (padded)."""


@pytest.mark.parametrize(("shift", "size"), CASES)
def test_the_sim_without_quantizers_computes_torchvisions_window_attention(shift: int, size: int) -> None:
    torch.manual_seed(0)
    model = _SwinBlock(shift).eval()
    x = torch.randn(4, 3, size, size)
    sim = eq.QuantSim(model, x[:1])
    assert type(model.attention) is ShiftedWindowAttention  # the user's model is not edited
    assert "attention.scores.output_quantizers.0" in sim.quantizers()
    with torch.no_grad(), sim.quantizers_enabled(False):
        assert torch.equal(sim.model(x), model(x))


def test_a_map_whose_windows_shift_otherwise_is_refused() -> None:
    """A block quantized on a 4×4 map (one window: not shifted) refuses an 8×8 one, whose windows shift."""
    sim = eq.QuantSim(_SwinBlock(2).eval(), torch.randn(1, 3, 16, 16))
    with sim.quantizers_enabled(False), pytest.raises(ValueError, match="windows are not shifted and gets a 8×8 map"):
        sim.model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(("shift", "size"), CASES)
def test_window_attention_exports_and_the_emulating_sim_equals_onnxruntime(tmp_path: Path, shift: int,
                                                                          size: int) -> None:
    """Every op emulated: the qkv Linear reads the padded windows in float (ORT's MatMulNBits), q·kᵀ and ·v read
    q, k and v gathered from its output (float MatMuls), the residual add reads shifted windows merged back in float;
    every quantized tensor of the export identical to ORT's."""
    torch.manual_seed(0)
    calibration = torch.randn(32, 3, size, size)
    sim = eq.QuantSim(_SwinBlock(shift).eval(), calibration[:1], config="per_channel")
    sim.calibrate(calibration.split(16), progress=False)
    export_onnx(sim, tmp_path, calibration[:1])
    plan = sim.emulate("onnxruntime")
    assert not plan.skipped
    kinds = {op.name: op.kind for op in plan.ops}
    assert kinds["attention.qkv"] == "GatheredGemm" and kinds["attention.proj"] == "Gemm"
    assert kinds["attention.scores"] == kinds["attention.context"] == "FloatMatMul"
    assert kinds["add"] == ("FloatAdd" if shift else "Add")
    assert kinds["attention.softmax"] == ("MaskedSoftmax" if shift else "Softmax")
    report = verify(tmp_path, sim, torch.randn(64, 3, size, size), batch_size=16, progress=False)
    assert report.outputs[0].share_identical == 1.0 and report.first_difference is None
