"""``nn.MultiheadAttention`` in the sim: quantized inside (as AIMET's quantizable multi-head attention), the same
float function as PyTorch's module, and exported, run in ONNX Runtime and emulated exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.export import export_onnx
from edgequant.export.verify import verify

LENGTH, BATCH = 7, 3


class _Attending(nn.Module):
    """One ``nn.MultiheadAttention`` (keys and values of other widths) called with the masks given."""

    def __init__(self, batch_first: bool, need_weights: bool, average: bool) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=24, vdim=20)
        self.need_weights, self.average = need_weights, average

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.attention(query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                              need_weights=self.need_weights, average_attn_weights=self.average)


def _masks(kind: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    padding = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.triu(torch.ones(LENGTH, LENGTH, dtype=torch.bool), 1)
    return {"none": (None, None), "key padding": (padding, None), "causal": (None, causal),
            "both": (padding, causal), "float per head": (None, torch.randn(BATCH * 4, LENGTH, LENGTH))}[kind]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(("masks", "need_weights", "average"), [
    ("none", False, True), ("none", True, True), ("none", True, False), ("key padding", False, True),
    ("causal", True, True), ("both", False, True), ("float per head", False, True)])
def test_the_sim_without_quantizers_computes_pytorchs_attention(batch_first: bool, masks: str, need_weights: bool,
                                                                 average: bool) -> None:
    """The swap changes the sim's copy only and, with every quantizer off, the output (and the attention weights)
    only in float rounding (PyTorch packs the projections and scales q before the product)."""
    torch.manual_seed(0)
    model = _Attending(batch_first, need_weights, average).eval()
    shape = (BATCH, LENGTH) if batch_first else (LENGTH, BATCH)
    inputs = (torch.randn(*shape, 32), torch.randn(*shape, 24), torch.randn(*shape, 20), *_masks(masks))
    sim = eq.QuantSim(model, inputs)
    assert type(model.attention) is nn.MultiheadAttention
    assert not any(isinstance(module, nn.MultiheadAttention) for module in sim.model.modules())
    with torch.no_grad(), sim.quantizers_enabled(False):
        got, expected = sim.model(*inputs), model(*inputs)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-6)
    assert (got[1] is None) == (expected[1] is None)
    if expected[1] is not None:
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-6)


def test_every_projection_product_and_the_softmax_get_quantizers() -> None:
    """AIMET's names for the projections; the products and the softmax are ops with output quantizers."""
    sim = eq.QuantSim(_Attending(True, False, True).eval(), (torch.randn(1, LENGTH, 32), torch.randn(1, LENGTH, 24),
                                                            torch.randn(1, LENGTH, 20), None, None))
    quantizers = sim.quantizers()
    for layer in ("linear_Q", "linear_K", "linear_V", "out_proj"):
        assert f"attention.{layer}.param_quantizers.weight" in quantizers
    for op in ("scores", "softmax", "context"):
        assert f"attention.{op}.output_quantizers.0" in quantizers


class _Encoder(nn.Module):
    """A transformer encoder layer's attention half around ``nn.MultiheadAttention`` (a key padding mask, when
    given), with a head on the first token."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.embed, self.norm, self.head = nn.Linear(12, 32), nn.LayerNorm(32), nn.Linear(32, 10)
        self.attention = nn.MultiheadAttention(32, 4, batch_first=batch_first)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(x)
        x = x if self.attention.batch_first else x.transpose(0, 1)
        normed = self.norm(x)
        x = x + self.attention(normed, normed, normed, key_padding_mask=key_padding_mask, need_weights=False)[0]
        x = x if self.attention.batch_first else x.transpose(0, 1)
        return self.head(x[:, 0])


@pytest.mark.parametrize(("batch_first", "masked"), [(True, False), (False, False), (True, True)])
def test_multihead_attention_exports_and_the_emulating_sim_equals_onnxruntime(tmp_path: Path, batch_first: bool,
                                                                             masked: bool) -> None:
    """Every op emulated (the masked softmax as ORT's float Add and Softmax) and every quantized tensor of the
    export identical to ORT's."""
    torch.manual_seed(0)
    calibration, data = torch.randn(32, LENGTH, 12), torch.randn(64, LENGTH, 12)
    padding = torch.zeros(96, LENGTH, dtype=torch.bool)
    padding[::3, -3:] = True

    def batches(x: torch.Tensor, masks: torch.Tensor) -> list:
        return list(zip(x.split(16), masks.split(16), strict=True)) if masked else list(x.split(16))

    dummy = (calibration[:1], padding[:1]) if masked else calibration[:1]
    sim = eq.QuantSim(_Encoder(batch_first).eval(), dummy, config="per_channel")
    sim.calibrate(batches(calibration, padding[:32]), progress=False)
    export_onnx(sim, tmp_path, dummy)
    plan = sim.emulate("onnxruntime")
    assert not plan.skipped
    softmax = "MaskedSoftmax" if masked else "Softmax"
    assert sorted(op.kind for op in plan.ops) == sorted(
        ["Add", "GatheredGemm", "Gemm", "Gemm", "Gemm", "Gemm", "Gemm", "LayerNormalization", "MatMul", "MatMul",
         softmax])
    report = verify(tmp_path, sim, batches(data, padding[32:]), batch_size=16, progress=False)
    assert report.outputs[0].share_identical == 1.0 and report.first_difference is None


class _UnbatchedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention, self.head = nn.MultiheadAttention(16, 4), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(x, x, x, need_weights=False)[0])


def test_an_unbatched_call_keeps_pytorchs_module_in_float() -> None:
    """A 2-D query (PyTorch's unbatched call) is not rewritten, which computes batched calls only: the module stays
    PyTorch's, in float, and the sim builds and runs."""
    torch.manual_seed(0)
    model, x = _UnbatchedAttention().eval(), torch.randn(5, 16)
    sim = eq.QuantSim(model, x)
    sim.calibrate([x], progress=False)
    assert type(sim.model.get_submodule("attention")) is nn.MultiheadAttention
    assert sim.model(x).shape == (5, 4)
