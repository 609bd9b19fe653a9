"""Nothing lost: a killed run resumes to the uninterrupted result, and injected faults are retried or
recorded. Every run here is `pipeline/run.py --smoke-test` with the teacher cache of the `smoke_run`
fixture (so the teacher is not retrained), compared with that fixture's uninterrupted run (same seed).
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from pipeline.progress import read_jsonl, rewind_jsonl

REPO = Path(__file__).resolve().parent.parent
TRIALS = ("t00", "t01")
STEPS_PER_EPOCH = 7  # tiny preset: 256 fake images less 26 for validation, batch 32, drop last


# -- running and killing a pipeline run -----------------------------------------------------------------
def command(out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "pipeline/run.py"), "--smoke-test", "--output", str(out),
            f"teacher.cache_dir={cache}", *extra]  # fmt: skip


def launch(
    out: Path, cache: Path, log: Path, env: dict[str, str] | None = None, extra: tuple[str, ...] = ()
) -> subprocess.Popen:
    """Start a run in its own session: its Ray (GCS, raylet, workers) shares that session id."""
    with open(log, "a") as f:
        return subprocess.Popen(
            command(out, cache, *extra), cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )  # fmt: skip


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] not in "ZX":
            pids.append(int(d.name))
    return pids


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group, then any process of its session that is still alive (Ray
    workers have process groups of their own but die with their raylet); wait until none is left."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while pids := session_pids(proc.pid):
        assert time.monotonic() < deadline, f"processes of the killed run still alive: {pids}"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def interrupt_run(proc: subprocess.Popen, log: Path) -> None:
    """Ctrl-C (SIGINT to the run's process group, as a terminal sends it): the run stops within a
    minute with exit code 130 and one line saying how to resume, and leaves no process behind."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        kill_run(proc)
        pytest.fail(f"Ctrl-C did not stop the run within 60 s:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert "interrupted: what has finished is kept; the same command resumes the run" in text
    deadline = time.monotonic() + 30
    while session_pids(proc.pid):
        assert time.monotonic() < deadline, f"processes left after Ctrl-C: {session_pids(proc.pid)}"
        time.sleep(0.2)


def wait_for(what: str, cond: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            kill_run(proc)
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def complete(
    out: Path, cache: Path, log: Path, env: dict[str, str] | None = None, extra: tuple[str, ...] = ()
) -> str:
    """Run to the end (the same command again: it resumes); its console output."""
    proc = launch(out, cache, log, env, extra)
    try:
        proc.wait(timeout=420)
    finally:
        if proc.poll() is None:
            kill_run(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    deadline = time.monotonic() + 15
    while session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not session_pids(proc.pid)  # ray.shutdown() stopped everything it started
    return text


# -- reading a run folder ---------------------------------------------------------------------------------
def search_rows(out: Path, tid: str) -> list[dict]:
    return read_jsonl(out / "search" / tid / "metrics.jsonl")


def ray_checkpoints(out: Path, tid: str) -> list[str]:
    return sorted(p.name for p in (out / "ray").glob(f"*-search-{tid}/checkpoint_*") if p.is_dir())


def retrain_epochs(out: Path) -> dict[str, list[int]]:
    return {f.stem: [r["epoch"] for r in read_jsonl(f)] for f in sorted((out / "retrain").glob("*.jsonl"))}


def finished_trials(out: Path) -> set[str]:
    """Architectures whose retraining wrote its result record (written last: the trial is done)."""
    done = set()
    for f in (out / "retrain").glob("*.result.json"):
        try:
            if json.loads(f.read_text())["status"] == "ok":
                done.add(f.name.removesuffix(".result.json"))
        except (OSError, ValueError, KeyError):  # being written right now
            continue
    return done


def searches_ended(out: Path) -> int:
    return sum((out / "search" / t / "result.json").is_file() for t in TRIALS)


def emissions(out: Path, tid: str) -> list[dict]:
    return json.loads((out / "search" / tid / "emissions.json").read_text())


def assert_same_emissions(got: list[dict], want: list[dict]) -> None:
    assert [(e["arch_id"], e["step"], e["epoch"], e["final"]) for e in got] == [
        (e["arch_id"], e["step"], e["epoch"], e["final"]) for e in want
    ]
    assert [e["S"] for e in got] == pytest.approx([e["S"] for e in want], rel=1e-6)


def assert_same_search_metrics(out: Path, ref: Path, trials: tuple[str, ...] = TRIALS) -> None:
    """Every logged step once, with the uninterrupted run's values (a resumed epoch is not logged twice)."""
    cols = ["trial_id", "step", "epoch", "loss", "S", "alive_pairs"]
    got = pd.read_parquet(out / "search_metrics.parquet")
    want = pd.read_parquet(ref / "search_metrics.parquet")
    got, want = (d[d["trial_id"].isin(trials)][cols].reset_index(drop=True) for d in (got, want))
    assert not got.duplicated(["trial_id", "step"]).any()
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-5)


def assert_same_architectures(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same architectures in the same order, same size, same accuracy (CPU: equal up to float noise)."""
    assert list(got["arch_id"]) == list(want["arch_id"])
    for col in ("trial_id", "emission_index", "params", "macs", "retrain_epochs"):
        assert list(got[col]) == list(want[col]), col
    assert list(got["test_acc"]) == pytest.approx(list(want["test_acc"]), abs=1e-6)


# -- the tests ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ray
def test_kill_mid_epoch_at_epoch_end_and_while_searching_and_retraining_then_resume_matches(
    smoke_run, tmp_path
):
    """Stop the whole run three times — SIGKILL (a) in the middle of a search epoch, Ctrl-C (b) right
    when a search epoch checkpoint lands in Ray storage, SIGKILL (c) while a search and the retraining
    of its emissions run together (three Ray CPUs: the two searches hold one each, the third retrains)
    after a trial finished — and run the same command again each time. The result equals the
    uninterrupted run of the fixture (also three CPUs); finished work is not redone, unfinished trials
    resume from their own checkpoints."""
    cache, out, log = smoke_run.parent / "teacher-cache", tmp_path / "run", tmp_path / "console.log"
    spare = ("ray.num_cpus=3",)

    # (a) mid-epoch: t00 has logged a step inside epoch 1 or later (past its first checkpoint)
    def mid_epoch() -> bool:
        rows = search_rows(out, "t00")
        return bool(rows) and rows[-1]["epoch"] >= 1 and rows[-1]["step"] % STEPS_PER_EPOCH != 0

    proc = launch(out, cache, log, extra=spare)
    wait_for("a step inside a search epoch after the first", mid_epoch, proc, log)
    kill_run(proc)
    saved_epochs = max(int(c.split("_")[1]) for c in ray_checkpoints(out, "t00"))
    logged = max(r["step"] for r in search_rows(out, "t00"))
    assert logged > STEPS_PER_EPOCH * saved_epochs >= STEPS_PER_EPOCH  # steps past the checkpoint: lost
    assert not (out / "search" / "t00" / "emissions.json").exists()

    # (b) epoch boundary: a new epoch checkpoint of t00 appears in Ray storage; stopped with Ctrl-C
    before = set(ray_checkpoints(out, "t00"))
    proc = launch(out, cache, log, extra=spare)
    wait_for("a new search checkpoint", lambda: set(ray_checkpoints(out, "t00")) - before != set(), proc, log)
    interrupt_run(proc, log)

    # (c) overlap: a retraining trial has finished while a search still runs (or, on a slow machine,
    # at least one trial is done and another one not)
    def overlap() -> bool:
        done = finished_trials(out)
        return bool(done) and (searches_ended(out) < len(TRIALS) or len(done) < 2)

    proc = launch(out, cache, log, extra=spare)
    wait_for("a finished retrain trial while work is left", overlap, proc, log)
    kill_run(proc)
    finished = sorted(finished_trials(out))
    assert finished and all(retrain_epochs(out)[a] == [1, 2] for a in finished)
    kept = {
        f: f.stat().st_mtime_ns for f in [out / "search" / t / "emissions.json" for t in TRIALS] if f.exists()
    }
    kept |= {f: f.stat().st_mtime_ns for a in finished
             for f in (out / "retrain" / f"{a}.jsonl", out / "retrain" / f"{a}.result.json")}  # fmt: skip

    all_ended = searches_ended(out) == len(TRIALS)
    text = complete(out, cache, log, extra=spare)
    assert "[teacher] started" not in text  # never retrained: found in the cache, or not needed at all
    assert ("[teacher] not needed: every search has ended" if all_ended else "[teacher] cached") in text
    assert {f: f.stat().st_mtime_ns for f in kept} == kept  # finished searches and trials not rerun
    archs = pd.read_parquet(out / "collected.parquet")["arch_id"].tolist()
    assert retrain_epochs(out) == {a: [1, 2] for a in sorted(archs)}  # no epoch logged twice
    for tid in TRIALS:
        assert_same_emissions(emissions(out, tid), emissions(smoke_run, tid))
    assert_same_search_metrics(out, smoke_run)
    got, want = pd.read_csv(out / "architectures.csv"), pd.read_csv(smoke_run / "architectures.csv")
    assert_same_architectures(got, want)
    assert (got["status"] == "ok").all()


@pytest.mark.slow
@pytest.mark.ray
def test_injected_faults_are_retried_or_recorded(smoke_run, tmp_path):
    """One run at two Ray CPUs (no slot to spare: retraining waits for a search to end), compared with
    the fixture's three-CPU run, so that the result is also seen not to depend on the overlap; four
    faults (pipeline/faults.py, through DNAD_FAULTS):
    - t00's search worker raises once at step 12 -> Ray Train restarts it from its epoch-1 checkpoint
      (FailureConfig) and t00 emits exactly what the fault-free run emitted;
    - t01 diverges (NaN batches from step 20) -> DivergenceError, retried max_failures times, then
      recorded as a failed search with the error on the console; what it emitted before is retrained,
      and the run goes on with t00;
    - t00's first architecture always fails in retraining -> status "failed" with the error text;
    - its second fails once at epoch 1 -> Tune retries it, from its own epoch checkpoint, same accuracy."""
    cache, out, log = smoke_run.parent / "teacher-cache", tmp_path / "run", tmp_path / "console.log"
    want = pd.read_csv(smoke_run / "architectures.csv")
    want = want[want["trial_id"] == "t00"].reset_index(drop=True)
    assert len(want) >= 2
    always, once = want["arch_id"][0], want["arch_id"][1]
    faults = [
        {"stage": "search", "target": "t00", "at": 12, "once": str(tmp_path / "fired-search")},
        {"stage": "search", "target": "t01", "at": 20, "action": "nan"},
        {"stage": "retrain", "target": always, "at": 0},
        {"stage": "retrain", "target": once, "at": 1, "once": str(tmp_path / "fired-retrain")},
    ]
    text = complete(out, cache, log, env={"DNAD_FAULTS": json.dumps(faults)}, extra=("ray.num_cpus=2",))
    assert (tmp_path / "fired-search").exists() and (tmp_path / "fired-retrain").exists()

    assert_same_emissions(emissions(out, "t00"), emissions(smoke_run, "t00"))
    assert_same_search_metrics(out, smoke_run, trials=("t00",))
    failed_line = next(ln for ln in text.splitlines() if ln.startswith("[search] t01 failed: "))
    assert "search: 5 consecutive non-finite steps up to step 24" in failed_line, failed_line
    assert not (out / "search" / "t01" / "emissions.json").exists()
    t01 = {r["arch_id"] for r in read_jsonl(out / "search" / "t01" / "emissions.jsonl")}
    assert t01  # it emitted before it diverged ...
    got = pd.read_csv(out / "architectures.csv")
    assert (
        t01 <= set(got["arch_id"])
        and (got.set_index("arch_id").loc[sorted(t01 - {always}), "status"] == "ok").all()
    )

    got = got[got["trial_id"] == "t00"].reset_index(drop=True)  # ... and t00's are the fault-free run's
    assert_same_architectures(got[got["arch_id"] != always], want[want["arch_id"] != always])
    row = got.set_index("arch_id").loc[always]
    assert row["status"] == "failed" and "injected fault: retrain" in row["error"]
    assert got.set_index("arch_id").loc[once, "status"] == "ok"
    assert retrain_epochs(out)[once] == [1, 2]  # no epoch logged twice
    # retried from its epoch-1 checkpoint, not from scratch
    assert json.loads((out / "retrain" / f"{once}.result.json").read_text())["resumed_at_epoch"] == 1


def test_rewind_jsonl_drops_rows_past_the_checkpoint_and_a_cut_line(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"step": 2}\n{"step": 4}\n{"step": 6}\n{"step": 8}\n{"st')
    assert rewind_jsonl(f, lambda r: r["step"] <= 4) == 3
    assert f.read_text() == '{"step": 2}\n{"step": 4}\n'
    assert rewind_jsonl(f, lambda r: True) == 0
    assert rewind_jsonl(tmp_path / "missing.jsonl", lambda r: True) == 0


# -- Ray checkpoints that fail verification ------------------------------------------------------------------
def test_read_checkpoint_falls_back_to_the_newest_valid_sibling(tmp_path, capsys):
    import torch
    from ray.train import Checkpoint

    from dnad.checkpoint import checkpoint_dir, save_checkpoint
    from dnad.errors import CheckpointError
    from pipeline.raytools import read_checkpoint

    run = tmp_path / "tiny-1234abcd-search-t00"
    for i in (1, 2, 3):
        save_checkpoint(checkpoint_dir(run, i), {"epoch": i, "w": torch.full((2,), float(i))})
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's own files sit next to them
    latest = Checkpoint.from_directory(checkpoint_dir(run, 3))
    assert read_checkpoint(latest)["epoch"] == 3
    assert capsys.readouterr().err == ""

    f = checkpoint_dir(run, 3) / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # one corrupt byte: the manifest hash no longer matches
    f.write_bytes(bytes(data))
    (checkpoint_dir(run, 2) / "manifest.json").unlink()  # the one before is an interrupted write
    state = read_checkpoint(latest)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(2))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "checkpoint_000003" in err[0] and "resuming from checkpoint_000001" in err[0]

    (checkpoint_dir(run, 1) / "state.json").write_text("{}")  # nothing valid left: the first error
    with pytest.raises(CheckpointError, match="checkpoint_000003"):
        read_checkpoint(latest)
    assert read_checkpoint(None) is None


def test_fault_specs_fire_once_with_a_marker(tmp_path, monkeypatch):
    from pipeline import faults

    marker = tmp_path / "fired"
    spec = [{"stage": "retrain", "target": "abc", "at": 1, "once": str(marker)},
            {"stage": "search", "target": "*", "at": 3}]  # fmt: skip
    monkeypatch.setenv(faults.ENV, json.dumps(spec))

    class Loop:
        epoch = 0

        def run_epoch(self):
            self.epoch += 1

    loop = Loop()
    faults.install_retrain_faults(loop, "abc")
    loop.run_epoch()
    with pytest.raises(RuntimeError, match="injected fault: retrain abc at epoch 1"):
        loop.run_epoch()
    loop.run_epoch()  # the retry passes: the marker says it fired
    assert loop.epoch == 2 and marker.exists()
    assert [f.target for f in faults.active("search", "t07")] == ["*"]
    assert faults.active("retrain", "other") == []
    monkeypatch.setenv(faults.ENV, '[{"stage": "teacher", "target": "*", "at": 0}]')
    with pytest.raises(ValueError, match="DNAD_FAULTS"):
        faults.active("search", "t00")
