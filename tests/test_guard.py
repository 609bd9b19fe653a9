"""Divergence guard (no Ray): non-finite steps are skipped without a trace, K in a row abort with an
error naming the stage and the step, and the count survives a checkpoint; plus run-to-run determinism."""

import copy
import math

import pytest
import torch
from presets import tiny_data, tiny_retrain, tiny_search

from dnad.checkpoint import load_checkpoint, save_checkpoint
from dnad.data import load_dataset
from dnad.errors import DivergenceError
from dnad.genotype import Genotype
from dnad.network import build_model
from dnad.retrain import RetrainLoop
from dnad.strategies.snps import SearchLoop


@pytest.fixture(scope="module")
def data():
    return load_dataset(tiny_data())


def poison(batches, bad):
    """Make `batches.iterate` yield all-NaN images for every (epoch, batch) in `bad` (a predicate)."""
    orig = batches.iterate

    def iterate(epoch, start_batch=0):
        for b, (x, y) in enumerate(orig(epoch, start_batch), start_batch):
            yield (torch.full_like(x, float("nan")) if bad(epoch, b) else x), y

    batches.iterate = iterate


def snapshot(*objs):
    """Deep copies of the state dicts of modules / optimizers / the controller."""
    return [copy.deepcopy(o.state_dict()) for o in objs]


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_search_skips_a_nonfinite_step_without_a_trace(data):
    loop = SearchLoop(tiny_search(epochs=2), data)
    poison(loop.batches, lambda e, b: (e, b) == (0, 3))
    seen = {}
    step = loop.train_step

    def spy(x, y):
        before = snapshot(loop.module, loop.w_opt, loop.a_opt, loop.controller)
        m = step(x, y)
        if m["skipped"]:
            seen["same"] = same(before, snapshot(loop.module, loop.w_opt, loop.a_opt, loop.controller))
        return m

    loop.train_step = spy
    loop.run_epoch()
    assert loop.guard.skipped_total == 1 and loop.guard.consecutive == 0
    assert seen == {"same": True}  # weights, α, BN statistics, optimizers: all as before the bad step
    assert all(torch.isfinite(t.float()).all() for t in loop.module.state_dict().values())
    assert loop.step == loop.steps_in_epoch()  # the bad step counts, training went on


def test_search_raises_divergence_naming_stage_and_step(data):
    cfg = tiny_search(epochs=2, max_nonfinite=3)
    loop = SearchLoop(cfg, data)
    poison(loop.batches, lambda e, b: b >= 2)
    with pytest.raises(DivergenceError) as info:
        loop.run()
    e = info.value
    assert (e.stage, e.step, e.count) == ("search", 4, 3)  # steps 2, 3, 4 bad
    msg = str(e)
    assert msg.startswith("search: 3 consecutive non-finite steps up to step 4") and "\n" not in msg


def test_divergence_count_survives_a_checkpoint(data, tmp_path):
    """A resumed run continues the count: it aborts after max_nonfinite bad steps in all, not again K."""
    cfg = tiny_search(epochs=3, max_nonfinite=5)
    loop = SearchLoop(cfg, data)
    n = loop.steps_in_epoch()
    poison(loop.batches, lambda e, b: b >= n - 2)  # the last two steps of epoch 0 are bad
    loop.run_epoch()
    assert loop.guard.consecutive == 2
    save_checkpoint(tmp_path / "ck", loop.state_dict())
    resumed = SearchLoop(cfg, data)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ck"))
    poison(resumed.batches, lambda e, b: True)
    with pytest.raises(DivergenceError) as info:
        resumed.run()
    assert (info.value.step, info.value.count) == (n + 2, 5)  # 3 more bad steps, not 5


def _retrain_loop(data, **kw):
    g = SearchLoop(tiny_search(epochs=2), data).net.export()
    model = build_model(Genotype.from_json(g.to_json()), 4, data.num_classes, 3, 16, auxiliary=True)
    return RetrainLoop(tiny_retrain(**kw), model, data)


def test_retrain_skips_nonfinite_steps_and_evaluates_cleanly(data):
    torch.manual_seed(0)
    ref = _retrain_loop(data, epochs=1)
    torch.manual_seed(0)
    loop = _retrain_loop(data, epochs=1)
    poison(loop.train_batches, lambda e, b: b == 1)
    rec = loop.run()
    ref_rec = ref.run()
    assert loop.guard.skipped_total == 1
    assert all(torch.isfinite(t.float()).all() for t in loop.model.state_dict().values())
    assert math.isfinite(rec["test_loss"]) and rec["test_loss"] < 1e3  # BN statistics not poisoned
    assert 0.0 <= rec["test_acc"] <= 1.0
    assert rec["train_loss"] != ref_rec["train_loss"]  # the poisoned step really was left out


def test_retrain_raises_divergence_naming_stage_and_step(data):
    loop = _retrain_loop(data, max_nonfinite=2)
    poison(loop.train_batches, lambda e, b: b >= 1)
    with pytest.raises(DivergenceError, match=r"^retrain: 2 consecutive non-finite steps up to step 2"):
        loop.run()


def test_two_searches_with_the_same_seed_are_identical(data):
    def emissions():
        torch.manual_seed(123)  # the loop must not depend on the global RNG state it finds
        return [
            (e.arch_id, e.step, e.epoch, e.S, e.alive_pairs, e.params, e.macs)
            for e in SearchLoop(tiny_search(epochs=3), data).run()
        ]

    a = emissions()
    torch.manual_seed(7)
    b = emissions()
    assert len(a) >= 2 and a == b  # exact, floats included (CPU)
