"""The same workflows on a GPU: results there must match the CPU's.

Without CUDA the whole module skips (comparing the CPU with itself would test nothing); where a GPU is
available, benchmarks/run_on_gpu.sh runs it.
"""

import pytest
import torch
from references import assert_within_grid_steps
from torch import nn

import edgequant as eq
from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.ptq.adaround import adaround
from edgequant.quantization import MseAnalyzer, PercentileAnalyzer, PerChannel, SqnrAnalyzer

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: compares the GPU with the CPU (run benchmarks/run_on_gpu.sh)"
)
DEVICES = ["cuda"]


def digits_sim(device: str, **kwargs) -> tuple[eq.QuantSim, torch.Tensor]:
    images, _ = load_digits_tensors("train")
    model = load_pretrained("digits_cnn").to(device)
    sim = eq.QuantSim(model, images[:2].to(device), **kwargs)
    sim.calibrate([images[i : i + 64].to(device) for i in range(0, 256, 64)], progress=False)
    return sim, images[:64]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["minmax", "sqnr", "percentile", "mse"])
def test_calibration_matches_cpu(device, scheme):
    cpu_sim, images = digits_sim("cpu", quant_scheme=scheme, config="per_channel")
    sim, _ = digits_sim(device, quant_scheme=scheme, config="per_channel")
    for name, quantizer in sim.quantizers().items():
        reference = cpu_sim.quantizers()[name].encoding
        assert quantizer.scale.device.type == device
        assert torch.allclose(quantizer.encoding.scale.cpu(), reference.scale, rtol=1e-3), name
    with torch.no_grad():
        out = sim.model(images.to(device)).cpu()
        expected = cpu_sim.model(images)
    step = cpu_sim.quantizers()["fc.output_quantizers.0"].encoding.scale
    assert ((out - expected).abs() <= step * 1.01).float().mean() > 0.98


@pytest.mark.parametrize("device", DEVICES)
def test_analyzers_on_device(device):
    torch.manual_seed(0)
    values = torch.randn(8, 4096) * torch.arange(1, 9)[:, None]
    for analyzer_type in (SqnrAnalyzer, PercentileAnalyzer, MseAnalyzer):
        on_cpu, on_device = analyzer_type(granularity=PerChannel(0)), analyzer_type(granularity=PerChannel(0))
        on_cpu.observe(values)
        on_device.observe(values.to(device))
        low, high = on_device.compute_range(8, symmetric=False)
        expected_low, expected_high = on_cpu.compute_range(8, symmetric=False)
        assert low.device.type == device
        assert torch.allclose(low.cpu(), expected_low, rtol=1e-3, atol=1e-4)
        assert torch.allclose(high.cpu(), expected_high, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_range_learning_trains_on_device(device):
    sim, images = digits_sim(device)
    for quantizer in sim.quantizers().values():
        quantizer.enable_range_learning()
    scales = [q.scale for q in sim.quantizers().values()]
    optimizer = torch.optim.SGD(scales, lr=1e-4)
    loss = sim.model(images.to(device)).square().mean()
    loss.backward()
    optimizer.step()
    assert all(s.grad is not None and s.grad.device.type == device for s in scales)


@pytest.mark.parametrize("device", DEVICES)
def test_adaround_on_device(device):
    images, _ = load_digits_tensors("train")
    model = load_pretrained("digits_cnn").to(device)
    sim = eq.QuantSim(model, images[:2].to(device), param_bw=4, config="per_channel")
    batches = [images[i : i + 32].to(device) for i in range(0, 64, 32)]
    sim.calibrate(batches, progress=False)
    adaround(sim, batches, num_iterations=20, progress=False)
    layer = sim.quantized_modules()["fc"]
    encoding = layer.param_quantizers["weight"].encoding
    steps = layer.weight / encoding.scale.view(-1, 1)
    assert layer.weight.device.type == device
    assert torch.allclose(steps, steps.round(), atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_save_on_gpu_load_on_cpu(device, tmp_path):
    sim, images = digits_sim(device)
    sim.save(tmp_path / "sim.pt")
    fresh = eq.QuantSim(load_pretrained("digits_cnn"), images[:2])
    fresh.load(tmp_path / "sim.pt")
    for name, quantizer in fresh.quantizers().items():  # the saved state itself comes back bit for bit
        saved = sim.quantizers()[name]
        assert torch.equal(quantizer.scale, saved.scale.cpu()) and torch.equal(quantizer.offset, saved.offset.cpu())
    with torch.no_grad():
        on_cpu, on_device = fresh.model(images), sim.model(images.to(device)).cpu()
    # the same sim, but the GPU's float convolutions sum in another order than the CPU's: an output within rounding
    # error of a grid midpoint may land one step apart
    assert_within_grid_steps(on_cpu, on_device, fresh.quantizer("fc.output_quantizers.0").scale, max_steps=1,
                             max_share=0.02)


def test_sim_follows_model_to(tmp_path):
    sim, images = digits_sim("cpu")
    with torch.no_grad():
        on_cpu = sim.model(images)
    target = DEVICES[-1]
    sim.model.to(target)
    assert all(q.scale.device.type == target for q in sim.quantizers().values())
    with torch.no_grad():
        moved = sim.model(images.to(target)).cpu()
    step = sim.quantizers()["fc.output_quantizers.0"].encoding.scale.cpu()
    assert ((moved - on_cpu).abs() <= step * 1.01).float().mean() > 0.98  # float op order may flip a rounding
    assert isinstance(sim.model, nn.Module)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_cuda_quantize_dequantize_is_bit_identical_to_the_cpu():
    from edgequant.quantization import Encoding, fused_cuda, quantize_dequantize

    torch.manual_seed(0)
    encoding = Encoding.from_range(-3.0, 5.0, 8, symmetric=False)
    ties = (torch.arange(-300, 300).float() + 0.5) * encoding.scale
    x = torch.cat([torch.randn(1_000_000) * 3, ties, torch.tensor([1e6, -1e6])])
    expected = quantize_dequantize(x, encoding.scale, encoding.offset, 8)
    on_gpu = x.cuda()
    assert fused_cuda.can_fuse(on_gpu, encoding.scale.cuda())
    result = quantize_dequantize(on_gpu, encoding.scale.cuda(), encoding.offset.cuda(), 8)
    assert torch.equal(result.cpu(), expected)
    in_place = on_gpu.clone()
    quantize_dequantize(in_place, encoding.scale.cuda(), encoding.offset.cuda(), 8, inplace=True)
    assert torch.equal(in_place.cpu(), expected)
