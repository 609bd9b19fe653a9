"""The pure parts of benchmarks/quality.py: hypervolume, spreading, random genotypes in a MACs range."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from dnad.complexity import genotype_cost
from dnad.genotype import Genotype

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hypervolume_by_hand(quality):
    # two points vs ref (0.5, 10): (err .2, 6) and (err .1, 8): areas 0.3*2 + 0.4*2 = 1.4
    assert quality.hypervolume(np.array([0.2, 0.1]), np.array([6.0, 8.0])) == pytest.approx(1.4)
    # a dominated point adds nothing; a point beyond the reference point adds nothing
    assert quality.hypervolume(
        np.array([0.2, 0.1, 0.3, 0.6]), np.array([6.0, 8.0, 7.0, 5.0])
    ) == pytest.approx(1.4)
    assert quality.hypervolume(np.array([]), np.array([])) == 0.0


def test_spread_keeps_extremes(quality):
    items = [{"macs": m} for m in (5, 1, 9, 3, 7)]
    assert [r["macs"] for r in quality.spread(items, 3)] == [1, 5, 9]
    assert len(quality.spread(items, 10)) == 5


def test_random_genotypes_fall_in_the_macs_range(quality):
    from pipeline.config import build_config

    cfg = build_config("tiny", None, [])
    meta = {"channels": 3, "size": 16, "classes": 5}
    out = quality.random_genotypes(cfg, meta, 2_000_000, 4_000_000, 4, seed=0)
    assert len(out) == 4 and len({r["arch_id"] for r in out}) == 4
    for r in out:
        g = Genotype.from_json(r["genotype"])
        macs, _ = genotype_cost(g, cfg.retrain.C, 5, 3, 16, cfg.search.supernet.stem)
        assert 2_000_000 <= macs <= 4_000_000
        assert g.num_cells == cfg.search.supernet.cells
