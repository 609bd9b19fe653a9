"""dnad.fastops: every depthwise variant matches nn.Conv2d in values, grads, shapes and state dicts."""

from __future__ import annotations

import itertools

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
