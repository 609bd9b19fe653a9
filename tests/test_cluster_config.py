"""The Ray cluster-launcher configs (ray_cluster.yaml and the on-prem YAML in docs/cluster.md) are valid.

Checked against the JSON schema that ships inside the ray package (what `ray up` validates against),
and through Ray's own offline steps: `prepare_config` (merges the provider defaults, as `ray up`
does) and `validate_config`. Nothing here contacts a cloud provider.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"
SCHEMA_PATH = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def schema_errors(config: Any) -> list[str]:
    schema = load_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return [f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in cls(schema).iter_errors(config)]


def ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before it talks to the provider: fill in defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def onprem_yaml(markdown: str) -> str:
    """The first ```yaml block after the first heading that mentions on-prem."""
    lines = markdown.splitlines()
    start = next((i for i, ln in enumerate(lines) if re.match(r"#+\s", ln) and "on-prem" in ln.lower()), None)
    assert start is not None, "docs/cluster.md has no heading mentioning on-prem"
    body: list[str] | None = None
    for ln in lines[start + 1 :]:
        if body is None:
            if re.match(r"\s*```ya?ml\s*$", ln):
                body = []
        elif ln.strip().startswith("```"):
            return "\n".join(body) + "\n"
        else:
            body.append(ln)
    raise AssertionError("no complete ```yaml block after the on-prem heading in docs/cluster.md")


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def onprem() -> dict[str, Any]:
    return yaml.safe_load(onprem_yaml(CLUSTER_DOC.read_text()))


def test_schema_ships_with_ray():
    schema = load_schema()
    assert schema["additionalProperties"] is False  # the negative tests rely on this
    assert {"cluster_name", "provider"} <= set(schema["required"])


def test_cluster_yaml_matches_schema(cluster):
    assert schema_errors(cluster) == []


def test_cluster_yaml_passes_ray_validation(cluster):
    prepared = ray_validate(cluster)
    assert prepared["provider"]["type"] == "aws"
    setup = " ".join(cluster["setup_commands"])
    # prepare_config prepends the common setup commands to the head's and the workers' own
    assert all(c in prepared["worker_setup_commands"] for c in cluster["setup_commands"])
    assert all(c in prepared["head_setup_commands"] for c in cluster["setup_commands"])
    assert "dataset-fashion-mnist" in setup


def test_cluster_yaml_layout(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert "GPU" not in head["resources"] and head["resources"].get("CPU", 0) > 0
    assert head["node_config"]["InstanceType"].startswith("m5.")
    workers = {k: v for k, v in types.items() if k != cluster["head_node_type"]}
    assert len(workers) == 1
    (gpu,) = workers.values()
    assert gpu["node_config"]["InstanceType"] == "g5.xlarge"
    assert gpu["resources"] == {"CPU": 4, "GPU": 1}
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 8)
    assert cluster["max_workers"] >= gpu["max_workers"]
    assert not cluster.get("docker")  # docker-less


def test_cluster_yaml_installs_project_and_data(cluster):
    setup = "\n".join(cluster["setup_commands"])
    assert "apt-get" in setup and "dataset-fashion-mnist" in setup
    assert "libtcmalloc-minimal4" in setup  # what ray.allocator=auto preloads into the workers
    assert "git clone" in setup and "https://github.com/dnad-project/dnad.git" in setup
    assert "pip install" in setup and "pip install -q -e ." in setup
    head = "\n".join(cluster["head_setup_commands"])
    assert "boto3" in head  # the AWS autoscaler on the head needs it
    text = CLUSTER_YAML.read_text()
    assert "DNAD_REPO_URL" in text.split("cluster_name:")[0]  # documented at the top
    assert "ray.storage=s3://" in text and "teacher.cache_dir" in text


def test_onprem_snippet_matches_schema(onprem):
    assert onprem["provider"]["type"] == "local"
    assert onprem["provider"]["head_ip"] and onprem["provider"]["worker_ips"]
    assert schema_errors(onprem) == []


def test_onprem_snippet_passes_ray_validation(onprem):
    prepared = ray_validate(onprem)
    (node_type,) = prepared["available_node_types"].values()  # Ray's single local node type
    assert node_type["max_workers"] == len(onprem["provider"]["worker_ips"])
    setup = " ".join(onprem["setup_commands"])
    assert "dataset-fashion-mnist" in setup and "libtcmalloc-minimal4" in setup and "pip install" in setup


def test_doc_covers_the_commands():
    doc = CLUSTER_DOC.read_text()
    for s in ("ray up", "ray down", "ray attach", "ray submit", "ray exec", "ray start --head",
              "ray start --address=", "--address auto", "ray.storage=s3://", "teacher.cache_dir=",
              "ray.workers", "ray.use_gpu", "storage_path"):  # fmt: skip
        assert s in doc, s


def _with(config: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    bad = copy.deepcopy(config)
    d = bad
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    return bad


def _worker(config: dict[str, Any]) -> str:
    return next(k for k in config["available_node_types"] if k != config["head_node_type"])


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: _with(c, ("max_worker",), 8), id="unknown-top-level-key"),
        pytest.param(lambda c: _with(c, ("max_workers",), "eight"), id="max_workers-not-int"),
        pytest.param(lambda c: _with(c, ("setup_commands",), "pip install -e ."), id="commands-not-list"),
        pytest.param(lambda c: _with(c, ("provider",), {"region": "us-west-2"}), id="provider-without-type"),
        pytest.param(
            lambda c: _with(c, ("available_node_types", _worker(c), "resources", "GPU"), 0.5),
            id="fractional-gpu-resource",
        ),
        pytest.param(
            lambda c: _with(c, ("available_node_types", _worker(c), "min_worker"), 1),
            id="unknown-node-type-key",
        ),
    ],
)
def test_broken_copies_fail(cluster, mutate):
    bad = mutate(cluster)
    assert schema_errors(bad), "the schema accepted a broken config"
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError, TypeError)):
        ray_validate(bad)


def test_broken_onprem_copy_fails(onprem):
    bad = _with(onprem, ("head_ips",), [onprem["provider"]["head_ip"]])
    assert any("head_ips" in e for e in schema_errors(bad))
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(bad)
