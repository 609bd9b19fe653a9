"""How long the report takes to draw: the cell diagram of a genotype and a whole run's report.html.

    python benchmarks/report_speed.py [--genotype benchmarks/genotypes/quick_densest.json] [--repeats 3]
                                      [--run OUTPUT]

The report is rewritten on the driver each time a retraining trial finishes, while other trials train
on the same cores, and it draws one cell diagram per architecture. `dnad.figures.cell_figure` collects
its arcs and sets them on the figure once; the baseline builds the same figure the plain plotly way,
one `fig.add_shape` call per arc (each call validates and copies the layout's shape tuple, so the cost
grows with the square of the arcs). Both run alternately in this process on the same genotype and the
script prints the medians and `ratio_vs_add_shape`. With `--run`, it also times `write_report` on a copy
of a finished run folder (without its `ray/` and `models/` folders, which the report does not read).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import plotly.graph_objects as go

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dnad.figures import cell_figure  # noqa: E402
from dnad.genotype import Genotype  # noqa: E402


def one_by_one(genotype: Genotype) -> go.Figure:
    """The same figure with its shapes added one `add_shape` call at a time (the baseline)."""
    fig = cell_figure(genotype)
    shapes = [s.to_plotly_json() for s in fig.layout.shapes]
    fig.layout.shapes = ()
    for s in shapes:
        fig.add_shape(**s)
    return fig


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genotype", default=str(REPO / "benchmarks/genotypes/quick_densest.json"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--run", help="a finished run folder: also time write_report on a copy of it")
    a = ap.parse_args(argv)
    g = Genotype.load(a.genotype)
    cell_figure(g)  # plotly's lazy imports and validators, outside the timing
    ours, base = [], []
    for _ in range(a.repeats):
        t, fig = timed(cell_figure, g)
        ours.append(t)
        t, ref = timed(one_by_one, g)
        base.append(t)
    assert fig.to_plotly_json() == ref.to_plotly_json(), "the two figures differ"
    o, b = statistics.median(ours), statistics.median(base)
    print(f"cell_figure {Path(a.genotype).name}: {g.num_pairs} pairs, {len(fig.layout.shapes)} shapes")
    print(f"  dnad {o:.3f} s   add_shape one by one {b:.3f} s   ratio_vs_add_shape {b / o:.1f}x "
          f"(median of {a.repeats}, alternating)")  # fmt: skip
    if a.run:
        from dnad.report import write_report

        tmp = Path(tempfile.mkdtemp()) / "run"
        shutil.copytree(a.run, tmp, ignore=shutil.ignore_patterns("ray", "models"))
        write_report(tmp)  # warm
        t, _ = timed(write_report, tmp)
        print(f"write_report {a.run}: {t:.2f} s")
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
