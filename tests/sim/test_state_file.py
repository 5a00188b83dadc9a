"""Sim-state files: format, version and checksum checked before use; versions 2 and 3 files still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from edgequant.quantization import Percentile, PerChannel, PerTensor
from edgequant.sim import QuantSim
from edgequant.sim.state_file import SIM_STATE_FORMAT, read_sim_state, tensors_checksum, tensors_of


@pytest.fixture
def saved(digits_cnn: nn.Module, digits_train: torch.Tensor, tmp_path: Path) -> tuple[QuantSim, Path]:
    sim = QuantSim(digits_cnn, digits_train[:1], param_bw=4, quant_scheme="sqnr", config="per_channel")
    sim.calibrate(digits_train[:256].split(64), progress=False)
    path = tmp_path / "sim_state.pt"
    sim.save(path)
    return sim, path


def _fresh(digits_train: torch.Tensor, **settings: object) -> QuantSim:
    from edgequant.demo.digits import load_pretrained

    return QuantSim(load_pretrained("digits_cnn"), digits_train[:1], **settings)


def test_settings_round_trip_and_the_reloaded_sim_is_bit_identical(saved, digits_train) -> None:
    sim, path = saved
    state = read_sim_state(path)
    assert state.settings == {"config": sim.config.raw, "param_bw": 4, "output_bw": 8, "quant_scheme": "sqnr"}
    fresh = _fresh(digits_train, param_bw=4, quant_scheme="sqnr", config="per_channel")
    fresh.load(path)
    with torch.no_grad():
        assert torch.equal(fresh.model(digits_train[:64]), sim.model(digits_train[:64]))


def test_edited_settings_or_tensors_are_refused_as_corrupted(saved, digits_train, tmp_path) -> None:
    _, path = saved
    raw = torch.load(path, weights_only=True)
    settings = json.loads(raw["settings"])
    settings["param_bw"] = 8  # a settings edit the tensors cannot show
    torch.save({**raw, "settings": json.dumps(settings, sort_keys=True)}, tmp_path / "edited_settings.pt")
    with pytest.raises(ValueError, match=r"edited_settings\.pt is corrupted"):
        read_sim_state(tmp_path / "edited_settings.pt")
    key = next(k for k in raw["state_dict"] if k.endswith("weight"))
    altered = dict(raw["state_dict"], **{key: raw["state_dict"][key] * 1.01})
    torch.save({**raw, "state_dict": altered}, tmp_path / "altered.pt")
    with pytest.raises(ValueError, match="corrupted"):
        _fresh(digits_train, config="per_channel").load(tmp_path / "altered.pt")
    (tmp_path / "truncated.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"truncated\.pt is not a readable sim state"):
        read_sim_state(tmp_path / "truncated.pt")
    torch.save({**raw, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="format version 99; this edgequant reads versions 2, 3, 4"):
        read_sim_state(tmp_path / "future.pt")


def test_a_version_2_file_still_loads(saved, digits_train, tmp_path) -> None:
    """Version 2 kept the settings as separate keys and summed only the tensors into its checksum."""
    sim, _ = saved
    state_dict = sim.model.state_dict()
    torch.save({
        "format": SIM_STATE_FORMAT, "version": 2, "config": sim.config.raw, "param_bw": 4, "output_bw": 8,
        "quant_scheme": "sqnr", "state_dict": state_dict, "checksum": tensors_checksum(tensors_of(state_dict)),
    }, tmp_path / "v2.pt")
    state = read_sim_state(tmp_path / "v2.pt")
    assert state.settings["param_bw"] == 4 and state.settings["quant_scheme"] == "sqnr"
    fresh = _fresh(digits_train, param_bw=4, quant_scheme="sqnr", config="per_channel")
    fresh.load(tmp_path / "v2.pt")
    with torch.no_grad():
        assert torch.equal(fresh.model(digits_train[:64]), sim.model(digits_train[:64]))


def test_a_version_3_file_with_axis_extra_states_still_loads(saved, digits_train, tmp_path) -> None:
    """Version 3 wrote each quantizer's extra state as ``[enabled, frozen, bitwidth, symmetric, axis, strict,
    unsigned]`` (axis -1: per tensor); the per-channel weights and per-tensor activations come back as they were."""
    sim, _ = saved
    old_form = {}
    for name, quantizer in sim.quantizers().items():
        axis = 0 if quantizer.role == "param" and quantizer.scale.dim() == 1 else -1
        old_form[f"{name}._extra_state"] = torch.tensor(
            [quantizer.enabled, quantizer.frozen, quantizer.bitwidth, quantizer.symmetric, axis, 0, 0])
    state_dict = sim.model.state_dict() | old_form
    settings_text = json.dumps({"config": sim.config.raw, "param_bw": 4, "output_bw": 8, "quant_scheme": "sqnr"},
                               sort_keys=True)
    torch.save({"format": SIM_STATE_FORMAT, "version": 3, "settings": settings_text, "state_dict": state_dict,
                "checksum": tensors_checksum(tensors_of(state_dict), settings_text)}, tmp_path / "v3.pt")
    fresh = _fresh(digits_train, param_bw=4, quant_scheme="sqnr", config="per_channel")
    fresh.set_granularity("*", PerTensor())  # the file's per-channel axes must come back from the old form
    fresh.load(tmp_path / "v3.pt")
    granularities = {name: q.granularity for name, q in fresh.quantizers().items()}
    assert granularities == {name: q.granularity for name, q in sim.quantizers().items()}
    assert set(granularities.values()) == {PerChannel(0), PerTensor()}
    with torch.no_grad():
        assert torch.equal(fresh.model(digits_train[:64]), sim.model(digits_train[:64]))


def test_checksum_depends_on_settings_names_dtypes_and_values() -> None:
    tensors = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3], dtype=torch.int64)}
    base = tensors_checksum(tensors, "{}")
    assert tensors_checksum(dict(tensors), "{}") == base
    assert tensors_checksum(tensors, '{"param_bw": 8}') != base
    assert tensors_checksum({"a": tensors["a"], "c": tensors["b"]}, "{}") != base
    assert tensors_checksum({"a": tensors["a"].double(), "b": tensors["b"]}, "{}") != base
    assert tensors_checksum({"a": torch.tensor([1.0, 2.5]), "b": tensors["b"]}, "{}") != base


def test_a_method_with_settings_round_trips_through_the_file(digits_cnn, digits_train, tmp_path) -> None:
    """The CLI rebuilds a sim from ``settings["quant_scheme"]``: the method's JSON form names its settings, so the
    rebuilt sim calibrates as the saved one did and loads to bit-identical outputs."""
    batches = digits_train[:256].split(64)
    sim = QuantSim(digits_cnn, digits_train[:1], quant_scheme=Percentile(99.9))
    sim.calibrate(batches, progress=False)
    sim.save(tmp_path / "percentile.pt")
    settings = read_sim_state(tmp_path / "percentile.pt").settings
    assert settings["quant_scheme"] == {"name": "percentile", "percentile": 99.9}
    fresh = _fresh(digits_train, quant_scheme=settings["quant_scheme"])
    assert fresh.quant_scheme == Percentile(99.9) and str(fresh.quant_scheme) == "percentile(percentile=99.9)"
    fresh.load(tmp_path / "percentile.pt")
    with torch.no_grad():
        assert torch.equal(fresh.model(digits_train[:64]), sim.model(digits_train[:64]))
    fresh.calibrate(batches, progress=False)
    encodings = {name: q.encoding for name, q in sim.quantizers().items() if q.encoding is not None}
    assert all(torch.equal(fresh.quantizer(n).encoding.scale, e.scale) for n, e in encodings.items())
    default = _fresh(digits_train, quant_scheme="percentile")  # 99.99: other activation ranges on this data
    default.calibrate(batches, progress=False)
    assert any(not torch.equal(default.quantizer(n).encoding.scale, e.scale) for n, e in encodings.items())
