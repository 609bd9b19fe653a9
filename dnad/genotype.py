"""The genotype: a derived architecture as data (frozen, canonical JSON, sha256 id).

A genotype lists, for every cell and every intermediate node, the kept `(input state, op)` pairs.
State numbering inside a cell: 0 = previous cell's output, 1 = two cells back, 2.. = nodes.
Cells are free-form (the non-shared topology of SNPS): any number of pairs per node, several ops on
one input. Classic DARTS genotypes convert with `from_darts`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 1

Pair = tuple[int, str]
Node = tuple[Pair, ...]
CellSpec = tuple[Node, ...]


def reduction_indices(num_cells: int) -> tuple[int, ...]:
    """Reduction cells of the DARTS skeleton: cells//3 and 2*cells//3 (deduplicated for tiny nets)."""
    return tuple(sorted({num_cells // 3, 2 * num_cells // 3}))


@dataclass(frozen=True)
class Genotype:
    """A derived architecture. `cells[c][k]` = kept pairs of node k+2 of cell c (sorted)."""

    cells: tuple[CellSpec, ...]
    reductions: tuple[int, ...]
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        canon = tuple(
            tuple(tuple(sorted((int(i), str(o)) for i, o in node)) for node in cell) for cell in self.cells
        )
        object.__setattr__(self, "cells", canon)
        object.__setattr__(self, "reductions", tuple(sorted(int(r) for r in self.reductions)))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on an impossible genotype (reads of future states, empty nodes, bad ops)."""
        from dnad.ops import OPS

        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"genotype format_version {self.format_version} != supported {FORMAT_VERSION}")
        if not self.cells:
            raise ValueError("a genotype needs at least one cell")
        for r in self.reductions:
            if not 0 <= r < len(self.cells):
                raise ValueError(f"reduction index {r} outside 0..{len(self.cells) - 1}")
        for c, cell in enumerate(self.cells):
            if not cell:
                raise ValueError(f"cell {c} has no nodes")
            for k, node in enumerate(cell):
                if not node:
                    raise ValueError(f"cell {c} node {k + 2} keeps no pair")
                if len(set(node)) != len(node):
                    raise ValueError(f"cell {c} node {k + 2} lists a pair twice: {list(node)}")
                for i, op in node:
                    if not 0 <= i < k + 2:
                        raise ValueError(f"cell {c} node {k + 2} reads state {i}, which is not computed yet")
                    if op not in OPS:
                        raise ValueError(f"cell {c} node {k + 2}: unknown op {op!r}")

    # -- identity -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "reductions": list(self.reductions),
            "cells": [[[[i, o] for i, o in node] for node in cell] for cell in self.cells],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Genotype:
        unknown = set(d) - {"format_version", "reductions", "cells"}
        if unknown:
            raise ValueError(f"unknown genotype keys {sorted(unknown)}")
        return cls(
            cells=tuple(
                tuple(tuple((int(i), str(o)) for i, o in node) for node in cell) for cell in d["cells"]
            ),
            reductions=tuple(d["reductions"]),
            format_version=int(d.get("format_version", FORMAT_VERSION)),
        )

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace — the bytes the id is computed from."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        return cls.from_dict(json.loads(text))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @property
    def arch_id(self) -> str:
        """Short architecture id: the first 16 hex digits of the canonical JSON's sha256."""
        return self.sha256[:16]

    def save(self, path: str | Path) -> None:
        from dnad.checkpoint import atomic_write_text

        atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Genotype:
        return cls.from_json(Path(path).read_text())

    # -- facts ----------------------------------------------------------------------------------
    @property
    def num_cells(self) -> int:
        return len(self.cells)

    @property
    def num_pairs(self) -> int:
        """Kept (input, op) pairs over the whole network."""
        return sum(len(node) for cell in self.cells for node in cell)


def from_darts(
    normal: Sequence[tuple[str, int]],
    reduce: Sequence[tuple[str, int]],
    num_cells: int,
    nodes: int = 4,
) -> Genotype:
    """Expand a classic DARTS genotype (shared normal/reduce cells, 2 inputs per node) to every cell.

    DARTS lists `(op, input)` two per node and numbers the cell inputs the other way round
    (0 = two cells back, 1 = previous cell); we swap them.
    """

    def convert(spec: Sequence[tuple[str, int]]) -> CellSpec:
        if len(spec) != 2 * nodes:
            raise ValueError(f"a DARTS cell lists 2 pairs per node: expected {2 * nodes}, got {len(spec)}")
        swap = {0: 1, 1: 0}
        return tuple(tuple((swap.get(i, i), op) for op, i in spec[2 * k : 2 * k + 2]) for k in range(nodes))

    reds = reduction_indices(num_cells)
    n, r = convert(normal), convert(reduce)
    return Genotype(cells=tuple(r if c in reds else n for c in range(num_cells)), reductions=reds)


# The published DARTS-V2 cell (Liu et al. 2019), in DARTS' own numbering.
DARTS_V2_NORMAL = [
    ("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
    ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2),
]  # fmt: skip
DARTS_V2_REDUCE = [
    ("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
    ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1),
]  # fmt: skip
