"""Searches and retraining together: each emitted architecture becomes a retraining trial while the
searches go on (`retrain.start=at_emission`, the default), or after they have all finished
(`after_search`, the staged order). One mechanism for both: a single Ray Tune Tuner whose search algorithm is `RunSearcher`. Each time
Tune has room for a trial it asks for the next one: first every sweep point's search (a trial that
drives a Ray Train `TorchTrainer`; it reserves nothing itself, its workers hold the CPUs/GPUs), then
every architecture the searches have emitted so far (each search appends its emissions to
`search/<trial>/emissions.jsonl` as they happen), as a retraining trial with its own CPUs/GPUs; when
nothing is queued yet it answers "later", and "finished" once every search has ended and the queue
is empty.

Ray's scheduler shares the cluster: a search's workers and the retraining trials each hold their own
CPUs/GPUs, so a trial starts only where the searches leave room, and nothing is oversubscribed. The
queue (`StreamState`) is rebuilt from the run folder whenever the command runs again, so a killed run
resumes: finished trials (their result record exists) are not queued again, unfinished ones resume
from their own checkpoints (`pipeline.retrain`). After every finished trial the results table and the
report are rewritten (`pipeline.describe.publish`).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from dnad.checkpoint import atomic_write_text
from dnad.results import pareto_mask, skipped_path
from pipeline.context import RunContext
from pipeline.retrain import read_result, result_path, trial_key


def search_result(out: Path, tid: str) -> dict[str, Any] | None:
    """`search/<tid>/result.json`: when the search ended and its error, if it failed."""
    try:
        return json.loads((Path(out) / "search" / tid / "result.json").read_text())
    except (OSError, ValueError):
        return None


def search_ended(out: Path, tid: str) -> bool:
    """A search is done once it has written its emission list (`search/<tid>/emissions.json`); it then
    never runs again (a failed one, which has none, tries again)."""
    return (Path(out) / "search" / tid / "emissions.json").is_file()


def _finished(out: Path, arch: str, repeat: int = 0) -> bool:
    """Whether the retraining (arch, repeat) finished ok in an earlier run of this command."""
    done = read_result(out, trial_key(arch, repeat))
    return done is not None and done.get("status") == "ok"


class StreamState:
    """The retraining queue, fed by the emission files of the searches. Pure bookkeeping (no Ray): what
    to retrain next, and whether anything more can come."""

    def __init__(self, ctx: RunContext, points: list[dict[str, Any]]):
        r = ctx.cfg.retrain
        self.out, self.trial_ids = ctx.out, [p["trial_id"] for p in points]
        # searches to run: those without a finished emission list (a failed one tries again)
        self.searches = [p for p in points if not search_ended(ctx.out, p["trial_id"])]
        for p in self.searches:
            (ctx.out / "search" / p["trial_id"] / "result.json").unlink(missing_ok=True)
        self.start, self.stream, self.rest, self.repeats = r.start, r.stream, r.rest, r.repeats
        self.gap = r.min_macs_gap
        self.kept: dict[str, list[tuple[str, float]]] = {}  # trial id -> (arch id, MACs) not skipped
        self.skipped: set[str] = set()
        self.seen: dict[str, dict[str, Any]] = {}  # arch id -> its first emission
        self.held: list[
            str
        ] = []  # arch ids waiting for their search (stream=front) or for all (after_search)
        self.queue: list[dict[str, Any]] = []
        self.released: set[str] = set()
        self.offsets: dict[str, int] = {}
        self.points: list[tuple[float, float]] = []  # (est. MACs, running val acc) of every emission so far

    def ended(self, tid: str) -> bool:
        return search_result(self.out, tid) is not None

    def all_ended(self) -> bool:
        return all(self.ended(t) for t in self.trial_ids)

    def _new_emissions(self) -> list[dict[str, Any]]:
        rows = []
        for tid in self.trial_ids:
            f = self.out / "search" / tid / "emissions.jsonl"
            if not f.is_file():
                continue
            with open(f, "rb") as fh:
                fh.seek(self.offsets.get(tid, 0))
                chunk = fh.read()
            end = chunk.rfind(b"\n") + 1  # whole lines only
            self.offsets[tid] = self.offsets.get(tid, 0) + end
            for line in chunk[:end].splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
        return rows

    def _front(self, e: dict[str, Any]) -> bool:
        """Non-dominated in (estimated MACs, running val acc) among every emission so far (this one in)."""
        val = e.get("val_acc", float("nan"))
        if val != val:
            return True  # nothing to judge it by
        pts = [*self.points, (float(e["macs"]), -float(val))]
        return bool(pareto_mask([v for _, v in pts], [m for m, _ in pts])[-1])

    def refresh(self) -> None:
        """Read new emissions; release what may go to retraining now."""
        for e in self._new_emissions():
            arch = e["arch_id"]
            streams = self.start == "at_emission" and (self.stream == "all" or self._front(e))
            if e.get("val_acc") == e.get("val_acc") and e.get("val_acc") is not None:
                self.points.append((float(e["macs"]), -float(e["val_acc"])))
            if arch in self.seen:
                continue
            self.seen[arch] = e
            if self._skip(e):
                continue
            self._release(arch) if streams else self.held.append(arch)
        everything = self.all_ended()
        for arch in list(self.held):
            tid = self.seen[arch]["trial_id"]
            if self.start == "after_search" and everything:
                self._release(arch)
            elif self.start == "at_emission" and self.ended(tid):
                if self.rest == "after_search":
                    self._release(arch)
                else:
                    self.held.remove(arch)  # stream=front, rest=none: not retrained

    def _skip(self, e: dict[str, Any]) -> bool:
        """Whether emission `e` is a near-duplicate by MACs (`retrain.min_macs_gap`) of an architecture
        kept from the same search: then it is recorded as skipped (`dnad.results.skipped_path`) and never
        queued. An architecture already retrained by an earlier run of this command is kept."""
        arch, macs = e["arch_id"], float(e["macs"])
        kept = self.kept.setdefault(e["trial_id"], [])
        marker = skipped_path(self.out, arch)
        rel = [(abs(macs - m) / max(macs, m, 1e-12), a, m) for a, m in kept]
        near = min(rel, default=None)
        if near is None or near[0] >= self.gap or _finished(self.out, arch):
            kept.append((arch, macs))
            marker.unlink(missing_ok=True)  # a decision of an earlier run with another gap
            return False
        self.skipped.add(arch)
        text = json.dumps(
            {"arch_id": arch, "near": near[1], "macs": macs, "near_macs": near[2], "gap": self.gap}
        )
        if not marker.is_file() or marker.read_text() != text:  # a resumed run with another gap rewrites it
            atomic_write_text(marker, text)
        return True

    def _release(self, arch: str) -> None:
        if arch in self.held:
            self.held.remove(arch)
        if arch in self.released:
            return
        self.released.add(arch)
        e = self.seen[arch]
        for k in range(self.repeats):
            if _finished(self.out, arch, k):
                continue  # finished in an earlier run of this command
            self.queue.append({"arch_id": arch, "genotype": e["genotype"], "repeat": k})

    def next(self) -> dict[str, Any] | None:
        """The next trial's config: a search ({"point": ...}) while any is left to start, else a queued
        retraining ({"arch": ...}); None when there is nothing to start now."""
        if self.searches:
            return {"point": self.searches.pop(0)}
        return {"arch": self.queue.pop(0)} if self.queue else None

    def finished(self) -> bool:
        """No trial will ever be asked for again: every search ended and nothing is queued or held."""
        return not self.searches and not self.queue and not self.held and self.all_ended()


def _searcher_class():
    from ray.tune.search import Searcher

    class RunSearcher(Searcher):
        """A Tune search algorithm whose suggestions are the sweep's searches, then their emissions as
        they come (`StreamState.next`)."""

        def __init__(self, state: StreamState):
            super().__init__()
            self.state = state
            self.lock = threading.Lock()

        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            with self.lock:
                self.state.refresh()
                item = self.state.next()
                if item is not None:
                    return item
                return Searcher.FINISHED if self.state.finished() else None

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            pass

        def __getstate__(self) -> dict:  # Tune pickles its search algorithm into tuner.pkl
            return {k: v for k, v in self.__dict__.items() if k != "lock"}

        def __setstate__(self, d: dict) -> None:
            self.__dict__.update(d)
            self.lock = threading.Lock()

    return RunSearcher


def _callback_class():
    from ray.tune.progress_reporter import TrialProgressCallback

    class Publisher(TrialProgressCallback):
        """After every finished (or finally failed) trial: record it, rewrite the results. (A trial
        progress callback, so that Tune adds no printing one of its own: the console is `Board`'s.)"""

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            pass

        def __init__(self, ctx: RunContext, publish: Any):
            self.ctx, self.publish = ctx, publish

        def __getstate__(self) -> dict:  # pickled into tuner.pkl, which this run never restores from
            return {"ctx": self.ctx, "publish": lambda: None}

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.publish()

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            from pipeline.progress import one_line
            from pipeline.retrain import last_error, write_result

            if "arch" not in trial.config:  # a search records its own failure (pipeline.search)
                self.publish()
                return
            a = trial.config["arch"]
            key = trial_key(a["arch_id"], int(a.get("repeat", 0)))
            error = last_error(self.ctx.out, key)  # the trial's own record of its last attempt
            if error is None:  # it died before it could write one (killed, out of memory)
                error = one_line(RuntimeError(str(trial.get_error() or "the trial failed")))
            write_result(self.ctx.out, key, {
                "arch_id": a["arch_id"], "repeat": int(a.get("repeat", 0)), "status": "failed", "error": error,
            })  # fmt: skip
            self.publish()

    return Publisher


def clear_failures(out: Path) -> None:
    """Failed trials of an earlier run of this command get another chance (their record goes)."""
    for f in Path(out).glob("retrain/*.error"):
        f.unlink(missing_ok=True)
    for f in Path(out).glob("retrain/*.result.json"):
        try:
            if json.loads(f.read_text()).get("status") != "ok":
                f.unlink()
        except (OSError, ValueError):
            f.unlink(missing_ok=True)


def run_trial(config: dict[str, Any], ctx: RunContext, teacher_path: str | None) -> None:
    """The one Tune trainable: a search (never raises: its markers say how it went) or a retraining."""
    if "point" in config:
        from pipeline.search import run_search

        try:
            run_search(ctx, config["point"], teacher_path)
        except Exception:
            pass  # recorded in search/<trial>/result.json
        return
    from pipeline.retrain import retrain_attempt

    retrain_attempt(config["arch"], ctx)


def trial_resources(config: dict[str, Any], retrain: dict[str, float]):
    """A search trial reserves (almost) nothing: its Train workers hold the CPUs/GPUs; a retraining
    trial holds `retrain` (one GPU, or `ray.cpus_per_trial` CPUs)."""
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

    from pipeline.raytools import DRIVER_TRIAL_RESOURCES

    return resource_dict_to_pg_factory(DRIVER_TRIAL_RESOURCES if "point" in config else retrain)


def run_tuner(
    ctx: RunContext, state: StreamState, teacher_path: str | None, publish: Any, attempt: int
) -> None:
    """The run's Tuner, fed by `state` until it says finished (blocks)."""
    import functools

    from ray import tune

    res = ctx.resources
    assert res is not None
    per_trial = res.retrain_trial(ctx.cfg)
    slots = res.gpus if res.use_gpu else int(res.cpus // per_trial["cpu"])
    cap = ctx.cfg.ray.max_concurrent or 10**6
    concurrent = max(1, min(res.search_concurrency(ctx.cfg) + slots, cap + res.search_concurrency(ctx.cfg)))
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, ctx=ctx, teacher_path=teacher_path),
        functools.partial(trial_resources, retrain=per_trial),
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=_searcher_class()(state), num_samples=-1, reuse_actors=False,
            max_concurrent_trials=concurrent, trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=ctx.ray_name("run", f"{attempt:03d}"), storage_path=ctx.storage, verbose=0,
            failure_config=tune.FailureConfig(max_failures=ctx.cfg.ray.max_failures),
            callbacks=[_callback_class()(ctx, publish)],
        ),
    )  # fmt: skip
    tuner.fit()


def _trial_name(trial: Any) -> str:
    """Trials are named after what they run: `t03` (a search) or the architecture id (`-r1`: repeat 1)."""
    c = trial.config
    if "point" in c:
        return str(c["point"]["trial_id"])
    a = c.get("arch")
    return trial_key(a["arch_id"], int(a.get("repeat", 0))) if a else str(trial.trial_id)


def attempt_number(out: Path) -> int:
    """A new number for this run's retraining Tuner (earlier attempts' Tune folders are left alone)."""
    f = Path(out) / "stages" / "retrain-attempts.json"
    n = json.loads(f.read_text())["n"] + 1 if f.is_file() else 0
    from dnad.checkpoint import atomic_write_text

    atomic_write_text(f, json.dumps({"n": n, "at": time.time()}))
    return n


__all__ = ["StreamState", "clear_failures", "result_path", "run_search_and_retrain", "run_tuner"]


def run_search_and_retrain(ctx: RunContext, teacher_path: str | None) -> dict[str, str]:
    """Every search of the sweep and the retraining of what they emit, in one Tuner, displayed
    together; returns {trial_id: error} of the searches that failed. The results table and the report
    are rewritten after every finished trial."""
    from dnad.results import rebuild_architectures
    from pipeline.collect import run_collect
    from pipeline.config import retrain_plan, search_plan, sweep_points
    from pipeline.describe import publish
    from pipeline.progress import Board
    from pipeline.teacher import retrain_images

    points = sweep_points(ctx.cfg)
    clear_failures(ctx.out)
    state = StreamState(ctx, points)
    if len(state.searches) < len(points):
        print(f"[search] {len(points) - len(state.searches)} of {len(points)} searches already finished")
    lock = threading.Lock()

    def update() -> None:
        with lock:  # Tune's callbacks and the end of the phase do not write at once
            try:
                run_collect(ctx, final=False)
                publish(ctx.out, rebuild_architectures(ctx.out), quiet=True)
            except Exception as e:  # partial results are a courtesy: never let them stop the run
                print(f"[report] not updated: {type(e).__name__}: {e}")

    steps = sum(search_plan(ctx.cfg, p, ctx.train_size or 0).steps for p in state.searches)
    epochs = retrain_plan(ctx.cfg, retrain_images(ctx)).epochs
    ids = [p["trial_id"] for p in points]
    with Board(ctx.out, steps, epochs, lambda: len(state.released) * state.repeats, ids) as board:
        run_tuner(ctx, state, teacher_path, update, attempt_number(ctx.out))
        failures = {}
        for tid in ids:
            err = (search_result(ctx.out, tid) or {}).get("error", "the search did not run")
            if err:
                failures[tid] = err
        if failures and len(failures) == len(points):
            board.fail(f"every search failed; {next(iter(failures))}: {next(iter(failures.values()))}")
        elif failures:
            board.summary = f" ({len(failures)} of {len(points)} searches failed)"
    return failures
