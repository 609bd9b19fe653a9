"""Stage d: every emission of every search, de-duplicated by architecture id.

The first emission of an architecture (in trial order, then emission order) supplies its search
columns; `sources` remembers every `trial#emission` that produced it. Params and MACs are counted
here, once, with ptflops on the retrain-width derived network (auxiliary head excluded).
"""

from __future__ import annotations

import json

import pandas as pd

from dnad.search import uses_teacher
from pipeline.config import SWEEP_KEYS, sweep_points, swept_value, trial_search_config
from pipeline.context import RunContext

EMISSION_COLUMNS = ("emission_index", "step", "epoch", "S", "alive_pairs")


def gather_emissions(ctx: RunContext) -> pd.DataFrame:
    """One row per emission of every finished search, with the trial's swept values."""
    rows = []
    for point in sweep_points(ctx.cfg):
        tid = point["trial_id"]
        f = ctx.out / "search" / tid / "emissions.json"
        if not f.is_file():
            continue  # that search failed
        s = trial_search_config(ctx.cfg, point)
        swept = {k: swept_value(s, k) for k in SWEEP_KEYS}
        if not uses_teacher(s):
            swept["temperature"] = float("nan")  # no KD, no temperature
        for e in json.loads(f.read_text()):
            rows.append({
                "trial_id": tid, **swept, "emission_index": e["index"], "step": e["step"], "epoch": e["epoch"],
                "S": e["S"], "gamma": e["gamma"], "mu": e["mu"], "alive_pairs": e["alive_pairs"],
                "search_params": e["params"], "search_macs": e["macs"], "final": e["final"],
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


def add_complexity(ctx: RunContext, archs: pd.DataFrame) -> pd.DataFrame:
    """params / MACs (ptflops) of each architecture's retrain network."""
    from dnad.complexity import count_complexity
    from dnad.genotype import Genotype
    from dnad.network import build_model

    m = ctx.data_meta
    assert m is not None
    cols: dict[str, list] = {"params": [], "macs": [], "ptflops_backend": [], "ptflops_version": []}
    for text in archs["genotype"]:
        model = build_model(
            Genotype.from_json(text), ctx.cfg.retrain.C, m.num_classes, m.in_channels, m.image_size
        )
        c = count_complexity(model, (m.in_channels, m.image_size, m.image_size))
        for k, v in (("params", c.params), ("macs", c.macs), ("ptflops_backend", c.backend),
                     ("ptflops_version", c.ptflops_version)):  # fmt: skip
            cols[k].append(v)
    return archs.assign(**cols)


def run_collect(ctx: RunContext) -> pd.DataFrame:
    """Collected architectures (also saved as `collected.parquet` and `genotypes/<arch_id>.json`)."""
    from dnad.genotype import Genotype

    path = ctx.out / "collected.parquet"
    if ctx.stage_done("collect") and path.is_file():
        return pd.read_parquet(path)
    emissions = gather_emissions(ctx)
    archs = add_complexity(ctx, dedupe(emissions))
    (ctx.out / "genotypes").mkdir(exist_ok=True)
    for arch_id, text in zip(archs["arch_id"], archs["genotype"]):
        Genotype.from_json(text).save(ctx.out / "genotypes" / f"{arch_id}.json")
    emissions.to_csv(ctx.out / "emissions.csv", index=False)
    archs.to_parquet(path, index=False)
    ctx.mark_done("collect", {"emissions": len(emissions), "architectures": len(archs)})
    return archs
