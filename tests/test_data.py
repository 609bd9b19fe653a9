import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision

from dnad.config import DataConfig
from dnad.data import BatchIterator, TensorSplit, load_dataset
from dnad.errors import DatasetNotFoundError, InputError

FAKE = DataConfig(dataset="fake", fake_size=640, val_size=128)  # 512 training images


def _rows(images: torch.Tensor) -> set[bytes]:
    return {bytes(r) for r in images.reshape(len(images), -1).numpy()}


def _denorm(x: torch.Tensor, mean, std) -> torch.Tensor:
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return ((x * s + m) * 255).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------ Fashion-MNIST
@pytest.mark.data
def test_real_fashion_mnist():
    b = load_dataset(DataConfig())
    assert (len(b.train), len(b.val), len(b.test)) == (54000, 6000, 10000)  # val_size 0.1 of train
    assert b.train.images.shape == (54000, 1, 28, 28) and b.train.images.dtype == torch.uint8
    assert b.test.images.shape == (10000, 1, 28, 28)
    assert (b.in_channels, b.image_size, b.num_classes) == (1, 28, 10)
    assert b.train.labels.dtype == torch.int64 and b.train.labels.min() == 0 and b.train.labels.max() == 9
    assert torch.bincount(b.train.labels).tolist() == [5400] * 10  # stratified
    assert torch.bincount(b.val.labels).tolist() == [600] * 10
    assert not _rows(b.train.images[:2000]) & _rows(b.val.images)
    assert b.mean == (0.2860,) and b.std == (0.3530,)
    # the statistics match the data
    assert abs(b.train.images.float().mean().item() / 255 - 0.2860) < 1e-3


def test_fashion_mnist_missing_root(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(DataConfig(root=str(tmp_path / "nope")))
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "data.root" in msg and "\n" not in msg


def _write_idx(path, arr: np.ndarray, magic: int, gz: bool) -> None:
    raw = struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


def _tiny_fmnist(root, gz=True, n=(30, 10)) -> None:
    rng = np.random.default_rng(0)
    for part, k in zip(("train", "t10k"), n):
        ext = ".gz" if gz else ""
        _write_idx(root / f"{part}-images-idx3-ubyte{ext}", rng.integers(0, 256, (k, 28, 28)), 0x803, gz)
        _write_idx(root / f"{part}-labels-idx1-ubyte{ext}", np.arange(k) % 10, 0x801, gz)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_parser(tmp_path, gz):
    _tiny_fmnist(tmp_path, gz)
    b = load_dataset(DataConfig(root=str(tmp_path)))
    assert b.train.images.shape == (27, 1, 28, 28) and len(b.val) == 3 and len(b.test) == 10
    assert sorted(b.train.labels.tolist() + b.val.labels.tolist()) == sorted(i % 10 for i in range(30))


def test_fashion_mnist_corrupt_file(tmp_path):
    _tiny_fmnist(tmp_path)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    _write_idx(bad, np.zeros((10, 28, 28)), 0x801, True)  # wrong magic
    with pytest.raises(InputError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_dataset(DataConfig(root=str(tmp_path)))
    with gzip.open(bad, "wb") as f:  # right magic, truncated body
        f.write(struct.pack(">IIII", 0x803, 10, 28, 28) + b"\0" * 100)
    with pytest.raises(InputError, match="truncated"):
        load_dataset(DataConfig(root=str(tmp_path)))


# ------------------------------------------------------------------------------------------------ CIFAR
def test_cifar_needs_root(tmp_path):
    with pytest.raises(InputError, match=r"data\.root"):
        load_dataset(DataConfig(dataset="cifar10"))
    with pytest.raises(InputError, match="cifar-10-batches-py"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))
    with pytest.raises(InputError, match="cifar-100-python"):
        load_dataset(DataConfig(dataset="cifar100", root=str(tmp_path)))


def _write_cifar(root, hundred: bool, n: int = 20) -> None:
    cls = torchvision.datasets.CIFAR100 if hundred else torchvision.datasets.CIFAR10
    d = root / cls.base_folder
    d.mkdir(parents=True)
    key = "fine_labels" if hundred else "labels"
    rng = np.random.default_rng(0)
    for i, (name, _) in enumerate(cls.train_list + cls.test_list):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, 0] = i  # first red pixel tags the file
        with open(d / name, "wb") as f:
            pickle.dump({"data": data, key: [(j * 7) % (100 if hundred else 10) for j in range(n)]}, f)
    names = [f"c{i}" for i in range(100 if hundred else 10)]
    with open(d / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: names}, f)


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_from_fake_pickles(tmp_path, monkeypatch, hundred):
    _write_cifar(tmp_path, hundred)
    name = "cifar100" if hundred else "cifar10"
    with pytest.raises(InputError, match="corrupt"):  # torchvision checks md5s on every load
        load_dataset(DataConfig(dataset=name, root=str(tmp_path)))
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda p, md5=None: os.path.isfile(p))
    b = load_dataset(DataConfig(dataset=name, root=str(tmp_path)))
    n_train = 100 if not hundred else 20  # five batch files vs one "train" file
    assert len(b.train) + len(b.val) == n_train and len(b.val) == n_train // 10
    assert b.train.images.shape[1:] == (3, 32, 32) and b.test.images.shape == (20, 3, 32, 32)
    assert (b.in_channels, b.image_size, b.num_classes) == (3, 32, 100 if hundred else 10)
    assert b.train.labels.dtype == torch.int64 and b.test.labels[:3].tolist() == [0, 7, 14 % b.num_classes]
    assert b.test.images[:, 0, 0, 0].unique().tolist() == [5 if not hundred else 1]  # HWC -> CHW kept pixels
    assert len(b.mean) == 3 and b.mean[0] == (0.5071 if hundred else 0.4914)
    # the batches folder itself is accepted as root
    cls = torchvision.datasets.CIFAR100 if hundred else torchvision.datasets.CIFAR10
    b2 = load_dataset(DataConfig(dataset=name, root=str(tmp_path / cls.base_folder)))
    assert torch.equal(b2.train.images, b.train.images)


# ------------------------------------------------------------------------------------------ ImageFolder
def _write_tree(root, sizes=((40, 30), (20, 50), (33, 33))) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, k in (("train", 3), ("val", 2)):
        for cls in ("ant", "bee"):
            (root / split / cls).mkdir(parents=True)
            for i in range(k):
                w, h = sizes[i % len(sizes)]
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{i}.png")


def test_imagefolder(tmp_path):
    _write_tree(tmp_path)
    b = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16))
    # small images are decoded once into memory (tests/test_imagefolder.py: large ones batch by batch)
    assert isinstance(b.train, TensorSplit) and (len(b.train), len(b.val), len(b.test)) == (5, 1, 4)
    assert (b.in_channels, b.image_size, b.num_classes, b.classes) == (3, 16, 2, ("ant", "bee"))
    x, y = b.test[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == 0
    it = b.iterator("train", 4, seed=1, augment=True, cutout=4)
    batches = list(it.iterate(0))
    assert (
        len(batches) == 1 and batches[0][0].shape == (4, 3, 16, 16) and batches[0][0].dtype == torch.float32
    )
    again = list(b.iterator("train", 4, seed=1, augment=True, cutout=4).iterate(0))
    assert torch.equal(batches[0][0], again[0][0])  # threads do not change the random crops
    ev = list(b.iterator("test", 3, seed=0).iterate(0))
    assert [len(yb) for _, yb in ev] == [3, 1]
    assert torch.cat([yb for _, yb in ev]).tolist() == [0, 0, 1, 1]
    assert torch.equal(_denorm(ev[0][0][:1], b.mean, b.std), x.unsqueeze(0))
    pickle.loads(pickle.dumps(it))  # the thread pool does not travel
    # imagenet = imagefolder with 1000 classes unless told otherwise
    with pytest.raises(InputError, match=r"data\.num_classes"):
        load_dataset(DataConfig(dataset="imagenet", root=str(tmp_path)))
    b = load_dataset(DataConfig(dataset="imagenet", root=str(tmp_path), num_classes=2, val_size=0.5))
    assert b.mean == (0.485, 0.456, 0.406) and len(b.val) == 3 and len(b.train) == 3


def test_imagefolder_empty(tmp_path):
    with pytest.raises(InputError, match=r"data\.root"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path / "missing")))
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(InputError, match="train"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)))


# -------------------------------------------------------------------------------------- fake and subsets
def test_fake_shapes_and_determinism():
    b = load_dataset(DataConfig(dataset="fake", fake_size=40, channels=1, image_size=12, num_classes=4))
    assert isinstance(b.train, TensorSplit) and b.train.images.shape == (36, 1, 12, 12) and len(b.val) == 4
    assert b.test.images.shape == (10, 1, 12, 12) and (b.in_channels, b.image_size, b.num_classes) == (
        1,
        12,
        4,
    )
    assert (
        torch.bincount(b.train.labels).tolist() == [9] * 4
        and torch.bincount(b.val.labels).tolist() == [1] * 4
    )
    b2 = load_dataset(
        DataConfig(dataset="fake", fake_size=40, channels=1, image_size=12, num_classes=4, seed=3)
    )
    # the data are fixed; the seed picks the splits
    assert _rows(torch.cat([b.train.images, b.val.images])) == _rows(
        torch.cat([b2.train.images, b2.val.images])
    )
    assert _rows(b.val.images) != _rows(b2.val.images)
    b3 = load_dataset(FAKE)
    assert b3.train.images.shape == (512, 3, 32, 32) and len(b3.test) == 160
    assert b3.mean == pytest.approx((0.5,) * 3, abs=0.01) and b3.std == pytest.approx((0.289,) * 3, abs=0.01)


def test_subsets_and_val_split():
    """The validation split is held out of the whole training split first (stratified, seeded), so it
    is the same whatever `train_subset` is and never overlaps any training subset."""
    cfg = DataConfig(dataset="fake", fake_size=500, train_subset=200, val_size=0.2, test_subset=50)
    b = load_dataset(cfg)
    assert (len(b.train), len(b.val), len(b.test)) == (200, 100, 50)
    whole = load_dataset(DataConfig(dataset="fake", fake_size=500, val_size=100))
    assert len(whole.train) == 400 and len(whole.val) == 100
    tr, va = _rows(b.train.images), _rows(b.val.images)
    assert len(tr) == 200 and not tr & va and va == _rows(whole.val.images)  # same val for any subset
    assert tr <= _rows(whole.train.images)
    assert _rows(b.test.images) <= _rows(whole.test.images)
    assert torch.bincount(b.val.labels, minlength=10).tolist() == [10] * 10  # stratified
    assert torch.bincount(b.train.labels, minlength=10).tolist() == [20] * 10
    same = load_dataset(cfg)
    assert torch.equal(same.train.images, b.train.images) and torch.equal(same.val.images, b.val.images)
    other = load_dataset(cfg.model_copy(update={"seed": 1}))
    assert _rows(other.val.images) != va
    with pytest.raises(ValueError, match="val_size"):
        DataConfig(val_size=0)
    with pytest.raises(InputError, match=r"data\.val_size=500.*leaves no training image"):
        load_dataset(DataConfig(dataset="fake", fake_size=500, val_size=500))


def test_subset_too_large():
    with pytest.raises(InputError, match=r"data\.train_subset=600.*51 validation images.*461 images"):
        load_dataset(DataConfig(dataset="fake", train_subset=600))
    with pytest.raises(InputError, match=r"data\.test_subset=129.*128"):
        load_dataset(DataConfig(dataset="fake", test_subset=129))


# ------------------------------------------------------------------------------------------- iterators
@pytest.fixture(scope="module")
def fake():
    return load_dataset(FAKE)


def _it(b, batch_size=32, **kw):
    args = {"seed": 0, "train": True, "augment": True, "cutout": 8, "mean": b.mean, "std": b.std} | kw
    return BatchIterator(b.train, batch_size, **args)


def test_same_seed_same_batches(fake):
    a, b = list(_it(fake).iterate(0)), list(_it(fake).iterate(0))
    assert len(a) == 16 and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b)
    )
    assert (
        a[0][0].shape == (32, 3, 32, 32) and a[0][0].dtype == torch.float32 and a[0][1].dtype == torch.int64
    )
    c = list(_it(fake, seed=1).iterate(0))
    assert not torch.equal(a[0][0], c[0][0])


def test_epochs_shuffle(fake):
    it = _it(fake)
    assert not torch.equal(it.indices(0), it.indices(1))
    assert sorted(it.indices(0).tolist()) == sorted(it.indices(1).tolist()) == list(range(512))


def test_resume_mid_epoch(fake):
    it = _it(fake)
    full = list(it.iterate(3))
    tail = list(_it(fake).iterate(3, start_batch=5))
    assert len(tail) == len(full) - 5 == it.num_batches(3) - 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[5:], tail))
    assert list(it.iterate(3, start_batch=it.num_batches(3))) == []


@pytest.mark.parametrize("world", [2, 3])
def test_rank_sharding(fake, world):
    shards = [_it(fake, rank=r, world_size=world).indices(4) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    allidx = torch.cat(shards)
    assert set(allidx.tolist()) == set(range(512))  # covering
    assert len(allidx) - len(set(allidx.tolist())) == len(allidx) - 512  # only the wrapped padding repeats
    if 512 % world == 0:
        assert len(allidx) == 512  # disjoint
    xs = [next(iter(_it(fake, rank=r, world_size=world).iterate(4)))[0] for r in range(world)]
    assert not torch.equal(xs[0], xs[1])


def test_no_augment_is_identity(fake):
    it = _it(fake, augment=False, cutout=8)
    idx = it.indices(0)
    x, y = next(iter(it.iterate(0)))
    assert torch.equal(_denorm(x, fake.mean, fake.std), fake.train.images[idx[:32]])
    assert torch.equal(y, fake.train.labels[idx[:32]])


def test_augment_is_padded_crop_and_flip(fake):
    it = _it(fake, cutout=0, batch_size=8)
    idx = it.indices(0)
    x, _ = next(iter(it.iterate(0)))
    assert x.shape == (8, 3, 32, 32)
    got = _denorm(x, fake.mean, fake.std)
    flips = 0
    for k in range(8):
        padded = torch.nn.functional.pad(fake.train.images[idx[k]], (4, 4, 4, 4))
        cands = [(f, dy, dx) for f in (0, 1) for dy in range(9) for dx in range(9)]
        match = [c for c in cands if torch.equal((lambda v: v.flip(2) if c[0] else v)(padded[:, c[1] : c[1] + 32, c[2] : c[2] + 32]), got[k])]  # fmt: skip
        assert match, f"sample {k} is not a padded crop (+flip) of its source"
        flips += match[0][0]
    assert 0 < flips < 8
    assert not torch.equal(got, fake.train.images[idx[:8]])


def test_cutout_zeroes_a_square(fake):
    x, _ = next(iter(_it(fake, cutout=8).iterate(0)))
    zeros = (x == 0).sum(dim=(2, 3))  # uint8 data never normalises to exactly 0 with mean 0.5
    assert ((zeros >= 16) & (zeros <= 64)).all() and (zeros[:, 0] == zeros[:, 1]).all()
    x1, _ = next(iter(_it(fake, cutout=0).iterate(0)))
    assert (x1 == 0).sum() == 0


def test_eval_covers_test_once(fake):
    it = BatchIterator(
        fake.test, 50, seed=0, train=False, augment=True, cutout=8, mean=fake.mean, std=fake.std
    )
    batches = list(it.iterate(7))
    assert [len(y) for _, y in batches] == [50, 50, 50, 10] and it.num_batches(0) == 4
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(_denorm(x, fake.mean, fake.std), fake.test.images)  # in order, unaugmented
    assert torch.equal(torch.cat([b[1] for b in batches]), fake.test.labels)


def test_drop_last_and_batch_too_large(fake):
    it = _it(fake, batch_size=100)
    assert it.num_batches(0) == 5 and all(len(y) == 100 for _, y in it.iterate(0))
    with pytest.raises(InputError, match="batch_size=600"):
        _it(fake, batch_size=600)
