"""Stage e: every collected architecture retrained from scratch as its own Tune trial.

A trial holds one GPU when the cluster has GPUs, else `ray.cpus_per_trial` CPUs (and as many torch
threads). It checkpoints every epoch through `ray.tune.report`, so a retried or restored trial resumes
from its last epoch (`ray.tune.get_checkpoint()`); `FailureConfig(max_failures)` retries it, and a
trial that still fails is recorded as status "failed" with its error while the run goes on.
The validation accuracy (held out of the training images) chooses; the final epoch's top-1 on the
test split is reported beside it. A finished trial leaves `models/<arch_id>/` (`pipeline.models`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from dnad.results import RETRAIN_COLUMNS
from pipeline.config import retrain_plan
from pipeline.context import RunContext, thread_count
from pipeline.progress import EPOCH_SCALE, Progress, describe_epoch_row, epoch_units, one_line
from pipeline.teacher import retrain_images


def retrain_trial(config: dict[str, Any], ctx: RunContext) -> None:
    """Tune function trainable: retrain one genotype, then write its model folder (weights, card, ONNX)
    and measure its latency on this machine before reporting it done."""
    import torch
    from ray import tune

    from dnad.data import load_dataset
    from dnad.genotype import Genotype
    from dnad.network import build_model
    from dnad.retrain import RetrainLoop
    from pipeline.faults import install_retrain_faults
    from pipeline.progress import append_jsonl, rewind_jsonl
    from pipeline.raytools import read_checkpoint, report, worker_setup

    cfg, res = ctx.cfg, ctx.resources
    assert res is not None
    arch_id = config["arch_id"]
    threads = thread_count(res.retrain_trial(cfg)["cpu"])
    device = worker_setup(threads, res.use_gpu)
    dcfg = cfg.retrain_data_config()
    data = load_dataset(dcfg)
    g = Genotype.from_json(config["genotype"])
    rc = retrain_plan(cfg, len(data.train))  # the epochs it really runs on this data (dnad.budget)
    torch.manual_seed(rc.seed)  # the initial weights: a retried or resumed trial builds the same network
    model = build_model(
        g, rc.C, data.num_classes, data.in_channels, data.image_size, auxiliary=rc.auxiliary_weight > 0
    )
    history = ctx.out / "retrain" / f"{arch_id}.jsonl"
    ticks = ctx.out / "retrain" / f"{arch_id}.progress.jsonl"  # within-epoch rows for the display only
    loop = RetrainLoop(rc, model, data, device,
                       lambda r: append_jsonl(history, {"arch_id": arch_id, "planned_epochs": rc.epochs, **r}),
                       augment=dcfg.augment, cutout=dcfg.cutout,
                       progress=lambda r: append_jsonl(ticks, {"arch_id": arch_id, **r}))  # fmt: skip
    state = read_checkpoint(tune.get_checkpoint())
    if state is not None:
        loop.load_state_dict(state)
    rewind_jsonl(history, lambda r: int(r["epoch"]) <= loop.epoch)  # epochs past the checkpoint rerun
    install_retrain_faults(loop, arch_id)  # test hook; nothing unless DNAD_FAULTS is set

    def metrics(lp: RetrainLoop, done: bool = False) -> dict[str, Any]:
        last = lp.history[-1]
        return {
            "arch_id": arch_id, "retrain_epochs": lp.epoch, "val_acc": last["val_acc"],
            "test_acc": last["test_acc"], "wall_s": sum(h["epoch_s"] for h in lp.history), "done": done,
        }  # fmt: skip

    # every epoch leaves a checkpoint; a trial restored from its final one only finishes the model folder
    loop.run(lambda lp: report(metrics(lp), lp.state_dict(), f"checkpoint_{lp.epoch:06d}", tune=True))
    from pipeline.models import write_model_folder

    write_model_folder(ctx, loop, data, device, threads)
    report(metrics(loop, done=True), None, "", tune=True)


def retrain_entry(config: dict[str, Any], ctx: RunContext, fn: Callable[..., None]) -> None:
    """The Tune trainable: `fn` (normally `retrain_trial`) on the trial's architecture."""
    fn(config["arch"], ctx)


def _row(arch_id: str, result: Any) -> dict[str, Any]:
    m = result.metrics or {}
    failed = result.error is not None or not m.get("done", False)
    val, acc = m.get("val_acc", float("nan")), m.get("test_acc", float("nan"))
    return {
        "arch_id": arch_id, "retrain_epochs": int(m.get("retrain_epochs", 0)), "val_acc": val,
        "val_error": 1.0 - val, "test_acc": acc, "test_error": 1.0 - acc, "wall_s": float(m.get("wall_s", 0.0)),
        "status": "failed" if failed else "ok",
        "error": one_line(result.error) if result.error is not None else ("" if not failed else "did not finish"),
    }  # fmt: skip


def run_retrain(
    ctx: RunContext, archs: pd.DataFrame, trial: Callable[..., None] = retrain_trial
) -> pd.DataFrame:
    """Retrain every architecture; one row per arch_id with RETRAIN_COLUMNS (also `retrained.parquet`)."""
    from ray import tune

    from pipeline.raytools import fit_tuner

    path = ctx.out / "retrained.parquet"
    if ctx.stage_done("retrain") and path.is_file():
        print("[retrain] already finished")
        return pd.read_parquet(path)
    if archs.empty:
        return pd.DataFrame(columns=list(RETRAIN_COLUMNS))
    res = ctx.resources
    assert res is not None
    per_trial = res.retrain_trial(ctx.cfg)
    slots = res.gpus if res.use_gpu else res.cpus // per_trial["cpu"]
    space = {
        "arch": tune.grid_search(
            [{"arch_id": a, "genotype": g} for a, g in zip(archs["arch_id"], archs["genotype"])]
        )
    }
    trainable = tune.with_resources(tune.with_parameters(retrain_entry, ctx=ctx, fn=trial), per_trial)
    epochs = retrain_plan(ctx.cfg, retrain_images(ctx)).epochs
    units = epoch_units(lambda r: r["arch_id"])
    describe = lambda r: f"{r['arch_id']} {describe_epoch_row(r)}"  # noqa: E731
    with Progress(
        "retrain", EPOCH_SCALE * epochs * len(archs), ctx.out / "retrain", units, describe, scale=EPOCH_SCALE
    ):
        grid = fit_tuner(
            trainable, space, name=ctx.ray_name("retrain"), storage=ctx.storage,
            max_concurrent=max(1, min(int(slots), ctx.cfg.ray.max_concurrent or 10**6)),
            max_failures=ctx.cfg.ray.max_failures,
        )  # fmt: skip
    rows = {}
    for r in grid:
        arch_id = r.config["arch"]["arch_id"]
        rows[arch_id] = _row(arch_id, r)
    out = pd.DataFrame([rows[a] for a in archs["arch_id"]], columns=list(RETRAIN_COLUMNS))
    out.to_parquet(path, index=False)
    ctx.mark_done(
        "retrain", {"ok": int((out["status"] == "ok").sum()), "failed": int((out["status"] != "ok").sum())}
    )
    return out
