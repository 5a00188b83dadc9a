"""The fused CPU kernels (Inductor) against the eager passes: same values bit for bit, the same gradients in
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


def _train_step(encoding: Encoding, x: torch.Tensor, grad_out: torch.Tensor, range_learning: bool) -> list:
    """Output and the gradients of input, scale and offset for ``grad_out``."""
    inp = x.clone().requires_grad_()
    scale = encoding.scale.clone().requires_grad_(range_learning)
    offset = encoding.offset.clone().requires_grad_(range_learning)
    out = quantize_dequantize(inp, scale, offset, 8)
    out.backward(grad_out)
    return [out, inp.grad, scale.grad, offset.grad]


@pytest.mark.parametrize("range_learning", [False, True])
def test_training_takes_one_pass_each_way_with_the_eager_gradients(fused_calls, monkeypatch, range_learning):
    encoding = Encoding.from_range(-3.0, 5.0, 8, symmetric=False)
    x = _large_input(encoding)
    grad_out = torch.randn_like(x)
    expected = _eager(lambda: _train_step(encoding, x, grad_out, range_learning), monkeypatch)
    assert fused_calls == []
    out, grad_in, grad_scale, grad_offset = _train_step(encoding, x, grad_out, range_learning)
    assert torch.equal(out, expected[0]) and torch.equal(grad_in, expected[1])
    assert (grad_in == 0).float().mean() > 0.05  # clipped values really got no gradient
    if range_learning:  # sums over 1 M values, in another order
        torch.testing.assert_close(grad_scale, expected[2], rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(grad_offset, expected[3], rtol=1e-4, atol=1e-3)
        assert grad_scale.abs() > 1 and grad_offset.abs() > 1e-2
    assert fused_calls == ["_qdq", "_lsq_backward" if range_learning else "_ste_backward"]


def test_a_backward_compiler_failure_runs_the_same_ops_eagerly(monkeypatch, caplog):
    compiled = fused_cpu._compiled

    def backward_fails(kernel):  # noqa: ANN001, ANN202
        def fail(*args):  # noqa: ANN002, ANN202
            raise RuntimeError("InductorError: out of memory")

        return fail if "backward" in kernel.__name__ else compiled(kernel)

    encoding = Encoding.from_range(-3.0, 5.0, 8, symmetric=False)
    x = _large_input(encoding)
    grad_out = torch.randn_like(x)
    expected = _eager(lambda: _train_step(encoding, x, grad_out, True), monkeypatch)
    monkeypatch.setattr(fused_cpu, "_disabled", False)
    monkeypatch.setattr(fused_cpu, "_compiled", backward_fails)
    result = _train_step(encoding, x, grad_out, True)
    assert torch.equal(result[1], expected[1]) and fused_cpu._disabled and "out of memory" in caplog.text
    torch.testing.assert_close(result[2], expected[2], rtol=1e-4, atol=1e-2)


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
