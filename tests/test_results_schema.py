"""The results a `--smoke-test` run leaves behind, against the documented schema (docs/DESIGN.md)."""

import json

import pandas as pd
import pytest
import yaml

from dnad.genotype import Genotype
from dnad.results import ARCH_SCHEMA, METRICS_SCHEMA, load_run, pareto_mask


@pytest.mark.slow
@pytest.mark.ray
def test_smoke_run_results_follow_the_schema(smoke_run):
    archs = pd.read_parquet(smoke_run / "architectures.parquet")
    assert list(archs.columns[: len(ARCH_SCHEMA)]) == list(ARCH_SCHEMA)
    assert {c: str(archs[c].dtype) for c in ARCH_SCHEMA} == ARCH_SCHEMA
    csv = pd.read_csv(smoke_run / "architectures.csv")
    assert list(csv["arch_id"]) == list(archs["arch_id"])
    assert archs["arch_id"].is_unique and len(archs) >= 1
    ok = archs[archs["status"] == "ok"]
    for split in ("val", "test"):
        assert ((ok[f"{split}_acc"] >= 0) & (ok[f"{split}_acc"] <= 1)).all()
        assert (ok[f"{split}_error"] - (1 - ok[f"{split}_acc"])).abs().max() < 1e-9
    assert (archs["params"] > 0).all() and (archs["macs"] > 0).all()
    assert (archs["ptflops_backend"] == "aten").all() and archs["ptflops_version"].str.len().gt(0).all()
    # the fronts are decided on the validation error (never the test error)
    err = archs["val_error"].where(archs["status"] == "ok")
    assert list(archs["is_pareto_macs"]) == list(pareto_mask(err, archs["macs"]))
    assert list(archs["is_pareto_params"]) == list(pareto_mask(err, archs["params"]))
    assert list(archs["is_pareto_latency"]) == list(pareto_mask(err, archs["latency_ms_onnx"]))
    assert (ok["latency_ms_torch"] > 0).all() and (ok["latency_ms_onnx"] > 0).all()
    assert (ok["latency_batch"] == 16).all() and (ok["latency_ms_onnx_batch"] > ok["latency_ms_onnx"]).all()
    assert (ok["latency_threads"] == 1).all() and ok["latency_device"].str.startswith("cpu: ").all()
    assert list(ok["model_dir"]) == [f"models/{a}" for a in ok["arch_id"]]
    for arch_id in archs["arch_id"]:  # one genotype file per row, and its id is its hash
        g = Genotype.load(smoke_run / "genotypes" / f"{arch_id}.json")
        assert g.arch_id == arch_id
    metrics = pd.read_parquet(smoke_run / "search_metrics.parquet")
    assert {c: str(metrics[c].dtype) for c in METRICS_SCHEMA} == METRICS_SCHEMA
    assert not metrics.duplicated(["trial_id", "step"]).any()
    cfg = yaml.safe_load((smoke_run / "config.yaml").read_text())
    assert cfg["name"] == "tiny" and set(cfg) >= {"data", "search", "retrain", "sweep", "ray"}
    json.loads((smoke_run / "run.json").read_text())
    run = load_run(smoke_run)
    assert len(run.architectures) == len(archs) and (smoke_run / "report.html").is_file()
