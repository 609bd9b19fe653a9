"""Staged vs streaming retraining on one machine: time to the first retrained model, total time, idle slots.

    python benchmarks/stream_speed.py [--profile quick] [--out DIR] [key=value ...]

Runs the same config twice through `pipeline/run.py`, `retrain.start=after_search` (staged) and
`retrain.start=at_emission` (streaming), on a local Ray of `ray.num_cpus` CPUs (default: the cores
here) where a search holds `ray.cpus_per_worker` (default 1), so that a slot is left for retraining
while the search runs. The teacher is trained by the first run and cached for the second. Prints, per
mode: the time from the start of the search/retrain phase to the first finished model, its total
time, and the share of Ray's CPU slot-time that stayed idle during it (busy = each search's workers ×
its duration + each trial's CPUs × its duration).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def phase_start(out: Path) -> float:
    """When the search/retrain phase began: the first search worker's registration."""
    return min(f.stat().st_mtime for f in out.glob("search/*/workers.jsonl"))


def measure(out: Path, cpus: int, cpus_per_search: int, cpus_per_trial: int) -> dict[str, float]:
    archs = pd.read_parquet(out / "architectures.parquet")
    runs = pd.read_parquet(out / "retrained.parquet")
    searches = [json.loads(f.read_text()) for f in sorted(out.glob("search/*/result.json"))]
    t0 = min(phase_start(out), runs["retrain_started_at"].min())
    end = max(runs["retrain_finished_at"].max(), max(s["finished_at"] for s in searches))
    search_busy = sum(cpus_per_search * (s["finished_at"] - t0) for s in searches)
    trial_busy = float((cpus_per_trial * (runs["retrain_finished_at"] - runs["retrain_started_at"])).sum())
    wall = end - t0
    return {
        "first_model_s": float(runs["retrain_finished_at"].min() - t0),
        "phase_s": wall,
        "idle_fraction": 1.0 - (search_busy + trial_busy) / (cpus * wall),
        "architectures": len(archs),
        "best_val_acc": float(archs["val_acc"].max()),
        "best_test_acc": float(archs.loc[archs["val_acc"].idxmax(), "test_acc"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tmp" / "stream"))
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cpus-per-search", type=int, default=1)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    a = ap.parse_intermixed_args()
    rows = {}
    for mode in ("after_search", "at_emission"):
        out = Path(a.out) / mode
        cmd = [sys.executable, str(REPO / "pipeline/run.py"), "--profile", a.profile, "--output", str(out), "--fresh",
               f"ray.num_cpus={a.cpus}", f"ray.cpus_per_worker={a.cpus_per_search}", f"retrain.start={mode}",
               *a.overrides]  # fmt: skip
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        rows[mode] = measure(out, a.cpus, a.cpus_per_search, 1) | {"command_s": time.monotonic() - t0}
        print(json.dumps({"mode": mode, **rows[mode]}), flush=True)
    s, t = rows["after_search"], rows["at_emission"]
    print(f"\n{dt.date.today()}, {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
          f"{a.cpus} Ray CPUs, a search on {a.cpus_per_search}")  # fmt: skip
    print(f"{'':28}{'staged':>12}{'streaming':>12}")
    for k, label in (("first_model_s", "first retrained model (s)"), ("phase_s", "search + retrain (s)"),
                     ("idle_fraction", "idle CPU slot-time"), ("architectures", "architectures"),
                     ("best_val_acc", "best val acc")):  # fmt: skip
        f = "{:>12.2%}" if k in ("idle_fraction", "best_val_acc") else "{:>12.0f}"
        print(f"{label:28}" + f.format(s[k]) + f.format(t[k]))


if __name__ == "__main__":
    main()
