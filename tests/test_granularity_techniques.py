"""Per-block and LPBQ weights through the techniques that read a quantizer's grid: frozen weights, AdaRound, QAT
with range learning, the quantization analysis, BatchNorm folding into frozen encodings and integer-kernel emulation
(which refuse per-block grids by name)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from edgequant import QuantSim
from edgequant.analysis import QuantAnalyzer
from edgequant.analysis.report import _per_channel
from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.export.verify import verify
from edgequant.ptq.adaround import adaround
from edgequant.ptq.batch_norm_fold import fold_batch_norms_to_scale
from edgequant.qat import prepare_qat
from edgequant.quantization import Lpbq, PerBlock


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_digits_tensors("test")[0][:256]


def _digits_sim(images: torch.Tensor, **settings: object) -> QuantSim:
    """conv2 per block of 8 input channels, conv3 LPBQ (blocks of 8, int8 channel grid), 4-bit weights."""
    sim = QuantSim(load_pretrained("digits_cnn"), images[:1], param_bw=4, config="per_channel", **settings)
    sim.set_granularity("conv2.0", PerBlock(8))
    sim.set_granularity("conv3.0", Lpbq(8))
    sim.calibrate(list(images.split(64)), progress=False)
    return sim


def test_frozen_blocked_weights_compute_what_the_live_ones_do(images: torch.Tensor) -> None:
    sim = _digits_sim(images)
    with torch.no_grad():
        live = sim.model(images[:64])
        with sim.frozen_weights():
            assert torch.equal(sim.model(images[:64]), live)


def test_adaround_rounds_per_block_weights_onto_their_block_grids() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(64, 32)
    sim = QuantSim(model, x[:1], param_bw=4, config="per_channel")
    sim.set_granularity("0", PerBlock(8))
    sim.calibrate([x], progress=False)
    scale = sim.quantizer("0.param_quantizers.weight").scale.clone()
    float_weight = sim.model.get_submodule("0").weight.detach().clone()
    adaround(sim, [x], num_iterations=20, progress=False)
    quantizer = sim.quantizer("0.param_quantizers.weight")
    weight = sim.model.get_submodule("0").weight.detach()
    assert quantizer.frozen and quantizer.granularity == PerBlock(8, 0, 1) and torch.equal(quantizer.scale, scale)
    steps = weight.reshape(16, 4, 8) / scale[..., None]  # each weight on its own block's grid, floor or ceil
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-5)
    steps = steps.round()
    floor = torch.floor(float_weight.reshape(16, 4, 8) / scale[..., None]).clamp(-8, 7)
    assert bool(((steps == floor) | (steps == (floor + 1).clamp(-8, 7))).all())
    assert bool((steps != torch.round(float_weight.reshape(16, 4, 8) / scale[..., None]).clamp(-8, 7)).any())
    assert torch.equal(quantizer(weight), weight)


def test_range_learning_learns_block_scales_with_the_lsq_count_of_a_block(images: torch.Tensor) -> None:
    sim = _digits_sim(images)
    setup = prepare_qat(sim, "range_learning")
    conv2 = setup.learned["conv2.0.param_quantizers.weight"]  # (32, 16, 3, 3): blocks of 8 x 3 x 3 values
    assert conv2.quantizer.scale.shape == (32, 2, 1, 1)
    assert conv2.grad_scale == pytest.approx(1 / math.sqrt(8 * 9 * 7))
    optimizer = torch.optim.SGD([p for p in sim.model.parameters() if p.requires_grad], lr=0.01)
    setup.attach_optimizer(optimizer)
    sim.model.train()
    loss = nn.functional.cross_entropy(sim.model(images[:64]), torch.arange(64) % 10)
    loss.backward()
    assert conv2.quantizer.scale.grad.shape == (32, 2, 1, 1) and bool(conv2.quantizer.scale.grad.abs().sum() > 0)
    optimizer.step()
    lpbq = sim.quantizer("conv3.0.param_quantizers.weight")
    granularity = lpbq.granularity
    encoding = lpbq.encoding  # the learned scale, projected onto the LPBQ grid the forward uses
    multipliers = granularity.multipliers(encoding.scale, 4)
    assert torch.equal(encoding.scale, multipliers * granularity.channel_scale(encoding.scale, 4))
    assert torch.equal(multipliers, multipliers.round()) and multipliers.min() >= 1 and multipliers.max() == 16


def test_folding_into_a_frozen_per_block_encoding_is_refused_by_name(images: torch.Tensor) -> None:
    sim = _digits_sim(images)
    sim.freeze_encodings("conv2.0")
    with pytest.raises(ValueError, match=r"^cannot fold conv2\.1 into the frozen weight encoding of conv2\.0: it must "
                                         r"be per-channel"):
        fold_batch_norms_to_scale(sim)


def test_emulation_runs_per_block_convolutions_as_onnxruntimes_float_conv(tmp_path) -> None:
    """ORT has no integer Conv for per-block (or LPBQ) weights: it dequantizes them and runs a float Conv, which
    the emulation computes in its order; the outputs equal ORT's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 1),
                          nn.ReLU()).eval()
    x = torch.randn(8, 8, 8, 8)
    sim = QuantSim(model, x[:1], config="per_channel")
    sim.set_granularity("2", PerBlock(8))
    sim.set_granularity("4", Lpbq(8, decompressed_bw=12))
    sim.calibrate([x], progress=False)
    sim.export(tmp_path, x[:1])
    plan = sim.emulate("onnxruntime")
    assert [(op.name, op.kind) for op in plan.ops] == [("0", "Conv"), ("2", "FloatConv"), ("4", "FloatConv")]
    report = verify(tmp_path, sim, torch.randn(16, 8, 8, 8), progress=False)
    assert report.first_difference is None, report.tensor_table()


def test_the_analysis_plots_each_channel_s_widest_block_range(images: torch.Tensor, tmp_path) -> None:
    sim = _digits_sim(images[:128])
    result = QuantAnalyzer.from_sim(sim, list(images[:128].split(64)), progress=False).analyze(tmp_path, num_batches=1)
    layer = next(layer for layer in result.layers if layer.name == "conv3.0")
    encoding = layer.encodings["conv3.0.param_quantizers.weight"]
    assert encoding["granularity"] == {"kind": "lpbq", "block_size": 8, "channel_axis": 0, "block_axis": 1,
                                       "decompressed_bw": 8}
    quantizer = sim.quantizer("conv3.0.param_quantizers.weight")
    scale = quantizer.encoding.scale.reshape(32, 4)  # (channel, block): the widest block sets the channel's range
    assert _per_channel(encoding, "max", 32) == (scale.amax(dim=1) * 7).tolist()
    assert _per_channel(encoding, "min", 32) == (scale.amax(dim=1) * -8).tolist()
