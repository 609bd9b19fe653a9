"""A user's own image folders (`dnad.imagefolder`, `dnad.data`): checked before anything runs, shape and
statistics from the data, small images decoded once into memory, large ones decoded ahead of the
training step with batches that do not depend on the threads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dnad.config import DataConfig
from dnad.data import FolderSplit, TensorSplit, load_dataset, resolve_data
from dnad.errors import InputError
from dnad.imagefolder import MAX_AUTO_IMAGE_SIZE, check_split, infer_shape, scan_split, write_split


def _images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)


def make_folder(
    root: Path, n: int = 40, c: int = 3, side: tuple[int, int] = (32, 32), classes=("a", "b"), ext=".png"
):
    labels = torch.arange(n) % len(classes)
    for split, k in (("train", n), ("val", n // 2)):
        write_split(root / split, _images(k, c, side[1], side[0], seed=k), labels[:k], classes, ext)
    return root


def test_shape_classes_and_statistics_come_from_the_data(tmp_path):
    root = make_folder(tmp_path / "rgb", n=40, c=3, side=(40, 30))  # width 40, height 30: shorter side 30
    cfg, facts = resolve_data(
        DataConfig(dataset="imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"))
    )
    assert (cfg.channels, cfg.image_size, cfg.num_classes) == (3, 32, 2)  # 30 -> a multiple of 4
    b = load_dataset(cfg)
    assert isinstance(b.train, TensorSplit) and b.classes == ("a", "b")  # small images: decoded into memory
    pixels = torch.cat([b.train.images, b.val.images]).double() / 255
    assert cfg.mean == pytest.approx(tuple(pixels.mean(dim=(0, 2, 3)).tolist()), abs=1e-4)  # not ImageNet's
    assert (facts.train, facts.val, facts.test) == (36, 4, 20) and facts.warnings == ()
    gray = make_folder(tmp_path / "gray", n=20, c=1, side=(28, 28))
    cfg, _ = resolve_data(DataConfig(dataset="imagefolder", root=str(gray)))
    assert (cfg.channels, cfg.image_size) == (1, 28) and len(cfg.mean) == 1  # grayscale stays one channel
    assert load_dataset(cfg).train.images.shape[1:] == (1, 28, 28)
    big = make_folder(tmp_path / "big", n=6, side=(500, 375))
    assert infer_shape(scan_split(big / "train")) == (3, MAX_AUTO_IMAGE_SIZE)  # capped
    given = load_dataset(DataConfig(dataset="imagefolder", root=str(big), image_size=48, channels=1))
    assert given.image_size == 48 and given.in_channels == 1


def test_the_decoded_images_are_cached_by_the_file_list(tmp_path):
    root = make_folder(tmp_path / "d", n=20)
    cache = tmp_path / "cache"
    cfg = DataConfig(dataset="imagefolder", root=str(root), cache_dir=str(cache))
    a = load_dataset(cfg)
    assert len(list(cache.glob("scan-*.json"))) == 2 and len(list(cache.glob("pixels-*.safetensors"))) == 2
    b = load_dataset(cfg)
    assert torch.equal(a.train.images, b.train.images)
    (root / "train" / "a" / "000000.png").unlink()  # another file list: scanned and decoded again
    c = load_dataset(cfg)
    assert len(c.train) + len(c.val) == len(a.train) + len(a.val) - 1
    assert len(list(cache.glob("scan-*.json"))) == 3


def test_bad_files_are_skipped_with_a_warning_or_refused(tmp_path):
    root = make_folder(tmp_path / "d", n=20)
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "train" / "b" / ".DS_Store").write_bytes(b"\0")  # hidden files are not counted
    _, facts = resolve_data(DataConfig(dataset="imagefolder", root=str(root)))
    (w,) = facts.warnings
    assert w.startswith(
        f"2 file(s) under {root / 'train'} are not readable images (a/notes.txt: not an image"
    )
    assert "b/broken.png: unreadable" in w and "skipped" in w and facts.train + facts.val == 20
    with pytest.raises(
        InputError, match=r"data\.bad_files='error': 2 file\(s\) under .* set data\.bad_files=skip"
    ):
        resolve_data(DataConfig(dataset="imagefolder", root=str(root), bad_files="error"))


@pytest.mark.parametrize(
    ("scene", "text"),
    [
        ("one_class", "has 1 class folder (a); a classifier needs at least two"),
        ("empty_class", "no readable image in this class folder"),
        ("only_junk_class", "no readable image in this class folder"),
        ("other_classes", "its class folders differ from train/'s"),
        ("no_val", "has train/ but no val/"),
        ("no_classes", "no class folders"),
    ],
)
def test_folders_nobody_can_train_on_are_one_line_errors(tmp_path, scene, text):
    root = tmp_path / "d"
    if scene == "one_class":
        make_folder(root, classes=("a",))
    elif scene == "no_classes":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    else:
        make_folder(root)
        if scene == "empty_class":
            (root / "train" / "c").mkdir()
            (root / "val" / "c").mkdir()
        if scene == "only_junk_class":
            for s in ("train", "val"):
                (root / s / "c").mkdir()
                (root / s / "c" / "x.txt").write_text("x")
        if scene == "other_classes":
            (root / "val" / "b").rename(root / "val" / "z")
        if scene == "no_val":
            import shutil

            shutil.rmtree(root / "val")
    with pytest.raises(InputError, match=r"data\.root") as e:
        resolve_data(DataConfig(dataset="imagefolder", root=str(root)))
    assert text in str(e.value) and "\n" not in str(e.value)


def test_large_images_are_decoded_ahead_and_batches_do_not_depend_on_the_threads(tmp_path):
    root = make_folder(tmp_path / "d", n=24, side=(160, 140), ext=".jpg")
    b = load_dataset(DataConfig(dataset="imagefolder", root=str(root), val_size=4))
    assert isinstance(b.train, FolderSplit) and b.image_size == 140 and len(b.train) == 20

    def batches(workers: int, epoch: int = 0, start: int = 0) -> list[torch.Tensor]:
        it = b.iterator("train", 4, seed=3, augment=True, cutout=8)
        it.workers = workers
        return [x for x, _ in it.iterate(epoch, start_batch=start)]

    one, many = batches(1), batches(3)
    assert len(one) == 5 and all(torch.equal(x, y) for x, y in zip(one, many))
    assert all(torch.equal(x, y) for x, y in zip(one[2:], batches(3, start=2)))  # resume mid-epoch
    assert not torch.equal(one[0], batches(1, epoch=1)[0])
    ev = [x for x, _ in b.iterator("val", 3, seed=0).iterate(0)]
    assert [len(x) for x in ev] == [3, 1] and ev[0].shape[1:] == (3, 140, 140)


def test_an_image_whose_body_is_broken_becomes_black_with_one_warning(tmp_path, caplog):
    root = make_folder(tmp_path / "d", n=8, side=(160, 160), ext=".jpg")
    victim = root / "train" / "a" / "000000.jpg"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])  # the header survives: it passes the scan
    b = load_dataset(DataConfig(dataset="imagefolder", root=str(root), val_size=1))
    idx = next(i for i, (p, _) in enumerate(b.train.samples) if p == str(victim))
    with caplog.at_level("WARNING"):
        x, _ = b.train[idx]
        b.train[idx]
    assert x.shape == (3, 160, 160) and int(x.max()) == 0  # black, the run goes on
    assert sum("unreadable image" in r.message and str(victim) in r.message for r in caplog.records) == 1
    ok, _ = b.train[(idx + 1) % len(b.train)]
    assert int(ok.max()) > 0


def test_check_split_counts_classes_after_skipping(tmp_path):
    root = make_folder(tmp_path / "d", n=10)
    scan = scan_split(root / "train")
    assert scan.counts() == [5, 5] and check_split(scan, "skip") == []
    assert np.median([w for _, _, w, _, _ in scan.images]) == 32
