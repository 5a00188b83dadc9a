"""Quantizer groups and cost models on small models whose answers are known by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.mixed_precision import apply_bitwidths, bitops_model, find_groups, memory_model
from edgequant.ptq import fold_batch_norms


class ConcatNet(nn.Module):
    """Two conv branches concatenated, then a linear head: the concat's inputs must share a bit width."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(1, 2, 3)
        self.right = nn.Conv2d(1, 3, 3)
        self.head = nn.Linear(5 * 9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.head(torch.flatten(y, 1))


def _calibrated(model: nn.Module, shape: tuple[int, ...], **options) -> eq.QuantSim:
    torch.manual_seed(0)
    sim = eq.QuantSim(model, torch.randn(1, *shape), **options)
    sim.calibrate([torch.randn(8, *shape) for _ in range(2)], progress=False)
    return sim


def test_digits_groups_follow_supergroups() -> None:
    images, _ = load_digits_tensors("test")
    sim = eq.QuantSim(load_pretrained("digits_cnn"), images[:1])
    sim.calibrate([images[:64]], progress=False)
    groups = {g.name: g for g in find_groups(sim)}
    assert list(groups) == ["<model input>", "conv1.0+conv1.1+conv1.2", "conv2.0+conv2.1+conv2.2", "pool",
                            "conv3.0+conv3.1+conv3.2", "add", "gap", "fc"]
    fused = groups["conv2.0+conv2.1+conv2.2"]  # Conv+BN+ReLU: the weights run in the kernel whose output ReLU writes
    assert {q.name for q in fused.params} == {"conv2.0.param_quantizers.weight", "conv2.1.param_quantizers.weight"}
    assert [q.name for q in fused.activations] == ["conv2.2.output_quantizers.0"]
    assert sum(len(g.params) + len(g.activations) for g in groups.values()) == len(sim.quantizers())


def test_concat_inputs_share_a_group() -> None:
    torch.manual_seed(0)
    sim = _calibrated(ConcatNet(), (1, 5, 5))
    groups = find_groups(sim)
    concat = next(g for g in groups if "cat" in g.name)
    assert {q.name for q in concat.activations} == {
        "left.output_quantizers.0", "right.output_quantizers.0", "cat.output_quantizers.0"}
    assert {q.name for q in concat.params} == {"left.param_quantizers.weight", "right.param_quantizers.weight"}


def test_bitwidths_fixed_by_the_config_are_not_searched() -> None:
    images, _ = load_digits_tensors("test")
    sim = eq.QuantSim(load_pretrained("digits_cnn"), images[:1], config="htp")
    sim.calibrate([images[:64]], progress=False)
    searched = {q.name for g in find_groups(sim) for q in g.params + g.activations}
    fixed = [q for q in sim.quantizers().values() if q.bitwidth == 16]  # htp gives Add etc. 16-bit kernels
    assert fixed and not searched & {q.name for q in fixed}


def test_bitops_and_memory_match_hand_counts() -> None:
    sim = _calibrated(ConcatNet(), (1, 5, 5))
    cost = bitops_model(sim, sim.graph())
    bits = {name: 8 for name in sim.quantizers()}
    macs_left, macs_right, macs_head = 2 * 9 * 9, 3 * 9 * 9, 4 * 45  # outputs x (in_channels * kernel)
    assert cost(bits) == (macs_left + macs_right + macs_head) * 64
    bits["right.param_quantizers.weight"] = 4
    bits["cat.output_quantizers.0"] = 16  # the head's activation operand
    assert cost(bits) == macs_left * 64 + macs_right * 32 + macs_head * 8 * 16
    memory = memory_model(sim)
    uniform = {name: 8 for name in sim.quantizers()}
    weights = 2 * 9 + 3 * 9 + 4 * 45
    biases = 2 + 3 + 4  # float (the default config leaves biases unquantized)
    activations = 25 + 18 + 27 + 45 + 4  # model input, left, right, cat, head outputs
    assert memory(uniform) == weights + biases * 4 + activations


class GroupedNet(nn.Module):
    """A grouped conv, a depthwise conv and a grouped transposed conv: each output sums in_channels / groups."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(8, 12, 3, groups=4)
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.up = nn.ConvTranspose2d(12, 8, 2, stride=2, groups=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.depthwise(self.grouped(x)))


def test_bitops_of_grouped_and_depthwise_convs_match_hand_counts() -> None:
    sim = _calibrated(GroupedNet(), (8, 6, 6))  # dummy input (1, 8, 6, 6)
    cost = bitops_model(sim, sim.graph())
    # grouped: output 12 x 4 x 4, each output sums (8 / 4 groups) input channels x 3x3 taps
    macs_grouped = 12 * 4 * 4 * (8 // 4) * 3 * 3
    # depthwise: output 12 x 4 x 4 (padding 1), each output reads its own channel only: 1 x 3x3 taps
    macs_depthwise = 12 * 4 * 4 * 1 * 3 * 3
    # transposed, 12 -> 8 in 4 groups, 2x2 stride 2: output 8 x 8 x 8, each output sums 12 / 4 channels x one tap
    macs_up = 8 * 8 * 8 * (12 // 4) * 1
    assert (macs_grouped, macs_depthwise, macs_up) == (3456, 1728, 1536)
    assert {t.layer: t.amount for t in cost.terms} == {"grouped": 3456, "depthwise": 1728, "up": 1536}
    bits = {
        "model_input_quantizers.0": 16, "grouped.param_quantizers.weight": 4,
        "grouped.output_quantizers.0": 8, "depthwise.param_quantizers.weight": 8,
        "depthwise.output_quantizers.0": 4, "up.param_quantizers.weight": 2, "up.output_quantizers.0": 8,
    }
    assert set(bits) == set(sim.quantizers())
    # W4 x A16, W8 x A8, W2 x A4 (each layer's activation operand is the previous layer's output quantizer)
    assert cost(bits) == 3456 * 4 * 16 + 1728 * 8 * 8 + 1536 * 2 * 4 == 344064
    assert cost({}) == (3456 + 1728 + 1536) * 32 * 32  # all float


def test_apply_bitwidths_equals_calibrating_at_that_bitwidth() -> None:
    images, _ = load_digits_tensors("test")
    model = load_pretrained("digits_cnn")
    data = [images[:64], images[64:128]]
    sim = eq.QuantSim(model, images[:1])
    sim.calibrate(data, progress=False)
    reference = eq.QuantSim(model, images[:1], param_bw=4, output_bw=16)
    reference.calibrate(data, progress=False)
    changed = apply_bitwidths(sim, {n: 4 if q.role == "param" else 16 for n, q in sim.quantizers().items()})
    assert len(changed) == len(sim.quantizers())
    for name, quantizer in sim.quantizers().items():
        expected = reference.quantizer(name)
        assert quantizer.bitwidth == expected.bitwidth
        torch.testing.assert_close(quantizer.scale, expected.scale)
        torch.testing.assert_close(quantizer.offset, expected.offset)


def test_apply_bitwidths_recalibrates_a_loaded_sim(tmp_path) -> None:
    images, _ = load_digits_tensors("test")
    model = load_pretrained("digits_cnn")
    sim = eq.QuantSim(model, images[:1])
    sim.calibrate([images[:64]], progress=False)
    sim.save(tmp_path / "sim.pt")
    loaded = eq.QuantSim(model, images[:1])
    loaded.load(tmp_path / "sim.pt")  # encodings but no calibration statistics
    with pytest.raises(eq.CalibrationError, match="pass calibration data"):
        apply_bitwidths(loaded, {"pool.output_quantizers.0": 16})
    apply_bitwidths(loaded, {"pool.output_quantizers.0": 16}, list(loaded.batches([images[:64]])))
    apply_bitwidths(sim, {"pool.output_quantizers.0": 16})
    torch.testing.assert_close(loaded.quantizer("pool.output_quantizers.0").scale,
                               sim.quantizer("pool.output_quantizers.0").scale)
    torch.testing.assert_close(loaded.quantizer("conv1.2.output_quantizers.0").scale,
                               sim.quantizer("conv1.2.output_quantizers.0").scale)


def test_groups_of_a_folded_model_fuse_conv_and_relu() -> None:
    images, _ = load_digits_tensors("test")
    model = load_pretrained("digits_cnn")
    fold_batch_norms(model, images[:1])  # leaves an Identity between each Conv and its ReLU
    sim = eq.QuantSim(model, images[:1], config="per_channel")
    sim.calibrate([images[:64]], progress=False)
    names = [g.name for g in find_groups(sim)]
    assert names == ["<model input>", "conv1.0+conv1.2", "conv2.0+conv2.2", "pool", "conv3.0+conv3.2", "add", "gap",
                     "fc"]


class TinyAttention(nn.Module):
    """``q @ k^T`` of two projections: a MatMul whose two operands are activations read through a transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 6)
        self.k = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.q(x), self.k(x).transpose(-1, -2).contiguous())


def test_bitops_of_an_activation_matmul_use_both_operands() -> None:
    sim = _calibrated(TinyAttention(), (5, 4))
    cost = bitops_model(sim, sim.graph())
    bits = {name: 8 for name in sim.quantizers()}
    bits["k.output_quantizers.0"] = 16
    projections = 2 * 5 * 6 * 4 * 8 * 8  # two Linear layers: 5x6 outputs x 4 inputs, W8 x A8
    matmul = 5 * 5 * 6 * 8 * 16  # 5x5 outputs x 6 products, q at 8 bits, k at 16 bits (through the transpose)
    assert cost(bits) == projections + matmul
