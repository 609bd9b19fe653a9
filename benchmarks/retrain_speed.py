"""Training speed of a derived network: dnad's retrain loop against a plain PyTorch loop of the same
network and optimizer, timed alternately in one process (the ratio is what holds from day to day).

    python benchmarks/retrain_speed.py [--genotype benchmarks/genotypes/quick_densest.json] [--C 8]
        [--batch 64] [--steps 30] [--rounds 3] [--threads 1] [--device cpu|cuda] [--cuda-graph auto off]
        [--kernels auto aten] [--breakdown 25]

dnad: `dnad.retrain.RetrainLoop` epochs (images/s of its training part, from the epoch records: batch
preparation, forward, loss, backward, clipping, the optimizer, the non-finite guard; on CUDA each
step as a CUDA graph with `--cuda-graph auto`). plain: the same architecture written the textbook
way (`dnad.reference.textbook`: each edge's own forward, plain `F.conv2d` depthwise kernels, NCHW)
and the same optimizer (PyTorch's default implementation of it; dnad's loop builds the fused one on
the CPU, `--optimizer-impl default` gives it the default too) in a loop of zero_grad / forward /
cross-entropy / backward / clip / step.
The two alternate epoch by epoch (`--rounds` of each after one untimed warm-up epoch each). Prints one
JSON line per mode with images/s and `ratio_vs_plain`. Synthetic 1×28×28 images, 10 classes.
`--kernels auto aten` alternates dnad's loop on dnad's native CPU kernels (`dnad.native`) and on
PyTorch's in the same rounds, and adds `ratio_vs_aten`.
`--breakdown N` (CPU) then times one more dnad epoch op by op (`benchmarks/op_times.py`) and prints its
N costliest ops to stderr.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from op_times import OpTimer

from dnad.complexity import count_complexity
from dnad.config import DataConfig, RetrainConfig
from dnad.data import load_dataset
from dnad.fastops import cpu_kernels, describe_cpu_kernels, reference_kernels, set_cpu_kernels
from dnad.genotype import Genotype
from dnad.network import build_model
from dnad.reference import textbook
from dnad.retrain import RetrainLoop, make_optimizer


def plain_epoch(model, opt, batches, epoch: int, steps: int, device: str, clip: float) -> float:
    """Images/s of one textbook training epoch (NCHW, plain kernels)."""
    model.train()
    seen, t0 = 0, time.perf_counter()
    with reference_kernels():
        for b, (x, y) in enumerate(batches.iterate(epoch)):
            if b >= steps:
                break
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            seen += len(y)
    if device == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def measure(genotype: Genotype, a: argparse.Namespace, extra: dict) -> list[dict]:
    data = load_dataset(DataConfig(dataset="fake", image_size=a.size, channels=a.channels, num_classes=10,
                                   fake_size=a.batch * a.steps + 16, val_size=16, augment=False))  # fmt: skip
    torch.manual_seed(0)
    model = build_model(genotype, a.C, 10, a.channels, a.size)
    ref = textbook(model).to(a.device)
    epochs = a.rounds + 1
    cfg = RetrainConfig(C=a.C, epochs=epochs, batch_size=a.batch, optimizer=a.optimizer, lr=1e-3,
                        auxiliary_weight=0.0, drop_path=0.0, eval_every=0, **extra)  # fmt: skip
    loop = RetrainLoop(cfg, model, data, a.device, test=False)
    if a.optimizer_impl == "default":  # dnad's loop with PyTorch's default optimizer implementation
        loop.opt = make_optimizer(cfg, model, fast=False)
    ref_opt = make_optimizer(cfg, ref, fast=False)
    mine: dict[str, list[float]] = {k: [] for k in a.kernels}
    theirs = []
    for e in range(epochs):  # alternate: a dnad epoch per kernel choice, a plain epoch; the first is warm-up
        for kernels in a.kernels:
            set_cpu_kernels(kernels)
            mine[kernels].append(loop.run_epoch()["img_per_s"])
        theirs.append(plain_epoch(ref, ref_opt, loop.train_batches, e, a.steps, a.device, cfg.grad_clip))
    t = statistics.median(theirs[1:])
    med = {k: statistics.median(v[1:]) for k, v in mine.items()}
    if a.breakdown:
        set_cpu_kernels(a.kernels[0])
        with OpTimer() as timer:
            loop.run_epoch()
        print(timer.table(a.steps, a.batch / med[a.kernels[0]], a.breakdown), file=sys.stderr)
    c = count_complexity(model.cpu(), (a.channels, a.size, a.size))
    rows = []
    for kernels, m in med.items():
        set_cpu_kernels(kernels)
        rows.append({
            "img_per_s": round(m, 1), "plain_img_per_s": round(t, 1), "ratio_vs_plain": round(m / t, 2),
            **({"ratio_vs_aten": round(m / med["aten"], 2)} if "aten" in med and kernels != "aten" else {}),
            "first_epoch_img_per_s": round(mine[kernels][0], 1), **extra, "kernels": describe_cpu_kernels(),
            "params": c.params, "macs": c.macs, "C": a.C,
            "batch": a.batch, "steps_per_epoch": a.steps, "rounds": a.rounds, "optimizer": a.optimizer,
            "optimizer_impl": a.optimizer_impl,
            "threads": torch.get_num_threads(), "device": a.device,
            "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else None, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--genotype", default="benchmarks/genotypes/quick_densest.json", help="genotype JSON file"
    )
    ap.add_argument("--C", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30, help="steps per epoch")
    ap.add_argument("--rounds", type=int, default=3, help="timed epochs of each, alternating")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    ap.add_argument(
        "--optimizer-impl", choices=["dnad", "default"], default="dnad",
        help="dnad's loop with dnad's optimizer (fused on the CPU) or PyTorch's default implementation",
    )  # fmt: skip
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cuda-graph", nargs="+", default=["auto"], choices=["auto", "off"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a retrain trial's CPU: 1)")
    ap.add_argument("--kernels", nargs="+", default=["auto"], choices=["auto", "aten"],
                    help="CPU kernels of dnad's loop: auto = dnad's native ones where they build; aten = PyTorch's; "
                    "both: alternated in the same rounds")  # fmt: skip
    ap.add_argument("--breakdown", type=int, default=0, metavar="N",
                    help="CPU: print the N costliest ops of one more dnad epoch (benchmarks/op_times.py)")  # fmt: skip
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print(f"error: --device cuda: no CUDA device is visible here (value {a.device!r}); use --device cpu")
        return 2
    if a.breakdown and a.device != "cpu":
        print(
            f"error: --breakdown times ops on the CPU only (--device {a.device!r}); drop it or use --device cpu"
        )
        return 2
    genotype = Genotype.from_json(Path(a.genotype).read_text())
    was, threads = cpu_kernels(), torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        for graph in a.cuda_graph:
            for row in measure(genotype, a, {"cuda_graph": graph}):
                print(json.dumps(row), flush=True)
    finally:  # as they were (a caller in the same process, e.g. a test, keeps its settings)
        set_cpu_kernels(was)
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
