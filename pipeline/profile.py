"""Re-measure the latency of a run's models on this machine (the one that will serve them), then
rewrite the results table, its Pareto flags and the report. Nothing is retrained.

    python pipeline/profile.py OUTPUT [--arch ID ...] [--threads N] [--batch N] [--runs N]

Each model folder's latency (`model.json`) is replaced by this machine's: PyTorch eager and ONNX
Runtime (exported first where `model.onnx` is missing), batch 1 and `--batch`, the median of
`--runs` timed runs after a warm-up, at `--threads` threads (default: every core here).
Bad input: one line `error: ...` on stderr, exit code 2.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repo root replaces pipeline/ on the path, so that
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # pipeline/profile.py hides no stdlib module

from dnad.errors import InputError
from pipeline.cli import Parser, fail


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="pipeline/profile.py", description="Re-time a run's models on this machine.")
    p.add_argument("output", metavar="OUTPUT", help="the run's output folder")
    p.add_argument("--arch", nargs="+", metavar="ID", help="only these architecture ids")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads (default: all cores)")
    p.add_argument(
        "--batch", type=int, default=None, help="the batch size timed besides 1 (default: the run's)"
    )
    p.add_argument("--runs", type=int, default=None, help="timed runs per figure, >= 50 (default: the run's)")
    args = p.parse_args(argv)
    from pydantic import ValidationError

    from pipeline.export import select_models
    from pipeline.models import run_config

    try:
        folders = select_models(args.output, args.arch, pareto=False)
        if args.threads < 1:
            raise InputError("--threads", args.threads, "must be at least 1")
        deploy = run_config(args.output).deploy
        update = {
            k: v for k, v in (("latency_batch", args.batch), ("latency_runs", args.runs)) if v is not None
        }
        try:
            deploy = deploy.model_validate(deploy.model_dump() | update)
        except ValidationError as e:
            err = e.errors()[0]
            flag = {"latency_batch": "--batch", "latency_runs": "--runs"}[str(err["loc"][0])]
            raise InputError(flag, err.get("input"), err["msg"]) from None
    except InputError as e:
        return fail(e)
    from dnad.results import rebuild_architectures
    from pipeline.describe import publish
    from pipeline.models import reprofile

    out = Path(args.output)
    t0 = time.monotonic()
    for i, (arch_id, folder) in enumerate(folders.items(), 1):
        try:
            card = reprofile(folder, deploy, args.threads)
        except InputError as e:
            return fail(e)
        lat = card["latency"]
        onnx = lat["onnx_ms"].get("1")
        print(
            f"[profile] {i}/{len(folders)} {arch_id}: batch 1 {lat['torch_ms']['1']:.2f} ms PyTorch"
            + (f", {onnx:.2f} ms ONNX Runtime" if onnx is not None else "")
            + f" ({args.threads} thread(s))"
        )
    print(publish(out, rebuild_architectures(out)))
    print(f"done in {time.monotonic() - t0:.0f} s; latency measured on {card['latency']['torch_device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
