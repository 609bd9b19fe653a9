"""dnad's native CPU kernels (`kernels.cpp`): the backward of depthwise convolutions and
training-mode BatchNorm on channels_last maps, built once per machine with the C++ compiler and
loaded through ctypes.

`library()` compiles the source the first time (about a second: no PyTorch headers) into
`~/.cache/dnad/native/<key>/` (`DNAD_NATIVE_CACHE` moves it), keyed by the source, the compiler, its
flags and the CPU (the build uses `-march=native`, so a cluster whose nodes share a home folder builds
once per kind of CPU), and loads it. Where no compiler works it returns None and `reason()` says why:
`dnad.fastops` then runs PyTorch's own kernels, the same results to float rounding, only slower.
Concurrent first builds (Ray workers starting together) are safe: each compiles to its own temporary
file and renames it into place.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch  # noqa: F401  (loaded first: the kernels then share PyTorch's OpenMP runtime)

SOURCE = Path(__file__).with_name("kernels.cpp")
ABI = 3
# tried in order until one compiles: portable fallbacks for compilers without -march=native or OpenMP
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)
BUILD_TIMEOUT_S = 180


@dataclass(frozen=True)
class Native:
    """The loaded library and how it was built."""

    lib: ctypes.CDLL
    path: Path
    compiler: str
    flags: tuple[str, ...]
    openmp: bool
    built_s: float | None  # compile time when this process built it; None when it came from the cache

    def describe(self) -> str:
        how = f"built in {self.built_s:.1f} s" if self.built_s is not None else "cached"
        threads = "OpenMP" if self.openmp else "one thread"
        return f"dnad native ({Path(self.compiler).name} {' '.join(self.flags)}, {threads}; {how})"


_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_root() -> Path:
    return Path(
        os.environ.get("DNAD_NATIVE_CACHE") or Path.home() / ".cache" / "dnad" / "native"
    ).expanduser()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_fingerprint() -> str:
    """The CPU model and feature flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        seen: list[str] = []
        for ln in lines:
            if ln not in seen:
                seen.append(ln)
        return "".join(seen)
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _key(cxx: str, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cxx.encode(), _compiler_version(cxx).encode(), " ".join(flags).encode(),
                 _cpu_fingerprint().encode(), platform.platform().encode(), str(ABI).encode()):  # fmt: skip
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _compile(cxx: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile into `target` atomically; None on success, else the compiler's last words."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cxx, *flags, "-std=c++17", "-shared", "-fPIC", "-Wno-psabi", "-o", tmp, str(SOURCE)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if out.returncode != 0:
            lines = out.stderr.strip().splitlines()
            errors = [ln for ln in lines if "error" in ln.lower()]
            return (errors or lines or [f"exit code {out.returncode}"])[0].strip()
        os.replace(tmp, target)
        return None
    except subprocess.TimeoutExpired:
        return f"the compiler ran past {BUILD_TIMEOUT_S} s"
    except OSError as e:
        return str(e)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(lib: ctypes.CDLL) -> None:
    P, Int, L, D = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double
    for suf in ("f32", "f64"):
        # the last int of each: the thread count (PyTorch's, passed in: OpenMP's own setting is per thread)
        getattr(lib, f"dnad_dw_forward_{suf}").argtypes = [P] * 3 + [Int] * 11
        getattr(lib, f"dnad_dw_backward_{suf}").argtypes = [P] * 5 + [Int] * 11
        getattr(lib, f"dnad_bn_forward_{suf}").argtypes = [P] * 8 + [L, Int, D, D, Int]
        getattr(lib, f"dnad_bn_backward_{suf}").argtypes = [P] * 8 + [L, Int, Int]
        for name in ("dw_forward", "dw_backward", "bn_forward", "bn_backward"):
            getattr(lib, f"dnad_{name}_{suf}").restype = None


def _build_and_load() -> Native | str:
    if sys.platform == "win32":
        return "native kernels are built on Linux and macOS only"
    cxx = _compiler()
    if cxx is None:
        return "no C++ compiler found (g++, c++ or clang++; or set CXX)"
    errors = []
    for flags in FLAG_SETS:
        target = cache_root() / _key(cxx, flags) / "libdnad_native.so"
        built_s = None
        if not target.is_file():
            t0 = time.perf_counter()
            err = _compile(cxx, flags, target)
            if err is not None:
                errors.append(f"{' '.join(flags)}: {err}")
                continue
            built_s = time.perf_counter() - t0
        try:
            lib = ctypes.CDLL(str(target))
            if lib.dnad_native_abi() != ABI:
                raise OSError(f"{target} has another ABI")
            _bind(lib)
        except (OSError, AttributeError) as e:
            errors.append(f"{' '.join(flags)}: {e}")
            continue
        return Native(lib, target, cxx, flags, bool(lib.dnad_native_openmp()), built_s)
    return f"{Path(cxx).name} could not build {SOURCE.name} ({'; '.join(errors)[-300:]})"


def library() -> Native | None:
    """The native kernels, built on first use; None where they cannot be built (see `reason()`)."""
    with _lock:
        if "result" not in _state:
            try:
                _state["result"] = _build_and_load()
            except OSError as e:  # e.g. an unwritable cache folder
                _state["result"] = f"could not build in {cache_root()}: {e}"
        result = _state["result"]
    return result if isinstance(result, Native) else None


def reason() -> str | None:
    """Why `library()` is None (None when it loaded)."""
    library()
    result = _state["result"]
    return None if isinstance(result, Native) else str(result)
