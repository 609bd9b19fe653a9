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
from dnad.results import read_jsonl, skip_reason

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
        folder: Path | list[Path],
        units: Callable[[Row], tuple[str, int]],
        describe: Callable[[Row], str] = lambda r: "",
        stream: TextIO | None = None,
        interval: float = 1.0,
        scale: int = 1,
    ):
        """`scale` > 1: units count 1/scale of a displayed unit (e.g. thousandths of an epoch)."""
        self.stage, self.total = stage, max(total, 1)
        self.folders = [Path(f) for f in (folder if isinstance(folder, list | tuple) else [folder])]
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

    def files(self) -> list[Path]:
        return [f for d in self.folders if d.is_dir() for f in sorted(d.rglob("*.jsonl"))]

    def event(self, row: Row) -> str | None:
        """A line to show at once for a row (a stage's own decision); None for ordinary rows."""
        if "note" in row:
            who = f"{row['trial_id']}: " if "trial_id" in row else ""
            return f"[{self.stage}] {who}{row['note']}"
        return None

    def poll(self) -> None:
        for f in self.files():
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
                said = self.event(row) if isinstance(row, dict) else None
                if said is not None:  # a decision or an event of the stage: shown as it comes
                    if said:
                        self._notes.append(said)
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


class Board(Progress):
    """The searches and the retraining trials of `pipeline.stream` on one line, with one ETA; as they
    happen: each emission, each search's end and each trial's result, on lines of their own."""

    def __init__(
        self,
        out: Path,
        search_steps: int,
        epochs_per_trial: int,
        known_trials: Callable[[], int],
        searches: list[str],
        stream: TextIO | None = None,
        interval: float = 1.0,
    ):
        out = Path(out)
        super().__init__(
            "run", 1, [out / "search", out / "retrain"], self._units, describe_any, stream, interval
        )
        self.out, self.search_steps, self.epochs_per_trial = (
            out,
            max(search_steps, 1),
            max(epochs_per_trial, 1),
        )
        self.nothing_to_search = search_steps <= 0  # every search had ended before this run began
        self.known_trials, self.searches = known_trials, searches
        self.seen_results: set[Path] = set()
        self.emitted = 0
        self.archs: set[str] = set()
        self.first: dict[str, int] | None = None  # work restored from an earlier run: not in the rates
        self.t0_wall = time.time()
        self.r_t0: float | None = None  # when this run's retraining began (Unix time; see retrain_elapsed)

    @staticmethod
    def _units(r: Row) -> tuple[str, int]:
        if "loss" in r and "step" in r:  # a search's metrics row
            return f"s:{r['trial_id']}", int(r["step"])
        if "arch_id" in r and ("epoch" in r or "progress" in r):  # a retraining trial's row
            key = f"r:{r['arch_id']}:{r.get('repeat', 0)}"
            return key, int(EPOCH_SCALE * float(r["progress"])) if "progress" in r else EPOCH_SCALE * int(
                r["epoch"]
            )
        raise KeyError("not a progress row")

    def event(self, row: Row) -> str | None:
        if "genotype" in row and "index" in row:  # an emission, published as it happened
            self.emitted += 1
            if row["arch_id"] in self.archs:
                return ""  # the same architecture again: nothing new to say
            self.archs.add(row["arch_id"])
            what = f"{row['alive_pairs']} pairs, {float(row['macs']) / 1e6:.2f} MMACs at search width"
            return f"[search] {row['trial_id']} emitted {row['arch_id']} ({what})"
        if "note" in row:
            return f"[search] {row.get('trial_id', '')}: {row['note']}"
        return super().event(row)

    def poll(self) -> None:
        super().poll()
        for f in (
            sorted(self.out.glob("search/*/result.json"))
            + sorted(self.out.glob("retrain/*.result.json"))
            + sorted(self.out.glob("retrain/*.skipped.json"))
        ):
            if f in self.seen_results:
                continue
            self.seen_results.add(f)
            try:
                r = json.loads(f.read_text())
            except (OSError, ValueError):
                self.seen_results.discard(f)
                continue
            if f.name.endswith(".skipped.json"):
                arch = f.name.removesuffix(".skipped.json")
                self._notes.append(f"[retrain] {arch} not retrained: {skip_reason(r)} (retrain.min_macs_gap)")
            elif f.name == "result.json":
                tid = f.parent.name
                self._notes.append(
                    f"[search] {tid} failed: {r['error']}" if r.get("error") else f"[search] {tid} finished"
                )
            elif r.get("status") == "ok":
                key = f.name.removesuffix(".result.json")
                self._notes.append(f"[retrain] {key} finished: val acc {100 * r['val_acc']:.2f}%, test acc "
                                   f"{100 * r['test_acc']:.2f}% ({fmt_duration(r.get('wall_s', 0))})")  # fmt: skip
            else:
                self._notes.append(
                    f"[retrain] {f.name.removesuffix('.result.json')} failed: {r.get('error')}"
                )

    def retrain_elapsed(self) -> float:
        """Seconds since this run's first retraining trial started (its `retrain/<key>.started` marker;
        a marker left by an earlier run counts from this run's start). The retraining rate is taken over
        this time, not over the whole run: the minutes of searching before the first trial say nothing
        about how fast trials finish (they made the first ETA of a staged run several times too long)."""
        if self.r_t0 is None:
            starts = [float(r["started_at"]) for f in self.out.glob("retrain/*.started")
                      for r in read_jsonl(f)[:1] if "started_at" in r]  # fmt: skip
            if starts:
                self.r_t0 = max(min(starts), self.t0_wall)
        return 0.0 if self.r_t0 is None else max(time.time() - self.r_t0, 0.0)

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        s_done = {k: v for k, v in self.done.items() if k.startswith("s:")}
        r_done = {k: v for k, v in self.done.items() if k.startswith("r:")}
        if self.first is None:
            self.first = dict(self.done)
        restored_s = sum(v for k, v in self.first.items() if k.startswith("s:"))
        restored_r = sum(v for k, v in self.first.items() if k.startswith("r:"))
        ended = sum((self.out / "search" / t / "result.json").is_file() for t in self.searches)
        searching = ended < len(self.searches)
        steps = min(sum(s_done.values()), self.search_steps)
        new_steps = steps - restored_s
        s_left = (
            0.0
            if not searching
            else (self.search_steps - steps) * elapsed / new_steps
            if new_steps > 0
            else None
        )
        results = [f for f in self.seen_results if f.name.endswith(".result.json")]
        total = self.known_trials() * self.epochs_per_trial * EPOCH_SCALE
        r_units = min(sum(r_done.values()), total) if total else 0
        r_new = r_units - restored_r
        r_elapsed = self.retrain_elapsed() or elapsed
        r_left = (total - r_units) * r_elapsed / r_new if r_new > 0 else (None if total > r_units else 0.0)
        running = sum(1 for k, v in r_done.items() if v > 0) - len(results)
        if searching and s_left is not None and r_left is None:
            left = s_left  # queued trials have no rate yet: at least the search's time is left
        else:
            left = None if s_left is None or r_left is None else max(s_left, r_left)
        eta = "?" if left is None else fmt_duration(left) + ("+" if searching else "")
        search = (
            f"search: all {len(self.searches)} ended earlier"
            if self.nothing_to_search and not searching
            else f"search {steps}/{self.search_steps} steps ({ended}/{len(self.searches)} ended)"
        )
        retrain = (f"retrain {r_units / EPOCH_SCALE:.1f}/{total / EPOCH_SCALE:g} epochs "
                   f"({max(running, 0)} running, {len(results)} done)")  # fmt: skip
        extra = self.describe(self.last) if self.last else ""
        return f"[run] {search} · {retrain} · {fmt_duration(elapsed)} elapsed, ETA {eta}  {extra}"


def describe_any(r: Row) -> str:
    """The last row of the run, whichever kind: a search's or a retraining trial's."""
    if "loss" in r:
        return (f"{r['trial_id']} epoch {r['epoch']} S={r['S']:.1f} pairs={r['alive_pairs']} "
                f"loss={r['loss']:.3f} {r['img_per_s']:.0f} img/s")  # fmt: skip
    key = r["arch_id"] + (f"-r{r['repeat']}" if r.get("repeat") else "")
    return f"{key} {describe_epoch_row(r)}"


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
