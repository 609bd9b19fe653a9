"""Operation registry: name -> factory(C_in, C_out, stride, affine) -> nn.Module.

The registry is the single source of truth for what a search space may contain; tests parametrize
over it. Depthwise convolutions come from `dnad.fastops` so every op gets the CPU-fast kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dnad.fastops import (
    BatchNorm2d,
    batch_norm_train,
    depthwise_conv,
    inner_format,
    layout_of,
    merge_phases,
    phase,
    relayout,
    split_phases,
)

OpFactory = Callable[[int, int, int, bool], nn.Module]
OPS: dict[str, OpFactory] = {}


@dataclass(frozen=True)
class OpInfo:
    """How reports show an op: a short label for legends and hover text, and a colour (None: a stable
    colour derived from the name)."""

    short: str
    color: str | None = None


OP_INFO: dict[str, OpInfo] = {}


def register_op(
    name: str, *, short: str | None = None, color: str | None = None
) -> Callable[[OpFactory], OpFactory]:
    """Decorator adding a factory `(C_in, C_out, stride, affine) -> nn.Module` under `name`; a
    duplicate name is an error. `short` / `color`: its legend label and colour in the figures. Its
    cost (MACs, params) is counted on the built module (`dnad.complexity.op_cost`)."""

    def deco(fn: OpFactory) -> OpFactory:
        if name in OPS:
            raise ValueError(f"op {name!r} is already registered")
        OPS[name] = fn
        OP_INFO[name] = OpInfo(short or name, color)
        return fn

    return deco


OP_SETS: dict[str, tuple[str, ...]] = {
    "reference": ("sep_conv_3x3", "skip_connect", "dil_conv_5x5"),
    "darts8": (
        "none",
        "max_pool_3x3",
        "avg_pool_3x3",
        "skip_connect",
        "sep_conv_3x3",
        "sep_conv_5x5",
        "dil_conv_3x3",
        "dil_conv_5x5",
    ),
}


def resolve_op_set(ops: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Op-set name or explicit names -> validated tuple of registered op names."""
    names = OP_SETS.get(ops) if isinstance(ops, str) else tuple(ops)
    if names is None:
        raise ValueError(f"unknown op set {ops!r}; choose one of {sorted(OP_SETS)} or list op names")
    if not names:
        raise ValueError("the op set is empty; give at least one op, e.g. 'reference'")
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; registered ops: {sorted(OPS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate op names in {list(names)}")
    return tuple(names)


def build_op(name: str, C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    """Instantiate a registered op."""
    return OPS[name](C_in, C_out, stride, affine)


class ReLUConvBN(nn.Sequential):
    """ReLU -> k×k conv -> BN (used for preprocessing and channel changes)."""

    def __init__(self, C_in: int, C_out: int, k: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, k, stride=stride, padding=padding, bias=False),
            BatchNorm2d(C_out, affine=affine),
        )


def scaled_bn(bn: nn.BatchNorm2d, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`bn(x) * scale` for a 0-d `scale` (a super-network mixing weight) in one BN call.

    For a non-affine BN the scale rides in as BN's per-channel weight: the backward then needs no
    extra pass over the map (no `grad * w` tensor, no dot product for d/dw: BN's own weight grad sums
    to it). Running statistics are updated exactly as `bn(x)` would.
    """
    plain = type(bn) not in (nn.BatchNorm2d, BatchNorm2d) or bn._forward_hooks or bn._forward_pre_hooks
    if plain or bn.affine or bn.momentum is None or not bn.track_running_stats:  # e.g. SyncBatchNorm
        return bn(x) * scale
    weight = scale.expand(bn.num_features).contiguous()
    if not bn.training:
        return F.batch_norm(x, bn.running_mean, bn.running_var, weight, None, False, bn.momentum, bn.eps)
    bn.num_batches_tracked.add_(1)
    return batch_norm_train(x, bn.running_mean, bn.running_var, weight, None, bn.momentum, bn.eps)


class Phased(NamedTuple):
    """An op's output still in the 2×2 polyphase domain (`fastops.split_phases` of an (h, w) map)."""

    y: torch.Tensor
    h: int
    w: int
    fmt: torch.memory_format  # the layout of the merged map

    def merge(self) -> torch.Tensor:
        return merge_phases(self.y, self.h, self.w, self.fmt)


class StateViews:
    """A cell's states and what ops derive from them: ReLU(state), its 2×2 polyphase components, its
    even/odd phase. Each is computed once per state and shared by every op that reads that state, so
    autograd also sums their grads before the one backward copy."""

    def __init__(self, states: list[torch.Tensor | None]):
        self.states = states
        self._memo: dict[tuple, torch.Tensor] = {}

    def _get(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def relu(self, i: int) -> torch.Tensor:
        return self._get(("relu", i), lambda: torch.relu(self.states[i]))

    def phases(self, i: int, fmt: torch.memory_format) -> torch.Tensor:
        """`split_phases(ReLU(state i))` in layout `fmt`."""
        return self._get(("phases", i, fmt), lambda: split_phases(self.relu(i), fmt))

    def phase(self, i: int, a: int, fmt: torch.memory_format) -> torch.Tensor:
        """`phase(ReLU(state i), a)` in layout `fmt`."""
        return self._get(("phase", i, a, fmt), lambda: phase(self.relu(i), a, fmt))


class DilConv(nn.Sequential):
    """ReLU -> depthwise k×k (dilated) -> pointwise 1×1 -> BN."""

    starts_with_relu = True
    takes_scale = True

    def from_views(
        self, views: StateViews, i: int, scale: torch.Tensor | None = None
    ) -> torch.Tensor | Phased:
        """The op on state i (times `scale`, see `scaled_bn`), reusing the cell's shared ReLU and
        polyphase components.

        A dilated conv running in the polyphase domain keeps going there through the 1×1 conv and BN
        (both act per pixel; on an even-sized map BN's batch statistics see exactly the map's values)
        and returns `Phased`: the node's weighted sum interleaves it back for free.
        """
        x = views.relu(i)
        dw = self[1]
        impl = dw.active_impl(x)
        if impl not in ("poly", "poly_cl"):
            return self.from_relu(x, scale)
        inner = inner_format(impl)
        if dw.stride[0] == 2:
            y = dw.undilated(views.phase(i, 0, inner))
            return self._tail(relayout(y, layout_of(x)), scale)
        h, w = x.shape[2], x.shape[3]
        if h % 2 or w % 2:
            return self.from_relu(x, scale)
        return Phased(self._tail(dw.undilated(views.phases(i, inner)), scale), h, w, layout_of(x))

    def from_relu(self, x_relu: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The op applied to an input that has already been through ReLU (shared across ops)."""
        return self._tail(self[1](x_relu), scale)

    def _tail(self, y: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """1×1 conv -> BN (times `scale`)."""
        y = self[2](y)
        return self[3](y) if scale is None else scaled_bn(self[3], y, scale)

    def __init__(self, C_in: int, C_out: int, k: int, stride: int, dilation: int, affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            depthwise_conv(C_in, k, stride=stride, dilation=dilation),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            BatchNorm2d(C_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """DARTS separable conv: (ReLU -> dw k×k -> pw -> BN) twice; stride on the first half."""

    starts_with_relu = True
    takes_scale = True

    def from_relu(self, x_relu: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        # the middle ReLU may work in place: BN's backward needs its input, not its output
        return self[1].from_relu(torch.relu_(self[0].from_relu(x_relu)), scale)

    def __init__(self, C_in: int, C_out: int, k: int, stride: int, affine: bool = True):
        super().__init__(
            DilConv(C_in, C_in, k, stride, 1, affine),
            DilConv(C_in, C_out, k, 1, 1, affine),
        )


class FactorizedReduce(nn.Module):
    """Halve the resolution with two offset stride-2 1×1 convs, concatenated (DARTS)."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even C_out, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, bias=False)  # runs on the odd/odd phase
        self.bn = BatchNorm2d(C_out, affine=affine)

    starts_with_relu = True
    takes_scale = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_relu(self.relu(x))

    def from_relu(self, x: torch.Tensor) -> torch.Tensor:
        # the one-pixel-offset branch, DARTS' conv_2(x[:, :, 1:, 1:]) at stride 2, reads the odd/odd
        # phase; zero-padded at the far edge: identical to DARTS for even sizes, and both halves keep
        # the same size for odd ones (7×7 -> 4×4)
        return self._join(x, phase(x, 1))

    def from_views(self, views: StateViews, i: int, scale: torch.Tensor | None = None) -> torch.Tensor:
        x = views.relu(i)
        return self._join(x, views.phase(i, 1, layout_of(x)), scale)

    def _join(self, x: torch.Tensor, x_odd: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.cat([self.conv_1(x), self.conv_2(x_odd)], dim=1)
        return self.bn(y) if scale is None else scaled_bn(self.bn, y, scale)


class Zero(nn.Module):
    """The DARTS `none` op: zeros of the output shape."""

    def __init__(self, C_out: int, stride: int):
        super().__init__()
        self.C_out, self.stride = C_out, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        s = self.stride
        return x.new_zeros(n, self.C_out, (h + s - 1) // s, (w + s - 1) // s)


def _with_channels(pool: nn.Module, C_in: int, C_out: int, affine: bool) -> nn.Module:
    if C_in == C_out:
        return pool
    return nn.Sequential(pool, ReLUConvBN(C_in, C_out, 1, 1, 0, affine))


@register_op("none", short="none", color="#CCCCCC")
def _none(C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    return Zero(C_out, stride)


@register_op("max_pool_3x3", short="max", color="#D55E00")
def _max_pool(C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    return _with_channels(nn.MaxPool2d(3, stride=stride, padding=1), C_in, C_out, affine)


@register_op("avg_pool_3x3", short="avg", color="#E69F00")
def _avg_pool(C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    pool = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
    return _with_channels(pool, C_in, C_out, affine)


@register_op("skip_connect", short="skip", color="#7F7F7F")
def _skip(C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    if stride == 2:
        return FactorizedReduce(C_in, C_out, affine)
    if C_in != C_out:
        return ReLUConvBN(C_in, C_out, 1, 1, 0, affine)
    return nn.Identity()


@register_op("sep_conv_3x3", short="sep3", color="#0072B2")
def _sep3(C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    return SepConv(C_in, C_out, 3, stride, affine)


@register_op("sep_conv_5x5", short="sep5", color="#56B4E9")
def _sep5(C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    return SepConv(C_in, C_out, 5, stride, affine)


@register_op("dil_conv_3x3", short="dil3", color="#009E73")
def _dil3(C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    return DilConv(C_in, C_out, 3, stride, 2, affine)


@register_op("dil_conv_5x5", short="dil5", color="#7FC97F")
def _dil5(C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    return DilConv(C_in, C_out, 5, stride, 2, affine)


def is_identity(op: nn.Module) -> bool:
    """True for ops that drop-path must leave alone (identity skips)."""
    return isinstance(op, nn.Identity)


def apply_edge(
    edge: nn.Module, views: StateViews, i: int, scale: torch.Tensor | None = None
) -> torch.Tensor | Phased:
    """`edge(views.states[i])` (times `scale`; only for edges with `takes_scale`), sharing per-state
    work across the cell's ops: an op that starts with ReLU takes ReLU(state) (and polyphase
    components) from `views`, computed once per state. Dilated convs may return `Phased` (see
    `DilConv.from_views`)."""
    if scale is not None and not getattr(edge, "takes_scale", False):
        raise ValueError(f"{type(edge).__name__} cannot fold a scale into its output")
    extra = () if scale is None else (scale,)
    if hasattr(edge, "from_views"):
        return edge.from_views(views, i, *extra)
    if getattr(edge, "starts_with_relu", False):
        return edge.from_relu(views.relu(i), *extra)
    return edge(views.states[i])
