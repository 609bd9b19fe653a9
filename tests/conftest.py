import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def load_benchmark():
    """`load_benchmark(name)`: `benchmarks/<name>.py` as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture
def weighted_like():
    """`weighted_like(net, model)`: a textbook copy of the derived `model` whose every edge output is
    scaled by that pair's mixing weight in the super-network `net`, so that it must compute what `net`
    computes (parity tests of the derived network against its super-network)."""
    from dnad.reference import textbook

    def make(net, model):
        ref = textbook(model)
        w = net.mixing_weights().detach()
        for c, cell in enumerate(ref.cells):
            if not hasattr(cell, "edges"):
                continue
            cols = {key: col for row in net.cells[c].pairs for col, _, key in row}
            for key, edge in cell.edges.items():
                scale = float(w[c, cols[key]])
                edge.register_forward_hook(lambda _m, _i, out, s=scale: out * s)
        return ref

    return make


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One `pipeline/run.py --smoke-test` run folder shared by every test that reads a finished run. Three
    Ray CPUs on this 2-core machine: the two tiny searches hold one each and the third retrains what
    they emit while they run (test_stream.py checks that overlap on this run; the fault test, at two
    CPUs, checks that the result does not depend on it)."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    cache = out.parent / "teacher-cache"
    cmd = [sys.executable, str(REPO / "pipeline" / "run.py"), "--smoke-test", "--output", str(out),
           "ray.num_cpus=3", f"teacher.cache_dir={cache}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    (out.parent / "console.log").write_text(proc.stdout)  # what the user saw (tests read it)
    if proc.returncode != 0:
        raise RuntimeError(
            f"smoke run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return out
