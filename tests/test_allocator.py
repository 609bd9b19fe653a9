"""The Ray workers' environment (`ray.allocator`: what they get as LD_PRELOAD; Ray Train's preemption
watcher), and how a process tells which malloc it runs on (recorded with every latency figure). The
smoke run's model cards (test_models.py) check that the retrain workers really ran on tcmalloc where
the machine has it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dnad.latency import malloc_in_use
from pipeline.raytools import PREEMPTION_WATCHER, TCMALLOC, find_tcmalloc, worker_env, worker_preload


def test_find_tcmalloc_looks_in_the_given_folders(tmp_path):
    assert find_tcmalloc((str(tmp_path),)) is None
    (tmp_path / TCMALLOC).write_bytes(b"\x7fELF")
    assert find_tcmalloc(("/nonexistent", str(tmp_path))) == str(tmp_path / TCMALLOC)


def test_worker_preload_follows_the_setting(monkeypatch):
    monkeypatch.setattr("pipeline.raytools.find_tcmalloc", lambda: "/lib/here/" + TCMALLOC)
    assert worker_preload("auto", joined=False, env={}) == "/lib/here/" + TCMALLOC
    assert worker_preload("auto", joined=True, env={}) == TCMALLOC  # each node's loader finds its own
    assert worker_preload("system", joined=False, env={}) is None
    assert worker_preload("/opt/lib/libjemalloc.so.2", joined=False, env={}) == "/opt/lib/libjemalloc.so.2"
    assert worker_preload("auto", joined=False, env={"LD_PRELOAD": "/x/libmine.so"}) is None  # left alone
    assert worker_preload("/opt/a.so", joined=False, env={"LD_PRELOAD": "/x/libmine.so"}) == "/opt/a.so"
    monkeypatch.setattr("pipeline.raytools.find_tcmalloc", lambda: None)
    assert worker_preload("auto", joined=False, env={}) is None


def test_worker_env_of_a_local_and_a_joined_ray(monkeypatch):
    """A local Ray (one node, nothing to drain) runs no preemption watcher unless the user asks for
    one; a joined cluster keeps Ray's default. The malloc and the repository travel either way."""
    monkeypatch.setattr("pipeline.raytools.find_tcmalloc", lambda: "/lib/here/" + TCMALLOC)
    local = worker_env(None, "auto", {"PYTHONPATH": "/mine"})
    assert local[PREEMPTION_WATCHER] == "0" and local["LD_PRELOAD"] == "/lib/here/" + TCMALLOC
    assert local["PYTHONPATH"].split(os.pathsep)[1:] == ["/mine"]
    assert worker_env(None, "auto", {PREEMPTION_WATCHER: "1"})[PREEMPTION_WATCHER] == "1"
    joined = worker_env("10.0.0.5:6379", "auto", {})
    assert PREEMPTION_WATCHER not in joined and joined["LD_PRELOAD"] == TCMALLOC


def test_malloc_in_use_reads_the_process_map(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert malloc_in_use(maps) == "system"
    maps.write_text(maps.read_text() + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/libtcmalloc_minimal.so.4.5.10\n")
    assert malloc_in_use(maps) == "tcmalloc"
    assert malloc_in_use(tmp_path / "absent") == "unknown"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_a_process_started_with_the_preload_runs_on_tcmalloc():
    lib = find_tcmalloc()
    if lib is None:
        pytest.skip("no tcmalloc here (make test installs libtcmalloc-minimal4)")
    code = "from dnad.latency import malloc_in_use; print(malloc_in_use())"
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    env["LD_PRELOAD"] = lib
    pre = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert (plain.stdout.strip(), pre.stdout.strip()) == ("system", "tcmalloc")
