"""Stage a: the frozen teacher of DNAD — trained here (cached by config hash) or loaded.

Training runs as a one-worker TorchTrainer (so it lands on a GPU node when there is one) with a
checkpoint every epoch; the final checkpoint also holds the `save_teacher` folder, which the driver
copies into `teacher.cache_dir/<hash>`. Search workers load it from that path with `load_teacher`;
a genotype teacher's folder carries its genotype (`carry_genotype` adds it to one cached before).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dnad import teacher as _teacher
from dnad.checkpoint import atomic_write_text
from dnad.config import RetrainConfig, TeacherConfig
from dnad.teacher import teacher_val_acc
from pipeline.config import RunConfig, needs_teacher
from pipeline.context import RunContext, thread_count
from pipeline.progress import (
    EPOCH_SCALE,
    Progress,
    append_jsonl,
    describe_epoch_row,
    epoch_units,
    rewind_jsonl,
)


def teacher_hash(cfg: RunConfig, n_train: int | None = None) -> str:
    """The cache key of the run's teacher (`dnad.teacher.teacher_hash` of its parts)."""
    return _teacher.teacher_hash(
        cfg.search.distill.teacher, cfg.retrain_data_config(), n_train, cfg.search.supernet.stem,
        cfg.teacher.max_steps_per_epoch,
    )  # fmt: skip


def teacher_recipe(cfg: RunConfig, n_train: int) -> RetrainConfig:
    """The run's teacher recipe (`dnad.teacher.teacher_recipe`) on `n_train` training images."""
    return _teacher.teacher_recipe(
        cfg.search.distill.teacher, n_train, cfg.retrain_data_config().seed, cfg.teacher.max_steps_per_epoch
    )


def teacher_spec(cfg: RunConfig, data: Any, val_acc: float | None) -> dict[str, Any]:
    """The run's `teacher.json` for a teacher trained on `data` (`dnad.teacher.teacher_card`)."""
    return _teacher.teacher_card(
        cfg.search.distill.teacher, data.num_classes, data.in_channels, data.image_size,
        cfg.search.supernet.stem, val_acc, teacher_hash(cfg, len(data.train)),
    )  # fmt: skip


def teacher_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: trains the teacher with dnad's RetrainLoop, one checkpoint per epoch."""
    import ray.train
    import torch

    from dnad.data import load_dataset
    from dnad.distill import make_teacher, save_teacher
    from dnad.retrain import RetrainLoop
    from pipeline.raytools import read_checkpoint, report, worker_setup

    cfg = RunConfig.model_validate(config["cfg"])
    device = worker_setup(config["threads"], config["use_gpu"], cfg.ray.kernels)
    dcfg = cfg.retrain_data_config()
    data = load_dataset(dcfg)
    t = cfg.search.distill.teacher
    torch.manual_seed(dcfg.seed)  # the initial weights do not depend on the worker process's RNG state
    model = make_teacher(t, data.num_classes, data.in_channels, data.image_size, cfg.search.supernet.stem)
    rcfg = teacher_recipe(cfg, len(data.train))
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
    from pipeline.raytools import fit_off_main_thread, torch_trainer

    cfg, res = ctx.cfg, ctx.resources
    assert res is not None
    cpus = res.search_worker(cfg)
    epochs = teacher_recipe(cfg, retrain_images(ctx)).epochs
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
        "teacher", EPOCH_SCALE * epochs, metrics_path.parent, units, describe_epoch_row, scale=EPOCH_SCALE
    ):
        result = fit_off_main_thread(trainer)  # keeps Ctrl-C a KeyboardInterrupt afterwards
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
    model = make_teacher(t, data.num_classes, data.in_channels, data.image_size, ctx.cfg.search.supernet.stem)
    save_teacher(dest, model, teacher_spec(ctx.cfg, data, None))


def carry_genotype(folder: Path, t: TeacherConfig) -> None:
    """Give a genotype teacher cached before its folder carried its genotype (`dnad.teacher.GENOTYPE_KEY`)
    the genotype of this config: the cache key was made from that file's content, so it is the same
    genotype, and the folder no longer depends on where the file lay when it was trained."""
    spec_file = folder / "teacher.json"
    try:
        spec = json.loads(spec_file.read_text())
    except (OSError, ValueError):  # unreadable: loading it reports that, as it did before
        return
    genotype = _teacher.genotype_of(t)
    if isinstance(spec, dict) and genotype is not None and _teacher.GENOTYPE_KEY not in spec:
        spec[_teacher.GENOTYPE_KEY] = genotype
        try:
            atomic_write_text(spec_file, json.dumps(spec, sort_keys=True, indent=1))
        except OSError:  # a read-only shared cache: the search reads the file, which is where it says
            pass


def run_teacher(ctx: RunContext) -> str | None:
    """Path of the teacher checkpoint folder for the search workers (None when distillation is off)."""
    d = ctx.cfg.search.distill
    if not needs_teacher(ctx.cfg):
        print("[teacher] skipped: no search distils (distillation off, or a strategy without a teacher)")
        return None
    if d.teacher.kind == "checkpoint":
        path = str(Path(d.teacher.checkpoint).resolve())
        print(f"[teacher] using checkpoint {path}")
        return path
    dest = Path(ctx.cfg.teacher.cache_dir).expanduser().resolve() / teacher_hash(ctx.cfg, retrain_images(ctx))
    if (dest / "teacher.json").is_file():
        print(f"[teacher] cached: {dest}")
        carry_genotype(dest, ctx.cfg.search.distill.teacher)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if d.teacher.epochs == 0:
            _untrained(ctx, dest)
        else:
            _train(ctx, dest)
    judge_teacher(ctx, dest)
    return str(dest)


def retrain_images(ctx: RunContext) -> int:
    """Training images of the retrain data (what teachers are trained on)."""
    assert ctx.data_meta is not None
    return int(ctx.data_meta.train_size or 0)


def judge_teacher(ctx: RunContext, path: Path) -> None:
    """Print (and keep in stages/teacher.json) the teacher's validation accuracy; say so when it is near
    chance (each search then decides by `search.distill.weak_teacher`, and checks it again against the
    super-network after warm-up)."""
    acc = teacher_val_acc(path)
    m = ctx.data_meta
    assert m is not None
    chance = 1.0 / m.num_classes
    if acc is None:
        print("[teacher] untrained (epochs=0): no validation accuracy")
    else:
        print(
            f"[teacher] validation accuracy {100 * acc:.2f}% on {m.val_size} images (chance: {100 * chance:.1f}%)"
        )
    if acc is not None and acc < chance + 0.1 * (1.0 - chance):
        what = ("the searches run without distillation" if ctx.cfg.search.distill.weak_teacher == "drop"
                else "distilling anyway (search.distill.weak_teacher=keep)")  # fmt: skip
        print(f"[teacher] warning: near chance, a teacher not worth imitating; {what}. More teacher "
              "epochs (search.distill.teacher.epochs / min_steps) or a checkpoint teacher may help.")  # fmt: skip
    ctx.mark_done("teacher", {"path": str(path), "val_acc": acc, "chance": chance})
