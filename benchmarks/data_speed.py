"""Image-folder input speed: decoded + augmented images per second, against what the search consumes.

    python benchmarks/data_speed.py [--images 1024] [--batch 64] [--side 224] [--folder DIR]

Writes (or reuses) a folder of JPEGs whose shorter side is 1.14 × --side (what a 224-px ImageNet-style
view is cropped from), then times `dnad.data.BatchIterator` on it in training mode (random resized
crop + flip, normalisation), batches decoded ahead by 1, 2 and all cores' threads; beside it the same
work with torchvision's decoder (`torchvision.io.decode_jpeg` + `resized_crop`) on one thread, and the
images/s of one training step of the reference's ImageNet search network (C=20, 14 cells, 224 px) on
this machine. Prints one JSON line per figure and a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dnad.config import DataConfig
from dnad.data import load_dataset


def write_jpegs(root: Path, n: int, side: int, classes: int = 4) -> None:
    """`n` smooth, textured JPEGs (a photo-like file size) as train/ and val/ class folders."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    h, w = round(side * 1.143), round(side * 1.143 * 4 / 3)
    for i in range(n):
        base = torch.rand(3, h // 16 + 1, w // 16 + 1, generator=g)
        img = torch.nn.functional.interpolate(base[None], size=(h, w), mode="bicubic", align_corners=False)[0]
        img = (img + 0.08 * torch.randn(3, h, w, generator=g)).clamp(0, 1).mul(255).byte()
        split = "val" if (i // classes) % 8 == 7 else "train"
        d = root / split / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:05d}.jpg", quality=90)


def time_iterator(data, batch: int, workers: int, batches: int) -> float:
    """Decoded + augmented images/s of `batches` training batches (after one warm-up batch)."""
    it = data.iterator("train", batch, seed=0, augment=True)
    it.workers = workers
    torch.set_num_threads(1)
    gen = it.iterate(0)
    next(gen)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(gen)
        n += len(x)
    return n / (time.perf_counter() - t0)


def time_torchvision(data, n: int) -> float:
    """Images/s of torchvision's JPEG decoder + resized crop + flip on one thread (no dnad code)."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.io import decode_jpeg, read_file

    torch.set_num_threads(1)
    s = data.image_size
    g = torch.Generator().manual_seed(0)
    paths = [p for p, _ in data.train.samples[:n]]
    t0 = time.perf_counter()
    for p in paths:
        img = decode_jpeg(read_file(p))
        _, H, W = img.shape
        area = H * W * (0.08 + 0.92 * float(torch.rand(1, generator=g)))
        aspect = math.exp(math.log(3 / 4) + math.log(16 / 9) * float(torch.rand(1, generator=g)))
        w, h = min(W, round(math.sqrt(area * aspect))), min(H, round(math.sqrt(area / aspect)))
        top, left = (
            int(torch.randint(0, H - h + 1, (1,), generator=g)),
            int(torch.randint(0, W - w + 1, (1,), generator=g)),
        )
        out = TF.resized_crop(img, top, left, h, w, [s, s], antialias=True)
        if float(torch.rand(1, generator=g)) < 0.5:
            out = out.flip(2)
    return len(paths) / (time.perf_counter() - t0)


def search_step(batch: int, threads: int) -> float:
    """Images/s of one training step of the reference's ImageNet search super-network (224 px)."""
    from supernet_speed import step_time

    from dnad.fastops import preferred_format
    from dnad.supernet import SuperNet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fmt = preferred_format("cpu")
    net = SuperNet(C=20, num_cells=14, num_classes=1000, in_channels=3, image_size=224).to(memory_format=fmt)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,))
    return batch / step_time(net, x, y, steps=2, warmup=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--folder", help="reuse or write the JPEG folder here (default: a temp folder)")
    ap.add_argument("--step-batch", type=int, default=8, help="batch of the timed search step (0: skip it)")
    a = ap.parse_args()
    tmp = None if a.folder else tempfile.TemporaryDirectory()
    root = Path(a.folder or tmp.name)
    if not (root / "train").is_dir():
        write_jpegs(root, a.images, a.side)
    data = load_dataset(DataConfig(dataset="imagefolder", root=str(root), image_size=a.side, val_size=8,
                                   cache_dir=str(root / ".cache")))  # fmt: skip
    cores = os.cpu_count() or 1
    machine = {
        "machine": platform.processor() or platform.machine(),
        "cores": cores,
        "torch": torch.__version__,
    }
    rows = []
    for workers in sorted({1, 2, cores}):
        rows.append(
            {
                "what": f"dnad BatchIterator (PIL), {workers} thread(s)",
                "img_per_s": time_iterator(data, a.batch, workers, a.batches),
            }
        )
    rows.append(
        {
            "what": "torchvision decode_jpeg + resized_crop, 1 thread",
            "img_per_s": time_torchvision(data, a.batch * 2),
        }
    )
    if a.step_batch:
        rows.append({"what": f"ImageNet search step consumes ({cores} threads, batch {a.step_batch})",
                     "img_per_s": search_step(a.step_batch, cores)})  # fmt: skip
    for r in rows:
        print(json.dumps({**r, "side": a.side, "batch": a.batch, **machine}))
    print(f"\n{'':58}img/s")
    for r in rows:
        print(f"{r['what']:58}{r['img_per_s']:8.1f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
