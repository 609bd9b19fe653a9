"""Stage a: the frozen teacher of DNAD — trained here (cached by config hash) or loaded.

Training runs as a one-worker TorchTrainer (so it lands on a GPU node when there is one) with a
checkpoint every epoch; the final checkpoint also holds the `save_teacher` folder, which the driver
copies into `teacher.cache_dir/<hash>`. Search workers load it from that path with `load_teacher`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dnad.config import RetrainConfig
from pipeline.config import RunConfig
from pipeline.context import RunContext, thread_count
from pipeline.progress import (
    EPOCH_SCALE,
    Progress,
    append_jsonl,
    describe_epoch_row,
    epoch_units,
    rewind_jsonl,
)

CACHE_FORMAT = 2  # 2: the teacher's accuracy is measured on the validation split


def teacher_hash(cfg: RunConfig) -> str:
    """sha256 of everything that changes the trained teacher's weights."""
    spec = {
        "format": CACHE_FORMAT,
        "teacher": cfg.search.distill.teacher.model_dump(mode="json"),
        "data": cfg.retrain_data_config().model_dump(mode="json", exclude={"test_subset"}),
        "max_steps_per_epoch": cfg.teacher.max_steps_per_epoch,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def teacher_recipe(cfg: RunConfig) -> RetrainConfig:
    """The RetrainConfig a teacher is trained with: SGD at the teacher's own epochs, batch and lr."""
    t, seed = cfg.search.distill.teacher, cfg.retrain_data_config().seed
    return RetrainConfig(
        C=t.C, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, auxiliary_weight=0.0, drop_path=0.0,
        max_steps_per_epoch=cfg.teacher.max_steps_per_epoch, seed=seed,
    )  # fmt: skip


def teacher_spec(cfg: RunConfig, data: Any, val_acc: float | None) -> dict[str, Any]:
    """The `teacher.json` of a trained teacher (how to rebuild it, its validation accuracy, its cache
    key)."""
    return {
        "teacher": cfg.search.distill.teacher.model_dump(mode="json"),
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "val_acc": val_acc,
        "config_hash": teacher_hash(cfg),
    }


def teacher_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: trains the teacher with dnad's RetrainLoop, one checkpoint per epoch."""
    import ray.train
    import torch

    from dnad.data import load_dataset
    from dnad.distill import make_teacher, save_teacher
    from dnad.retrain import RetrainLoop
    from pipeline.raytools import read_checkpoint, report, worker_setup

    cfg = RunConfig.model_validate(config["cfg"])
    device = worker_setup(config["threads"], config["use_gpu"])
    dcfg = cfg.retrain_data_config()
    data = load_dataset(dcfg)
    t = cfg.search.distill.teacher
    torch.manual_seed(dcfg.seed)  # the initial weights do not depend on the worker process's RNG state
    model = make_teacher(t, data.num_classes, data.in_channels, data.image_size)
    rcfg = teacher_recipe(cfg)
    metrics = Path(config["metrics_path"])
    ticks = metrics.with_name("progress.jsonl")  # within-epoch rows for the display only
    loop = RetrainLoop(
        rcfg,
        model,
        data,
        device,
        lambda r: append_jsonl(metrics, r),
        dcfg.augment,
        0,
        "teacher",
        progress=lambda r: append_jsonl(ticks, r),
        test=False,  # the teacher is judged on the validation split; the test split stays unseen
    )
    state = read_checkpoint(ray.train.get_checkpoint())
    if state is not None:
        loop.load_state_dict(state)
    rewind_jsonl(metrics, lambda r: int(r["epoch"]) <= loop.epoch)  # epochs past the checkpoint rerun

    def on_epoch_end(lp: RetrainLoop) -> None:
        acc = lp.history[-1]["val_acc"]

        def add_teacher(d: Path) -> None:
            if lp.done:
                save_teacher(d / "teacher", lp.model, teacher_spec(cfg, data, acc))

        report(
            {"epoch": lp.epoch, "val_acc": acc},
            lp.state_dict(),
            f"checkpoint_{lp.epoch:06d}",
            extra=add_teacher,
        )

    loop.run(on_epoch_end)


def _train(ctx: RunContext, dest: Path) -> None:
    from pipeline.raytools import torch_trainer

    cfg, res = ctx.cfg, ctx.resources
    assert res is not None
    cpus = res.search_worker(cfg)
    t = cfg.search.distill.teacher
    metrics_path = ctx.out / "teacher" / "metrics.jsonl"
    config = {
        "cfg": cfg.model_dump(mode="json"),
        "threads": thread_count(cpus),
        "use_gpu": res.use_gpu,
        "metrics_path": str(metrics_path),
    }
    trainer = torch_trainer(
        teacher_worker, config, name=ctx.ray_name("teacher", dest.name), storage=ctx.storage, workers=1,
        use_gpu=res.use_gpu, cpus_per_worker=cpus, max_failures=cfg.ray.max_failures,
    )  # fmt: skip
    units = epoch_units(lambda r: "teacher")
    with Progress(
        "teacher", EPOCH_SCALE * t.epochs, metrics_path.parent, units, describe_epoch_row, scale=EPOCH_SCALE
    ):
        result = trainer.fit()
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        result.checkpoint.to_directory(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        Path(tmp, "teacher").rename(dest)  # atomic: the cache never holds half a teacher


def _untrained(ctx: RunContext, dest: Path) -> None:
    import torch

    from dnad.data import load_dataset
    from dnad.distill import make_teacher, save_teacher

    data = load_dataset(ctx.cfg.retrain_data_config())
    t = ctx.cfg.search.distill.teacher
    torch.manual_seed(ctx.cfg.retrain_data_config().seed)
    model = make_teacher(t, data.num_classes, data.in_channels, data.image_size)
    save_teacher(dest, model, teacher_spec(ctx.cfg, data, None))


def run_teacher(ctx: RunContext) -> str | None:
    """Path of the teacher checkpoint folder for the search workers (None when distillation is off)."""
    d = ctx.cfg.search.distill
    if not d.enabled:
        print("[teacher] skipped: distillation is off")
        return None
    if d.teacher.kind == "checkpoint":
        path = str(Path(d.teacher.checkpoint).resolve())
        print(f"[teacher] using checkpoint {path}")
        return path
    dest = Path(ctx.cfg.teacher.cache_dir).expanduser().resolve() / teacher_hash(ctx.cfg)
    if (dest / "teacher.json").is_file():
        acc = json.loads((dest / "teacher.json").read_text()).get("val_acc")
        print(f"[teacher] cached: {dest}" + (f" (val acc {100 * acc:.2f}%)" if acc is not None else ""))
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if d.teacher.epochs == 0:
        _untrained(ctx, dest)
    else:
        _train(ctx, dest)
    return str(dest)
