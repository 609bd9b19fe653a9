"""Stage b: one search (any strategy of `dnad.search`) as a Ray TorchTrainer on every worker.

Each worker loads its own copy of the data and takes its shard through `rank`/`world_size`;
SearchLoop wraps itself in DDP when the process group (gloo on CPU, NCCL on GPU) has > 1 member.
Rank 0 appends a metrics row every `log_every` steps to `search/<trial>/metrics.jsonl` and saves the
SearchLoop state as the epoch's checkpoint; a rerun with the same Ray run name resumes from it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dnad.checkpoint import atomic_write_text
from pipeline.config import search_plan
from pipeline.context import RunContext, thread_count

METRIC_KEYS = ("step", "epoch", "loss", "ce", "kd", "S", "gamma", "mu", "alive_pairs", "est_macs", "train_acc",
               "val_acc", "img_per_s", "emitted")  # fmt: skip


def search_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop (runs on every worker of the search's worker group)."""
    import ray
    import ray.train

    from dnad.config import DataConfig, SearchConfig
    from dnad.data import load_dataset
    from dnad.distill import load_teacher
    from dnad.search import make_search, uses_teacher
    from dnad.teacher import teacher_val_acc
    from pipeline.faults import install_search_faults
    from pipeline.progress import append_jsonl, read_jsonl, rewind_jsonl
    from pipeline.raytools import read_checkpoint, report, worker_setup

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_setup(config["threads"], config["use_gpu"], config["kernels"])
    dcfg = DataConfig.model_validate(config["data"])
    scfg = SearchConfig.model_validate(config["search"])
    data = load_dataset(dcfg)
    teacher, teacher_acc = None, None
    if uses_teacher(scfg) and config["teacher_path"]:
        if not Path(config["teacher_path"]).is_dir():
            raise FileNotFoundError(
                f"teacher {config['teacher_path']} is not on this node; put teacher.cache_dir on shared storage"
            )
        teacher = load_teacher(config["teacher_path"])
        teacher_acc = teacher_val_acc(config["teacher_path"])
    metrics_path, trial_id = Path(config["metrics_path"]), config["trial_id"]
    # where every rank runs (diagnostics; the multi-node test checks the ranks landed on different nodes)
    append_jsonl(metrics_path.parent / "workers.jsonl", {
        "trial_id": trial_id, "rank": rank, "world_size": world, "node_id": ctx.get_node_rank(),
        "ray_node_id": ray.get_runtime_context().get_node_id(), "device": str(device), "pid": os.getpid(),
    })  # fmt: skip

    emissions_path = metrics_path.with_name("emissions.jsonl")
    published = {int(r["index"]) for r in read_jsonl(emissions_path)} if rank == 0 else set()

    def publish(lp: Any) -> None:
        """Each emission as it happens, for the retraining queue (pipeline.stream); an emission made again
        after a resume keeps its first record."""
        for e in lp.emissions:
            if e.index not in published:
                append_jsonl(emissions_path, {"trial_id": trial_id, **asdict(e), "emitted_at": time.time()})
                published.add(e.index)

    def log(m: dict[str, Any]) -> None:
        if rank == 0:
            append_jsonl(metrics_path, {"trial_id": trial_id, **{k: m[k] for k in METRIC_KEYS}})
            if m["emitted"]:
                publish(loop)

    loop = make_search(scfg, data, teacher=teacher, device=device, callback=log, rank=rank, world_size=world,
                       augment=dcfg.augment, teacher_val_acc=teacher_acc)  # fmt: skip
    state = read_checkpoint(ray.train.get_checkpoint())
    if state is not None:
        loop.load_state_dict(state)
    notes_path = metrics_path.with_name("notes.jsonl")
    if rank == 0:  # rows past the checkpoint (an interrupted epoch) are about to be written again
        rewind_jsonl(metrics_path, lambda r: int(r["step"]) <= loop.step)
        rewind_jsonl(notes_path, lambda r: int(r["index"]) < len(loop.notes))
    install_search_faults(loop, trial_id)  # test hook; nothing unless DNAD_FAULTS is set
    written = len(read_jsonl(notes_path)) if rank == 0 else 0

    def on_epoch_end(lp: Any) -> None:
        nonlocal written
        if rank == 0:  # what the search decided itself (a weak teacher dropped): shown by the console
            for i in range(written, len(lp.notes)):
                append_jsonl(notes_path, {"trial_id": trial_id, "index": i, "note": lp.notes[i]})
            written = len(lp.notes)
            publish(lp)  # the final emission (and any made outside a logged step)
        metrics = {"epoch": lp.epoch, "step": lp.step, "emissions": len(lp.emissions), "done": lp.done}
        report(metrics, lp.state_dict() if rank == 0 else None, f"checkpoint_{lp.epoch:06d}")

    loop.run(on_epoch_end)


def run_search(ctx: RunContext, point: dict[str, Any], teacher_path: str | None) -> list[dict[str, Any]]:
    """Run (or resume) the search of one sweep point; returns its emissions as plain dicts. Either way it
    leaves `search/<trial>/result.json` (when it ended, its error if it failed) and, finished,
    `emissions.json`: the markers the retraining queue and a resumed run go by."""
    from pipeline.progress import one_line

    tid = point["trial_id"]
    folder = ctx.out / "search" / tid
    try:
        emissions = _search(ctx, point, teacher_path)
    except Exception as e:
        atomic_write_text(
            folder / "result.json", json.dumps({"finished_at": time.time(), "error": one_line(e)})
        )
        raise
    atomic_write_text(folder / "emissions.json", json.dumps(emissions, indent=1))
    atomic_write_text(folder / "result.json", json.dumps({"finished_at": time.time(), "error": None}))
    return emissions


def _search(ctx: RunContext, point: dict[str, Any], teacher_path: str | None) -> list[dict[str, Any]]:
    from pipeline.raytools import read_checkpoint, torch_trainer

    cfg, res = ctx.cfg, ctx.resources
    assert res is not None
    tid = point["trial_id"]
    cpus = res.search_worker(cfg)
    config = {
        "data": cfg.data.model_dump(mode="json"),
        "search": search_plan(cfg, point, ctx.train_size or 0).config.model_dump(mode="json"),
        "teacher_path": teacher_path,
        "metrics_path": str(ctx.out / "search" / tid / "metrics.jsonl"),
        "trial_id": tid,
        "threads": thread_count(cpus),
        "use_gpu": res.use_gpu,
        "kernels": cfg.ray.kernels,
    }
    trainer = torch_trainer(
        search_worker, config, name=ctx.ray_name("search", tid), storage=ctx.storage, workers=cfg.ray.workers,
        use_gpu=res.use_gpu, cpus_per_worker=cpus, max_failures=cfg.ray.max_failures,
    )  # fmt: skip
    result = trainer.fit()
    state = read_checkpoint(result.checkpoint)
    if state is None or not state["done"]:
        raise RuntimeError(f"search {tid} ended without a finished checkpoint")
    return list(state["emissions"])
