"""Token authentication (issue 19), on this machine only: a Ray head started with RAY_AUTH_MODE=token
and a token generated into a temporary file; `pipeline/run.py --address` with the token runs the smoke
search, without it (or with another token) it is refused in seconds with one line, exit 2, nothing
written. The head runs in its own process group and is killed with it (bounded, leaves nothing)."""

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray token or auth mode, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS"))}
    return env | extra


@pytest.fixture(scope="module")
def token_head():
    """(address, token file) of a token-protected single-node head; killed afterwards."""
    # a short folder: Ray's unix sockets live under --temp-dir and their paths are limited to 107 bytes
    root = Path(tempfile.mkdtemp(prefix="dnad-auth-", dir="/tmp"))
    token = root / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    port = free_port()
    log = root / "head.log"
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    cmd = [str(RAY), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
           "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(root / "ray")]  # fmt: skip
    with log.open("w") as f:
        head = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", token
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # gcs_server and raylet share the group; workers follow them
        head.wait(30)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def run(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "pipeline" / "run.py"), "--smoke-test", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("token", ["none", "wrong"])
def test_without_the_token_refused_in_seconds(token_head, tmp_path, token):
    address, _ = token_head
    home = tmp_path / "home"  # no ~/.ray/auth_token there
    home.mkdir()
    env = clean_env(HOME=str(home)) | ({"RAY_AUTH_TOKEN": secrets.token_hex(32)} if token == "wrong" else {})
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = run(["--address", address, "--output", str(out)], env, timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # the GCS client's native retry logs are not shown
    why = (
        "no token was found here" if token == "none" else "the token from RAY_AUTH_TOKEN is not the cluster's"
    )
    assert lines[0].startswith(
        f"error: ray.address='{address}': the cluster requires authentication and {why}"
    )
    assert "ray get-auth-token" in lines[0] and "RAY_AUTH_TOKEN_PATH" in lines[0]
    assert not out.exists()
    assert took < 60, took  # refused by the pre-flight, not after ray.init's retries


def test_unreadable_token_path_refused(token_head, tmp_path):
    address, _ = token_head
    env = clean_env(RAY_AUTH_TOKEN_PATH=str(tmp_path / "missing"))
    proc = run(["--address", address, "--output", str(tmp_path / "run")], env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: RAY_AUTH_TOKEN_PATH='{tmp_path / 'missing'}': cannot be read or is empty; copy the head's token "
        "(`ray get-auth-token` on the head prints it) to ~/.ray/auth_token here, or point RAY_AUTH_TOKEN_PATH "
        "at a file holding it (docs/cluster.md#authentication)"
    )
    assert not (tmp_path / "run").exists()


def test_with_the_token_the_smoke_search_runs(token_head, tmp_path):
    """RAY_AUTH_MODE is not set here: a token found locally turns it on for the driver."""
    address, token = token_head
    out = tmp_path / "run"
    env = clean_env(RAY_AUTH_TOKEN_PATH=str(token))
    args = [
        "--address",
        address,
        "--output",
        str(out),
        "sweep.temperature=[]",
        "search.distill.enabled=false",
        "search.epochs=2",  # a warm-up and a shrinking epoch: the subject is the authenticated connection
        "retrain.epochs=1",
    ]
    proc = run(args, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    archs = pd.read_parquet(out / "architectures.parquet")
    assert len(archs) >= 1 and (archs["status"] == "ok").all()
