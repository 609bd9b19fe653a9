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
def smoke_run(tmp_path_factory) -> Path:
    """One `pipeline/run.py --smoke-test` run folder shared by every test that reads a finished run."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    cache = out.parent / "teacher-cache"
    cmd = [sys.executable, str(REPO / "pipeline" / "run.py"), "--smoke-test", "--output", str(out),
           f"teacher.cache_dir={cache}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(
            f"smoke run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return out
