"""What every stage needs: the config, the output folder layout, stage markers and cluster resources.

Output folder:
    config.yaml               resolved config (plain YAML)
    run.json                  run id (names the Ray runs, so a --fresh run never meets old storage)
    stages/<stage>.json       marker + summary of a finished stage (present = skip on resume)
    search/<trial>/           metrics.jsonl (rank-0 rows), emissions.json
    teacher/                  metrics.jsonl (per epoch) and progress.jsonl (within epochs, display only)
    retrain/<arch_id>.jsonl   per-epoch records of the retrain trial
    retrain/<arch_id>.progress.jsonl  within-epoch rows for the progress line (display only)
    ray/                      Ray storage (checkpoints, Tune state) unless ray.storage is set
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dnad.checkpoint import atomic_write_text
from pipeline.checks import DataMeta
from pipeline.config import RunConfig, to_yaml


def worker_bundle(
    cfg: RunConfig, cluster_cpus: float, node_cpus: float, use_gpu: bool
) -> tuple[float, float]:
    """(CPUs, GPUs) of one search or teacher worker: `ray.cpus_per_worker`, else 1 CPU beside its GPU,
    or without GPUs an equal share of the cluster's CPUs that still fits on its largest node."""
    if cfg.ray.cpus_per_worker:
        return float(cfg.ray.cpus_per_worker), 1.0 if use_gpu else 0.0
    share = min(int(cluster_cpus) // cfg.ray.workers, int(node_cpus))
    return (1.0, 1.0) if use_gpu else (float(max(1, share)), 0.0)


@dataclass
class Resources:
    """Cluster totals as Ray sees them, and whether the work goes to GPUs."""

    cpus: int
    gpus: int
    use_gpu: bool
    node_cpus: int = 0  # CPUs of the largest node (0: the cluster is one node)

    def search_worker(self, cfg: RunConfig) -> int:
        """CPUs of one search (or teacher) worker; with GPUs each worker also holds one GPU."""
        return int(worker_bundle(cfg, self.cpus, self.node_cpus or self.cpus, self.use_gpu)[0])

    def search_concurrency(self, cfg: RunConfig) -> int:
        """How many searches fit on the cluster at once."""
        w = cfg.ray.workers
        n = self.gpus // w if self.use_gpu else self.cpus // (self.search_worker(cfg) * w)
        return max(1, min(n, cfg.ray.max_concurrent or n))

    def retrain_trial(self, cfg: RunConfig) -> dict[str, float]:
        return {"cpu": 1, "gpu": 1} if self.use_gpu else {"cpu": cfg.ray.cpus_per_trial}


@dataclass
class RunContext:
    cfg: RunConfig
    out: Path
    resources: Resources | None = None
    uid: str = ""
    data_meta: DataMeta | None = None  # retrain data (shape for counting params/MACs)
    train_size: int | None = None  # search training images (for the progress total)

    @property
    def storage(self) -> str:
        s = self.cfg.ray.storage
        return s if s else str((self.out / "ray").resolve())

    @property
    def n_points(self) -> int:
        from pipeline.config import sweep_points

        return len(sweep_points(self.cfg))

    def ray_name(self, *parts: str) -> str:
        return "-".join((self.cfg.name, self.uid, *parts))

    # -- folder ----------------------------------------------------------------------------------
    def prepare(self, fresh: bool) -> None:
        """Create (or wipe with --fresh) the output folder and save the resolved config."""
        if fresh and self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        run_file = self.out / "run.json"
        if run_file.is_file():
            self.uid = json.loads(run_file.read_text())["uid"]
        else:
            self.uid = uuid.uuid4().hex[:8]
            atomic_write_text(run_file, json.dumps({"uid": self.uid, "created": time.time()}))
        atomic_write_text(self.out / "config.yaml", to_yaml(self.cfg))

    # -- stage markers ---------------------------------------------------------------------------
    def stage_file(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def stage_done(self, stage: str) -> dict[str, Any] | None:
        f = self.stage_file(stage)
        return json.loads(f.read_text()) if f.is_file() else None

    def mark_done(self, stage: str, info: dict[str, Any]) -> None:
        atomic_write_text(self.stage_file(stage), json.dumps(info, indent=1, default=str))


def thread_count(cpus: float) -> int:
    """Torch threads for a task holding `cpus` logical CPUs (at least 1, at most the cores here)."""
    return max(1, min(int(cpus), os.cpu_count() or 1))
