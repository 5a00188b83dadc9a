"""prepare_qat: which tensors train, weight encodings following the weights, valid learned grids whatever the
optimizer does, and BatchNorm handling with an export free of BatchNormalization."""

import math

import onnx
import pytest
import torch
from torch import nn
from torch.optim import optimizer as torch_optimizer

from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors, load_pretrained
from edgequant.qat import finalize, prepare_qat, qat_setup
from edgequant.sim import QuantSim


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensors("train"), load_digits_tensors("test")


def _sim(digits, calibrate=True):
    (images, _), _ = digits
    sim = QuantSim(load_pretrained("digits_cnn"), images[:1], param_bw=4, output_bw=4, config="per_channel")
    if calibrate:
        sim.calibrate(list(images[:256].split(64)), progress=False)
    return sim


def _step(sim, images, labels, optimizer):
    sim.model.train()
    loss = torch.nn.functional.cross_entropy(sim.model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_regular_qat_trains_weights_keeps_activations_and_recomputes_weight_encodings(digits):
    (images, labels), _ = digits
    sim = _sim(digits)
    setup = prepare_qat(sim, "regular")
    assert setup.mode == "regular" and not setup.learned
    assert set(setup.trainable_parameters()) == {n for n, _ in sim.model.named_parameters()}
    assert all(q.role == "param" for q in setup.recomputed.values()) and len(setup.recomputed) == 4
    activations = {n: q.encoding for n, q in sim.quantizers(role=("model_input", "output")).items()}
    optimizer = torch.optim.SGD([p for p in sim.model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        _step(sim, images[:64], labels[:64], optimizer)
    sim.model(images[:2])  # the forward after the last step brings the weight encodings up to date
    for name, quantizer in setup.recomputed.items():
        weight = getattr(sim.layer_of(quantizer), quantizer.key).detach()
        abs_max = weight.abs().flatten(1).amax(dim=1)  # per-channel symmetric 4-bit: scale = |w|max / 7
        torch.testing.assert_close(quantizer.scale, abs_max / 7, rtol=1e-6, atol=0), name
    for name, encoding in activations.items():
        assert sim.quantizer(name).encoding.equals(encoding), name
    assert setup.sync_weight_encodings() == 0  # unchanged weights: nothing recomputed on evaluation forwards


def test_range_learning_makes_scales_and_asymmetric_offsets_trainable(digits):
    sim = _sim(digits)
    setup = prepare_qat(sim, "range_learning")
    assert set(setup.learned) == {n for n, q in sim.quantizers().items() if q.enabled}
    for name, learned in setup.learned.items():
        quantizer = learned.quantizer
        assert quantizer.scale.requires_grad
        assert quantizer.offset.requires_grad == (not quantizer.symmetric), name
    assert qat_setup(sim) is setup


def _small_sim() -> QuantSim:
    """Conv(3->4, 3x3) + ReLU + Linear(64->5) on 2 images of 3x6x6: per-channel 4-bit weights (per_channel
    preset), per-tensor 8-bit asymmetric activations; the batch of 2 tells a per-sample count from a per-batch one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    x = torch.randn(2, 3, 6, 6)
    sim = QuantSim(model, x, param_bw=4, output_bw=8, config="per_channel")
    sim.calibrate([x, torch.randn(4, 3, 6, 6)], progress=False)
    return sim


def test_lsq_grad_scale_of_each_quantizer_counts_the_values_of_one_scale():
    # LSQ (Esser et al. 2020, sec. 2.2): g = 1 / sqrt(N * Qp), N the weights of the layer for a weight step size
    # and the features of the layer (one sample) for an activation step size; Qp = 2**(b-1) - 1 for signed
    # (symmetric) grids, 2**b - 1 for unsigned ones. A per-channel scale quantizes one output channel only, so
    # its N is that channel's weights.
    sim = _small_sim()
    quantizers = sim.quantizers()
    assert quantizers["0.param_quantizers.weight"].axis == 0 and quantizers["3.param_quantizers.weight"].axis == 0
    assert quantizers["1.output_quantizers.0"].axis is None and not quantizers["1.output_quantizers.0"].symmetric
    setup = prepare_qat(sim, "range_learning")
    expected = {
        "0.param_quantizers.weight": 1 / math.sqrt(3 * 3 * 3 * 7),  # one output channel: 3 inputs x 3x3, Qp = 7
        "3.param_quantizers.weight": 1 / math.sqrt(64 * 7),  # one row of the Linear: 64 inputs, Qp = 7
        "model_input_quantizers.0": 1 / math.sqrt(3 * 6 * 6 * 255),  # one sample of the input, Qp = 255
        "1.output_quantizers.0": 1 / math.sqrt(4 * 4 * 4 * 255),  # one sample of the ReLU output (Conv fused)
        "3.output_quantizers.0": 1 / math.sqrt(5 * 255),  # one sample of the logits
    }
    assert {name: learned.grad_scale for name, learned in setup.learned.items()} == pytest.approx(expected,
                                                                                                  rel=1e-12)


def test_an_unsigned_symmetric_grid_scales_its_gradient_with_the_whole_grid():
    """A symmetric activation on the unsigned grid (offset 0 after a ReLU) has Qp = 2**b - 1, not 2**(b-1) - 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    x = torch.randn(2, 3, 6, 6)
    config = {
        "defaults": {"ops": {"is_output_quantized": "True", "is_symmetric": "True"},
                     "params": {"is_quantized": "True", "is_symmetric": "True"},
                     "unsigned_symmetric": "True"},
        "params": {"bias": {"is_quantized": "False"}},
        "supergroups": [{"op_list": ["Conv", "Relu"]}],
    }
    sim = QuantSim(model, x, config=config)
    sim.calibrate([x], progress=False)
    relu = sim.quantizers()["1.output_quantizers.0"]
    assert relu.symmetric and relu.encoding.offset.item() == 0
    setup = prepare_qat(sim, "range_learning")
    assert setup.learned["1.output_quantizers.0"].grad_scale == pytest.approx(1 / math.sqrt(4 * 4 * 4 * 255))
    assert setup.learned["3.output_quantizers.0"].grad_scale == pytest.approx(1 / math.sqrt(5 * 127))  # signed


def test_prepared_quantizers_scale_their_range_gradients_by_their_own_g():
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    grads, factors = {}, {}
    for grad_scale in ("lsq", 1.0):  # the same sim twice: with the LSQ factors, then with plain gradients
        sim = _small_sim()
        setup = prepare_qat(sim, "range_learning", grad_scale=grad_scale)
        sim.model(x).square().sum().backward()
        grads[grad_scale] = {name: r.quantizer.scale.grad.clone() for name, r in setup.learned.items()}
        factors[grad_scale] = {name: r.grad_scale for name, r in setup.learned.items()}
    assert set(factors[1.0].values()) == {1.0} and len(set(factors["lsq"].values())) == 5
    for name, plain in grads[1.0].items():
        assert plain.abs().sum() > 0, name
        torch.testing.assert_close(grads["lsq"][name], plain * factors["lsq"][name], rtol=1e-6, atol=0, msg=name)


class _Adversary(torch.optim.Optimizer):
    """Writes invalid values into every parameter: negative scales, positive fractional offsets, NaN."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for index, param in enumerate(group["params"]):
                param.fill_(float("nan") if index % 7 == 3 else -3.7 if index % 2 else 2.6)


def test_learned_grids_stay_valid_whatever_the_optimizer_writes(digits):
    (images, _), _ = digits
    sim = _sim(digits)
    setup = prepare_qat(sim, "range_learning")
    ranges = [p for n, p in sim.model.named_parameters() if n.endswith((".scale", ".offset"))]
    adversary = _Adversary(ranges)
    setup.attach_optimizer(adversary)
    adversary.step()
    for name, learned in setup.learned.items():
        quantizer = learned.quantizer
        assert (quantizer.scale >= learned.scale_floor).all() and (quantizer.scale > 0).all(), name
        if learned.learns_offset:
            assert ((quantizer.offset >= -15) & (quantizer.offset <= 0)).all(), name
        encoding = quantizer.encoding  # constructing it validates scale > 0; offsets come out integral
        assert torch.equal(encoding.offset, encoding.offset.round())
    assert torch.isfinite(sim.model(images[:8])).all()
    # an edit outside any optimizer is caught by the next forward
    quantizer = next(r.quantizer for r in setup.learned.values() if r.learns_offset and r.value_range is None)
    with torch.no_grad():
        quantizer.scale.fill_(-1.0)
        quantizer.offset.fill_(-3.4)
    sim.model(images[:8])
    assert (quantizer.scale > 0).all()
    x = torch.linspace(-1, 1, 11)
    expected = torch.clamp(torch.round(x / quantizer.scale) - (-3), 0, 15) * quantizer.scale + (-3) * quantizer.scale
    with torch.no_grad():
        torch.testing.assert_close(quantizer(x), expected)  # the fractional offset -3.4 is used as -3


def test_prepare_qat_hooks_only_the_sim_model_and_the_attached_optimizer(digits):
    (images, _), _ = digits
    global_hooks = torch_optimizer._global_optimizer_pre_hooks, torch_optimizer._global_optimizer_post_hooks
    before = [dict(hooks) for hooks in global_hooks]
    sim = _sim(digits)
    setup = prepare_qat(sim, "range_learning")
    assert [dict(hooks) for hooks in global_hooks] == before  # no hook on every optimizer of the process
    learned = next(r for r in setup.learned.values() if r.learns_offset)
    ranges = [learned.quantizer.offset, learned.quantizer.scale]  # the adversary writes offset 2.6, scale -3.7
    unattached, attached = _Adversary(ranges), _Adversary(ranges)
    unattached.step()  # not attached: the values stay as written until the next forward of sim.model
    assert (learned.quantizer.scale < 0).all()
    handle = setup.attach_optimizer(attached)
    attached.step()  # attached: constrained right after the step, before any forward
    assert (learned.quantizer.scale >= learned.scale_floor).all() and (learned.quantizer.offset <= 0).all()
    handle.remove()
    attached.step()
    assert (learned.quantizer.scale < 0).all()
    sim.model(images[:2])  # the forward pre-hook of sim.model constrains whatever wrote the values
    assert (learned.quantizer.scale >= learned.scale_floor).all()
    setup.attach_optimizer(attached)
    setup.remove()  # detaches the optimizer's hook with the model's
    attached.step()
    assert (learned.quantizer.scale < 0).all()
    assert [dict(hooks) for hooks in global_hooks] == before


def _onnx_ops(sim, tmp_path):
    result = sim.export(tmp_path)
    ops = set()
    for path in (result.float_model, result.qdq_model):
        ops |= {node.op_type for node in onnx.load(path).graph.node}
    return ops


def test_default_folds_batch_norms_before_training_and_exports_none(digits, tmp_path):
    sim = _sim(digits)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in sim.model.modules())
    setup = prepare_qat(sim, "regular")
    assert [bn for _, bn in setup.folded_batch_norms] == ["conv1.1", "conv2.1", "conv3.1"]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in sim.model.modules())
    ops = _onnx_ops(sim, tmp_path)
    assert "Conv" in ops and "BatchNormalization" not in ops


@pytest.mark.parametrize("mode", ["regular", "range_learning"])
def test_kept_batch_norms_freeze_then_fold_at_finalize(digits, tmp_path, mode):
    (images, labels), (test_images, test_labels) = digits
    sim = _sim(digits)
    setup = prepare_qat(sim, mode, batch_norm="keep", freeze_bn_after=2)
    norms = list(setup.kept_batch_norms.values())
    assert len(norms) == 3
    optimizer = torch.optim.Adam([p for p in sim.model.parameters() if p.requires_grad], lr=1e-4)
    _step(sim, images[:64], labels[:64], optimizer)
    assert all(n.training for n in norms)
    for start in (64, 128):
        _step(sim, images[start:start + 64], labels[start:start + 64], optimizer)
    assert not any(n.training for n in norms)  # frozen after 2 training forwards
    accuracy_before = evaluate_accuracy(sim.model, test_images, test_labels)
    folded = finalize(sim, list(images[:256].split(64)), progress=False)
    assert [bn for _, bn in folded] == ["conv1.1", "conv2.1", "conv3.1"]
    assert abs(evaluate_accuracy(sim.model, test_images, test_labels) - accuracy_before) < 0.03
    assert "BatchNormalization" not in _onnx_ops(sim, tmp_path)


def test_prepare_rejects_bad_input(digits):
    with pytest.raises(ValueError, match="not one of"):
        prepare_qat(_sim(digits, calibrate=False), "lsq")
    with pytest.raises(RuntimeError, match="calibrate"):
        prepare_qat(_sim(digits, calibrate=False), "regular")


@pytest.mark.parametrize("activation, top", [(nn.ReLU6(), 6.0), (nn.ReLU(), None)])
def test_learned_ranges_after_clamping_activations_stay_inside_them(activation, top) -> None:
    """A grid past 6 after ReLU6 (or below 0 after ReLU) makes ONNX Runtime leave the convolution in float."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), activation, nn.Conv2d(8, 4, 1))
    images = torch.randn(16, 3, 8, 8) * 3
    sim = QuantSim(model, images[:1], config="per_channel")
    sim.calibrate(images.split(4), progress=False)
    prepare_qat(sim, "range_learning")
    quantizer = sim.quantizer("1.output_quantizers.0")
    with torch.no_grad():  # what an optimizer step pushing the range outwards does
        quantizer.scale.mul_(3.0)
        quantizer.offset.fill_(-40.0)
    sim.model(images[:1])  # the learned grid is constrained before every forward
    low = float(quantizer.scale * quantizer.offset.round())
    high = float(quantizer.scale * (quantizer.offset.round() + 255))
    assert low == 0.0
    if top is not None:
        assert top * 0.9 < high <= top * (1 + 1e-6)
    else:
        assert high > 10  # no ceiling after ReLU: the wider range is kept
