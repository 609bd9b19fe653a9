"""Finite checks shared by the search and retrain loops (spec: a bad step is skipped, K in a row abort)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from dnad.errors import DivergenceError

log = logging.getLogger(__name__)


def all_finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class NonFiniteGuard:
    """Counts consecutive non-finite steps; raises DivergenceError at `limit`.

    Owns `state_dict()` so a resumed run does not retry forever from the same diverging state.
    """

    def __init__(self, stage: str, limit: int):
        self.stage, self.limit = stage, limit
        self.consecutive = 0
        self.skipped_total = 0

    def check(self, step: int, ok: bool, what: str) -> bool:
        """Record one step. Returns `ok`; raises once `limit` bad steps happened in a row."""
        if ok:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped_total += 1
        log.warning(
            "%s: non-finite %s at step %d; step skipped (%d in a row)",
            self.stage,
            what,
            step,
            self.consecutive,
        )
        if self.consecutive >= self.limit:
            raise DivergenceError(self.stage, step, self.consecutive, what)
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "skipped_total": self.skipped_total}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.consecutive, self.skipped_total = int(d["consecutive"]), int(d["skipped_total"])


class BatchNormStats:
    """The running statistics of every BatchNorm in a module, saved before a step and put back when the
    step is skipped: a non-finite forward pass would otherwise leave NaN running means behind (the
    weights are untouched, but evaluation and every later step read those buffers)."""

    def __init__(self, module: nn.Module):
        self.buffers = [
            b
            for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)
            if b is not None
        ]
        self.saved = [torch.empty_like(b) for b in self.buffers]

    @torch.no_grad()
    def save(self) -> None:
        for s, b in zip(self.saved, self.buffers):
            s.copy_(b)

    @torch.no_grad()
    def restore(self) -> None:
        for s, b in zip(self.saved, self.buffers):
            b.copy_(s)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
