"""Does the search find better architectures? DNAD vs SNPS vs random search vs a hand-designed model.

    python benchmarks/quality.py --profile fashion [--seeds 0 1] [--max-archs 6] [--max-params N]
        [--device auto|cpu|cuda] [--jobs N] [--deadline-min M] [--out DIR] [key=value ...]

Every method gets the same recipe: the profile's search settings (DNAD: distillation on; SNPS: the
same search with distillation off, same seeds), the same retrain recipe (`retrain.*`,
`retrain_data.*`) for every architecture, and the same number of retrained architectures per seed:
- **DNAD** / **SNPS**: the search's emissions (de-duplicated), `--max-archs` of them spread evenly
  over their MACs range;
- **random**: random genotypes of the same space (same cells, nodes, op set; each node keeps a random
  non-empty subset of its (input, op) pairs) whose MACs fall in the DNAD emissions' MACs range;
- **hand-designed**: ResNet-18 adapted to the input size (3×3 stem, no max-pool), same recipe.

Runs through the `dnad` library (no Ray): in one process, or with `--jobs N` on N worker processes
(on one GPU they share its time: on an H200 a C=7 retraining took 2.5-4.5 min with five processes on
the GPU, against about 70 s alone estimated from its measured training speed). Resumable: searches are cached as `emissions-<method>-<seed>.json`, finished rows are kept in
`rows.jsonl`, and both are skipped when the same command runs again; a retraining stopped part-way
resumes from its last epoch (`checkpoints/<method>-<seed>-<arch>/`, removed once its row is written).
`--deadline-min` starts only the work that can end in time (judged by the longest of its kind so far).
Writes to `--out` (default
`benchmarks/results/quality-<profile>`): `quality.csv`, `quality.md` (per-architecture table,
hypervolume per method and seed in (test error, log10 MACs) against a fixed reference point, the
exact command, machine and date), `quality.html` (Plotly Pareto fronts).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dnad.checkpoint import atomic_write_text, checkpoint_dir, load_latest, prune_checkpoints, save_checkpoint
from dnad.complexity import count_complexity, genotype_cost
from dnad.config import TeacherConfig
from dnad.data import DatasetBundle, load_dataset
from dnad.distill import load_teacher, make_teacher, save_teacher
from dnad.errors import InputError
from dnad.genotype import Genotype, reduction_indices
from dnad.network import build_model
from dnad.ops import resolve_op_set
from dnad.results import pareto_mask
from dnad.retrain import RetrainLoop
from dnad.strategies.snps import SearchLoop
from pipeline.config import RunConfig, build_config

# hypervolume reference point: (test error, log10 MACs) — worse than anything worth keeping
HV_REF = (0.5, 10.0)
METHODS = ("DNAD", "SNPS", "random", "hand-designed")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def hypervolume(error: np.ndarray, log_macs: np.ndarray, ref: tuple[float, float] = HV_REF) -> float:
    """Area dominated by the points (minimising both) and bounded by `ref`."""
    pts = sorted((c, e) for e, c in zip(error, log_macs) if e < ref[0] and c < ref[1])
    hv, best_err = 0.0, ref[0]
    for i, (c, e) in enumerate(pts):
        best_err = min(best_err, e)
        nxt = pts[i + 1][0] if i + 1 < len(pts) else ref[1]
        hv += (ref[0] - best_err) * (nxt - c)
    return hv


def spread(items: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """`k` items evenly spaced along their MACs (all of them when there are ≤ k); with k = 1 the one
    with the most MACs (the most capable within the limits, e.g. `--max-params`)."""
    items = sorted(items, key=lambda r: r["macs"])
    if len(items) <= k:
        return items
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)}) if k > 1 else [len(items) - 1]
    return [items[i] for i in idx]


# -- teacher ------------------------------------------------------------------------------------------
def get_teacher(cfg: RunConfig, data: DatasetBundle, device: str) -> Path:
    """The teacher's checkpoint folder: the configured checkpoint, or one trained here (and cached by
    the hash of its config, like the pipeline's teacher stage)."""
    from pipeline.teacher import teacher_hash, teacher_recipe, teacher_spec  # no Ray import at module level

    t = cfg.search.distill.teacher
    if t.kind == "checkpoint":
        return Path(t.checkpoint)
    dest = Path(cfg.teacher.cache_dir).expanduser() / teacher_hash(cfg)
    if (dest / "teacher.json").is_file():
        log(f"teacher: cached {dest}")
        return dest
    dcfg = cfg.retrain_data_config()
    torch.manual_seed(dcfg.seed)
    model = make_teacher(t, data.num_classes, data.in_channels, data.image_size)
    if t.epochs:
        log(f"teacher: training {t.kind} for {t.epochs} epochs on {device}")
        loop = RetrainLoop(
            teacher_recipe(cfg), model, data, device,
            lambda r: log(f"teacher epoch {r['epoch']}: test acc {100 * r['test_acc']:.2f}%"),
            dcfg.augment, 0, "teacher",
        )  # fmt: skip
        last = loop.run()
        acc = last.get("test_acc")
        model.to("cpu", memory_format=torch.contiguous_format)
    else:
        acc = None
    save_teacher(dest, model, teacher_spec(cfg, data, acc))
    return dest


def random_genotypes(
    cfg: RunConfig,
    meta: dict[str, int],
    lo: int,
    hi: int,
    n: int,
    seed: int,
    tries: int = 20000,
    max_params: int | None = None,
) -> list[dict[str, Any]]:
    """`n` random genotypes of the search space with retrain-width MACs in [lo, hi] (and at most
    `max_params` parameters)."""
    sn, rc = cfg.search.supernet, cfg.retrain
    ops = resolve_op_set(sn.ops)
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for _ in range(tries):
        if len(out) == n:
            break
        p = rng.uniform(0.05, 1.0)
        cells = []
        for _c in range(sn.cells):
            nodes = []
            for j in range(sn.nodes):
                pairs = [(i, o) for i in range(j + 2) for o in ops]
                keep = [q for q in pairs if rng.random() < p] or [rng.choice(pairs)]
                nodes.append(tuple(keep))
            cells.append(tuple(nodes))
        g = Genotype(cells=tuple(cells), reductions=reduction_indices(sn.cells))
        macs, params = genotype_cost(g, rc.C, meta["classes"], meta["channels"], meta["size"], sn.stem)
        if max_params is not None and params > max_params:
            continue
        if lo <= macs <= hi and g.arch_id not in {r["arch_id"] for r in out}:
            out.append({"arch_id": g.arch_id, "genotype": g.to_json(), "emission_step": -1})
    return out


# -- work items (run inline with --jobs 1, else in worker processes) ------------------------------------
_CACHE: dict[str, Any] = {}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _bundle(cfg: RunConfig, retrain_data: bool) -> DatasetBundle:
    dc = cfg.retrain_data_config() if retrain_data else cfg.data
    key = dc.model_dump_json()
    if key not in _CACHE:
        _CACHE[key] = load_dataset(dc)
    return _CACHE[key]


def search_task(cfg_d: dict[str, Any], seed: int, kd: bool, teacher_dir: str | None, device: str) -> dict:
    """One search (DNAD: distillation on; SNPS: off): its distinct emissions and wall time."""
    cfg = RunConfig.model_validate(cfg_d)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    data = _bundle(cfg, retrain_data=False)
    teacher = load_teacher(teacher_dir) if kd and teacher_dir else None
    s = cfg.search.model_copy(
        update={"seed": seed, "distill": cfg.search.distill.model_copy(update={"enabled": kd})}
    )
    last = [0.0]
    name = f"{'DNAD' if kd else 'SNPS'} seed {seed}"

    def cb(m: dict[str, Any]) -> None:
        if time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            log(f"  {name}: search step {m['step']} epoch {m['epoch']} S={m['S']:.1f} "
                f"pairs={m['alive_pairs']} {m['img_per_s']:.0f} img/s emissions={m['emissions']}")  # fmt: skip

    loop = SearchLoop(s, data, teacher, device, cb, augment=cfg.data.augment)
    t0 = time.monotonic()
    emissions = loop.run()
    out, seen = [], set()
    for e in emissions:
        if e.arch_id not in seen:
            seen.add(e.arch_id)
            out.append({"arch_id": e.arch_id, "genotype": e.genotype, "emission_step": e.step})
    return {"candidates": out, "search_s": time.monotonic() - t0}


def retrain_task(
    cfg_d: dict[str, Any], method: str, seed: int, cand: dict[str, Any], device: str, ckpt: str | None = None
) -> dict:
    """Retrain one candidate with the profile's recipe; the finished row of the table. With `ckpt` (a
    folder), a checkpoint is kept after every epoch and a retraining stopped part-way resumes from it."""
    cfg = RunConfig.model_validate(cfg_d)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    rdata, rdata_cfg = _bundle(cfg, retrain_data=True), cfg.retrain_data_config()
    torch.manual_seed(cfg.retrain.seed)
    if method == "hand-designed":
        model = make_teacher(TeacherConfig(kind="torchvision", arch="resnet18"), **_shape(rdata))
    else:
        g = Genotype.from_json(cand["genotype"])
        model = build_model(g, cfg.retrain.C, rdata.num_classes, rdata.in_channels, rdata.image_size,
                            auxiliary=cfg.retrain.auxiliary_weight > 0)  # fmt: skip
    c = count_complexity(model, (rdata.in_channels, rdata.image_size, rdata.image_size))
    label = f"{method} s{seed} {cand['arch_id']}"
    log(f"{label}: {c.params:,} params, {c.macs / 1e6:.1f} MMACs, retraining on {device}")
    loop = RetrainLoop(
        cfg.retrain, model, rdata, device,
        lambda r: log(f"  {label} epoch {r['epoch']} " + (
            f"test acc {100 * r['test_acc']:.2f}%" if r["test_acc"] == r["test_acc"] else "(not tested)")),
        augment=rdata_cfg.augment, cutout=rdata_cfg.cutout,
    )  # fmt: skip
    found = load_latest(Path(ckpt)) if ckpt else None
    if found is not None:
        loop.load_state_dict(found[1])
        log(f"{label}: resumed after epoch {loop.epoch} of {cfg.retrain.epochs}")

    def keep(lp: RetrainLoop) -> None:
        if ckpt and not lp.done:
            save_checkpoint(checkpoint_dir(Path(ckpt), lp.epoch), lp.state_dict())
            prune_checkpoints(Path(ckpt), keep=1)

    last = loop.run(keep)
    return {"method": method, "seed": seed, "arch_id": cand["arch_id"], "params": c.params, "macs": c.macs,
            "test_error": 1 - last["test_acc"], "test_acc": last["test_acc"], "epochs": loop.epoch,
            "retrain_s": sum(h["epoch_s"] for h in loop.history), "search_s": cand.get("search_s", 0.0),
            "emission_step": cand["emission_step"]}  # fmt: skip


class Runner:
    """Runs work items inline (`jobs` = 1) or on `jobs` spawned worker processes. With a `deadline`
    (a time.monotonic() value) an item starts only if it can end by then, judged by the longest item
    of the same kind so far (the first of each kind always starts)."""

    def __init__(self, jobs: int, threads: int, deadline: float | None):
        self.jobs, self.deadline = jobs, deadline
        self.longest: dict[str, float] = {}
        self.pool = None
        if jobs > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(
                jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                initargs=(max(1, threads // jobs),),
            )  # fmt: skip

    def fits(self, kind: str) -> bool:
        if self.deadline is None:
            return True
        return time.monotonic() + self.longest.get(kind, 0.0) <= self.deadline

    def _took(self, kind: str, seconds: float) -> None:
        self.longest[kind] = max(self.longest.get(kind, 0.0), seconds)

    def map(self, fn: Any, items: list[tuple], on_done: Any) -> int:
        """Run fn(*item) for each item; on_done(item, result) in the main process as each finishes.
        Returns how many items were not started because they would not end by the deadline."""
        kind = fn.__name__
        if self.pool is None:
            for i, item in enumerate(items):
                if not self.fits(kind):
                    return len(items) - i
                t0 = time.monotonic()
                res = fn(*item)
                self._took(kind, time.monotonic() - t0)
                on_done(item, res)
            return 0
        from concurrent.futures import FIRST_COMPLETED, wait

        todo, running = list(items), {}
        while todo or running:
            while todo and len(running) < self.jobs and self.fits(kind):
                item = todo.pop(0)
                running[self.pool.submit(fn, *item)] = (item, time.monotonic())
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                item, t0 = running.pop(f)
                self._took(kind, time.monotonic() - t0)
                on_done(item, f.result())
        return len(todo)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", name, "no CUDA device is visible here; use --device cpu")
    return name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="fashion")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--max-archs", type=int, default=6, help="retrained architectures per method and seed")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="CPU threads, shared by the jobs"
    )
    ap.add_argument(
        "--max-params", type=int, help="retrain only architectures with at most this many parameters"
    )
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--jobs", type=int, default=1, help="searches/retrainings run at once (worker processes)")
    ap.add_argument(
        "--deadline-min", type=float,
        help="finish within this many minutes: start a search or retraining only if, judged by the longest "
        "one of its kind so far, it can end in time (the same command again goes on with the rest)",
    )  # fmt: skip
    ap.add_argument("--out", help="output folder (default benchmarks/results/quality-<profile>)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    a = ap.parse_intermixed_args(argv)
    try:
        cfg = build_config(a.profile, None, a.overrides)
        device = resolve_device(a.device)
        if a.jobs < 1:
            raise InputError("--jobs", str(a.jobs), "at least 1")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    deadline = None if a.deadline_min is None else t_start + 60 * a.deadline_min
    torch.set_num_threads(max(1, a.threads // a.jobs) if a.jobs > 1 else a.threads)
    out = Path(a.out or Path(__file__).resolve().parent / "results" / f"quality-{a.profile}")
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "rows.jsonl"
    done = {}
    if rows_file.is_file():
        for line in rows_file.read_text().splitlines():
            r = json.loads(line)
            done[(r["method"], r["seed"], r["arch_id"])] = r
    command = "python benchmarks/quality.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    log(f"{command} -> {out} (device {device}, {a.jobs} job(s))")
    cfg_d = cfg.model_dump(mode="json")
    meta_info = {"device": device, "jobs": a.jobs, "threads": a.threads}

    rdata = _bundle(cfg, retrain_data=True)
    meta = {"channels": rdata.in_channels, "size": rdata.image_size, "classes": rdata.num_classes}
    need_dnad = "DNAD" in a.methods or "random" in a.methods
    runner = Runner(a.jobs, a.threads, deadline)
    skipped = 0
    try:
        # 1. searches (cached per method and seed: a re-run resumes)
        searches, found = [], {}
        for seed in a.seeds:
            for method, kd in (("DNAD", True), ("SNPS", False)):
                if (method == "DNAD" and not need_dnad) or (method == "SNPS" and method not in a.methods):
                    continue
                cache = out / f"emissions-{method}-{seed}.json"
                if cache.is_file():
                    found[(method, seed)] = json.loads(cache.read_text())
                else:
                    searches.append((cfg_d, seed, kd, None, device))
        if any(item[2] for item in searches):  # the teacher is needed only by a DNAD search still to run
            teacher_dir = str(get_teacher(cfg, rdata, device))
            searches = [(c, sd, kd, teacher_dir if kd else None, d) for c, sd, kd, _, d in searches]

        def searched(item: tuple, res: dict) -> None:
            method, seed = ("DNAD" if item[2] else "SNPS"), item[1]
            atomic_write_text(out / f"emissions-{method}-{seed}.json", json.dumps(res))
            found[(method, seed)] = res
            log(
                f"{method} seed {seed}: {len(res['candidates'])} distinct emissions in {res['search_s']:.0f} s"
            )

        if searches:
            log(f"searching: {len(searches)} search(es)")
        skipped += runner.map(search_task, searches, searched)

        # 2. candidates per method and seed
        pools: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for seed in a.seeds:
            for method in ("DNAD", "SNPS"):
                if (method, seed) not in found:
                    continue
                cands = [dict(c, search_s=found[(method, seed)]["search_s"])
                         for c in found[(method, seed)]["candidates"]]  # fmt: skip
                for c in cands:
                    g = Genotype.from_json(c["genotype"])
                    c["macs"], c["params"] = genotype_cost(
                        g,
                        cfg.retrain.C,
                        meta["classes"],
                        meta["channels"],
                        meta["size"],
                        cfg.search.supernet.stem,
                    )
                if a.max_params is not None:
                    cands = [c for c in cands if c["params"] <= a.max_params]
                pools[(method, seed)] = spread(cands, a.max_archs)
                log(
                    f"{method} seed {seed}: retraining {len(pools[(method, seed)])} of {len(cands)} candidates"
                )
            if "random" in a.methods and pools.get(("DNAD", seed)):
                macs = [c["macs"] for c in pools[("DNAD", seed)]]
                pools[("random", seed)] = random_genotypes(
                    cfg, meta, min(macs), max(macs), len(pools[("DNAD", seed)]), 1000 + seed,
                    max_params=a.max_params,
                )  # fmt: skip
            if "hand-designed" in a.methods:
                pools[("hand-designed", seed)] = [
                    {"arch_id": "resnet18", "genotype": "", "emission_step": -1}
                ]

        # 3. retrain, round-robin over (method, seed) so that a deadline cuts every method evenly
        queues = [[(m, s, c) for c in pools.get((m, s), [])] for s in a.seeds for m in a.methods]
        order = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]

        def ckpt(m: str, s: int, c: dict[str, Any]) -> str:
            return str(out / "checkpoints" / f"{m}-{s}-{c['arch_id']}")

        tasks = [
            (cfg_d, m, s, c, device, ckpt(m, s, c)) for m, s, c in order if (m, s, c["arch_id"]) not in done
        ]
        total = len(tasks)
        log(f"retraining {total} architecture(s) ({len(order) - total} already done)")
        t_ret = time.monotonic()

        def retrained(item: tuple, row: dict) -> None:
            done[(row["method"], row["seed"], row["arch_id"])] = row
            with rows_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            shutil.rmtree(item[5], ignore_errors=True)  # the row is kept: its checkpoint is not needed
            n = sum(1 for t in tasks if (t[1], t[2], t[3]["arch_id"]) in done)
            el = time.monotonic() - t_ret
            eta = el / n * (total - n)
            log(f"{row['method']} s{row['seed']} {row['arch_id']}: top-1 {100 * row['test_acc']:.2f}% "
                f"({row['params']:,} params) — {n}/{total} done, ETA {eta / 60:.1f} min")  # fmt: skip
            write_outputs(out, pd.DataFrame(list(done.values())), command, cfg, meta_info, quiet=True)

        skipped += runner.map(retrain_task, tasks, retrained)
    finally:
        runner.close()
    meta_info["not_started"] = skipped
    if skipped:
        log(
            f"deadline reached: {skipped} search(es)/retraining(s) not started; run the same command to go on"
        )
    write_outputs(out, pd.DataFrame(list(done.values())), command, cfg, meta_info)
    log(f"done in {(time.monotonic() - t_start) / 60:.1f} min")
    return 0


def _shape(b: DatasetBundle) -> dict[str, int]:
    return {"num_classes": b.num_classes, "in_channels": b.in_channels, "image_size": b.image_size}


def write_outputs(
    out: Path, df: pd.DataFrame, command: str, cfg: RunConfig, info: dict[str, Any], quiet: bool = False
) -> None:
    """quality.csv, quality.md (table + hypervolumes + provenance) and quality.html."""
    if df.empty:
        return
    df = df.sort_values(["method", "seed", "macs"]).reset_index(drop=True)
    df["log10_macs"] = np.log10(df["macs"].astype(float))
    df["is_pareto"] = False
    for _, idx in df.groupby(["method", "seed"]).groups.items():
        df.loc[idx, "is_pareto"] = pareto_mask(df.loc[idx, "test_error"], df.loc[idx, "macs"])
    df.to_csv(out / "quality.csv", index=False)
    hv = (
        df.groupby(["method", "seed"])
        .apply(
            lambda g: hypervolume(g["test_error"].to_numpy(), g["log10_macs"].to_numpy()),
            include_groups=False,
        )
        .rename("hypervolume")
        .reset_index()
    )
    best = df.groupby(["method", "seed"])["test_acc"].max().rename("best_acc").reset_index()
    summary = hv.merge(best, on=["method", "seed"])
    cpu = platform.processor() or platform.machine()
    lines = [
        f"# Quality benchmark: {cfg.name} profile",
        "",
        f"- command: `{command}`",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, "
        + (f"GPU {torch.cuda.get_device_name(0)}" if info["device"] == "cuda" else "no GPU used")
        + f"; {info['jobs']} job(s) at once, {info['threads']} CPU threads",
        f"- data: {cfg.data.dataset}, search train subset {cfg.data.train_subset}, retrain subset "
        f"{cfg.retrain_data.train_subset}; retrain C={cfg.retrain.C}, {cfg.retrain.epochs} epochs; search "
        f"C={cfg.search.supernet.C} × {cfg.search.supernet.cells} cells, {cfg.search.epochs} epochs",
        f"- hypervolume in (test error, log10 MACs) against the reference point {HV_REF} (larger is better)",
        *(
            [
                f"- **partial**: the deadline stopped {info['not_started']} search(es)/retraining(s) from starting"
            ]
            if info.get("not_started")
            else []
        ),
        "",
        "## Hypervolume and best accuracy per method and seed",
        "",
        "| method | seed | hypervolume | best top-1 |",
        "|---|---|---|---|",
        *[
            f"| {r.method} | {r.seed} | {r.hypervolume:.4f} | {100 * r.best_acc:.2f}% |"
            for r in summary.itertuples()
        ],
        "",
        "## Every architecture",
        "",
        "| method | seed | arch | params | MMACs | test error | epochs | Pareto |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {r.method} | {r.seed} | {r.arch_id} | {r.params:,} | {r.macs / 1e6:.2f} | "
            f"{100 * r.test_error:.2f}% | {r.epochs} | {'*' if r.is_pareto else ''} |"
            for r in df.itertuples()
        ],
    ]
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    import plotly.graph_objects as go

    fig = go.Figure()
    for (method, seed), g in df.groupby(["method", "seed"]):
        g = g.sort_values("macs")
        fig.add_trace(go.Scatter(x=g["macs"], y=100 * g["test_error"], mode="markers", name=f"{method} s{seed}",
                                 text=g["arch_id"]))  # fmt: skip
        front = g[g["is_pareto"]]
        fig.add_trace(go.Scatter(x=front["macs"], y=100 * front["test_error"], mode="lines", line_shape="hv",
                                 showlegend=False, hoverinfo="skip"))  # fmt: skip
    fig.update_layout(title="Test error vs MACs", xaxis_title="MACs", yaxis_title="test error (%)")
    fig.update_xaxes(type="log")
    fig.write_html(out / "quality.html", include_plotlyjs=True)
    if not quiet:
        log(f"wrote {out / 'quality.md'}")
        print(summary.to_string(index=False))


if __name__ == "__main__":
    sys.exit(main())
