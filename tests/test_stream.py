"""Retraining starts at emission (`pipeline.stream`): the queue fed by the searches' emission files, and
a smoke run whose first retraining starts while a search still runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.config import build_config
from pipeline.context import RunContext
from pipeline.stream import StreamState


def _ctx(tmp_path: Path, **retrain) -> RunContext:
    over = [f"retrain.{k}={v}" for k, v in retrain.items()]
    return RunContext(build_config(None, None, over, smoke=True), tmp_path)


def _emit(out: Path, tid: str, index: int, arch: str, macs: float, val: float) -> None:
    f = out / "search" / tid / "emissions.jsonl"
    f.parent.mkdir(parents=True, exist_ok=True)
    with open(f, "a") as fh:
        fh.write(json.dumps({"trial_id": tid, "index": index, "arch_id": arch, "genotype": f"g-{arch}",
                             "macs": macs, "val_acc": val, "alive_pairs": 10, "emitted_at": 1.0}) + "\n")  # fmt: skip


def _end(out: Path, tid: str, error: str | None = None) -> None:
    (out / "search" / tid).mkdir(parents=True, exist_ok=True)
    (out / "search" / tid / "result.json").write_text(json.dumps({"finished_at": 2.0, "error": error}))


def _drain(state: StreamState) -> list:
    state.refresh()
    got = []
    while (item := state.next()) is not None:
        got.append(item)
    return got


POINTS = [{"trial_id": "t00", "seed": 0}, {"trial_id": "t01", "seed": 0}]


def test_searches_come_first_then_each_new_architecture_as_it_is_emitted(tmp_path):
    state = StreamState(_ctx(tmp_path, repeats=2), POINTS)
    assert [i["point"]["trial_id"] for i in _drain(state)] == ["t00", "t01"]
    assert not state.finished()
    _emit(tmp_path, "t00", 0, "a", 10e6, 0.5)
    _emit(tmp_path, "t01", 0, "a", 10e6, 0.5)  # the same architecture from another search: once
    assert [(i["arch"]["arch_id"], i["arch"]["repeat"]) for i in _drain(state)] == [("a", 0), ("a", 1)]
    _emit(tmp_path, "t00", 1, "b", 5e6, 0.4)
    assert [i["arch"]["genotype"] for i in _drain(state)] == ["g-b", "g-b"]
    assert _drain(state) == [] and not state.finished()  # nothing now, but the searches go on
    _end(tmp_path, "t00")
    _end(tmp_path, "t01", error="diverged")  # a failed search keeps what it emitted
    assert _drain(state) == [] and state.finished()


def test_a_resumed_run_does_not_queue_what_is_done_and_retries_failed_searches(tmp_path):
    ctx = _ctx(tmp_path)
    _emit(tmp_path, "t00", 0, "a", 10e6, 0.5)
    _emit(tmp_path, "t00", 1, "b", 5e6, 0.4)
    (tmp_path / "search" / "t00" / "emissions.json").write_text("[]")  # t00 finished earlier
    _end(tmp_path, "t00")
    _end(tmp_path, "t01", error="diverged")  # t01 failed earlier: its marker goes, it runs again
    (tmp_path / "retrain").mkdir()
    (tmp_path / "retrain" / "a.result.json").write_text(json.dumps({"status": "ok"}))
    state = StreamState(ctx, POINTS)
    assert [p["trial_id"] for p in state.searches] == ["t01"]
    assert not (tmp_path / "search" / "t01" / "result.json").exists()
    items = _drain(state)
    assert [i.get("point", {}).get("trial_id") or i["arch"]["arch_id"] for i in items] == ["t01", "b"]


def test_after_search_holds_everything_until_every_search_has_ended(tmp_path):
    state = StreamState(_ctx(tmp_path, start="after_search"), POINTS)
    _drain(state)
    _emit(tmp_path, "t00", 0, "a", 10e6, 0.5)
    _end(tmp_path, "t00")
    assert _drain(state) == []
    _emit(tmp_path, "t01", 0, "b", 5e6, 0.6)
    _end(tmp_path, "t01")
    assert [i["arch"]["arch_id"] for i in _drain(state)] == ["a", "b"] and state.finished()


@pytest.mark.parametrize(("rest", "later"), [("after_search", ["c"]), ("none", [])])
def test_front_streams_the_non_dominated_and_the_rest_waits_or_goes(tmp_path, rest, later):
    state = StreamState(_ctx(tmp_path, stream="front", rest=rest), POINTS[:1])
    _drain(state)
    _emit(tmp_path, "t00", 0, "a", 10e6, 0.50)
    _emit(tmp_path, "t00", 1, "b", 6e6, 0.55)  # cheaper and better: on the front
    _emit(tmp_path, "t00", 2, "c", 8e6, 0.45)  # dominated by b: held
    assert [i["arch"]["arch_id"] for i in _drain(state)] == ["a", "b"]
    assert not state.finished()
    _end(tmp_path, "t00")
    assert [i["arch"]["arch_id"] for i in _drain(state)] == later and state.finished()


@pytest.mark.slow
@pytest.mark.ray
def test_with_a_spare_slot_retraining_starts_while_a_search_still_runs(smoke_run):
    """The shared smoke run has three Ray CPUs: the two tiny searches hold one each, the third retrains
    what they emit. (That its table equals a run without the spare slot is checked by the fault test
    of test_resilience.py, which runs at two CPUs and compares with this run.)"""
    assert yaml.safe_load((smoke_run / "config.yaml").read_text())["ray"]["num_cpus"] == 3
    archs = pd.read_parquet(smoke_run / "architectures.parquet")
    assert (archs["status"] == "ok").all()
    assert archs["retrain_started_at"].min() < archs["search_finished_at"].max()  # the overlap
    assert (archs["emitted_at"] <= archs["retrain_started_at"]).all()
    assert (archs["retrain_started_at"] < archs["retrain_finished_at"]).all()
    console = (smoke_run.parent / "console.log").read_text()
    assert "[search] t00 emitted" in console and "[retrain] " in console  # both on one console


def test_a_near_duplicate_by_macs_of_the_same_search_is_skipped_and_said_so(tmp_path):
    """retrain.min_macs_gap=0.05: an emission within 5 % of the MACs of one kept from the same search
    is not queued; it is recorded (the table's status "skipped", naming the kept one). Another search's
    emission at the same MACs is kept (a sweep compares them); 7.6 % apart is kept."""
    from dnad.results import retrain_results, skipped_path

    state = StreamState(_ctx(tmp_path, min_macs_gap=0.05), POINTS)
    _drain(state)
    for i, (arch, macs) in enumerate([("a", 23.36e6), ("b", 22.61e6), ("c", 14.1e6), ("d", 13.5e6),
                                      ("f", 5.15e6), ("g", 4.76e6)]):  # fmt: skip
        _emit(tmp_path, "t00", i, arch, macs, 0.5)
    _emit(tmp_path, "t01", 0, "e", 22.9e6, 0.5)
    assert [i["arch"]["arch_id"] for i in _drain(state)] == ["a", "c", "f", "g", "e"]
    assert state.skipped == {"b", "d"}
    skip = json.loads(skipped_path(tmp_path, "b").read_text())
    assert skip["near"] == "a" and skip["gap"] == 0.05 and skip["macs"] == 22.61e6
    rows = retrain_results(tmp_path, ["a", "b", "d"], 1, 1).set_index("arch_id")
    assert list(rows["status"]) == ["pending", "skipped", "skipped"]
    assert "within 5 % of a (23.36)" in rows.loc["b", "error"] and "of c" in rows.loc["d", "error"]
    _end(tmp_path, "t00")
    _end(tmp_path, "t01")
    assert _drain(state) == [] and state.finished()


def test_skipping_is_decided_again_when_the_run_resumes(tmp_path):
    """With gap 0 on the resumed run the skipped architecture is queued and its record goes; one that
    an earlier run retrained is never skipped (nor retrained again)."""
    from dnad.results import skipped_path

    _emit(tmp_path, "t00", 0, "a", 10.0e6, 0.5)
    _emit(tmp_path, "t00", 1, "b", 9.8e6, 0.5)
    _emit(tmp_path, "t00", 2, "c", 9.7e6, 0.5)
    first = StreamState(_ctx(tmp_path, min_macs_gap=0.05), POINTS[:1])
    assert [i.get("arch", {}).get("arch_id") for i in _drain(first)] == [None, "a"]
    assert skipped_path(tmp_path, "b").is_file() and skipped_path(tmp_path, "c").is_file()
    (tmp_path / "retrain" / "b.result.json").write_text(json.dumps({"status": "ok"}))
    again = StreamState(_ctx(tmp_path, min_macs_gap=0.05), POINTS[:1])
    assert [i.get("arch", {}).get("arch_id") for i in _drain(again)] == [None, "a"]
    assert not skipped_path(tmp_path, "b").exists() and skipped_path(tmp_path, "c").is_file()
    wider = StreamState(_ctx(tmp_path, min_macs_gap=0.1), POINTS[:1])
    _drain(wider)
    assert json.loads(skipped_path(tmp_path, "c").read_text())["gap"] == 0.1  # the record says which gap
    everything = StreamState(_ctx(tmp_path, min_macs_gap=0.0), POINTS[:1])
    assert [i.get("arch", {}).get("arch_id") for i in _drain(everything)] == [None, "a", "c"]
    assert not skipped_path(tmp_path, "c").exists()
