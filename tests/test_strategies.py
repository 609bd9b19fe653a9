"""Search strategies as interchangeable parts (`dnad.search` registry, `dnad/strategies/`): DARTS and
random search in the SNPS space, each emitting the same `Emission` records."""

from __future__ import annotations

import math

import pytest
import torch
from presets import tiny_search

from dnad.config import DataConfig, SearchConfig
from dnad.data import load_dataset
from dnad.genotype import Genotype
from dnad.search import STRATEGIES, EpochSearch, make_search, register_strategy, strategy_class, uses_teacher
from dnad.strategies.darts import DartsSearch
from dnad.strategies.random_search import dense_genotype
from dnad.supernet import SuperNet


@pytest.fixture(scope="module")
def data():
    return load_dataset(DataConfig(dataset="fake", image_size=16, fake_size=256, num_classes=5, val_size=32))


def test_the_registry_knows_the_four_and_refuses_duplicates_and_unknowns():
    assert {"dnad", "snps", "darts", "random"} <= set(STRATEGIES)
    assert strategy_class("dnad").uses_teacher and not strategy_class("snps").uses_teacher
    assert uses_teacher(tiny_search(distill={"enabled": True})) and not uses_teacher(
        tiny_search(strategy="snps", distill={"enabled": True})
    )
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("darts")(type("Other", (EpochSearch,), {}))
    with pytest.raises(ValueError, match=r"unknown search strategy 'nope'; registered: darts, dnad"):
        SearchConfig(strategy="nope")


def test_softmax_mixing_is_per_edge_and_shared_rows_are_per_cell_type():
    net = SuperNet(C=4, num_cells=5, num_classes=3, image_size=16, mixing="softmax", shared_alpha=True)
    assert net.alpha.shape == (2, net.cells[0].num_pairs)
    with torch.no_grad():
        net.alpha.normal_()
    w = net.mixing_weights()
    n_ops = len(net.op_names)
    assert torch.allclose(w.view(5, -1, n_ops).sum(-1), torch.ones(5, w.shape[1] // n_ops))
    kinds = [p.reduction for p in net.plans]
    for c in range(5):
        twin = kinds.index(kinds[c])
        assert torch.equal(w[c], w[twin])  # one topology per cell type
    assert bool(net.alive_mask().all())  # DARTS computes every pair
    with pytest.raises(RuntimeError, match="deletion is part of SNPS"):
        net.delete_below_threshold()


def _darts(data, **kw):
    cfg = tiny_search(strategy="darts", epochs=3, warmup_epochs=1, **kw)
    return make_search(cfg, data)


def test_darts_emits_a_two_input_architecture_per_epoch_after_warm_up(data):
    loop = _darts(data)
    assert isinstance(loop, DartsSearch) and loop.steps_in_epoch() == (len(data.train) // 2) // 32
    a0 = loop.net.alpha.detach().clone()
    rows = []
    loop.callback = rows.append
    emissions = loop.run()
    assert [e.epoch for e in emissions] == [2, 3] and emissions[-1].final and not emissions[0].final
    assert not torch.equal(a0, loop.net.alpha.detach())  # α learnt after warm-up
    for e in emissions:
        g = Genotype.from_json(e.genotype)
        assert all(len(node) == 2 and len({i for i, _ in node}) == 2 for cell in g.cells for node in cell)
        normal = [c for k, c in enumerate(g.cells) if k not in g.reductions]
        reduce = [c for k, c in enumerate(g.cells) if k in g.reductions]
        assert len(set(normal)) == 1 and len(set(reduce)) == 1  # shared topologies
        assert e.alive_pairs == 8 * g.num_cells and e.macs > 0 and math.isnan(e.S) and 0 <= e.val_acc <= 1
    assert rows and all(math.isnan(r["S"]) and 0 <= r["val_acc"] <= 1 for r in rows)


def test_darts_trains_weights_and_alpha_on_disjoint_halves_and_resumes_exactly(data):
    loop = _darts(data)
    w_rows = {
        bytes(r) for r in loop.train_batches.split.images.reshape(len(loop.train_batches.split), -1).numpy()
    }
    a_split = loop.alpha_batches.split
    a_rows = {bytes(r) for r in a_split.images.reshape(len(a_split), -1).numpy()}
    v_rows = {bytes(r) for r in data.val.images.reshape(len(data.val), -1).numpy()}
    assert not w_rows & a_rows and not (w_rows | a_rows) & v_rows
    whole = _darts(data)
    whole.run()
    part = _darts(data)
    part.run_epoch()
    n = 0
    for x, y in part.batches.iterate(part.epoch):  # stop in the middle of epoch 1 (α is learning)
        part.train_step(x, y)
        part.batch += 1
        n += 1
        if n == 2:
            break
    state = part.state_dict()
    resumed = _darts(data)
    resumed.load_state_dict(state)
    resumed.run()
    assert [e.arch_id for e in resumed.emissions] == [e.arch_id for e in whole.emissions]
    assert torch.equal(resumed.net.alpha, whole.net.alpha)
    with pytest.raises(ValueError, match="a darts checkpoint cannot resume a dnad search"):
        make_search(tiny_search(), data).load_state_dict(state)


def test_random_search_samples_distinct_genotypes_in_the_macs_range(data):
    cfg = tiny_search(strategy="random", random={"count": 5, "macs_fraction": (0.4, 0.8)})
    loop = make_search(cfg, data)
    emissions = loop.run()
    assert loop.done and len(emissions) == 5 and len({e.arch_id for e in emissions}) == 5
    dense = loop.cost(dense_genotype(cfg))[0]
    assert all(0.4 * dense <= e.macs <= 0.8 * dense for e in emissions)
    assert [e.final for e in emissions] == [False] * 4 + [True]
    again = make_search(cfg, data).run()
    assert [e.arch_id for e in again] == [e.arch_id for e in emissions]  # seeded
    other = make_search(cfg.model_copy(update={"seed": 1}), data).run()
    assert {e.arch_id for e in other} != {e.arch_id for e in emissions}
