"""Stage d: every emission of every search, de-duplicated by architecture id.

The first emission of an architecture (in trial order, then emission order) supplies its search
columns; `sources` remembers every `trial#emission` that produced it. Params and MACs are counted
here, once, with ptflops on the retrain-width derived network (auxiliary head excluded).
"""

from __future__ import annotations

import json

import pandas as pd

from dnad.checkpoint import atomic_write_bytes
from dnad.search import uses_teacher
from pipeline.config import SWEEP_KEYS, sweep_points, swept_value, trial_search_config
from pipeline.context import RunContext

EMISSION_COLUMNS = ("emission_index", "step", "epoch", "S", "alive_pairs")


def _emission_rows(ctx: RunContext, tid: str) -> list[dict]:
    """A search's emissions: as published while it ran (with `emitted_at`), completed by its final list."""
    from pipeline.progress import read_jsonl

    folder = ctx.out / "search" / tid
    rows = {int(e["index"]): e for e in read_jsonl(folder / "emissions.jsonl")}
    final = folder / "emissions.json"
    if final.is_file():
        for e in json.loads(final.read_text()):
            rows.setdefault(int(e["index"]), e)
    return [rows[k] for k in sorted(rows)]


def gather_emissions(ctx: RunContext) -> pd.DataFrame:
    """One row per emission so far of every search, with the trial's swept values and timing."""
    from pipeline.stream import search_result

    rows = []
    for point in sweep_points(ctx.cfg):
        tid = point["trial_id"]
        s = trial_search_config(ctx.cfg, point)
        swept = {k: swept_value(s, k) for k in SWEEP_KEYS}
        if not uses_teacher(s):
            swept["temperature"] = float("nan")  # no KD, no temperature
        ended = search_result(ctx.out, tid) or {}
        for e in _emission_rows(ctx, tid):
            rows.append({
                "trial_id": tid, **swept, "search_seed": s.seed, "emission_index": e["index"], "step": e["step"],
                "epoch": e["epoch"],
                "S": e["S"], "gamma": e["gamma"], "mu": e["mu"], "alive_pairs": e["alive_pairs"],
                "search_params": e["params"], "search_macs": e["macs"], "final": e["final"],
                "search_val_acc": e.get("val_acc", float("nan")), "emitted_at": e.get("emitted_at", float("nan")),
                "search_finished_at": ended.get("finished_at", float("nan")),
                "arch_id": e["arch_id"], "genotype": e["genotype"],
            })  # fmt: skip
    return pd.DataFrame(rows)


def dedupe(emissions: pd.DataFrame) -> pd.DataFrame:
    """First row of every arch_id (input order) plus `sources` = 'trial#emission' of all its rows."""
    if emissions.empty:
        return emissions.assign(sources=pd.Series(dtype=str))
    src = emissions["trial_id"] + "#" + emissions["emission_index"].astype(str)
    sources = src.groupby(emissions["arch_id"], sort=False).agg(";".join)
    first = emissions.drop_duplicates("arch_id", keep="first").reset_index(drop=True)
    return first.assign(sources=first["arch_id"].map(sources))


def add_complexity(ctx: RunContext, archs: pd.DataFrame, known: pd.DataFrame | None = None) -> pd.DataFrame:
    """params / MACs (ptflops) of each architecture's retrain network (`known`: rows counted before)."""
    from dnad.complexity import count_complexity
    from dnad.genotype import Genotype
    from dnad.network import build_model

    m = ctx.data_meta
    assert m is not None
    cache = {} if known is None or known.empty else known.set_index("arch_id")
    cols: dict[str, list] = {"params": [], "macs": [], "ptflops_backend": [], "ptflops_version": []}
    for arch_id, text in zip(archs["arch_id"], archs["genotype"]):
        if arch_id in getattr(cache, "index", ()):
            for k in cols:
                cols[k].append(cache.loc[arch_id, k])
            continue
        model = build_model(
            Genotype.from_json(text), ctx.cfg.retrain.C, m.num_classes, m.in_channels, m.image_size
        )
        c = count_complexity(model, (m.in_channels, m.image_size, m.image_size))
        for k, v in (("params", c.params), ("macs", c.macs), ("ptflops_backend", c.backend),
                     ("ptflops_version", c.ptflops_version)):  # fmt: skip
            cols[k].append(v)
    return archs.assign(**cols)


def run_collect(ctx: RunContext, final: bool = True) -> pd.DataFrame:
    """The distinct architectures emitted so far (also `collected.parquet`, `genotypes/<arch_id>.json`,
    `emissions.csv`); counted once each. `final`: every search has ended (the stage is marked done)."""
    from dnad.genotype import Genotype

    path = ctx.out / "collected.parquet"
    if ctx.stage_done("collect") and path.is_file():
        return pd.read_parquet(path)
    known = pd.read_parquet(path) if path.is_file() else None
    emissions = gather_emissions(ctx)
    if emissions.empty:  # nothing emitted yet (or every search failed before emitting)
        return pd.DataFrame(columns=["arch_id", "trial_id", "genotype", "sources", "params", "macs"])
    archs = add_complexity(ctx, dedupe(emissions), known)
    (ctx.out / "genotypes").mkdir(exist_ok=True)
    for arch_id, text in zip(archs["arch_id"], archs["genotype"]):
        f = ctx.out / "genotypes" / f"{arch_id}.json"
        if not f.is_file():
            Genotype.from_json(text).save(f)
    atomic_write_bytes(ctx.out / "emissions.csv", emissions.to_csv(index=False).encode())
    atomic_write_bytes(path, archs.to_parquet(index=False))
    if final:
        ctx.mark_done("collect", {"emissions": len(emissions), "architectures": len(archs)})
    return archs
