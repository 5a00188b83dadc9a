"""QuantSim on real architectures, functional ops, supergroups, editing, save/load and bad input."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import edgequant as eq
from edgequant.quantization import CalibrationError
from edgequant.sim import FunctionalOp, QuantizedModule


class ResidualNet(nn.Module):
    """Functional ops everywhere: residual add, F.relu, torch.cat, matmul, softmax, scalar multiply."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(16 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv1(x))
        y = F.relu(self.conv2(y) + y)
        z = torch.cat([y.mean(dim=(2, 3)), y.amax(dim=(2, 3))], dim=1)
        attention = torch.softmax(z[:, :, None] @ z[:, None, :] * 0.5, dim=-1)
        return self.fc((attention @ z[:, :, None]).flatten(1).repeat(1, 4))


def with_data_bn_statistics(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Random-init torchvision models have BN statistics that shrink activations towards zero; set them from
    data (cumulative average) so that the network carries a signal worth quantizing."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(shape))
    return model.eval()


def calibrated(model: nn.Module, dummy: torch.Tensor, **kwargs) -> eq.QuantSim:
    sim = eq.QuantSim(model, dummy, **kwargs)
    torch.manual_seed(0)
    sim.calibrate([torch.randn_like(dummy) for _ in range(2)], progress=False)
    return sim


def relative_error(sim: eq.QuantSim, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = model(x)
        return ((sim.model(x) - expected).norm() / expected.norm()).item()


def test_functional_ops_are_quantized_and_reported():
    torch.manual_seed(0)
    model = ResidualNet().eval()
    x = torch.randn(2, 3, 8, 8)
    sim = calibrated(model, x)
    functional = {name: m for name, m in sim.model.named_modules() if isinstance(m, FunctionalOp)}
    op_types = sorted(m.onnx_op_type for m in functional.values())
    assert {"Add", "Concat", "MatMul", "Mul", "Softmax", "Relu"} <= set(op_types)
    coverage = {entry.tensor: entry for entry in sim.coverage()}
    # the residual add feeds a ReLU: Add+Relu is a supergroup, so only the ReLU output is quantized
    add_name = next(n for n, m in functional.items() if m.onnx_op_type == "Add")
    assert "supergroup Add+Relu" in coverage[add_name].reason
    assert coverage["softmax.output_quantizers.0"].quantized
    assert not any("stays in float" in e.reason for e in coverage.values())
    assert relative_error(sim, model, x) < 0.05


def test_sim_output_is_fake_quantized_on_the_output_grid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)).eval()
    x = torch.randn(4, 3, 8, 8)
    sim = calibrated(model, x)
    encoding = sim.quantizers()["3.output_quantizers.0"].encoding
    with torch.no_grad():
        out = sim.model(x)
    steps = out / encoding.scale
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert "0.output_quantizers.0" not in sim.quantizers()  # Conv+Relu supergroup
    weight_encoding = sim.quantizers()["0.param_quantizers.weight"].encoding
    assert weight_encoding.symmetric and weight_encoding.axis is None
    assert weight_encoding.scale.item() == pytest.approx(model[0].weight.abs().max().item() / 127)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_torchvision_architectures(arch):
    torch.manual_seed(0)
    model = with_data_bn_statistics(getattr(torchvision.models, arch)(num_classes=10), (8, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    # 16-bit everywhere checks the structure: random-init deep nets amplify 8-bit noise chaotically
    sim = eq.QuantSim(model, x, config="per_channel", param_bw=16, output_bw=16)
    sim.calibrate([x], progress=False)
    convs = [m for m in sim.quantized_modules().values() if isinstance(m, nn.Conv2d)]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert all(m.param_quantizers["weight"].axis == 0 for m in convs)
    assert not any("stays in float" in e.reason for e in sim.coverage())
    assert relative_error(sim, model, x) < 0.02
    out = sim.model(x)
    out.sum().backward()  # backward works (QAT)
    assert convs[0].weight.grad is not None and torch.isfinite(convs[0].weight.grad).all()


def test_bert_from_small_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    config._attn_implementation = "eager"  # explicit matmul/softmax (sdpa is one fused op)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    sim = eq.QuantSim(model, inputs, config="htp")
    batches = [{"input_ids": torch.randint(0, 100, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
               for _ in range(2)]
    sim.calibrate(batches, progress=False)
    quantizers = sim.quantizers()
    assert quantizers["encoder.layer.0.output.LayerNorm.output_quantizers.0"].bitwidth == 16  # htp preset
    assert quantizers["encoder.layer.0.attention.self.query.param_quantizers.weight"].axis == 0
    residual_adds = [n for n, m in sim.model.named_modules() if isinstance(m, FunctionalOp) and m.onnx_op_type == "Add"]
    assert any(name.startswith("encoder.layer.0.output.") for name in residual_adds)
    # BertSelfAttention cannot be traced by fx (shape tuples): its own ops are intercepted at run time instead
    attention_ops = {n.rsplit(".", 2)[0] for n in quantizers if ".attention.self." in n and "output_quantizers" in n}
    assert {"encoder.layer.0.attention.self.matmul", "encoder.layer.0.attention.self.matmul_1",
            "encoder.layer.0.attention.self.softmax"} <= attention_ops
    assert "stays in float" not in sim.coverage_summary()
    with torch.no_grad():
        quantized = sim.model(**inputs).last_hidden_state
        reference = model(**inputs).last_hidden_state
    assert F.cosine_similarity(quantized.flatten(1), reference.flatten(1)).min() > 0.98


def test_user_model_is_not_modified_unless_in_place():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sim = eq.QuantSim(model, torch.randn(2, 4))
    assert type(model[0]) is nn.Linear and not isinstance(model[0], QuantizedModule)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    in_place = eq.QuantSim(model, torch.randn(2, 4), in_place=True)
    assert in_place.model is model and isinstance(model.get_submodule("0"), QuantizedModule)
    assert sim.model is not model


def test_enable_disable_by_name_and_type():
    torch.manual_seed(0)
    model = ResidualNet().eval()
    x = torch.randn(2, 3, 8, 8)
    sim = calibrated(model, x)
    assert sim.set_enabled(False) == len(sim.quantizers())
    with torch.no_grad():
        assert torch.equal(sim.model(x), model(x))  # all off: exactly the float model
    sim.set_enabled(True, pattern="conv*", kinds=("param",))
    enabled = sorted(n for n, q in sim.quantizers().items() if q.enabled)
    assert enabled == ["conv1.param_quantizers.weight", "conv2.param_quantizers.weight"]
    sim.set_enabled(True, module_types=(nn.Linear,))
    assert sim.quantizers()["fc.output_quantizers.0"].enabled


def test_save_load_gives_bit_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = with_data_bn_statistics(torchvision.models.mobilenet_v2(num_classes=10), (8, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    sim = calibrated(model, x, quant_scheme="sqnr", config="per_channel")
    sim.set_enabled(False, pattern="features.1*")
    sim.save(tmp_path / "sim.pt")
    fresh = eq.QuantSim(model, x, quant_scheme="sqnr", config="per_channel")
    fresh.load(tmp_path / "sim.pt")
    with torch.no_grad():
        assert torch.equal(fresh.model(x), sim.model(x))
    assert not fresh.quantizers()["features.1.conv.0.0.param_quantizers.weight"].enabled


def test_load_from_another_model_is_a_clear_error(tmp_path):
    sim = calibrated(nn.Sequential(nn.Linear(4, 4)), torch.randn(2, 4))
    sim.save(tmp_path / "sim.pt")
    other = eq.QuantSim(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(2, 4))
    with pytest.raises(ValueError, match="different model"):
        other.load(tmp_path / "sim.pt")


def test_frozen_encodings_survive_recalibration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    sim = calibrated(model, torch.randn(2, 4))
    fixed = eq.Encoding.from_range(-1.0, 1.0, 8, False)
    sim.set_encoding("1.output_quantizers.0", fixed)
    sim.calibrate([torch.randn(8, 4) * 10], progress=False)
    assert sim.quantizers()["1.output_quantizers.0"].encoding.equals(fixed)


def test_custom_module_registration():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.full((4,), 1.7))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gain

    model = nn.Sequential(nn.Linear(4, 4), Scale())
    before = eq.QuantSim(model, torch.randn(2, 4))
    assert "1.param_quantizers.gain" not in before.quantizers()
    eq.register_module(Scale, "Mul")
    sim = calibrated(model, torch.randn(2, 4))
    assert "1.param_quantizers.gain" in sim.quantizers()
    assert "1.output_quantizers.0" in sim.quantizers()


def test_sixteen_bit_and_four_bit_settings():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    w4a16 = calibrated(model, x, param_bw=4, output_bw=16)
    w8a8 = calibrated(model, x)
    assert w4a16.quantizers()["0.param_quantizers.weight"].bitwidth == 4
    assert w4a16.quantizers()["1.output_quantizers.0"].bitwidth == 16
    assert relative_error(w4a16, model, x) > relative_error(w8a8, model, x)


# -- bad input ---------------------------------------------------------------------------------------------
def test_wrong_dummy_input_is_explained():
    with pytest.raises(ValueError, match="does not run on dummy_input"):
        eq.QuantSim(nn.Linear(4, 2), torch.randn(2, 5))


def test_empty_calibration_data():
    sim = eq.QuantSim(nn.Sequential(nn.Linear(4, 2)), torch.randn(2, 4))
    with pytest.raises(CalibrationError, match="no batch"):
        sim.calibrate([], progress=False)


def test_nan_calibration_input_names_the_batch():
    sim = eq.QuantSim(nn.Sequential(nn.Linear(4, 2)), torch.randn(2, 4))
    bad = torch.randn(2, 4)
    bad[0, 1] = float("nan")
    with pytest.raises(CalibrationError, match="batch 1 contains NaN"):
        sim.calibrate([torch.randn(2, 4), bad], progress=False)


def test_calibration_batch_of_the_wrong_shape_is_named():
    sim = eq.QuantSim(nn.Sequential(nn.Linear(4, 2)), torch.randn(2, 4))
    with pytest.raises(CalibrationError, match="batch 1 does not run through the model"):
        sim.calibrate([torch.randn(2, 4), torch.randn(2, 5)], progress=False)


def test_all_zero_weights_get_a_valid_encoding():
    model = nn.Sequential(nn.Linear(4, 2))
    nn.init.zeros_(model[0].weight)
    sim = calibrated(model, torch.randn(2, 4))
    encoding = sim.quantizers()["0.param_quantizers.weight"].encoding
    assert encoding.scale.item() > 0 and torch.isfinite(encoding.scale).all()
    with torch.no_grad():
        assert torch.isfinite(sim.model(torch.randn(3, 4))).all()


@pytest.mark.parametrize(("config", "row"), [
    ("default", [float("nan"), 1.0, 2.0, 3.0]),  # per tensor: one NaN among data
    ("per_channel", [float("nan")] * 4),  # a channel with no finite value
])
def test_nan_weights_are_named(config: str, row: list[float]) -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    sim = eq.QuantSim(model, torch.randn(2, 4), config=config)
    with torch.no_grad():
        sim.model.get_submodule("0").weight[0] = torch.tensor(row)
    with pytest.raises(CalibrationError, match="'0.weight' contains NaN/inf"):
        sim.calibrate([torch.randn(2, 4)], progress=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="quant_scheme"):
        eq.QuantSim(nn.Linear(2, 2), torch.randn(1, 2), quant_scheme="fancy")
    with pytest.raises(ValueError, match="param_bw"):
        eq.QuantSim(nn.Linear(2, 2), torch.randn(1, 2), param_bw=1)
    with pytest.raises(eq.ConfigError, match="missing.json"):
        eq.QuantSim(nn.Linear(2, 2), torch.randn(1, 2), config="missing.json")


class DataDependent(nn.Module):
    """fx cannot trace ``if x.sum() > 0``: its own ops are intercepted at run time instead."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if x.sum() > 0:
            return torch.sigmoid(y) * 2.0
        return torch.tanh(y)


def test_untraceable_module_ops_are_intercepted_and_quantized():
    torch.manual_seed(0)
    model = nn.Sequential(DataDependent(), nn.Linear(4, 2))
    positive = torch.rand(8, 4) + 0.1
    sim = eq.QuantSim(model, positive)
    sim.calibrate([positive], progress=False)
    quantizers = sim.quantizers()
    assert {"0.sigmoid.output_quantizers.0", "0.mul.output_quantizers.0"} <= set(quantizers)
    assert "stays in float" not in sim.coverage_summary()
    encoding = quantizers["0.mul.output_quantizers.0"].encoding
    with torch.no_grad():
        inner = sim.model.get_submodule("0")(positive)
    steps = inner / encoding.scale
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # the intercepted multiply is on its grid
    with pytest.warns(UserWarning, match="not the recorded"), torch.no_grad():
        sim.model(-positive)  # the other branch: its ops run in float, and we say so


def test_torch_export_graph_gets_its_layers_back():
    from edgequant.demo.digits import load_digits_tensors, load_pretrained

    images, labels = load_digits_tensors("test")
    model = load_pretrained("digits_cnn")
    batch = torch.export.Dim("batch")
    exported = torch.export.export(model, (images[:2],), dynamic_shapes={"x": {0: batch}}).module()
    sim = eq.QuantSim(exported, images[:2])
    eager = eq.QuantSim(model, images[:2])
    for each in (sim, eager):
        each.calibrate(images[:256].split(64), progress=False)
    # aten.conv2d / aten.linear calls on parameters become layers again, with the eager model's names
    assert {"conv1.0.param_quantizers.weight", "fc.param_quantizers.weight"} <= set(sim.quantizers())
    assert "stays in float" not in sim.coverage_summary()
    with torch.no_grad():
        agreement = (sim.model(images).argmax(1) == eager.model(images).argmax(1)).float().mean()
    assert agreement > 0.97


def test_zero_padding_is_reported_as_folded_by_the_runtime_and_other_padding_as_a_gap():
    """TF-style explicit "same" padding (nn.ZeroPad2d before a Conv) is no gap: ORT folds it into the Conv's pads.
    A pad of another value computes something the convolution cannot, and stays a gap."""
    model = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(),
                          nn.ConstantPad2d(1, 0.5), nn.Conv2d(4, 4, 3)).eval()
    sim = eq.QuantSim(model, torch.randn(1, 3, 9, 9))
    categories = {entry.tensor: (entry.category, entry.reason) for entry in sim.coverage()}
    assert categories["0"] == ("by design", "zero padding: the runtime folds it into the next convolution's padding")
    assert categories["3"][0] == "left in float"
