"""Random search in the same space: genotypes sampled at random, within a MACs range. No training.

Each sample keeps, in every node of every cell, each (input, op) pair with a probability p drawn once
per genotype from U(0.05, 1) (at least one pair per node), so the samples span sparse to dense; a
sample whose MACs (search width) fall outside `search.random.macs_fraction` × the dense
super-network's is drawn again. `search.random.count` distinct genotypes are emitted at once.
"""

from __future__ import annotations

import random
from typing import Any

from dnad.config import SearchConfig
from dnad.data import DatasetBundle
from dnad.genotype import Genotype, reduction_indices
from dnad.ops import resolve_op_set
from dnad.search import EpochSearch, emission, register_strategy

MAX_TRIES = 20000


def dense_genotype(cfg: SearchConfig) -> Genotype:
    """Every pair of the space kept: the super-network as a genotype."""
    s = cfg.supernet
    ops = resolve_op_set(s.ops)
    cell = tuple(tuple((i, o) for i in range(k + 2) for o in ops) for k in range(s.nodes))
    return Genotype(cells=(cell,) * s.cells, reductions=reduction_indices(s.cells))


def sample_genotypes(cfg: SearchConfig, cost: Any, rng: random.Random) -> list[Genotype]:
    """`cfg.random.count` distinct random genotypes whose MACs (`cost(g)[0]`) lie in the range."""
    s, r = cfg.supernet, cfg.random
    ops = resolve_op_set(s.ops)
    dense = cost(dense_genotype(cfg))[0]
    lo, hi = r.macs_fraction[0] * dense, r.macs_fraction[1] * dense
    out: dict[str, Genotype] = {}
    for _ in range(MAX_TRIES):
        if len(out) == r.count:
            break
        p = rng.uniform(0.05, 1.0)
        cells = []
        for _c in range(s.cells):
            nodes = []
            for k in range(s.nodes):
                pairs = [(i, o) for i in range(k + 2) for o in ops]
                nodes.append(tuple(q for q in pairs if rng.random() < p) or (rng.choice(pairs),))
            cells.append(tuple(nodes))
        g = Genotype(cells=tuple(cells), reductions=reduction_indices(s.cells))
        if lo <= cost(g)[0] <= hi:
            out.setdefault(g.arch_id, g)
    return list(out.values())


@register_strategy("random")
class RandomSearch(EpochSearch):
    """Random genotypes of the search space (see the module docstring); done after one 'epoch'."""

    uses_teacher = False

    @staticmethod
    def images_per_epoch(n_train: int) -> int:
        return 0  # nothing is trained

    def __init__(self, cfg: SearchConfig, data: DatasetBundle, teacher: Any = None, device: Any = "cpu",
                 callback: Any = None, rank: int = 0, world_size: int = 1, augment: bool = True,
                 teacher_val_acc: float | None = None):  # fmt: skip
        super().__init__(cfg, data, None, device, callback, rank, world_size, augment)

    def cost(self, g: Genotype) -> tuple[int, int]:
        from dnad.cells import resolve_stem
        from dnad.complexity import genotype_cost

        d, s = self.data, self.cfg.supernet
        return genotype_cost(
            g, s.C, d.num_classes, d.in_channels, d.image_size, resolve_stem(s.stem, d.image_size)
        )

    def run_epoch(self) -> None:
        found = sample_genotypes(self.cfg, self.cost, random.Random(self.cfg.seed))
        for k, g in enumerate(found):
            self.emissions.append(emission(k, 0, 0, g, self.cost(g), float("nan"), k == len(found) - 1))
        self.epoch, self.done = 1, True

    def steps_in_epoch(self) -> int:
        return 0
