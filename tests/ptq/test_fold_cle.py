"""Batch-norm folding and cross-layer equalization keep the float function and do what the paper says."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from edgequant import QuantSim
from edgequant.ptq import ChannelClamp, equalize, fold_batch_norms, fold_batch_norms_to_scale
from edgequant.ptq.layer_channels import input_channel_ranges, output_channel_ranges
from edgequant.quantization import Encoding, quantize_dequantize


def _randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters (fresh BNs fold to the identity)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.randn(n, generator=generator))
                module.bias.data.copy_(torch.randn(n, generator=generator) * 0.5)
    return model.eval()


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def _assert_fold_exact(model: nn.Module, x: torch.Tensor, expected_folds: int) -> list:
    model = _randomize_batch_norms(model)
    with torch.no_grad():
        reference = model(x)
        pairs = fold_batch_norms(model, x)
        folded = model(x)
    assert len(pairs) == expected_folds
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert _relative_error(folded, reference) < 1e-5
    return pairs


def test_fold_torchvision_models_is_exact() -> None:
    x = torch.randn(1, 3, 16, 16)
    _assert_fold_exact(torchvision.models.mobilenet_v2(), x, 52)
    _assert_fold_exact(torchvision.models.resnet18(), x, 20)


class _FoldZoo(nn.Module):
    """Grouped and depthwise convs, a ConvTranspose, a BN with nothing foldable before it, Linear+BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(4)  # preceded by the input: folds into the unpadded conv after it
        self.conv = nn.Conv2d(4, 8, 1)
        self.bn0 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.bn2 = nn.BatchNorm2d(12)
        self.up = nn.ConvTranspose2d(12, 6, 2, stride=2, groups=3)
        self.bn3 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5, bias=False)
        self.bn4 = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn0(self.conv(self.bn_in(x)))
        x = torch.relu(self.bn1(self.grouped(x)))
        x = self.bn2(self.depthwise(x))
        x = self.bn3(self.up(x))
        return self.bn4(self.fc(x.mean(dim=(2, 3))))


def test_fold_grouped_depthwise_transposed_linear_and_following() -> None:
    model = _FoldZoo()
    pairs = _assert_fold_exact(model, torch.randn(3, 4, 6, 6), 6)
    assert any(layer is model.conv and bn is not None for layer, bn in pairs)
    assert all(isinstance(getattr(model, f"bn{i}"), nn.Identity) for i in range(5))
    assert isinstance(model.bn_in, nn.Identity)
    assert model.grouped.bias is not None and model.fc.bias is not None


def test_bn_before_padded_conv_is_not_folded() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1))
    _randomize_batch_norms(model)
    assert fold_batch_norms(model, torch.randn(1, 3, 5, 5)) == []
    assert isinstance(model[0], nn.BatchNorm2d)


def test_fold_falls_back_to_sequential_order_when_tracing_fails() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 1e9:  # data-dependent control flow: fx cannot trace this module
                return x
            return self.body(x)

    model = Untraceable()
    pairs = _assert_fold_exact(model, torch.randn(1, 3, 6, 6), 1)
    assert pairs[0][0] is model.body[0]


def _chain(activation: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), copy.deepcopy(activation),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), copy.deepcopy(activation),
        nn.Conv2d(16, 8, 1),
    )
    return _randomize_batch_norms(model)


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.PReLU(16), nn.ReLU6()], ids=["relu", "prelu", "relu6"])
def test_equalize_keeps_function_and_equalizes_ranges(activation: nn.Module) -> None:
    model = _chain(activation)
    x = torch.randn(4, 3, 8, 8) * 3
    with torch.no_grad():
        reference = model(x)
    report = equalize(model, x, absorb_high_bias=False, activation_aware=False)  # the paper's weight-only scales
    with torch.no_grad():
        assert _relative_error(model(x), reference) < 1e-5
    assert [(p.first, p.second) for p in report.equalized] == [("0", "3"), ("3", "6")]
    for first, second in (("0", "3"), ("3", "6")):  # converged: both sides of every pair have equal ranges
        torch.testing.assert_close(
            output_channel_ranges(model.get_submodule(first)), input_channel_ranges(model.get_submodule(second)),
            rtol=1e-4, atol=0,
        )
    if isinstance(activation, nn.ReLU6):
        assert isinstance(model[2], ChannelClamp) and isinstance(model[5], ChannelClamp)
        assert len(report.replaced_activations) == 2
        assert not torch.allclose(model[2].upper, torch.full_like(model[2].upper, 6.0))


def test_single_pair_is_equalized_in_one_step() -> None:
    torch.manual_seed(1)
    first, second = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)
    with torch.no_grad():
        first.weight.mul_(torch.logspace(-2, 1, 8).view(8, 1, 1, 1))
    r1, r2 = output_channel_ranges(first), input_channel_ranges(second)
    model = nn.Sequential(first, nn.ReLU(), second)
    report = equalize(model, torch.randn(1, 3, 9, 9))
    expected = torch.sqrt(r1 * r2)  # Nagel et al.: both become sqrt(r1 * r2)
    torch.testing.assert_close(output_channel_ranges(first), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(input_channel_ranges(second), expected, rtol=1e-5, atol=0)
    assert report.iterations <= 2


def test_equalize_reports_pairs_it_cannot_scale() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.act = nn.SiLU()
            self.b = nn.Conv2d(8, 8, 1)
            self.c = nn.Conv2d(8, 8, 1)
            self.d = nn.Conv2d(8, 8, 1)
            self.e = nn.Conv2d(8, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.b(self.act(self.a(x)))
            y = self.c(y) + y  # b's output branches
            return self.e(torch.nn.functional.relu6(self.d(y)))

    model = Net()
    report = equalize(model, torch.randn(1, 3, 4, 4))
    reasons = {(p.first, p.second): p.reason for p in report.not_equalized}
    assert "not positively homogeneous" in reasons[("a", "b")]
    assert "feeds 2 ops" in reasons[("b", "")]
    assert "functional relu6" in reasons[("d", "e")]
    assert not report.equalized


def test_shared_relu6_is_untied_through_folded_bn_slots() -> None:
    class Block(nn.Module):  # one ReLU6 module used twice, as in EfficientNet-Lite's MBConv blocks
        def __init__(self) -> None:
            super().__init__()
            self.expand, self.bn0 = nn.Conv2d(4, 16, 1, bias=False), nn.BatchNorm2d(16)
            self.depthwise, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
            self.project = nn.Conv2d(16, 4, 1)
            self.act = nn.ReLU6()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.act(self.bn0(self.expand(x)))
            return self.project(self.act(self.bn1(self.depthwise(x))))

    model = _randomize_batch_norms(Block())
    x = torch.randn(2, 4, 6, 6) * 2
    with torch.no_grad():
        reference = model(x)
    report = equalize(model, x, absorb_high_bias=False)
    with torch.no_grad():
        assert _relative_error(model(x), reference) < 1e-5
    assert len(report.equalized) == 2 and report.untied
    assert isinstance(model.bn0, ChannelClamp) and isinstance(model.bn1, ChannelClamp)
    assert isinstance(model.act, nn.Identity)


def test_high_bias_absorption_through_relu6_is_exact_and_uses_bn_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 4, 1))
    bn = model[1]
    with torch.no_grad():
        bn.bias.copy_(torch.linspace(1.0, 4.0, 8))  # beta well above 3 * gamma: a large absorbable shift
        bn.weight.fill_(0.2)
        model.train()
        for _ in range(20):  # running statistics of the data the test uses
            model(torch.randn(64, 3, 5, 5))
    model.eval()
    x = torch.randn(16, 3, 5, 5)
    with torch.no_grad():
        reference = model(x)
        pre_activation = model[1](model[0](x))
    report = equalize(model, x)
    assert report.equalized[0].absorbed_bias > 0.3
    below_threshold = (pre_activation < (bn.bias - 3 * bn.weight.abs()).view(1, -1, 1, 1)).float().mean()
    with torch.no_grad():
        assert below_threshold < 0.01
        assert _relative_error(model(x), reference) < 1e-5  # the clamp's both bounds moved: exact
    mean, std = report.layer_output_stats["0"]
    assert (mean <= 3 * std + 1e-6).all()  # everything above 3 sigma has been absorbed
    assert (model[2].lower < 0).any()


def test_equalized_model_quantizes_and_channel_clamp_is_a_clip() -> None:
    model = _chain(nn.ReLU6())
    x = torch.randn(2, 3, 8, 8) * 3
    equalize(model, x)
    assert isinstance(model[2], ChannelClamp) and isinstance(model[5], ChannelClamp)
    sim = QuantSim(model, x)
    assert sim.model.get_submodule("2").onnx_op_type == "Clip"
    sim.compute_encodings(lambda m: m(x))
    layers = (("0", "2"), ("3", "5"))
    for conv, clamp in layers:  # Conv + Clip is a supergroup: the conv's output is not quantized, the clip's is
        assert not sim.model.get_submodule(conv).output_quantizers
        assert list(sim.model.get_submodule(clamp).output_quantizers) == ["0"]

    def clip(y: torch.Tensor, clamp: ChannelClamp) -> torch.Tensor:
        return torch.clamp(y, clamp.lower.view(1, -1, 1, 1), clamp.upper.view(1, -1, 1, 1))

    def qdq(y: torch.Tensor, name: str) -> torch.Tensor:
        quantizer = sim.quantizer(name)
        shape = [-1] + [1] * (y.dim() - 1) if quantizer.axis == 0 else []
        return quantize_dequantize(y, quantizer.scale.view(shape), quantizer.offset.view(shape), quantizer.bitwidth)

    def conv(y: torch.Tensor, name: str, quantized: bool) -> torch.Tensor:
        layer = model.get_submodule(name)
        weight = qdq(layer.weight, f"{name}.param_quantizers.weight") if quantized else layer.weight
        return torch.nn.functional.conv2d(y, weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                                          layer.groups)

    with torch.no_grad():
        # calibration runs the float model: each clip's min-max encoding covers exactly its float output's range
        h = x
        for conv_name, clamp_name in layers:
            h = clip(conv(h, conv_name, False), model.get_submodule(clamp_name))
            expected = Encoding.from_range(h.min(), h.max(), 8, False)
            quantizer = sim.quantizer(f"{clamp_name}.output_quantizers.0")
            assert torch.equal(quantizer.scale, expected.scale) and torch.equal(quantizer.offset, expected.offset)
        # the quantized forward, op by op: input, W8 conv, per-channel clip, A8 output
        h = qdq(x, "model_input_quantizers.0")
        clipped_high = clipped_low = 0
        for conv_name, clamp_name in layers:
            pre = conv(h, conv_name, True)
            clamp = model.get_submodule(clamp_name)
            clipped_high += int((pre > clamp.upper.view(1, -1, 1, 1)).sum())
            clipped_low += int((pre < clamp.lower.view(1, -1, 1, 1)).sum())
            h = qdq(clip(pre, clamp), f"{clamp_name}.output_quantizers.0")
        expected_out = qdq(conv(h, "6", True), "6.output_quantizers.0")
        assert clipped_high > 0 and clipped_low > 0  # both per-channel bounds are in play
        assert torch.equal(sim.model(x), expected_out)


def test_fold_to_scale_on_sim_keeps_frozen_per_channel_weights() -> None:
    torch.manual_seed(0)
    model = _randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU()))
    x = torch.randn(2, 3, 6, 6)
    sim = QuantSim(model, x, config="per_channel")
    sim.compute_encodings(lambda m: m(x))
    sim.freeze_encodings()
    conv = sim.model.get_submodule("0")
    quantized_before = conv.param_quantizers["weight"](conv.weight).detach().clone()
    factor = (model[1].weight / torch.sqrt(model[1].running_var + model[1].eps)).detach()
    pairs = fold_batch_norms_to_scale(sim)
    assert pairs == [("0", "1")] and isinstance(sim.model.get_submodule("1"), nn.Identity)
    quantized_after = conv.param_quantizers["weight"](conv.weight)
    expected = quantized_before * factor.view(-1, 1, 1, 1)
    positive = factor > 0
    torch.testing.assert_close(quantized_after[positive], expected[positive], rtol=1e-5, atol=1e-6)


def test_channel_clamp_exports_to_onnx_and_matches_onnxruntime() -> None:
    import io
    import warnings

    import onnxruntime

    model = nn.Sequential(nn.Conv2d(3, 4, 1), ChannelClamp(torch.zeros(4), torch.tensor([0.5, 1.0, 3.0, 6.0])))
    x = torch.randn(1, 3, 4, 4) * 3
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False)
    session = onnxruntime.InferenceSession(buffer.getvalue())
    (result,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(result), model(x), rtol=1e-6, atol=1e-6)


def test_activation_aware_scaling_does_not_inflate_a_saturated_channel() -> None:
    def saturated_model() -> nn.Sequential:
        torch.manual_seed(0)
        layers = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 4, 1))
        model = _randomize_batch_norms(layers)
        with torch.no_grad():  # channel 0: tiny weights after folding, always saturated at 6
            model[1].weight[0], model[1].bias[0] = 1e-3, 10.0
        return model

    x = torch.randn(4, 3, 5, 5)
    upper_bounds = {}
    for aware in (False, True):
        model = saturated_model()
        with torch.no_grad():
            reference = model(x)
        equalize(model, x, absorb_high_bias=False, activation_aware=aware)
        with torch.no_grad():
            assert _relative_error(model(x), reference) < 1e-5
        upper_bounds[aware] = model[2].upper
    spread = {aware: float(bounds[0] / bounds[1:].median()) for aware, bounds in upper_bounds.items()}
    assert spread[False] > 20  # the paper's scales: 6 / s of the saturated channel explodes
    assert spread[True] < spread[False] / 5, spread
