"""Does the search find better architectures? DNAD vs SNPS vs DARTS vs random search, with confidence.

    python benchmarks/quality.py [--profile quick] [--strategies dnad snps darts random] [--seeds 3]
        [--repeats 2] [--out DIR] [--analyse-only] [key=value ...]

A thin driver: one `pipeline/run.py` run sweeps `search.strategy` × `--seeds` search seeds
(`sweep.strategy`, `sweep.num_samples`) and retrains every emitted architecture `--repeats` times
(`retrain.repeats`) with the profile's one recipe; the same command again resumes that run (the
pipeline's own resume). Then, from the run's tables (`dnad.quality`): per strategy the mean
hypervolume of its searches' fronts in (validation error, log10 MACs) and a 95 % bootstrap interval
over search seeds and retraining repeats, and the paired differences DNAD − SNPS, DNAD − random and
DNAD − DARTS. Writes to --out (default benchmarks/results/quality-<profile>): `run/` (the pipeline's
run folder), `quality.md` (tables, command, machine, date), `quality.csv` (per search), `quality.html`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dnad.quality import HV_REF, compare, searches  # noqa: E402
from pipeline.config import sweep_points  # noqa: E402
from pipeline.models import run_config  # noqa: E402
from pipeline.stream import search_ended  # noqa: E402

PAIRS = [("dnad", "snps"), ("dnad", "random"), ("dnad", "darts")]


def pipeline_command(a: argparse.Namespace) -> list[str]:
    """The one pipeline run: strategies × seeds, every architecture retrained `repeats` times."""
    return [sys.executable, str(REPO / "pipeline/run.py"), "--profile", a.profile, "--output", str(Path(a.out) / "run"),
            f"sweep.strategy=[{','.join(a.strategies)}]", f"sweep.num_samples={a.seeds}",
            f"search.seed={a.first_seed}", f"retrain.repeats={a.repeats}", "deploy.onnx=false", *a.overrides]  # fmt: skip


def analyse(out: Path, command: str, n_boot: int) -> dict:
    run = out / "run"
    archs = pd.read_parquet(run / "architectures.parquet")
    if (run / "retrained.parquet").is_file():
        retrained = pd.read_parquet(run / "retrained.parquet")
    else:  # the run is still going (or was stopped): what its trials have recorded so far
        from dnad.results import retrain_results

        retrained = retrain_results(run, list(archs["arch_id"]), run_config(run).retrain.repeats)
    em = pd.read_csv(run / "emissions.csv")
    cfg = run_config(run)
    planned = [p | {"strategy": p.get("strategy", cfg.search.strategy)} for p in sweep_points(cfg)]
    ended = {p["trial_id"] for p in planned if search_ended(run, p["trial_id"])}
    # a search counts once it is complete: ended, and every architecture it emitted retrained
    # `repeats` times (ok or failed; one that emitted nothing has an empty front). Of a stopped run,
    # the others are left out until it is resumed, rather than scored on part of their front.
    repeats = cfg.retrain.repeats
    finished = retrained[retrained["status"].isin(["ok", "failed"])].groupby("arch_id").size()
    emitted_by = em.groupby("trial_id")["arch_id"].unique().to_dict()
    complete = [
        p for p in planned
        if p["trial_id"] in ended and all(finished.get(x, 0) >= repeats for x in emitted_by.get(p["trial_id"], []))
    ]  # fmt: skip
    # compared: the seeds whose searches are complete for every strategy (differences are paired by seed)
    done = {p["trial_id"] for p in complete}
    seeds = sorted({p["seed"] for p in planned})
    paired = [x for x in seeds if all(p["trial_id"] in done for p in planned if p["seed"] == x)]
    compared = [p for p in planned if p["seed"] in paired]
    res = compare(searches(archs, retrained, compared), PAIRS, n_boot=n_boot) if compared else {
        "methods": {}, "differences": {}, "n_boot": n_boot, "ref": HV_REF}  # fmt: skip
    # how much of the run the figures rest on: a stopped run is analysed on what it has finished
    emitted = em.groupby("trial_id")["arch_id"].nunique().to_dict()
    ok = int((retrained["status"] == "ok").sum()) if len(retrained) else 0
    wanted = len(archs) * repeats
    partial = len(complete) < len(planned)

    def state(tid: str) -> str:
        return ("compared" if any(p["trial_id"] == tid for p in compared) else "complete" if tid in done
                else "retraining" if tid in ended else "searching or not started")  # fmt: skip

    every = searches(archs, retrained, planned)
    rows = [{"trial_id": s.trial_id, "strategy": s.strategy, "seed": s.seed, "state": state(s.trial_id),
             "emitted": int(emitted.get(s.trial_id, 0)), "architectures": len(s.arch_ids),
             "hypervolume": s.hv(), "best_val_acc": 1 - float(pd.Series(s.errors.mean(axis=1)).min())
             if len(s.arch_ids) else float("nan")} for s in every]  # fmt: skip
    per = pd.DataFrame(rows).sort_values(["strategy", "seed"])
    per.to_csv(out / "quality.csv", index=False)
    uid = json.dumps(json.loads((run / "run.json").read_text()))
    coverage = (f"{len(complete)} of {len(planned)} searches complete ({len(ended)} ended), compared on seed(s) "
                f"{', '.join(map(str, paired)) or 'none yet'}; {ok} of {wanted} retrainings ({len(archs)} "
                f"architectures × {repeats}) finished")  # fmt: skip
    lines = [
        f"# Search strategies compared: {run.name} of `{command}`", "",
        *([f"**PARTIAL**: {coverage}. The comparison uses only the seeds complete for every strategy; "
           "the same command resumes the run.", ""] if partial else [f"- complete: {coverage}"]),
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; run {uid}",
        f"- machine: {_machine()}, no GPU used",
        f"- hypervolume of each search's front in (validation error, log10 MACs) up to {HV_REF} (larger is "
        f"better); 95 % intervals from {n_boot} bootstrap replicates over search seeds and retraining repeats",
        "", "## Per strategy", "", "| strategy | searches | mean hypervolume | 95 % interval |", "|---|---|---|---|",
        *[f"| {m} | {v['seeds']} | {v['hv']:.4f} | [{v['lo']:.4f}, {v['hi']:.4f}] |" for m, v in sorted(res["methods"].items())],
        "", "## Paired differences (same seed index)", "",
        "| difference | mean | 95 % interval | share of replicates > 0 |", "|---|---|---|---|",
        *[f"| {k} | {v['diff']:+.4f} | [{v['lo']:+.4f}, {v['hi']:+.4f}] | {100 * v['p_gt_0']:.0f} % |"
          for k, v in res["differences"].items()],
        "", "## Per search", "",
        "| trial | strategy | seed | state | emitted | retrained | hypervolume (so far) | best val acc (mean over repeats) |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {r.trial_id} | {r.strategy} | {r.seed} | {r.state} | {r.emitted} | {r.architectures} | {r.hypervolume:.4f} | {100 * r.best_val_acc:.2f} % |"
          for r in per.itertuples()],
    ]  # fmt: skip
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    _figure(archs, every, out / "quality.html")
    return res


def _machine() -> str:
    """CPU count and model (from /proc/cpuinfo where there is one) and the torch/Ray versions."""
    from importlib.metadata import version

    model = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), torch {version('torch')}, ray {version('ray')}"


def _figure(archs: pd.DataFrame, found: list, path: Path) -> None:
    import numpy as np
    import plotly.graph_objects as go

    fig = go.Figure()
    for s in found:
        err = np.nanmean(s.errors, axis=1) if len(s.arch_ids) else np.array([])
        fig.add_trace(go.Scatter(x=10**s.log_macs, y=100 * err, mode="markers", name=f"{s.strategy} s{s.seed}",
                                 text=list(s.arch_ids)))  # fmt: skip
    fig.update_layout(title="Validation error (mean over repeats) vs MACs, per search", xaxis_title="MACs",
                      yaxis_title="validation error (%)", template="plotly_white")  # fmt: skip
    fig.update_xaxes(type="log")
    fig.write_html(path, include_plotlyjs=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--strategies", nargs="+", default=["dnad", "snps", "darts", "random"])
    ap.add_argument("--seeds", type=int, default=3, help="search seeds per strategy")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="retrainings per architecture")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap replicates")
    ap.add_argument("--out", help="output folder (default benchmarks/results/quality-<profile>)")
    ap.add_argument("--analyse-only", action="store_true", help="only read the run folder (--out/run)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    a = ap.parse_intermixed_args(argv)
    a.out = a.out or str(REPO / "benchmarks" / "results" / f"quality-{a.profile}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    cmd = pipeline_command(a)
    shown = "python benchmarks/quality.py " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])
    )
    command_file = Path(a.out) / "command.txt"  # the command that drives the run (and resumes it)
    if a.analyse_only:
        shown = command_file.read_text().strip() if command_file.is_file() else shown
    else:
        command_file.write_text(shown + "\n")
        with open(Path(a.out) / "pipeline.log", "a") as log:
            proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )

            def relay() -> None:  # flushed line by line: the log of a run of hours is read live
                for line in proc.stdout:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                    log.write(line)
                    log.flush()

            try:
                relay()
            except KeyboardInterrupt:  # Ctrl-C reached the pipeline too: let it stop and keep its work
                print("[quality] stopping: the pipeline keeps what it has finished", file=sys.stderr)
                relay()
                proc.wait()
                print("[quality] stopped; the same command resumes the run", file=sys.stderr)
                return 130
            if proc.wait() != 0:
                print(f"error: the pipeline run failed (exit {proc.returncode}); the same command resumes it",
                      file=sys.stderr)  # fmt: skip
                return proc.returncode
    res = analyse(Path(a.out), shown, a.boot)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
