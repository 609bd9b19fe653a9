"""Derived networks for retraining (spec §6): `build_model(genotype, ...)`.

α is gone: a node is the plain sum of its kept ops, BNs are affine, non-identity ops get drop-path,
an optional auxiliary head sits after cell 2L//3. Cells whose output nobody reads are not built.
Module paths match the super-network's (`cells.{c}.edges.{node}_{input}_{op}`), so super-network
weights load into a derived network (the parity test relies on it).
"""

from __future__ import annotations

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
from dnad.genotype import CellSpec, Genotype
from dnad.ops import Phased, StateViews, apply_edge, build_op, is_identity
from dnad.supernet import node_sum


def drop_path(x: torch.Tensor | Phased, p: float) -> torch.Tensor | Phased:
    """Zero whole samples with probability p and rescale the rest by 1/(1-p). An op's output still in
    the polyphase domain gets the draws `drop_path(x.merge(), p)` would, on each of a sample's phases."""
    if p <= 0.0:
        return x
    y = x.y if isinstance(x, Phased) else x
    n = y.shape[0] // 4 if isinstance(x, Phased) else y.shape[0]
    keep = torch.empty(n, 1, 1, 1, device=y.device, dtype=y.dtype).bernoulli_(1.0 - p)
    if isinstance(x, Phased):
        return x._replace(y=y * keep.repeat(4, 1, 1, 1) / (1.0 - p))
    return x * keep / (1.0 - p)


def auto_drop_path(num_pairs: int, num_cells: int) -> float:
    """Spec §6: p_max = 0.3 + 0.15·(n_ops − 8·cells)/112, clipped to [0, 0.6]."""
    return float(min(max(0.3 + 0.15 * (num_pairs - 8 * num_cells) / 112.0, 0.0), 0.6))


def cell_reads(spec: CellSpec) -> tuple[bool, bool]:
    return (any(i == 0 for node in spec for i, _ in node), any(i == 1 for node in spec for i, _ in node))


class DerivedCell(nn.Module):
    """A retrain cell: each node sums its kept (input, op) pairs; output = concat of the nodes."""

    def __init__(self, plan: CellPlan, spec: CellSpec, affine: bool = True):
        super().__init__()
        self.spec = spec
        self.inputs = CellInputs(plan, affine, reads=cell_reads(spec))
        self.edges = nn.ModuleDict()
        for k, node in enumerate(spec):
            for i, op in node:
                stride = 2 if plan.reduction and i < 2 else 1
                self.edges[f"{k + 2}_{i}_{op}"] = build_op(op, plan.C, plan.C, stride, affine)
        self.drop_prob = 0.0

    def forward(self, s_prev: torch.Tensor | None, s_prev2: torch.Tensor | None) -> torch.Tensor:
        views = StateViews(self.inputs(s_prev, s_prev2))
        for k, node in enumerate(self.spec):
            terms: list[torch.Tensor | Phased] = []
            for i, op in node:
                edge = self.edges[f"{k + 2}_{i}_{op}"]
                h = apply_edge(edge, views, i)
                if self.training and not is_identity(edge):
                    h = drop_path(h, self.drop_prob)
                terms.append(h)
            views.states.append(node_sum(terms))
        return torch.cat(views.states[2:], dim=1)


class AuxiliaryHead(nn.Module):
    """DARTS-style auxiliary classifier, with adaptive pooling so it fits any resolution."""

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.AdaptiveAvgPool2d(2),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class Network(nn.Module):
    """A derived network. `forward` -> logits; `forward_train` -> (logits, aux logits or None)."""

    def __init__(
        self,
        genotype: Genotype,
        C: int,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        stem: str = "auto",
        auxiliary: bool = False,
        affine: bool = True,
        keep_taps: bool = False,
    ):
        super().__init__()
        self.genotype, self.C, self.num_classes = genotype, C, num_classes
        self.in_channels, self.image_size = in_channels, image_size
        L = genotype.num_cells
        nodes = len(genotype.cells[0])
        self.stem_kind = resolve_stem(stem, image_size)
        self.plans = plan_cells(C, L, self.stem_kind, nodes)
        if tuple(p.index for p in self.plans if p.reduction) != genotype.reductions:
            raise ValueError(f"genotype reductions {genotype.reductions} do not fit a {L}-cell skeleton")
        self.taps = stage_taps(L)
        reads = [cell_reads(spec) for spec in genotype.cells]
        self.aux_index = 2 * L // 3 if auxiliary else None
        extra = tuple(self.taps) if keep_taps else ()
        live = live_cells(reads, extra_needed=extra)
        if self.aux_index is not None:
            # the auxiliary head reads the first live cell at or after 2L//3 (never forces a dead one)
            self.aux_index = next(c for c in range(self.aux_index, L) if live[c])
        self.live = live
        self.stem = Stem(self.stem_kind, in_channels, C, affine=affine)
        self.cells = nn.ModuleList(
            DerivedCell(p, spec, affine) if alive else nn.Identity()
            for p, spec, alive in zip(self.plans, genotype.cells, live)
        )
        self.head = Head(self.plans[-1].C_out, num_classes)
        self.aux_head = AuxiliaryHead(self.plans[self.aux_index].C_out, num_classes) if auxiliary else None

    def set_drop_path(self, p: float) -> None:
        for cell in self.cells:
            if isinstance(cell, DerivedCell):
                cell.drop_prob = p

    def _run(self, x: torch.Tensor, taps: tuple[int, ...]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        runners = [cell if alive else None for cell, alive in zip(self.cells, self.live)]
        return run_cells(self.stem(x), runners, taps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C_in, H, W) -> logits (N, classes)."""
        return self.head(self._run(x, ())[0])

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.aux_head is None or not self.training:
            return self.forward(x), None
        out, tapped = self._run(x, (self.aux_index,))
        return self.head(out), self.aux_head(tapped[self.aux_index])

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and stage features at cells [L//3-1, 2L//3-1, L-1] (build with keep_taps=True)."""
        out, tapped = self._run(x, self.taps)
        missing = [t for t in self.taps if t not in tapped]
        if missing:
            raise RuntimeError(f"stage cells {missing} are dead in this genotype; build with keep_taps=True")
        return self.head(out), [tapped[t] for t in self.taps]


def build_model(
    genotype: Genotype,
    C: int = 36,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    stem: str = "auto",
    auxiliary: bool = False,
    affine: bool = True,
    keep_taps: bool = False,
) -> Network:
    """Build the derived network of `genotype` (see `Network`)."""
    return Network(genotype, C, num_classes, in_channels, image_size, stem, auxiliary, affine, keep_taps)
