"""Test hook: faults injected into search workers and retrain trials, driven by the env var DNAD_FAULTS.

DNAD_FAULTS holds a JSON list of fault specs; unset (the normal case) nothing is wrapped and nothing
costs anything. `pipeline/raytools.start_ray` forwards the variable to every Ray worker.

    [{"stage": "search", "target": "t00", "at": 12, "once": "/tmp/f1"},
     {"stage": "retrain", "target": "4e0a0129dc0fdd76", "at": 1},
     {"stage": "search", "target": "t01", "at": 20, "action": "nan"}]

stage   "search": `at` is the search step about to run; "retrain": the (0-based) epoch about to run
target  the sweep trial id (search) or architecture id (retrain); "*" = every one
action  "raise" (default): RuntimeError("injected fault ..."); "nan": from step `at` on, the search
        batches are all NaN (exercises the divergence guard: DivergenceError after max_nonfinite steps)
once    a marker file: the fault fires only while the marker does not exist and creates it (O_EXCL),
        so the retry passes; without it the fault fires on every attempt
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

ENV = "DNAD_FAULTS"
STAGES = ("search", "retrain")
ACTIONS = ("raise", "nan")


@dataclass(frozen=True)
class Fault:
    stage: str
    target: str
    at: int
    action: str = "raise"
    once: str | None = None

    def hits(self, at: int) -> bool:
        if self.action == "nan":
            return at >= self.at
        if at != self.at:
            return False
        return self.once is None or _claim(self.once)


def _claim(marker: str) -> bool:
    """True the first time only (across processes and attempts): creates `marker` exclusively."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    return True


def parse(text: str) -> list[Fault]:
    """The faults of a DNAD_FAULTS value; ValueError naming the variable when it is malformed."""
    try:
        specs = json.loads(text)
        faults = [Fault(**s) for s in (specs if isinstance(specs, list) else [specs])]
    except (ValueError, TypeError) as e:
        raise ValueError(f"{ENV}: expected a JSON list of fault specs ({e})") from None
    for f in faults:
        if f.stage not in STAGES or f.action not in ACTIONS:
            raise ValueError(f"{ENV}: stage must be one of {STAGES} and action one of {ACTIONS}: {f}")
    return faults


def active(stage: str, target: str) -> list[Fault]:
    """The faults of DNAD_FAULTS that apply to `stage` / `target` (none when the variable is unset)."""
    text = os.environ.get(ENV)
    if not text:
        return []
    return [f for f in parse(text) if f.stage == stage and f.target in ("*", target)]


def _raise(f: Fault, at: int) -> None:
    unit = "step" if f.stage == "search" else "epoch"
    raise RuntimeError(f"injected fault: {f.stage} {f.target} at {unit} {at} ({ENV})")


def install_search_faults(loop: Any, trial_id: str) -> None:
    """Wrap a SearchLoop's `train_step` so the faults for `trial_id` fire at their steps."""
    faults = active("search", trial_id)
    if not faults:
        return
    inner = loop.train_step

    def train_step(x: Any, y: Any) -> dict[str, Any]:
        for f in faults:
            if f.hits(loop.step):
                if f.action == "nan":
                    x = x * float("nan")
                else:
                    _raise(f, loop.step)
        return inner(x, y)

    loop.train_step = train_step


def install_retrain_faults(loop: Any, arch_id: str) -> None:
    """Wrap a RetrainLoop's `run_epoch` so the faults for `arch_id` fire before their epochs."""
    faults = [f for f in active("retrain", arch_id) if f.action == "raise"]
    if not faults:
        return
    inner = loop.run_epoch

    def run_epoch() -> dict[str, Any]:
        for f in faults:
            if f.hits(loop.epoch):
                _raise(f, loop.epoch)
        return inner()

    loop.run_epoch = run_epoch
