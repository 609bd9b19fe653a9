"""Evaluation speed of a derived network: `dnad.retrain.evaluate` with the BNs folded into their convs
(`dnad.fold`, the default) against the same call without folding, alternating in one process (the
ratio is what holds from day to day), plus the largest logit difference between the two.

    python benchmarks/eval_speed.py [--genotype benchmarks/genotypes/quick_densest.json] [--C 8]
        [--images 4096] [--batch 256] [--rounds 3] [--threads 1]

Synthetic 1×28×28 images, 10 classes; BN running statistics are made non-trivial by a few
training-mode forwards first, so the fold has something to fold. Prints one JSON line.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dnad.config import DataConfig
from dnad.data import load_dataset
from dnad.fastops import preferred_format, to_layout
from dnad.fold import count_batchnorms, fold_batchnorm
from dnad.genotype import Genotype
from dnad.network import build_model
from dnad.retrain import evaluate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--genotype", default="benchmarks/genotypes/quick_densest.json", help="genotype JSON file"
    )
    ap.add_argument("--C", type=int, default=8)
    ap.add_argument("--images", type=int, default=4096, help="images per evaluation")
    ap.add_argument("--batch", type=int, default=256, help="evaluation batch (the CPU's default: 256)")
    ap.add_argument("--rounds", type=int, default=3, help="timed evaluations of each, alternating")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a retrain trial's CPU: 1)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    genotype = Genotype.from_json(Path(a.genotype).read_text())
    data = load_dataset(DataConfig(dataset="fake", image_size=a.size, channels=a.channels, num_classes=10,
                                   fake_size=a.images + 16, val_size=a.images, augment=False))  # fmt: skip
    torch.manual_seed(0)
    dev = torch.device("cpu")
    model = build_model(genotype, a.C, 10, a.channels, a.size).to(memory_format=preferred_format(dev))
    model.train()
    with torch.no_grad():  # running statistics away from (0, 1)
        for _ in range(3):
            model(to_layout(torch.randn(64, a.channels, a.size, a.size) * 2 + 0.5, preferred_format(dev)))
    batches = data.iterator("val", a.batch, seed=0)
    times: dict[bool, list[float]] = {True: [], False: []}
    accs: dict[bool, float] = {}
    for r in range(a.rounds + 1):  # the first of each is warm-up
        for fold in (False, True):
            t0 = time.perf_counter()
            accs[fold] = evaluate(model, batches, dev, fold=fold)[0]
            if r:
                times[fold].append(a.images / (time.perf_counter() - t0))
    x = to_layout(torch.randn(a.batch, a.channels, a.size, a.size), preferred_format(dev))
    folded = fold_batchnorm(model)
    with torch.inference_mode():
        ref, got = model.eval()(x), folded(x)
    diff = float((got - ref).abs().max() / ref.abs().max())
    plain, fast = statistics.median(times[False]), statistics.median(times[True])
    print(json.dumps({
        "folded_img_per_s": round(fast, 1), "unfolded_img_per_s": round(plain, 1),
        "ratio_vs_unfolded": round(fast / plain, 2), "max_rel_logit_diff": diff,
        "same_accuracy": accs[True] == accs[False], "batchnorms": count_batchnorms(model),
        "batchnorms_left": count_batchnorms(folded), "images": a.images, "batch": a.batch,
        "rounds": a.rounds, "threads": torch.get_num_threads(), "genotype": a.genotype, "C": a.C,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
