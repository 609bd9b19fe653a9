"""What every command line of dnad shares: an argparse parser whose errors are one line + exit code 2,
and the way a script run as `python pipeline/<name>.py` finds the repo's packages."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def fail(e: Exception) -> int:
    """Print a `dnad.errors.InputError` (or any one-line error) as `error: ...` and return exit code 2."""
    sys.stderr.write(f"error: {e}\n")
    return 2
