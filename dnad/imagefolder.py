"""Image folders (`root/train/<class>/...`, `root/val/<class>/...` or `root/test/<class>/...`): what is
in them, checked before anything runs; their shape and pixel statistics taken from the data; small
datasets decoded once into memory. No Ray in here.

* `scan_split(folder)` lists every file under every class folder and reads each image's header (size,
  mode): readable images, and the files that are not (wrong extension, unreadable header). Cached by
  the listing (names, sizes, mtimes) in `cache_dir`, so a rerun or a worker process does not repeat it.
* `check_split` turns a scan into one-line errors (no class folders, fewer than two classes, a class
  without images, unreadable files under `bad_files="error"`) or warnings (`bad_files="skip"`).
* `infer_shape`: 1 channel when every image is grayscale, else 3; the side is the median shorter side,
  rounded to a multiple of 4, within [16, MAX_AUTO_IMAGE_SIZE].
* `decode_split` decodes a split at the network's size (centre square, `dnad.data.centre_crop`) into
  a uint8 (N, C, S, S) tensor, cached as safetensors; `pixel_stats` gives per-channel mean/std.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dnad.checkpoint import atomic_write_text
from dnad.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
MAX_AUTO_IMAGE_SIZE = 224  # the largest side chosen from the data (ImageNet's); set data.image_size for more
SCAN_FORMAT = 1
BAD_SHOWN = 3  # paths named in a bad-files message


@dataclass(frozen=True)
class SplitScan:
    """One split folder: its classes, readable images (path, class index, width, height, grayscale),
    and the files that are not readable images (path, reason)."""

    folder: str
    classes: tuple[str, ...]
    images: tuple[tuple[str, int, int, int, bool], ...]
    bad: tuple[tuple[str, str], ...]

    @property
    def samples(self) -> list[tuple[str, int]]:
        return [(p, c) for p, c, *_ in self.images]

    def counts(self) -> list[int]:
        """Readable images per class."""
        n = [0] * len(self.classes)
        for _, c, *_ in self.images:
            n[c] += 1
        return n


def _listing(folder: Path) -> tuple[list[str], list[tuple[str, str, int, int]]]:
    """Class folder names and every (class, path, size, mtime) below them; hidden entries skipped."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    files = []
    for c in classes:
        for dirpath, dirnames, filenames in os.walk(folder / c, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                p = os.path.join(dirpath, name)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                files.append((c, p, st.st_size, st.st_mtime_ns))
    return classes, files


def _header(path: str) -> tuple[int, int, bool] | str:
    """(width, height, grayscale) from an image file's header, or why it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    if not path.lower().endswith(IMAGE_EXTENSIONS):
        return "not an image file (extension)"
    try:
        with Image.open(path) as img:
            w, h = img.size
            return (w, h, img.mode in GRAY_MODES) if w > 0 and h > 0 else "empty image"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return f"unreadable ({type(e).__name__})"


def scan_split(folder: str | Path, cache_dir: str | Path | None = None) -> SplitScan:
    """Every file of a split folder classified, cached by its listing in `cache_dir` (None: no cache).

    InputError when the folder does not exist or holds no class folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("data.root", str(folder), "no such folder")
    classes, files = _listing(folder)
    if not classes:
        raise InputError(
            "data.root", str(folder), f"no class folders: expected {folder}/<class>/<image> (.png, .jpg, ...)"
        )
    key = hashlib.sha256(
        json.dumps([SCAN_FORMAT, str(folder.resolve()), classes, files]).encode()
    ).hexdigest()
    cache = Path(cache_dir).expanduser() / f"scan-{key[:24]}.json" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            d = json.loads(cache.read_text())
            return SplitScan(
                d["folder"], tuple(d["classes"]), tuple(map(tuple, d["images"])), tuple(map(tuple, d["bad"]))
            )
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is rebuilt
    index = {c: i for i, c in enumerate(classes)}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        headers = list(pool.map(_header, [p for _, p, _, _ in files], chunksize=256))
    images, bad = [], []
    for (c, p, _, _), h in zip(files, headers):
        if isinstance(h, str):
            bad.append((p, h))
        else:
            images.append((p, index[c], *h))
    scan = SplitScan(str(folder), tuple(classes), tuple(images), tuple(bad))
    if cache is not None:
        try:
            atomic_write_text(cache, json.dumps(asdict(scan)))
        except OSError:
            pass  # an unwritable cache only costs the next run a rescan
    return scan


def bad_files_line(scan: SplitScan) -> str:
    """`3 files under DIR are not readable images (a.txt: not an image file (extension), ...)`."""
    shown = ", ".join(f"{Path(p).relative_to(scan.folder)}: {why}" for p, why in scan.bad[:BAD_SHOWN])
    more = f", and {len(scan.bad) - BAD_SHOWN} more" if len(scan.bad) > BAD_SHOWN else ""
    return f"{len(scan.bad)} file(s) under {scan.folder} are not readable images ({shown}{more})"


def check_split(scan: SplitScan, bad_files: str) -> list[str]:
    """Raise InputError for a split nobody can train on; return the warnings of a usable one."""
    if len(scan.classes) < 2:
        raise InputError(
            "data.root", scan.folder, f"has {len(scan.classes)} class folder ({', '.join(scan.classes)}); "
            "a classifier needs at least two"
        )  # fmt: skip
    empty = [c for c, n in zip(scan.classes, scan.counts()) if n == 0]
    if empty:
        raise InputError(
            "data.root", str(Path(scan.folder) / empty[0]),
            "no readable image in this class folder" + (f" (nor in {len(empty) - 1} other class folders)" if len(empty) > 1 else ""),
        )  # fmt: skip
    if scan.bad and bad_files == "error":
        raise InputError(
            "data.bad_files", "error", bad_files_line(scan) + "; remove them or set data.bad_files=skip"
        )
    return [bad_files_line(scan) + "; skipped (data.bad_files=skip)"] if scan.bad else []


def infer_shape(scan: SplitScan) -> tuple[int, int]:
    """(channels, side) for a split: 1 channel if every image is grayscale, else 3; the median shorter
    side rounded to a multiple of 4, within [16, MAX_AUTO_IMAGE_SIZE]."""
    channels = 1 if all(gray for *_, gray in scan.images) else 3
    side = statistics.median(min(w, h) for _, _, w, h, _ in scan.images)
    return channels, int(min(max(16, 4 * round(side / 4)), MAX_AUTO_IMAGE_SIZE))


def mode_of(channels: int) -> str:
    return "L" if channels == 1 else "RGB"


def _decode_one(path: str, size: int, mode: str, ratio: float) -> torch.Tensor:
    from PIL import Image

    from dnad.data import centre_crop

    with Image.open(path) as img:
        return centre_crop(img.convert(mode), size, ratio)


def decode_split(
    scan: SplitScan, size: int, channels: int, ratio: float, cache_dir: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every readable image of `scan` as a uint8 (N, channels, size, size) tensor (the evaluation view:
    centre square of `ratio` × the shorter side, resized), its int64 labels, and the paths whose body
    turned out not to decode (left out); cached as safetensors."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps([scan.folder, scan.images, size, channels, ratio]).encode()).hexdigest()
    cache = Path(cache_dir).expanduser() / f"pixels-{key[:24]}.safetensors" if cache_dir is not None else None
    paths = [p for p, *_ in scan.images]
    if cache is not None and cache.is_file():
        try:
            d = load_file(str(cache))
            return d["images"], d["labels"], [paths[i] for i in d["broken"].tolist()]
        except Exception:  # safetensors has its own error types; a damaged cache entry is rebuilt
            pass
    mode = mode_of(channels)

    def one(path: str) -> torch.Tensor | None:
        try:
            return _decode_one(path, size, mode, ratio)
        except (OSError, ValueError, SyntaxError):
            return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(one, paths, chunksize=64))
    broken = [i for i, x in enumerate(decoded) if x is None]
    keep = [i for i, x in enumerate(decoded) if x is not None]
    images = (
        torch.stack([decoded[i] for i in keep])
        if keep
        else torch.zeros(0, channels, size, size, dtype=torch.uint8)
    )
    labels = torch.tensor([scan.images[i][1] for i in keep], dtype=torch.long)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        try:
            save_file({"images": images.contiguous(), "labels": labels,
                       "broken": torch.tensor(broken, dtype=torch.long)}, str(tmp))  # fmt: skip
            os.replace(tmp, cache)
        except OSError:
            tmp.unlink(missing_ok=True)
    return images, labels, [paths[i] for i in broken]


def broken_line(folder: str, broken: list[str]) -> str:
    """`2 image(s) under DIR did not decode (a/x.png, ...)`."""
    shown = ", ".join(str(Path(p).relative_to(folder)) for p in broken[:BAD_SHOWN])
    more = f", and {len(broken) - BAD_SHOWN} more" if len(broken) > BAD_SHOWN else ""
    return f"{len(broken)} image(s) under {folder} did not decode ({shown}{more})"


def pixel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images, in pixel/255 units (rounded to 4 digits)."""
    x = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255.0
    mean, std = x.mean(dim=1), x.std(dim=1).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def sample_stats(
    scan: SplitScan,
    size: int,
    channels: int,
    ratio: float,
    cache_dir: str | Path | None = None,
    n: int = 2000,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`pixel_stats` of a fixed sample of at most `n` images (folders too large to decode whole),
    cached by the images listed and the view."""
    key = hashlib.sha256(
        json.dumps([scan.folder, scan.images, size, channels, ratio, n]).encode()
    ).hexdigest()
    cache = Path(cache_dir).expanduser() / f"stats-{key[:24]}.json" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            d = json.loads(cache.read_text())
            return tuple(d["mean"]), tuple(d["std"])
        except (OSError, ValueError, KeyError):
            pass
    idx = torch.randperm(len(scan.images), generator=torch.Generator().manual_seed(0))[:n].tolist()
    sub = SplitScan(scan.folder, scan.classes, tuple(scan.images[i] for i in sorted(idx)), ())
    mean, std = pixel_stats(decode_split(sub, size, channels, ratio)[0])  # broken files left out
    if cache is not None:
        try:
            atomic_write_text(cache, json.dumps({"mean": mean, "std": std}))
        except OSError:
            pass
    return mean, std


def write_split(
    folder: str | Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: tuple[str, ...] | list[str],
    ext: str = ".png",
) -> int:
    """Write uint8 (N, C, H, W) images as `folder/<class>/<i>.<ext>` files (C = 1 or 3); returns N.
    For tests, benchmarks, and turning an in-memory dataset into the folder layout dnad reads."""
    from PIL import Image

    folder = Path(folder)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
    for i, (x, y) in enumerate(zip(images, labels.tolist())):
        arr = x.permute(1, 2, 0).numpy()
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        img.save(
            folder / classes[y] / f"{i:06d}{ext}", **({"quality": 90} if ext in (".jpg", ".jpeg") else {})
        )
    return len(images)
