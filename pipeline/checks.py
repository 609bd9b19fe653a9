"""Checks of everything outside the config model: data, GPU, S_min, output folder, resume.

All run before Ray starts and before anything is created; each failure is one `InputError`. The data
check also writes the data's own values (shape, classes, statistics) into the config the run records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dnad.config import DataConfig
from dnad.errors import InputError
from pipeline.config import RunConfig, initial_sparsity, needs_teacher, sweep_points, trial_search_config


@dataclass(frozen=True)
class DataMeta:
    in_channels: int
    image_size: int
    num_classes: int
    train_size: int
    val_size: int
    test_size: int


# keys that may change between a run and its resumption (they do not change any result)
RESUMABLE_CHANGES = ("output", "ray.address", "ray.num_cpus", "ray.max_concurrent", "retrain.cuda_graph",
                     "data.cache_dir", "ray.resource_wait_s", "teacher.cache_dir", "ray.allocator",
                     "ray.kernels")  # fmt: skip
REPO_ROOT = Path(__file__).resolve().parent.parent


def same_repo_file(was: Any, now: Any) -> bool:
    """Whether two saved paths name the same file of this repository from two checkouts (e.g. the
    profile's teacher genotype, when a run is resumed from another clone or machine): `now` lies in
    this checkout and `was` ends with the same repository-relative path."""
    if not (isinstance(was, str) and isinstance(now, str)) or not Path(was).is_absolute():
        return False
    try:
        rel = Path(now).resolve().relative_to(REPO_ROOT).parts
    except (OSError, ValueError):
        return False
    return len(Path(was).parts) > len(rel) and Path(was).parts[-len(rel) :] == rel


@dataclass
class Preflight:
    """What the checks found: the config with the data's own values written out and oversized profile
    subsets capped, whether the output folder holds a run to resume, the data of both stages, and the
    lines to show the user before the run starts (notices and warnings)."""

    cfg: RunConfig
    resuming: bool
    search: DataMeta
    retrain: DataMeta
    notes: list[str]


SUBSETS = (
    ("data.train_subset", "train"),
    ("data.test_subset", "test"),
    ("retrain_data.train_subset", "train"),
)


def fit_data(cfg: RunConfig, explicit: set[str]) -> tuple[RunConfig, list[str]]:
    """Resolve the data (`dnad.data.resolve_data`) and fit the subsets to it: a subset larger than its
    split is an error when the user asked for it (`explicit` keys) and capped, with a notice, when it
    came from the profile."""
    from dnad.data import resolve_data

    data, facts = resolve_data(cfg.data)
    notes = [f"warning: {w}" for w in facts.warnings]
    d = cfg.model_dump(mode="json")
    d["data"] |= data.model_dump(mode="json", exclude={"train_subset", "test_subset"})
    have = {"train": facts.train, "test": facts.test}
    for key, split in SUBSETS:
        section, field = key.split(".")
        value = d[section][field]
        if not isinstance(value, int) or value <= have[split]:
            continue
        where = f"the {split} split" + (
            f" once {facts.val} validation images are held out" if split == "train" else ""
        )
        if key in explicit:
            raise InputError(key, value, f"larger than {where} ({have[split]} images)")
        d[section][field] = have[split]
        notes.append(f"note: {key}={value} (profile) capped to {have[split]}, all of {where}")
    from pipeline.config import validate

    return validate(d), notes


def data_meta(data: DataConfig, workers: int, batch_size: int, field: str) -> DataMeta:
    """Shape and sizes of the data one stage trains on; the batch must fit every worker's shard."""
    from dnad.data import load_dataset

    b = load_dataset(data)
    n = len(b.train)
    if n // workers < batch_size:
        raise InputError(field, batch_size, f"larger than the {n // workers} training images per worker")
    return DataMeta(b.in_channels, b.image_size, b.num_classes, n, len(b.val), len(b.test))


def check_sparsity(cfg: RunConfig) -> None:
    """S_min must lie below the super-network's initial S, or the search stops before it shrinks."""
    for point in sweep_points(cfg):
        s = trial_search_config(cfg, point)
        s0 = initial_sparsity(s)
        if s.shrink.s_min >= s0:
            field = "sweep.s_min" if "s_min" in point else "search.shrink.s_min"
            per = s0 / s.supernet.cells
            hint = f"must be below the super-network's initial S = {s0:.2f} ({s.supernet.cells} cells × {per:.2f})"
            raise InputError(field, s.shrink.s_min, hint)


def check_gpu(cfg: RunConfig) -> None:
    if cfg.ray.use_gpu is True and cfg.ray.address is None:
        import torch

        if not torch.cuda.is_available():
            raise InputError(
                "ray.use_gpu", True, "no CUDA GPU is visible here; use ray.use_gpu=auto or false"
            )


def _writable(path: Path, field: str) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(field, str(path), f"not writable ({probe} is not a writable folder)")


def check_teacher(cfg: RunConfig) -> None:
    d = cfg.search.distill
    if not needs_teacher(cfg):
        return
    t = d.teacher
    if t.kind == "checkpoint":
        if not t.checkpoint or not (Path(t.checkpoint) / "teacher.json").is_file():
            raise InputError(
                "search.distill.teacher.checkpoint", t.checkpoint, "expected a folder with teacher.json"
            )
    elif t.kind == "genotype" and (not t.genotype or not Path(t.genotype).is_file()):
        raise InputError(
            "search.distill.teacher.genotype", t.genotype, "give the path of a genotype JSON file"
        )
    else:
        _writable(Path(cfg.teacher.cache_dir).expanduser(), "teacher.cache_dir")


def _diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [(prefix[:-1], old, new)]


def check_output(cfg: RunConfig, out: Path, fresh: bool) -> bool:
    """Output folder usable? Returns True when it holds a run to resume."""
    if out.exists() and not out.is_dir():
        raise InputError("--output", str(out), "is a file, not a folder")
    _writable(out, "--output")
    saved = out / "config.yaml"
    if out.is_dir() and any(out.iterdir()) and not saved.is_file():
        raise InputError("--output", str(out), "not empty and not a dnad run folder; refusing to touch it")
    if fresh or not saved.is_file():
        return False
    try:
        old = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise InputError("--output", str(saved), f"unreadable saved config ({e}); use --fresh") from None
    try:  # a setting added since that run was saved counts as its default
        old = RunConfig.model_validate(old).model_dump(mode="json")
    except ValidationError:
        pass  # a key that no longer exists: the diff below names it
    diffs = [d for d in _diff(old, cfg.model_dump(mode="json"))
             if d[0] not in RESUMABLE_CHANGES and not same_repo_file(d[1], d[2])]  # fmt: skip
    if diffs:
        key, was, now = diffs[0]
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        hint = f"differs from the run saved in {out} (was {was!r}){more}; add --fresh to start over or use another --output"
        raise InputError(key, now, hint)
    return True


def check_all(cfg: RunConfig, out: Path, fresh: bool, explicit: set[str] = frozenset()) -> Preflight:
    """Every pre-flight check, before anything is created. `explicit`: the keys the user set on the
    command line (their subsets are never capped silently)."""
    check_sparsity(cfg)
    check_gpu(cfg)
    check_teacher(cfg)
    cfg, notes = fit_data(cfg, explicit)
    resuming = check_output(cfg, out, fresh)
    search = data_meta(cfg.data, cfg.ray.workers, cfg.search.batch_size, "search.batch_size")
    retrain = data_meta(cfg.retrain_data_config(), 1, cfg.retrain.batch_size, "retrain.batch_size")
    return Preflight(cfg, resuming, search, retrain, notes)
