"""Training-step speed of the search super-network (forward, backward, both optimizer steps).

    python benchmarks/supernet_speed.py --preset paper-cifar

prints one JSON line: img_per_s_dense, img_per_s_half (a fixed seeded half of the pairs deleted),
peak_rss_mb, plus the settings and the machine. `--profile` (CPU) first prints where one dense step's
time goes, op by op (`benchmarks/op_times.py`), to stderr.

`ratio_vs_textbook_dense` / `_half`: the same step of the same super-network written the textbook way
(`dnad.reference`: each op's own forward, Σ w·op(x) per node, plain `F.conv2d` depthwise kernels, NCHW),
timed in the same process, alternating block by block with dnad's step (`--rounds` blocks of `--steps`
steps each), so that the machine's speed of the moment cancels out of the ratio; it keeps PyTorch's
default optimizers, dnad's network gets dnad's (`dnad.optim`; `--optimizer default` for PyTorch's).
`--textbook off` skips it. `--kernels aten` runs dnad's network without dnad's native CPU kernels
(`dnad.native`), to compare the two.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from op_times import OpTimer

from dnad import optim
from dnad.fastops import aten_kernels, describe_cpu_kernels, preferred_format, reference_kernels
from dnad.reference import textbook
from dnad.supernet import SuperNet

PRESETS = {
    # the reference's CIFAR search size
    "paper-cifar": dict(C=16, cells=8, ops="reference", batch=64, channels=3, size=32, classes=10),
    # the default profile's (configs/quick.yaml) search super-network
    "quick": dict(C=8, cells=5, ops="reference", batch=64, channels=1, size=28, classes=10),
    "fashion": dict(C=16, cells=8, ops="reference", batch=64, channels=1, size=28, classes=10),
    "tiny": dict(C=4, cells=3, ops="reference", batch=32, channels=3, size=16, classes=5),
}


def optimizers(net: SuperNet, fast: bool) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """The search's weight and α optimizers: dnad's (`dnad.optim`: fused kernels on the CPU) when `fast`,
    else PyTorch's defaults, as textbook code builds them."""
    return (
        optim.adam(net.weight_parameters(), fast, lr=5e-4, betas=(0.5, 0.999), weight_decay=3e-4),
        optim.sgd(net.arch_parameters(), fast, lr=0.2),
    )


def step_times(net: SuperNet, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int, opts) -> list[float]:
    """Seconds of each of `steps` training steps after `warmup` untimed ones, with the optimizers `opts`."""
    w_opt, a_opt = opts
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.weight_parameters(), 5.0)
        torch.nn.utils.clip_grad_norm_(net.arch_parameters(), 5.0)
        w_opt.step()
        a_opt.step()
        net.enforce_deleted()
        w_opt.zero_grad(set_to_none=True)
        a_opt.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def step_time(
    net: SuperNet, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int, fast: bool = True
) -> float:
    """Median seconds of a training step."""
    return statistics.median(step_times(net, x, y, steps, warmup, optimizers(net, fast)))


RSS: dict[str, float] = {}


def alternating(net: SuperNet, ref: SuperNet, x: torch.Tensor, y: torch.Tensor, a) -> tuple[float, float]:
    """Median step seconds of dnad's `net` and of the textbook `ref`, timed in alternating blocks."""
    mine, theirs = [], []
    xr = x.contiguous(memory_format=torch.contiguous_format)
    mine_opts, ref_opts = optimizers(net, a.optimizer == "dnad"), optimizers(ref, False)
    for r in range(a.rounds):
        mine += step_times(net, x, y, a.steps, a.warmup if r == 0 else 0, mine_opts)
        if r == 0:
            RSS["dnad"] = max(RSS.get("dnad", 0.0), peak_rss_mb())  # before the textbook net has run
        with reference_kernels():
            theirs += step_times(ref, xr, y, a.steps, a.warmup if r == 0 else 0, ref_opts)
    return statistics.median(mine), statistics.median(theirs)


def delete_half(net: SuperNet, seed: int = 0) -> int:
    """Delete a fixed seeded half of the pairs (the 0/0 guard keeps one pair per node alive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mask = torch.rand(net.alpha.shape, generator=g) < 0.5
        net.alpha[mask] = 0.0
    return net.delete_below_threshold()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="paper-cifar")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true", help="CPU: print the costliest ops of one dense step")
    ap.add_argument("--rounds", type=int, default=3, help="alternating blocks of dnad / textbook steps")
    ap.add_argument("--textbook", choices=("on", "off"), default="on", help="time the textbook network too")
    ap.add_argument(
        "--kernels", choices=("dnad", "aten", "plain"), default="dnad",
        help="dnad's network's kernels: dnad's dispatch (dnad.fastops, with dnad's native CPU kernels where "
        "they build), the same dispatch on PyTorch's kernels only (aten), or plain F.conv2d everywhere",
    )  # fmt: skip
    ap.add_argument(
        "--layout", choices=("auto", "nchw", "channels_last"), default="auto",
        help="activation layout (auto = what dnad's training loops use on this device)",
    )  # fmt: skip
    ap.add_argument(
        "--optimizer", choices=("dnad", "default"), default="dnad",
        help="dnad's network's optimizers: dnad's (dnad.optim, fused on the CPU) or PyTorch's defaults",
    )  # fmt: skip
    a = ap.parse_args()
    if a.profile and torch.device(a.device).type != "cpu":
        print(
            f"error: --profile times ops on the CPU only (--device {a.device!r}); drop it or use --device cpu"
        )
        sys.exit(2)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    p = PRESETS[a.preset]
    dev = torch.device(a.device)
    net = SuperNet(
        C=p["C"], num_cells=p["cells"], num_classes=p["classes"], in_channels=p["channels"], image_size=p["size"],
        ops=p["ops"],
    ).to(dev)  # fmt: skip
    fmt = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}.get(a.layout)
    fmt = fmt or preferred_format(dev)
    net = net.to(memory_format=fmt)
    x = torch.randn(p["batch"], p["channels"], p["size"], p["size"], device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, p["classes"], (p["batch"],), device=dev)
    if a.profile:  # on a copy, so the timed steps start from the same weights
        import copy

        probe = copy.deepcopy(net)
        opts = optimizers(probe, a.optimizer == "dnad")
        step_s = statistics.median(step_times(probe, x, y, 2, 1, opts))
        with OpTimer() as timer:
            step_times(probe, x, y, 1, 0, opts)
        print(timer.table(1, step_s), file=sys.stderr)
        del probe, opts
    ratios = {}
    kernels = {"plain": reference_kernels, "aten": aten_kernels}.get(a.kernels, contextlib.nullcontext)
    with kernels():
        if a.textbook == "on":
            ref = textbook(net)
            dense, ref_dense = alternating(net, ref, x, y, a)
        else:
            dense = step_time(net, x, y, a.steps, a.warmup, a.optimizer == "dnad")
        rss_dense = RSS.get("dnad", peak_rss_mb())
        deleted = delete_half(net)
        if a.textbook == "on":
            delete_half(ref)
            half, ref_half = alternating(net, ref, x, y, a)
            ratios = {"ratio_vs_textbook_dense": round(ref_dense / dense, 2),
                      "ratio_vs_textbook_half": round(ref_half / half, 2),
                      "textbook_img_per_s_dense": round(p["batch"] / ref_dense, 2),
                      "textbook_img_per_s_half": round(p["batch"] / ref_half, 2)}  # fmt: skip
        else:
            half = step_time(net, x, y, a.steps, a.warmup, a.optimizer == "dnad")
    out = {
        "preset": a.preset, "device": str(dev), "threads": a.threads, "batch": p["batch"],
        "layout": "channels_last" if fmt == torch.channels_last else "nchw", "kernels": a.kernels,
        "cpu_kernels": describe_cpu_kernels() if a.kernels == "dnad" else None,
        "optimizer": a.optimizer,
        "img_per_s_dense": round(p["batch"] / dense, 2), "img_per_s_half": round(p["batch"] / half, 2), **ratios,
        "step_s_dense": round(dense, 4), "step_s_half": round(half, 4), "pairs_deleted": deleted,
        "pairs_total": int(net.alpha.numel()),
        "peak_rss_mb": round(rss_dense if a.textbook == "on" else max(rss_dense, peak_rss_mb()), 1),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if dev.type == "cuda" else None,
    }  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
