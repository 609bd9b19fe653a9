"""The DARTS macro skeleton shared by the super-network and derived networks.

Stems, per-cell channel/resolution plan, input preprocessing, stage taps, and the liveness pass that
finds cells whose output nobody reads (so neither network computes them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dnad.fastops import BatchNorm2d
from dnad.genotype import reduction_indices
from dnad.ops import FactorizedReduce, ReLUConvBN


@dataclass(frozen=True)
class CellPlan:
    """Shape facts of cell `index`: its width C, whether it reduces, and its input widths."""

    index: int
    C: int
    reduction: bool
    reduction_prev: bool
    C_prev: int  # width of input 0 (previous cell)
    C_prev2: int  # width of input 1 (two cells back)
    nodes: int

    @property
    def C_out(self) -> int:
        return self.C * self.nodes


STEMS = ("cifar", "half", "imagenet")
STEM_STRIDE = {"cifar": 1, "half": 2, "imagenet": 8}  # input side / side of the first cell's input


def resolve_stem(stem: str, image_size: int) -> str:
    """'auto' by resolution: 'cifar' (stride 1) below 64 px, 'half' (a stride-2 CIFAR stem) from 64 to
    127 px, 'imagenet' (stride 8) from 128 px, so the cells work on maps of 16-63 px (an ImageNet image
    at 224 px: 28). Teachers follow the same choice (`dnad.distill.ResNetTeacher`), so the student's
    and the teacher's stage features have the same resolutions."""
    if stem == "auto":
        return "cifar" if image_size < 64 else "half" if image_size < 128 else "imagenet"
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; use one of {', '.join(STEMS)} or 'auto'")
    return stem


def plan_cells(C: int, num_cells: int, stem: str, nodes: int = 4) -> list[CellPlan]:
    """Channel plan of the skeleton. CIFAR stem outputs 3C; ImageNet stems output C (and reduce)."""
    reds = set(reduction_indices(num_cells))
    C_prev2 = C_prev = C if stem == "imagenet" else 3 * C
    reduction_prev = stem == "imagenet"
    C_cur, plans = C, []
    for i in range(num_cells):
        red = i in reds
        if red:
            C_cur *= 2
        plans.append(CellPlan(i, C_cur, red, reduction_prev, C_prev, C_prev2, nodes))
        reduction_prev = red
        C_prev2, C_prev = C_prev, C_cur * nodes
    return plans


def stage_taps(num_cells: int) -> tuple[int, int, int]:
    """Cells whose outputs feed feature distillation: [L//3-1, 2L//3-1, L-1]."""
    return (max(num_cells // 3 - 1, 0), max(2 * num_cells // 3 - 1, 0), num_cells - 1)


class Stem(nn.Module):
    """CIFAR: conv3×3 -> BN to 3C; half: the same conv at stride 2. ImageNet: two stride-2 convs
    (stem0) then a stride-2 conv (stem1).

    `forward` returns `(s_prev2, s_prev)`, the two states the first cell reads.
    """

    def __init__(self, kind: str, in_channels: int, C: int, affine: bool = True):
        super().__init__()
        self.kind = kind
        if kind in ("cifar", "half"):
            stride = STEM_STRIDE[kind]
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 3 * C, 3, stride=stride, padding=1, bias=False),
                BatchNorm2d(3 * C, affine=affine),
            )
        else:
            self.stem0 = nn.Sequential(
                nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False),
                BatchNorm2d(C // 2, affine=affine),
                nn.ReLU(inplace=True),
                nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
                BatchNorm2d(C, affine=affine),
            )
            self.stem1 = nn.Sequential(
                nn.ReLU(inplace=False),
                nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
                BatchNorm2d(C, affine=affine),
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind in ("cifar", "half"):
            s = self.stem(x)
            return s, s
        s0 = self.stem0(x)
        return s0, self.stem1(s0)


class CellInputs(nn.Module):
    """Preprocess a cell's two inputs to C channels; an input the cell never reads is not built."""

    def __init__(self, plan: CellPlan, affine: bool, reads: tuple[bool, bool] = (True, True)):
        super().__init__()
        self.pre0 = ReLUConvBN(plan.C_prev, plan.C, 1, 1, 0, affine) if reads[0] else None
        if not reads[1]:
            self.pre1 = None
        elif plan.reduction_prev:
            self.pre1 = FactorizedReduce(plan.C_prev2, plan.C, affine)
        else:
            self.pre1 = ReLUConvBN(plan.C_prev2, plan.C, 1, 1, 0, affine)

    def forward(self, s_prev: torch.Tensor | None, s_prev2: torch.Tensor | None) -> list[torch.Tensor | None]:
        return [
            self.pre0(s_prev) if self.pre0 is not None and s_prev is not None else None,
            self.pre1(s_prev2) if self.pre1 is not None and s_prev2 is not None else None,
        ]


def live_cells(reads: Sequence[tuple[bool, bool]], extra_needed: Sequence[int] = ()) -> list[bool]:
    """Which cells must be computed: backward reachability from the head (the last cell).

    `reads[c] = (reads input 0, reads input 1)` for cell c. Cell c is needed if the head reads it,
    a needed cell c+1 reads its input 0, a needed cell c+2 reads its input 1, or it is in
    `extra_needed` (e.g. a stage tap). The state window itself is untouched: a dead cell's slot
    simply holds no tensor, so later cells still find their inputs at the right distance.
    """
    n = len(reads)
    needed = [False] * n
    for c in extra_needed:
        needed[c] = True
    needed[n - 1] = True
    for c in range(n - 1, -1, -1):
        if not needed[c]:
            continue
        if reads[c][0] and c - 1 >= 0:
            needed[c - 1] = True
        if reads[c][1] and c - 2 >= 0:
            needed[c - 2] = True
    return needed


def run_cells(
    stem_states: tuple[torch.Tensor, torch.Tensor],
    cells: Sequence[Callable[[torch.Tensor | None, torch.Tensor | None], torch.Tensor] | None],
    taps: Sequence[int] = (),
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Slide the (two back, previous) state window over the cells; None cells are skipped.

    Returns the last cell's output and the outputs of the cells listed in `taps`.
    """
    s_prev2, s_prev = stem_states
    tapped: dict[int, torch.Tensor] = {}
    for c, cell in enumerate(cells):
        out = cell(s_prev, s_prev2) if cell is not None else None
        if c in taps and out is not None:
            tapped[c] = out
        s_prev2, s_prev = s_prev, out
    assert s_prev is not None, "the last cell is always live"
    return s_prev, tapped


class Head(nn.Module):
    """Global average pool -> linear."""

    def __init__(self, C_in: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x).flatten(1))
