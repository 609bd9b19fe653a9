"""Write (or rewrite) the HTML report of a run folder, finished or still running.

    python pipeline/report.py OUTPUT [--out PATH]

Writes OUTPUT/report.html (one self-contained file, opens offline) and prints its path.
Bad input (no such folder, not a run folder): one line `error: ...` on stderr, exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repo root replaces pipeline/ on the path, so that
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # pipeline/profile.py hides no stdlib module

from dnad.errors import InputError
from dnad.report import write_report
from pipeline.cli import Parser

__all__ = ["main", "write_report"]


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="pipeline/report.py", description="Write OUTPUT/report.html for a DNAD run folder.")
    p.add_argument("output", metavar="OUTPUT", help="the run's output folder (pipeline/run.py --output)")
    p.add_argument("--out", help="write the report here instead of OUTPUT/report.html")
    args = p.parse_args(argv)
    try:
        path = write_report(args.output, args.out)
    except InputError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
