"""The fused CPU loops (``fused_cpu.c``) against the eager passes: same values bit for bit, the same gradients
in training, and the eager path where the loops cannot be compiled."""

from __future__ import annotations

import functools

import pytest
import torch

from edgequant.quantization import Encoding, fused_cpu, quantize_dequantize


class _Recording:
    """The compiled library, noting the name of each loop called."""

    def __init__(self, library: object, calls: list[str]) -> None:
        self.library, self.calls = library, calls

    def __getattr__(self, name: str) -> object:
        self.calls.append(name)
        return getattr(self.library, name)


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the fused loops that ran (and the fused path switched on for this test)."""
    calls: list[str] = []
    library = fused_cpu._library()
    assert library is not None, "the fused CPU loops did not compile (see the warning)"
    monkeypatch.setattr(fused_cpu, "_disabled", False)
    monkeypatch.setattr(fused_cpu, "_library", lambda: _Recording(library, calls))
    return calls


def _large_input(encoding: Encoding, random_values: int = 1 << 20) -> torch.Tensor:
    """Random values, exact ties between grid steps and their float neighbours, values far outside the range,
    signed zeros. A million values run on every thread, a thousand on one."""
    torch.manual_seed(0)
    ties = (torch.arange(-300, 300).float() + 0.5) * encoding.scale
    ties = torch.cat([ties, ties.nextafter(torch.tensor(1e9)), ties.nextafter(torch.tensor(-1e9))])
    return torch.cat([torch.randn(random_values) * 3, ties, torch.tensor([1e6, -1e6, 0.0, -0.0])])


def _eager(fn, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN001, ANN202
    with monkeypatch.context() as patch:
        patch.setattr(fused_cpu, "_disabled", True)
        return fn()


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns (tells -0.0 from 0.0 and one NaN from another)."""
    return x.view(torch.int32)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("random_values", [1 << 20, 1000])
def test_fused_forward_is_bit_identical_to_the_eager_passes(fused_calls, monkeypatch, symmetric, random_values):
    encoding = Encoding.from_range(-3.0, 5.0, 8, symmetric=symmetric)
    x = _large_input(encoding, random_values)
    expected = _eager(lambda: quantize_dequantize(x.clone(), encoding.scale, encoding.offset, 8), monkeypatch)
    assert fused_calls == []
    assert torch.equal(_bits(quantize_dequantize(x, encoding.scale, encoding.offset, 8)), _bits(expected))
    in_place = x.clone()
    version = in_place._version
    result = quantize_dequantize(in_place, encoding.scale, encoding.offset, 8, inplace=True)
    assert result.data_ptr() == in_place.data_ptr() and torch.equal(_bits(in_place), _bits(expected))
    assert in_place._version > version  # autograd sees the write, as an in-place op's
    assert fused_calls == ["quantize_dequantize"] * 2
    assert (expected != x).float().mean() > 0.9  # the input really was quantized


def _train_step(encoding: Encoding, x: torch.Tensor, grad_out: torch.Tensor, range_learning: bool,
                saved: list[torch.Tensor] | None = None) -> list:
    """Output and the gradients of input, scale and offset for ``grad_out``; what autograd saved for the
    backward is appended to ``saved``."""
    saved = [] if saved is None else saved
    inp = x.clone().requires_grad_()
    scale = encoding.scale.clone().requires_grad_(range_learning)
    offset = encoding.offset.clone().requires_grad_(range_learning)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = quantize_dequantize(inp, scale, offset, 8)
    out.backward(grad_out)
    return [out, inp.grad, scale.grad, offset.grad]


@pytest.mark.parametrize("range_learning", [False, True])
def test_training_takes_one_pass_each_way_with_the_eager_gradients(fused_calls, monkeypatch, range_learning):
    encoding = Encoding.from_range(-3.0, 5.0, 8, symmetric=False)
    specials = [float("inf"), -float("inf")] + ([] if range_learning else [float("nan")])  # NaN: a NaN scale grad
    x = torch.cat([_large_input(encoding), torch.tensor(specials)])
    grad_out = torch.randn_like(x)
    expected = _eager(lambda: _train_step(encoding, x, grad_out, range_learning), monkeypatch)
    assert fused_calls == []
    saved: list[torch.Tensor] = []
    out, grad_in, grad_scale, grad_offset = _train_step(encoding, x, grad_out, range_learning, saved)
    assert torch.equal(_bits(out), _bits(expected[0])) and torch.equal(grad_in, expected[1])
    assert grad_in[-len(specials):].eq(0).all()  # infinities and NaN are clipped: no gradient
    full_size = [t.dtype for t in saved if t.numel() == x.numel()]
    assert full_size == ([torch.float32] if range_learning else [torch.bool])  # the input, or a byte per value
    assert (grad_in == 0).float().mean() > 0.05  # clipped values really got no gradient
    if range_learning:  # sums over 1 M values, in another order (and in double)
        torch.testing.assert_close(grad_scale, expected[2], rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(grad_offset, expected[3], rtol=1e-4, atol=1e-3)
        assert grad_scale.abs() > 1 and grad_offset.abs() > 1e-2
    assert fused_calls == ["quantize_dequantize", "range_learning_grads" if range_learning else "straight_through_grad"]


@pytest.mark.parametrize("range_learning", [False, True])
def test_a_broadcast_gradient_is_read_as_its_values(fused_calls, monkeypatch, range_learning):
    """``out.sum().backward()`` hands the backward an expanded (stride 0) gradient."""
    encoding = Encoding.from_range(-3.0, 5.0, 8, symmetric=False)
    x = _large_input(encoding)

    def gradients() -> list:
        return _train_step(encoding, x, torch.tensor(3.0).expand_as(x), range_learning)[1:]

    expected = _eager(gradients, monkeypatch)
    grad_in, grad_scale, grad_offset = gradients()
    assert torch.equal(grad_in, expected[0]) and set(expected[0].unique().tolist()) == {0.0, 3.0}
    if range_learning:
        torch.testing.assert_close(grad_scale, expected[1], rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(grad_offset, expected[2], rtol=1e-4, atol=1e-3)
    assert fused_calls == ["quantize_dequantize", "range_learning_grads" if range_learning else "straight_through_grad"]


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
    assert fused_calls == ["quantize_dequantize"]  # the untraced call did fuse


@pytest.mark.parametrize(("compiler", "said"), [
    ("/nonexistent/cc", "No such file or directory"),
    ("cc --no-such-option", "--no-such-option"),
])
def test_a_compiler_failure_falls_back_to_the_eager_passes(monkeypatch, caplog, compiler, said):
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setattr(fused_cpu, "_disabled", False)
    monkeypatch.setattr(fused_cpu, "_library", functools.cache(fused_cpu._library.__wrapped__))
    encoding = Encoding.from_range(-3.0, 5.0, 8, symmetric=False)
    x = _large_input(encoding)
    expected = _eager(lambda: quantize_dequantize(x, encoding.scale, encoding.offset, 8), monkeypatch)
    assert torch.equal(quantize_dequantize(x, encoding.scale, encoding.offset, 8), expected)
    assert not fused_cpu.can_fuse(x, encoding.scale)
    warnings = [record.getMessage() for record in caplog.records if "fused CPU" in record.getMessage()]
    assert len(warnings) == 1 and said in warnings[0] and compiler.split()[0] in warnings[0]
    assert "\n" not in warnings[0]


def test_tensors_the_loops_cannot_walk_take_the_eager_passes(fused_calls):
    scale = torch.tensor(0.1)
    assert fused_cpu.can_fuse(torch.randn(8, 8), scale) and fused_cpu.can_fuse(torch.nn.Parameter(torch.ones(8)), scale)
    for x in (torch.randn(8, 8).t(), torch.randn(8, 8, dtype=torch.float64), torch.randn(2, 3, 4, 4).to(
            memory_format=torch.channels_last)):
        assert not fused_cpu.can_fuse(x, scale)
    assert not fused_cpu.can_fuse(torch.randn(8, 8), torch.full((8, 1), 0.1))  # per channel


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
    assert fused_calls == ["quantize_dequantize"] * 2
    unclamped = _eager(lambda: quantize_dequantize(x, encoding.scale, encoding.offset, 8), monkeypatch)
    assert (unclamped[:-3] != expected[:-3]).sum() > 1000  # the clamp changed values the grid alone keeps
