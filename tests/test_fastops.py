"""dnad.fastops: every depthwise variant matches nn.Conv2d in values, grads, shapes and state dicts."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dnad import fastops
from dnad.fastops import IMPLS, DepthwiseConv2d, depthwise_conv, reference_kernels

C = 4


def _reference(m: nn.Conv2d) -> nn.Conv2d:
    ref = nn.Conv2d(
        m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, bias=False
    )
    ref.load_state_dict(m.state_dict())
    return ref


def _impls(d: int) -> list[str | None]:
    return [None, *(i for i in IMPLS if d == 2 or not i.startswith("poly"))]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # float32 sums in a different order: absolute tolerance relative to the magnitudes involved
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def _check(m: DepthwiseConv2d, x: torch.Tensor) -> torch.Tensor:
    ref = _reference(m)
    m.weight.grad = None
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = m(x1), ref(x2)
    assert y1.shape == y2.shape
    grad = torch.randn_like(y2)
    y1.backward(grad)
    y2.backward(grad)
    _close(y1, y2)
    _close(x1.grad, x2.grad)
    _close(m.weight.grad, ref.weight.grad)
    return y1


CASES = [
    (k, d, s, hw, impl)
    for k, d, s, hw in itertools.product((3, 5), (1, 2), (1, 2), (7, 14, 16, 28, 32))
    for impl in _impls(d)
]


@pytest.mark.parametrize(("k", "d", "s", "hw", "impl"), CASES)
def test_matches_conv2d(k: int, d: int, s: int, hw: int, impl: str | None) -> None:
    torch.manual_seed(hw * 100 + k * 10 + d + s)
    m = DepthwiseConv2d(C, k, stride=s, dilation=d, impl=impl)  # type: ignore[arg-type]
    y = _check(m, torch.randn(2, C, hw, hw))
    assert y.is_contiguous()


@pytest.mark.parametrize(("k", "d", "s"), list(itertools.product((3, 5), (1, 2), (1, 2))))
@pytest.mark.parametrize("impl", IMPLS)
def test_channels_last_and_non_square(k: int, d: int, s: int, impl: str) -> None:
    if impl.startswith("poly") and d != 2:
        pytest.skip("polyphase is for dilation 2")
    torch.manual_seed(0)
    m = DepthwiseConv2d(C, k, stride=s, dilation=d, impl=impl)  # type: ignore[arg-type]
    _check(m, torch.randn(2, C, 9, 14))
    y = _check(m, torch.randn(2, C, 15, 8).contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)  # the layout of the input is kept


@pytest.mark.parametrize(("k", "d", "s"), [(3, 1, 1), (5, 2, 2), (5, 2, 1)])
def test_is_a_conv2d_with_conv2d_state_dict_and_init(k: int, d: int, s: int) -> None:
    torch.manual_seed(3)
    m = depthwise_conv(16, k, stride=s, dilation=d)
    torch.manual_seed(3)
    ref = nn.Conv2d(16, 16, k, stride=s, padding=d * (k - 1) // 2, dilation=d, groups=16, bias=False)
    assert isinstance(m, nn.Conv2d)
    assert [p for p, _ in m.named_parameters()] == ["weight"]
    sd, ref_sd = m.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd) == ["weight"]
    assert sd["weight"].shape == ref_sd["weight"].shape == (16, 1, k, k)
    torch.testing.assert_close(sd["weight"], ref_sd["weight"])  # same default (kaiming) init
    m.load_state_dict(ref_sd, strict=True)
    ref.load_state_dict(sd, strict=True)
    assert (m.stride, m.padding, m.dilation, m.groups) == (ref.stride, ref.padding, ref.dilation, ref.groups)


class _ConvLog(TorchDispatchMode):
    """Records the (input shape, dilation) of every aten convolution, as ptflops' aten backend sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.convs: list[tuple[tuple[int, ...], list[int]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.mkldnn_convolution):
            self.convs.append((tuple(args[0].shape), list(args[5])))
        return func(*args, **(kwargs or {}))


def test_reference_kernels_switches_to_plain_conv() -> None:
    m = DepthwiseConv2d(C, 5, stride=1, dilation=2, impl="poly")
    x = torch.randn(2, C, 8, 8)
    with torch.no_grad():
        with _ConvLog() as fast:
            y_fast = m(x)
        with reference_kernels(), _ConvLog() as ref:
            with reference_kernels():  # nests
                pass
            assert fastops.reference_active()
            y_ref = m(x)
        assert not fastops.reference_active()
    assert fast.convs[:1] == [((4 * 2, C, 4, 4), [1, 1])]  # the polyphase path
    assert ref.convs[:1] == [((2, C, 8, 8), [2, 2])]  # the textbook dilated conv
    _close(y_fast, y_ref)


def test_dispatch_table_covers_the_darts_convs() -> None:
    for (k, d), s in itertools.product(((3, 1), (5, 1), (3, 2), (5, 2)), (1, 2)):
        impl = DepthwiseConv2d(C, k, stride=s, dilation=d).choose_impl(torch.empty(1, C, 16, 16))
        assert impl in IMPLS and (d == 2 or not impl.startswith("poly"))
        # the table is the CPU's: on any other device the plain convolution runs
        off_cpu = torch.empty(1, C, 16, 16, device="meta")
        assert DepthwiseConv2d(C, k, stride=s, dilation=d).choose_impl(off_cpu) == "plain"


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="odd kernel"):
        DepthwiseConv2d(C, 4)
    with pytest.raises(ValueError, match="unknown impl"):
        DepthwiseConv2d(C, 3, impl="winograd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dilation 2"):
        DepthwiseConv2d(C, 3, dilation=1, impl="poly")


def _aten_grads(x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = w.shape[-1] // 2
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad, x, w, None, [1, 1], [p, p], [1, 1], False, [0, 0], w.shape[0], [True, True, False]
    )
    return gx, gw


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize(("n", "c", "h", "w"), [(2, 4, 7, 7), (3, 8, 14, 9), (1, 16, 4, 4), (2, 2, 28, 28)])
def test_depthwise_weight_grad_matches_aten(k: int, n: int, c: int, h: int, w: int) -> None:
    # float64: the four shifted 3x3 weight grads of a 5x5 cover its 25 taps exactly (not approximately)
    torch.manual_seed(k * 1000 + h * 10 + w)
    cl = torch.channels_last
    x = torch.randn(n, c, h, w, dtype=torch.float64).contiguous(memory_format=cl)
    grad = torch.randn(n, c, h, w, dtype=torch.float64).contiguous(memory_format=cl)
    weight = torch.randn(c, 1, k, k, dtype=torch.float64)
    _, gw = _aten_grads(x, weight, grad)
    torch.testing.assert_close(fastops.depthwise_weight_grad(x, grad, weight), gw, rtol=1e-12, atol=1e-12)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """A retraining trial's CPU: the fast depthwise backward runs only in a one-thread process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("k", [3, 5])
def test_fast_backward_is_taken_in_training_and_is_exact(k: int, one_thread: None) -> None:
    torch.manual_seed(k)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(3, 1, k, k, dtype=torch.float64, requires_grad=True)
    x.requires_grad_()
    y = fastops.depthwise_same(x, weight)
    assert type(y.grad_fn).__name__ == "_DepthwiseSameBackward"
    assert torch.autograd.gradcheck(fastops.depthwise_same, (x, weight))
    grad = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, weight), grad)
    ax, aw = _aten_grads(x.detach(), weight.detach(), grad.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(gx, ax, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, aw, rtol=1e-12, atol=1e-12)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    # nothing to differentiate, NCHW input, or a trace: aten's own conv
    with torch.no_grad():
        assert fastops.depthwise_same(x, weight).grad_fn is None
    nchw = x.detach().contiguous().requires_grad_()
    assert type(fastops.depthwise_same(nchw, weight).grad_fn).__name__ == "ConvolutionBackward0"
    traced = torch.jit.trace(fastops.depthwise_same, (x, weight), check_trace=False)
    assert "aten::_convolution" in str(traced.graph) or "aten::conv2d" in str(traced.graph)
    torch.set_num_threads(2)  # the search's two threads: oneDNN's own backward
    assert type(fastops.depthwise_same(x, weight).grad_fn).__name__ == "ConvolutionBackward0"


@pytest.mark.parametrize(
    ("k", "d", "impl"), [(3, 1, "cl"), (5, 1, "cl"), (3, 2, "poly_cl"), (5, 2, "poly_cl")]
)
def test_modules_train_through_the_fast_backward(k: int, d: int, impl: str, one_thread: None) -> None:
    m = DepthwiseConv2d(C, k, stride=1, dilation=d, impl=impl)  # type: ignore[arg-type]
    x = torch.randn(2, C, 12, 12).contiguous(memory_format=torch.channels_last).requires_grad_()
    seen: list[str] = []

    def walk(fn: object) -> None:  # the autograd graph's node names
        while fn is not None and not seen.count(type(fn).__name__):
            seen.append(type(fn).__name__)
            nexts = [f for f, _ in getattr(fn, "next_functions", ()) if f is not None]
            for f in nexts[1:]:
                walk(f)
            fn = nexts[0] if nexts else None

    walk(m(x).grad_fn)
    assert "_DepthwiseSameBackward" in seen
    _check(m, x.detach())  # values and grads against nn.Conv2d (also run by the tests above)
