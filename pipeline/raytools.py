"""Thin helpers around Ray 2.60 (Train V2 is the default there): start/join Ray quietly, build a
TorchTrainer, fit-or-restore a Tuner, and move dnad checkpoints in and out of Ray checkpoints.

Ray 2.60 notes: `ray.air.session`, `TorchTrainer.restore` and `resume_from_checkpoint` are gone; a
Train run resumes by reusing its `name` + `storage_path` (the controller reloads the latest reported
checkpoint, which workers read with `ray.train.get_checkpoint()`). Inside Tune function trainables
the Tune APIs (`ray.tune.report`, `ray.tune.get_checkpoint`, `ray.tune.RunConfig`) are used; a
TorchTrainer may be started from inside such a trial (Train-inside-Tune).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
QUIET_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",  # no Tune/Train status tables
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no CSV/JSON/TensorBoard trial loggers
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DEDUP_LOGS": "0",
    "TUNE_MAX_PENDING_TRIALS_PG": "4",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # quicker start/stop of short runs
}
# a Tune trial that only drives a TorchTrainer reserves (almost) nothing: its workers hold the CPUs/GPUs
DRIVER_TRIAL_RESOURCES = {"cpu": 0, "memory": 2**20}


def start_ray(address: str | None, num_cpus: int | None) -> None:
    """Start a local Ray sized to this machine, or join `address` ('auto' = the running cluster)."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    from pipeline.faults import ENV as FAULTS_ENV

    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": pythonpath, **QUIET_ENV}
    if os.environ.get(FAULTS_ENV):  # test hook (pipeline/faults.py): the workers must see it too
        env[FAULTS_ENV] = os.environ[FAULTS_ENV]
    kw: dict[str, Any] = dict(
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,  # worker output stays in Ray's log files; the driver prints progress
        runtime_env={"env_vars": env},
    )
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kw)
    for name in ("ray", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cluster_totals() -> tuple[int, int]:
    import ray

    r = ray.cluster_resources()
    return int(r.get("CPU", 0)), int(r.get("GPU", 0))


def torch_trainer(
    fn: Callable[[dict], None],
    config: dict[str, Any],
    *,
    name: str,
    storage: str,
    workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    max_failures: int,
):
    """A TorchTrainer (gloo on CPU, NCCL on GPU) keeping the two newest checkpoints."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        fn,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )


def fit_tuner(
    trainable, param_space: dict, *, name: str, storage: str, max_concurrent: int, max_failures: int
):
    """Run a Tune experiment, or restore it (finished trials are kept, unfinished ones resume from
    their last checkpoint, errored ones are retried) when it already exists in storage."""
    from ray import tune

    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_concurrent,
                reuse_actors=False,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
    return tuner.fit()


def _trial_name(trial) -> str:
    """Trials are named after what they run: `t03` (sweep point) or the architecture id."""
    c = trial.config
    return str(
        c["point"]["trial_id"] if "point" in c else c["arch"]["arch_id"] if "arch" in c else trial.trial_id
    )


# -- worker side --------------------------------------------------------------------------------
def worker_setup(threads: int, use_gpu: bool):
    """Torch threads and device of a Ray worker / trial."""
    import torch

    torch.set_num_threads(threads)
    if use_gpu and torch.cuda.is_available():
        try:
            from ray.train.torch import get_device

            return get_device()
        except Exception:  # a Tune trial, not a Train worker
            return torch.device("cuda")
    return torch.device("cpu")


def read_checkpoint(checkpoint) -> dict[str, Any] | None:
    """The dnad state saved inside a Ray checkpoint (None if there is none).

    Ray hands out the latest reported checkpoint; if that one fails verification (truncated or corrupt
    files: `CheckpointError`), the newest valid sibling `checkpoint_*` folder of the same run or trial is
    used instead, with a one-line warning on stderr. With no valid sibling the first error is raised.
    """
    if checkpoint is None:
        return None
    from dnad.errors import CheckpointError

    try:
        return _load(checkpoint)
    except CheckpointError as e:
        first = e
    for sibling in _older_siblings(checkpoint):
        try:
            state = _load(sibling)
        except CheckpointError:
            continue
        older = sibling.path.rstrip("/").rsplit("/", 1)[-1]
        sys.stderr.write(f"warning: unusable checkpoint: {first}; resuming from {older}\n")
        return state
    raise first


def _load(checkpoint) -> dict[str, Any]:
    from dnad.checkpoint import load_checkpoint

    with checkpoint.as_directory() as d:
        return load_checkpoint(Path(d))


def _older_siblings(checkpoint) -> list:
    """The other `checkpoint_*` folders next to `checkpoint` in its storage, newest first."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from dnad.checkpoint import PREFIX

    fs = checkpoint.filesystem
    path = checkpoint.path.rstrip("/")
    parent, _, own = path.rpartition("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(parent or "/"))
    except OSError:
        return []
    names = sorted(
        (i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(PREFIX)),
        reverse=True,
    )
    return [Checkpoint(path=f"{parent}/{n}", filesystem=fs) for n in names if n < own]


def report(
    metrics: dict[str, Any],
    state: dict[str, Any] | None,
    dir_name: str,
    *,
    tune: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> None:
    """`ray.train.report` (or `ray.tune.report`) with `state` saved as a dnad checkpoint folder."""
    from dnad.checkpoint import save_checkpoint

    if tune:
        from ray.tune import Checkpoint as Ckpt
        from ray.tune import report as _report
    else:
        from ray.train import Checkpoint as Ckpt
        from ray.train import report as _report
    if state is None:
        _report(metrics) if tune else _report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as d:
        save_checkpoint(Path(d), state)
        if extra is not None:
            extra(Path(d))
        if tune:
            _report(metrics, checkpoint=Ckpt.from_directory(d))
        else:
            _report(metrics, checkpoint=Ckpt.from_directory(d), checkpoint_dir_name=dir_name)
