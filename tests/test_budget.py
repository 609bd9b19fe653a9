"""Stage budgets that scale with the data (`dnad.budget`): the `quick` profile on Fashion-MNIST runs as
it always did, a small dataset gets more epochs, and the shrink constants follow the steps taken."""

import math

import pytest

from dnad.budget import epochs_for, plan_retrain, plan_search, steps_per_epoch
from dnad.config import RetrainConfig, SearchConfig
from pipeline.config import build_config, retrain_plan, search_plan


def test_steps_per_epoch_drop_the_last_partial_batch_and_honour_the_cap():
    assert steps_per_epoch(4000, 64) == 62 and steps_per_epoch(4000, 64, world_size=2) == 31
    assert steps_per_epoch(4000, 64, cap=10) == 10 and steps_per_epoch(63, 64) == 0
    assert epochs_for(5, 300, 62) == 5 and epochs_for(5, 300, 20) == 15 and epochs_for(1, 0, 0) == 1


def test_quick_on_fashion_mnist_is_unchanged_by_the_budgets():
    cfg = build_config("quick", None, [])
    plan = search_plan(cfg, {}, 4000)  # 62 steps per epoch: 310 >= min_steps
    s = cfg.search
    assert (plan.config.epochs, plan.config.warmup_epochs, plan.steps, plan.shrink_scale) == (5, 1, 310, 1.0)
    sh, got = s.shrink, plan.config.shrink
    # the tuned constants come out bit for bit (r = 248 / 248 exactly)
    assert (got.t_max, got.n_max, got.phi, got.k, got.tau) == (sh.t_max, sh.n_max, sh.phi, sh.k, sh.tau)
    assert got.tuned_steps is None and plan.config.min_steps == 0
    assert retrain_plan(cfg, 16000).epochs == cfg.retrain.epochs == 1  # 250 steps >= min_steps


def test_a_small_dataset_gets_more_epochs_and_rescaled_shrink_constants():
    cfg = build_config("quick", None, [])
    plan = search_plan(cfg, {}, 1293)  # 20 steps per epoch
    c = plan.config
    assert c.epochs == 15 and c.warmup_epochs == 3 and plan.steps == 300  # 1/5 of the run stays warm-up
    r = (15 - 3) * 20 / 248
    assert plan.shrink_scale == pytest.approx(r)
    sh = cfg.search.shrink
    assert c.shrink.t_max == round(sh.t_max * r) and c.shrink.n_max == pytest.approx(sh.n_max / r)
    assert c.shrink.phi == pytest.approx(sh.phi ** (1 / r)) and c.shrink.tau == pytest.approx(
        sh.tau ** (1 / r)
    )
    # over the run, the pressure grows by the same factor when shrinking stalls throughout
    assert c.shrink.phi ** ((15 - 3) * 20) == pytest.approx(sh.phi**248)
    assert retrain_plan(cfg, 1293).epochs == math.ceil(cfg.retrain.min_steps / 20) == 8


def test_a_large_dataset_keeps_its_epochs_and_stretches_the_schedule():
    s = SearchConfig(epochs=5, warmup_epochs=1, min_steps=300,
                     shrink={"t_max": 8, "n_max": 0.5, "phi": 1.05, "k": 0.99, "tau": 0.9, "tuned_steps": 248})  # fmt: skip
    plan = plan_search(s, 937)  # all 60,000 images
    assert plan.config.epochs == 5 and plan.steps == 4685
    assert plan.config.shrink.t_max == round(8 * 4 * 937 / 248)
    no_tuning = plan_search(
        s.model_copy(update={"shrink": s.shrink.model_copy(update={"tuned_steps": None})}), 937
    )
    assert (
        no_tuning.config.shrink == s.shrink.model_copy(update={"tuned_steps": None})
        and no_tuning.shrink_scale == 1
    )
    assert plan_retrain(RetrainConfig(epochs=3, min_steps=0), 5).epochs == 3
    assert plan_retrain(RetrainConfig(epochs=3, min_steps=100), 5).epochs == 20
