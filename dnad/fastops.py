"""CPU-fast depthwise convolutions with exactly the numerics of `nn.Conv2d(..., groups=C)`.

PyTorch hands CPU convolutions to oneDNN, whose fast depthwise kernels only cover part of what the
DARTS ops need (timings on a 2-core AVX-512 CPU, batch 64, `benchmarks/depthwise_speed.py`):

* NCHW input: forward and input-grad run a fast depthwise kernel after reordering to a blocked
  layout, but the weight grad of a 5×5 and the input and weight grads of any dilated conv fall back
  to im2col + GEMM, 5-15× slower per FLOP than the 3×3 kernel.
* channels_last input: no reorders, and the 5×5 weight grad uses a (dense, but vectorised) direct
  kernel instead of GEMM; dilated convs are still slow there.
* a dilation-2 conv is an undilated conv on the 2×2 polyphase components of its input (stride 1:
  all four phases, batched into the batch dimension; stride 2: only the even/even phase), so it
  gets the fast undilated kernels.  It is still a convolution with the same MACs, so MAC counters
  that look at aten convolution ops see the same work.

`DepthwiseConv2d` picks, per (kernel, dilation, stride), the variant measured fastest; every
variant returns the output (and the input grad) in the memory format of the input, so callers see
no layout change.  `reference_kernels()` switches every module back to the plain `F.conv2d`.

On channels_last float maps the CPU runs dnad's own kernels where they build (`dnad.native`): every
depthwise conv directly (no polyphase split), its backward on dnad's kernels (oneDNN's forward; see
`_NativeDepthwise`), and `BatchNorm2d`'s training-mode forward and backward. A forward that needs no
autograd graph and is small (`NATIVE_FORWARD_MACS`: a deployed model at small batches) runs on dnad's
direct forward kernel whatever the input's layout. `set_cpu_kernels("aten")` or
`aten_kernels()` turns them off (PyTorch's kernels: the same results to float rounding).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from dnad import native

Impl = Literal["plain", "cl", "poly", "poly_cl", "native"]
IMPLS: tuple[Impl, ...] = ("plain", "cl", "poly", "poly_cl", "native")
CpuKernels = Literal["auto", "aten"]

# a process-wide depth counter, not thread-local: MAC counting may trace a model on another thread,
# and falling back costs only speed, never numerics
_reference_depth = 0
_reference_lock = threading.Lock()


def reference_active() -> bool:
    """True inside `reference_kernels()`."""
    return _reference_depth > 0


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Within the block, every `DepthwiseConv2d` runs the plain `F.conv2d` of `nn.Conv2d`.

    Used while counting MACs: counters that trace aten ops must see the textbook convolution (the
    polyphase form pads odd sizes to even ones, so it would over-count 7×7 maps slightly).
    """
    global _reference_depth
    with _reference_lock:
        _reference_depth += 1
    try:
        yield
    finally:
        with _reference_lock:
            _reference_depth -= 1


_cpu_kernels: CpuKernels = "auto"


def set_cpu_kernels(mode: CpuKernels) -> None:
    """Process-wide: `auto` runs dnad's native CPU kernels where they build (`dnad.native`), `aten`
    PyTorch's own. Ray workers set it from `ray.kernels`."""
    global _cpu_kernels
    if mode not in ("auto", "aten"):
        raise ValueError(f"unknown CPU kernels {mode!r}; choose auto or aten")
    _cpu_kernels = mode


def cpu_kernels() -> CpuKernels:
    return _cpu_kernels


@contextlib.contextmanager
def aten_kernels() -> Iterator[None]:
    """PyTorch's own kernels within the block (benchmarks and tests compare the two)."""
    was = _cpu_kernels
    set_cpu_kernels("aten")
    try:
        yield
    finally:
        set_cpu_kernels(was)


def describe_cpu_kernels() -> str:
    """What CPU training runs on, for run headers and benchmark records."""
    if _cpu_kernels == "aten":
        return "PyTorch's (kernels=aten)"
    lib = native.library()
    return lib.describe() if lib is not None else f"PyTorch's ({native.reason()})"


def native_for(x: torch.Tensor, any_layout: bool = False) -> native.Native | None:
    """dnad's native kernels when they may run on `x`: a 4-D channels_last (or, with `any_layout`,
    any) float32/float64 CPU map with real storage (not a fake or functional tensor of a tracer),
    kernels `auto`, outside `reference_kernels()` and outside tracing, compilation and export (they
    must see PyTorch ops); else None."""
    if (
        _cpu_kernels != "auto"
        or type(x) is not torch.Tensor
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or x.dim() != 4
        or not (any_layout or x.is_contiguous(memory_format=torch.channels_last))
        or reference_active()
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or getattr(torch.compiler, "is_exporting", lambda: False)()  # torch >= 2.5
    ):
        return None
    return native.library()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _suffix(x: torch.Tensor) -> str:
    return "f32" if x.dtype == torch.float32 else "f64"


class _NativeDepthwise(torch.autograd.Function):
    """Depthwise conv (weight (C, 1, k, k)) of a channels_last map whose backward runs on
    `dnad.native`; output and input grad channels_last.

    Per part, whichever kernel measured faster (2026-12-07, an AMD EPYC VM with AVX2, one thread,
    batch 64, the densest `quick` network's shapes): the forward is oneDNN's (its direct dilated
    kernel included: 0.18-0.66 ms against 0.29-0.97 native), the input grad dnad's (0.15-1.35 ms
    against 0.32-51.8 ms: oneDNN's dilated and strided ones fall back to slow paths), the weight
    grad dnad's for 5×5 and dilated kernels (0.40-1.37 ms against 12.8-17.1 ms, a generic kernel in
    oneDNN) and oneDNN's for undilated 3×3 ones (0.21-0.34 ms against 0.19-0.60).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, stride: int, dilation: int, padding: int):
        c = x.shape[1]
        y = F.conv2d(x, weight.to(x.dtype), None, stride, padding, dilation, c)
        ctx.save_for_backward(x, weight.detach().to(x.dtype).contiguous())
        ctx.geometry = (stride, dilation, padding)
        ctx.weight_dtype = weight.dtype
        return y.contiguous(memory_format=torch.channels_last)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor):
        x, wt = ctx.saved_tensors
        stride, dilation, padding = ctx.geometry
        n, c, h, w = x.shape
        k = wt.shape[-1]
        g = g.to(x.dtype).contiguous(memory_format=torch.channels_last)
        need_x, need_w = ctx.needs_input_grad[:2]
        aten_w = need_w and k == 3 and dilation == 1
        gx = torch.empty_like(x, memory_format=torch.channels_last) if need_x else None
        gw = torch.empty_like(wt) if need_w and not aten_w else None
        if gx is not None or gw is not None:
            fn = getattr(native.library().lib, f"dnad_dw_backward_{_suffix(x)}")
            fn(x.data_ptr(), wt.data_ptr(), g.data_ptr(), _ptr(gx), _ptr(gw), n, h, w, c, g.shape[2], g.shape[3],
               k, stride, dilation, padding, torch.get_num_threads())  # fmt: skip
        if aten_w:
            gw = torch.ops.aten.convolution_backward(
                g,
                x,
                wt,
                None,
                [stride] * 2,
                [padding] * 2,
                [dilation] * 2,
                False,
                [0, 0],
                c,
                [False, True, False],
            )[1]
        return gx, None if gw is None else gw.to(ctx.weight_dtype), None, None, None


def native_depthwise(
    x: torch.Tensor, weight: torch.Tensor, stride: int, dilation: int, padding: int
) -> torch.Tensor:
    """`F.conv2d(x, weight, None, stride, padding, dilation, groups=C)` of a channels_last map, its
    backward on `dnad.native` (check `native_for(x)` first)."""
    return _NativeDepthwise.apply(x, weight, stride, dilation, padding)


# Below this many multiply-accumulates a call, an inference forward runs dnad's direct kernel: oneDNN's
# depthwise forward costs 65-120 µs a call however small the map, dnad's 19-32 µs at batch 1 (both
# kernels called directly, one thread, 2026-12-07, AMD EPYC with AVX2); the two were level at
# 0.5-1.8 M MACs, and oneDNN's is faster above. `benchmarks/depthwise_speed.py --inference` times
# the modules.
NATIVE_FORWARD_MACS = 500_000


def native_depthwise_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int,
    dilation: int,
    padding: int,
    out_hw: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The same convolution by dnad's direct forward kernel, without autograd (inference): a
    channels_last float CPU map in (check `native_for(x)`), channels_last out."""
    n, c, h, w = x.shape
    k = weight.shape[-1]
    if out_hw is None:
        out_hw = _out_hw((h, w), k, stride, dilation, padding)
    ho, wo = out_hw
    if weight.dtype != x.dtype or not weight.is_contiguous():
        weight = weight.detach().to(x.dtype).contiguous()
    y = torch.empty((n, c, ho, wo), dtype=x.dtype, memory_format=torch.channels_last)
    getattr(native.library().lib, f"dnad_dw_forward_{_suffix(x)}")(
        x.data_ptr(), weight.data_ptr(), y.data_ptr(), n, h, w, c, ho, wo, k, stride, dilation, padding,
        torch.get_num_threads(),
    )  # fmt: skip
    return y


def _out_hw(hw: tuple[int, ...], k: int, s: int, d: int, p: int) -> tuple[int, int]:
    return (hw[0] + 2 * p - d * (k - 1) - 1) // s + 1, (hw[1] + 2 * p - d * (k - 1) - 1) // s + 1


class _NativeBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of a channels_last map by `dnad.native`: batch statistics, running
    statistics updated in place as `F.batch_norm` does (unbiased variance), output channels_last."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, running_mean, running_var, momentum: float, eps: float):
        lib = native.library()
        n, c, h, w = x.shape
        y = torch.empty_like(x, memory_format=torch.channels_last)
        mean, invstd = x.new_empty(c), x.new_empty(c)
        wd = None if weight is None else weight.detach().to(x.dtype).contiguous()
        bd = None if bias is None else bias.detach().to(x.dtype).contiguous()
        fn = getattr(lib.lib, f"dnad_bn_forward_{_suffix(x)}")
        fn(x.data_ptr(), _ptr(wd), _ptr(bd), y.data_ptr(), mean.data_ptr(), invstd.data_ptr(), _ptr(running_mean),
           _ptr(running_var), n * h * w, c, float(momentum), float(eps), torch.get_num_threads())  # fmt: skip
        ctx.save_for_backward(x, wd, mean, invstd)
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor):
        x, wd, mean, invstd = ctx.saved_tensors
        n, c, h, w = x.shape
        g = g.to(x.dtype).contiguous(memory_format=torch.channels_last)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = torch.empty_like(x, memory_format=torch.channels_last) if need_x else None
        gw = x.new_empty(c) if need_w else None
        gb = x.new_empty(c) if need_b else None
        fn = getattr(native.library().lib, f"dnad_bn_backward_{_suffix(x)}")
        fn(x.data_ptr(), g.data_ptr(), _ptr(wd), mean.data_ptr(), invstd.data_ptr(), _ptr(gx), _ptr(gw), _ptr(gb),
           n * h * w, c, torch.get_num_threads())  # fmt: skip
        wdt, bdt = ctx.dtypes
        return (
            gx,
            None if gw is None else gw.to(wdt),
            None if gb is None else gb.to(bdt),
            None,
            None,
            None,
            None,
        )


def batch_norm_train(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """`F.batch_norm(x, running_mean, running_var, weight, bias, training=True, momentum, eps)`, on
    dnad's native kernels where `native_for(x)` allows (more than one value per channel, running
    statistics of x's dtype)."""
    n, _, h, w = x.shape if x.dim() == 4 else (0, 0, 0, 0)
    stats_ok = all(
        t is None or (t.dtype == x.dtype and t.is_contiguous()) for t in (running_mean, running_var)
    )
    if n * h * w > 1 and stats_ok and native_for(x) is not None:
        return _NativeBatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps)
    return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)


class BatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` (the same parameters, buffers and state dict) whose training-mode forward
    runs `batch_norm_train`: dnad's native kernel on channels_last CPU maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.momentum is None or native_for(x) is None:
            return super().forward(x)
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        stats = self.track_running_stats
        return batch_norm_train(
            x, self.running_mean if stats else None, self.running_var if stats else None, self.weight, self.bias,
            self.momentum, self.eps,
        )  # fmt: skip


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last if `x` is stored that way (and not also plain-contiguous), else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _Relayout(torch.autograd.Function):
    """`x.contiguous(memory_format=fmt)` whose backward restores the caller's layout for the grad.

    A bare `.contiguous()` has an identity backward, so a channels_last grad would leak upstream
    and slow every op there; this keeps the module layout-neutral in both directions.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
        ctx.fmt_in = layout_of(x)
        return x.contiguous(memory_format=fmt)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.contiguous(memory_format=ctx.fmt_in), None


def relayout(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """`x` in layout `fmt`; its grad goes back in x's own layout."""
    if x.is_contiguous(memory_format=fmt):
        return x
    return _Relayout.apply(x, fmt)


PHASE_OFFSETS = ((0, 0), (0, 1), (1, 0), (1, 1))  # row/column offset of each phase, in stacking order


def _phase_slices(size: int) -> tuple[int, int]:
    """Rows of the even and the odd phase of a `size`-long axis."""
    return (size + 1) // 2, size // 2


def split_phases_of(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """(n, c, h, w) -> (4n, c, ⌈h/2⌉, ⌈w/2⌉): the 2×2 polyphase components stacked along the batch
    (even/even, even/odd, odd/even, odd/odd), zero-padded where an odd size leaves a phase short.
    Not differentiable (custom backward passes use it); `split_phases` is."""
    n, c, h, w = x.shape
    hs, ws = _phase_slices(h), _phase_slices(w)
    out = torch.empty((4 * n, c, hs[0], ws[0]), dtype=x.dtype, device=x.device, memory_format=fmt)
    for i, (a, b) in enumerate(PHASE_OFFSETS):
        dst = out[i * n : (i + 1) * n]
        dst[:, :, : hs[a], : ws[b]].copy_(x[:, :, a::2, b::2])
        dst[:, :, hs[a] :].zero_()  # no-ops for even sizes; for odd ones, 'same' padding reads zeros there
        dst[:, :, :, ws[b] :].zero_()
    return out


def _merge_phases(y: torch.Tensor, h: int, w: int, fmt: torch.memory_format) -> torch.Tensor:
    """Inverse of `split_phases_of` for an output of size (h, w): interleave the four phases back."""
    n = y.shape[0] // 4
    hs, ws = _phase_slices(h), _phase_slices(w)
    out = torch.empty((n, y.shape[1], h, w), dtype=y.dtype, device=y.device, memory_format=fmt)
    for i, (a, b) in enumerate(PHASE_OFFSETS):
        out[:, :, a::2, b::2].copy_(y[i * n : (i + 1) * n, :, : hs[a], : ws[b]])
    return out


def inner_format(impl: Impl) -> torch.memory_format:
    """The layout a polyphase variant runs its undilated conv in."""
    return torch.channels_last if impl == "poly_cl" else torch.contiguous_format


class _Phases(torch.autograd.Function):
    """`split_phases_of` with a one-copy backward (autograd's own would copy twice via reshapes)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
        ctx.shape, ctx.fmt_in = x.shape, layout_of(x)
        return split_phases_of(x, fmt)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _merge_phases(grad, ctx.shape[2], ctx.shape[3], ctx.fmt_in), None


def split_phases(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """(n, c, h, w) -> (4n, c, ⌈h/2⌉, ⌈w/2⌉) in layout `fmt`: the 2×2 polyphase components stacked along
    the batch (even/even, even/odd, odd/even, odd/odd); differentiable, grad in x's layout."""
    return _Phases.apply(x, fmt)


def merge_phases(y: torch.Tensor, h: int, w: int, fmt: torch.memory_format) -> torch.Tensor:
    """Inverse of `split_phases` for an (h, w) map, in layout `fmt`; differentiable."""
    return _Unphases.apply(y, h, w, fmt)


class _Unphases(torch.autograd.Function):
    """`_merge_phases` whose backward hands the conv its grad in the conv's own layout."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, h: int, w: int, fmt: torch.memory_format) -> torch.Tensor:
        ctx.fmt_in = layout_of(y)
        return _merge_phases(y, h, w, fmt)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return split_phases_of(grad, ctx.fmt_in), None, None, None


class _Phase(torch.autograd.Function):
    """`x[:, :, a::2, a::2]` (a = 0: even/even phase, a = 1: odd/odd) copied into layout `fmt`, zero-padded
    to ⌈h/2⌉ × ⌈w/2⌉; the backward scatters into zeros of x's own layout.

    Slicing autograd's way would hand back a grad in the default (NCHW) layout, and that mixed layout
    slows every op upstream in the backward pass (a ReLU backward on a mixed pair ran 10× slower).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: int, fmt: torch.memory_format) -> torch.Tensor:
        ctx.shape, ctx.fmt_in, ctx.a = x.shape, layout_of(x), a
        n, c, h, w = x.shape
        src = x[:, :, a::2, a::2]
        hs, ws = _phase_slices(h)[0], _phase_slices(w)[0]
        if src.shape[2:] == (hs, ws):
            return src.contiguous(memory_format=fmt)
        out = torch.empty((n, c, hs, ws), dtype=x.dtype, device=x.device, memory_format=fmt).zero_()
        out[:, :, : src.shape[2], : src.shape[3]].copy_(src)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        a = ctx.a
        gx = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.fmt_in).zero_()
        dst = gx[:, :, a::2, a::2]
        dst.copy_(grad[:, :, : dst.shape[2], : dst.shape[3]])
        return gx, None, None


def phase(x: torch.Tensor, a: int, fmt: torch.memory_format | None = None) -> torch.Tensor:
    """x[:, :, a::2, a::2] zero-padded to ⌈h/2⌉ × ⌈w/2⌉ (a ∈ {0, 1}), in layout `fmt` (default: x's);
    its grad comes back in x's layout. A stride-2 1×1 conv of `x` shifted by one pixel (DARTS'
    FactorizedReduce) is a 1×1 conv of `phase(x, 1)`."""
    return _Phase.apply(x, a, layout_of(x) if fmt is None else fmt)


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise k×k conv, 'same' padding, no bias: an `nn.Conv2d` with a faster CPU forward.

    Parameters, state dict, init and output are those of
    `nn.Conv2d(C, C, k, stride, dilation * (k - 1) // 2, dilation, groups=C, bias=False)`.
    `impl` forces one variant (benchmarks, tests); `None` runs dnad's native kernel on channels_last
    float CPU maps where it builds (`native_for`), else dispatches on the measured table.
    """

    def __init__(self, C: int, k: int, stride: int = 1, dilation: int = 1, impl: Impl | None = None):
        if k % 2 == 0:
            raise ValueError(f"depthwise_conv needs an odd kernel size for 'same' padding, got {k}")
        super().__init__(
            C, C, k, stride=stride, padding=dilation * (k - 1) // 2, dilation=dilation, groups=C, bias=False
        )
        if impl is not None and impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}; choose one of {IMPLS}")
        if impl in ("poly", "poly_cl") and (dilation != 2 or stride not in (1, 2)):
            raise ValueError(f"impl {impl!r} needs dilation 2 and stride 1 or 2")
        self.impl: Impl | None = impl

    def choose_impl(self, x: torch.Tensor) -> Impl:
        """The variant `forward` runs for input `x` (ignores `reference_kernels()`)."""
        if self.impl is not None:
            return self.impl
        if x.device.type != "cpu":
            # the table is the CPU's; on CUDA the rewrites only add kernel launches: measured on an
            # H200 (benchmarks/supernet_speed.py --preset paper-cifar), the search step ran at 297
            # img/s with the table and 415 img/s with plain cuDNN convolutions
            return "plain"
        if native_for(x) is not None or self._inference_hw(x) is not None:
            return "native"
        key = (self.kernel_size[0], self.dilation[0], self.stride[0])
        if key == (3, 1, 1) and x.dim() == 4 and x.shape[-1] < 24:
            return "plain"  # oneDNN's NCHW 3×3 kernel wins on small maps
        return _TABLE.get(key, "plain")

    def active_impl(self, x: torch.Tensor) -> Impl:
        """The variant `forward` runs for `x` now: `choose_impl`, or plain inside `reference_kernels()`
        and for non-4-D input."""
        return "plain" if reference_active() or x.dim() != 4 else self.choose_impl(x)

    def _inference_hw(self, x: torch.Tensor) -> tuple[int, int] | None:
        """The output's (height, width) when this forward of `x` runs dnad's direct inference kernel
        (variant auto or native; no autograd graph needed; at most `NATIVE_FORWARD_MACS`; the native
        kernels may run on `x`, whatever its layout), else None."""
        if self.impl not in (None, "native") or x.dim() != 4 or self.weight.device.type != "cpu":
            return None
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return None
        if native_for(x, any_layout=True) is None:  # first: no shape arithmetic while tracing
            return None
        k = self.kernel_size[0]
        hw = _out_hw(x.shape[-2:], k, self.stride[0], self.dilation[0], self.padding[0])
        return hw if x.shape[0] * x.shape[1] * hw[0] * hw[1] * k * k <= NATIVE_FORWARD_MACS else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hw = self._inference_hw(x)
        if hw is not None:  # no autograd here: plain relayouts
            fmt = layout_of(x)
            y = native_depthwise_forward(x.contiguous(memory_format=torch.channels_last), self.weight,
                                         self.stride[0], self.dilation[0], self.padding[0], hw)  # fmt: skip
            return y if fmt == torch.channels_last else y.contiguous(memory_format=fmt)
        impl = self.active_impl(x)
        if impl == "plain":
            return self._conv_forward(x, self.weight, None)
        fmt = layout_of(x)
        if impl == "native":
            if native.library() is None:
                raise RuntimeError(
                    f"impl 'native' forced, but the native kernels are missing: {native.reason()}"
                )
            if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"impl 'native' runs float32/float64 CPU maps, got {x.dtype} on {x.device}")
            y = native_depthwise(relayout(x, torch.channels_last), self.weight, self.stride[0], self.dilation[0],
                                 self.padding[0])  # fmt: skip
            return relayout(y, fmt)
        if impl == "cl":
            y = self._conv_forward(relayout(x, torch.channels_last), self.weight, None)
            return relayout(y, fmt)
        # polyphase: one phase of a dilation-2 conv is an undilated conv with the same weight
        inner = inner_format(impl)
        if self.stride[0] == 2:
            # output o reads input 2o + 2(j - c) = 2(o + j - c): only the even/even phase matters
            return relayout(self.undilated(phase(x, 0, inner)), fmt)
        return _Unphases.apply(self.undilated(split_phases(x, inner)), x.shape[2], x.shape[3], fmt)

    def undilated(self, xp: torch.Tensor) -> torch.Tensor:
        """The polyphase variants' inner conv: this weight, dilation 1, stride 1, 'same' padding, run on
        `split_phases(x)` (stride 1) or `phase(x, 0)` (stride 2)."""
        return F.conv2d(xp, self.weight, None, 1, (self.kernel_size[0] - 1) // 2, 1, self.groups)


# (kernel, dilation, stride) -> variant, from `benchmarks/depthwise_speed.py --all-impls` (2-core AMD EPYC,
# 2 threads, batch 64, ms forward+backward at C=16 32×32 / C=32 16×16 / C=64 8×8):
#   3×3 s1:     plain 6.3 / 1.15 / 0.85   cl 3.3 / 1.24 / 1.05       -> cl on maps ≥ 24, else plain
#   5×5 s1:     plain 21.5 / 4.8 / 3.6    cl 7.6 / 3.5 / 1.9         -> cl
#   5×5 s2:     plain 4.1 / 2.6 / 2.2     cl 3.2 / 2.1 / 1.3         -> cl
#   3×3 d2 s1:  plain 16.2 / 5.4 / 4.0    poly_cl 4.4 / 2.4 / 1.8    -> poly_cl
#   5×5 d2 s1:  plain 37.3 / 11.0 / 7.0   poly_cl 9.0 / 4.5 / 3.0    -> poly_cl
#   3×3 d2 s2:  plain 3.6 / 2.7 / 2.9     poly_cl 1.3 / 1.0 / 0.7    -> poly_cl
#   5×5 d2 s2:  plain 7.1 / 4.2 / 3.8     poly_cl 2.1 / 1.5 / 1.1    -> poly_cl
_TABLE: dict[tuple[int, int, int], Impl] = {
    (3, 1, 1): "cl",
    (5, 1, 1): "cl",
    (5, 1, 2): "cl",
    (3, 2, 1): "poly_cl",
    (5, 2, 1): "poly_cl",
    (3, 2, 2): "poly_cl",
    (5, 2, 2): "poly_cl",
}


def depthwise_conv(C: int, k: int, stride: int = 1, dilation: int = 1) -> nn.Module:
    """A depthwise k×k conv with 'same' padding, weight shape (C, 1, k, k), no bias."""
    return DepthwiseConv2d(C, k, stride=stride, dilation=dilation)


def preferred_format(device: torch.device | str) -> torch.memory_format:
    """The activation layout training runs in on `device`: channels_last on the CPU (every depthwise
    and 1×1 conv of the DARTS ops is faster there, and the fast variants above need no relayout;
    `benchmarks/supernet_speed.py --layout` measures it), PyTorch's default elsewhere."""
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def to_layout(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """A 4-D batch in layout `fmt` (other tensors unchanged)."""
    return x.contiguous(memory_format=fmt) if x.dim() == 4 else x
