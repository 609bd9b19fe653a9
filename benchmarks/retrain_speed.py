"""Training speed of a derived network through the retrain loop (`dnad.retrain.RetrainLoop`), with each
step replayed as a CUDA graph (`retrain.cuda_graph=auto`, the default on a GPU) and eagerly (`off`).

    python benchmarks/retrain_speed.py --device cuda --genotype configs/teachers/darts_v2_5cells.json \
        --C 7 --batch 1024 --steps 40

prints one JSON line per mode: img_per_s (median over the timed epochs' steps, warm-up and capture
excluded), the architecture's params and MACs, and the settings. Synthetic 1×28×28 images, 10 classes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dnad.complexity import count_complexity
from dnad.config import DataConfig, RetrainConfig
from dnad.data import load_dataset
from dnad.genotype import Genotype
from dnad.network import build_model
from dnad.retrain import RetrainLoop


def measure(genotype: Genotype, a: argparse.Namespace, mode: str) -> dict:
    data = load_dataset(
        DataConfig(dataset="fake", image_size=a.size, channels=a.channels, num_classes=10,
                   fake_size=a.batch * a.steps, augment=True)
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(genotype, a.C, 10, a.channels, a.size, auxiliary=a.auxiliary > 0)
    cfg = RetrainConfig(C=a.C, epochs=a.epochs, batch_size=a.batch, optimizer=a.optimizer, lr=1e-3,
                        auxiliary_weight=a.auxiliary, drop_path=0.0, cuda_graph=mode, eval_every=0)  # fmt: skip
    loop = RetrainLoop(cfg, model, data, a.device)
    times: list[float] = []
    orig = loop._step

    def timed(x, y, lr):
        if a.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = orig(x, y, lr)  # every step reads its loss back, so it has finished when this returns
        times.append(time.perf_counter() - t0)
        return r

    loop._step = timed  # type: ignore[method-assign]
    t0 = time.perf_counter()
    loop.run()
    wall = time.perf_counter() - t0
    timed_steps = sorted(times[a.steps :])  # the first epoch holds the warm-up and the capture
    med = timed_steps[len(timed_steps) // 2]
    c = count_complexity(model.cpu(), (a.channels, a.size, a.size))
    return {
        "mode": mode, "img_per_s": round(a.batch / med, 1), "median_step_ms": round(1e3 * med, 2),
        "first_epoch_s": round(sum(times[: a.steps]), 2), "wall_s": round(wall, 1),
        "graph_used": loop._static is not None and (a.device != "cuda" or loop._static.graph is not None),
        "params": c.params, "macs": c.macs, "C": a.C, "batch": a.batch, "steps_per_epoch": a.steps,
        "epochs": a.epochs, "optimizer": a.optimizer, "device": a.device,
        "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else None,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genotype", default="configs/teachers/darts_v2_5cells.json", help="genotype JSON file")
    ap.add_argument("--C", type=int, default=7)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="steps per epoch")
    ap.add_argument("--epochs", type=int, default=2, help="the first is warm-up (untimed)")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    ap.add_argument("--auxiliary", type=float, default=0.0, help="auxiliary-head weight (0 = no head)")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", nargs="+", default=["auto", "off"], choices=["auto", "off"])
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.epochs < 2:
        ap.error("--epochs must be at least 2 (the first is not timed)")
    if a.device == "cuda" and not torch.cuda.is_available():
        print(f"error: --device cuda: no CUDA device is visible here (value {a.device!r}); use --device cpu")
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    genotype = Genotype.from_json(Path(a.genotype).read_text())
    for mode in a.modes:
        print(json.dumps(measure(genotype, a, mode)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
