"""Thin helpers around Ray 2.60 (Train V2 is the default there): start/join Ray quietly, build a
TorchTrainer, fit-or-restore a Tuner, and move dnad checkpoints in and out of Ray checkpoints.

Ray 2.60 notes: `ray.air.session`, `TorchTrainer.restore` and `resume_from_checkpoint` are gone; a
Train run resumes by reusing its `name` + `storage_path` (the controller reloads the latest reported
checkpoint, which workers read with `ray.train.get_checkpoint()`). Inside Tune function trainables
the Tune APIs (`ray.tune.report`, `ray.tune.get_checkpoint`, `ray.tune.RunConfig`) are used; a
TorchTrainer may be started from inside such a trial (Train-inside-Tune).
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from dnad.errors import InputError
from pipeline.config import RunConfig
from pipeline.progress import fmt_duration

REPO_ROOT = Path(__file__).resolve().parent.parent
QUIET_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",  # no Tune/Train status tables
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no CSV/JSON/TensorBoard trial loggers
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DEDUP_LOGS": "0",
    "TUNE_MAX_PENDING_TRIALS_PG": "4",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # quicker start/stop of short runs
    # Ctrl-C is a KeyboardInterrupt here (Tune's own handler would end fit() as if the trials had
    # stopped, and the run would read as failed): the driver stops, the trials' checkpoints stay
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
}
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# a Tune trial that only drives a TorchTrainer reserves (almost) nothing: its workers hold the CPUs/GPUs
DRIVER_TRIAL_RESOURCES = {"cpu": 0, "memory": 2**20}


# glibc's malloc was ~10 % of a retraining step (perf, 2026-12-02); with tcmalloc preloaded the step
# ran 1.1x faster, bit for bit the same numbers (README, Speed)
TCMALLOC = "libtcmalloc_minimal.so.4"
LIB_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)


def find_tcmalloc(dirs: tuple[str, ...] = LIB_DIRS) -> str | None:
    """The path of this machine's tcmalloc (Debian/Ubuntu: apt install libtcmalloc-minimal4), or None."""
    return next((str(Path(d) / TCMALLOC) for d in dirs if (Path(d) / TCMALLOC).is_file()), None)


def worker_preload(allocator: str, joined: bool, env: dict[str, str] | None = None) -> str | None:
    """What the Ray workers get as LD_PRELOAD for `ray.allocator` (None: the system's malloc). 'auto'
    on a local Ray: this machine's tcmalloc if it has one; on a joined cluster the library's name,
    which each node's loader resolves itself (a node without it runs on its system malloc; ld.so
    notes that in the worker's log). An LD_PRELOAD the user already set is left alone under 'auto'."""
    env = os.environ if env is None else env
    if allocator == "system" or (allocator == "auto" and env.get("LD_PRELOAD")):
        return None
    if allocator == "auto":
        return TCMALLOC if joined else find_tcmalloc()
    return allocator


def check_allocator(allocator: str, joined: bool) -> None:
    """A `ray.allocator` path must be a shared library on this machine (a joined cluster's nodes are
    not checked: the path is theirs)."""
    if allocator in ("auto", "system"):
        return
    hint = "use auto, system or the path of a malloc library (e.g. /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4)"
    path = Path(allocator)
    if not path.is_absolute():
        raise InputError("ray.allocator", allocator, f"not an absolute path; {hint}")
    if joined:
        return
    if not path.is_file():
        raise InputError("ray.allocator", allocator, f"no such file; {hint}")
    with path.open("rb") as f:
        if f.read(4) != b"\x7fELF":
            raise InputError("ray.allocator", allocator, f"not a shared library (no ELF header); {hint}")


def worker_env(address: str | None, allocator: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables every Ray worker of this run gets (`runtime_env.env_vars`)."""
    from pipeline.faults import ENV as FAULTS_ENV

    environ = dict(os.environ) if environ is None else environ
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": pythonpath, **QUIET_ENV}
    preload = worker_preload(allocator, address is not None, environ)
    if preload:  # Ray execs each worker with these variables set, so the loader sees them at its start
        env["LD_PRELOAD"] = preload
        env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] = str(1 << 40)  # no "large alloc" lines in the logs
    if not address:
        # one node, nothing to drain: Ray Train's preemption watcher (an actor per Train run that polls
        # for node drains) would only cost a worker process, 3.3-3.5 s of CPU each (smoke run,
        # 2026-12-07); a value the user set is kept
        env[PREEMPTION_WATCHER] = environ.get(PREEMPTION_WATCHER, "0")
    if environ.get(FAULTS_ENV):  # test hook (pipeline/faults.py): the workers must see it too
        env[FAULTS_ENV] = environ[FAULTS_ENV]
    return env


def start_ray(address: str | None, num_cpus: int | None, allocator: str = "auto") -> None:
    """Start a local Ray sized to this machine, or join `address` ('auto' = the running cluster); its
    workers run with `worker_preload(allocator)` as their malloc."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    env = worker_env(address, allocator)
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


AUTH_HINT = (
    "copy the head's token (`ray get-auth-token` on the head prints it) to ~/.ray/auth_token here, "
    "or point RAY_AUTH_TOKEN_PATH at a file holding it (docs/cluster.md#authentication)"
)


def check_address(address: str | None, timeout: float = 5.0, reply_s: float = 10.0) -> None:
    """Refuse, in seconds and in one line, an `--address` at which no Ray cluster answers (ray.init
    would otherwise retry for minutes), or a cluster that requires a token this machine does not
    have (ray.init would retry and then fail without saying why). 'auto' needs a cluster started on
    this machine (`ray start`). A token found here turns on RAY_AUTH_MODE=token for this process."""
    if address is None:
        return
    if address == "auto":
        from ray._private.services import find_bootstrap_address

        found = os.environ.get("RAY_ADDRESS") or find_bootstrap_address(None)
        if not found:
            raise InputError("ray.address", "auto", "no Ray cluster runs on this machine; start one with "
                             "`ray start --head` (or `ray up ray_cluster.yaml`) or give its host:port")  # fmt: skip
        if not found.startswith("ray://"):
            check_auth("auto", found, reply_s)
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise InputError(
            "ray.address", address, "expected host:port (e.g. 10.0.0.5:6379), ray://host:port or auto"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError | socket.timeout) else (e.strerror or str(e))
        raise InputError(
            "ray.address", address, f"no Ray cluster answers there ({why} after at most {timeout:.0f} s); "
            "check the head's address and port (ray start --head prints them) and that the port is reachable"
        ) from None  # fmt: skip
    if not address.startswith("ray://"):  # Ray Client addresses are not the GCS: ray.init checks those
        check_auth(address, hostport, reply_s)


@contextlib.contextmanager
def _quiet_stderr(still_busy: Callable[[], bool]) -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block (output of native code included). If
    `still_busy()` at the end (a native thread that may go on logging), fd 2 stays quiet and Python's
    `sys.stderr` moves to a copy of the real one, so the process's own messages still show."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        if still_busy():
            sys.stderr = os.fdopen(saved, "w", buffering=1)
        else:
            os.dup2(saved, 2)
            os.close(saved)
        os.close(null)


def token_source() -> str | None:
    """Where this machine's Ray auth token comes from, in Ray's own order (RAY_AUTH_TOKEN, the file at
    RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); None when there is none. The token itself is never read
    into a message."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        p = Path(path).expanduser()
        try:
            ok = p.stat().st_size > 0
        except OSError:
            ok = False
        if not ok:
            raise InputError("RAY_AUTH_TOKEN_PATH", path, "cannot be read or is empty; " + AUTH_HINT)
        return str(p)
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() and default.stat().st_size > 0 else None


def check_auth(address: str, gcs_address: str, reply_s: float = 10.0) -> None:
    """Ask the head's GCS for its cluster id the way ray.init will and refuse in one line when it
    requires a token that is missing or not the cluster's. Token mode is turned on for this process
    (and what it starts) only when the cluster asks for it and a token is found here: a driver that
    sends a token to an open cluster connects, but its trials' actors never start there."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    source = None if mode == "disabled" else token_source()
    if mode == "token" and source is None:  # ray.init would abort the process
        raise InputError("RAY_AUTH_MODE", "token", "no Ray auth token was found here; " + AUTH_HINT)
    from ray.exceptions import AuthenticationError

    error = _probe_gcs(address, gcs_address, reply_s)
    if isinstance(error, AuthenticationError) and source is not None and mode != "token":
        from ray._raylet import Config

        os.environ["RAY_AUTH_MODE"] = "token"  # this process and everything it starts sends the token
        Config.initialize("")
        error = _probe_gcs(address, gcs_address, reply_s)
    if isinstance(error, AuthenticationError):
        if mode == "disabled":
            why = "RAY_AUTH_MODE=disabled is set here"
        elif source is None:
            why = "no token was found here"
        else:
            why = f"the token from {source} is not the cluster's"
        raise InputError(
            "ray.address", address, f"the cluster requires authentication and {why}; {AUTH_HINT}"
        )


def _probe_gcs(address: str, gcs_address: str, reply_s: float) -> BaseException | None:
    """Connect a GCS client in this process's auth mode: None, or the error it raised (bounded)."""
    from ray._raylet import GcsClient

    outcome: dict[str, BaseException | None] = {}

    def ask() -> None:
        try:
            GcsClient(address=gcs_address)
            outcome["error"] = None
        except BaseException as e:
            outcome["error"] = e

    probe = threading.Thread(target=ask, name="dnad-gcs-probe", daemon=True)
    with _quiet_stderr(probe.is_alive):  # the GCS client logs each refused attempt from C++
        probe.start()
        probe.join(reply_s)
    if "error" not in outcome:
        raise InputError("ray.address", address, f"something listens there but no Ray head answered within "
                         f"{reply_s:.0f} s; check that it is the head's GCS port (ray start --head prints it)")  # fmt: skip
    return outcome["error"]


def cluster_nodes() -> list[dict[str, float]]:
    """CPU/GPU of every alive node of the connected cluster."""
    import ray

    return [
        {"CPU": float(n["Resources"].get("CPU", 0)), "GPU": float(n["Resources"].get("GPU", 0))}
        for n in ray.nodes()
        if n.get("Alive")
    ]


def unmet(cfg: RunConfig, nodes: list[dict[str, float]], use_gpu: bool) -> str | None:
    """What the run needs that the cluster of `nodes` cannot hold at all (None: it fits). A search (or
    teacher) worker and a retrain trial must each fit on one node; a search needs `ray.workers` of
    them at once."""
    from pipeline.context import worker_bundle

    cpus = [n["CPU"] for n in nodes]
    gpus = [n["GPU"] for n in nodes]
    have = f"the cluster has {len(nodes)} node(s) with {', '.join(f'{c:g}' for c in cpus)} CPUs"
    have += f" and {', '.join(f'{g:g}' for g in gpus)} GPUs" if use_gpu else ""
    w_cpu, w_gpu = worker_bundle(cfg, sum(cpus), max(cpus, default=0), use_gpu)
    fit = sum(min(int(c // w_cpu), int(g // w_gpu) if w_gpu else 10**9) for c, g in zip(cpus, gpus))
    if fit < cfg.ray.workers:
        need = f"{cfg.ray.workers} search worker(s) × {w_cpu:g} CPU" + (f" + {w_gpu:g} GPU" if w_gpu else "")
        return f"the search needs {need} each on one node, {have} (room for {fit})"
    t_cpu, t_gpu = (1.0, 1.0) if use_gpu else (float(cfg.ray.cpus_per_trial), 0.0)
    if not any(c >= t_cpu and g >= t_gpu for c, g in zip(cpus, gpus)):
        return (
            f"a retrain trial needs {t_cpu:g} CPU"
            + (f" + {t_gpu:g} GPU" if t_gpu else "")
            + f" on one node, {have}"
        )
    return None


def check_local_resources(cfg: RunConfig) -> None:
    """Before a local Ray starts: refuse (one line, the numbers) what this machine can never hold."""
    if cfg.ray.address is not None:
        return
    import torch

    gpus = torch.cuda.device_count()
    use_gpu = gpus > 0 if cfg.ray.use_gpu == "auto" else bool(cfg.ray.use_gpu)
    missing = unmet(
        cfg, [{"CPU": float(cfg.ray.num_cpus or os.cpu_count() or 1), "GPU": float(gpus)}], use_gpu
    )
    if missing is not None:
        raise _resource_error(cfg, missing, 0)


def _resource_error(cfg: RunConfig, missing: str, waited: int) -> InputError:
    if missing == "a GPU":
        return InputError("ray.use_gpu", True, "the Ray cluster has no GPU; use ray.use_gpu=auto or false")
    key = "ray.workers" if "search" in missing else "ray.cpus_per_trial"
    value = cfg.ray.workers if key == "ray.workers" else cfg.ray.cpus_per_trial
    hint = missing + (f"; still so after waiting {waited} s (ray.resource_wait_s)" if waited else "")
    return InputError(key, value, hint + "; ask for less or add nodes")


def await_resources(cfg: RunConfig, poll_s: float = 10.0):
    """The cluster's `Resources` once it can hold the run. A local Ray never grows: a request it can
    never satisfy is refused at once with the numbers (InputError). A joined cluster may autoscale:
    wait up to `ray.resource_wait_s` (default 600 s), saying what it waits for, then refuse."""
    import time

    from pipeline.context import Resources

    wait = cfg.ray.resource_wait_s if cfg.ray.resource_wait_s is not None else (600 if cfg.ray.address else 0)
    t0, said = time.monotonic(), None
    while True:
        nodes = cluster_nodes()
        cpus, gpus = [n["CPU"] for n in nodes], int(sum(n["GPU"] for n in nodes))
        use_gpu = gpus > 0 if cfg.ray.use_gpu == "auto" else bool(cfg.ray.use_gpu)
        missing = "a GPU" if cfg.ray.use_gpu is True and gpus == 0 else unmet(cfg, nodes, use_gpu)
        if missing is None:
            return Resources(int(sum(cpus)), gpus, use_gpu, int(max(cpus)))
        left = wait - (time.monotonic() - t0)
        if left <= 0:
            raise _resource_error(cfg, missing, wait)
        if said is None or time.monotonic() - said >= 30:
            print(f"[ray] waiting for the cluster to grow, {fmt_duration(left)} left (ray.resource_wait_s): "
                  f"{missing}", flush=True)  # fmt: skip
            said = time.monotonic()
        time.sleep(min(poll_s, max(left, 0.1)))


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


def any_frame(frame: FrameType | None, pred: Callable[[FrameType], bool]) -> bool:
    """Whether `pred` holds for `frame` or any frame that called it (a thread's stack, innermost first)."""
    while frame is not None:
        if pred(frame):
            return True
        frame = frame.f_back
    return False


def in_ray(frame: FrameType | None) -> bool:
    """Whether a thread whose innermost frame is `frame` is inside Ray's code (a Tuner's event loop,
    `ray.get`, `ray.wait`, ...)."""
    import ray

    root = os.path.dirname(ray.__file__) + os.sep
    return any_frame(frame, lambda f: f.f_code.co_filename.startswith(root))


@contextlib.contextmanager
def ctrl_c_stops(
    interval: float = 0.5, inside: Callable[[FrameType | None], bool] = in_ray
) -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt in the main thread within about `interval` s, even while it
    waits inside Ray. Ray's blocking calls poll for signals from C++ and turn the KeyboardInterrupt
    into a status that a wait may drop: a run resumed after a kill went on to its end after Ctrl-C
    (2026-12-07: 6 of 12 tries, Ctrl-C as a checkpoint landed, in Tune's event loop). So the SIGINT handler also
    records the interrupt, and a watcher raises it again in the main thread every `interval` s for as
    long as that thread is still `inside` Ray; once it is out (our own cleanup, the message), nothing
    more is raised. On the way out the previous handler is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending, lock, state = threading.Event(), threading.Lock(), {"done": False}
    main_id = threading.get_ident()

    def handler(signum: int, frame: FrameType | None) -> None:
        if state["done"]:
            return
        pending.set()
        raise KeyboardInterrupt

    def watch() -> None:
        pending.wait()
        while True:
            time.sleep(interval)
            with lock:
                if state["done"]:
                    return
                if inside(sys._current_frames().get(main_id)):
                    _thread.interrupt_main()

    previous = signal.signal(signal.SIGINT, handler)
    threading.Thread(target=watch, name="dnad-ctrl-c", daemon=True).start()
    try:
        yield
    finally:
        with lock:
            state["done"] = True
        pending.set()  # the watcher ends
        _noop()  # a Python call: an interrupt raised just before `done` reaches the handler now, as a no-op
        signal.signal(signal.SIGINT, previous)


def _noop() -> None:
    pass


def fit_off_main_thread(trainer: Any) -> Any:
    """`trainer.fit()` of a Ray Train trainer run by the driver itself (the teacher), in a thread. On
    the main thread Ray Train V2 installs a SIGINT handler of its own and never restores it, so a later
    Ctrl-C (during the searches) would no longer stop the run. Here Ctrl-C raises KeyboardInterrupt
    in the main thread at any time; `ray.shutdown()` (pipeline/run.py) stops the fit's actors."""
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the caller's thread, unchanged
            box["error"] = e

    thread = threading.Thread(target=fit, name="dnad-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in box:
        raise box["error"]
    return box["result"]


# -- worker side --------------------------------------------------------------------------------
def worker_setup(threads: int, use_gpu: bool, kernels: str = "auto"):
    """Torch threads, CPU kernels (`ray.kernels`) and device of a Ray worker / trial."""
    import torch

    from dnad.fastops import set_cpu_kernels

    torch.set_num_threads(threads)
    set_cpu_kernels(kernels)  # type: ignore[arg-type]
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
