"""Frozen weights (`QuantSim.freeze_weights`): evaluation quantizes no weight per forward, gives the eager sim's
outputs bit for bit, and no path that writes weights or encodings can make the folded values stale."""

import copy

import pytest
import torch
from torch import nn

import edgequant as eq
from edgequant.demo.digits import load_digits_tensors, load_pretrained
from edgequant.ptq import adaround, correct_bias, fold_batch_norms_to_scale
from edgequant.quantization import Encoding
from edgequant.quantization.sealing import SealedTensorError
from edgequant.sim.quantized_module import FrozenWeightsError


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_digits_tensors("test")


def make_sim(images: torch.Tensor, config: str = "default") -> eq.QuantSim:
    sim = eq.QuantSim(load_pretrained("digits_cnn").eval(), images[:1], config=config)
    sim.calibrate([images[:64]], progress=False)
    return sim


def run(sim: eq.QuantSim, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sim.model(images)


def first_conv(sim: eq.QuantSim) -> nn.Module:
    return sim.layer_of(next(iter(sim.quantizers(role="param").values())))


def test_frozen_is_bit_identical_and_quantizes_no_weight_per_forward(digits):
    images, _ = digits
    for config in ("default", "per_channel"):
        sim = make_sim(images, config)
        expected = run(sim, images)
        calls = []
        for quantizer in sim.quantizers(role="param").values():
            quantizer.register_forward_hook(lambda q, *_, calls=calls: calls.append(q.name))
        sim.freeze_weights()
        assert sim.weights_frozen
        assert len(calls) == len(sim.quantizers(role="param"))  # each weight quantized once, here
        calls.clear()
        outputs = [run(sim, images) for _ in range(3)]
        assert calls == []
        for output in outputs:
            assert torch.equal(output, expected)
        sim.unfreeze_weights()
        assert not sim.weights_frozen
        assert torch.equal(run(sim, images), expected)
        assert len(calls) == len(sim.quantizers(role="param"))


def test_weight_and_encoding_are_sealed_through_the_model(digits):
    images, _ = digits
    sim = make_sim(images)
    conv = first_conv(sim)
    quantizer = conv.param_quantizers["weight"]
    with sim.frozen_weights():
        for access in (lambda: conv.weight, lambda: conv.weight.data.mul_(2), lambda: getattr(conv, "weight", None),
                       lambda: hasattr(conv, "weight"), lambda: quantizer.scale, lambda: quantizer.encoding,
                       lambda: quantizer.set_encoding(quantizer.encoding)):
            with pytest.raises(SealedTensorError, match=r"sim.unfreeze_weights\(\)"):
                access()
    assert conv.weight.shape[0] == 16 and quantizer.scale is not None  # back after the block


def test_writes_through_references_taken_before_freezing_cannot_change_the_sealed_values(digits):
    images, _ = digits
    sim = make_sim(images)
    expected = run(sim, images)
    conv = first_conv(sim)
    weight, scale = conv.weight, conv.param_quantizers["weight"].scale
    saved_weight, saved_scale = weight.detach().clone(), scale.detach().clone()
    sim.freeze_weights()
    weight.data.mul_(2)  # no version-counter bump: a cache keyed on versions would go stale here
    scale.data.mul_(3)
    assert torch.equal(run(sim, images), expected)
    sim.unfreeze_weights()
    assert torch.equal(weight, saved_weight) and torch.equal(scale, saved_scale)
    assert conv.weight is weight  # optimizers keep training the same objects
    assert torch.equal(run(sim, images), expected)


def test_an_optimizer_step_while_frozen_fails_loudly(digits):
    images, labels = digits
    sim = make_sim(images)
    optimizer = torch.optim.SGD(sim.model.parameters(), lr=0.1)
    nn.functional.cross_entropy(sim.model(images[:8]), labels[:8]).backward()
    sim.freeze_weights()
    with pytest.raises(RuntimeError):
        optimizer.step()  # the sealed weights hold no elements: the update cannot apply to them
    with pytest.raises(FrozenWeightsError, match=r"torch.no_grad\(\)"):
        sim.model(images[:8])  # a forward that records gradients would not train the folded weights


def test_writes_after_unfreezing_are_quantized_again(digits):
    images, _ = digits
    sim, reference = make_sim(images), make_sim(images)
    sim.freeze_weights()
    sim.unfreeze_weights()
    for model in (sim.model, reference.model):
        first_conv_weight = next(q for q in model.modules() if isinstance(q, nn.Conv2d)).weight
        first_conv_weight.data.mul_(0.5)
    assert torch.equal(run(sim, images), run(reference, images))
    with sim.frozen_weights():
        assert torch.equal(run(sim, images), run(reference, images))


def test_load_state_dict_and_sim_load_while_frozen_fold_the_loaded_values(digits, tmp_path):
    images, _ = digits
    sim, other = make_sim(images), make_sim(images)
    with torch.no_grad():
        for param in other.model.parameters():
            param.mul_(0.9)
    other.compute_param_encodings()
    expected_other, float_state = run(other, images), copy.deepcopy(sim.model.state_dict())
    sim.freeze_weights()
    saved = sim.model.state_dict()  # float weights and encodings, not the folded values
    assert saved.keys() == float_state.keys()
    assert all(torch.equal(saved[k], float_state[k]) for k in saved)
    sim.model.load_state_dict(other.model.state_dict())
    assert sim.weights_frozen
    assert torch.equal(run(sim, images), expected_other)
    with pytest.raises(SealedTensorError):
        first_conv(sim).weight  # noqa: B018 - folded again at that forward
    sim.save(tmp_path / "frozen.pt")
    sim.load(tmp_path / "frozen.pt")
    assert torch.equal(run(sim, images), expected_other)
    sim.unfreeze_weights()
    assert torch.equal(run(sim, images), expected_other)


def test_sim_methods_that_write_encodings_refold(digits):
    images, _ = digits
    sim, reference = make_sim(images), make_sim(images)
    name = next(iter(sim.quantizers(role="param")))
    old = reference.quantizer(name).encoding
    encoding = Encoding(old.scale * 2, old.offset, old.bitwidth, old.symmetric, old.axis)
    reference.set_encoding(name, encoding)
    sim.freeze_weights()
    sim.set_encoding(name, encoding)
    assert sim.weights_frozen
    assert torch.equal(run(sim, images), run(reference, images))
    for s in (sim, reference):
        s.calibrate([images[64:128]], progress=False)
    assert sim.weights_frozen
    assert torch.equal(run(sim, images), run(reference, images))
    for s in (sim, reference):
        s.quantizer(name).bitwidth = 4  # a grid change without a new encoding
    assert torch.equal(run(sim, images), run(reference, images))


def test_disabled_quantizers_and_device_moves_while_frozen(digits):
    images, _ = digits
    sim = make_sim(images)
    with torch.no_grad():
        float_output = load_pretrained("digits_cnn").eval()(images)
    with sim.frozen_weights():
        with sim.quantizers_enabled(False):
            assert torch.equal(run(sim, images), float_output)
        sim.model.double()
        expected = make_sim(images)
        expected.model.double()
        assert torch.equal(run(sim, images.double()), run(expected, images.double()))


def test_ptq_techniques_refuse_frozen_weights_and_export_unfreezes_around_itself(digits, tmp_path):
    images, _ = digits
    sim = make_sim(images)
    sim.freeze_weights()
    with pytest.raises(SealedTensorError, match=r"sim.unfreeze_weights\(\)"):
        adaround(sim, [images[:32]], num_iterations=2, progress=False)
    with pytest.raises(SealedTensorError):
        fold_batch_norms_to_scale(sim)
    with pytest.raises(SealedTensorError):
        correct_bias(sim, [images[:32]], progress=False)
    assert sim.weights_frozen
    expected = run(sim, images)
    frozen_files = sim.export(tmp_path / "frozen", images[:1])
    assert sim.weights_frozen
    assert torch.equal(run(sim, images), expected)
    sim.unfreeze_weights()
    live_files = sim.export(tmp_path / "live", images[:1])
    assert frozen_files.encodings.read_text() == live_files.encodings.read_text()
    assert frozen_files.float_model.read_bytes() == live_files.float_model.read_bytes()
    result = adaround(sim, [images[:32]], num_iterations=2, progress=False)  # works once unfrozen
    assert result is not None


def test_frozen_weights_with_a_weight_two_layers_share() -> None:
    """A tied embedding and output layer: each layer folds the shared float weight on its own grid, and unfreezing
    gives the shared tensor its values back whichever layer unseals first."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embedding.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embedding(ids))

    torch.manual_seed(0)
    ids = torch.arange(10)[None]
    sim = eq.QuantSim(Tied(), ids, param_bw=4, config="per_channel")
    sim.calibrate([ids], progress=False)
    with torch.no_grad():
        live = sim.model(ids)
        weight = sim.model.embedding.weight.detach().clone()
        with sim.frozen_weights():
            frozen = sim.model(ids)
    assert torch.equal(frozen, live)
    assert sim.model.head.weight is sim.model.embedding.weight and torch.equal(sim.model.embedding.weight, weight)
