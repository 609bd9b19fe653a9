"""Where a CPU training step's time goes, op by op: wall time inside each ATen op, forward and backward.

`OpTimer` is a `TorchDispatchMode`: every ATen op the step runs (the autograd engine's backward ops
included, as it runs them on the calling thread on the CPU) is timed with `perf_counter` around its
call, so the shares add up to the step (the rest is Python and autograd bookkeeping). Convolutions are
keyed by input and weight shape, groups and (backward) the grads computed, so e.g. the 5×5
depthwise backward of one map size is one row.

`torch.profiler` was misleading here: with `record_shapes` it put the forward convolutions of the
`quick` family's densest network at 1.7 ms per call, where this timer and oneDNN's own
`ONEDNN_VERBOSE` timings give 0.15-0.3 ms (2026-12-04, AMD EPYC VM, one thread). CPU only: on CUDA
an op's call returns before its kernel ran.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

CONVS = ("aten.convolution", "aten.convolution_backward")


def op_key(func: Any, args: tuple) -> str:
    """The row an op call is counted in: its name, and for convolutions the shapes that set its cost."""
    name = str(func.overloadpacket)
    backward = name.endswith("backward")
    if name not in CONVS or len(args) < (11 if backward else 9):
        return name
    x, w = (args[1], args[2]) if backward else (args[0], args[1])
    groups = args[9] if backward else args[8]
    kind = "dw " if groups > 1 and groups == x.shape[1] else ""  # depthwise
    k = "×".join(map(str, w.shape[2:]))
    grads = ""
    if backward:
        mask = args[-1]
        grads = " grad " + "+".join(n for n, m in zip(("input", "weight", "bias"), mask) if m)
    return f"{name} {kind}{k} {tuple(x.shape)}→{w.shape[0]}{grads}"


class OpTimer(TorchDispatchMode):
    """Accumulates seconds and calls per `op_key` while active (`with OpTimer() as t: ...`)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        key = op_key(func, args)
        self.seconds[key] += time.perf_counter() - t0
        self.calls[key] += 1
        return out

    def total(self) -> float:
        return sum(self.seconds.values())

    def table(self, steps: int, step_s: float | None = None, rows: int = 25) -> str:
        """The `rows` costliest rows per step; shares of `step_s` (seconds per step, measured without the
        timer) when given, else of the time inside ops."""
        base = step_s if step_s else self.total() / steps
        lines = [
            f"inside ATen ops: {1e3 * self.total() / steps:.1f} ms per step"
            + (f" of a {1e3 * step_s:.1f} ms step measured without the timer" if step_s else ""),
            f"{'share':>6} {'ms/step':>8} {'calls':>6} {'us/call':>8}  op",
        ]
        for key, s in sorted(self.seconds.items(), key=lambda kv: -kv[1])[:rows]:
            n = self.calls[key]
            lines.append(
                f"{100 * s / steps / base:5.1f}% {1e3 * s / steps:8.1f} {n / steps:6.0f} {1e6 * s / n:8.0f}  {key}"
            )
        return "\n".join(lines)
