"""Datasets and deterministic batch iterators.

`load_dataset(cfg)` returns a `DatasetBundle` of train / val / test splits. Small datasets (Fashion-MNIST,
CIFAR, fake) live in memory as uint8 N×C×H×W tensors (`TensorSplit`); image folders (ImageNet) are decoded
per sample (`FolderSplit`). Nothing is ever downloaded.

`BatchIterator` turns a split into float32 NCHW normalised batches. Every batch is a pure function of
(seed, epoch, batch index, rank, world_size): the epoch order and each batch's augmentation come from
generators seeded by those numbers only, so `iterate(epoch, start_batch=k)` resumes a search mid-epoch
with exactly the batches the interrupted run would have seen.

Pixel statistics (`mean`, `std`) are in units of pixel/255, per channel.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

from dnad.config import DataConfig
from dnad.errors import DatasetNotFoundError, InputError
from dnad.imagefolder import (
    SplitScan,
    broken_line,
    check_split,
    decode_split,
    infer_shape,
    mode_of,
    pixel_stats,
    sample_stats,
    scan_split,
)

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)
_UNREADABLE: set[str] = set()  # image files already warned about in this process
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist/"
# image folders whose side is below this are decoded into memory once (and augmented like CIFAR:
# padded crop + flip); larger ones are decoded batch by batch (random resized crop + flip)
IN_MEMORY_BELOW = 128
IN_MEMORY_MAX_BYTES = 2 << 30
PREFETCH = 2  # image-folder batches decoded ahead of the one being trained on
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")  # fmt: skip
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of parts; a hash so that (1, 23) and (12, 3) differ."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big") >> 1


def _gen(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


# ----------------------------------------------------------------------------------------------- splits
class Split:
    """N labelled images. `labels`: int64 (N,). `split[i]` -> (uint8 C×H×W tensor, int label)."""

    labels: Tensor
    in_memory: bool = False

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        raise NotImplementedError

    def subset(self, idx: Tensor) -> Split:
        raise NotImplementedError


@dataclass(eq=False)
class TensorSplit(Split):
    """In-memory split: `images` uint8 (N, C, H, W), `labels` int64 (N,). Read-only: Fashion-MNIST
    tensors are shared with a load cache."""

    images: Tensor
    labels: Tensor
    in_memory = True

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])

    def subset(self, idx: Tensor) -> TensorSplit:
        return TensorSplit(self.images.index_select(0, idx), self.labels.index_select(0, idx))


def crop_ratio(dataset: str) -> float:
    """Side of the evaluation centre crop over the shorter side of an image: ImageNet's 224/256, and
    the whole shorter side for other image folders (small images lose no border)."""
    return 0.875 if dataset == "imagenet" else 1.0


def resize_crop(img: Image, size: int, box: tuple[float, float, float, float]) -> Tensor:
    """The `box` of a PIL image resized to size×size (one PIL call: no double resampling), as a uint8
    (C, size, size) tensor."""
    from PIL.Image import Resampling

    out = np.array(img.resize((size, size), Resampling.BILINEAR, box=box), dtype=np.uint8)
    return torch.from_numpy(out.reshape(size, size, -1)).permute(2, 0, 1)


def centre_crop(img: Image, size: int, ratio: float) -> Tensor:
    """The evaluation view of an image: a centred square of `ratio` × its shorter side, resized to
    `size` (uint8 (C, size, size))."""
    w, h = img.size
    side = min(w, h) * ratio
    left, top = (w - side) / 2, (h - side) / 2
    return resize_crop(img, size, (left, top, left + side, top + side))


@dataclass(eq=False)
class FolderSplit(Split):
    """Lazily decoded split over an `ImageFolder`'s `samples`: `split[i]` is the centre crop
    (`centre_crop`, `crop_ratio`) resized to `image_size`, uint8 (C, S, S) in PIL `mode` ("RGB" or
    "L")."""

    samples: list[tuple[str, int]]
    labels: Tensor
    image_size: int
    ratio: float = 0.875
    mode: str = "RGB"

    def _open(self, i: int) -> Image:
        """Image i in `mode`; a file whose body cannot be decoded (its header was checked before the
        run) becomes a black image, with one warning, rather than a traceback in the middle of a run."""
        from PIL import Image

        path = self.samples[i][0]
        try:
            with Image.open(path) as img:
                return img.convert(self.mode)
        except (OSError, ValueError, SyntaxError) as e:
            if path not in _UNREADABLE:
                _UNREADABLE.add(path)
                log.warning("unreadable image %s (%s: %s): used as a black image", path, type(e).__name__, e)
            return Image.new(self.mode, (self.image_size, self.image_size))

    def _to_tensor(self, img: Image, box: tuple[float, float, float, float]) -> Tensor:
        return resize_crop(img, self.image_size, box)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return centre_crop(self._open(i), self.image_size, self.ratio), self.samples[i][1]

    def random_crop(self, i: int, u: Tensor) -> Tensor:
        """RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) of image i, driven by the pre-drawn
        uniforms `u` (10, 4) so that the result does not depend on which thread runs it."""
        img = self._open(i)
        W, H = img.size
        lo, hi = math.log(3 / 4), math.log(4 / 3)
        for a, r, ti, tj in u.tolist():  # torchvision's 10 attempts
            area = W * H * (0.08 + 0.92 * a)
            aspect = math.exp(lo + (hi - lo) * r)
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= W and 0 < h <= H:
                top, left = int(ti * (H - h + 1)), int(tj * (W - w + 1))
                return self._to_tensor(img, (left, top, left + w, top + h))
        # fallback (torchvision's): the largest centred crop with a legal aspect ratio
        w, h = min(W, round(H * 4 / 3)), min(H, round(W * 4 / 3))
        left, top = (W - w) // 2, (H - h) // 2
        return self._to_tensor(img, (left, top, left + w, top + h))

    def subset(self, idx: Tensor) -> FolderSplit:
        samples = [self.samples[i] for i in idx.tolist()]
        return FolderSplit(samples, self.labels[idx], self.image_size, self.ratio, self.mode)


@dataclass(eq=False)
class DatasetBundle:
    """Splits plus meta: `val` is held out of the training images (`DataConfig.val_size`), `test` is
    the dataset's own test split. `mean`/`std`: per channel, pixel/255."""

    name: str
    train: Split
    val: Split
    test: Split
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # what the data checks found and worked around (bad files skipped)

    def iterator(
        self,
        which: Literal["train", "val", "test"],
        batch_size: int,
        *,
        seed: int,
        augment: bool = False,
        cutout: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> BatchIterator:
        """A `BatchIterator` over one split, in training mode (shuffle, augment, drop_last) iff `train`."""
        split = getattr(self, which)
        kw = {"mean": self.mean, "std": self.std, "rank": rank, "world_size": world_size, "cutout": cutout}
        return BatchIterator(split, batch_size, seed=seed, train=which == "train", augment=augment, **kw)


def preprocess_spec(b: DatasetBundle) -> dict[str, object]:
    """How an image file becomes a network input of this dataset (`dnad.deploy.read_image`): PIL mode,
    a centred square of `crop_ratio` × the shorter side resized (bilinear) to `image_size`, then
    `(pixel / 255 - mean) / std` per channel."""
    return {
        "mode": "L" if b.in_channels == 1 else "RGB" if b.in_channels == 3 else "RGBA",
        "image_size": b.image_size,
        "crop_ratio": crop_ratio(b.name),
        "resample": "bilinear",
    }


# ---------------------------------------------------------------------------------------------- loaders
@lru_cache(maxsize=4)  # the 47 MB train file takes ~0.3 s to inflate; tests and trials reload it often
def _read_idx(path: str, mtime_ns: int, want_magic: int) -> Tensor:
    """An IDX file as a uint8 tensor of the shape its header gives (images N×28×28, labels N)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise InputError("data.root", path, f"cannot read IDX file ({e})") from e
    ndim = want_magic & 0xFF
    if len(data) < 4 + 4 * ndim or struct.unpack(">I", data[:4])[0] != want_magic:
        raise InputError("data.root", path, f"not an IDX file (expected magic 0x{want_magic:08x})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    if len(data) != 4 + 4 * ndim + math.prod(shape):
        raise InputError("data.root", path, f"truncated or corrupt IDX file (header says {shape})")
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    return torch.from_numpy(arr.copy())


def _fashion_mnist(cfg: DataConfig) -> tuple[TensorSplit, TensorSplit]:
    base = Path(cfg.root or FASHION_MNIST_ROOT)

    def find(d: Path, stem: str) -> Path | None:
        return next((p for p in (d / f"{stem}.gz", d / stem) if p.is_file()), None)

    splits = []
    for part in ("train", "t10k"):
        stems = (f"{part}-images-idx3-ubyte", f"{part}-labels-idx1-ubyte")
        for d in (base, base / "FashionMNIST" / "raw"):  # torchvision's layout too
            paths = [find(d, s) for s in stems]
            if all(paths):
                break
        else:
            hint = "Fashion-MNIST IDX files not found; install them with "
            hint += "`apt-get install dataset-fashion-mnist` or set data.root=DIR"
            raise DatasetNotFoundError("data.root", str(base), hint)
        x, y = (_read_idx(str(p), p.stat().st_mtime_ns, m) for p, m in zip(paths, (0x803, 0x801)))
        if len(x) != len(y) or len(y) == 0 or int(y.max()) > 9:
            raise InputError("data.root", str(paths[1]), f"want {len(x)} labels in 0..9, got {len(y)}")
        splits.append(TensorSplit(x.unsqueeze(1), y.long()))
    return splits[0], splits[1]


def _cifar(cfg: DataConfig) -> tuple[TensorSplit, TensorSplit, tuple[str, ...]]:
    from torchvision import datasets

    cls = datasets.CIFAR10 if cfg.dataset == "cifar10" else datasets.CIFAR100
    if cfg.root is None:
        hint = f"{cfg.dataset} needs data.root=DIR holding {cls.base_folder}/ (torchvision's layout)"
        raise InputError("data.root", None, hint + "; nothing is downloaded")
    root = Path(cfg.root)
    if root.name == cls.base_folder:  # accept the batches folder itself
        root = root.parent
    missing = [n for n, _ in cls.train_list + cls.test_list if not (root / cls.base_folder / n).is_file()]
    if missing:
        hint = f"{cfg.dataset} files missing under {root / cls.base_folder}: {', '.join(missing)}"
        raise DatasetNotFoundError("data.root", cfg.root, hint)
    out = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=False)
        except (RuntimeError, OSError, KeyError, ValueError) as e:
            raise InputError("data.root", cfg.root, f"{cfg.dataset} files are corrupt ({e})") from e
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        out.append(TensorSplit(x, torch.as_tensor(ds.targets, dtype=torch.long)))
    return out[0], out[1], tuple(ds.classes)


def folder_splits(cfg: DataConfig) -> tuple[Path, Path]:
    """(train folder, test folder) of an image-folder dataset: `root/train` and `root/val` (or
    `root/test`); InputError naming what is missing."""
    hint = f"{cfg.dataset} needs data.root=DIR with train/ and val/ (or test/) folders of class folders"
    if cfg.root is None or not Path(cfg.root).is_dir():
        raise DatasetNotFoundError("data.root", cfg.root, hint)
    root = Path(cfg.root)
    if not (root / "train").is_dir():
        raise InputError("data.root", cfg.root, "has no train/ folder; " + hint)
    test = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if test is None:
        raise InputError("data.root", cfg.root, "has train/ but no val/ (or test/) folder of class folders")
    return root / "train", test


@dataclass(frozen=True)
class FolderInfo:
    """What the scans of an image-folder dataset say: splits, classes, the shape the data asks for,
    whether it is decoded into memory, and the warnings of the checks."""

    train: SplitScan
    test: SplitScan
    channels: int
    image_size: int
    in_memory: bool
    warnings: tuple[str, ...]


def inspect_folders(cfg: DataConfig) -> FolderInfo:
    """Scan and check both splits of an image-folder dataset (one-line InputErrors before any work)."""
    train_dir, test_dir = folder_splits(cfg)
    train, test = (scan_split(d, cfg.cache_dir) for d in (train_dir, test_dir))
    warnings = check_split(train, cfg.bad_files) + check_split(test, cfg.bad_files)
    if test.classes != train.classes:
        only = sorted(set(train.classes) ^ set(test.classes))
        raise InputError(
            "data.root", str(test_dir), f"its class folders differ from train/'s (e.g. {only[:3]})"
        )
    want = cfg.num_classes or (1000 if cfg.dataset == "imagenet" else None)
    if want is not None and want != len(train.classes):
        raise InputError("data.num_classes", want, f"{train_dir} has {len(train.classes)} class folders")
    channels, side = infer_shape(train)
    if cfg.dataset == "imagenet":
        channels, side = 3, 224
    channels, side = cfg.channels or channels, cfg.image_size or side
    if channels not in (1, 3):
        raise InputError(
            "data.channels", channels, "image folders are read as 1 (grayscale) or 3 (RGB) channels"
        )
    decoded = (len(train.images) + len(test.images)) * channels * side * side
    in_memory = side < IN_MEMORY_BELOW and decoded <= IN_MEMORY_MAX_BYTES
    return FolderInfo(train, test, channels, side, in_memory, tuple(warnings))


def _imagefolder(
    cfg: DataConfig,
) -> tuple[Split, Split, tuple[str, ...], tuple[float, ...], tuple[float, ...]]:
    info = inspect_folders(cfg)
    ratio, size, ch = crop_ratio(cfg.dataset), info.image_size, info.channels
    splits: list[Split] = []
    warnings = list(info.warnings)
    for scan in (info.train, info.test):
        if info.in_memory:
            images, labels, broken = decode_split(scan, size, ch, ratio, cfg.cache_dir)
            if broken and cfg.bad_files == "error":
                raise InputError(
                    "data.bad_files",
                    "error",
                    broken_line(scan.folder, broken) + "; remove them or set data.bad_files=skip",
                )
            if broken:
                warnings.append(broken_line(scan.folder, broken) + "; skipped (data.bad_files=skip)")
            splits.append(TensorSplit(images, labels))
        else:
            labels = torch.tensor([c for _, c, *_ in scan.images], dtype=torch.long)
            splits.append(FolderSplit(scan.samples, labels, size, ratio, mode_of(ch)))
    if cfg.mean is not None:
        mean, std = cfg.mean, cfg.std
    elif cfg.dataset == "imagenet":
        mean, std = STATS["imagenet"]
    elif info.in_memory:
        mean, std = pixel_stats(splits[0].images)
    else:
        mean, std = sample_stats(info.train, size, ch, ratio, cfg.cache_dir)
    return splits[0], splits[1], info.train.classes, (mean, std), tuple(warnings)


def _fake(cfg: DataConfig) -> tuple[TensorSplit, TensorSplit]:
    # a fixed dataset (independent of cfg.seed, like FakeData's random_offset): the seed picks splits only
    s, c, k = cfg.image_size or 32, cfg.channels or 3, cfg.num_classes or 10
    out = []
    for n, tag in ((cfg.fake_size, "train"), (cfg.fake_size // 4, "test")):
        g = _gen("fake", tag, c, s, k)
        x = torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=g)
        y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]  # balanced: every class present
        out.append(TensorSplit(x, y))
    return out[0], out[1]


def _stratified_order(labels: Tensor, g: torch.Generator) -> Tensor:
    """A seeded permutation whose every prefix is (close to) class-proportional."""
    n = labels.numel()
    perm = torch.randperm(n, generator=g)
    lab = labels[perm]
    counts = torch.bincount(lab)
    by_class = torch.argsort(lab, stable=True)
    rank = torch.empty(n, dtype=torch.long)
    rank[by_class] = torch.arange(n) - (torch.cumsum(counts, 0) - counts)[lab[by_class]]
    key = (rank.double() + 0.5) / counts[lab].double()  # position of each image within its class, in [0, 1)
    return perm[torch.argsort(key, stable=True)]


def halves(split: Split, seed: int) -> tuple[Split, Split]:
    """Two disjoint, class-stratified halves of a split (seeded), e.g. DARTS' weight and α halves of
    the training images."""
    order = _stratified_order(split.labels, _gen(seed, "halves"))
    return split.subset(torch.sort(order[0::2]).values), split.subset(torch.sort(order[1::2]).values)


def _take(split: Split, k: int | None, field: str, what: str, g: torch.Generator) -> Split:
    if k is None:
        return split
    if k > len(split):
        raise InputError(field, k, f"larger than the {what} ({len(split)} images)")
    return split.subset(torch.sort(_stratified_order(split.labels, g)[:k]).values)


def val_count(val_size: int | float, n_train: int) -> int:
    """Images held out for validation from a training split of `n_train` images."""
    return max(1, round(val_size * n_train)) if isinstance(val_size, float) else int(val_size)


def load_dataset(cfg: DataConfig) -> DatasetBundle:
    """Load `cfg.dataset`, then (all seeded by `cfg.seed`) hold `val_size` images of the training split
    out as the validation split, take `train_subset` images of the rest for training and `test_subset`
    images of test. The validation split and subsets are stratified by class; the validation split
    does not depend on `train_subset`, so a search and a retraining with different subsets of one run
    share it and neither trains on it."""
    classes: tuple[str, ...] = ()
    stats, warnings = None, ()
    if cfg.dataset == "fashion_mnist":
        train, test = _fashion_mnist(cfg)
        classes = FASHION_MNIST_CLASSES
    elif cfg.dataset in ("cifar10", "cifar100"):
        train, test, classes = _cifar(cfg)
    elif cfg.dataset in ("imagefolder", "imagenet"):
        train, test, classes, stats, warnings = _imagefolder(cfg)
    else:
        train, test = _fake(cfg)
    if isinstance(train, TensorSplit):
        in_ch, size = train.images.shape[1], train.images.shape[2]
    else:
        in_ch, size = len(train.mode), train.image_size
    num_classes = len(classes) or (cfg.num_classes or 10)
    classes = classes or tuple(f"class_{k}" for k in range(num_classes))
    if cfg.mean is not None:
        mean, std = cfg.mean, cfg.std
    elif stats:
        mean, std = stats
    elif cfg.dataset in STATS:
        mean, std = STATS[cfg.dataset]
    else:  # fake: from the (synthetic) training images
        mean, std = pixel_stats(train.images)
    if len(mean) != in_ch:
        raise InputError("data.mean", mean, f"needs {in_ch} value(s), one per channel of the images")

    n_val = val_count(cfg.val_size, len(train))
    if n_val >= len(train):
        raise InputError("data.val_size", cfg.val_size, f"leaves no training image of {len(train)}")
    order = _stratified_order(train.labels, _gen(cfg.seed, "val"))
    val = train.subset(torch.sort(order[:n_val]).values)
    train = train.subset(torch.sort(order[n_val:]).values)
    what = f"training split left once {n_val} validation images are held out"
    train = _take(train, cfg.train_subset, "data.train_subset", what, _gen(cfg.seed, "train_subset"))
    test = _take(test, cfg.test_subset, "data.test_subset", "test split", _gen(cfg.seed, "test_subset"))
    return DatasetBundle(
        cfg.dataset, train, val, test, in_ch, size, num_classes, mean, std, classes, warnings
    )


@dataclass(frozen=True)
class DataFacts:
    """What loading a dataset told: split sizes (training images before any subset) and warnings."""

    train: int
    val: int
    test: int
    warnings: tuple[str, ...]


def resolve_data(cfg: DataConfig) -> tuple[DataConfig, DataFacts]:
    """`cfg` with every value the data decides written out (channels, image size, classes, mean/std:
    what a run records in its config), and the split sizes and warnings of the data. Loads the data
    once without subsets (image folders: scanned, checked, small ones decoded into the cache), so
    every error of the data surfaces here as a one-line InputError."""
    b = load_dataset(cfg.model_copy(update={"train_subset": None, "test_subset": None}))
    update = {"channels": b.in_channels, "image_size": b.image_size, "num_classes": b.num_classes,
              "mean": tuple(b.mean), "std": tuple(b.std)}  # fmt: skip
    return cfg.model_copy(update=update), DataFacts(len(b.train), len(b.val), len(b.test), b.warnings)


# ---------------------------------------------------------------------------------------------- batches
class BatchIterator:
    """Deterministic batches of one split.

    Train mode: each epoch is a permutation seeded by (seed, epoch), padded by wrapping to a multiple of
    `world_size` and dealt to ranks DistributedSampler-style (rank r gets positions r, r+W, ...), cut
    into `batch_size` batches (the last partial batch dropped when `drop_last`). Augmentation (if
    `augment`) draws from a generator seeded by (seed, epoch, batch, rank, world_size).
    Eval mode (`train=False`): split order, no augmentation, last partial batch kept.
    Yields x float32 (B, C, H, W) normalised with `mean`/`std` (pixel/255 units), y int64 (B,).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        seed: int,
        train: bool,
        augment: bool,
        cutout: int = 0,
        mean: Sequence[float],
        std: Sequence[float],
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
        workers: int | None = None,
    ):
        """`workers`: threads decoding image-folder batches (None: min(8, cores))."""
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if len(split) == 0:
            raise InputError("split", 0, "the split holds no images")
        self.split, self.batch_size, self.seed, self.train = split, batch_size, seed, train
        self.augment, self.cutout = augment and train, cutout if train else 0
        self.rank, self.world_size = rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        self.per_rank = math.ceil(len(split) / world_size)
        if self.drop_last and self.per_rank < batch_size:
            hint = f"larger than the {self.per_rank} images per rank; lower it or use more images"
            raise InputError("batch_size", batch_size, hint)
        m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        # (x/255 - m)/s folded into one multiply-subtract per pixel
        self._scale, self._shift = (1 / (255 * s)).view(1, -1, 1, 1), (m / s).view(1, -1, 1, 1)
        self.workers = workers or min(8, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}  # picklable (e.g. sent to a worker process)

    def num_batches(self, epoch: int = 0) -> int:
        """Batches per epoch on this rank (the same every epoch)."""
        full, rest = divmod(self.per_rank, self.batch_size)
        return full + int(rest > 0 and not self.drop_last)

    def indices(self, epoch: int) -> Tensor:
        """This rank's split indices for `epoch`, int64 (per_rank,), in batch order."""
        n = len(self.split)
        g = _gen(self.seed, "order", epoch)  # the same on every rank, so that the shards are disjoint
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        total = self.per_rank * self.world_size
        if total > n:  # pad by wrapping, as DistributedSampler does
            order = order.repeat(math.ceil(total / n))[:total]
        return order[self.rank : total : self.world_size]

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches `start_batch`, `start_batch + 1`, ... of `epoch`; identical to the tail of a full pass.

        Image folders decoded batch by batch: the next `PREFETCH` batches are decoded and augmented by
        a thread pool while the caller works on the current one (PIL releases the GIL while it decodes
        and resizes); each batch's random draws are made here, in batch order, so the result is the
        same whatever the threads do.
        """
        nb = self.num_batches(epoch)
        if not 0 <= start_batch <= nb:
            raise ValueError(f"start_batch={start_batch} outside [0, {nb}]")
        idx = self.indices(epoch)
        plan = []
        for b in range(start_batch, nb):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            g = _gen(self.seed, "aug", epoch, b, self.rank, self.world_size) if self.augment else None
            plan.append((sel, g))
        if isinstance(self.split, FolderSplit):
            yield from self._folder_batches(plan)
            return
        for sel, g in plan:
            yield self._batch(sel, g), self.split.labels[sel]

    def _batch(self, sel: Tensor, g: torch.Generator | None, x: Tensor | None = None) -> Tensor:
        # These ops touch ~1e5 elements: too few to gain from intra-op threads, and on a busy machine each
        # OpenMP region can wait a whole scheduler slice (~8 ms) for a descheduled worker (measured 20x
        # slower epochs). So run them on one thread and hand the caller back its thread count.
        n_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if x is None:  # in memory: gather (and crop + flip) the batch
                x = self.split.images.index_select(0, sel)
                if g is not None:
                    x = _crop_flip(x, g)
            x = x.float().mul_(self._scale).sub_(self._shift)
            if g is not None and self.cutout > 0:
                _cutout_(x, self.cutout, g)
            return x
        finally:
            torch.set_num_threads(n_threads)

    def _folder_batches(
        self, plan: list[tuple[Tensor, torch.Generator | None]]
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """`plan`'s batches of a FolderSplit, decoded `PREFETCH` batches ahead on the thread pool."""
        split = self.split
        assert isinstance(split, FolderSplit)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers)

        def submit(sel: Tensor, g: torch.Generator | None) -> tuple[list, Tensor | None]:
            ids = sel.tolist()
            if g is None:
                return [self._pool.submit(split.__getitem__, i) for i in ids], None
            u = torch.rand(
                len(ids), 10, 4, generator=g
            )  # drawn here, in order, so threads can't reorder them
            flip = torch.rand(len(ids), generator=g) < 0.5
            return [self._pool.submit(split.random_crop, i, uk) for i, uk in zip(ids, u)], flip

        pending: list[tuple[Tensor, torch.Generator | None, list, Tensor | None]] = []
        for k, (sel, g) in enumerate(plan):
            while len(pending) <= PREFETCH and k + len(pending) < len(plan):
                s, gg = plan[k + len(pending)]
                pending.append((s, gg, *submit(s, gg)))
            sel, g, futures, flip = pending.pop(0)
            out = [f.result() for f in futures]
            x = torch.stack([o[0] if isinstance(o, tuple) else o for o in out])
            if flip is not None:
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            yield self._batch(sel, g, x), split.labels[sel]


def _crop_flip(x: Tensor, g: torch.Generator) -> Tensor:
    """Random crop with zero padding (2 px for ≤28 px images, else max(4, H/8)) and horizontal flip
    (p=0.5), per sample, as one gather over the padded uint8 batch (B, C, H, W)."""
    B, C, H, W = x.shape
    p = 2 if H <= 28 else max(4, H // 8)
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    oy = torch.randint(0, 2 * p + 1, (B, 1), generator=g)
    ox = torch.randint(0, 2 * p + 1, (B, 1), generator=g)
    flip = torch.rand(B, 1, generator=g) < 0.5
    cols = torch.where(flip, ox + (W - 1 - torch.arange(W)), ox + torch.arange(W))  # flip = reversed columns
    rows = oy + torch.arange(H)
    flat = (rows[:, :, None] * (W + 2 * p) + cols[:, None, :]).view(B, 1, H * W).expand(B, C, H * W)
    return padded.view(B, C, -1).gather(2, flat).view(B, C, H, W)


def _cutout_(x: Tensor, side: int, g: torch.Generator) -> None:
    """Zero a `side`×`side` square at a random centre of each image, clipped at the borders (DARTS)."""
    B, _, H, W = x.shape
    cy = torch.randint(0, H, (B, 1), generator=g)
    cx = torch.randint(0, W, (B, 1), generator=g)
    r, c = torch.arange(H), torch.arange(W)
    in_r = (r >= cy - side // 2) & (r < cy + side // 2)  # DARTS: [clip(cy - L/2), clip(cy + L/2))
    in_c = (c >= cx - side // 2) & (c < cx + side // 2)
    x.masked_fill_((in_r[:, :, None] & in_c[:, None, :]).unsqueeze(1), 0.0)
