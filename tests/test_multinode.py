"""The search on a two-node Ray cluster (ray.cluster_utils.Cluster on this machine): one DDP worker per
node, gloo across nodes, joined through `--address` like a real cluster. The cluster does not ask for
a token while this machine has one (as any machine that ever started a local Ray 2.60 does, in
~/.ray/auth_token): the driver must not turn token mode on for it (its trials would never start)."""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.ray
@pytest.mark.slow
def test_search_runs_on_two_nodes_with_one_worker_each(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "run"
        cmd = [
            sys.executable, str(REPO / "pipeline" / "run.py"), "--smoke-test", "--output", str(out),
            "--address", cluster.address, "ray.workers=2", "ray.cpus_per_worker=1", "sweep.temperature=[]",
            "search.distill.enabled=false", "search.batch_size=16",
            "search.epochs=2", "retrain.epochs=1",  # the subject is the two-node worker group
        ]  # fmt: skip
        token = tmp_path / "auth_token"
        token.write_text(secrets.token_hex(32))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
        env["RAY_AUTH_TOKEN_PATH"] = str(token)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        cluster.shutdown()
    workers = [
        json.loads(line) for line in (out / "search" / "t00" / "workers.jsonl").read_text().splitlines()
    ]
    first = {w["rank"]: w for w in workers}  # a retried worker group would append again
    assert sorted(first) == [0, 1]
    assert all(w["world_size"] == 2 for w in workers)
    assert first[0]["ray_node_id"] != first[1]["ray_node_id"], "both ranks ran on one node"
    archs = pd.read_parquet(out / "architectures.parquet")
    assert len(archs) >= 1 and (archs["status"] == "ok").all()
