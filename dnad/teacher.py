"""The frozen teacher's training recipe, cache key and card: plain functions of the library's configs
(no Ray), shared by whoever trains a teacher (the pipeline's teacher stage) and whoever
needs to know what it will cost (`pipeline/run.py describe`). The model itself is `dnad.distill`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dnad.budget import plan_retrain, steps_per_epoch
from dnad.config import DataConfig, RetrainConfig, TeacherConfig

# 2: the accuracy is measured on the validation split; 3: a genotype teacher is keyed by its
# genotype, not by where its file lies (a run resumes from another checkout or machine)
CACHE_FORMAT = 3
GENOTYPE_KEY = "teacher_genotype"  # teacher.json: a genotype teacher's genotype itself


def teacher_recipe(
    t: TeacherConfig, n_train: int, seed: int, max_steps_per_epoch: int | None = None
) -> RetrainConfig:
    """The RetrainConfig a teacher is trained with: SGD at the teacher's own batch and lr, for its
    epochs or `min_steps` steps on `n_train` training images, whichever is longer (`dnad.budget`)."""
    recipe = RetrainConfig(
        C=t.C, epochs=max(t.epochs, 1), min_steps=t.min_steps, batch_size=t.batch_size, lr=t.lr,
        auxiliary_weight=0.0, drop_path=0.0, max_steps_per_epoch=max_steps_per_epoch, seed=seed,
    )  # fmt: skip
    return plan_retrain(recipe, steps_per_epoch(n_train, t.batch_size, 1, max_steps_per_epoch))


def _teacher_identity(t: TeacherConfig) -> dict[str, Any]:
    """The teacher's config with a genotype file replaced by its content."""
    spec = t.model_dump(mode="json")
    if t.kind == "genotype" and t.genotype:
        try:
            spec["genotype"] = json.loads(Path(t.genotype).expanduser().read_text())
        except (OSError, ValueError):
            pass  # unreadable: the path stands in (the config check reports the file itself)
    return spec


def teacher_hash(
    t: TeacherConfig,
    data: DataConfig,
    n_train: int | None,
    stem: str,
    max_steps_per_epoch: int | None = None,
) -> str:
    """16 hex digits of sha256 over everything that changes the trained teacher's weights: the
    teacher (a genotype by its content), the training data's config and size (`n_train`: an image
    folder's config alone does not pin it down), the stem and the per-epoch step cap."""
    spec = {
        "format": CACHE_FORMAT,
        "teacher": _teacher_identity(t),
        "data": data.model_dump(mode="json", exclude={"test_subset", "cache_dir"}),
        "max_steps_per_epoch": max_steps_per_epoch,
        "n_train": n_train,
        "stem": stem,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def teacher_card(
    t: TeacherConfig,
    num_classes: int,
    in_channels: int,
    image_size: int,
    stem: str,
    val_acc: float | None,
    key: str,
) -> dict[str, Any]:
    """The `teacher.json` of a trained teacher: how to rebuild it, its validation accuracy and its
    cache key. A genotype teacher carries its genotype (`GENOTYPE_KEY`): the folder rebuilds it after
    the file it came from has moved or gone (another checkout, machine or cache)."""
    card = {
        "teacher": t.model_dump(mode="json"),
        "num_classes": num_classes,
        "in_channels": in_channels,
        "image_size": image_size,
        "stem": stem,
        "val_acc": val_acc,
        "config_hash": key,
    }
    genotype = genotype_of(t)
    if genotype is not None:
        card[GENOTYPE_KEY] = genotype
    return card


def genotype_of(t: TeacherConfig) -> dict[str, Any] | None:
    """A genotype teacher's genotype as its file holds it (None for other kinds or an unreadable file)."""
    genotype = _teacher_identity(t).get("genotype") if t.kind == "genotype" else None
    return genotype if isinstance(genotype, dict) else None


def teacher_val_acc(path: str | Path) -> float | None:
    """The validation accuracy recorded in a teacher folder's teacher.json (None when unknown)."""
    f = Path(path) / "teacher.json"
    try:
        acc = json.loads(f.read_text()).get("val_acc")
    except (OSError, ValueError):
        return None
    return float(acc) if acc is not None else None
