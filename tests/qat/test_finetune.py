"""finetune: distillation by default, labelled loss, best-state keeping, and a killed run that resumes
bit-identical to an uninterrupted one."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors, load_pretrained
from edgequant.qat import (
    CheckpointSettings,
    FinetuneSettings,
    TrainingSchedule,
    distillation_loss,
    finetune,
    prepare_qat,
)
from edgequant.sim import QuantSim


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensors("train"), load_digits_tensors("test")


def _prepared(digits, mode="range_learning"):
    (images, _), _ = digits
    torch.manual_seed(0)
    sim = QuantSim(load_pretrained("digits_cnn"), images[:1], param_bw=4, output_bw=4, config="per_channel")
    sim.calibrate(list(images[:256].split(64)), progress=False)
    prepare_qat(sim, mode)
    return sim


def test_distillation_loss_is_kl_on_logits_and_mse_otherwise():
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    expected = (F.softmax(teacher / 2, 1) * (F.log_softmax(teacher / 2, 1) - F.log_softmax(student / 2, 1))).sum() / 4
    torch.testing.assert_close(distillation_loss(student, teacher, temperature=2.0), 4 * expected)
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    maps_student, maps_teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    expected_mse = ((maps_student - maps_teacher) ** 2).mean()
    torch.testing.assert_close(distillation_loss(maps_student, maps_teacher), expected_mse)
    torch.testing.assert_close(distillation_loss(student, teacher, kind="mse"), F.mse_loss(student, teacher))
    with pytest.raises(ValueError, match="not one of"):
        distillation_loss(student, teacher, kind="l1")


class _KilledAdam(torch.optim.Adam):
    """Adam whose process 'dies' before its 8th step."""

    def step(self, closure=None):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 8:
            raise KeyboardInterrupt("killed")
        return super().step(closure)


@pytest.mark.parametrize("mode", ["regular", "range_learning"])
def test_killed_run_resumes_bit_identical(digits, tmp_path, mode):
    (images, _), _ = digits
    data = images[:320]  # 5 batches of 64 per epoch, 2 epochs
    options = dict(epochs=2, lr=1e-3, batch_size=64, checkpoint_every=3, progress=False)
    uninterrupted = _prepared(digits, mode)
    finetune(uninterrupted, data, checkpoint_dir=tmp_path / "a", **options)

    killed = _prepared(digits, mode)
    with pytest.raises(KeyboardInterrupt):
        finetune(killed, data, checkpoint_dir=tmp_path / "b", optimizer=_KilledAdam, **options)
    resumed = _prepared(digits, mode)  # a new process: rebuilt, calibrated, prepared, then resumed
    settings = FinetuneSettings(TrainingSchedule(epochs=2, lr=1e-3, batch_size=64),
                                checkpoints=CheckpointSettings(tmp_path / "b", checkpoint_every=3), progress=False)
    result = finetune(resumed, data, settings, resume=True)  # the same run as settings, resume as a keyword
    assert result.resumed_from_step == 6 and result.steps == 10
    expected, got = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_labelled_loss_best_state_and_accuracy(digits, tmp_path):
    (images, labels), (test_images, test_labels) = digits
    sim = _prepared(digits, "regular")
    before = evaluate_accuracy(sim.model, test_images, test_labels)
    snapshots, metrics = [], iter([0.3, 0.5, 0.9, 0.7])  # the calibrated start, then each epoch

    def evaluate(model):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(metrics)

    result = finetune(sim, TensorDataset(images, labels), epochs=3, lr=1e-4, progress=False, eval_fn=evaluate,
                      loss_fn=lambda output, batch: F.cross_entropy(output, batch[1]), checkpoint_dir=tmp_path)
    assert result.best_metric == 0.9 and result.best_step == 2 * math.ceil(len(images) / 64)
    assert result.start_metric == 0.3 and not result.kept_start
    assert [round(h["metric"], 2) for h in result.history] == [0.5, 0.9, 0.7]
    for key, value in sim.model.state_dict().items():  # the best epoch's state was restored
        assert torch.equal(value, snapshots[2][key]), key
    assert (tmp_path / "best_sim.pt").exists() and (tmp_path / "last.pt").exists()
    assert evaluate_accuracy(sim.model, test_images, test_labels) >= before


def test_bad_arguments_fail_with_one_clear_line(digits):
    sim = _prepared(digits)
    with pytest.raises(ValueError, match="epochs >= 1"):
        finetune(sim, torch.zeros(4, 1, 8, 8), epochs=0, lr=1e-4)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        finetune(sim, torch.zeros(4, 1, 8, 8), epochs=1, lr=1e-4, resume=True)
    with pytest.raises(ValueError, match="schedule 'linear'"):
        TrainingSchedule(epochs=1, lr=1e-4, schedule="linear")
    with pytest.raises(TypeError, match="unexpected keyword arguments: learning_rate"):
        finetune(sim, torch.zeros(4, 1, 8, 8), epochs=1, learning_rate=1e-4)


def test_keywords_replace_the_fields_of_the_settings_they_name():
    base = FinetuneSettings(TrainingSchedule(epochs=3, lr=1e-4, warmup_steps=5), mode="regular")
    built = FinetuneSettings.build(base, lr=1e-3, temperature=2.0, eval_every=7, checkpoint_dir="ckpt", progress=False)
    assert built.training == TrainingSchedule(epochs=3, lr=1e-3, warmup_steps=5)
    assert built.loss.temperature == 2.0 and built.evaluation.eval_every == 7
    assert built.checkpoints.checkpoint_dir == "ckpt" and (built.mode, built.progress) == ("regular", False)
    assert FinetuneSettings.build(epochs=2, lr=1e-3) == FinetuneSettings(TrainingSchedule(epochs=2, lr=1e-3))


def _with_dropout(images):
    torch.manual_seed(0)
    model = torch.nn.Sequential(load_pretrained("digits_cnn"), torch.nn.Dropout(0.5))
    sim = QuantSim(model, images[:1], param_bw=8, output_bw=8, config="per_channel")
    sim.calibrate([images[:256]], progress=False)
    return model, sim


def test_distillation_student_runs_without_dropout_by_default(digits):
    """Distilling on a few unlabeled images, a student with dropout on is compared with a teacher without it: its
    loss is dominated by the dropout noise instead of the quantization error (EfficientNet-Lite0 in
    benchmarks/README.md). By default the first step's loss is exactly the eval-mode student's KL."""
    (images, _), _ = digits
    data = images[:256]
    fp32, sim = _with_dropout(images)
    prepare_qat(sim, "range_learning")
    with torch.no_grad():
        expected = distillation_loss(sim.model.eval()(data), fp32.eval()(data)).item()
    default = finetune(sim, data, epochs=1, lr=1e-9, range_lr=1e-9, batch_size=256, progress=False)
    assert default.history[0]["loss"] == pytest.approx(expected, rel=1e-4)
    _, noisy_sim = _with_dropout(images)
    noisy = finetune(noisy_sim, data, epochs=1, lr=1e-9, range_lr=1e-9, batch_size=256, dropout=True, progress=False)
    assert noisy.history[0]["loss"] > 10 * default.history[0]["loss"]


def test_a_labelled_loss_keeps_dropout_on(digits):
    (images, labels), _ = digits
    _, sim = _with_dropout(images)
    seen = []
    for module in sim.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_pre_hook(  # the training forwards (prepare_qat's shape probe runs in eval)
                lambda module, args: seen.append(module.training) if torch.is_grad_enabled() else None)
    finetune(sim, TensorDataset(images[:64], labels[:64]), epochs=1, lr=1e-9, progress=False,
             loss_fn=lambda output, batch: F.cross_entropy(output, batch[1]))
    assert seen == [True]


def test_kept_batch_norms_train_while_dropout_is_off(digits):
    (images, _), _ = digits
    torch.manual_seed(0)
    sim = QuantSim(load_pretrained("digits_cnn"), images[:1], param_bw=8, output_bw=8, config="per_channel")
    sim.calibrate([images[:256]], progress=False)
    setup = prepare_qat(sim, "regular", batch_norm="keep", freeze_bn_after=100)
    norm = next(iter(setup.kept_batch_norms.values()))
    before = norm.running_mean.clone()
    finetune(sim, images[:128], epochs=1, lr=1e-9, batch_size=64, progress=False)
    assert not torch.equal(norm.running_mean, before)


def test_a_run_that_only_worsens_the_metric_ends_at_its_start(digits):
    (images, labels), _ = digits
    sim = _prepared(digits, "regular")
    start = {k: v.clone() for k, v in sim.model.state_dict().items()}
    metrics = iter([0.8, 0.5, 0.6])  # the calibrated start is the best

    result = finetune(sim, TensorDataset(images[:256], labels[:256]), epochs=2, lr=1e-2, progress=False,
                      eval_fn=lambda model: next(metrics),
                      loss_fn=lambda output, batch: F.cross_entropy(output, batch[1]))
    assert result.kept_start and result.best_step == 0 and result.best_metric == result.start_metric == 0.8
    for key, value in sim.model.state_dict().items():
        assert torch.equal(value, start[key]), key
