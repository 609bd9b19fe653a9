"""The dynamic search super-network of SNPS (spec §1–3).

Every cell owns its α (one row of `alpha`, shape (cells, pairs per cell)); node j mixes every
(earlier state, op) pair with ReLU-normalised weights. Pairs whose weight is below `baseline` are
not computed; after warm-up they are deleted for good (α ← -1000). Cells whose output nobody reads
any more, and cell inputs nobody reads, are not computed either.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dnad.cells import (
    CellInputs,
    CellPlan,
    Head,
    Stem,
    live_cells,
    plan_cells,
    resolve_stem,
    run_cells,
    stage_taps,
)
from dnad.fastops import PHASE_OFFSETS, layout_of, split_phases_of
from dnad.genotype import Genotype
from dnad.ops import Phased, StateViews, apply_edge, build_op, resolve_op_set

DELETED_ALPHA = -1000.0
SPARSITY_SCALE = 50.0


def node_segments(nodes: int, num_ops: int) -> list[tuple[int, int]]:
    """[start, end) of each node's slice in a cell's α row; node k (state k+2) has (k+2)*num_ops pairs."""
    segs, start = [], 0
    for k in range(nodes):
        end = start + (k + 2) * num_ops
        segs.append((start, end))
        start = end
    return segs


def fresh_sparsity(cells: int, nodes: int, num_ops: int) -> float:
    """S of a fresh super-network with unit cost weights: node j mixes j·|O| pairs at w = 1/(j·|O|)
    (72.03 per cell for 3 ops and 4 nodes). Cost-weighted sparsity keeps each cell's mean weight at 1,
    so its S starts near this figure."""
    per_cell = sum(j * num_ops * math.log1p(SPARSITY_SCALE / (j * num_ops)) for j in range(2, nodes + 2))
    return cells * per_cell


def normalise(alpha: torch.Tensor, deleted: torch.Tensor, segments: list[tuple[int, int]]) -> torch.Tensor:
    """w = ReLU(α) / Σ ReLU(α) per node segment, for every row (cell) at once.

    0/0 guard: a node whose α are all ≤ 0 keeps its strongest not-deleted entry at w = 1 (no NaN).
    """
    r = torch.relu(alpha)
    outs = []
    for a, b in segments:
        seg = r[:, a:b]
        total = seg.sum(dim=1, keepdim=True)
        dead = total <= 0
        if bool(dead.any()):
            masked = alpha[:, a:b].detach().masked_fill(deleted[:, a:b], float("-inf"))
            strongest = torch.nn.functional.one_hot(masked.argmax(dim=1), b - a).to(seg.dtype)
            seg = torch.where(dead, strongest, seg)
            total = torch.where(dead, torch.ones_like(total), total)
        outs.append(seg / total)
    return torch.cat(outs, dim=1)


def _memory_order(t: torch.Tensor) -> torch.Tensor | None:
    """t's elements as a flat view in memory order (NCHW or channels_last), or None."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)  # a view: this permutation is contiguous
    return None


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a·b over same-shape tensors without copying either when they share a layout
    (`reshape(-1)` of a channels_last tensor would copy it)."""
    fa, fb = _memory_order(a), _memory_order(b)
    if fa is not None and fb is not None and a.stride() == b.stride():
        return torch.dot(fa, fb)
    return (a * b).sum()


class WeightedSum(torch.autograd.Function):
    """Σ_k w_k·x_k into one buffer (no per-term temporaries); backward gives w and every x a grad.

    Saves memory and bandwidth in the dense super-network: the plain `Σ w_k * x_k` allocates two
    full-size tensors per term. Terms flagged `prescaled` already carry their weight (folded into the
    op's last BN, `ops.scaled_bn`): they are added as they are, get the sum's grad itself (no copy)
    and are not kept for the backward. The last terms may be in the 2×2 polyphase domain (`Phased`
    op outputs, `geometry` = the merged map's (h, w, layout)): they are added phase by phase into
    strided views of the sum, which interleaves them back without a copy; their grads come from one
    split of the sum's grad, shared by all of them.
    """

    @staticmethod
    def forward(
        ctx,
        w: torch.Tensor,
        n_plain: int,
        prescaled: tuple[bool, ...],
        geometry: tuple | None,
        *xs: torch.Tensor,
    ) -> torch.Tensor:
        ctx.n_plain, ctx.prescaled, ctx.n_terms = n_plain, prescaled, len(xs)
        ctx.phase_format = layout_of(xs[n_plain]) if n_plain < len(xs) else None
        ctx.save_for_backward(w, *[x for x, pre in zip(xs, prescaled) if not pre])
        out = None
        for k in range(n_plain):
            x = xs[k]
            if out is None:
                out = x.clone() if prescaled[k] else x * w[k]
            elif prescaled[k]:
                out.add_(x)
            else:
                out.addcmul_(x, w[k])
        if out is None:
            h, wd, fmt = geometry
            shape = (xs[0].shape[0] // 4, xs[0].shape[1], h, wd)
            out = torch.empty(shape, dtype=xs[0].dtype, device=xs[0].device, memory_format=fmt).zero_()
        for k in range(n_plain, len(xs)):
            y, n = xs[k], xs[k].shape[0] // 4
            for q, (a, b) in enumerate(PHASE_OFFSETS):
                dst, src = out[:, :, a::2, b::2], y[q * n : (q + 1) * n]
                if prescaled[k]:
                    dst.add_(src)
                else:
                    dst.addcmul_(src, w[k])
        ctx.out_format = layout_of(out)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w, *kept = ctx.saved_tensors
        n_plain, prescaled = ctx.n_plain, ctx.prescaled
        # the node's grad usually arrives as a channel slice of the cell output's grad (cat backward);
        # one dense copy here, or every op's backward below reads a strided view (BN's is 2x slower)
        g = g.contiguous(memory_format=ctx.out_format)
        gp = split_phases_of(g, ctx.phase_format) if n_plain < ctx.n_terms else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[0] else None
        grads, j = [], 0
        for k in range(ctx.n_terms):
            gk = g if k < n_plain else gp
            if prescaled[k]:
                grads.append(gk if ctx.needs_input_grad[k + 4] else None)
                continue
            x = kept[j]
            j += 1
            if grad_w is not None:
                grad_w[k] = _dot(gk, x)
            grads.append(gk * w[k] if ctx.needs_input_grad[k + 4] else None)
        return (grad_w, None, None, None, *grads)


def weighted_sum(
    w: torch.Tensor, xs: list[torch.Tensor | Phased], prescaled: list[bool] | None = None
) -> torch.Tensor:
    """Σ_k w[k]·xs[k] for (K,) weights and K same-shape maps, some of which may be `Phased`.

    `prescaled[k]`: xs[k] already includes its weight (w[k] is then not used and gets no grad here).
    """
    pre = [False] * len(xs) if prescaled is None else list(prescaled)
    plain = [k for k, x in enumerate(xs) if not isinstance(x, Phased)]
    phased = [k for k, x in enumerate(xs) if isinstance(x, Phased)]
    order = plain + phased
    geometry = (xs[phased[0]].h, xs[phased[0]].w, xs[phased[0]].fmt) if phased else None
    if phased and (geometry[0] % 2 or geometry[1] % 2):
        raise ValueError(
            f"Phased terms need an even-sized map (got {geometry[0]}x{geometry[1]}): merge them first"
        )
    tensors = [xs[k].y if isinstance(xs[k], Phased) else xs[k] for k in order]
    w_ordered = w if not phased else w[order]
    return WeightedSum.apply(w_ordered, len(plain), tuple(pre[k] for k in order), geometry, *tensors)


def node_sum(xs: list[torch.Tensor | Phased]) -> torch.Tensor:
    """Σ xs, a derived cell's node. When training, `weighted_sum` with every term prescaled: Phased
    terms are added into strided views of the sum (no merge copy each), and the backward makes the
    node's grad dense once for all terms (it arrives as a channel slice of the cell output's grad, and
    BN's backward on a strided grad ran 4-9x slower than on a dense one). Without autograd (evaluation,
    export) the plain sum of the merged terms."""
    grad = torch.is_grad_enabled() and any((x.y if isinstance(x, Phased) else x).requires_grad for x in xs)
    if not grad:
        merged = [x.merge() if isinstance(x, Phased) else x for x in xs]
        acc = merged[0]
        for x in merged[1:]:
            acc = acc + x
        return acc
    ref = xs[0].y if isinstance(xs[0], Phased) else xs[0]
    return weighted_sum(ref.new_ones(len(xs)), xs, [True] * len(xs))


class MixedCell(nn.Module):
    """A search cell: every (input state, op) pair of every node, each with its own weights."""

    def __init__(self, plan: CellPlan, op_names: tuple[str, ...]):
        super().__init__()
        self.plan, self.op_names = plan, op_names
        self.inputs = CellInputs(plan, affine=False)
        self.edges = nn.ModuleDict()
        self.pairs: list[list[tuple[int, int, str]]] = []  # per node: (column, input, edge key)
        col = 0
        for k in range(plan.nodes):
            node, row = k + 2, []
            for i in range(node):
                stride = 2 if plan.reduction and i < 2 else 1
                for op in op_names:
                    key = f"{node}_{i}_{op}"
                    self.edges[key] = build_op(op, plan.C, plan.C, stride, affine=False)
                    row.append((col, i, key))
                    col += 1
            self.pairs.append(row)
        self.num_pairs = col

    def reads(self, alive: list[bool]) -> tuple[bool, bool]:
        """Whether any alive pair reads input 0 / input 1."""
        r0 = any(alive[c] for row in self.pairs for c, i, _ in row if i == 0)
        r1 = any(alive[c] for row in self.pairs for c, i, _ in row if i == 1)
        return r0, r1

    def forward(
        self, s_prev: torch.Tensor | None, s_prev2: torch.Tensor | None, w: torch.Tensor, alive: list[bool]
    ) -> torch.Tensor:
        """s_*: (N, C_prev*, H, W); w: (pairs,) mixing weights; alive: which pairs to compute."""
        r0, r1 = self.reads(alive)
        views = StateViews(self.inputs(s_prev if r0 else None, s_prev2 if r1 else None))
        for row in self.pairs:
            cols, outs, pre = [], [], []
            for col, i, key in row:
                if not alive[col]:
                    continue
                edge = self.edges[key]
                # an op ending in a non-affine BN takes its mixing weight inside that BN
                scaled = getattr(edge, "takes_scale", False)
                outs.append(apply_edge(edge, views, i, w[col] if scaled else None))
                cols.append(col)
                pre.append(scaled)
            views.states.append(weighted_sum(w[cols], outs, pre))
        return torch.cat(views.states[2:], dim=1)


MIXINGS = ("relu", "softmax")


class SuperNet(nn.Module):
    """The search space as one network: stem, `cells` mixed cells, head. Input (N, in_channels, H, W)
    -> logits (N, num_classes).

    How α becomes mixing weights is the search strategy's choice (`mixing`): "relu" (SNPS): per node,
    ReLU(α) / Σ ReLU(α) over all its (input, op) pairs, pairs under `baseline` are not computed and
    can be deleted for good; "softmax" (DARTS): per edge (node, input), a softmax over the ops, every
    pair computed. `shared_alpha`: one α row for all normal cells and one for all reduction cells
    (DARTS' shared topology) instead of one per cell (SNPS' non-shared topology).
    """

    def __init__(
        self,
        C: int = 16,
        num_cells: int = 8,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        ops: str | tuple[str, ...] = "reference",
        nodes: int = 4,
        baseline: float = 0.01,
        alpha_init: float = 2.0,
        stem: str = "auto",
        mixing: str = "relu",
        shared_alpha: bool = False,
    ):
        super().__init__()
        if mixing not in MIXINGS:
            raise ValueError(f"unknown mixing {mixing!r}; use one of {MIXINGS}")
        self.mixing, self.shared_alpha = mixing, shared_alpha
        self.op_names = resolve_op_set(ops)
        self.C, self.num_cells, self.num_classes, self.nodes = C, num_cells, num_classes, nodes
        self.in_channels, self.image_size, self.baseline = in_channels, image_size, baseline
        self.stem_kind = resolve_stem(stem, image_size)
        self.plans = plan_cells(C, num_cells, self.stem_kind, nodes)
        self.stem = Stem(self.stem_kind, in_channels, C, affine=False)
        self.cells = nn.ModuleList(MixedCell(p, self.op_names) for p in self.plans)
        self.head = Head(self.plans[-1].C_out, num_classes)
        self.segments = node_segments(nodes, len(self.op_names))
        P = self.cells[0].num_pairs
        # cell c reads α row alpha_rows[c]: its own, or (shared) 0 for normal and 1 for reduction cells
        rows = [int(p.reduction) for p in self.plans] if shared_alpha else list(range(num_cells))
        self.register_buffer("alpha_rows", torch.tensor(rows, dtype=torch.long), persistent=False)
        self.alpha = nn.Parameter(torch.full((max(rows) + 1, P), float(alpha_init)))
        self.register_buffer("deleted", torch.zeros(num_cells, P, dtype=torch.bool))
        self.register_buffer("cost_weight", torch.ones(num_cells, P))
        self.taps = stage_taps(num_cells)

    # -- architecture state -----------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n != "alpha"]

    def cell_alpha(self) -> torch.Tensor:
        """(cells, pairs) α of every cell (rows repeated when shared), differentiable."""
        return self.alpha if not self.shared_alpha else self.alpha.index_select(0, self.alpha_rows)

    def mixing_weights(self) -> torch.Tensor:
        """(cells, pairs) normalised weights w, differentiable w.r.t. α."""
        a = self.cell_alpha()
        if self.mixing == "softmax":  # every edge's pairs are `len(ops)` consecutive columns
            return a.view(a.shape[0], -1, len(self.op_names)).softmax(-1).reshape(a.shape)
        return normalise(a, self.deleted, self.segments)

    @torch.no_grad()
    def alive_mask(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """Pairs that are computed: not deleted and (ReLU mixing) at or above `baseline`."""
        if self.mixing == "softmax":
            return ~self.deleted
        w = self.mixing_weights() if w is None else w.detach()
        return (w >= self.baseline) & ~self.deleted

    def alive_pairs(self) -> int:
        return int(self.alive_mask().sum())

    @torch.no_grad()
    def delete_below_threshold(self) -> int:
        """Delete (permanently) every not-yet-deleted pair with w < baseline; returns how many."""
        if self.mixing != "relu" or self.shared_alpha:
            raise RuntimeError("deletion is part of SNPS: per-cell α with ReLU mixing")
        newly = (self.mixing_weights() < self.baseline) & ~self.deleted
        self.deleted |= newly
        self.enforce_deleted()
        return int(newly.sum())

    @torch.no_grad()
    def enforce_deleted(self) -> None:
        """Pin deleted α at -1000 (an optimizer with momentum must not revive them)."""
        if not self.shared_alpha:  # a shared α row has no pair of its own to delete
            self.alpha.masked_fill_(self.deleted, DELETED_ALPHA)

    def sparsity(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """S = Σ cost_weight · log(1 + 50·w) over every cell, node and pair (scalar, differentiable)."""
        w = self.mixing_weights() if w is None else w
        return (torch.log1p(SPARSITY_SCALE * w) * self.cost_weight).sum()

    def set_cost_weights(self, weights: torch.Tensor) -> None:
        """Complexity-weighted sparsity: per (cell, pair) multipliers (1 everywhere = reference S)."""
        self.cost_weight.copy_(weights)

    def export(self, w: torch.Tensor | None = None) -> Genotype:
        """The derived architecture: every pair with w ≥ baseline that is not deleted."""
        alive = self.alive_mask(w).tolist()
        cells = []
        for cell, row_alive in zip(self.cells, alive):
            cells.append(
                tuple(
                    tuple((i, key.split("_", 2)[2]) for col, i, key in row if row_alive[col])
                    for row in cell.pairs
                )
            )
        return Genotype(cells=tuple(cells), reductions=tuple(p.index for p in self.plans if p.reduction))

    # -- forward ------------------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, taps: tuple[int, ...]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        w = self.mixing_weights()
        alive = self.alive_mask(w).tolist()
        live = live_cells([cell.reads(a) for cell, a in zip(self.cells, alive)], extra_needed=taps)
        runners = [
            (lambda sp, sp2, c=c: self.cells[c](sp, sp2, w[c], alive[c])) if live[c] else None
            for c in range(self.num_cells)
        ]
        out, tapped = run_cells(self.stem(x), runners, taps)
        return self.head(out), tapped

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (N, C_in, H, W) -> logits (N, classes), stage features at cells [L//3-1, 2L//3-1, L-1]."""
        logits, tapped = self._run(x, self.taps)
        return logits, [tapped[t] for t in self.taps]

    def forward(self, x: torch.Tensor, with_features: bool = False):
        """Logits, or (logits, stage features) with `with_features` (one entry point, for DDP)."""
        return self.forward_features(x) if with_features else self._run(x, ())[0]
