"""A user's own folder of real images through the default profile, end to end: 1,500 Fashion-MNIST
images written as PNG class folders, `pipeline/run.py data.dataset=imagefolder data.root=DIR` with the
stage budgets shortened for CI, and a family whose best model is far above chance on validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dnad.config import DataConfig
from dnad.data import load_dataset
from dnad.imagefolder import write_split

REPO = Path(__file__).resolve().parent.parent
SHORT = [
    "search.epochs=2",
    "search.min_steps=30",  # two epochs of 17 steps: one warm-up, one shrinking
    # the profile's shrink constants are tuned for 248 shrinking steps; rescaled to these 17 the
    # stability window would be one step and the search would emit at almost every step (tuned for 100:
    # 6 architectures to retrain); tuned for 34, the same 17 steps give three
    "search.shrink.tuned_steps=34",
    "search.distill.teacher.min_steps=30",
    "retrain.min_steps=50",  # three epochs of these 1,125 images: the best clears 50 % with a margin
    "deploy.onnx=false",  # ONNX has its own tests (test_models.py); here the data path is the subject
    "deploy.latency_batch=1",
]


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory) -> Path:
    """1,250 training and 250 validation Fashion-MNIST images as 28×28 grayscale PNGs."""
    root = tmp_path_factory.mktemp("own") / "clothes"
    fm = load_dataset(DataConfig(train_subset=1250, val_size=250))
    classes = tuple(c.replace("/", "-") for c in fm.classes)  # "T-shirt/top" is no folder name
    write_split(root / "train", fm.train.images, fm.train.labels, classes)
    write_split(root / "val", fm.val.images, fm.val.labels, classes)
    return root


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.data
def test_the_default_profile_on_a_folder_of_real_images(png_folder, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "pipeline/run.py"), "data.dataset=imagefolder", f"data.root={png_folder}",
           f"data.cache_dir={tmp_path / 'data-cache'}", f"teacher.cache_dir={tmp_path / 'teachers'}", "--output",
           str(out), *SHORT]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout
    # the profile's subsets were capped to what the folder has, and said so
    assert "note: data.train_subset=4000 (profile) capped to 1125, all of the train split once 125" in log
    assert "data     imagefolder" in log and "1x28x28, 10 classes" in log
    cfg = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert (cfg["channels"], cfg["image_size"], cfg["num_classes"]) == (1, 28, 10)  # from the data
    assert abs(cfg["mean"][0] - 0.286) < 0.02  # computed from these images, not ImageNet's 0.485
    assert "[teacher] validation accuracy" in log and "finished in" in log and " failed" not in log
    archs = pd.read_parquet(out / "architectures.parquet")
    ok = archs[archs["status"] == "ok"]
    assert len(ok) >= 2
    assert ok["val_acc"].max() >= 0.5  # 10 classes: chance is 0.1
    best = ok.loc[ok["val_acc"].idxmax()]
    some = next((png_folder / "val").glob("*/*.png"))
    pred = subprocess.run([sys.executable, str(REPO / "pipeline/predict.py"), str(out / best["model_dir"]),
                           str(some)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert pred.returncode == 0 and len(pred.stdout.splitlines()) == 6, pred.stderr
