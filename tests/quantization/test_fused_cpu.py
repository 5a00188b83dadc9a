"""The fused CPU kernel (Inductor) against the eager passes: same values bit for bit, the eager passes for
training, and the eager path when compilation fails."""

from __future__ import annotations

import pytest
import torch

from edgequant.quantization import Encoding, fused_cpu, quantize_dequantize


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the fused kernels that ran (and the fused path switched on for this test)."""
    calls: list[str] = []
    compiled = fused_cpu._compiled

    def counted(kernel):  # noqa: ANN001, ANN202
        calls.append(kernel.__name__)
        return compiled(kernel)

    monkeypatch.setattr(fused_cpu, "_disabled", False)
    monkeypatch.setattr(fused_cpu, "_compiled", counted)
    return calls


def _large_input(encoding: Encoding) -> torch.Tensor:
    """Random values, exact ties between grid steps and their float neighbours, values far outside the range."""
    torch.manual_seed(0)
    ties = (torch.arange(-300, 300).float() + 0.5) * encoding.scale
    ties = torch.cat([ties, ties.nextafter(torch.tensor(1e9)), ties.nextafter(torch.tensor(-1e9))])
    return torch.cat([torch.randn(fused_cpu.MIN_NUMEL) * 3, ties, torch.tensor([1e6, -1e6, 0.0])])


def _eager(fn, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN001, ANN202
    with monkeypatch.context() as patch:
        patch.setattr(fused_cpu, "MIN_NUMEL", 1 << 62)
        return fn()


@pytest.mark.parametrize("symmetric", [False, True])
def test_fused_forward_is_bit_identical_to_the_eager_passes(fused_calls, monkeypatch, symmetric):
    encoding = Encoding.from_range(-3.0, 5.0, 8, symmetric=symmetric)
    x = _large_input(encoding)
    expected = _eager(lambda: quantize_dequantize(x.clone(), encoding.scale, encoding.offset, 8), monkeypatch)
    assert fused_calls == []
    assert torch.equal(quantize_dequantize(x, encoding.scale, encoding.offset, 8), expected)
    in_place = x.clone()
    result = quantize_dequantize(in_place, encoding.scale, encoding.offset, 8, inplace=True)
    assert result.data_ptr() == in_place.data_ptr() and torch.equal(in_place, expected)
    assert fused_calls == ["_qdq", "_qdq_into_input"]
    assert (expected != x).float().mean() > 0.9  # the input really was quantized


def test_training_keeps_the_eager_passes(fused_calls):
    encoding = Encoding.from_range(-3.0, 5.0, 8, symmetric=False)
    x = _large_input(encoding).requires_grad_()
    quantize_dequantize(x, encoding.scale, encoding.offset, 8).sum().backward()
    assert fused_calls == [] and x.grad is not None


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_a_traced_sim_sees_the_eager_ops(fused_calls):
    encoding = Encoding.from_range(-3.0, 5.0, 8, symmetric=False)
    x = _large_input(encoding)
    traced = torch.jit.trace(lambda t: quantize_dequantize(t, encoding.scale, encoding.offset, 8), x,
                             check_trace=False)
    assert fused_calls == []
    kinds = {n.kind().rstrip("_") for n in traced.graph.nodes()}
    assert {"aten::div", "aten::round", "aten::clamp", "aten::mul"} <= kinds
    assert torch.equal(traced(x), quantize_dequantize(x, encoding.scale, encoding.offset, 8))
    assert fused_calls == ["_qdq"]  # the untraced call did fuse


def test_a_compiler_failure_falls_back_to_the_eager_passes(monkeypatch, caplog):
    def no_compiler(kernel):  # noqa: ANN001, ANN202
        def fail(*args):  # noqa: ANN002, ANN202
            raise RuntimeError("InductorError: no C++ compiler\nmore lines")

        return fail

    monkeypatch.setattr(fused_cpu, "_disabled", False)
    monkeypatch.setattr(fused_cpu, "_compiled", no_compiler)
    encoding = Encoding.from_range(-3.0, 5.0, 8, symmetric=False)
    x = _large_input(encoding)
    expected = _eager(lambda: quantize_dequantize(x, encoding.scale, encoding.offset, 8), monkeypatch)
    assert torch.equal(quantize_dequantize(x, encoding.scale, encoding.offset, 8), expected)
    assert fused_cpu._disabled
    assert "no C++ compiler" in caplog.text and "more lines" not in caplog.text
    assert not fused_cpu.can_fuse(x, encoding.scale)


@pytest.mark.parametrize("bounds", [(0.0, 6.0), (0.0, float("inf")), (-1.0, 2.0)])
def test_a_clamp_in_the_fused_pass_equals_the_activation_run_first(fused_calls, monkeypatch, bounds):
    encoding = Encoding.from_range(-3.0, 5.0, 8, symmetric=False)  # reaches past each clamp's lower end
    x = torch.cat([_large_input(encoding), torch.tensor([float("nan"), float("inf"), -float("inf")])])
    expected = _eager(lambda: quantize_dequantize(torch.clamp(x, *bounds), encoding.scale, encoding.offset, 8),
                      monkeypatch)
    fused = quantize_dequantize(x, encoding.scale, encoding.offset, 8, clamp_first=bounds)
    assert torch.equal(fused[:-3], expected[:-3]) and fused[-3].isnan() and torch.equal(fused[-2:], expected[-2:])
    in_place = x.clone()
    quantize_dequantize(in_place, encoding.scale, encoding.offset, 8, inplace=True, clamp_first=bounds)
    assert torch.equal(in_place[:-3], expected[:-3])
    assert fused_calls == ["_qdq", "_qdq_into_input"]
    unclamped = _eager(lambda: quantize_dequantize(x, encoding.scale, encoding.offset, 8), monkeypatch)
    assert (unclamped[:-3] != expected[:-3]).sum() > 1000  # the clamp changed values the grid alone keeps
