"""Retraining: every architecture the searches emit, retrained from scratch as its own Tune trial.

A trial holds one GPU when the cluster has GPUs, else `ray.cpus_per_trial` CPUs (and as many torch
threads). Which architectures become trials, and when, is `pipeline.stream`'s business (a Tune
`Searcher` fed by the searches' emissions); this module is one trial and its records:

    retrain/<key>/checkpoint_*      the trial's own checkpoints (dnad.checkpoint), one per epoch: a
                                    retried or resumed trial continues from the newest valid one
    retrain/<key>.jsonl             per-epoch records (.progress.jsonl: within-epoch rows, display only)
    retrain/<key>.result.json       written last: status, accuracies, timing (present = finished)
    retrain/<key>.error             the last attempt's error, one line (what a finally failed trial reports)
    models/<arch_id>/               the model folder (repeat 0 only), written before the result

`<key>` is the arch id, with `-r<k>` for repeat k (`retrain.repeats`, seed `retrain.seed + k`). The
validation accuracy (held out of the training images) chooses; the final epoch's test accuracy is
reported beside it. Checkpoints are the trial's own rather than Tune's, so whatever restarts a trial
(Tune's FailureConfig, or the same command after the whole run was killed) finds them.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from dnad.checkpoint import atomic_write_text
from pipeline.config import retrain_plan
from pipeline.context import RunContext, thread_count


def trial_key(arch_id: str, repeat: int) -> str:
    return arch_id if repeat == 0 else f"{arch_id}-r{repeat}"


def result_path(out: Path, key: str) -> Path:
    return Path(out) / "retrain" / f"{key}.result.json"


def read_result(out: Path, key: str) -> dict[str, Any] | None:
    f = result_path(out, key)
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def write_result(out: Path, key: str, row: dict[str, Any]) -> None:
    atomic_write_text(result_path(out, key), json.dumps(row, default=float))


def error_path(out: Path, key: str) -> Path:
    return Path(out) / "retrain" / f"{key}.error"


def last_error(out: Path, key: str) -> str | None:
    """The one-line error of the trial's last failed attempt, if it recorded one."""
    try:
        return error_path(out, key).read_text().strip() or None
    except OSError:
        return None


def retrain_trial(config: dict[str, Any], ctx: RunContext) -> None:
    """Tune function trainable: retrain one genotype (resuming from its own checkpoints), write its model
    folder (repeat 0: weights, card, ONNX, latency on this machine) and its result record."""
    import torch
    from ray import tune

    from dnad.checkpoint import checkpoint_dir, load_latest, prune_checkpoints, save_checkpoint
    from dnad.data import load_dataset
    from dnad.genotype import Genotype
    from dnad.network import build_model
    from dnad.retrain import RetrainLoop
    from pipeline.faults import install_retrain_faults
    from pipeline.progress import append_jsonl, rewind_jsonl
    from pipeline.raytools import worker_setup

    cfg, res = ctx.cfg, ctx.resources
    assert res is not None
    arch_id, repeat = config["arch_id"], int(config.get("repeat", 0))
    key = trial_key(arch_id, repeat)
    folder = ctx.out / "retrain"
    started = folder / f"{key}.started"
    if not started.is_file():  # the first start of this trial (a retry or a resumed run keeps it)
        atomic_write_text(started, json.dumps({"started_at": time.time()}))
    threads = thread_count(res.retrain_trial(cfg)["cpu"])
    device = worker_setup(threads, res.use_gpu, cfg.ray.kernels)
    dcfg = cfg.retrain_data_config()
    data = load_dataset(dcfg)
    g = Genotype.from_json(config["genotype"])
    rc = retrain_plan(cfg, len(data.train))  # the epochs it really runs on this data (dnad.budget)
    rc = rc.model_copy(update={"seed": rc.seed + repeat})
    torch.manual_seed(rc.seed)  # the initial weights: a retried or resumed trial builds the same network
    model = build_model(
        g, rc.C, data.num_classes, data.in_channels, data.image_size, auxiliary=rc.auxiliary_weight > 0
    )
    history, ticks = folder / f"{key}.jsonl", folder / f"{key}.progress.jsonl"
    tag = {"arch_id": arch_id, "repeat": repeat, "planned_epochs": rc.epochs}
    loop = RetrainLoop(rc, model, data, device, lambda r: append_jsonl(history, {**tag, **r}),
                       augment=dcfg.augment, cutout=dcfg.cutout,
                       progress=lambda r: append_jsonl(ticks, {**tag, **r}))  # fmt: skip
    found = load_latest(folder / key)
    if found is not None:
        loop.load_state_dict(found[1])
    resumed_at = loop.epoch  # > 0: this attempt continued from the trial's own checkpoint
    rewind_jsonl(history, lambda r: int(r["epoch"]) <= loop.epoch)  # epochs past the checkpoint rerun
    install_retrain_faults(loop, arch_id)  # test hook; nothing unless DNAD_FAULTS is set

    def metrics(lp: RetrainLoop, done: bool = False) -> dict[str, Any]:
        last = lp.history[-1] if lp.history else {}
        return {"arch_id": arch_id, "repeat": repeat, "retrain_epochs": lp.epoch, "done": done,
                "val_acc": last.get("val_acc", float("nan")), "test_acc": last.get("test_acc", float("nan"))}  # fmt: skip

    def on_epoch_end(lp: RetrainLoop) -> None:
        save_checkpoint(checkpoint_dir(folder / key, lp.epoch), lp.state_dict())
        prune_checkpoints(folder / key, keep=2)
        tune.report(metrics(lp))

    loop.run(on_epoch_end)
    if repeat == 0:
        from pipeline.models import write_model_folder

        write_model_folder(ctx, loop, data, device, threads)
    last = loop.history[-1]
    write_result(ctx.out, key, {
        "arch_id": arch_id, "repeat": repeat, "status": "ok", "error": "", "retrain_epochs": loop.epoch,
        "val_acc": last["val_acc"], "val_error": 1 - last["val_acc"], "test_acc": last["test_acc"],
        "test_error": 1 - last["test_acc"], "wall_s": sum(h["epoch_s"] for h in loop.history),
        "retrain_started_at": json.loads(started.read_text())["started_at"], "retrain_finished_at": time.time(),
        "resumed_at_epoch": resumed_at,
    })  # fmt: skip
    shutil.rmtree(folder / key, ignore_errors=True)  # the result is kept: its checkpoints are not needed
    tune.report(metrics(loop, done=True))


def retrain_attempt(config: dict[str, Any], ctx: RunContext) -> None:
    """`retrain_trial`, recording the error of an attempt that raises (in one line, beside the trial's
    checkpoints) before Tune retries it or gives up: the driver reports that line, not whatever of
    the worker's traceback has reached it when Tune calls back."""
    from pipeline.progress import one_line

    key = trial_key(config["arch_id"], int(config.get("repeat", 0)))
    try:
        retrain_trial(config, ctx)
    except Exception as e:
        atomic_write_text(error_path(ctx.out, key), one_line(e) + "\n")
        raise
    error_path(ctx.out, key).unlink(missing_ok=True)
