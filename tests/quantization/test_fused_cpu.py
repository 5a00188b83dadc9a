"""The fused CPU kernel (Inductor) against the eager passes: same values bit for bit, same gradients, and the
eager path when compilation fails."""

from __future__ import annotations

import pytest
import torch

from edgequant.quantization import Encoding, fused_cpu, quantize_dequantize


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the fused kernels that ran (and the fused path switched on for this test)."""
    calls: list[str] = []
    run = fused_cpu._run

    def counted(kernel, *args):  # noqa: ANN001, ANN202
        calls.append(kernel.__name__)
        return run(kernel, *args)

    monkeypatch.setattr(fused_cpu, "_disabled", False)
    monkeypatch.setattr(fused_cpu, "_run", counted)
    return calls


def _large_input(encoding: Encoding) -> torch.Tensor:
    """Random values, exact ties between grid steps and their float neighbours, values far outside the range."""
    torch.manual_seed(0)
    ties = (torch.arange(-300, 300).float() + 0.5) * encoding.scale
    ties = torch.cat([ties, ties.nextafter(torch.tensor(1e9)), ties.nextafter(torch.tensor(-1e9))])
    x = torch.cat([torch.randn(fused_cpu.MIN_NUMEL) * 3, ties, torch.tensor([1e6, -1e6, 0.0])])
    return x.reshape(-1, 7) if x.numel() % 7 == 0 else x


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


@pytest.mark.parametrize("learns_range", [False, True])
def test_fused_training_forward_gives_the_eager_values_and_gradients(fused_calls, monkeypatch, learns_range):
    encoding = Encoding.from_range(-2.0, 2.5, 4, symmetric=False)
    x = _large_input(encoding)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    def forward_backward() -> list[torch.Tensor]:
        leaves = [x.clone().requires_grad_(), encoding.scale.clone().requires_grad_(learns_range),
                  encoding.offset.clone().requires_grad_(learns_range)]
        out = quantize_dequantize(*leaves, 4)
        out.backward(upstream)
        return [out.detach()] + [leaf.grad for leaf in leaves if leaf.requires_grad]

    expected = _eager(forward_backward, monkeypatch)
    result = forward_backward()
    assert fused_calls == ["_qdq_with_scale_derivative" if learns_range else "_qdq_with_mask"]
    assert len(result) == (4 if learns_range else 2)
    assert torch.equal(result[0], expected[0]) and torch.equal(result[1], expected[1])
    for fused, eager in zip(result[2:], expected[2:]):  # reductions: float summation order only
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-3)
        assert eager.abs() > 1  # a real gradient, not an empty comparison


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
