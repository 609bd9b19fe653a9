"""Inference latency of a model on the machine at hand: PyTorch eager and ONNX Runtime. No Ray here.

Each figure is the median of `runs` timed calls after `warmup` untimed ones, at a fixed thread count,
with a description of the device, so figures from different machines can be told apart.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; `platform.processor()` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def malloc_in_use(maps: str | Path = "/proc/self/maps") -> str:
    """The allocator this process runs on: 'tcmalloc' or 'jemalloc' when one is mapped into it (an
    LD_PRELOAD), else 'system'; 'unknown' where the process map cannot be read (not Linux)."""
    try:
        text = Path(maps).read_text()
    except OSError:
        return "unknown"
    return next((name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in text), "system")


def device_description(device: torch.device | str) -> str:
    """e.g. `cpu: Intel(R) Xeon(R) ... (2 cores)` or `cuda: NVIDIA H200`."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_name()} ({os.cpu_count()} cores)"


def median_ms(
    fn: Callable[[], Any], runs: int, warmup: int, sync: Callable[[], None] = lambda: None
) -> float:
    """Median wall time of `fn()` in milliseconds over `runs` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def torch_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch: int,
    runs: int,
    warmup: int,
    device: torch.device | str,
) -> float:
    """Median ms of one eager forward of `model` (eval mode, no grad) on a (batch, *input_shape) input."""
    from dnad.fastops import preferred_format, to_layout

    device = torch.device(device)
    fmt = preferred_format(device)
    model = model.to(device, memory_format=fmt).eval()
    x = to_layout(torch.randn(batch, *input_shape, device=device), fmt)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        return median_ms(lambda: model(x), runs, warmup, sync)


def onnx_session(path: str | Path, threads: int):
    """An ONNX Runtime CPU session of `path` using `threads` intra-op threads (sequential execution)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_latency(
    path: str | Path, input_shape: Sequence[int], batch: int, runs: int, warmup: int, threads: int
) -> float:
    """Median ms of one ONNX Runtime run of the model at `path` on a (batch, *input_shape) input."""
    import numpy as np

    sess = onnx_session(path, threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)
    return median_ms(lambda: sess.run(None, {name: x}), runs, warmup)


def measure(
    model: nn.Module,
    onnx_path: str | Path | None,
    batches: Sequence[int],
    runs: int = 50,
    warmup: int = 10,
    device: torch.device | str = "cpu",
    threads: int | None = None,
) -> dict[str, Any]:
    """Latency of `model` (PyTorch eager on `device`) and of its ONNX file (ONNX Runtime, CPU) at each
    batch size, with the thread count and device descriptions: the `latency` entry of a model card."""
    import onnxruntime as ort

    threads = threads or torch.get_num_threads()
    shape = (model.in_channels, model.image_size, model.image_size)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch_ms = {str(b): torch_latency(model, shape, b, runs, warmup, device) for b in batches}
    finally:
        torch.set_num_threads(before)
    onnx_ms = (
        {str(b): onnx_latency(onnx_path, shape, b, runs, warmup, threads) for b in batches}
        if onnx_path is not None
        else {}
    )
    return {
        "torch_ms": torch_ms,
        "onnx_ms": onnx_ms,
        "batches": list(batches),
        "threads": threads,
        "runs": runs,
        "warmup": warmup,
        "statistic": "median",
        "torch_device": device_description(device),
        "onnx_device": f"{device_description('cpu')}, onnxruntime {ort.__version__} CPUExecutionProvider",
        "host": socket.gethostname(),
        "torch_version": torch.__version__,
        "malloc": malloc_in_use(),
        "measured_at": time.time(),
    }
