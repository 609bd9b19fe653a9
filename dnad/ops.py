"""Operation registry: name -> factory(C_in, C_out, stride, affine) -> nn.Module.

The registry is the single source of truth for what a search space may contain; tests parametrize
over it. Depthwise convolutions come from `dnad.fastops` so every op gets the CPU-fast kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dnad.fastops import depthwise_conv

OpFactory = Callable[[int, int, int, bool], nn.Module]
OPS: dict[str, OpFactory] = {}


def register_op(name: str) -> Callable[[OpFactory], OpFactory]:
    """Decorator adding a factory under `name`; a duplicate name is an error."""

    def deco(fn: OpFactory) -> OpFactory:
        if name in OPS:
            raise ValueError(f"op {name!r} is already registered")
        OPS[name] = fn
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
            nn.BatchNorm2d(C_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU -> depthwise k×k (dilated) -> pointwise 1×1 -> BN."""

    starts_with_relu = True

    def from_relu(self, x_relu: torch.Tensor) -> torch.Tensor:
        """The op applied to an input that has already been through ReLU (shared across ops)."""
        for m in list(self)[1:]:
            x_relu = m(x_relu)
        return x_relu

    def __init__(self, C_in: int, C_out: int, k: int, stride: int, dilation: int, affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            depthwise_conv(C_in, k, stride=stride, dilation=dilation),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """DARTS separable conv: (ReLU -> dw k×k -> pw -> BN) twice; stride on the first half."""

    starts_with_relu = True

    def from_relu(self, x_relu: torch.Tensor) -> torch.Tensor:
        return self[1](self[0].from_relu(x_relu))

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
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    starts_with_relu = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_relu(self.relu(x))

    def from_relu(self, x: torch.Tensor) -> torch.Tensor:
        # the one-pixel-offset branch is zero-padded at the far edge: identical to DARTS for even
        # sizes, and it keeps both halves the same size for odd ones (7×7 -> 4×4)
        b = self.conv_2(nn.functional.pad(x[:, :, 1:, 1:], (0, 1, 0, 1)))
        return self.bn(torch.cat([self.conv_1(x), b], dim=1))


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


@register_op("none")
def _none(C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    return Zero(C_out, stride)


@register_op("max_pool_3x3")
def _max_pool(C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    return _with_channels(nn.MaxPool2d(3, stride=stride, padding=1), C_in, C_out, affine)


@register_op("avg_pool_3x3")
def _avg_pool(C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    pool = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
    return _with_channels(pool, C_in, C_out, affine)


@register_op("skip_connect")
def _skip(C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    if stride == 2:
        return FactorizedReduce(C_in, C_out, affine)
    if C_in != C_out:
        return ReLUConvBN(C_in, C_out, 1, 1, 0, affine)
    return nn.Identity()


@register_op("sep_conv_3x3")
def _sep3(C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    return SepConv(C_in, C_out, 3, stride, affine)


@register_op("sep_conv_5x5")
def _sep5(C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    return SepConv(C_in, C_out, 5, stride, affine)


@register_op("dil_conv_3x3")
def _dil3(C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    return DilConv(C_in, C_out, 3, stride, 2, affine)


@register_op("dil_conv_5x5")
def _dil5(C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    return DilConv(C_in, C_out, 5, stride, 2, affine)


def is_identity(op: nn.Module) -> bool:
    """True for ops that drop-path must leave alone (identity skips)."""
    return isinstance(op, nn.Identity)


def apply_edge(
    edge: nn.Module, states: list[torch.Tensor], i: int, relu: dict[int, torch.Tensor]
) -> torch.Tensor:
    """`edge(states[i])`; an op that starts with ReLU takes ReLU(states[i]) from `relu`, computed once
    per state and shared by every such op of the cell (same values, one ReLU instead of many)."""
    if getattr(edge, "starts_with_relu", False):
        if i not in relu:
            relu[i] = torch.relu(states[i])
        return edge.from_relu(relu[i])
    return edge(states[i])
