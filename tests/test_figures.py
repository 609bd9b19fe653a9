"""Figures, results table and HTML report on small synthetic tables and run folders."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dnad.figures import (
    DYNAMICS_PANELS,
    PARETO_NAME,
    REFERENCE_NAME,
    cell_figure,
    dynamics_figure,
    edge_shapes,
    op_color,
    pareto_figure,
    results_table_html,
)
from dnad.genotype import Genotype, reduction_indices
from dnad.report import build_report_html, write_report
from dnad.results import (
    ARCH_SCHEMA,
    METRICS_SCHEMA,
    conform,
    load_partial_run,
    load_run,
    reference_points,
    with_pareto,
)

REPO = Path(__file__).resolve().parent.parent
OPS = ("sep_conv_3x3", "skip_connect", "max_pool_3x3", "dil_conv_5x5", "avg_pool_3x3", "sep_conv_5x5")


# -- synthetic data (also used by test_report_browser.py) ----------------------------------------------
def synthetic_genotypes(n: int, cells: int = 5) -> list[Genotype]:
    """`n` distinct valid genotypes with several ops on one input somewhere."""
    out = []
    for a in range(n):
        cell = tuple(
            tuple(
                {
                    (0, OPS[(a + k) % len(OPS)]),
                    (0, OPS[(a + k + 1) % len(OPS)]),
                    (k + 1, OPS[(a * k) % len(OPS)]),
                }
            )
            for k in range(4)
        )
        out.append(Genotype(cells=(cell,) * cells, reductions=reduction_indices(cells)))
    assert len({g.arch_id for g in out}) == n
    return out


def synthetic_archs(genotypes: list[Genotype]) -> pd.DataFrame:
    """An architectures table: two trials (T=1 and T=4), the last architecture failed."""
    n = len(genotypes)
    errors = [0.12, 0.10, 0.105, 0.09, 0.095, 0.2, 0.08, 0.3][:n] + [0.15] * max(0, n - 8)
    rows = []
    for a, g in enumerate(genotypes):
        failed = a == n - 1
        rows.append({
            "arch_id": g.arch_id, "trial_id": f"t{a % 2}", "temperature": [1.0, 4.0][a % 2], "gamma0": 0.01,
            "phi": 1.05, "t_max": 10, "s_min": 120.0, "sparsity": "uniform", "emission_index": a // 2,
            "step": 10 * (a // 2 + 1), "epoch": a // 2, "S": 100.0 - a, "alive_pairs": g.num_pairs,
            "params": 100_000 * (a + 1), "macs": 2_000_000 * (n - a) + 500_000 * a, "retrain_epochs": 2,
            "val_error": np.nan if failed else errors[a], "val_acc": np.nan if failed else 1 - errors[a],
            "test_error": np.nan if failed else errors[a] + 0.003, "test_acc": np.nan if failed else 0.997 - errors[a],
            "latency_ms_torch": np.nan if failed else 5.0 + a, "latency_ms_onnx": np.nan if failed else 0.5 + 0.1 * a,
            "wall_s": 1.0, "status": "failed" if failed else "ok", "error": "boom" if failed else "",
            "is_pareto_macs": False, "is_pareto_params": False, "ptflops_version": "0.7.4", "ptflops_backend": "pytorch",
        })  # fmt: skip
    return conform(with_pareto(conform(pd.DataFrame(rows), ARCH_SCHEMA)), ARCH_SCHEMA)


def synthetic_metric_rows(trials: tuple[str, ...] = ("t0", "t1"), steps: int = 40) -> list[dict]:
    rows = []
    for t, tid in enumerate(trials):
        for s in range(0, steps, 2):
            rows.append({
                "trial_id": tid, "step": s, "epoch": s // 10, "loss": 2.0 - s / steps, "ce": 1.0, "kd": 0.5,
                "S": 100.0 - s - t, "gamma": 0.01 * s, "mu": 0.1, "alive_pairs": 56 - s, "est_macs": int(1e7 - s * 1e5),
                "train_acc": s / steps, "val_acc": 0.9 * s / steps, "img_per_s": 100.0, "emitted": s % 10 == 0 and s > 0,
            })  # fmt: skip
    return rows


def synthetic_metrics() -> pd.DataFrame:
    return conform(pd.DataFrame(synthetic_metric_rows()), METRICS_SCHEMA)


CONFIG = {
    "name": "synthetic",
    "data": {"dataset": "fashion_mnist", "train_subset": 600},
    "search": {"epochs": 4, "supernet": {"C": 8, "cells": 5, "nodes": 4}, "distill": {"enabled": False}},
    "retrain": {"C": 16, "epochs": 2, "batch_size": 64, "lr": 0.05},
    "sweep": {"temperature": [1.0, 4.0], "num_samples": 1},
}


def make_run_folder(out: Path, n: int = 6) -> pd.DataFrame:
    """A finished run folder as the pipeline leaves it (tables, config, genotypes)."""
    out.mkdir(parents=True, exist_ok=True)
    genotypes = synthetic_genotypes(n)
    archs = synthetic_archs(genotypes)
    archs.to_parquet(out / "architectures.parquet", index=False)
    synthetic_metrics().to_parquet(out / "search_metrics.parquet", index=False)
    (out / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    for g in genotypes:
        g.save(out / "genotypes" / f"{g.arch_id}.json")
    return archs


def brute_force_front(archs: pd.DataFrame, cost: str) -> list[tuple[float, float]]:
    """The non-dominated (cost, validation error) points: validation chooses, never the test split."""
    costs = archs["latency_ms_onnx"] if cost == "latency" else archs[cost]
    pts = [
        (float(c), float(r["val_error"]))
        for c, (_, r) in zip(costs, archs.iterrows())
        if r["status"] == "ok" and not pd.isna(r["val_error"])
    ]
    front = [p for p in pts if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts)]
    return sorted(front)


@pytest.fixture
def archs() -> pd.DataFrame:
    return synthetic_archs(synthetic_genotypes(6))


def trace(fig, name: str) -> dict:
    found = [t for t in fig.to_dict()["data"] if t.get("name") == name]
    assert len(found) == 1, [t.get("name") for t in fig.to_dict()["data"]]
    return found[0]


# -- Pareto figure --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cost", ["macs", "params", "latency"])
def test_pareto_axes_and_series(archs, cost):
    fig = pareto_figure(archs, cost)
    layout = fig.to_dict()["layout"]
    assert layout["xaxis"]["type"] == "log"
    assert {"macs": "MACs", "params": "parameters", "latency": "ms"}[cost] in layout["xaxis"]["title"]["text"]
    assert layout["yaxis"]["title"]["text"].startswith("validation error")
    assert (
        pareto_figure(archs, cost, error="test_error").to_dict()["layout"]["yaxis"]["title"]["text"]
        == "test error"
    )
    names = [t["name"] for t in fig.to_dict()["data"]]
    assert names == ["trial t0 · T=1", "trial t1 · T=4", PARETO_NAME]  # coloured by trial / temperature
    colors = {t["name"]: t["marker"]["color"] for t in fig.to_dict()["data"][:2]}
    assert len(set(colors.values())) == 2
    # the failed architecture (no test error) is not drawn
    drawn = sum(len(t["x"]) for t in fig.to_dict()["data"][:2])
    assert drawn == int((archs["status"] == "ok").sum())


@pytest.mark.parametrize("cost", ["macs", "params", "latency"])
def test_pareto_step_line_is_the_sorted_front(archs, cost):
    t = trace(pareto_figure(archs, cost), PARETO_NAME)
    assert t["line"]["shape"] == "hv"
    assert list(zip(t["x"], t["y"])) == brute_force_front(archs, cost)
    # and it agrees with the table's flags
    flagged = archs[archs[f"is_pareto_{cost}"]]
    assert sorted(t["customdata"]) == sorted(flagged["arch_id"])


def test_pareto_hover_text(archs):
    t = trace(pareto_figure(archs, "macs"), "trial t1 · T=4")
    row = archs[archs["arch_id"] == t["customdata"][0]].iloc[0]
    text = t["hovertext"][0]
    assert row["arch_id"] in text
    assert f"{row['params']:,}" in text
    assert f"{row['macs'] / 1e6:,.2f} M" in text
    assert f"validation error {100 * row['val_error']:.2f}% (chooses)" in text
    assert f"test error {100 * row['test_error']:.2f}% (reported)" in text
    assert f"latency {row['latency_ms_onnx']:.2f} ms" in text
    assert f"emission {row['emission_index']} at step {row['step']}" in text


def test_reference_points_table():
    fm = reference_points("fashion_mnist")
    assert len(fm) >= 5 and set(fm["dataset"]) == {"fashion_mnist"}
    assert np.allclose(fm["test_error"], 1 - fm["top1_acc"]) and (fm["params"] > 0).all()
    assert {"DARTS (2nd order)", "PC-DARTS"} <= set(reference_points("cifar10")["model"])
    assert reference_points("fake").empty and reference_points("imagenet").empty
    assert len(reference_points("Fashion-MNIST")) == len(fm)


def test_reference_series_fashion_mnist(archs):
    ref = reference_points("fashion_mnist")
    t = trace(pareto_figure(archs, "params", ref), REFERENCE_NAME)
    assert t["marker"]["symbol"] == "star"
    assert sorted(t["x"]) == sorted(ref["params"].astype(float))
    assert any("DenseNet" in h for h in t["hovertext"])
    # the CSV gives no MACs: nothing to draw on the MACs plot ...
    names = [d["name"] for d in pareto_figure(archs, "macs", ref).to_dict()["data"]]
    assert REFERENCE_NAME not in names
    # ... but a row that has MACs is drawn there
    with_macs = ref.assign(macs=[1e7] + [np.nan] * (len(ref) - 1))
    assert list(trace(pareto_figure(archs, "macs", with_macs), REFERENCE_NAME)["x"]) == [1e7]


def test_pareto_figure_without_results():
    empty = conform(pd.DataFrame(), ARCH_SCHEMA)
    fig = pareto_figure(empty, "macs", reference_points("fashion_mnist"))
    assert [t["name"] for t in fig.to_dict()["data"]] == []
    with pytest.raises(ValueError, match="cost"):
        pareto_figure(empty, "flops")


# -- dynamics -------------------------------------------------------------------------------------------
def test_dynamics_subplots_and_trace_groups():
    metrics = synthetic_metrics()
    fig = dynamics_figure(metrics)
    d = fig.to_dict()
    yaxes = sorted(k for k in d["layout"] if re.fullmatch(r"yaxis\d*", k))
    assert len(yaxes) == len(DYNAMICS_PANELS) == 8
    titles = [d["layout"][f"yaxis{i if i > 1 else ''}"]["title"]["text"] for i in range(1, 9)]
    assert titles == [label for _, label in DYNAMICS_PANELS]
    assert {"γ", "μ", "alive pairs", "est. MACs", "train acc"} <= set(titles)
    for tid in ("t0", "t1"):
        group = [t for t in d["data"] if t["legendgroup"] == f"trial-{tid}"]
        lines = [t for t in group if t["mode"] == "lines"]
        marks = [t for t in group if t["mode"] == "markers"]
        assert len(lines) == len(marks) == 8  # one line and one emission series per panel
        assert sum(bool(t["showlegend"]) for t in group) == 2  # shown once in the legend
        emitted = metrics[(metrics["trial_id"] == tid) & metrics["emitted"]]["step"].tolist()
        assert all(list(t["x"]) == emitted for t in marks)
        s_line = next(t for t in lines if t["yaxis"] == "y")
        assert list(s_line["y"]) == metrics[metrics["trial_id"] == tid]["S"].tolist()


def test_dynamics_empty_and_partial():
    assert len(dynamics_figure(conform(pd.DataFrame(), METRICS_SCHEMA)).to_dict()["data"]) == 0
    rows = synthetic_metric_rows(("t0",), 6)
    rows[0]["gamma"] = None  # e.g. not logged yet during warm-up
    metrics = conform(pd.DataFrame(rows), METRICS_SCHEMA)
    g = next(
        t for t in dynamics_figure(metrics).to_dict()["data"] if t["yaxis"] == "y2" and t["mode"] == "lines"
    )
    assert g["y"][0] is None


# -- cell diagram ---------------------------------------------------------------------------------------
def test_cell_figure_one_edge_per_kept_pair():
    g = synthetic_genotypes(3)[2]
    fig = cell_figure(g)
    edges = edge_shapes(fig)
    assert len(edges) == g.num_pairs
    expected = sorted(f"edge c{c} {i}->{k + 2} {op}" for c, cell in enumerate(g.cells)
                      for k, node in enumerate(cell) for i, op in node)  # fmt: skip
    assert sorted(e["name"] for e in edges) == expected
    for e in edges:
        assert e["line"]["color"] == op_color(e["name"].split()[-1])  # coloured by op
    # two ops on the same input draw two distinct arcs
    c0 = [e["path"] for e in edges if e["name"].startswith("edge c0 0->2 ")]
    assert len(c0) == 2 and len(set(c0)) == 2
    # reduction cells are shaded and titled
    d = fig.to_dict()["layout"]
    shaded = [s for s in d["shapes"] if s["name"].startswith("reduction")]
    assert sorted(int(s["name"][len("reduction c") :]) for s in shaded) == list(g.reductions)
    titles = [a["text"] for a in d["annotations"]]
    assert [t for t in titles if "REDUCTION" in t] == [f"cell {r} · REDUCTION" for r in g.reductions]
    assert len([t for t in titles if t.startswith("cell ")]) == g.num_cells
    # one legend entry per op used
    legend = [t["name"] for t in fig.to_dict()["data"] if t.get("showlegend") is not False]
    assert len(legend) == len({op for cell in g.cells for node in cell for _, op in node})


def test_cell_figure_hover_names_each_edge():
    cell = (((0, "sep_conv_3x3"), (1, "skip_connect")), ((2, "max_pool_3x3"),))
    g = Genotype(cells=(cell, cell), reductions=(1,))
    hover = [h for t in cell_figure(g).to_dict()["data"] for h in (t.get("hovertext") or [])]
    assert len(hover) == g.num_pairs
    assert any("max_pool_3x3" in h and "node 3" in h for h in hover)


# -- results table --------------------------------------------------------------------------------------
class _Rows(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows: list[tuple[str, str, list[str]]] = []
        self._cells: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-arch" in a:
            self.rows.append((a["data-arch"], a.get("class") or "", []))
            self._cells = self.rows[-1][2]
        elif tag == "td" and self._cells is not None:
            self._cells.append("")

    def handle_data(self, data):
        if self._cells:
            self._cells[-1] += data


def test_results_table_marks_pareto_rows(archs):
    p = _Rows()
    p.feed(results_table_html(archs))
    assert len(p.rows) == len(archs)
    pareto = set(
        archs[archs["is_pareto_macs"] | archs["is_pareto_params"] | archs["is_pareto_latency"]]["arch_id"]
    )
    assert {a for a, cls, _ in p.rows if "pareto" in cls.split()} == pareto
    for a, _cls, cells in p.rows:
        assert cells[-1].startswith("★") == (a in pareto)
    for _, r in archs[archs["arch_id"].isin(pareto)].iterrows():
        want = "+".join(n for n, f in zip("MPL", ("macs", "params", "latency")) if r[f"is_pareto_{f}"])
        assert next(c for x, _, c in p.rows if x == r["arch_id"])[-1].strip() == f"★ {want}"
    # best validation accuracy first (not the best test accuracy), failed rows last and marked
    assert p.rows[0][0] == archs.loc[archs["val_acc"].idxmax(), "arch_id"]
    assert "not-ok" in p.rows[-1][1] and "failed" in p.rows[-1][2]
    assert "<table" in results_table_html(archs) and "No architectures" in results_table_html(archs.iloc[:0])


# -- report ---------------------------------------------------------------------------------------------
def plotly_divs(text: str) -> list[str]:
    return re.findall(r'<div id="([^"]+)" class="plotly-graph-div"', text)


def test_write_report_finished_run(tmp_path):
    archs = make_run_folder(tmp_path / "run")
    path = write_report(tmp_path / "run")
    assert path == tmp_path / "run" / "report.html"
    text = path.read_text()
    assert text.count("<script") >= 1 and 'src="http' not in text  # plotly.js inlined: opens offline
    assert "plotly.js v" in text or "Plotly" in text
    pareto = archs[archs["is_pareto_macs"] | archs["is_pareto_params"] | archs["is_pareto_latency"]]
    divs = plotly_divs(text)
    assert divs[:4] == ["pareto-macs", "pareto-params", "pareto-latency", "dynamics"]
    assert len([d for d in divs if d.startswith("cells-")]) == len(pareto)
    for a in pareto["arch_id"]:
        assert f"<code>{a}</code>" in text
    assert "synthetic" in text and "fashion_mnist" in text
    best = archs.loc[archs["val_acc"].idxmax()]  # the best is the best on validation, its test beside it
    assert f"{100 * best['val_acc']:.2f}% val, {100 * best['test_acc']:.2f}% test ({best['arch_id']}" in text
    assert "never used to choose" in text
    assert REFERENCE_NAME in text
    assert not list((tmp_path / "run").glob(".report.html.*"))  # no temp file left behind


def test_write_report_half_finished_run(tmp_path):
    """Search done, collect done, retrain half-way: no architectures.parquet, no search_metrics.parquet."""
    out = tmp_path / "run"
    genotypes = synthetic_genotypes(3)
    archs = synthetic_archs(genotypes)
    collected = archs.drop(columns=["retrain_epochs", "val_error", "val_acc", "test_error", "test_acc", "wall_s",
                                    "status", "error", "is_pareto_macs", "is_pareto_params", "is_pareto_latency",
                                    "latency_ms_torch", "latency_ms_onnx"])  # fmt: skip
    collected = collected.assign(genotype=[g.to_json() for g in genotypes])
    out.mkdir()
    collected.to_parquet(out / "collected.parquet", index=False)  # genotypes only in the parquet
    (out / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    (out / "search" / "t0").mkdir(parents=True)
    lines = [json.dumps(r) for r in synthetic_metric_rows(("t0",), 10)]
    (out / "search" / "t0" / "metrics.jsonl").write_text("\n".join(lines) + '\n{"trial_id": "t0", "st')
    (out / "retrain").mkdir()
    a0, a1, a2 = (g.arch_id for g in genotypes)
    for e, acc in ((1, 0.7), (2, 0.8)):
        with open(out / "retrain" / f"{a0}.jsonl", "a") as f:
            f.write(
                json.dumps(
                    {"arch_id": a0, "epoch": e, "val_acc": acc, "test_acc": acc - 0.01, "epoch_s": 1.5}
                )
                + "\n"
            )
    (out / "retrain" / f"{a1}.jsonl").write_text(
        json.dumps({"arch_id": a1, "epoch": 1, "val_acc": 0.6, "test_acc": float("nan")}) + "\n"
    )

    res = load_partial_run(out)
    status = dict(zip(res.architectures["arch_id"], res.architectures["status"]))
    assert status == {a0: "ok", a1: "running", a2: "pending"}
    assert res.architectures.set_index("arch_id").loc[a0, "val_acc"] == pytest.approx(0.8)
    assert res.architectures.set_index("arch_id").loc[a0, "test_acc"] == pytest.approx(0.79)
    assert res.architectures.set_index("arch_id").loc[a0, "wall_s"] == pytest.approx(3.0)
    assert list(res.architectures["is_pareto_macs"]) == [True, False, False]  # only finished rows
    assert len(res.search_metrics) == 5 and res.search_metrics["trial_id"].unique().tolist() == ["t0"]

    text = write_report(out).read_text()
    assert plotly_divs(text) == ["pareto-macs", "pareto-params", "pareto-latency", "dynamics", "cells-0"]
    assert "running" in text and "pending" in text
    with pytest.raises(FileNotFoundError):
        load_run(out)  # the strict loader wants a finished run


def test_write_report_search_only_and_empty(tmp_path):
    out = tmp_path / "run"
    (out / "search" / "t0").mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    res = load_partial_run(out)
    assert res.architectures.empty and res.search_metrics.empty
    text = write_report(out).read_text()
    assert "No Pareto architecture yet" in text and "No architectures yet" in text
    lines = [json.dumps(r) for r in synthetic_metric_rows(("t0",), 8)]
    (out / "search" / "t0" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert "dynamics" in plotly_divs(write_report(out).read_text())


def test_build_report_html_without_folder(tmp_path):
    make_run_folder(tmp_path / "run")
    text = build_report_html(load_run(tmp_path / "run"))  # no folder: cell diagrams say so
    assert "genotype file missing" in text


def test_cli_writes_report_when_run_as_script(tmp_path):
    make_run_folder(tmp_path / "run", n=3)
    proc = subprocess.run([sys.executable, str(REPO / "pipeline" / "report.py"), str(tmp_path / "run")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "run" / "report.html")
    assert (tmp_path / "run" / "report.html").stat().st_size > 1_000_000


def test_cli_bad_folders(tmp_path, capsys):
    from pipeline import report

    assert hasattr(report, "write_report")  # the hook pipeline/describe.py calls
    for bad in (tmp_path / "missing", tmp_path):
        assert report.main([str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        report.main([])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "architectures.parquet").write_text("not parquet")
    assert report.main([str(tmp_path / "run")]) == 2
    assert "cannot read the run" in capsys.readouterr().err


def test_config_summary_names_the_teacher_that_is_used():
    from dnad.report import config_summary

    def kd(teacher: dict) -> str:
        cfg = {"search": {"distill": {"enabled": True, "temperature": 4.0, "teacher": teacher}}}
        return next(line for line in config_summary(cfg).splitlines() if line.startswith("search"))

    genotype = {
        "kind": "genotype",
        "arch": "resnet18",
        "genotype": "/x/configs/teachers/darts_v2_5cells.json",
    }
    assert "KD T=4.0 from genotype:darts_v2_5cells.json" in kd(genotype)  # not the unused arch default
    assert "from torchvision:resnet34" in kd({"kind": "torchvision", "arch": "resnet34", "genotype": None})
    assert "from checkpoint:t1" in kd({"kind": "checkpoint", "arch": "resnet18", "checkpoint": "/c/t1"})
