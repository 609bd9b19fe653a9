"""Figures of a run: pure functions from result tables (or a genotype) to plotly figures / HTML.

Nothing here reads files or starts anything; `dnad.report` and the notebooks feed these with the
tables of `dnad.results`. Every figure is a `plotly.graph_objects.Figure`, testable via `to_dict()`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dnad.genotype import Genotype
from dnad.results import deploy_latency, pareto_mask

# colour-blind-friendly qualitative palette (Okabe-Ito + Tableau extras) for trials
TRIAL_PALETTE = (
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000",
    "#8C564B", "#7F7F7F", "#BCBD22", "#17BECF",
)  # fmt: skip
_EXTRA_OP_COLORS = ("#CC79A7", "#8C564B", "#BCBD22", "#17BECF", "#9467BD", "#F0E442")
COST_LABELS = {
    "macs": "MACs (multiply-accumulates, log scale)",
    "params": "parameters (log scale)",
    "latency": "latency at batch 1, ms (ONNX Runtime, else PyTorch; log scale)",
}
COST_TITLES = {"macs": "MACs", "params": "parameters", "latency": "latency"}
REFERENCE_NAME = "published (reference)"
PARETO_NAME = "Pareto front"
# (column, axis title) of the search-dynamics subplots, top to bottom
DYNAMICS_PANELS: tuple[tuple[str, str], ...] = (
    ("S", "S (sparsity)"), ("gamma", "γ"), ("mu", "μ"), ("alive_pairs", "alive pairs"),
    ("est_macs", "est. MACs"), ("loss", "train loss"), ("train_acc", "train acc"),
    ("val_acc", "val acc (running)"),
)  # fmt: skip


def _fmt_int(v: Any) -> str:
    return "?" if v is None or pd.isna(v) else f"{int(v):,}"


def _fmt_macs(v: Any) -> str:
    return "?" if v is None or pd.isna(v) else f"{float(v) / 1e6:,.2f} M"


def _fmt_pct(v: Any) -> str:
    return "?" if v is None or pd.isna(v) else f"{100 * float(v):.2f}%"


def trial_colors(trial_ids: Sequence[Any]) -> dict[str, str]:
    """One palette colour per trial id (sorted), the same in every figure of a run."""
    ids = sorted({str(t) for t in trial_ids if t is not None and not pd.isna(t)})
    return {t: TRIAL_PALETTE[i % len(TRIAL_PALETTE)] for i, t in enumerate(ids)}


def _op_info() -> dict[str, Any]:
    from dnad.ops import OP_INFO  # lazy: torch only when a cell is drawn

    return OP_INFO


def op_color(op: str) -> str:
    """The colour an op was registered with; otherwise a stable colour from its name."""
    info = _op_info().get(op)
    if info is not None and info.color is not None:
        return info.color
    return _EXTRA_OP_COLORS[sum(op.encode()) % len(_EXTRA_OP_COLORS)]


def op_short(op: str) -> str:
    """The short label an op was registered with (its name when unknown)."""
    info = _op_info().get(op)
    return info.short if info is not None else op


def trial_label(trial_id: str, temperature: Any = None) -> str:
    """Legend name of a trial: its id and KD temperature ("KD off" when there is none)."""
    if temperature is None:
        return f"trial {trial_id}"
    if pd.isna(temperature):
        return f"trial {trial_id} · KD off"
    return f"trial {trial_id} · T={float(temperature):g}"


def _ms(v: Any) -> str:
    return "?" if v is None or pd.isna(v) else f"{float(v):.2f} ms"


def arch_hover(row: Any) -> str:
    """Hover text of an architecture point: arch id, params, MACs, latency, errors and its emission."""
    val = getattr(row, "val_error", float("nan"))
    return (
        f"<b>{row.arch_id}</b><br>trial {row.trial_id}, emission {row.emission_index} at step {row.step}"
        f"<br>params {_fmt_int(row.params)}<br>MACs {_fmt_macs(row.macs)}"
        f"<br>latency {_ms(getattr(row, 'latency', float('nan')))}"
        f"<br>validation error {_fmt_pct(val)} (chooses)<br>test error {_fmt_pct(row.test_error)} (reported)"
    )


def with_costs(archs: pd.DataFrame) -> pd.DataFrame:
    """`archs` with a `latency` column (`dnad.results.deploy_latency`) beside macs and params."""
    return archs.assign(latency=deploy_latency(archs))


def scored(archs: pd.DataFrame, cost: str, error: str = "val_error") -> pd.DataFrame:
    """Rows with an `error` and a positive cost: the ones a Pareto plot can show."""
    archs = with_costs(archs)
    ok = archs["status"].astype(str) == "ok" if "status" in archs else pd.Series(True, index=archs.index)
    err = pd.to_numeric(archs[error] if error in archs else np.nan, errors="coerce")
    err = pd.Series(err, index=archs.index).astype(float)
    c = pd.to_numeric(archs[cost], errors="coerce").astype(float)
    keep = ok.fillna(False).to_numpy(bool) & err.notna().to_numpy() & (c > 0).fillna(False).to_numpy()
    return archs[keep]


def pareto_front(archs: pd.DataFrame, cost: str = "macs", error: str = "val_error") -> pd.DataFrame:
    """The non-dominated (`error`, cost) rows among the finished architectures, sorted by cost."""
    rows = scored(archs, cost, error)
    mask = pareto_mask(rows[error].astype(float), rows[cost].astype(float))
    return rows[mask].sort_values([cost, error], kind="stable")


def pareto_figure(
    archs: pd.DataFrame,
    cost: str = "macs",
    reference: pd.DataFrame | None = None,
    error: str = "val_error",
) -> go.Figure:
    """Validation error (what chooses; `error="test_error"` for the reported one) against MACs, params
    or latency (log x), one marker series per trial, the front as a step line.

    `reference` (from `dnad.results.reference_points`) adds published models (their test error) as a
    separate series; rows without a value for `cost` are left out.
    """
    if cost not in COST_LABELS:
        raise ValueError(f"cost must be one of {sorted(COST_LABELS)}, not {cost!r}")
    fig = go.Figure()
    rows = scored(archs, cost, error)
    colors = trial_colors(archs["trial_id"]) if "trial_id" in archs else {}
    for tid, group in rows.groupby(rows["trial_id"].astype(str), sort=True):
        temps = group["temperature"].dropna() if "temperature" in group else pd.Series(dtype=float)
        temp = temps.iloc[0] if len(temps) else (float("nan") if "temperature" in group else None)
        fig.add_trace(
            go.Scatter(
                x=group[cost].astype(float).tolist(),
                y=group[error].astype(float).tolist(),
                mode="markers",
                name=trial_label(str(tid), temp),
                legendgroup=f"trial-{tid}",
                marker={"color": colors.get(str(tid)), "size": 9, "line": {"width": 1, "color": "white"}},
                hovertext=[arch_hover(r) for r in group.itertuples()],
                hoverinfo="text",
                customdata=group["arch_id"].astype(str).tolist(),
            )
        )
    front = pareto_front(archs, cost, error)
    if len(front):
        fig.add_trace(
            go.Scatter(
                x=front[cost].astype(float).tolist(),
                y=front[error].astype(float).tolist(),
                mode="lines+markers",
                line_shape="hv",
                name=PARETO_NAME,
                line={"color": "#333333", "width": 2},
                marker={"symbol": "circle-open", "size": 14, "color": "#333333"},
                hovertext=[arch_hover(r) for r in front.itertuples()],
                hoverinfo="text",
                customdata=front["arch_id"].astype(str).tolist(),
            )
        )
    if reference is not None and len(reference):
        ref = (
            reference[pd.to_numeric(reference[cost], errors="coerce").notna()] if cost in reference else None
        )
        if ref is not None and len(ref):
            fig.add_trace(
                go.Scatter(
                    x=ref[cost].astype(float).tolist(),
                    y=ref["test_error"].astype(float).tolist(),
                    mode="markers",
                    name=REFERENCE_NAME,
                    marker={"symbol": "star", "size": 12, "color": "#B22222"},
                    hovertext=[
                        f"<b>{html.escape(str(r.model))}</b><br>params {_fmt_int(r.params)}"
                        f"<br>MACs {_fmt_macs(r.macs)}<br>test error {_fmt_pct(r.test_error)}"
                        f"<br>{html.escape(str(r.source))}"
                        for r in ref.itertuples()
                    ],
                    hoverinfo="text",
                )
            )
    what = "validation error" if error == "val_error" else "test error"
    fig.update_xaxes(type="log", title_text=COST_LABELS[cost])
    fig.update_yaxes(
        title_text=what + (" (published: test error)" if error == "val_error" else ""), tickformat=".1%"
    )
    fig.update_layout(
        title=f"{what.capitalize()} vs {COST_TITLES[cost]}",
        template="plotly_white",
        height=480,
        legend={"groupclick": "togglegroup"},
        hovermode="closest",
    )
    if not len(rows):
        fig.add_annotation(text="no retrained architecture yet", showarrow=False, xref="paper", yref="paper",
                           x=0.5, y=0.5, font={"size": 16, "color": "#888"})  # fmt: skip
    return fig


def dynamics_figure(metrics: pd.DataFrame) -> go.Figure:
    """Search dynamics against step: one subplot per quantity of `DYNAMICS_PANELS`, one trace group
    per trial (toggled together from the legend), emissions marked with diamonds."""
    n = len(DYNAMICS_PANELS)
    fig = make_subplots(rows=n, cols=1, shared_xaxes=True, vertical_spacing=0.015)
    colors = trial_colors(metrics["trial_id"]) if "trial_id" in metrics else {}
    if len(metrics):
        df = metrics.sort_values(["trial_id", "step"])
        for tid, group in df.groupby(df["trial_id"].astype(str), sort=True):
            color = colors.get(str(tid))
            emitted = group["emitted"].fillna(False).astype(bool).to_numpy()
            for row, (col, label) in enumerate(DYNAMICS_PANELS, start=1):
                if col not in group:
                    continue
                y = pd.to_numeric(group[col], errors="coerce").astype(float)
                steps = group["step"].astype(float)
                fig.add_trace(
                    go.Scatter(
                        x=steps.tolist(), y=[None if math.isnan(v) else v for v in y],
                        mode="lines", name=f"trial {tid}", legendgroup=f"trial-{tid}",
                        showlegend=row == 1, line={"color": color, "width": 1.5},
                        hovertemplate=f"trial {tid}<br>step %{{x}}<br>{label} %{{y:.4g}}<extra></extra>",
                    ),
                    row=row, col=1,
                )  # fmt: skip
                if emitted.any():
                    fig.add_trace(
                        go.Scatter(
                            x=steps[emitted].tolist(), y=[None if math.isnan(v) else v for v in y[emitted]],
                            mode="markers", name=f"trial {tid} emissions", legendgroup=f"trial-{tid}",
                            showlegend=row == 1,
                            marker={"symbol": "diamond", "size": 9, "color": color,
                                    "line": {"width": 1, "color": "black"}},
                            hovertemplate=f"trial {tid}: emission<br>step %{{x}}<br>{label} %{{y:.4g}}<extra></extra>",
                        ),
                        row=row, col=1,
                    )  # fmt: skip
    for row, (col, label) in enumerate(DYNAMICS_PANELS, start=1):
        fig.update_yaxes(title_text=label, row=row, col=1, title_font={"size": 11})
        if col == "est_macs":
            fig.update_yaxes(type="log", row=row, col=1)
    fig.update_xaxes(title_text="step", row=n, col=1)
    fig.update_layout(
        title="Search dynamics (◆ = architecture emitted)", template="plotly_white",
        height=170 * n, hovermode="x unified", legend={"groupclick": "togglegroup"},
    )  # fmt: skip
    if not len(metrics):
        fig.add_annotation(text="no search metrics yet", showarrow=False, xref="paper", yref="paper",
                           x=0.5, y=0.5, font={"size": 16, "color": "#888"})  # fmt: skip
    return fig


def _state_label(state: int) -> str:
    return {0: "c<sub>k-1</sub>", 1: "c<sub>k-2</sub>"}.get(state, str(state))


def cell_figure(genotype: Genotype, title: str | None = None, cols: int = 3) -> go.Figure:
    """Arc diagram of every cell of `genotype`: one panel per cell, states on a line
    (c_{k-2}, c_{k-1}, node 2, 3, ..., out), one arc per kept (input, op) edge coloured by op, above
    the line; grey arcs below the line show the output concat. Reduction cells are shaded and titled
    "reduction". Edge shapes are named "edge c<cell> <input>-><node> <op>"; hover an arc's apex for
    its op."""
    ncells = genotype.num_cells
    cols = max(1, min(cols, ncells))
    nrows = math.ceil(ncells / cols)
    reductions = set(genotype.reductions)
    titles = [f"cell {c} · {'REDUCTION' if c in reductions else 'normal'}" for c in range(ncells)]
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=titles, horizontal_spacing=0.04,
                        vertical_spacing=0.12 / max(nrows, 1) + 0.04)  # fmt: skip
    used_ops: list[str] = []
    shapes: list[dict[str, Any]] = []  # set once at the end: fig.add_shape copies the layout every call
    for c, cell in enumerate(genotype.cells):
        r, k = divmod(c, cols)
        row, col = r + 1, k + 1
        axis = "" if c == 0 else str(c + 1)
        xref, yref = f"x{axis}", f"y{axis}"
        # x position of each state: inputs 1 (k-2) then 0 (k-1), then nodes 2..n+1, then the output
        nstates = len(cell) + 2
        pos = {1: 0.0, 0: 1.0, **{s: float(s) for s in range(2, nstates)}}
        out_x = float(nstates)
        if c in reductions:
            shapes.append(dict(
                type="rect", xref=f"{xref} domain", yref=f"{yref} domain", x0=0, x1=1, y0=0, y1=1,
                fillcolor="rgba(230, 159, 0, 0.10)", line={"width": 0}, layer="below", name=f"reduction c{c}",
            ))  # fmt: skip
        apex_x, apex_y, apex_text, apex_color = [], [], [], []
        top = 1.0
        for node_i, node in enumerate(cell):
            dst = node_i + 2
            seen: dict[int, int] = {}
            for src, op in node:
                j = seen.get(src, 0)
                seen[src] = j + 1
                x0, x1 = sorted((pos[src], pos[dst]))
                h = 0.45 * (x1 - x0) ** 0.8 + 0.35 * j
                top = max(top, h)
                color = op_color(op)
                if op not in used_ops:
                    used_ops.append(op)
                xm = (x0 + x1) / 2
                shapes.append(dict(
                    type="path", path=f"M {x0},0 Q {xm},{2 * h} {x1},0", xref=xref, yref=yref,
                    line={"color": color, "width": 2.5 if op != "none" else 1}, layer="below",
                    name=f"edge c{c} {src}->{dst} {op}",
                ))  # fmt: skip
                apex_x.append(xm)
                apex_y.append(h)
                apex_text.append(f"cell {c}: {op}<br>{_state_label(src)} → node {dst}")
                apex_color.append(color)
        for s in range(2, nstates):  # output concat
            x0 = pos[s]
            h = -0.18 * (out_x - x0) ** 0.6
            shapes.append(dict(
                type="path", path=f"M {x0},0 Q {(x0 + out_x) / 2},{2 * h} {out_x},0", xref=xref, yref=yref,
                line={"color": "#BBBBBB", "width": 1, "dash": "dot"}, layer="below", name=f"concat c{c} {s}",
            ))  # fmt: skip
        xs = [pos[s] for s in range(nstates)] + [out_x]
        labels = [_state_label(s) for s in range(nstates)] + ["out"]
        fills = ["#DDEEFF", "#DDEEFF"] + ["#FFFFFF"] * (nstates - 2) + ["#E8E8E8"]
        fig.add_trace(
            go.Scatter(
                x=xs, y=[0.0] * len(xs), mode="markers+text", text=labels, textposition="middle center",
                textfont={"size": 11}, marker={"size": 28, "color": fills, "line": {"width": 1.5, "color": "#333"}},
                hoverinfo="skip", showlegend=False, cliponaxis=False,
            ),
            row=row, col=col,
        )  # fmt: skip
        if apex_x:
            fig.add_trace(
                go.Scatter(
                    x=apex_x, y=apex_y, mode="markers", marker={"size": 7, "color": apex_color},
                    hovertext=apex_text, hoverinfo="text", showlegend=False, name=f"ops of cell {c}",
                ),
                row=row, col=col,
            )  # fmt: skip
        fig.update_xaxes(range=[-0.6, out_x + 0.6], visible=False, row=row, col=col)
        fig.update_yaxes(range=[-0.25 * nstates**0.6 - 0.3, top + 0.4], visible=False, row=row, col=col)
    order = list(_op_info())  # registration order
    used_ops.sort(key=lambda o: (order.index(o) if o in order else len(order), o))
    for op in used_ops:  # legend: one entry per op present
        fig.add_trace(
            go.Scatter(x=[None], y=[None], mode="lines", name=f"{op_short(op)} ({op})",
                       line={"color": op_color(op), "width": 4}, hoverinfo="skip"),
            row=1, col=1,
        )  # fmt: skip
    fig.update_layout(
        shapes=shapes,
        title=title or f"Cells of {genotype.arch_id} ({genotype.num_pairs} kept pairs)",
        template="plotly_white", height=70 + 240 * nrows, margin={"l": 20, "r": 20, "t": 70, "b": 20},
        legend={"orientation": "h", "y": -0.02, "yanchor": "top"}, hovermode="closest",
    )  # fmt: skip
    return fig


def edge_shapes(fig: go.Figure) -> list[dict[str, Any]]:
    """The edge shapes of a `cell_figure` (one per kept (input, op) pair) as plain dicts."""
    return [
        s for s in fig.to_dict()["layout"].get("shapes", []) if str(s.get("name", "")).startswith("edge ")
    ]


TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("arch_id", "arch"), ("trial_id", "trial"), ("temperature", "T"), ("emission_index", "emission"),
    ("step", "step"), ("S", "S"), ("alive_pairs", "pairs"), ("params", "params"), ("macs", "MMACs"),
    ("latency", "ms"), ("val_acc", "val top-1"), ("test_acc", "test top-1"), ("retrain_epochs", "epochs"),
    ("status", "status"),
)  # fmt: skip


def _cell(col: str, v: Any) -> str:
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return "–"
    if col == "params":
        return f"{int(v):,}"
    if col == "macs":
        return f"{float(v) / 1e6:,.2f}"
    if col in ("test_acc", "test_error", "val_acc", "val_error"):
        return f"{100 * float(v):.2f}%"
    if col == "latency":
        return f"{float(v):.2f}"
    if col == "temperature":
        return f"{float(v):g}"
    if col == "S":
        return f"{float(v):.1f}"
    return html.escape(str(v))


def _true(v: Any) -> bool:
    return v is not None and not pd.isna(v) and bool(v)


def results_table_html(archs: pd.DataFrame) -> str:
    """The architectures as an HTML table, best validation accuracy first; Pareto rows carry class
    "pareto" and a ★ with the front(s) they lie on (M = MACs, P = params, L = latency)."""
    if archs.empty:
        return '<p class="empty">No architectures yet.</p>'
    df = with_costs(archs)
    acc = pd.to_numeric(df["val_acc"] if "val_acc" in df else df["test_acc"], errors="coerce").astype(float)
    ok = (df["status"].astype(str) == "ok").to_numpy() if "status" in df else np.ones(len(df), bool)
    df = df.assign(_ok=ok, _acc=acc.fillna(-1.0)).sort_values(["_ok", "_acc"], ascending=[False, False])
    cols = [(c, h) for c, h in TABLE_COLUMNS if c in df]
    head = (
        "".join(f'<th class="c-{c}">{html.escape(h)}</th>' for c, h in cols)
        + '<th class="c-pareto">Pareto</th>'
    )
    body = []
    for _, r in df.iterrows():
        flags = (("M", "is_pareto_macs"), ("P", "is_pareto_params"), ("L", "is_pareto_latency"))
        fronts = "+".join(n for n, col in flags if _true(r.get(col)))
        cls = ["pareto"] if fronts else []
        if str(r.get("status", "ok")) != "ok":
            cls.append("not-ok")
        title = (
            f' title="{html.escape(str(r["error"]))}"' if "error" in r and isinstance(r["error"], str) else ""
        )
        tds = "".join(f'<td class="c-{c}">{_cell(c, r[c])}</td>' for c, _ in cols)
        mark = f"★ {fronts}" if fronts else ""
        body.append(
            f'<tr class="{" ".join(cls)}" data-arch="{html.escape(str(r["arch_id"]))}"{title}>{tds}'
            f'<td class="c-pareto">{mark}</td></tr>'
        )
    return (
        '<table class="results"><thead><tr>'
        + head
        + "</tr></thead><tbody>\n"
        + "\n".join(body)
        + "\n</tbody></table>"
    )
