"""Safe, atomic checkpoints: safetensors for tensors, JSON for the rest, a hashed manifest written last.

A checkpoint is a folder `checkpoint_000042/` holding `tensors.safetensors`, `state.json` and
`manifest.json`. Every file is written to a temp name, fsynced and `os.replace`d; the manifest (sha256
of each file) comes last, so a folder without a valid manifest is an interrupted write. Nothing is
ever unpickled: nested state (optimizer dicts, RNG states, controller state) is flattened into
tensors + a JSON skeleton.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dnad.errors import CheckpointError

MANIFEST = "manifest.json"
PREFIX = "checkpoint_"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_mode(directory: bool = False) -> int:
    """The mode a plainly created file (or folder) gets under the current umask (mkstemp's files are
    0600, mkdtemp's folders 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix. The file
    gets the permissions of a plainly created one (umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# -- nested state <-> (tensors, JSON skeleton) -------------------------------------------------
def flatten_state(
    obj: Any, tensors: dict[str, torch.Tensor] | None = None, prefix: str = "t"
) -> tuple[Any, dict]:
    """Replace every tensor in a nested dict/list/tuple by a reference; returns (skeleton, tensors)."""
    tensors = {} if tensors is None else tensors

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"{prefix}{len(tensors)}"
            tensors[key] = x.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {"__dict__": {k: enc(v, f"{path}.{k}") for k, v in x.items()}}
            return {"__items__": [[enc(k, path), enc(v, f"{path}.{k}")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, path) for v in x]}
        if isinstance(x, list):
            return [enc(v, path) for v in x]
        if x is None or isinstance(x, bool | int | float | str):
            if isinstance(x, float) and x != x:
                return {"__float__": "nan"}
            if isinstance(x, float) and x in (float("inf"), float("-inf")):
                return {"__float__": "inf" if x > 0 else "-inf"}
            return x
        raise TypeError(f"cannot checkpoint {type(x).__name__} at {path}: only tensors and plain data")

    return enc(obj, "state"), tensors


def unflatten_state(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(skel, list):
        return [unflatten_state(v, tensors) for v in skel]
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__dict__" in skel:
            return {k: unflatten_state(v, tensors) for k, v in skel["__dict__"].items()}
        if "__items__" in skel:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in skel["__items__"]}
        if "__tuple__" in skel:
            return tuple(unflatten_state(v, tensors) for v in skel["__tuple__"])
        if "__float__" in skel:
            return float(skel["__float__"])
    return skel


# -- checkpoint folders -----------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_dir(root: Path, index: int) -> Path:
    return Path(root) / f"{PREFIX}{index:06d}"


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write nested `state` (tensors + plain data) as a checkpoint folder, atomically, manifest last.

    On failure (e.g. ENOSPC) the partial folder is removed and the error re-raised; older
    checkpoints are untouched.
    """
    path = Path(path)
    skel, tensors = flatten_state(state)
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)  # invalidate first: a rewrite must not look complete
        tmp = path / ".tensors.safetensors.tmp"
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path / "tensors.safetensors")
        atomic_write_text(path / "state.json", json.dumps(skel))
        files = {n: sha256_file(path / n) for n in ("tensors.safetensors", "state.json")}
        atomic_write_text(path / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))
    except BaseException as e:
        shutil.rmtree(path, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None:  # e.g. ENOSPC: say which checkpoint, keep errno
            msg = f"cannot write checkpoint {path}: {e.strerror or e}; older checkpoints are untouched"
            raise OSError(e.errno, msg) from e
        raise
    return path


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless the manifest exists and every file's hash matches it."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: missing or unreadable manifest ({e.__class__.__name__})") from e
    for name, digest in files.items():
        f = path / name
        if not f.is_file() or sha256_file(f) != digest:
            raise CheckpointError(f"{path / name}: hash mismatch or missing (truncated or corrupt write)")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Verify and load a checkpoint folder; tensors come from safetensors (no pickle is executed)."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        tensors = load_file(str(path / "tensors.safetensors"))
        skel = json.loads((path / "state.json").read_text())
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: unreadable checkpoint ({e})") from e
    return unflatten_state(skel, tensors)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under `root`, oldest first (names sort chronologically)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def load_latest(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """Newest checkpoint that verifies; a broken newer one is reported in one warning and skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(
                f"skipping unusable checkpoint: {e}; falling back to the previous one", stacklevel=2
            )
    return None


def prune_checkpoints(root: Path, keep: int = 2) -> None:
    """Delete all but the newest `keep` valid checkpoints (invalid ones older than them too)."""
    for path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def load_tensors_safely(path: Path) -> dict[str, torch.Tensor]:
    """Load a `.safetensors` file, or a torch file with `weights_only=True` (refuses pickled code)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: refused to load ({e.__class__.__name__}: only tensors allowed)"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    return obj
