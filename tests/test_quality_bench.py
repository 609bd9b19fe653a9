"""Comparing strategies (`dnad.quality`, `benchmarks/quality.py`): hypervolume by hand, bootstrap intervals
that shrink with agreement and catch a real difference, and the driver's analysis of a run folder."""

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dnad.quality import Search, compare, hypervolume, searches


@pytest.fixture(scope="module")
def quality(load_benchmark):
    return load_benchmark("quality")


def test_hypervolume_by_hand():
    # two points vs ref (0.5, 10): (err .2, 6) and (err .1, 8): areas 0.3*2 + 0.4*2 = 1.4
    assert hypervolume(np.array([0.2, 0.1]), np.array([6.0, 8.0])) == pytest.approx(1.4)
    # a dominated point adds nothing; a point beyond the reference point adds nothing
    assert hypervolume(np.array([0.2, 0.1, 0.3, 0.6]), np.array([6.0, 8.0, 7.0, 5.0])) == pytest.approx(1.4)
    assert hypervolume(np.array([]), np.array([])) == 0.0


def _search(tid, strategy, seed, errors, macs=(1e6, 1e7)):
    return Search(
        tid, strategy, seed, tuple(f"{tid}-{i}" for i in range(len(macs))), np.log10(macs), np.array(errors)
    )


def test_a_method_better_on_every_seed_and_repeat_has_a_difference_interval_above_zero():
    found = []
    for seed in range(4):
        noise = 0.002 * seed
        found.append(_search(f"a{seed}", "dnad", seed, [[0.10 + noise, 0.11], [0.08, 0.08 + noise]]))
        found.append(_search(f"b{seed}", "snps", seed, [[0.14 + noise, 0.15], [0.12, 0.12 + noise]]))
    res = compare(found, [("dnad", "snps")], n_boot=300)
    d = res["differences"]["dnad - snps"]
    assert d["diff"] > 0 and d["lo"] > 0 and d["p_gt_0"] == 1.0
    m = res["methods"]["dnad"]
    assert m["lo"] <= m["hv"] <= m["hi"] and m["seeds"] == 4 and len(m["per_seed"]) == 4


def test_equal_methods_give_an_interval_around_zero():
    rng = np.random.default_rng(0)
    found = [
        _search(f"{m}{s}", m, s, 0.1 + 0.02 * rng.random((2, 2))) for s in range(6) for m in ("dnad", "snps")
    ]
    d = compare(found, [("dnad", "snps")], n_boot=300)["differences"]["dnad - snps"]
    assert d["lo"] < 0 < d["hi"]


def test_an_architecture_belongs_to_every_search_that_emitted_it():
    archs = pd.DataFrame({"arch_id": ["x", "y"], "macs": [1e6, 2e6], "sources": ["t00#0;t01#3", "t01#1"]})
    retrained = pd.DataFrame({"arch_id": ["x", "x", "y", "y"], "repeat": [0, 1, 0, 1],
                              "val_error": [0.1, 0.2, 0.3, np.nan], "status": ["ok", "ok", "ok", "failed"]})  # fmt: skip
    got = {s.trial_id: s for s in searches(archs, retrained, [{"trial_id": "t00", "strategy": "dnad", "seed": 0},
                                                            {"trial_id": "t01", "strategy": "snps", "seed": 0}])}  # fmt: skip
    assert got["t00"].arch_ids == ("x",) and got["t01"].arch_ids == ("x", "y")
    assert np.isnan(got["t01"].errors[1, 1]) and got["t01"].hv() > 0


def test_the_driver_composes_one_pipeline_run(quality, tmp_path):
    a = quality.argparse.Namespace(profile="quick", out=str(tmp_path), strategies=["dnad", "random"], seeds=3,
                                   first_seed=5, repeats=2, overrides=["retrain.epochs=2"])  # fmt: skip
    cmd = quality.pipeline_command(a)
    assert cmd[:2] == [sys.executable, str(Path(__file__).resolve().parents[1] / "pipeline/run.py")]
    assert {"sweep.strategy=[dnad,random]", "sweep.num_samples=3", "search.seed=5", "retrain.repeats=2",
            "retrain.epochs=2"} <= set(cmd)  # fmt: skip


@pytest.mark.slow
@pytest.mark.ray
def test_the_driver_analyses_a_finished_run(quality, smoke_run, tmp_path):
    import shutil

    shutil.copytree(smoke_run, tmp_path / "run")
    res = quality.analyse(tmp_path, "python benchmarks/quality.py --profile tiny", n_boot=50)
    assert set(res["methods"]) == {"dnad"} and res["methods"]["dnad"]["seeds"] == 2
    md = (tmp_path / "quality.md").read_text()
    assert "| strategy | searches | mean hypervolume | 95 % interval |" in md and "| dnad | 2 |" in md
    assert len(pd.read_csv(tmp_path / "quality.csv")) == 2
    assert (tmp_path / "quality.html").stat().st_size > 100_000
    assert (
        "- complete: 2 of 2 searches complete (2 ended), compared on seed(s) " in md and "PARTIAL" not in md
    )
    ok, wanted = map(int, re.search(r"(\d+) of (\d+) retrainings", md).groups())
    assert ok == wanted > 0
    # a run stopped before one retraining finished is analysed on the rest and says so
    run = tmp_path / "run"
    (run / "retrained.parquet").unlink(missing_ok=True)
    key = sorted(run.glob("retrain/*.result.json"))[0].name.removesuffix(".result.json")
    for f in run.glob(f"retrain/{key}.*"):
        f.unlink()
    res = quality.analyse(tmp_path, "python benchmarks/quality.py --profile tiny", n_boot=50)
    md = (tmp_path / "quality.md").read_text()
    n = int(re.search(r"\*\*PARTIAL\*\*: (\d+) of 2 searches complete \(2 ended\)", md).group(1))
    assert n < 2 and f"; {ok - 1} of {wanted} retrainings" in md
    # only seeds whose searches are all complete are compared: the incomplete search is never scored
    # (the tiny profile's two searches share one seed, so here nothing is compared yet)
    compared = md.count("| compared |")
    assert res["methods"].get("dnad", {"seeds": 0})["seeds"] == compared < 2 and "| retraining |" in md
