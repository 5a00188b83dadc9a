"""`torch.compile(sim.model)` as users write it: one graph (no break per quantizer) in evaluation and training,
outputs bit-identical to the eager sim in evaluation (IEEE division, round half to even; on CUDA through
`sim.compile()`, whose Inductor option is its module's own), gradients equal to eager within float tolerance in
both QAT modes. CUDA cases run where CUDA is available."""

import contextlib
import copy

import pytest
import torch
import torchvision
from torch import nn

import edgequant as eq
from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.quantization import Encoding, Quantizer
from edgequant.sim.compile_numerics import compile_with_eager_division

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class GraphCounter:
    """A torch.compile backend that runs the captured graphs eagerly and counts them."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(graph)
        return graph.forward


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns (so that -0.0 and 0.0, or two NaNs, are compared exactly)."""
    return tensor.detach().float().contiguous().view(torch.int32)


def digits_sim(device: str = "cpu", config: str = "default") -> tuple[eq.QuantSim, torch.Tensor, torch.Tensor]:
    images, labels = load_digits_tensors("test")
    sim = eq.QuantSim(load_pretrained("digits_cnn").eval().to(device), images[:1].to(device), config=config)
    sim.calibrate([images[:64].to(device)], progress=False)
    return sim, images.to(device), labels.to(device)


def enable_range_learning(sim: eq.QuantSim) -> None:
    for quantizer in sim.quantizers().values():
        quantizer.enable_range_learning()


def gradients(model: nn.Module, step: object, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(step(images), labels).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["eval", "frozen", "train", "train_range_learning"])
def test_digits_compiles_to_one_graph(mode):
    sim, images, labels = digits_sim()
    counter = GraphCounter()
    compiled = torch.compile(sim.model, backend=counter)
    if mode == "train_range_learning":
        enable_range_learning(sim)
    if mode.startswith("train"):
        sim.model.train()
        nn.functional.cross_entropy(compiled(images[:32]), labels[:32]).backward()
        assert sum(p.grad is not None for p in sim.model.parameters()) > 0
    else:
        with torch.no_grad(), (sim.frozen_weights() if mode == "frozen" else contextlib.nullcontext()):
            compiled(images[:32])
        roundings = [n for n in counter.graphs[0].graph.nodes if n.target is torch.round]
        folded = len(sim.quantizers(role="param")) if mode == "frozen" else 0
        assert len(roundings) == len(sim.quantizers()) - folded  # every quantizer in the graph, frozen weights not
    assert len(counter.graphs) == 1


@pytest.mark.parametrize("training", [False, True])
def test_resnet18_compiles_to_one_graph(training):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    sim = eq.QuantSim(model, x)
    sim.calibrate([x], progress=False)
    counter = GraphCounter()
    compiled = torch.compile(sim.model, backend=counter)
    if training:
        enable_range_learning(sim)
        sim.model.train()
        compiled(x).sum().backward()
    else:
        with torch.no_grad():
            compiled(x)
    assert len(counter.graphs) == 1


def tie_sensitive_values(scale: float, device: str) -> torch.Tensor:
    """Exact half-way points of the grid and their float neighbours: x / scale and x * (1 / scale) round to
    different integers for many of them, so only a true division reproduces the eager grid."""
    halves = (torch.arange(-128, 128) + 0.5) * torch.tensor(scale)
    values = torch.cat([halves, halves.nextafter(torch.tensor(float("inf"))),
                        halves.nextafter(torch.tensor(float("-inf"))), torch.randn(4096) * 2])
    return values.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", [None, 0])
def test_compiled_quantizer_keeps_ieee_division_and_half_even_rounding(device, axis):
    scale_value = 0.0123
    values = tie_sensitive_values(scale_value, device)
    quantizer = Quantizer(8, symmetric=True, granularity=axis, role="output").to(device)
    if axis is None:
        x = values
        scale = torch.tensor(scale_value, device=device)
    else:
        x = values.reshape(4, -1)
        scale = torch.full((4,), scale_value, device=device) * torch.tensor([1.0, 0.5, 0.25, 2.0], device=device)
        x = x * (scale / scale_value)[:, None]
    quantizer.set_encoding(Encoding(scale, torch.full_like(scale, -128.0), 8, True, axis))
    shaped_scale = scale if axis is None else scale[:, None]
    reciprocal = torch.clamp(torch.round(x * (1 / shaped_scale)), -128, 127) * shaped_scale
    with torch.no_grad():
        eager = quantizer(x.clone())
        compiled = compile_with_eager_division(quantizer)(x.clone())
    assert not torch.equal(bits(reciprocal), bits(eager))  # the data can tell the two divisions apart
    assert torch.equal(bits(compiled), bits(eager))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_digits_sim_is_bit_identical_in_evaluation(device):
    sim, images, _ = digits_sim(device, config="per_channel")
    compiled = sim.compile()
    with torch.no_grad():
        eager = sim.model(images)
        assert torch.equal(bits(compiled(images)), bits(eager))
        with sim.frozen_weights():
            assert torch.equal(bits(compiled(images)), bits(eager))
            assert torch.equal(bits(sim.model(images)), bits(eager))


@pytest.mark.parametrize("range_learning", [False, True])
def test_compiled_training_gradients_match_eager(range_learning):
    """BatchNorm in evaluation mode, so that the compiled forward is the eager one up to the reduction order of
    the ops Inductor decomposes (BN statistics in train mode, pooling in the training graph). A last-bit
    difference can move a value across a rounding boundary; a weight gradient barely notices, but an LSQ scale
    gradient is a sum with heavy cancellation (rounding errors of both signs), where one moved value changes a
    few percent: encodings get a tolerance of 10 % of their largest gradient, weights float tolerance."""
    sim, images, labels = digits_sim()
    if range_learning:
        enable_range_learning(sim)
    compiled = torch.compile(sim.model)
    batch, targets = images[:64], labels[:64]
    eager = gradients(sim.model, sim.model, batch, targets)
    compiled_grads = gradients(sim.model, compiled, batch, targets)
    assert eager.keys() == compiled_grads.keys()
    encodings = [name for name in eager if name.endswith((".scale", ".offset"))]
    assert bool(encodings) == range_learning
    for name, grad in eager.items():
        largest = grad.abs().max().item()
        difference = (compiled_grads[name] - grad).abs().max().item()
        if name in encodings:
            assert difference <= 0.1 * largest + 1e-7, (name, difference, largest)
        else:
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-4 * largest)


def test_sim_leaves_inductor_config_alone_and_compiles_with_its_own_option(monkeypatch):
    import torch._inductor.config as inductor_config

    before = inductor_config.get_config_copy()
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)  # where a sim would need the option
        sim, images, _ = digits_sim()
    compiled = sim.compile()
    tuned = sim.compile(mode="max-autotune-no-cudagraphs", options={"debug": False})
    plain = torch.compile(sim.model)
    assert inductor_config.get_config_copy() == before  # nothing process-wide, at construction or compile()
    assert compiled.get_compiler_config()["eager_numerics.division_rounding"] is True
    assert tuned.get_compiler_config()["eager_numerics.division_rounding"] is True
    assert tuned.get_compiler_config()["max_autotune"] is True  # the mode's options are kept
    assert plain.get_compiler_config()["eager_numerics.division_rounding"] is before[
        "eager_numerics.division_rounding"]
    counter = GraphCounter()  # another backend gets no Inductor options, and still one graph
    with torch.no_grad():
        assert torch.equal(sim.compile(backend=counter)(images[:8]), sim.model(images[:8]))
    assert len(counter.graphs) == 1


def test_copied_sim_model_still_quantizes_its_inputs():
    sim, images, _ = digits_sim()
    copied = copy.deepcopy(sim.model)  # a deepcopy of an fx GraphModule drops forward pre-hooks
    with torch.no_grad():
        assert torch.equal(copied(images), sim.model(images))
        with sim.quantizers_enabled(False, sim.quantizers(role="model_input").values()):
            assert not torch.equal(sim.model(images), copied(images))


class DataDependentRoot(nn.Module):
    """fx cannot trace this root (a branch on a tensor value), so its inputs are quantized by a subclass."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            y = y * 2
        return self.fc(y.mean((2, 3)))


def test_untraced_root_quantizes_its_inputs_in_its_forward():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    sim = eq.QuantSim(DataDependentRoot().eval(), x)
    sim.calibrate([x], progress=False)
    quantizer = sim.quantizer("model_input_quantizers.0")
    seen = []
    quantizer.register_forward_hook(lambda _module, inputs, output: seen.append((inputs[0], output)))
    with torch.no_grad():
        output = sim.model(x)
        assert torch.equal(copy.deepcopy(sim.model)(x), output)
    assert len(seen) == 2 and torch.equal(seen[0][0], x) and not torch.equal(seen[0][1], x)
    assert not sim.model._forward_pre_hooks  # noqa: SLF001 - no hook: the forward does it
