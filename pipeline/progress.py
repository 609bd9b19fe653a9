"""A one-line progress display with an ETA, fed by the JSON-lines metric files the workers append.

The driver never talks to the workers for this: a background thread tails `*.jsonl` files under a
folder, so the display works the same for one search, a Tune sweep or many retrain trials.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from dnad.checkpoint import atomic_write_text

Row = dict[str, Any]


def fmt_duration(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Tails `folder/**/*.jsonl`; `units(row) -> (key, done)` says how much of the work a row shows."""

    def __init__(
        self,
        stage: str,
        total: int,
        folder: Path,
        units: Callable[[Row], tuple[str, int]],
        describe: Callable[[Row], str] = lambda r: "",
        stream: TextIO | None = None,
        interval: float = 1.0,
        scale: int = 1,
    ):
        """`scale` > 1: units count 1/scale of a displayed unit (e.g. thousandths of an epoch)."""
        self.stage, self.total, self.folder = stage, max(total, 1), Path(folder)
        self.scale = max(1, scale)
        self.units, self.describe = units, describe
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.interval = interval
        self.offsets: dict[Path, int] = {}
        self.done: dict[str, int] = {}
        self.start_done: int | None = None
        self.last: Row | None = None
        self.t0 = time.monotonic()
        self.last_print = 0.0
        self._printed_row: Row | None = None
        self.failure: str | None = None
        self.summary = ""  # appended to the `finished` line, e.g. " (1 of 6 trials failed)"
        self._notes: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Progress:
        self.stream.write(f"[{self.stage}] started\n")
        self.stream.flush()
        self._thread.start()
        return self

    def fail(self, reason: str) -> None:
        """Mark the stage failed (its work was caught and recorded, not raised): `failed`, not `finished`."""
        self.failure = reason

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.poll()
            self._print(force=True)
        except Exception:  # never let the display hide the stage's own outcome
            pass
        if self.tty:
            self.stream.write("\n")
        took = fmt_duration(time.monotonic() - self.t0)
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            self.failure = one_line(exc)
        if isinstance(exc, KeyboardInterrupt):
            self.stream.write(f"[{self.stage}] interrupted after {took}\n")
        elif self.failure is not None:
            self.stream.write(f"[{self.stage}] failed after {took}: {self.failure}\n")
        else:
            self.stream.write(f"[{self.stage}] finished in {took}{self.summary}\n")
        self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
                self._print()
            except Exception:  # never let the display kill the run
                pass

    def poll(self) -> None:
        for f in sorted(self.folder.rglob("*.jsonl")) if self.folder.is_dir() else []:
            pos = self.offsets.get(f, 0)
            if f.stat().st_size < pos:  # rewound by a resumed worker (`rewind_jsonl`): read it again
                pos = 0
            with open(f, "rb") as fh:
                fh.seek(pos)
                chunk = fh.read()
            end = chunk.rfind(b"\n") + 1  # only whole lines; a partial one is read next time
            self.offsets[f] = pos + end
            for line in chunk[:end].splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and "note" in row:  # a decision of the stage: shown as it comes
                    who = f"{row['trial_id']}: " if "trial_id" in row else ""
                    self._notes.append(f"[{self.stage}] {who}{row['note']}")
                    continue
                try:
                    key, n = self.units(row)
                except (KeyError, TypeError, ValueError):
                    continue  # another kind of row in the folder (e.g. search/<trial>/workers.jsonl)
                self.done[key] = max(self.done.get(key, 0), n)
                self.last = row
        if self.start_done is None:
            self.start_done = sum(self.done.values())  # work restored from an earlier run: not in the rate

    def line(self) -> str:
        done = min(sum(self.done.values()), self.total)
        elapsed = time.monotonic() - self.t0
        new = done - (self.start_done or 0)
        eta = "?" if new <= 0 else fmt_duration((self.total - done) * elapsed / new)
        extra = self.describe(self.last) if self.last else ""
        pct = 100.0 * done / self.total
        count = (
            f"{done}/{self.total}"
            if self.scale == 1
            else f"{done / self.scale:.1f}/{self.total / self.scale:g}"
        )
        return f"[{self.stage}] {count} ({pct:4.1f}%) {fmt_duration(elapsed)} elapsed, ETA {eta}  {extra}"

    def _print(self, force: bool = False) -> None:
        while self._notes:
            self.stream.write(("\r\033[K" if self.tty else "") + self._notes.pop(0) + "\n")
        now, line = time.monotonic(), self.line()
        if self.tty:
            self.stream.write("\r\033[K" + line)
        elif (force and self.last is not self._printed_row) or now - self.last_print >= 30.0:
            self.stream.write(line + "\n")  # not a terminal (a log file): a line every 30 s
        else:
            return
        self.last_print, self._printed_row = now, self.last
        self.stream.flush()


EPOCH_SCALE = 1000


def epoch_units(key: Callable[[Row], str]) -> Callable[[Row], tuple[str, int]]:
    """Progress units for a `RetrainLoop`'s rows, in thousandths of an epoch: an epoch record
    ({"epoch": e, ...}) counts e epochs, a within-epoch row ({"progress": 2.4, ...}) 2.4."""

    def units(r: Row) -> tuple[str, int]:
        if "progress" in r:
            return key(r), int(EPOCH_SCALE * float(r["progress"]))
        return key(r), EPOCH_SCALE * int(r["epoch"])

    return units


def describe_epoch_row(r: Row) -> str:
    """The validation (and, after the last epoch, test) accuracy of an evaluated epoch record, else the
    running train accuracy and speed."""

    def pct(key: str) -> float | None:
        v = r.get(key)
        return None if v is None or v != v else 100 * float(v)  # None or NaN: not evaluated

    val, test = pct("val_acc"), pct("test_acc")
    if val is not None:
        return f"epoch {r['epoch']} val acc {val:.2f}%" + (
            f", test acc {test:.2f}%" if test is not None else ""
        )
    where = f"epoch {r['epoch']}" if "epoch" in r else f"{float(r['progress']):.2f} epochs"
    return f"{where} train acc {100 * float(r['train_acc']):.1f}%  {float(r['img_per_s']):.0f} img/s"


def one_line(e: BaseException) -> str:
    """The last meaningful line of an error (Ray wraps worker tracebacks in several layers)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("(", "...", "Traceback", "File "))] or lines
    return (lines[-1] if lines else type(e).__name__)[:300]


def append_jsonl(path: Path, row: Row) -> None:
    """Append one JSON line (one write call, so concurrent readers see whole lines or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=float) + "\n")


def read_jsonl(path: Path) -> list[Row]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return rows


def rewind_jsonl(path: Path, keep: Callable[[Row], bool]) -> int:
    """Drop the rows that a resumed worker is about to write again (those past its checkpoint) and any
    line cut by a crash; atomic. Returns how many lines were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if line.endswith("\n") and keep(row):
            kept.append(line)
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(kept))
    return len(lines) - len(kept)
