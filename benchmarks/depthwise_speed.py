"""Forward+backward time of the super-network's depthwise convs: plain `nn.Conv2d` vs `dnad.fastops`.

Training step per case: input and weight both require grad, a fixed upstream grad is back-propagated.
Cases: batch 64, the three stages (C, spatial) = (16, 32), (32, 16), (64, 8), stride 1 and 2, and
(kernel, dilation) in (3, 1), (5, 1), (3, 2), (5, 2), i.e. every depthwise conv of the DARTS ops.
The variants run round-robin (so drift hits all alike); each reports the median over `--reps`.

    .venv/bin/python benchmarks/depthwise_speed.py                 # plain vs fast (the dispatch)
    .venv/bin/python benchmarks/depthwise_speed.py --all-impls     # every variant, to refill the table
    .venv/bin/python benchmarks/depthwise_speed.py --inference --batch 1 --threads 1
                                        # forward only, no grad (a deployed model; NATIVE_FORWARD_MACS)

Prints a table, then one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from dnad.fastops import IMPLS, DepthwiseConv2d

STAGES = ((16, 32), (32, 16), (64, 8))
KD = ((3, 1), (5, 1), (3, 2), (5, 2))


def _busy_cpu_s() -> float | None:
    """CPU-seconds the whole machine has been busy (Linux /proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def _timed(step: Callable[[], None], warmup: int, reps: int, max_wait_s: float = 600.0) -> list[float]:
    """`reps` times (ms) of `step` after `warmup` calls, skipping calls during which others ran.

    On a 2-core machine any other busy process makes 2-thread kernels wait on a descheduled peer
    (10-20x slower), so a call during which other processes used CPU is dropped and retried after a
    pause; after `max_wait_s` of that the noisy times are kept instead.
    """
    for _ in range(warmup):
        step()
    out: list[float] = []
    deadline = time.monotonic() + max_wait_s
    while len(out) < reps:
        busy0, own0, t0 = _busy_cpu_s(), time.process_time(), time.perf_counter()
        step()
        wall = time.perf_counter() - t0
        busy1 = _busy_cpu_s()
        if busy0 is not None and busy1 is not None and time.monotonic() < deadline:
            others = (busy1 - busy0) - (time.process_time() - own0)
            if others > max(0.015, 0.25 * wall):
                time.sleep(0.5)
                step()  # re-warm after the pause
                continue
        out.append(wall * 1e3)
    return out


def _step_fn(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, inference: bool) -> Callable[[], None]:
    def forward() -> None:
        with torch.inference_mode():
            module(x)

    def step() -> None:
        xi = x.detach().requires_grad_()
        module.weight.grad = None
        module(xi).backward(grad)

    return forward if inference else step


def bench_case(
    C: int,
    hw: int,
    k: int,
    d: int,
    s: int,
    variants: list[str],
    batch: int,
    reps: int,
    warmup: int,
    cl: bool,
    inference: bool = False,
) -> dict[str, float]:
    """Median ms per forward+backward (`inference`: per no-grad forward) for each variant ('plain',
    'fast' or a forced impl)."""
    torch.manual_seed(0)
    x = torch.randn(batch, C, hw, hw)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = nn.Conv2d(C, C, k, stride=s, padding=d * (k - 1) // 2, dilation=d, groups=C, bias=False)
    with torch.no_grad():
        grad = torch.randn_like(ref(x))
    steps: dict[str, Callable[[], None]] = {}
    for v in variants:
        if v == "plain":
            m: nn.Module = ref
        else:
            m = DepthwiseConv2d(C, k, stride=s, dilation=d, impl=None if v == "fast" else v)  # type: ignore[arg-type]
            m.load_state_dict(ref.state_dict())
        steps[v] = _step_fn(m, x, grad, inference)
    times: dict[str, list[float]] = {v: [] for v in variants}
    # each variant runs its reps back to back (steady-state allocator behaviour, as in training),
    # in two passes (A B C A B C) so slow drift hits all variants alike
    for _ in range(2):
        for v, step in steps.items():
            times[v] += _timed(step, warmup, (reps + 1) // 2)
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--all-impls", action="store_true", help="also time every forced variant")
    p.add_argument("--channels-last", action="store_true", help="feed channels_last inputs")
    p.add_argument("--inference", action="store_true", help="time no-grad forwards only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    variants = ["plain", "fast"]
    if args.all_impls:
        variants += list(IMPLS[1:])
    rows = []
    for C, hw in STAGES:
        for s in (1, 2):
            for k, d in KD:
                vs = [v for v in variants if not (v.startswith("poly") and d != 2)]
                ms = bench_case(
                    C, hw, k, d, s, vs, args.batch, args.reps, args.warmup, args.channels_last, args.inference
                )
                with torch.inference_mode(args.inference):
                    probe = torch.empty(args.batch, C, hw, hw)
                    impl = DepthwiseConv2d(C, k, stride=s, dilation=d).choose_impl(probe)
                rows.append({"C": C, "hw": hw, "stride": s, "k": k, "dilation": d, "impl": impl, "ms": ms})
                extra = "  ".join(f"{v}={ms[v]:.2f}" for v in vs[2:])
                print(
                    f"C={C:3d} {hw:2d}x{hw:<2d} s={s} k={k} d={d}  plain {ms['plain']:7.2f} ms  "
                    f"fast {ms['fast']:7.2f} ms  x{ms['plain'] / ms['fast']:5.2f}  [{impl}]  {extra}",
                    flush=True,
                )
    total_plain = sum(r["ms"]["plain"] for r in rows)
    total_fast = sum(r["ms"]["fast"] for r in rows)
    print(f"total  plain {total_plain:.1f} ms  fast {total_fast:.1f} ms  x{total_plain / total_fast:.2f}")
    for r in rows:
        print(
            json.dumps(
                {
                    **r,
                    "threads": args.threads,
                    "batch": args.batch,
                    "channels_last": args.channels_last,
                    "inference": args.inference,
                }
            )
        )


if __name__ == "__main__":
    main()
