"""The results of a run as tables: pure functions (DataFrame in, DataFrame out) plus `load_run`.

Schema: `docs/DESIGN.md` ("Result schema"). Errors and accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

ARCH_SCHEMA: dict[str, str] = {
    "arch_id": "string", "trial_id": "string", "temperature": "float64", "gamma0": "float64",
    "phi": "float64", "t_max": "int64", "s_min": "float64", "sparsity": "string",
    "emission_index": "int64", "step": "int64", "epoch": "int64", "S": "float64", "alive_pairs": "int64",
    "params": "int64", "macs": "int64", "retrain_epochs": "int64", "test_error": "float64",
    "test_acc": "float64", "wall_s": "float64", "status": "string", "error": "string",
    "is_pareto_macs": "bool", "is_pareto_params": "bool", "ptflops_version": "string",
    "ptflops_backend": "string",
}  # fmt: skip
EXTRA_COLUMNS: dict[str, str] = {"sources": "string"}  # every trial#emission that produced the arch
METRICS_SCHEMA: dict[str, str] = {
    "trial_id": "string", "step": "int64", "epoch": "int64", "loss": "float64", "ce": "float64",
    "kd": "float64", "S": "float64", "gamma": "float64", "mu": "float64", "alive_pairs": "int64",
    "est_macs": "int64", "train_acc": "float64", "img_per_s": "float64", "emitted": "bool",
}  # fmt: skip


@dataclass
class RunResults:
    architectures: pd.DataFrame
    search_metrics: pd.DataFrame
    config: dict[str, Any]


def pareto_mask(error: np.ndarray | pd.Series, cost: np.ndarray | pd.Series) -> np.ndarray:
    """True where no other point has error ≤ and cost ≤ with one strictly <. NaN rows are never on it."""
    e, c = np.asarray(error, dtype=float), np.asarray(cost, dtype=float)
    ok = ~(np.isnan(e) | np.isnan(c))
    mask = np.zeros(len(e), dtype=bool)
    for i in np.flatnonzero(ok):
        le = (e[ok] <= e[i]) & (c[ok] <= c[i])
        lt = (e[ok] < e[i]) | (c[ok] < c[i])
        mask[i] = not bool((le & lt).any())
    return mask


def with_pareto(archs: pd.DataFrame) -> pd.DataFrame:
    """Adds `is_pareto_macs` / `is_pareto_params` over (test_error, MACs/params) of the ok rows."""
    err = archs["test_error"].where(archs["status"] == "ok")
    return archs.assign(
        is_pareto_macs=pareto_mask(err, archs["macs"]), is_pareto_params=pareto_mask(err, archs["params"])
    )


def conform(df: pd.DataFrame, schema: dict[str, str]) -> pd.DataFrame:
    """Schema columns first, in order and with their dtypes; other columns kept after them."""
    df = df.copy()
    for col, dtype in schema.items():
        if col not in df:
            df[col] = pd.Series([pd.NA] * len(df), dtype=dtype if dtype != "bool" else "boolean")
        df[col] = df[col].astype(dtype)
    return df[list(schema) + [c for c in df.columns if c not in schema]]


def architectures_table(collected: pd.DataFrame, retrained: pd.DataFrame) -> pd.DataFrame:
    """Collected architectures joined with their retrain results, Pareto flags added."""
    merged = collected.merge(retrained, on="arch_id", how="left")
    missing = merged["status"].isna()
    merged.loc[missing, ["status", "error"]] = ["failed", "not retrained"]
    merged["retrain_epochs"] = merged["retrain_epochs"].fillna(0)
    merged["wall_s"] = merged["wall_s"].fillna(0.0)
    keep = list(ARCH_SCHEMA) + list(EXTRA_COLUMNS)
    out = with_pareto(merged)
    return conform(out[[c for c in keep if c in out]], ARCH_SCHEMA | EXTRA_COLUMNS)


def metrics_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Search metric rows; a step logged twice (re-run after a resume) keeps its last row."""
    df = pd.DataFrame(rows, columns=list(METRICS_SCHEMA))
    df = df.drop_duplicates(["trial_id", "step"], keep="last").sort_values(["trial_id", "step"])
    return conform(df.reset_index(drop=True), METRICS_SCHEMA)


def write_results(out: Path, archs: pd.DataFrame, metrics: pd.DataFrame) -> None:
    archs.to_csv(out / "architectures.csv", index=False)
    archs.to_parquet(out / "architectures.parquet", index=False)
    metrics.to_parquet(out / "search_metrics.parquet", index=False)


def load_run(output_dir: str | Path) -> RunResults:
    """Read a finished run's tables and config (for reports and notebooks)."""
    out = Path(output_dir)
    archs = pd.read_parquet(out / "architectures.parquet")
    metrics_file = out / "search_metrics.parquet"
    metrics = (
        pd.read_parquet(metrics_file) if metrics_file.is_file() else conform(pd.DataFrame(), METRICS_SCHEMA)
    )
    config = yaml.safe_load((out / "config.yaml").read_text())
    return RunResults(archs, metrics, config)


def load_genotype_json(output_dir: str | Path, arch_id: str) -> dict[str, Any]:
    return json.loads((Path(output_dir) / "genotypes" / f"{arch_id}.json").read_text())


def summary_table(archs: pd.DataFrame) -> str:
    """Plain-text table, best accuracy first, Pareto members starred."""
    if archs.empty:
        return "(no architectures)"
    df = archs.sort_values(["status", "test_acc"], ascending=[False, False])
    lines = [
        f"{'arch_id':16}  {'trial':5}  {'emit':>4}  {'pairs':>5}  {'params':>9}  {'MMACs':>8}  {'top-1':>7}  pareto"
    ]
    for r in df.itertuples():
        acc = f"{100 * r.test_acc:6.2f}%" if r.status == "ok" else "failed "
        star = ("M" if r.is_pareto_macs else "-") + ("P" if r.is_pareto_params else "-")
        lines.append(
            f"{r.arch_id:16}  {r.trial_id:5}  {r.emission_index:>4}  {r.alive_pairs:>5}  {r.params:>9,}  "
            f"{r.macs / 1e6:>8.2f}  {acc:>7}  {star}"
        )
    return "\n".join(lines)
