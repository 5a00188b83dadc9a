"""QuantAnalyzer on the bundled digits CNN: every figure equals what re-measuring it with the sim's public API
gives, ranges and encodings match hand computations, the dump matches ONNX Runtime, the model is untouched."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgequant.analysis import OutputFidelity, QuantAnalyzer
from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors, load_pretrained
from edgequant.quantization import Encoding
from edgequant.sim import QuantSim

LAYERS_TO_RECHECK = ("conv1.0", "conv2.1", "add", "fc")


@pytest.fixture(scope="module")
def digits() -> dict:
    train_images, _ = load_digits_tensors("train")
    test_images, test_labels = load_digits_tensors("test")
    return {"model": load_pretrained("digits_cnn"), "batches": list(train_images[:256].split(64)),
            "dummy": train_images[:1], "eval": lambda m: evaluate_accuracy(m, test_images[:200], test_labels[:200])}


@pytest.fixture(scope="module")
def analysed(digits, tmp_path_factory) -> tuple:
    before = {k: v.clone() for k, v in digits["model"].state_dict().items()}
    analyzer = QuantAnalyzer(digits["model"], digits["dummy"], digits["batches"], digits["eval"], param_bw=4,
                             output_bw=8, progress=False)
    out_dir = tmp_path_factory.mktemp("analysis")
    result = analyzer.analyze(out_dir)
    return analyzer, result, out_dir, before


def test_writes_three_files_with_the_documented_keys(analysed) -> None:
    analyzer, result, out_dir, _ = analysed
    assert sorted(p.name for p in out_dir.iterdir()) == ["analysis.json", "layer_outputs.npz", "report.html"]
    data = json.loads((out_dir / "analysis.json").read_text())
    for key in ("fp32_metric", "quantized_metric", "weights_only_metric", "activations_only_metric", "layers"):
        assert key in data
    assert [layer["name"] for layer in data["layers"]][:3] == ["conv1.0", "conv1.1", "conv1.2"]  # execution order
    assert {layer["name"] for layer in data["layers"]} == set(analyzer.layers())
    entry = data["layers"][0]
    for key in ("only_this_quantized", "all_but_this_quantized", "output_sqnr_db", "weight_ranges",
                "activation_ranges", "encodings"):
        assert key in entry
    assert data["quantized_metric"] == result.quantized_metric
    html = (out_dir / "report.html").read_text()
    assert "<script src=" not in html and "<link" not in html  # offline: plotly.js inlined, nothing fetched
    assert html.count("Plotly.newPlot") == 4


def test_figures_equal_remeasurement_with_the_public_api(analysed, digits) -> None:
    analyzer, result, _, _ = analysed
    sim, evaluate = analyzer.sim, digits["eval"]
    flags = {name: q.enabled for name, q in sim.quantizers().items()}
    for name in LAYERS_TO_RECHECK:
        layer = result.layer(name)
        sim.set_enabled(False)
        sim.set_enabled(True, pattern=name + "*")
        assert evaluate(sim.model) == layer.only_this_quantized
        sim.set_enabled(True)
        sim.set_enabled(False, pattern=name + "*")
        assert evaluate(sim.model) == layer.all_but_this_quantized
        sim.set_enabled(True)
    assert evaluate(sim.model) == result.quantized_metric
    sim.set_enabled(False, kinds=("input", "output"))
    assert evaluate(sim.model) == result.weights_only_metric
    sim.set_enabled(True)
    sim.set_enabled(False, kinds=("param",))
    assert evaluate(sim.model) == result.activations_only_metric
    sim.set_enabled(True)
    with sim.quantizers_enabled(False):
        assert evaluate(sim.model) == result.fp32_metric == evaluate(digits["model"])
    assert {name: q.enabled for name, q in sim.quantizers().items()} == flags


def test_output_sqnr_is_the_layers_output_error_with_everything_before_quantized(analysed, digits) -> None:
    analyzer, result, _, _ = analysed
    sim = analyzer.sim
    for name in ("conv2.0", "fc"):
        outputs: list[torch.Tensor] = []
        handle = sim.model.get_submodule(name).register_forward_hook(
            lambda _m, _a, out, found=outputs: found.append(out.detach().clone()))
        with torch.no_grad():
            for batch in digits["batches"]:
                with sim.quantizers_enabled(False):
                    sim.model(batch)
                sim.model(batch)
        handle.remove()
        fp32, quantized = outputs[0::2], outputs[1::2]
        signal = sum(float(f.double().square().sum()) for f in fp32)
        noise = sum(float((q.double() - f.double()).square().sum()) for f, q in zip(fp32, quantized, strict=True))
        assert result.layer(name).output_sqnr_db == pytest.approx(10 * math.log10(signal / noise), rel=1e-6)
    assert all(0 < layer.output_sqnr_db < 60 for layer in result.layers)


def test_ranges_and_encodings_match_the_tensors(analysed, digits) -> None:
    analyzer, result, _, _ = analysed
    sim = analyzer.sim
    conv = result.layer("conv2.0")
    weight = sim.model.get_submodule("conv2.0").weight.detach()
    ranges = conv.weight_ranges[0]
    assert ranges.channel_min == weight.flatten(1).min(dim=1).values.tolist()
    assert ranges.channel_max == weight.flatten(1).max(dim=1).values.tolist()
    encoding = sim.quantizer("conv2.0.param_quantizers.weight").encoding
    assert conv.encodings["conv2.0.param_quantizers.weight"]["max"] == encoding.max.tolist()
    assert conv.encodings["conv2.0.param_quantizers.weight"]["bitwidth"] == 4
    relu = result.layer("conv1.2").activation_ranges[0]
    values = _fp32_outputs(sim, "conv1.2", digits["batches"])
    assert (relu.minimum, relu.maximum) == (float(values.min()), float(values.max()))
    assert relu.clipped_fraction == 0.0  # minmax encodings calibrated on the analysed batches cover them
    relu_encoding = sim.quantizer("conv1.2.output_quantizers.0").encoding
    assert relu.histogram.edges[0] == float(relu_encoding.min) and relu.histogram.edges[-1] == float(relu_encoding.max)
    stride = values.numel() // 4 // (65536 // 4)  # 4 batches share a budget of 65536 values, evenly strided
    subsample = torch.cat([chunk[::stride] for chunk in values.chunk(4)]).numpy()
    expected, _ = np.histogram(subsample, bins=len(relu.histogram.counts), range=(relu.histogram.edges[0],
                                                                                  relu.histogram.edges[-1]))
    assert relu.histogram.counts == expected.tolist()


def _fp32_outputs(sim: QuantSim, layer: str, batches: list) -> torch.Tensor:
    """All values ``layer`` outputs on ``batches`` with every quantizer off."""
    found = []
    handle = sim.model.get_submodule(layer).register_forward_hook(lambda _m, _a, out: found.append(out.flatten()))
    with torch.no_grad(), sim.quantizers_enabled(False):
        for batch in batches:
            sim.model(batch)
    handle.remove()
    return torch.cat(found)


def test_user_model_is_untouched(analysed, digits) -> None:
    _, _, _, before = analysed
    model = digits["model"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("quantizer" in name for name, _ in model.named_modules())


def test_dump_is_named_as_in_the_exported_onnx_and_matches_onnx_runtime(analysed, tmp_path) -> None:
    analyzer, result, out_dir, _ = analysed
    dump = np.load(out_dir / "layer_outputs.npz")
    assert "fp32:/conv1.2/Relu_output_0" in dump.files and "sim:output" in dump.files
    assert result.layer("conv1.0").onnx_outputs == ["/conv1.0/Conv_output_0"]
    exported = analyzer.sim.export(tmp_path)
    model = onnx.load(exported.float_model)
    fp32_names = [key.removeprefix("fp32:") for key in dump.files if key.startswith("fp32:")]
    existing = {v.name for v in model.graph.output}
    model.graph.output.extend([onnx.helper.make_empty_tensor_value_info(n) for n in fp32_names if n not in existing])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(fp32_names, {"input": dump["input:input"]})
    for name, value in zip(fp32_names, values, strict=True):
        np.testing.assert_allclose(dump[f"fp32:{name}"], value, rtol=1e-4, atol=1e-5, err_msg=name)
    qdq = ort.InferenceSession(str(exported.qdq_model), providers=["CPUExecutionProvider"])
    output_scale = float(analyzer.sim.quantizer("fc.output_quantizers.0").encoding.scale)
    np.testing.assert_allclose(dump["sim:output"], qdq.run(["output"], {"input": dump["input:input"]})[0],
                               atol=1.01 * output_scale)


def test_default_metric_is_output_fidelity_and_from_sim_keeps_the_sim(digits, tmp_path) -> None:
    sim = QuantSim(digits["model"], digits["dummy"], param_bw=4, output_bw=8)
    sim.calibrate(digits["batches"], progress=False)
    narrow = sim.quantizer("conv1.2.output_quantizers.0")
    narrow.set_encoding(Encoding.from_range(0.0, float(narrow.encoding.max) / 2, 8, False))
    sim.quantizer("pool.output_quantizers.0").enabled = False
    sim.quantizer("fc.output_quantizers.0").enabled = False  # fc stays a layer through its weight quantizer
    flags = {name: q.enabled for name, q in sim.quantizers().items()}
    encodings = {name: q.encoding for name, q in sim.quantizers().items()}
    analyzer = QuantAnalyzer.from_sim(sim, digits["batches"], progress=False)
    result = analyzer.analyze(tmp_path, num_batches=2)
    assert result.num_batches == 2 and result.fp32_metric == 1.0
    assert {name: q.enabled for name, q in sim.quantizers().items()} == flags
    assert all(q.encoding.equals(encodings[n]) for n, q in sim.quantizers().items())
    assert "pool" not in {layer.name for layer in result.layers}  # its only quantizer is off: not analysed
    assert result.layer("fc").quantizers == ["fc.param_quantizers.weight"] and not result.layer("fc").activation_ranges
    with torch.no_grad():
        with sim.quantizers_enabled(False):
            reference = [sim.model(b) for b in digits["batches"][:2]]
        quantized = [sim.model(b) for b in digits["batches"][:2]]
    noise = sum(float((q.double() - r.double()).square().sum()) for q, r in zip(quantized, reference, strict=True))
    signal = sum(float(r.double().square().sum()) for r in reference)
    assert result.quantized_metric == pytest.approx(1 - noise / signal, rel=1e-6)
    assert isinstance(analyzer.metric, OutputFidelity) and analyzer.metric(sim.model) == result.quantized_metric
    relu = result.layer("conv1.2").activation_ranges[0]
    values = _fp32_outputs(sim, "conv1.2", digits["batches"][:2])
    beyond = values > narrow.encoding.max + narrow.encoding.scale / 2
    assert relu.clipped_fraction == pytest.approx(float(beyond.float().mean()), abs=1e-12)
    assert relu.clipped_fraction > 0.01


def test_bad_inputs_get_one_clear_error(digits, tmp_path) -> None:
    sim = QuantSim(digits["model"], digits["dummy"])
    with pytest.raises(ValueError, match="calibrate the sim"):
        QuantAnalyzer.from_sim(sim, digits["batches"])
    sim.calibrate(digits["batches"][:1], progress=False)
    with pytest.raises(ValueError, match="must return a number"):
        QuantAnalyzer.from_sim(sim, digits["batches"], lambda m: "high", progress=False).analyze(tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        QuantAnalyzer.from_sim(sim, digits["batches"], lambda m: float("nan"), progress=False).analyze(tmp_path)
