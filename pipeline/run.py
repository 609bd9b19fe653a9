"""DNAD pipeline CLI: teacher -> search sweep (Ray Train inside Tune) -> collect -> retrain (Tune) -> results.

    python pipeline/run.py [--profile NAME | --config PATH] [--output DIR] [--fresh] [--smoke-test]
                           [--address ADDR] [key=value ...]

The same command again resumes (finished stages are skipped, searches and retrain trials continue
from their last checkpoints); --fresh starts over. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repo root replaces pipeline/ on the path, so that
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # pipeline/profile.py hides no stdlib module

from dnad.errors import InputError
from pipeline.cli import Parser
from pipeline.config import build_config, profiles

MAIN_KEYS = """main keys (key=value, dotted, values parsed as YAML):
  data.dataset data.root data.train_subset data.test_subset    search.epochs search.batch_size
  search.supernet.C search.supernet.cells search.shrink.{gamma0,phi,t_max,s_min,sparsity}
  search.distill.enabled search.distill.temperature search.distill.teacher.{kind,arch,epochs}
  retrain.{C,epochs,batch_size,optimizer,lr} retrain_data.{train_subset,augment}
  sweep.{temperature,gamma0,phi,t_max,s_min,sparsity}=[...] sweep.num_samples
  ray.workers ray.use_gpu ray.cpus_per_trial ray.storage ray.max_failures teacher.cache_dir"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(
        prog="pipeline/run.py",
        description="DNAD neural architecture search on Ray: a Pareto family of classifiers from one search.",
        epilog=f"profiles: {', '.join(profiles())} (default: quick)\n{MAIN_KEYS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--profile", help="a profile from configs/ (default: quick)")
    g.add_argument("--config", help="a YAML config file instead of a profile")
    p.add_argument("--output", help="output folder (default: runs/<profile>[-smoke])")
    p.add_argument("--fresh", action="store_true", help="delete the output folder's run and start over")
    p.add_argument("--smoke-test", action="store_true", help="the profile shrunk to tiny sizes")
    p.add_argument("--address", help="join a running Ray cluster ('auto') instead of starting one")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)  # key=value pairs may come before and after the options


def resolve(args: argparse.Namespace):
    """Config + output folder + pre-flight checks; raises InputError before anything is touched."""
    from pipeline.checks import check_all

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    cfg = build_config(args.profile, args.config, overrides, smoke=args.smoke_test)
    name = Path(args.config).stem if args.config else (args.profile or "quick")
    out = Path(args.output or cfg.output or f"runs/{name}{'-smoke' if args.smoke_test else ''}").resolve()
    cfg = cfg.model_copy(update={"output": str(out)})
    resuming, search_meta, retrain_meta = check_all(cfg, out, args.fresh)
    return cfg, out, resuming, search_meta, retrain_meta


def detect_resources(cfg):
    from pipeline.context import Resources
    from pipeline.raytools import cluster_totals

    cpus, gpus = cluster_totals()
    if cfg.ray.use_gpu is True and gpus == 0:
        raise InputError("ray.use_gpu", True, "the Ray cluster has no GPU; use ray.use_gpu=auto or false")
    use_gpu = gpus > 0 if cfg.ray.use_gpu == "auto" else bool(cfg.ray.use_gpu)
    return Resources(cpus, gpus, use_gpu)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, out, resuming, search_meta, retrain_meta = resolve(args)
    except InputError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    import ray

    from pipeline.context import RunContext
    from pipeline.raytools import start_ray

    t0 = time.monotonic()
    start_ray(cfg.ray.address, cfg.ray.num_cpus)
    try:
        ctx = RunContext(
            cfg, out, detect_resources(cfg), data_meta=retrain_meta, train_size=search_meta.train_size
        )
        ctx.prepare(args.fresh)
        return run_stages(ctx, resuming, t0)
    except InputError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    finally:
        ray.shutdown()


def run_stages(ctx, resuming: bool, t0: float) -> int:
    from pipeline.collect import run_collect
    from pipeline.describe import describe_run
    from pipeline.retrain import run_retrain
    from pipeline.sweep import run_sweep
    from pipeline.teacher import run_teacher

    print(describe_run(ctx, resuming))
    teacher_path = run_teacher(ctx)  # cached by config hash: a resumed run finds it
    if not ctx.stage_done("search"):
        failures = run_sweep(ctx, teacher_path)
        if failures and len(failures) == ctx.n_points:
            sys.stderr.write(f"error: every search failed; first: {next(iter(failures.items()))}\n")
            return 1
        for tid, err in failures.items():
            print(f"[search] {tid} failed: {err}")
        ctx.mark_done("search", {"failed": failures})
    else:
        print("[search] already finished")
    archs = run_collect(ctx)
    print(f"[collect] {len(archs)} distinct architectures")
    retrained = run_retrain(ctx, archs)
    return finish(ctx, archs, retrained, t0)


def finish(ctx, archs, retrained, t0: float) -> int:
    from pipeline.describe import write_all

    table = write_all(ctx, archs, retrained)
    print(table)
    print(f"done in {time.monotonic() - t0:.0f} s; results in {ctx.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
