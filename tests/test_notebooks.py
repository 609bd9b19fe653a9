"""The notebooks: papermill-style `parameters` cell, and they run top to bottom on a real run folder."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_figures import make_run_folder

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("pareto_report.ipynb", "search_dynamics.ipynb")
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    return next(c for c in nb.cells if c.cell_type == "code")


def execute(name: str, run_dir: Path) -> nbformat.NotebookNode:
    """Run notebook `name` with `run_dir` injected into its parameters cell, cwd = notebooks/."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    parameters_cell(nb).source = f"run_dir = {json.dumps(str(run_dir))}"
    client = NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    return nb


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def plotly_figures(nb: nbformat.NotebookNode) -> list[dict]:
    return [o["data"][PLOTLY_MIME] for o in outputs(nb) if PLOTLY_MIME in o.get("data", {})]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_structure(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    first = parameters_cell(nb)
    assert "parameters" in first.metadata.get("tags", [])
    assert first.source.startswith('run_dir = "../runs/quick"')
    assert nb.metadata.kernelspec.name == "python3"
    assert not outputs(nb), "notebooks are stored without outputs"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "dnad.results import" in code and "load_run" in code and "dnad.figures import" in code


def check_pareto_report(nb: nbformat.NotebookNode) -> None:
    figs = plotly_figures(nb)
    titles = [f["layout"]["title"]["text"] for f in figs]
    assert titles[:3] == [
        "Validation error vs MACs",
        "Validation error vs parameters",
        "Validation error vs latency",
    ]
    assert any(t.startswith("Cells of ") for t in titles[3:])
    assert any("results" in o.get("data", {}).get("text/html", "") for o in outputs(nb))


def check_search_dynamics(nb: nbformat.NotebookNode) -> None:
    figs = plotly_figures(nb)
    assert len(figs) == 1 and figs[0]["layout"]["title"]["text"].startswith("Search dynamics")
    assert len(figs[0]["data"]) > 0


CHECKS = {"pareto_report.ipynb": check_pareto_report, "search_dynamics.ipynb": check_search_dynamics}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_on_smoke_run(name, smoke_run):
    CHECKS[name](execute(name, smoke_run))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_on_synthetic_run(name, tmp_path):
    make_run_folder(tmp_path / "run")
    CHECKS[name](execute(name, tmp_path / "run"))
