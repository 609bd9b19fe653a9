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
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repo root replaces pipeline/ on the path, so that
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # pipeline/profile.py hides no stdlib module

from dnad.errors import InputError
from pipeline.cli import Parser, fail
from pipeline.config import build_config, profiles
from pipeline.progress import one_line

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
    """Config + output folder + pre-flight checks (`pipeline.checks.Preflight`); raises InputError
    before anything is touched."""
    from pipeline.checks import check_all
    from pipeline.raytools import check_address, check_allocator, check_local_resources

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    cfg = build_config(args.profile, args.config, overrides, smoke=args.smoke_test)
    name = Path(args.config).stem if args.config else (args.profile or "quick")
    out = Path(args.output or cfg.output or f"runs/{name}{'-smoke' if args.smoke_test else ''}").resolve()
    cfg = cfg.model_copy(update={"output": str(out)})
    explicit = {o.partition("=")[0] for o in args.overrides}
    check_address(cfg.ray.address)  # a cluster that is not there or refuses us: one line within seconds
    check_allocator(cfg.ray.allocator, cfg.ray.address is not None)
    pre = check_all(cfg, out, args.fresh, explicit)
    check_local_resources(pre.cfg)  # a request this machine can never hold: refused before Ray starts
    return pre, out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        pre, out = resolve(args)
    except InputError as e:
        return fail(e)
    import ray

    from pipeline.context import RunContext
    from pipeline.raytools import await_resources, ctrl_c_stops, start_ray

    t0 = time.monotonic()
    cfg = pre.cfg
    try:
        start_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.allocator)
        resources = await_resources(cfg)  # never left pending: refused with the numbers, or waited for
        ctx = RunContext(cfg, out, resources, data_meta=pre.retrain, train_size=pre.search.train_size)
    except InputError as e:
        ray.shutdown()
        return fail(e)
    try:
        with ctrl_c_stops():  # Ray's waits may drop a KeyboardInterrupt (pipeline.raytools.ctrl_c_stops)
            ctx.prepare(args.fresh)
            return run_stages(ctx, pre.resuming, t0, pre.notes)
    except InputError as e:
        return fail(e)
    except KeyboardInterrupt:
        sys.stderr.write(
            f"interrupted: what has finished is kept; the same command resumes the run ({out})\n"
        )
        return 130
    except Exception as e:  # a stage failed: one line here, the traceback in the run folder
        log = ctx.out / "error.log"
        log.write_text(traceback.format_exc())
        sys.stderr.write(f"error: {one_line(e)} (traceback in {log})\n")
        return 1
    finally:
        ray.shutdown()


def run_stages(ctx, resuming: bool, t0: float, notes: list[str] = ()) -> int:
    from pipeline.describe import describe_run
    from pipeline.stream import run_search_and_retrain
    from pipeline.teacher import run_teacher

    print(describe_run(ctx, resuming))
    for note in notes:  # what the checks capped or skipped
        print(note)
    if searches_left(ctx):
        teacher_path = run_teacher(ctx)  # cached by config hash: a resumed run finds it
    else:  # resumed after every search ended: only retraining is left, and it needs no teacher
        teacher_path = None
        print("[teacher] not needed: every search has ended")
    if ctx.stage_done("retrain"):
        print("[run] searches and retraining already finished")
    else:
        failures = run_search_and_retrain(ctx, teacher_path)
        if failures and len(failures) == ctx.n_points:
            sys.stderr.write(f"error: every search failed; first: {next(iter(failures.items()))}\n")
            return 1
        ctx.mark_done("search", {"failed": failures})
    return finish(ctx, t0)


def searches_left(ctx) -> bool:
    """Whether any sweep point's search has still to run (`pipeline.stream.search_ended`)."""
    from pipeline.config import sweep_points
    from pipeline.stream import search_ended

    return any(not search_ended(ctx.out, p["trial_id"]) for p in sweep_points(ctx.cfg))


def finish(ctx, t0: float) -> int:
    """The final tables (every repeat in retrained.parquet), the report, the summary on the console."""
    from dnad.checkpoint import atomic_write_bytes
    from dnad.results import architectures_table, read_cards, retrain_results
    from pipeline.collect import run_collect
    from pipeline.describe import publish

    archs = run_collect(ctx)
    r = ctx.cfg.retrain
    retrained = retrain_results(ctx.out, list(archs["arch_id"]) if len(archs) else [], r.repeats, r.epochs)
    atomic_write_bytes(ctx.out / "retrained.parquet", retrained.to_parquet(index=False))
    ok, skipped = (int((retrained["status"] == s).sum()) for s in ("ok", "skipped"))
    ctx.mark_done("retrain", {"ok": ok, "skipped": skipped, "failed": len(retrained) - ok - skipped})
    n_skip = retrained.loc[retrained["status"] == "skipped", "arch_id"].nunique()
    print(f"[collect] {len(archs)} distinct architectures"
          + (f", {n_skip} not retrained (retrain.min_macs_gap)" if n_skip else ""))  # fmt: skip
    print(publish(ctx.out, architectures_table(archs, retrained, read_cards(ctx.out))))
    print(f"done in {time.monotonic() - t0:.0f} s; results in {ctx.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
