"""benchmarks/quality.py: hypervolume, spreading, random genotypes in a MACs range, the deadline rule,
and one whole run of the tiny profile on two worker processes (then resumed)."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
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
    assert [r["macs"] for r in quality.spread(items, 1)] == [9]


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


def test_deadline_starts_only_what_can_end_in_time(quality):
    r = quality.Runner(jobs=1, threads=1, deadline=None)
    assert r.fits("retrain_task")
    r.deadline = time.monotonic() + 60
    assert r.fits("retrain_task")  # nothing measured yet: the first of a kind starts
    r._took("retrain_task", 120.0)
    assert not r.fits("retrain_task") and r.fits("search_task")
    calls = []
    assert r.map(lambda *a: calls.append(a), [(1,), (2,)], lambda item, res: None) == 0  # a new kind
    r._took("<lambda>", 3600.0)
    assert r.map(lambda *a: calls.append(a), [(3,), (4,)], lambda item, res: None) == 2
    assert calls == [(1,), (2,)]


def _run(out, *extra):
    cmd = [sys.executable, str(PATH), "--profile", "tiny", "--seeds", "0", "--max-archs", "2", "--jobs", "2",
           "--threads", "2", "--device", "cpu", "--out", str(out), *extra, f"teacher.cache_dir={out / 't'}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_whole_run_on_two_workers_then_resume(tmp_path):
    out = tmp_path / "q"
    log = _run(out)
    df = pd.read_csv(out / "quality.csv")
    assert set(df["method"]) == {"DNAD", "SNPS", "random", "hand-designed"}
    assert (df["epochs"] == 2).all() and df["test_error"].between(0, 1).all()
    assert df.groupby("method").size()["hand-designed"] == 1
    assert len(df) == len((out / "rows.jsonl").read_text().splitlines())
    for m in ("DNAD", "SNPS"):
        emitted = json.loads((out / f"emissions-{m}-0.json").read_text())["candidates"]
        assert set(df.loc[df["method"] == m, "arch_id"]) <= {c["arch_id"] for c in emitted}
    md = (out / "quality.md").read_text()
    assert "| method | seed | hypervolume | best top-1 |" in md and "2 job(s) at once" in md
    assert "no GPU used" in md and "partial" not in md
    assert (out / "quality.html").stat().st_size > 100_000
    assert "retraining" in log
    # the same command again: nothing is searched or retrained twice
    log = _run(out)
    assert "searching" not in log and f"retraining 0 architecture(s) ({len(df)} already done)" in log
    assert len(pd.read_csv(out / "quality.csv")) == len(df)


def test_deadline_zero_starts_nothing_and_says_so(tmp_path):
    out = tmp_path / "q"
    cmd = [sys.executable, str(PATH), "--profile", "tiny", "--seeds", "0", "--methods", "SNPS", "--device", "cpu",
           "--deadline-min", "0", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 search(es)/retraining(s) not started" in proc.stdout
    assert not (out / "rows.jsonl").exists()


def test_cuda_requested_without_a_gpu_is_a_clear_error(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = subprocess.run([sys.executable, str(PATH), "--profile", "tiny", "--device", "cuda", "--out",
                           str(tmp_path / "q")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "--device" in proc.stderr and "cuda" in proc.stderr
    assert not (tmp_path / "q").exists()


def test_a_retraining_stopped_part_way_resumes_from_its_last_epoch(quality, tmp_path, monkeypatch, capsys):
    from pipeline.config import build_config

    cfg = build_config("tiny", None, ["retrain.epochs=3"])
    meta = {"channels": 3, "size": 16, "classes": 5}
    cand = quality.random_genotypes(cfg, meta, 1, 10**9, 1, seed=0)[0]
    cfg_d = cfg.model_dump(mode="json")
    full = quality.retrain_task(cfg_d, "random", 0, cand, "cpu", None)

    ck = tmp_path / "ck"
    run_epoch = quality.RetrainLoop.run_epoch

    def stop_at_third(self):
        if self.epoch == 2:
            raise KeyboardInterrupt("stopped by the test")
        return run_epoch(self)

    monkeypatch.setattr(quality.RetrainLoop, "run_epoch", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        quality.retrain_task(cfg_d, "random", 0, cand, "cpu", str(ck))
    assert [p.name for p in ck.iterdir()] == ["checkpoint_000002"]  # only the newest is kept
    monkeypatch.setattr(quality.RetrainLoop, "run_epoch", run_epoch)
    resumed = quality.retrain_task(cfg_d, "random", 0, cand, "cpu", str(ck))
    assert "resumed after epoch 2 of 3" in capsys.readouterr().out
    assert resumed["epochs"] == 3 and resumed["test_acc"] == full["test_acc"]  # as if never stopped
