"""Stage c: the sweep over KD temperature and the shrink schedule, one search per point.

Several points: a `tune.Tuner` whose function trials each drive a search TorchTrainer
(Train-inside-Tune); a trial reserves no CPU itself (its workers do), and the number of concurrent
trials is what the cluster's CPUs/GPUs hold. One point: the search runs directly, no Tune.
Finished points leave `search/<trial>/emissions.json` and are skipped on resume.
"""

from __future__ import annotations

import json
from typing import Any

from dnad.checkpoint import atomic_write_text
from pipeline.config import search_plan, sweep_points
from pipeline.context import RunContext
from pipeline.progress import Progress, one_line
from pipeline.search import run_search


def sweep_trial(config: dict[str, Any], ctx: RunContext, teacher_path: str | None) -> None:
    """Tune function trainable: one search; its emissions go back in the final result."""
    from ray import tune

    emissions = run_search(ctx, config["point"], teacher_path)
    tune.report({"trial_id": config["point"]["trial_id"], "emissions": json.dumps(emissions)})


def _run_tune(ctx: RunContext, points: list[dict[str, Any]], teacher_path: str | None) -> dict[str, Any]:
    from ray import tune

    from pipeline.raytools import DRIVER_TRIAL_RESOURCES, fit_tuner

    assert ctx.resources is not None
    trainable = tune.with_resources(
        tune.with_parameters(sweep_trial, ctx=ctx, teacher_path=teacher_path), DRIVER_TRIAL_RESOURCES
    )
    grid = fit_tuner(
        trainable, {"point": tune.grid_search(points)}, name=ctx.ray_name("sweep"), storage=ctx.storage,
        max_concurrent=ctx.resources.search_concurrency(ctx.cfg), max_failures=0,
    )  # fmt: skip
    out: dict[str, Any] = {}
    for r in grid:
        tid = r.config["point"]["trial_id"]
        out[tid] = r.error if r.error is not None else json.loads(r.metrics["emissions"])
    return out


def run_sweep(ctx: RunContext, teacher_path: str | None) -> dict[str, str]:
    """Every point's search; returns {trial_id: error} for the searches that failed."""
    points = sweep_points(ctx.cfg)
    todo = [p for p in points if not (ctx.out / "search" / p["trial_id"] / "emissions.json").is_file()]
    if len(todo) < len(points):
        print(f"[search] {len(points) - len(todo)} of {len(points)} searches already finished")
    total = sum(search_plan(ctx.cfg, p, ctx.train_size or 0).steps for p in todo)
    units = lambda r: (r["trial_id"], int(r["step"]))  # noqa: E731
    describe = lambda r: (  # noqa: E731
        f"{r['trial_id']} epoch {r['epoch']} S={r['S']:.1f} pairs={r['alive_pairs']} "
        f"loss={r['loss']:.3f} {r['img_per_s']:.0f} img/s"
    )
    failures: dict[str, str] = {}
    if not todo:
        return failures
    with Progress("search", total, ctx.out / "search", units, describe) as progress:
        if len(points) == 1:
            try:
                outcomes: dict[str, Any] = {todo[0]["trial_id"]: run_search(ctx, todo[0], teacher_path)}
            except Exception as e:  # recorded like a failed Tune trial
                outcomes = {todo[0]["trial_id"]: e}
        else:
            outcomes = _run_tune(ctx, todo, teacher_path)
        for tid, emissions in outcomes.items():
            if isinstance(emissions, BaseException):
                failures[tid] = one_line(emissions)
                continue
            atomic_write_text(ctx.out / "search" / tid / "emissions.json", json.dumps(emissions, indent=1))
        if failures and len(failures) == len(todo):
            progress.fail(f"every search failed; {next(iter(failures))}: {next(iter(failures.values()))}")
        elif failures:
            progress.summary = f" ({len(failures)} of {len(todo)} searches failed)"
    return failures
