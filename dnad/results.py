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
    "arch_id": "string", "trial_id": "string", "strategy": "string", "temperature": "float64", "gamma0": "float64",
    "phi": "float64", "t_max": "int64", "s_min": "float64", "sparsity": "string",
    "emission_index": "int64", "step": "int64", "epoch": "int64", "S": "float64", "alive_pairs": "int64",
    "params": "int64", "macs": "int64", "retrain_epochs": "int64", "val_error": "float64",
    "val_acc": "float64", "test_error": "float64", "test_acc": "float64",
    "latency_ms_torch": "float64", "latency_ms_onnx": "float64", "latency_batch": "Int64",
    "latency_ms_torch_batch": "float64", "latency_ms_onnx_batch": "float64", "latency_threads": "Int64",
    "latency_device": "string", "wall_s": "float64", "status": "string", "error": "string",
    "is_pareto_macs": "bool", "is_pareto_params": "bool", "is_pareto_latency": "bool",
    "ptflops_version": "string", "ptflops_backend": "string", "model_dir": "string",
    "repeats": "int64", "val_acc_mean": "float64", "val_acc_sd": "float64", "test_acc_mean": "float64",
    "test_acc_sd": "float64", "search_val_acc": "float64", "emitted_at": "float64",
    "search_finished_at": "float64", "retrain_started_at": "float64", "retrain_finished_at": "float64",
}  # fmt: skip
LATENCY_COLUMNS = ("latency_ms_torch", "latency_ms_onnx", "latency_batch", "latency_ms_torch_batch",
                   "latency_ms_onnx_batch", "latency_threads", "latency_device")  # fmt: skip
RETRAIN_COLUMNS = ("arch_id", "repeat", "retrain_epochs", "val_acc", "val_error", "test_acc", "test_error",
                   "wall_s", "status", "error", "retrain_started_at", "retrain_finished_at")  # fmt: skip
EXTRA_COLUMNS: dict[str, str] = {"sources": "string"}  # every trial#emission that produced the arch
METRICS_SCHEMA: dict[str, str] = {
    "trial_id": "string", "step": "int64", "epoch": "int64", "loss": "float64", "ce": "float64",
    "kd": "float64", "S": "float64", "gamma": "float64", "mu": "float64", "alive_pairs": "int64",
    "est_macs": "int64", "train_acc": "float64", "val_acc": "float64", "img_per_s": "float64",
    "emitted": "bool",
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


def deploy_latency(archs: pd.DataFrame) -> pd.Series:
    """The latency a deployment pays, per row: ONNX Runtime at batch 1, or PyTorch eager where there is
    no ONNX figure (ms)."""

    def col(name: str) -> pd.Series:
        v = archs[name] if name in archs else pd.Series(np.nan, index=archs.index)
        return pd.to_numeric(v, errors="coerce").astype(float)

    return col("latency_ms_onnx").fillna(col("latency_ms_torch"))


def with_pareto(archs: pd.DataFrame) -> pd.DataFrame:
    """Adds `is_pareto_macs` / `is_pareto_params` / `is_pareto_latency`: non-dominated in (validation
    error, MACs / params / `deploy_latency`) among the ok rows. The test split never decides."""
    val = archs["val_error"] if "val_error" in archs else pd.Series(np.nan, index=archs.index)
    err = pd.to_numeric(val, errors="coerce").astype(float).where(archs["status"] == "ok")
    return archs.assign(
        is_pareto_macs=pareto_mask(err, archs["macs"]),
        is_pareto_params=pareto_mask(err, archs["params"]),
        is_pareto_latency=pareto_mask(err, deploy_latency(archs)),
    )


def card_columns(card: dict[str, Any]) -> dict[str, Any]:
    """The table columns a model card (`models/<arch_id>/model.json`) supplies: its latency figures."""
    lat = card.get("latency") or {}
    batches = [int(b) for b in lat.get("batches", [])]
    big = max(batches) if batches else None
    t, o = lat.get("torch_ms") or {}, lat.get("onnx_ms") or {}
    nan = float("nan")
    return {
        "latency_ms_torch": t.get("1", nan), "latency_ms_onnx": o.get("1", nan),
        "latency_batch": big, "latency_ms_torch_batch": t.get(str(big), nan) if big else nan,
        "latency_ms_onnx_batch": o.get(str(big), nan) if big else nan,
        "latency_threads": lat.get("threads"), "latency_device": lat.get("torch_device"),
        "model_dir": f"models/{card.get('arch_id')}",
    }  # fmt: skip


def read_cards(output_dir: str | Path) -> dict[str, dict[str, Any]]:
    """`{arch_id: model card}` of a run's `models/*/model.json` (unreadable cards skipped)."""
    cards = {}
    for f in sorted(Path(output_dir).glob("models/*/model.json")):
        try:
            card = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(card, dict) and card.get("arch_id") == f.parent.name:
            cards[f.parent.name] = card
    return cards


def conform(df: pd.DataFrame, schema: dict[str, str]) -> pd.DataFrame:
    """Schema columns first, in order and with their dtypes; other columns kept after them."""
    df = df.copy()
    for col, dtype in schema.items():
        if col not in df:
            missing = {"string": pd.NA, "bool": False, "int64": 0}.get(dtype, float("nan"))
            df[col] = pd.Series([missing] * len(df), dtype=dtype, index=df.index)
        df[col] = df[col].astype(dtype)
    return df[list(schema) + [c for c in df.columns if c not in schema]]


def architectures_table(
    collected: pd.DataFrame, retrained: pd.DataFrame, cards: dict[str, dict[str, Any]] | None = None
) -> pd.DataFrame:
    """Collected architectures joined with their retrain results and the latency of their model cards
    (`read_cards`), Pareto flags added. `retrained` may hold several repeats per architecture (column
    `repeat`): the row of repeat 0 (the model in models/) is the architecture's, with the mean and
    standard deviation over the finished repeats beside it."""
    merged = collected.merge(per_architecture(retrained), on="arch_id", how="left")
    if cards:
        rows = [{"arch_id": a, **card_columns(c)} for a, c in cards.items()]
        merged = merged.merge(pd.DataFrame(rows), on="arch_id", how="left")
    missing = merged["status"].isna()
    merged.loc[missing, ["status", "error"]] = ["failed", "not retrained"]
    merged["retrain_epochs"] = merged["retrain_epochs"].fillna(0)
    merged["wall_s"] = merged["wall_s"].fillna(0.0)
    keep = list(ARCH_SCHEMA) + list(EXTRA_COLUMNS)
    out = with_pareto(merged)
    return conform(out[[c for c in keep if c in out]], ARCH_SCHEMA | EXTRA_COLUMNS)


def per_architecture(retrained: pd.DataFrame) -> pd.DataFrame:
    """One row per arch id from per-(arch, repeat) retrain rows: repeat 0's values, the repeats'
    mean/sd of validation and test accuracy, their first start and (all finished) last end."""
    if retrained.empty:
        return pd.DataFrame(columns=[c for c in RETRAIN_COLUMNS if c != "repeat"])
    r = retrained if "repeat" in retrained else retrained.assign(repeat=0)
    first = r[r["repeat"] == 0].drop(columns=["repeat"]).drop_duplicates("arch_id", keep="last")
    ok = r[r["status"] == "ok"]
    g = ok.groupby("arch_id")
    stats = pd.DataFrame({
        "repeats": g.size(), "val_acc_mean": g["val_acc"].mean(), "val_acc_sd": g["val_acc"].std(),
        "test_acc_mean": g["test_acc"].mean(), "test_acc_sd": g["test_acc"].std(),
    }).reset_index()  # fmt: skip
    times = r.groupby("arch_id").agg(
        started=("retrain_started_at", "min"), finished=("retrain_finished_at", "max")
    )
    out = first.drop(columns=[c for c in ("retrain_started_at", "retrain_finished_at") if c in first])
    out = out.merge(times.reset_index().rename(columns={"started": "retrain_started_at",
                                                        "finished": "retrain_finished_at"}), on="arch_id", how="left")  # fmt: skip
    return out.merge(stats, on="arch_id", how="left").assign(repeats=lambda d: d["repeats"].fillna(0))


def metrics_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Search metric rows; a step logged twice (re-run after a resume) keeps its last row."""
    df = pd.DataFrame(rows, columns=list(METRICS_SCHEMA))
    df = df.drop_duplicates(["trial_id", "step"], keep="last").sort_values(["trial_id", "step"])
    return conform(df.reset_index(drop=True), METRICS_SCHEMA)


def write_results(out: Path, archs: pd.DataFrame, metrics: pd.DataFrame) -> None:
    """architectures.csv/.parquet and search_metrics.parquet, each replaced atomically (a run rewrites
    them while it goes on, and a reader must never see half a file)."""
    from dnad.checkpoint import atomic_write_bytes

    atomic_write_bytes(out / "architectures.csv", archs.to_csv(index=False).encode())
    atomic_write_bytes(out / "architectures.parquet", archs.to_parquet(index=False))
    atomic_write_bytes(out / "search_metrics.parquet", metrics.to_parquet(index=False))


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


@dataclass(frozen=True)
class FrontTrend:
    """How validation accuracy moves with cost across a family: is the front a trade-off or flat?"""

    architectures: int
    macs_span: float  # most / fewest MACs
    slope: float  # validation-accuracy points per doubling of MACs (least squares on log2 MACs)
    r: float  # correlation of validation accuracy with log2 MACs (nan when the accuracies are equal)
    spread: float  # best - worst validation accuracy, points
    noise_sd: float | None  # sd of one retraining's validation accuracy (points), pooled over repeats

    def describe(self) -> str:
        line = (
            f"trend: {self.slope:+.2f} validation-accuracy points per doubling of MACs across "
            f"{self.architectures} architectures ({self.macs_span:.2f}x MACs, spread {self.spread:.2f} points, "
            f"r = {self.r:.2f})"
        )
        if self.noise_sd is None:
            return line + "; retrain.repeats=2 measures how much of it is retraining noise"
        return line + f"; one retraining's sd {self.noise_sd:.2f} points (from the repeats)"


def front_trend(archs: pd.DataFrame) -> FrontTrend | None:
    """The accuracy-vs-MACs trend of the retrained architectures (`status == "ok"`), on validation
    accuracy (the mean over repeats where there are several), and the retraining noise when repeats
    measure it. None with fewer than 3 architectures or MACs all alike."""
    if archs.empty or "status" not in archs:
        return None
    ok = archs[(archs["status"] == "ok")]
    val = pd.to_numeric(ok["val_acc"], errors="coerce").astype(float)
    if "val_acc_mean" in ok and "repeats" in ok:
        many = pd.to_numeric(ok["repeats"], errors="coerce").fillna(0) >= 2
        val = val.where(~many, pd.to_numeric(ok["val_acc_mean"], errors="coerce").astype(float))
    macs = pd.to_numeric(ok["macs"], errors="coerce").astype(float)
    keep = np.isfinite(val) & np.isfinite(macs) & (macs > 0)
    x, y = np.log2(macs[keep].to_numpy()), 100 * val[keep].to_numpy()
    if len(x) < 3 or np.ptp(x) == 0:
        return None
    slope = float(np.polyfit(x, y, 1)[0])
    r = float(np.corrcoef(x, y)[0, 1]) if np.ptp(y) > 0 else float("nan")
    noise = None
    if "val_acc_sd" in ok and "repeats" in ok:
        n = pd.to_numeric(ok["repeats"], errors="coerce").fillna(0)
        sd = pd.to_numeric(ok["val_acc_sd"], errors="coerce").astype(float)
        use = (n >= 2) & np.isfinite(sd)
        dof = float((n[use] - 1).sum())
        if dof > 0:
            noise = 100 * float(np.sqrt(((n[use] - 1) * sd[use] ** 2).sum() / dof))
    return FrontTrend(
        architectures=len(x), macs_span=float(2 ** np.ptp(x)), slope=slope, r=r,
        spread=float(np.ptp(y)), noise_sd=noise,
    )  # fmt: skip


def summary_table(archs: pd.DataFrame) -> str:
    """Plain-text table, best validation accuracy first, with the Pareto fronts each row is on."""
    if archs.empty:
        return "(no architectures)"
    df = archs.assign(_ok=archs["status"] == "ok").sort_values(["_ok", "val_acc"], ascending=[False, False])
    lines = [
        f"{'arch_id':16}  {'trial':5}  {'emit':>4}  {'pairs':>5}  {'params':>9}  {'MMACs':>7}  {'val acc':>7}"
        f"  {'test acc':>8}  {'ms':>6}  pareto"
    ]
    lat = deploy_latency(df)
    for r, ms in zip(df.itertuples(), lat):
        ok = r.status == "ok"
        val = f"{100 * r.val_acc:6.2f}%" if ok else str(r.status)
        test = f"{100 * r.test_acc:6.2f}%" if ok else ""
        star = "".join(
            c if f else "-"
            for c, f in zip("MPL", (r.is_pareto_macs, r.is_pareto_params, r.is_pareto_latency))
        )
        lines.append(
            f"{r.arch_id:16}  {r.trial_id:5}  {r.emission_index:>4}  {r.alive_pairs:>5}  {r.params:>9,}  "
            f"{r.macs / 1e6:>7.2f}  {val:>7}  {test:>8}  {'' if ms != ms else f'{ms:.2f}':>6}  {star}"
        )
    lines.append(
        "val acc chooses (validation images held out of training); test acc is reported, never used to "
        "choose; ms = latency at batch 1 (ONNX Runtime, else PyTorch); pareto: M = MACs, P = params, "
        "L = latency, each against validation error"
    )
    trend = front_trend(archs)
    if trend is not None:
        lines.append(trend.describe())
    return "\n".join(lines)


# -- reading a run that is still going (or crashed half-way) -----------------------------------------
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file written by appends: a missing file is empty, and a line cut by a
    crash (or anything that is not a JSON object) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _tolerant_metrics(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """`metrics_table`, but a row with a missing value (e.g. a row cut by a crash) never fails it."""
    try:
        return metrics_table(rows)
    except (TypeError, ValueError):
        df = pd.DataFrame(rows, columns=list(METRICS_SCHEMA))
        df = df.drop_duplicates(["trial_id", "step"], keep="last").sort_values(["trial_id", "step"])
        nullable = {k: {"int64": "Int64", "bool": "boolean"}.get(v, v) for k, v in METRICS_SCHEMA.items()}
        return conform(df.reset_index(drop=True), nullable)


def _trial_key(arch_id: str, repeat: int) -> str:
    return arch_id if repeat == 0 else f"{arch_id}-r{repeat}"


def skipped_path(output_dir: str | Path, arch_id: str) -> Path:
    """`retrain/<arch_id>.skipped.json`: the architecture was not retrained on purpose (a near-duplicate
    by MACs, `retrain.min_macs_gap`); holds {"near": the kept arch id, "macs", "near_macs", "gap"}."""
    return Path(output_dir) / "retrain" / f"{arch_id}.skipped.json"


def skip_reason(skip: dict[str, Any]) -> str:
    """One line saying why an architecture was skipped (from its `skipped_path` record)."""
    return (
        f"{float(skip['macs']) / 1e6:.2f} MMACs, within {100 * float(skip['gap']):g} % of "
        f"{skip['near']} ({float(skip['near_macs']) / 1e6:.2f}), which is retrained"
    )


def retrain_results(
    output_dir: str | Path, arch_ids: list[str], repeats: int = 1, epochs: int | None = None
) -> pd.DataFrame:
    """One row per (arch, repeat) of a run, finished or not: a trial's `retrain/<key>.result.json`
    when it has one ("ok" or "failed"), else "skipped" when the architecture has a `skipped_path`
    record, else its per-epoch `retrain/<key>.jsonl` ("running": the last epoch's accuracies; an older
    run folder's history that reached `epochs` counts as "ok"), else "pending". `<key>` is the arch id, `-r<k>` for repeat k."""
    out, rows = Path(output_dir), []
    for arch_id in arch_ids:
        try:
            skip = json.loads(skipped_path(out, arch_id).read_text())
        except (OSError, ValueError):
            skip = None
        for k in range(repeats):
            key = _trial_key(arch_id, k)
            row: dict[str, Any] = {"arch_id": arch_id, "repeat": k}
            try:
                row |= json.loads((out / "retrain" / f"{key}.result.json").read_text())
                rows.append(row)
                continue
            except (OSError, ValueError):
                pass
            if skip is not None:
                rows.append(row | {"retrain_epochs": 0, "wall_s": 0.0, "status": "skipped",
                                   "error": skip_reason(skip)})  # fmt: skip
                continue
            hist = [
                r for r in read_jsonl(out / "retrain" / f"{key}.jsonl") if "epoch" in r and "test_acc" in r
            ]
            started = read_jsonl(out / "retrain" / f"{key}.started")
            if started:
                row["retrain_started_at"] = started[0].get("started_at")
            if not hist:
                rows.append(
                    row
                    | {"retrain_epochs": 0, "wall_s": 0.0, "status": "pending", "error": "not retrained yet"}
                )
                continue
            by_epoch = {int(r["epoch"]): r for r in hist}  # a resumed trial may log an epoch twice
            last = by_epoch[max(by_epoch)]
            planned = last.get("planned_epochs", epochs)  # the trial's own count (small data: more epochs)
            done = planned is not None and int(last["epoch"]) >= int(planned) and "planned_epochs" not in last
            val, acc = float(last.get("val_acc", np.nan)), float(last["test_acc"])
            rows.append(row | {
                "retrain_epochs": int(last["epoch"]), "val_acc": val, "val_error": 1.0 - val, "test_acc": acc,
                "test_error": 1.0 - acc, "wall_s": float(sum(float(r.get("epoch_s", 0.0)) for r in by_epoch.values())),
                "status": "ok" if done else "running", "error": "" if done else f"epoch {last['epoch']}/{planned or '?'}",
            })  # fmt: skip
    return pd.DataFrame(rows, columns=list(RETRAIN_COLUMNS))


def rebuild_architectures(output_dir: str | Path, config: dict[str, Any] | None = None) -> pd.DataFrame:
    """The architectures table of a run from its parts, finished or still running: `collected.parquet`,
    the retrain results (`retrain_results`) and the model cards (latency). What the pipeline writes
    after every finished trial and `pipeline/profile.py` after re-timing the models."""
    out = Path(output_dir)
    collected = pd.read_parquet(out / "collected.parquet")
    if config is None:
        config = yaml.safe_load((out / "config.yaml").read_text()) if (out / "config.yaml").is_file() else {}
    r = (config or {}).get("retrain") or {}
    retrained = retrain_results(out, list(collected["arch_id"]), int(r.get("repeats", 1)), r.get("epochs"))
    return architectures_table(collected, retrained, read_cards(out))


def load_partial_run(output_dir: str | Path) -> RunResults:
    """Like `load_run`, but also reads a run folder that is still running or stopped half-way.

    Falls back, table by table: architectures.parquet -> collected.parquet joined with
    retrained.parquet or the per-epoch `retrain/*.jsonl` -> no architectures; search_metrics.parquet ->
    `search/*/metrics.jsonl`; config.yaml -> {}. Raises FileNotFoundError if `output_dir` is no folder.
    """
    out = Path(output_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"no run folder at {out}")
    config_file = out / "config.yaml"
    config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    if (out / "architectures.parquet").is_file():
        archs = pd.read_parquet(out / "architectures.parquet")
    elif (out / "collected.parquet").is_file():
        archs = rebuild_architectures(out, config)
    else:
        archs = conform(pd.DataFrame(), ARCH_SCHEMA)
    if (out / "search_metrics.parquet").is_file():
        metrics = pd.read_parquet(out / "search_metrics.parquet")
    else:
        rows = [r for f in sorted(out.glob("search/*/metrics.jsonl")) for r in read_jsonl(f)]
        metrics = _tolerant_metrics(rows)
    return RunResults(archs, metrics, config)


def load_genotypes(output_dir: str | Path, arch_ids: list[str] | None = None) -> dict[str, Any]:
    """`{arch_id: Genotype}` from `genotypes/*.json` (or the `genotype` column of collected.parquet).

    Unreadable or invalid genotype files are skipped.
    """
    from dnad.genotype import Genotype

    out = Path(output_dir)
    texts: dict[str, str] = {}
    if (out / "collected.parquet").is_file():
        collected = pd.read_parquet(out / "collected.parquet")
        if "genotype" in collected:
            texts.update(zip(collected["arch_id"].astype(str), collected["genotype"].astype(str)))
    for f in sorted(out.glob("genotypes/*.json")):
        try:
            texts[f.stem] = f.read_text()
        except OSError:
            continue
    wanted = texts.keys() if arch_ids is None else [a for a in arch_ids if a in texts]
    genotypes: dict[str, Any] = {}
    for arch_id in wanted:
        try:
            genotypes[arch_id] = Genotype.from_json(texts[arch_id])
        except (ValueError, KeyError, TypeError):
            continue
    return genotypes


def reference_points(dataset: str) -> pd.DataFrame:
    """Published reference models for `dataset` (packaged `dnad/data/reference_points.csv`).

    Columns: dataset, model, params, macs (NaN where the source gives none), top1_acc, test_error,
    source. Unknown datasets (e.g. `fake`) give an empty table.
    """
    from importlib.resources import files

    with (files("dnad") / "data" / "reference_points.csv").open("r") as f:
        ref = pd.read_csv(f)
    if "macs" not in ref:
        ref["macs"] = np.nan
    key = str(dataset).lower().replace("-", "_")
    ref = ref[ref["dataset"].str.lower().str.replace("-", "_") == key].reset_index(drop=True)
    ref = ref.assign(
        params=pd.to_numeric(ref["params"], errors="coerce").astype(float),
        macs=pd.to_numeric(ref["macs"], errors="coerce").astype(float),
        top1_acc=pd.to_numeric(ref["top1_acc"], errors="coerce").astype(float),
    )
    ref["test_error"] = 1.0 - ref["top1_acc"]
    return ref[["dataset", "model", "params", "macs", "top1_acc", "test_error", "source"]]
