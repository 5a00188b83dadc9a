"""Granularity values: per-block and LPBQ quantize-dequantize computed by hand, ONNX Runtime's blocked Q/DQ, the
statistics of the grouped view, shape errors that name the quantizer, and quantizer states of the older axis form."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from edgequant import QuantSim
from edgequant.qat.lsq import values_per_scale
from edgequant.quantization import (
    Encoding,
    Lpbq,
    MinMaxAnalyzer,
    MseAnalyzer,
    PerBlock,
    PercentileAnalyzer,
    PerChannel,
    PerTensor,
    Quantizer,
    SqnrAnalyzer,
)
from edgequant.quantization.granularity import granularity_from_ints, granularity_from_json

GRANULARITIES = [PerTensor(), PerChannel(1), PerChannel((0, 2)), PerBlock(4, 0, 1), PerBlock(2, 1, 0),
                 Lpbq(4, 0, 1, decompressed_bw=8), Lpbq(16, 1, 0, decompressed_bw=6)]


def _weight_2x4() -> torch.Tensor:
    """Two output channels of two blocks of 2; every block's largest |w| is 7 steps of a power-of-two scale."""
    return torch.tensor([[1.75, -0.375, 0.4375, 0.09375],  # block scales 0.25 and 0.0625
                         [-7.0, 2.5, 0.0, 0.875]])  # block scales 1 and 0.125


def test_per_block_int4_quantize_dequantize_by_hand() -> None:
    quantizer = Quantizer(4, True, PerBlock(2, channel_axis=0, block_axis=1), role="param")
    encoding = quantizer.encode_from(_weight_2x4())
    assert encoding.scale.tolist() == [[0.25, 0.0625], [1.0, 0.125]]  # |max| / 7 per block, one row per channel
    assert encoding.offset.tolist() == [[-8.0, -8.0], [-8.0, -8.0]]
    # steps: [7, -1.5 -> -2 (half to even)], [7, 1.5 -> 2], [-7, 2.5 -> 2], [0, 7]
    assert quantizer(_weight_2x4()).tolist() == [[1.75, -0.5, 0.4375, 0.125], [-7.0, 2.0, 0.0, 0.875]]
    per_channel = Quantizer(4, True, PerChannel(0), role="param")
    per_channel.encode_from(_weight_2x4())  # one scale per row: 0.25 and 1, so the small blocks lose their values
    assert per_channel(_weight_2x4()).tolist() == [[1.75, -0.5, 0.5, 0.0], [-7.0, 2.0, 0.0, 1.0]]


def _lpbq_weight() -> torch.Tensor:
    """2 x 128, blocks of 64: the block maxima and a few values that exercise the rounding of the multipliers."""
    weight = torch.zeros(2, 128)
    weight[0, :4] = torch.tensor([7.0, -2.6, 0.5, 1.5])  # block scale 1
    weight[0, 64:67] = torch.tensor([1.96875, -0.6, 0.3])  # block scale 0.28125 = 4.5 x 0.0625: a tie
    weight[1, :2] = torch.tensor([-3.5, 1.3])  # block scale 0.5
    weight[1, 64:66] = torch.tensor([0.07, -0.05])  # block scale 0.01 = 0.32 x 0.03125: below one
    return weight


def test_lpbq_scales_multipliers_and_output_by_hand() -> None:
    """AIMET's LPBQ at 4 bits in 8: channel scale = largest block scale / 2**(8 - 4); multiplier =
    clamp(round(block scale / channel scale), 1, 16), rounding half to even; block scale = channel scale x
    multiplier."""
    granularity = Lpbq(64, channel_axis=0, block_axis=1, decompressed_bw=8)
    quantizer = Quantizer(4, True, granularity, role="param")
    encoding = quantizer.encode_from(_lpbq_weight())
    # channel 0: blocks 1 and 0.28125 -> channel scale 1/16 = 0.0625, multipliers 16 and 4.5 -> 4 (half to even)
    # channel 1: blocks 0.5 and 0.01 -> channel scale 0.5/16 = 0.03125, multipliers 16 and 0.32 -> 0 -> clamped to 1
    assert granularity.channel_scale(encoding.scale, 4).tolist() == [[0.0625], [0.03125]]
    assert granularity.multipliers(encoding.scale, 4).tolist() == [[16.0, 4.0], [16.0, 1.0]]
    assert encoding.scale.tolist() == [[1.0, 0.25], [0.5, 0.03125]]
    out = quantizer(_lpbq_weight())
    assert out[0, :4].tolist() == [7.0, -3.0, 0.0, 2.0]  # steps of 1: 0.5 -> 0 and 1.5 -> 2 (half to even)
    assert out[0, 64:67].tolist() == [1.75, -0.5, 0.25]  # steps of 0.25: 7.875 -> 8 clamps to 7, -2.4 -> -2, 1.2 -> 1
    assert out[1, :2].tolist() == [-3.5, 1.5]  # steps of 0.5: -7, 2.6 -> 3
    assert out[1, 64:66].tolist() == [0.0625, -0.0625]  # steps of 0.03125: 2.24 -> 2, -1.6 -> -2
    assert int((out != 0).sum()) == 10  # the zeros stay zero (and 0.5 rounds to 0)
    plain = Quantizer(4, True, PerBlock(64, 0, 1), role="param")
    plain.encode_from(_lpbq_weight())  # without LPBQ the tie block keeps its own scale 0.28125: 7 steps exactly
    assert plain(_lpbq_weight())[0, 64].item() == 1.96875


def test_lpbq_projection_is_idempotent_and_learns_through_a_straight_through_gradient() -> None:
    granularity = Lpbq(4, 0, 1, decompressed_bw=8)
    scale = torch.rand(3, 5) + 0.01
    projected = granularity.project(scale, 4)
    assert torch.equal(granularity.project(projected, 4), projected)
    learned = scale.clone().requires_grad_()
    granularity.project(learned, 4).sum().backward()
    assert torch.equal(learned.grad, torch.ones_like(scale))


def _ort_blocked_qdq(x: torch.Tensor, encoding: Encoding) -> np.ndarray:
    granularity = encoding.granularity
    attributes = {"axis": granularity.block_axis, "block_size": granularity.block_size}
    dtype = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4, (8, True): TensorProto.INT8}[
        (encoding.bitwidth, encoding.signed)]
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attributes),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attributes)], "blocked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        initializer=[helper.make_tensor("s", TensorProto.FLOAT, list(encoding.scale.shape),
                                        encoding.scale.flatten().tolist()),
                     helper.make_tensor("z", dtype, list(encoding.scale.shape),
                                        encoding.onnx_zero_point.long().flatten().tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


@pytest.mark.parametrize("granularity, bitwidth, symmetric", [
    (PerBlock(32, 0, 1), 4, True), (PerBlock(32, 0, 1), 4, False), (PerBlock(16, 1, 0), 8, True),
    (Lpbq(32, 0, 1, decompressed_bw=8), 4, True),
])
def test_blocked_quantize_dequantize_is_bit_exact_with_onnxruntime(granularity, bitwidth, symmetric) -> None:
    torch.manual_seed(bitwidth)
    x = torch.randn(6, 64) * torch.logspace(-2, 1, 64)  # blocks of very different ranges
    if granularity.block_axis == 0:
        x = x.T.contiguous()
    quantizer = Quantizer(bitwidth, symmetric, granularity, role="param")
    encoding = quantizer.encode_from(x)
    np.testing.assert_array_equal(quantizer(x).numpy(), _ort_blocked_qdq(x, encoding))


def test_a_shape_that_does_not_divide_into_blocks_names_the_quantizer_and_the_layer() -> None:
    quantizer = Quantizer(4, True, PerBlock(64, 0, 1), role="param", owner="fc", key="weight")
    with pytest.raises(ValueError, match=r"^fc\.param_quantizers\.weight: dimension 1 of shape \(8, 96\) \(96\) does "
                                         r"not divide into blocks of 64; choose a block size that divides 96$"):
        quantizer.encode_from(torch.randn(8, 96))
    sim = QuantSim(nn.Sequential(nn.Linear(96, 8), nn.ReLU(), nn.Linear(8, 4)), torch.randn(1, 96))
    with pytest.raises(ValueError, match=r"^0\.param_quantizers\.weight: dimension 1 of shape \(8, 96\)"):
        sim.set_granularity("*", PerBlock(64))
    assert sim.quantizer("0.param_quantizers.weight").granularity == PerTensor()  # nothing changed half way
    with pytest.raises(KeyError, match="no quantizer of kinds"):
        sim.set_granularity("nothing*", PerBlock(32))


def test_set_granularity_rebuilds_the_weight_quantizers_from_the_layer_axes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 64, 1), nn.Flatten(),
                          nn.Linear(64 * 36, 10))
    x = torch.randn(2, 64, 8, 8)
    sim = QuantSim(model, x, param_bw=4)
    sim.calibrate([x], progress=False)
    rebuilt = sim.set_granularity("*", PerBlock(8))
    assert rebuilt == ["0.param_quantizers.weight", "2.param_quantizers.weight", "4.param_quantizers.weight"]
    conv, transposed, linear = (sim.quantizer(name) for name in rebuilt)
    assert conv.granularity == PerBlock(8, channel_axis=0, block_axis=1)  # (8, 64, 3, 3): blocks of input channels
    assert transposed.granularity == PerBlock(8, channel_axis=1, block_axis=0)  # (8, 64, 1, 1): inputs on axis 0
    assert linear.granularity == PerBlock(8, channel_axis=0, block_axis=1)
    assert conv.scale.shape == (8, 8, 1, 1) and transposed.scale.shape == (1, 64, 1, 1)
    assert linear.scale.shape == (10, 64 * 36 // 8) and conv.bitwidth == 4 and conv.symmetric
    block = model[0].weight.detach()[3, 8:16]  # (8, 3, 3): channel 3, second block of input channels
    assert conv.scale[3, 1, 0, 0].item() == pytest.approx(float(block.abs().max()) / 7, rel=1e-6)
    assert "parameters: 1 per-block(8 on axis 0, channels on axis 1), 2 per-block(8 on axis 1, channels on axis 0)" \
        in sim.coverage_summary()
    assert "per-block(8 on axis 0, channels on axis 1)" in repr(sim.model.get_submodule("2").param_quantizers["weight"])
    with torch.no_grad():
        sim.model(x)  # the rebuilt quantizers got encodings from their weights


def test_per_block_statistics_are_per_channel_statistics_of_the_grouped_view() -> None:
    torch.manual_seed(1)
    weight = torch.randn(4, 12, 3) * torch.linspace(0.1, 3, 12)[:, None]
    by_hand = weight.reshape(4, 3, 4, 3).reshape(12, 12)  # (channel, block) rows of the 4 x 3 values of each block
    for analyzer_type in (MinMaxAnalyzer, SqnrAnalyzer, PercentileAnalyzer, MseAnalyzer):
        blocked, rows = analyzer_type(PerBlock(4, 0, 1)), analyzer_type(PerChannel(0))
        blocked.observe(weight)
        rows.observe(by_hand)
        assert blocked.scale_shape == (4, 3, 1)
        for got, want in zip(blocked.compute_range(4, True), rows.compute_range(4, True), strict=True):
            assert torch.equal(got, want), analyzer_type.__name__
    minmax = MinMaxAnalyzer(PerBlock(4, 0, 1))
    minmax.observe(weight)
    assert torch.equal(minmax.max, by_hand.amax(dim=1)) and torch.equal(minmax.min, by_hand.amin(dim=1))


def test_lsq_counts_the_values_of_one_block() -> None:
    quantizer = Quantizer(4, True, PerBlock(64, 0, 1), role="param")
    assert values_per_scale(quantizer, torch.Size([8, 128]), batched=False) == 64
    assert values_per_scale(quantizer, torch.Size([8, 128, 3, 3]), batched=False) == 64 * 9
    per_channel = Quantizer(4, True, PerChannel(0), role="param")
    assert values_per_scale(per_channel, torch.Size([8, 128, 3, 3]), batched=False) == 128 * 9


def test_range_learning_reduces_the_scale_gradient_per_block() -> None:
    """d(out)/d(scale) of one block is the sum over that block's values only (LSQ: round(x/s) - x/s in range)."""
    quantizer = Quantizer(4, True, PerBlock(2, 0, 1), role="param")
    weight = _weight_2x4()
    quantizer.encode_from(weight)
    quantizer.enable_range_learning()
    quantizer(weight * 0.9).sum().backward()
    scaled = (weight * 0.9).reshape(2, 2, 2) / quantizer.scale.detach()[..., None]
    expected = (scaled.round().clamp(-8, 7) - scaled).sum(dim=2)  # no value clips at 0.9 of the range
    torch.testing.assert_close(quantizer.scale.grad, expected)


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=str)
def test_int_and_json_forms_round_trip(granularity) -> None:
    assert granularity_from_ints(granularity.to_ints()) == granularity
    assert granularity_from_json(granularity.to_json()) == granularity


def test_axes_left_to_the_layer_and_bad_values() -> None:
    assert PerBlock(64).bind(1, 0) == PerBlock(64, channel_axis=1, block_axis=0)
    assert PerChannel().bind(0, 1) == PerChannel(0) and not PerChannel().bound
    assert Lpbq(32).bind(0, 1) == Lpbq(32, 0, 1, decompressed_bw=8)
    assert PerChannel([2, 0]) == PerChannel((0, 2)) and PerChannel((3,)) == PerChannel(3)
    assert granularity_from_ints(PerBlock(64).to_ints()) == PerBlock(64)
    with pytest.raises(ValueError, match="leaves its axes to the layer"):
        Quantizer(4, True, PerBlock(64), role="param")
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        PerBlock(0)
    with pytest.raises(ValueError, match="channel_axis and block_axis must differ"):
        PerBlock(8, 1, 1)
    with pytest.raises(ValueError, match="axis must be an axis >= 0"):
        PerChannel(-1)
    with pytest.raises(ValueError, match="LPBQ is symmetric only"):
        Quantizer(4, False, Lpbq(64, 0, 1), role="param")
    with pytest.raises(ValueError, match="bitwidth below decompressed_bw=8, got 8"):
        Quantizer(8, True, Lpbq(64, 0, 1), role="param")
    with pytest.raises(ValueError, match="has no single channel axis"):
        _ = Quantizer(4, True, PerBlock(4, 0, 1), role="param").axis


def test_scale_shapes_and_views() -> None:
    shape = (8, 64, 3, 3)
    assert PerTensor().scale_shape(shape) == ()
    assert PerChannel(1).scale_shape(shape) == (64,) and PerChannel((0, 1)).scale_shape(shape) == (8, 64)
    assert PerBlock(16, 0, 1).scale_shape(shape) == (8, 4, 1, 1)
    assert PerBlock(4, 1, 0).scale_shape(shape) == (2, 64, 1, 1)
    x = torch.arange(8 * 64 * 9, dtype=torch.float32).reshape(shape)
    granularity = PerBlock(16, 0, 1)
    assert granularity.grouped(x).shape == (8, 4, 16, 3, 3)
    assert granularity.group_scale(torch.ones(8, 4, 1, 1), 4).shape == (8, 4, 1, 1, 1)
    assert granularity.rows(x).shape == (32, 16 * 9)
    assert torch.equal(granularity.rows(x)[5], x[1, 16:32].reshape(-1))  # channel 1, block 1
    scale = torch.arange(32, dtype=torch.float32).reshape(8, 4, 1, 1)
    assert torch.equal(granularity.broadcast(scale, shape)[1, 16:32, 0, 0], torch.full((16,), 5.0))
    assert torch.equal(granularity.from_channel_major(granularity.channel_major(scale).reshape(-1), shape), scale)
    transposed = PerBlock(4, 1, 0)  # (nb, C) layout: channel-major is its transpose
    layout = torch.arange(128, dtype=torch.float32).reshape(2, 64, 1, 1)
    assert torch.equal(transposed.channel_major(layout), layout.reshape(2, 64).T)
    assert torch.equal(transposed.from_channel_major(layout.reshape(2, 64).T.reshape(-1), shape), layout)


def test_quantizer_states_of_the_axis_form_still_load() -> None:
    """States written before granularities: ``[enabled, frozen, bitwidth, symmetric, axis]`` (axis -1: per tensor),
    later with ``[strict, unsigned]`` appended."""
    quantizer = Quantizer(8, False, role="param")
    state = {"scale": torch.tensor([0.5, 0.25]), "offset": torch.tensor([-8.0, -8.0]),
             "_extra_state": torch.tensor([1, 1, 4, 1, 0])}
    quantizer.load_state_dict(state)
    assert (quantizer.granularity, quantizer.bitwidth, quantizer.symmetric, quantizer.frozen) == (
        PerChannel(0), 4, True, True)
    assert quantizer(torch.tensor([[1.0, 2.0], [1.0, 2.0]])).tolist() == [[1.0, 2.0], [1.0, 1.75]]
    quantizer.load_state_dict({"scale": torch.tensor(0.5), "offset": torch.tensor(-127.0),
                               "_extra_state": torch.tensor([0, 0, 8, 1, -1, 1, 0])})
    assert (quantizer.granularity, quantizer.strict_symmetric, quantizer.enabled) == (PerTensor(), True, False)
    blocked = Quantizer(4, True, Lpbq(64, 0, 1), role="param")
    blocked.encode_from(_lpbq_weight())
    fresh = Quantizer(8, False, role="param")
    fresh.load_state_dict(blocked.state_dict())
    assert fresh.granularity == Lpbq(64, 0, 1) and torch.equal(fresh(_lpbq_weight()), blocked(_lpbq_weight()))
    with pytest.raises(ValueError, match="extra state version 9 is newer"):
        fresh.load_state_dict(dict(blocked.state_dict(), _extra_state=torch.tensor([-9, 1, 0, 4, 1, 0, 0, 0])))
