"""Counting params and MACs (spec §7).

* `count_complexity(model, input_shape)`: ptflops on a real network (eval mode, auxiliary head
  excluded), with the backend and ptflops version recorded. The `aten` backend counts convolution
  and matmul multiply-accumulates only; that is what "FLOPs" means in DARTS tables.
* `genotype_cost(...)`: the same numbers analytically, from a per-op cost table: cheap enough to
  run every logged search step for the super-network's alive cost.
"""

from __future__ import annotations

import contextlib
import functools
import io
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import torch
from torch import nn

from dnad.cells import live_cells, plan_cells, resolve_stem
from dnad.fastops import reference_kernels
from dnad.genotype import Genotype
from dnad.network import cell_reads

PTFLOPS_BACKEND = "aten"


@dataclass(frozen=True)
class Complexity:
    params: int
    macs: int
    backend: str
    ptflops_version: str


def count_complexity(model: nn.Module, input_shape: tuple[int, int, int]) -> Complexity:
    """Params (aux head excluded) and MACs per image of `model` in eval mode, via ptflops."""
    from ptflops import get_model_complexity_info

    was_training = model.training
    model.eval()
    aux = getattr(model, "aux_head", None)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("aux_head."))
    try:
        with torch.no_grad(), reference_kernels(), contextlib.redirect_stdout(io.StringIO()):
            macs, _ = get_model_complexity_info(
                model,
                tuple(input_shape),
                as_strings=False,
                print_per_layer_stat=False,
                backend=PTFLOPS_BACKEND,
            )
    finally:
        model.train(was_training)
    if macs is None:
        raise RuntimeError(f"ptflops could not count {type(model).__name__}")
    del aux
    return Complexity(int(params), int(macs), PTFLOPS_BACKEND, version("ptflops"))


# -- analytic per-op cost table -----------------------------------------------------------------
def _out(h: int, stride: int) -> int:
    return (h + stride - 1) // stride


def _conv(c_in: int, c_out: int, k: int, h_out: int, groups: int = 1, bias: bool = False) -> tuple[int, int]:
    params = c_out * (c_in // groups) * k * k + (c_out if bias else 0)
    return h_out * h_out * params, params


def _bn(c: int, affine: bool) -> int:
    return 2 * c if affine else 0


def op_cost(op: str, C_in: int, C_out: int, stride: int, h: int, affine: bool = True) -> tuple[int, int]:
    """(MACs, params) of registered op `op` on an h×h input (aten counting: convs and matmuls)."""
    ho = _out(h, stride)
    if op == "none":
        return 0, 0
    if op in ("max_pool_3x3", "avg_pool_3x3"):
        if C_in == C_out:
            return 0, 0
        m, p = _conv(C_in, C_out, 1, ho)
        return m, p + _bn(C_out, affine)
    if op == "skip_connect":
        if stride == 2:
            m, p = _conv(C_in, C_out // 2, 1, ho)
            return 2 * m, 2 * p + _bn(C_out, affine)
        if C_in != C_out:
            m, p = _conv(C_in, C_out, 1, ho)
            return m, p + _bn(C_out, affine)
        return 0, 0
    kind, _, size = op.split("_")
    k = int(size.split("x")[0])
    if kind == "sep":
        parts = [
            _conv(C_in, C_in, k, ho, groups=C_in),
            _conv(C_in, C_in, 1, ho),
            _conv(C_in, C_in, k, ho, groups=C_in),
            _conv(C_in, C_out, 1, ho),
        ]
        bn = _bn(C_in, affine) + _bn(C_out, affine)
    elif kind == "dil":
        parts = [_conv(C_in, C_in, k, ho, groups=C_in), _conv(C_in, C_out, 1, ho)]
        bn = _bn(C_out, affine)
    else:
        return measured_op_cost(op, C_in, C_out, stride, h, affine)
    return sum(m for m, _ in parts), sum(p for _, p in parts) + bn


@functools.lru_cache(maxsize=1024)
def measured_op_cost(
    op: str, C_in: int, C_out: int, stride: int, h: int, affine: bool = True
) -> tuple[int, int]:
    """(MACs, params) of any registered op, counted on the built module: its parameters, and the
    multiply-accumulates of its convolutions and linear layers on one h×h input (how ops registered
    without a formula of their own are costed)."""
    from dnad.ops import build_op

    module = build_op(op, C_in, C_out, stride, affine).eval()
    macs = 0

    def count(m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(m, nn.Conv2d):
            per_out = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            macs += out.numel() * per_out
        elif isinstance(m, nn.Linear):
            macs += out.numel() * m.in_features

    hooks = [
        m.register_forward_hook(count) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad(), reference_kernels():
            module(torch.zeros(1, C_in, h, h))
    finally:
        for hk in hooks:
            hk.remove()
    return macs, sum(p.numel() for p in module.parameters())


def _preprocess_cost(C_in: int, C_out: int, h_in: int, reduce: bool, affine: bool) -> tuple[int, int]:
    if reduce:
        return op_cost("skip_connect", C_in, C_out, 2, h_in, affine)
    m, p = _conv(C_in, C_out, 1, h_in)
    return m, p + _bn(C_out, affine)


def genotype_cost(
    genotype: Genotype,
    C: int,
    num_classes: int,
    in_channels: int,
    image_size: int,
    stem: str = "auto",
    affine: bool = True,
) -> tuple[int, int]:
    """(MACs, params) of `build_model(genotype, ...)` without building it (aux head excluded)."""
    stem = resolve_stem(stem, image_size)
    L = genotype.num_cells
    plans = plan_cells(C, L, stem, len(genotype.cells[0]))
    h = image_size
    if stem in ("cifar", "half"):
        h = _out(h, 2) if stem == "half" else h
        m, p = _conv(in_channels, 3 * C, 3, h)
        macs, params = m, p + _bn(3 * C, affine)
        h_prev2 = h_prev = h
    else:
        h1 = _out(h, 2)
        h2 = _out(h1, 2)
        h3 = _out(h2, 2)
        a, pa = _conv(in_channels, C // 2, 3, h1)
        b, pb = _conv(C // 2, C, 3, h2)
        c, pc = _conv(C, C, 3, h3)
        macs = a + b + c
        params = pa + pb + pc + _bn(C // 2, affine) + 2 * _bn(C, affine)
        h_prev2, h_prev = h2, h3
    reads = [cell_reads(spec) for spec in genotype.cells]
    live = live_cells(reads)
    for plan, spec, alive in zip(plans, genotype.cells, live):
        h_out = _out(h_prev, 2) if plan.reduction else h_prev
        if alive:
            r0, r1 = reads[plan.index]
            if r0:
                m, p = _preprocess_cost(plan.C_prev, plan.C, h_prev, False, affine)
                macs, params = macs + m, params + p
            if r1:
                m, p = _preprocess_cost(plan.C_prev2, plan.C, h_prev2, plan.reduction_prev, affine)
                macs, params = macs + m, params + p
            for node in spec:
                for i, op in node:
                    stride = 2 if plan.reduction and i < 2 else 1
                    # in a reduction cell only the ops on the cell inputs see the larger resolution
                    m, p = op_cost(op, plan.C, plan.C, stride, h_prev if i < 2 else h_out, affine)
                    macs, params = macs + m, params + p
        h_prev2, h_prev = h_prev, h_out
    c_last = plans[-1].C_out
    # ptflops counts the classifier's bias add as MACs too
    return macs + c_last * num_classes + num_classes, params + c_last * num_classes + num_classes


def pair_cost_table(net: torch.nn.Module, metric: str = "macs") -> torch.Tensor:
    """(cells, pairs) cost of every pair of a SuperNet (MACs or params), for weighted sparsity."""
    from dnad.supernet import SuperNet

    assert isinstance(net, SuperNet)
    h = net.image_size
    for _ in range({"cifar": 0, "half": 1, "imagenet": 3}[net.stem_kind]):
        h = _out(h, 2)
    table = torch.zeros_like(net.cost_weight)
    for plan, cell in zip(net.plans, net.cells):
        for row in cell.pairs:
            for col, i, key in row:
                op = key.split("_", 2)[2]
                stride = 2 if plan.reduction and i < 2 else 1
                h_in = h if i < 2 or not plan.reduction else _out(h, 2)
                m, p = op_cost(op, plan.C, plan.C, stride, h_in, affine=False)
                table[plan.index, col] = float(m if metric == "macs" else p)
        if plan.reduction:
            h = _out(h, 2)
    return table


def relative_cost_weights(net: torch.nn.Module, metric: str) -> torch.Tensor:
    """Per-pair sparsity multipliers: cost / mean cost of the cell's ops, floored at 0.05.

    Scaled to mean 1 per cell so S keeps the magnitude of the reference S (S_min stays meaningful);
    the floor keeps free ops (identity skips) under a little pressure.
    """
    table = pair_cost_table(net, metric)
    mean = table.mean(dim=1, keepdim=True).clamp_min(1e-12)
    return (table / mean).clamp_min(0.05)
