"""What the console shows around the stages: the run header and the final tables/report."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from dnad.budget import steps_per_epoch
from dnad.results import metrics_table, summary_table, write_results
from pipeline.config import initial_sparsity, needs_teacher, retrain_plan, search_plan, sweep_points
from pipeline.context import RunContext
from pipeline.progress import read_jsonl


def dense_cost(ctx: RunContext) -> tuple[int, int]:
    """(MACs, params) of the search super-network with every pair alive (analytic, search width)."""
    from dnad.complexity import genotype_cost
    from dnad.genotype import Genotype, reduction_indices
    from dnad.ops import resolve_op_set

    s, m = ctx.cfg.search.supernet, ctx.data_meta
    assert m is not None
    ops = resolve_op_set(s.ops)
    cell = tuple(tuple((i, o) for i in range(k + 2) for o in ops) for k in range(s.nodes))
    g = Genotype(cells=(cell,) * s.cells, reductions=reduction_indices(s.cells))
    return genotype_cost(g, s.C, m.num_classes, m.in_channels, m.image_size, s.stem, affine=False)


def malloc_name(cfg) -> str:
    """The Ray workers' allocator as the run header names it (`pipeline.raytools.worker_preload`)."""
    from pipeline.raytools import worker_preload

    preload = worker_preload(cfg.ray.allocator, cfg.ray.address is not None)
    if preload:
        return f"tcmalloc ({preload})" if "tcmalloc" in preload else preload
    if cfg.ray.allocator == "auto" and os.environ.get("LD_PRELOAD"):
        return f"as LD_PRELOAD={os.environ['LD_PRELOAD']} set here says"
    return "the system's" + (" (no tcmalloc here)" if cfg.ray.allocator == "auto" else "")


def kernels_name(cfg) -> str:
    """The CPU kernels the workers train on (`ray.kernels`); with `auto` this builds dnad's native
    kernels here once (about a second), so local workers find them in the cache."""
    from dnad import fastops

    if cfg.ray.kernels == "aten":
        return "PyTorch's (ray.kernels=aten)"
    return fastops.describe_cpu_kernels()


def describe_run(ctx: RunContext, resuming: bool) -> str:
    """The run header: what each stage will really do on this data (images, epochs, steps)."""
    from dnad.report import teacher_name
    from pipeline.teacher import retrain_images, teacher_recipe

    cfg, res, m = ctx.cfg, ctx.resources, ctx.data_meta
    assert res is not None and m is not None
    s, rd = cfg.search, cfg.retrain_data_config()
    macs, params = dense_cost(ctx)
    s0 = initial_sparsity(s)
    points = sweep_points(cfg)
    plan = search_plan(cfg, points[0], ctx.train_size or 0)
    r = retrain_plan(cfg, retrain_images(ctx))
    r_steps = r.epochs * steps_per_epoch(retrain_images(ctx), r.batch_size, 1, r.max_steps_per_epoch)
    scaled = (
        f"; shrink constants rescaled ×{plan.shrink_scale:.2f} to its steps" if plan.shrink_scale != 1 else ""
    )
    kd = "KD off"
    if needs_teacher(cfg):
        t = s.distill.teacher
        kd = f"KD on (T={s.distill.temperature}, teacher {teacher_name(t.model_dump())}"
        if t.kind != "checkpoint" and t.epochs:
            kd += f", {teacher_recipe(cfg, retrain_images(ctx)).epochs} epoch(s) on {retrain_images(ctx)} images"
        kd += ")"
    where = f"{cfg.ray.workers} worker(s) × {'1 GPU' if res.use_gpu else f'{res.search_worker(cfg)} CPU'}"
    root = f" {cfg.data.root}" if cfg.data.root else ""
    stats = ", ".join(f"{v:.3f}" for v in cfg.data.mean or ())
    return "\n".join([
        f"dnad: {'resuming' if resuming else 'new run'} in {ctx.out}",
        f"  data     {cfg.data.dataset}{root}: {ctx.train_size} search / {retrain_images(ctx)} retrain images, "
        f"{m.val_size} validation (held out of training), {m.test_size} test; {m.in_channels}x{m.image_size}x"
        f"{m.image_size}, {m.num_classes} classes, mean {stats}",
        f"  ray      {res.cpus} CPUs, {res.gpus} GPUs ({'GPU' if res.use_gpu else 'CPU'} training); workers' "
        f"malloc {malloc_name(cfg)}" + ("" if res.use_gpu else f"; CPU kernels {kernels_name(cfg)}"),
        f"  search   {'/'.join(cfg.sweep.strategy or [s.strategy])}: C={s.supernet.C} × {s.supernet.cells} cells, "
        f"S0={s0:.2f}, dense {params:,} params, "
        f"{macs / 1e6:.2f} MMACs; {plan.config.epochs} epochs ({plan.config.warmup_epochs} warm-up) × "
        f"{plan.steps_per_epoch} steps = {plan.steps} steps{scaled}; {kd}; {len(points)} sweep point(s), {where} each",
        f"  retrain  C={r.C}, {r.epochs} epoch(s) = {r_steps} steps on {retrain_images(ctx)} images"
        f"{'' if rd.augment else ' (no augmentation)'}, {'AdamW' if r.optimizer == 'adamw' else 'SGD'} lr {r.lr}, "
        f"batch {r.batch_size}; chosen on {m.val_size} validation images, tested on {m.test_size} test images"
        + (f"; an emission within {100 * gap:g} % of the MACs of one kept from its search is not retrained"
           if (gap := cfg.retrain.min_macs_gap) else ""),
    ])  # fmt: skip


def publish(out: Path, table: pd.DataFrame, quiet: bool = False) -> str:
    """Write a run's results (`table` + the search metrics) and its report, atomically (a reader sees
    the old files or the new ones); returns the summary table."""
    rows = [row for f in sorted((out / "search").glob("*/metrics.jsonl")) for row in read_jsonl(f)]
    write_results(out, table, metrics_table(rows))
    from dnad.report import write_report

    try:
        path = write_report(out)
        if not quiet:
            print(f"[report] {path}")
    except Exception as e:  # the results are written; a broken report must not fail the run
        print(f"[report] failed: {type(e).__name__}: {e}")
    return summary_table(table)
