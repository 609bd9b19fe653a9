"""Does the search find better architectures? DNAD vs SNPS vs random search vs a hand-designed model.

    python benchmarks/quality.py --profile fashion [--seeds 0 1] [--max-archs 6] [key=value ...]

Every method gets the same recipe: the profile's search settings (DNAD: distillation on; SNPS: the
same search with distillation off, same seeds), the same retrain recipe (`retrain.*`,
`retrain_data.*`) for every architecture, and the same number of retrained architectures per seed:
- **DNAD** / **SNPS**: the search's emissions (de-duplicated), `--max-archs` of them spread evenly
  over their MACs range;
- **random**: random genotypes of the same space (same cells, nodes, op set; each node keeps a random
  non-empty subset of its (input, op) pairs) whose MACs fall in the DNAD emissions' MACs range;
- **hand-designed**: ResNet-18 adapted to the input size (3×3 stem, no max-pool), same recipe.

Runs in one process through the `dnad` library (no Ray), resumable: finished rows are kept in
`rows.jsonl` and skipped when the same command runs again. Writes to `--out` (default
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
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
from dnad.search import SearchLoop
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
    """`k` items evenly spaced along their MACs (all of them when there are ≤ k)."""
    items = sorted(items, key=lambda r: r["macs"])
    if len(items) <= k:
        return items
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)}) if k > 1 else [len(items) // 2]
    return [items[i] for i in idx]


# -- teacher ------------------------------------------------------------------------------------------
def get_teacher(cfg: RunConfig, data: DatasetBundle) -> torch.nn.Module:
    from pipeline.teacher import teacher_hash  # pure function (no Ray import at module level)

    t = cfg.search.distill.teacher
    if t.kind == "checkpoint":
        return load_teacher(t.checkpoint)
    dest = Path(cfg.teacher.cache_dir).expanduser() / teacher_hash(cfg)
    if (dest / "teacher.json").is_file():
        log(f"teacher: cached {dest}")
        return load_teacher(dest)
    model = make_teacher(t, data.num_classes, data.in_channels, data.image_size)
    rcfg = cfg.retrain.model_copy(
        update=dict(
            C=t.C, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, auxiliary_weight=0.0, drop_path=0.0
        )
    )
    if t.epochs:
        log(f"teacher: training {t.kind} for {t.epochs} epochs")
        loop = RetrainLoop(
            rcfg, model, data, "cpu", lambda r: log(f"teacher {r}"), cfg.data.augment, 0, "teacher"
        )
        last = loop.run()
        acc = last.get("test_acc")
    else:
        acc = None
    spec = {"teacher": t.model_dump(mode="json"), "num_classes": data.num_classes,
            "in_channels": data.in_channels, "image_size": data.image_size, "test_acc": acc,
            "config_hash": teacher_hash(cfg)}  # fmt: skip
    save_teacher(dest, model, spec)
    return load_teacher(dest)


# -- candidates ---------------------------------------------------------------------------------------
def searched(cfg: RunConfig, data: DatasetBundle, teacher: torch.nn.Module | None, seed: int, kd: bool):
    s = cfg.search.model_copy(
        update={"seed": seed, "distill": cfg.search.distill.model_copy(update={"enabled": kd})}
    )
    last = [0.0]

    def cb(m: dict[str, Any]) -> None:
        if time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            log(f"  search step {m['step']} epoch {m['epoch']} S={m['S']:.1f} pairs={m['alive_pairs']} "
                f"{m['img_per_s']:.0f} img/s emissions={m['emissions']}")  # fmt: skip

    loop = SearchLoop(s, data, teacher if kd else None, "cpu", cb, augment=cfg.data.augment)
    t0 = time.monotonic()
    emissions = loop.run()
    out, seen = [], set()
    for e in emissions:
        if e.arch_id not in seen:
            seen.add(e.arch_id)
            out.append({"arch_id": e.arch_id, "genotype": e.genotype, "emission_step": e.step})
    return out, time.monotonic() - t0


def random_genotypes(
    cfg: RunConfig, meta: dict[str, int], lo: int, hi: int, n: int, seed: int, tries: int = 20000
) -> list[dict[str, Any]]:
    """`n` random genotypes of the search space with retrain-width MACs in [lo, hi]."""
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
        macs, _ = genotype_cost(g, rc.C, meta["classes"], meta["channels"], meta["size"], sn.stem)
        if lo <= macs <= hi and g.arch_id not in {r["arch_id"] for r in out}:
            out.append({"arch_id": g.arch_id, "genotype": g.to_json(), "emission_step": -1})
    return out


# -- retraining ---------------------------------------------------------------------------------------
def retrain(cfg: RunConfig, data: DatasetBundle, model: torch.nn.Module, label: str) -> dict[str, Any]:
    t0 = time.monotonic()
    loop = RetrainLoop(
        cfg.retrain, model, data, "cpu",
        lambda r: log(f"  {label} epoch {r['epoch']} test acc {100 * r['test_acc']:.2f}%"),
        augment=cfg.data.augment, cutout=cfg.data.cutout,
    )  # fmt: skip
    last = loop.run()
    return {"test_acc": last["test_acc"], "retrain_epochs": loop.epoch, "wall_s": time.monotonic() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="fashion")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--max-archs", type=int, default=6, help="retrained architectures per method and seed")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", help="output folder (default benchmarks/results/quality-<profile>)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    a = ap.parse_args(argv)
    try:
        cfg = build_config(a.profile, None, a.overrides)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    out = Path(a.out or Path(__file__).resolve().parent / "results" / f"quality-{a.profile}")
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "rows.jsonl"
    done = {}
    if rows_file.is_file():
        for line in rows_file.read_text().splitlines():
            r = json.loads(line)
            done[(r["method"], r["seed"], r["arch_id"])] = r
    command = "python benchmarks/quality.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    log(f"{command} -> {out}")

    data = load_dataset(cfg.data)
    rdata = load_dataset(cfg.retrain_data_config())
    meta = {"channels": rdata.in_channels, "size": rdata.image_size, "classes": rdata.num_classes}
    teacher = get_teacher(cfg, rdata) if "DNAD" in a.methods else None

    def record(row: dict[str, Any]) -> None:
        done[(row["method"], row["seed"], row["arch_id"])] = row
        with rows_file.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def run_arch(method: str, seed: int, cand: dict[str, Any], search_s: float) -> None:
        if (method, seed, cand["arch_id"]) in done:
            return
        torch.manual_seed(cfg.retrain.seed)
        if method == "hand-designed":
            model = make_teacher(TeacherConfig(kind="torchvision", arch="resnet18"), **_shape(rdata))
        else:
            g = Genotype.from_json(cand["genotype"])
            model = build_model(g, cfg.retrain.C, rdata.num_classes, rdata.in_channels, rdata.image_size,
                                auxiliary=cfg.retrain.auxiliary_weight > 0)  # fmt: skip
        c = count_complexity(model, (rdata.in_channels, rdata.image_size, rdata.image_size))
        log(f"{method} seed {seed} {cand['arch_id']}: {c.params:,} params, {c.macs / 1e6:.1f} MMACs")
        res = retrain(cfg, rdata, model, f"{method}/{cand['arch_id']}")
        record({"method": method, "seed": seed, "arch_id": cand["arch_id"], "params": c.params, "macs": c.macs,
                "test_error": 1 - res["test_acc"], "test_acc": res["test_acc"], "epochs": res["retrain_epochs"],
                "retrain_s": res["wall_s"], "search_s": search_s, "emission_step": cand["emission_step"]})  # fmt: skip

    for seed in a.seeds:
        pools: dict[str, list[dict[str, Any]]] = {}
        for method, kd in (("DNAD", True), ("SNPS", False)):
            if method not in a.methods and not (method == "DNAD" and "random" in a.methods):
                continue
            cache = out / f"emissions-{method}-{seed}.json"
            if cache.is_file():
                saved = json.loads(cache.read_text())
                cands, search_s = saved["candidates"], saved["search_s"]
            else:
                log(f"{method} seed {seed}: search")
                cands, search_s = searched(cfg, data, teacher if kd else None, seed, kd)
                cache.write_text(json.dumps({"candidates": cands, "search_s": search_s}))
            for c in cands:
                g = Genotype.from_json(c["genotype"])
                c["macs"] = genotype_cost(g, cfg.retrain.C, meta["classes"], meta["channels"], meta["size"],
                                          cfg.search.supernet.stem)[0]  # fmt: skip
            pools[method] = spread(cands, a.max_archs)
            log(f"{method} seed {seed}: {len(cands)} distinct emissions, retraining {len(pools[method])}")
        if "random" in a.methods:
            macs = [c["macs"] for c in pools["DNAD"]]
            pools["random"] = random_genotypes(
                cfg, meta, min(macs), max(macs), len(pools["DNAD"]), 1000 + seed
            )
            for c in pools["random"]:
                g = Genotype.from_json(c["genotype"])
                c["macs"] = genotype_cost(g, cfg.retrain.C, meta["classes"], meta["channels"], meta["size"],
                                          cfg.search.supernet.stem)[0]  # fmt: skip
        if "hand-designed" in a.methods:
            pools["hand-designed"] = [{"arch_id": "resnet18", "genotype": "", "emission_step": -1, "macs": 0}]
        for method in a.methods:
            search_s = 0.0
            cache = out / f"emissions-{method}-{seed}.json"
            if cache.is_file():
                search_s = json.loads(cache.read_text())["search_s"]
            for cand in pools.get(method, []):
                run_arch(method, seed, cand, search_s)
        write_outputs(out, pd.DataFrame(list(done.values())), command, cfg)
    return 0


def _shape(b: DatasetBundle) -> dict[str, int]:
    return {"num_classes": b.num_classes, "in_channels": b.in_channels, "image_size": b.image_size}


def write_outputs(out: Path, df: pd.DataFrame, command: str, cfg: RunConfig) -> None:
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
        f"- machine: {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, no GPU"
        if not torch.cuda.is_available()
        else f"- machine: GPU {torch.cuda.get_device_name(0)}",
        f"- data: {cfg.data.dataset}, search train subset {cfg.data.train_subset}, retrain subset "
        f"{cfg.retrain_data.train_subset}; retrain C={cfg.retrain.C}, {cfg.retrain.epochs} epochs; search "
        f"C={cfg.search.supernet.C} × {cfg.search.supernet.cells} cells, {cfg.search.epochs} epochs",
        f"- hypervolume in (test error, log10 MACs) against the reference point {HV_REF} (larger is better)",
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
    log(f"wrote {out / 'quality.md'}")
    print(summary.to_string(index=False))


if __name__ == "__main__":
    sys.exit(main())
