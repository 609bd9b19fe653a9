"""Is a run's front a trade-off or flat? The accuracy-vs-MACs trend of its retrained architectures.

    python benchmarks/front_trend.py RUN_DIR [RUN_DIR ...] [--by strategy|trial_id]

For each run folder (and each group of `--by`, e.g. the strategies of a `benchmarks/quality.py` run):
validation-accuracy points per doubling of MACs (least squares over the architectures, the mean over
repeats where there are several), their correlation, the MACs span, the best-worst spread and, with
`retrain.repeats` >= 2, the sd of one retraining's validation accuracy pooled over the repeats
(`dnad.results.front_trend`). Prints one JSON line per run/group.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dnad.results import front_trend, load_run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders (OUTPUT of pipeline/run.py)")
    ap.add_argument("--by", choices=["strategy", "trial_id"], help="one line per group of this column")
    a = ap.parse_args(argv)
    for run in a.runs:
        archs = load_run(run).architectures
        groups = archs.groupby(a.by, sort=True) if a.by else [("all", archs)]
        for key, g in groups:
            t = front_trend(g)
            row = {"run": run, "group": key, **(asdict(t) if t else {"architectures": len(g), "trend": None})}
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
