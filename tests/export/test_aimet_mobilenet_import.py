"""AIMET's own export of a whole MobileNetV2 (tests/fixtures/aimet-2.42/mobilenet_v2_digits) imported into an
edgequant sim of the same float model: every encoding is placed — most through AIMET's ONNX graph, its tensor
names being AIMET's — and the sim reproduces AIMET's simulated output bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
import torchvision
from aimet_fixtures import (
    MOBILENET,
    aimet_onnx_graph,
    initializer_digest,
    load_fixture_tensor,
    mobilenet,
    mobilenet_float_state,
)
from onnx import TensorProto, helper
from torch import nn

import edgequant as eq
from edgequant.export.graph_align import align_tensors

FOLDERS = ["legacy_1.0.0", "onnx_api"]
AIMET_INITIALIZER_DIGESTS = {  # PROVENANCE.md: AIMET's original initializers
    "legacy_1.0.0": "b7e5917c2d217c03e931f76d1ac62e284afd041cd026d133976a2f2b2cdea805",
    "onnx_api": "42acdbc1dced787a6ef97ca74bc24e0548b0bf9381211c898f0381980d65156e",
}
NUM_ENCODINGS = 134  # 53 weights + 81 activations, as AIMET's sim quantized them
DEPTHWISE_BN_OUTPUTS = ["net.features.1.conv.0.1.output_quantizers.0"] + [
    f"net.features.{block}.conv.1.1.output_quantizers.0" for block in range(2, 18)
]


class RenamedMobileNet(nn.Module):
    """The same float network under other names (``backbone.*``), its input widened by ``expand``, not ``repeat``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torchvision.models.mobilenet_v2(num_classes=10)
        self.backbone.features[0][0].stride = (1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x.expand(-1, 3, -1, -1))


def renamed_mobilenet() -> RenamedMobileNet:
    model = RenamedMobileNet()
    model.load_state_dict({k.replace("net.", "backbone.", 1): v for k, v in mobilenet_float_state().items()})
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_fixture_tensor(MOBILENET / "input.pt")


@pytest.fixture(scope="module")
def aimet_output() -> torch.Tensor:
    return load_fixture_tensor(MOBILENET / "sim_output_w8a8_pt_minmax.pt")


@pytest.mark.parametrize("folder", FOLDERS)
def test_restored_onnx_graphs_hold_aimets_weights(folder: str) -> None:
    assert initializer_digest(aimet_onnx_graph(folder)) == AIMET_INITIALIZER_DIGESTS[folder]


def _assert_reproduces(sim: eq.QuantSim, ours: torch.Tensor, aimets: torch.Tensor, prefix: str = "net") -> None:
    """AIMET's output to the step. Bit for bit on the CPU AIMET ran on; elsewhere the float convolutions sum in
    another order (oneDNN's AVX2 and AVX-512 kernels differ), which can move a value at a rounding tie by one step."""
    scale = sim.quantizer(f"{prefix}.classifier.1.output_quantizers.0").encoding.scale
    lsbs = (ours - aimets).abs() / scale
    assert float(lsbs.max()) <= 1.001 and float((ours == aimets).float().mean()) >= 0.99


@pytest.mark.parametrize("with_weights", [True, False], ids=["aimet-graph", "stored-graph-without-weights"])
@pytest.mark.parametrize("folder", FOLDERS)
def test_aimet_mobilenet_encodings_reproduce_aimet_simulation(
    folder: str, with_weights: bool, images: torch.Tensor, aimet_output: torch.Tensor
) -> None:
    sim = eq.QuantSim(mobilenet(), images[:1])
    options = {"onnx_model": aimet_onnx_graph(folder)} if with_weights else {}  # else model.onnx beside the file
    report = sim.load_encodings(MOBILENET / folder / "model.encodings", partial=False, **options)

    assert len(report.placed) == NUM_ENCODINGS and len(report.loaded) == NUM_ENCODINGS
    assert sorted(report.added) == sorted(DEPTHWISE_BN_OUTPUTS)  # AIMET quantizes them; our config fuses them
    document = json.loads((MOBILENET / folder / "model.encodings").read_text())
    names = [e["name"] for e in document["activation_encodings"] + document["param_encodings"]]
    assert set(report.placed) | set(report.skipped) == set(names)  # every entry accounted for
    if folder == "legacy_1.0.0":
        assert not report.skipped and len(names) == NUM_ENCODINGS
    else:  # the newer exporter repeats encodings on tensors that share a quantizer's values
        reasons = list(report.skipped.values())
        assert len(reasons) == 19
        assert sum("fused group" in why for why in reasons) == 18
        assert report.skipped["view"] == "same values and encoding as 'mean' (data movement)"
    enabled = {name for name, q in sim.quantizers().items() if q.enabled}
    assert enabled == set(report.loaded) and all(sim.quantizers()[name].frozen for name in enabled)
    # the file is the whole truth: our quantizers AIMET's sim did not have are off
    assert len(report.disabled) == 52 + 17 + 1  # BN gammas, pointwise conv outputs (AIMET: Conv+BN), model input

    with torch.no_grad():
        ours = sim.model(images)
    _assert_reproduces(sim, ours, aimet_output)


@pytest.mark.parametrize("folder", FOLDERS)
def test_other_module_names_map_through_aimets_weights(
    folder: str, images: torch.Tensor, aimet_output: torch.Tensor
) -> None:
    """No name matches (parameters are ``backbone.*``, tensors ours): AIMET's ONNX holds each quantized weight
    as quantize-dequantize(ours), which identifies our parameter; the graph does the rest."""
    sim = eq.QuantSim(renamed_mobilenet(), images[:1])
    report = sim.load_encodings(
        MOBILENET / folder / "model.encodings", partial=False, onnx_model=aimet_onnx_graph(folder)
    )
    assert len(report.placed) == NUM_ENCODINGS
    assert "backbone.features.0.0.param_quantizers.weight" in report.placed["net.features.0.0.weight"]
    with torch.no_grad():
        _assert_reproduces(sim, sim.model(images), aimet_output, prefix="backbone")


def test_unplaceable_entries_are_reported_with_the_reason(tmp_path: Path, images: torch.Tensor) -> None:
    encodings = tmp_path / "model.encodings"
    shutil.copy(MOBILENET / "legacy_1.0.0/model.encodings", encodings)  # without AIMET's ONNX graph beside it
    sim = eq.QuantSim(mobilenet(), images[:1])
    with pytest.raises(ValueError, match=r"81 encodings could not be placed.*pass onnx_model="):
        sim.load_encodings(encodings)
    with pytest.warns(UserWarning) as warned:
        report = sim.load_encodings(encodings, strict=False)  # the failed load left the sim as it was
    assert len(report.placed) == 53 and len(report.skipped) == 81  # the weights match by name
    messages = [str(w.message) for w in warned]
    assert any("81 encodings could not be placed" in m for m in messages)
    assert any("134 quantizers of this sim have no encoding" in m and "partial=False" in m for m in messages)

    renamed = eq.QuantSim(renamed_mobilenet(), images[:1])  # weights of other names, graph without weights
    with pytest.warns(UserWarning) as warned:
        report = renamed.load_encodings(MOBILENET / "legacy_1.0.0/model.encodings", strict=False)
    assert any("134 encodings could not be placed" in str(w.message) for w in warned)
    assert report.skipped["net.features.0.0.weight"].startswith("matches no parameter of this sim")
    assert "the models differ there" in report.skipped["/net/features/features.0/0.2/Clip_output_0"]


def _graph(nodes: list, inputs: list[str], outputs: list[str], initializers: list) -> onnx.ModelProto:
    def info(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)

    graph = helper.make_graph(nodes, "g", [info(n) for n in inputs], [info(n) for n in outputs], initializers)
    return helper.make_model(graph)


def test_alignment_sees_through_names_data_movement_and_operand_order() -> None:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [0.5, -1.0, 2.0, 0.25])
    renamed_weight = helper.make_tensor("layer.weight", TensorProto.FLOAT, [2, 2], [0.5, -1.0, 2.0, 0.25])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, -1])
    ours = _graph(
        [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "x"], ["sum"]),
         helper.make_node("Flatten", ["sum"], ["flat"]), helper.make_node("Relu", ["flat"], ["y"])],
        ["x"], ["y"], [weight],
    )
    theirs = _graph(
        [helper.make_node("MatMul", ["input", "layer.weight"], ["1"]), helper.make_node("Add", ["input", "1"], ["2"]),
         helper.make_node("Reshape", ["2", "shape"], ["3"]), helper.make_node("Relu", ["3"], ["4"]),
         helper.make_node("Sigmoid", ["3"], ["5"])],
        ["input"], ["4", "5"], [renamed_weight, shape],
    )
    aligned = align_tensors(theirs, ours)
    assert aligned["1"] == ["mm"] and aligned["layer.weight"] == ["w"]
    assert set(aligned["2"]) == {"sum", "flat"} and set(aligned["3"]) == {"sum", "flat"}
    assert aligned["4"] == ["y"] and aligned["5"] == []  # ours has no Sigmoid


def test_renamed_export_of_our_own_sim_maps_through_the_graph(tmp_path: Path) -> None:
    """Another exporter's names for everything (tensors and weights): our digits CNN's export with every name
    replaced still loads completely and reproduces the sim bit for bit."""
    from edgequant.demo.digits import load_digits_tensors, load_pretrained

    images, _ = load_digits_tensors("test")
    sim = eq.QuantSim(load_pretrained("digits_dwcnn"), images[:1], config="per_channel")
    sim.calibrate(images[:128].split(32), progress=False)
    result = sim.export(tmp_path, encoding_version="2.0.0")
    graph = onnx.load(str(result.float_model))
    names = {i.name for i in graph.graph.input} | {o for n in graph.graph.node for o in n.output}
    names |= {t.name for t in graph.graph.initializer}
    renamed = {name: f"t{index}" for index, name in enumerate(sorted(names))}
    for node in graph.graph.node:
        node.input[:] = [renamed.get(n, n) for n in node.input]
        node.output[:] = [renamed[n] for n in node.output]
    for value in [*graph.graph.input, *graph.graph.output, *graph.graph.initializer]:
        value.name = renamed[value.name]
    document = json.loads(result.encodings.read_text())
    for entry in document["encodings"]:
        entry["name"] = renamed[entry["name"]]
    (tmp_path / "other.encodings").write_text(json.dumps(document))
    onnx.save(graph, str(tmp_path / "other.onnx"))

    fresh = eq.QuantSim(load_pretrained("digits_dwcnn"), images[:1], config="per_channel")
    report = fresh.load_encodings(tmp_path / "other.encodings", partial=False)
    assert len(report.matched_by_graph) == len(report.placed) > 0
    assert set(report.placed) | set(report.skipped) == {e["name"] for e in document["encodings"]}
    with torch.no_grad():
        assert torch.equal(fresh.model(images[:256]), sim.model(images[:256]))
