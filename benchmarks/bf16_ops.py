"""bf16 against fp32 for the ops of a derived network, forward + backward, one op at a time.

    python benchmarks/bf16_ops.py [--threads 1] [--batch 64]

Part 1: each conv kind of the `quick` family at its shapes (1×1, the preprocessing 1×1s, depthwise
3×3 / 5×5, the 1→24 stem), the whole op in fp32 and in bf16 (input, weight and grad all bf16).
Part 2: a 1×1 conv inside an fp32 network, i.e. with the casts paid: fp32, an explicit
cast → bf16 conv → cast back, and `torch.autocast("cpu", torch.bfloat16)`. Prints ms per call and
the fp32/bf16 ratio (> 1: bf16 faster). Where the CPU has AMX (`amx_bf16` in /proc/cpuinfo) oneDNN
uses it for bf16 convolutions; elsewhere bf16 is emulated and slower still.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def ms(fn, n: int = 30) -> float:
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def conv_step(N: int, cin: int, cout: int, h: int, k: int, groups: int, dtype: torch.dtype):
    cl = torch.channels_last
    x = torch.randn(N, cin, h, h).contiguous(memory_format=cl).to(dtype).requires_grad_(True)
    w = torch.randn(cout, cin // groups, k, k).to(dtype).requires_grad_(True)
    g = torch.randn(N, cout, h, h).contiguous(memory_format=cl).to(dtype)
    return lambda: F.conv2d(x, w, padding=k // 2, groups=groups).backward(g)


def casts_paid(N: int, cin: int, cout: int, h: int) -> tuple[float, float, float]:
    """ms of a 1×1 conv's forward + backward in an fp32 network: fp32, cast-bf16-cast, autocast."""
    x = torch.randn(N, cin, h, h).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(cout, cin, 1, 1).requires_grad_(True)
    g = torch.randn(N, cout, h, h).contiguous(memory_format=torch.channels_last)

    def autocast() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = F.conv2d(x, w)
        y.float().backward(g)

    f32 = ms(lambda: F.conv2d(x, w).backward(g))
    cast = ms(lambda: F.conv2d(x.bfloat16(), w.bfloat16()).float().backward(g))
    return f32, cast, ms(autocast)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    print(f"torch {torch.__version__}, {a.threads} thread(s), batch {a.batch}, AMX: {'amx_bf16' in flags}")
    kinds = [(8, 8, 28, 1, 1, "1x1 8->8 @28"), (16, 16, 14, 1, 1, "1x1 16->16 @14"),
             (32, 32, 7, 1, 1, "1x1 32->32 @7"), (24, 8, 28, 1, 1, "pre 1x1 24->8 @28"),
             (64, 16, 14, 1, 1, "pre 1x1 64->16 @14"), (8, 8, 28, 3, 8, "dw 3x3 8 @28"),
             (8, 8, 28, 5, 8, "dw 5x5 8 @28"), (1, 24, 28, 3, 1, "stem 3x3 1->24 @28")]  # fmt: skip
    for cin, cout, h, k, groups, name in kinds:
        f32 = ms(conv_step(a.batch, cin, cout, h, k, groups, torch.float32))
        b16 = ms(conv_step(a.batch, cin, cout, h, k, groups, torch.bfloat16))
        print(f"{name:20s} fp32 {f32:7.3f} ms  bf16 {b16:7.3f} ms  fp32/bf16 {f32 / b16:.2f}")
    for cin, cout, h in [(8, 8, 28), (16, 16, 14), (32, 8, 28)]:
        f32, cast, auto = casts_paid(a.batch, cin, cout, h)
        print(f"1x1 {cin}->{cout} @{h} in fp32: fp32 {f32:.3f} ms  cast-bf16-cast {cast:.3f} ms "
              f"({f32 / cast:.2f})  autocast {auto:.3f} ms ({f32 / auto:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
