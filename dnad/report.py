"""`report.html`: one self-contained HTML page (plotly.js inlined, opens offline) about a run folder.

Sections: header (run, dataset, counts, best validation accuracy, config summary), Pareto fronts
(validation error vs MACs, params and latency, with published reference points), search dynamics,
one cell diagram per Pareto architecture, and the results table. Validation error chooses; test
accuracy is shown beside it, never used to choose. Works on finished and half-finished run folders
(`dnad.results.load_partial_run`).
"""

from __future__ import annotations

import datetime as _dt
import html
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import yaml
from plotly.offline import get_plotlyjs
from pyarrow.lib import ArrowException

from dnad.checkpoint import atomic_write_text
from dnad.errors import InputError
from dnad.figures import cell_figure, dynamics_figure, pareto_figure, results_table_html
from dnad.results import RunResults, front_trend, load_genotypes, load_partial_run, reference_points

REPORT_NAME = "report.html"

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 0 24px 48px; color: #222; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.sub { color: #666; margin-top: 0; }
.facts { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.fact { background: #f5f7fa; border-radius: 6px; padding: 8px 14px; }
.fact b { display: block; font-size: 1.3em; }
.config { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85em; color: #444;
          background: #fafafa; border: 1px solid #eee; padding: 8px 12px; white-space: pre-wrap; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.triple { display: grid; grid-template-columns: 1fr 1fr 1fr; gap: 12px; }
@media (max-width: 1300px) { .triple { grid-template-columns: 1fr 1fr; } }
@media (max-width: 1000px) { .pair { grid-template-columns: 1fr; } }
table.results { border-collapse: collapse; font-size: 0.88em; width: 100%; }
table.results th { position: sticky; top: 0; background: #333; color: #fff; padding: 6px 8px; text-align: right; }
table.results td { padding: 4px 8px; border-bottom: 1px solid #eee; text-align: right;
                   font-variant-numeric: tabular-nums; }
table.results .c-arch_id, table.results .c-trial_id, table.results .c-status { text-align: left; }
table.results td.c-arch_id, table.results td.c-status { font-family: ui-monospace, Menlo, Consolas, monospace; }
table.results tr.pareto { background: #fff6df; font-weight: 600; }
table.results tr.not-ok { color: #999; }
table.results tr:hover { background: #eef4ff; }
.arch-head { margin: 18px 0 0; font-size: 1em; } .arch-head code { font-size: 1.05em; }
.empty, .note { color: #888; font-style: italic; }
"""


def _get(d: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def teacher_name(t: dict[str, Any]) -> str:
    """`kind:what` of a teacher config: the torchvision arch, the genotype file or the checkpoint."""
    kind = t.get("kind", "torchvision")
    what = {"torchvision": t.get("arch"), "genotype": t.get("genotype"), "checkpoint": t.get("checkpoint")}
    value = what.get(kind) or "?"
    return f"{kind}:{Path(value).name if kind != 'torchvision' else value}"


def config_summary(config: dict[str, Any]) -> str:
    """A few lines of the settings that matter when reading the results."""
    if not config:
        return "(no config.yaml)"
    g = lambda *k: _get(config, *k)  # noqa: E731
    sweep = {k: v for k, v in (g("sweep") or {}).items() if k != "num_samples" and v}
    kd = (
        f"KD T={g('search', 'distill', 'temperature')} from {teacher_name(g('search', 'distill', 'teacher') or {})}"
        if g("search", "distill", "enabled")
        else "KD off"
    )
    shrink = g("search", "shrink") or {}
    lines = [
        f"data     {g('data', 'dataset')}  train_subset={g('data', 'train_subset')}  "
        f"retrain train_subset={g('retrain_data', 'train_subset')}  val_size={g('data', 'val_size')}",
        f"search   C={g('search', 'supernet', 'C')} x {g('search', 'supernet', 'cells')} cells, "
        f"{g('search', 'supernet', 'nodes')} nodes, ops={g('search', 'supernet', 'ops')}; "
        f"{g('search', 'epochs')} epochs, batch {g('search', 'batch_size')}; {kd}",
        "shrink   "
        + ", ".join(
            f"{k}={shrink[k]}" for k in ("gamma0", "phi", "t_max", "s_min", "sparsity") if k in shrink
        ),
        f"retrain  C={g('retrain', 'C')}, {g('retrain', 'epochs')} epochs, batch {g('retrain', 'batch_size')}, "
        f"lr {g('retrain', 'lr')}",
        "sweep    " + (", ".join(f"{k}={v}" for k, v in sweep.items()) or "none"),
    ]
    return "\n".join(lines)


def _fig_html(fig: go.Figure, div_id: str) -> str:
    return pio.to_html(
        fig,
        include_plotlyjs=False,
        full_html=False,
        div_id=div_id,
        config={"displaylogo": False, "responsive": True},
    )


def _facts(res: RunResults) -> list[tuple[str, str]]:
    archs = res.architectures
    ok = archs[archs["status"].astype(str) == "ok"] if len(archs) else archs
    facts = [
        ("run", str(_get(res.config, "name", default="?"))),
        ("dataset", str(_get(res.config, "data", "dataset", default="?"))),
        ("architectures", f"{len(archs)} ({len(ok)} retrained)"),
        ("search trials", str(res.search_metrics["trial_id"].nunique()) if len(res.search_metrics) else "0"),
    ]
    val = pd.to_numeric(ok["val_acc"], errors="coerce").astype(float) if len(ok) else None
    if val is not None and val.notna().any():
        best = ok.loc[val.idxmax()]
        facts.append((
            "best on validation",
            f"{100 * float(best['val_acc']):.2f}% val, {100 * float(best['test_acc']):.2f}% test "
            f"({best['arch_id']}, {int(best['params']):,} params)",
        ))  # fmt: skip
    else:
        facts.append(("best on validation", "–"))
    trend = front_trend(archs)
    if trend is not None:
        noise = "" if trend.noise_sd is None else f", one retraining's sd {trend.noise_sd:.2f}"
        facts.append((
            "trend",
            f"{trend.slope:+.2f} val points per doubling of MACs ({trend.macs_span:.2f}x MACs, "
            f"r = {trend.r:.2f}{noise})",
        ))  # fmt: skip
    return facts


def _present(v: Any) -> bool:
    return v is not None and not (not isinstance(v, str) and pd.isna(v)) and v != ""


PARETO_FLAGS = ("is_pareto_macs", "is_pareto_params", "is_pareto_latency")


def pareto_ids(archs: pd.DataFrame) -> list[str]:
    """Arch ids on any Pareto front (MACs, params or latency), cheapest MACs first."""
    if archs.empty:
        return []
    on = pd.Series(False, index=archs.index)
    for flag in PARETO_FLAGS:
        if flag in archs:
            on |= archs[flag].fillna(False).astype(bool)
    return list(archs[on].sort_values("macs")["arch_id"].astype(str).drop_duplicates())


def build_report_html(res: RunResults, output_dir: str | Path | None = None, title: str | None = None) -> str:
    """The report page of `res` (genotypes for the cell diagrams read from `output_dir`)."""
    archs, metrics, config = res.architectures, res.search_metrics, res.config
    name = str(_get(config, "name", default="run"))
    dataset = str(_get(config, "data", "dataset", default=""))
    reference = reference_points(dataset) if dataset else None
    parts: list[str] = []
    facts = "".join(
        f'<div class="fact">{html.escape(k)}<b>{html.escape(v)}</b></div>' for k, v in _facts(res)
    )
    where = html.escape(str(Path(output_dir).resolve())) if output_dir is not None else ""
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts.append(
        f"<h1>{html.escape(title or f'DNAD run “{name}”')}</h1>"
        f'<p class="sub">{where} · report written {now}</p><div class="facts">{facts}</div>'
        f'<div class="config">{html.escape(config_summary(config))}</div>'
    )
    parts.append("<h2>Pareto fronts</h2>")
    parts.append(
        '<p class="note">y = error on the validation images held out of training: it decides the fronts '
        "and the best model. The test accuracy is reported beside it (hover, table) and never used to "
        "choose. Latency: batch 1 on the machine that retrained the model (ONNX Runtime, else PyTorch); "
        "<code>python pipeline/profile.py OUTPUT</code> re-measures it on yours.</p>"
    )
    if reference is not None and len(reference):
        parts.append(
            f'<p class="note">★ = published {html.escape(dataset)} models (reference_points.csv, their test '
            "error); those without a MACs figure appear on the params plot only.</p>"
        )
    parts.append(
        '<div class="triple">'
        + _fig_html(pareto_figure(archs, "macs", reference), "pareto-macs")
        + _fig_html(pareto_figure(archs, "params", reference), "pareto-params")
        + _fig_html(pareto_figure(archs, "latency"), "pareto-latency")
        + "</div>"
    )
    parts.append("<h2>Search dynamics</h2>")
    parts.append(_fig_html(dynamics_figure(metrics), "dynamics"))
    parts.append("<h2>Pareto architectures</h2>")
    ids = pareto_ids(archs)
    genotypes = load_genotypes(output_dir, ids) if output_dir is not None else {}
    if not ids:
        parts.append('<p class="empty">No Pareto architecture yet.</p>')
    for i, arch_id in enumerate(ids):
        row = archs[archs["arch_id"].astype(str) == arch_id].iloc[0]
        parts.append(
            f'<p class="arch-head"><code>{html.escape(arch_id)}</code> · trial {html.escape(str(row["trial_id"]))} '
            f"emission {row['emission_index']} · {int(row['params']):,} params · {float(row['macs']) / 1e6:,.2f} MMACs"
            f" · val top-1 {100 * float(row['val_acc']):.2f}% · test top-1 {100 * float(row['test_acc']):.2f}%"
            + (
                f" · <code>{html.escape(str(row['model_dir']))}</code>"
                if _present(row.get("model_dir"))
                else ""
            )
            + "</p>"
        )
        if arch_id in genotypes:
            g = genotypes[arch_id]
            parts.append(
                _fig_html(cell_figure(g, title=f"{arch_id}: {g.num_pairs} kept pairs"), f"cells-{i}")
            )
        else:
            parts.append('<p class="empty">genotype file missing</p>')
    parts.append("<h2>All architectures</h2>")
    parts.append(
        '<p class="note">★ = on the Pareto front of validation error vs MACs (M), params (P) and/or '
        "latency (L); sorted by validation accuracy.</p>"
    )
    parts.append(results_table_html(archs))
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title or f'DNAD report: {name}')}</title>"
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style>'
        f'<script type="text/javascript">{get_plotlyjs()}</script></head>\n<body>\n{body}\n</body></html>\n'
    )


RUN_MARKERS = ("config.yaml", "architectures.parquet", "collected.parquet", "search")


def check_run_folder(output_dir: str | Path) -> Path:
    """`output_dir` as a Path; InputError unless it is a folder holding something of a run."""
    out = Path(output_dir)
    if not out.is_dir():
        raise InputError("output_dir", str(output_dir), "no such folder; pass the --output folder of a run")
    if not any((out / m).exists() for m in RUN_MARKERS):
        raise InputError(
            "output_dir", str(output_dir), f"not a run folder (it has none of {', '.join(RUN_MARKERS)})"
        )
    return out


def write_report(output_dir: str | Path, path: str | Path | None = None) -> Path:
    """Write `<output_dir>/report.html` (or `path`) atomically from a finished or running run folder.

    Raises InputError when `output_dir` is not a run folder or its tables cannot be read.
    """
    out = check_run_folder(output_dir)
    try:
        res = load_partial_run(out)
    except (OSError, ValueError, yaml.YAMLError, ArrowException) as e:
        raise InputError(
            "output_dir", str(output_dir), f"cannot read the run: {type(e).__name__}: {e}"
        ) from e
    target = Path(path) if path is not None else out / REPORT_NAME
    atomic_write_text(target, build_report_html(res, out))
    return target
