"""The run configuration: one frozen pydantic model composing the library's configs, plus profiles.

A profile is a YAML file in `configs/` holding a partial `RunConfig`; `key=value` overrides with dotted
keys are applied on top (values parsed as YAML). Any invalid input becomes a `dnad.errors.InputError`
naming the field, the value and a hint, so the CLI can print one line and exit with code 2.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dnad.budget import SearchPlan, plan_retrain, plan_search, steps_per_epoch
from dnad.config import ONNX_OPSET, ONNX_OPSETS, DataConfig, Exporter, RetrainConfig, SearchConfig
from dnad.errors import InputError
from pipeline.smoke import smoke_dict

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SWEEP_KEYS = {  # sweep list -> the path of the SearchConfig field it overrides
    "strategy": ("strategy",),
    "temperature": ("distill", "temperature"),
    "gamma0": ("shrink", "gamma0"),
    "phi": ("shrink", "phi"),
    "t_max": ("shrink", "t_max"),
    "s_min": ("shrink", "s_min"),
    "sparsity": ("shrink", "sparsity"),
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SweepConfig(Strict):
    """Grid over the search strategy, KD temperature and the shrink schedule; an empty list keeps the
    search's own value."""

    strategy: list[str] = []
    temperature: list[float] = []
    gamma0: list[float] = []
    phi: list[float] = []
    t_max: list[int] = []
    s_min: list[float] = []
    sparsity: list[Literal["uniform", "macs", "params"]] = []
    num_samples: int = Field(1, ge=1, description="repeats of every grid point, each with its own seed")


class RayConfig(Strict):
    """Where and how wide the work runs."""

    address: str | None = Field(None, description="join this cluster ('auto'); None = start a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="local Ray size; None = every core")
    workers: int = Field(1, ge=1, description="data-parallel workers of one search")
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: int | None = Field(None, ge=1, description="search worker CPUs; None = fill a node")
    cpus_per_trial: int = Field(1, ge=1, description="CPUs of one retrain trial when there is no GPU")
    max_concurrent: int | None = Field(None, ge=1, description="cap on concurrent trials")
    storage: str | None = Field(None, description="Ray storage_path (local, NFS or s3://); None = OUTPUT/ray")
    max_failures: int = Field(2, ge=0, description="retries of a failing trial or search")
    allocator: str = Field(
        "auto",
        description="malloc of the Ray workers: auto = tcmalloc (libtcmalloc_minimal.so.4) where the "
        "machine has it, else the system's; system; or the absolute path of a malloc library to LD_PRELOAD",
    )
    kernels: Literal["auto", "aten"] = Field(
        "auto",
        description="CPU kernels of the workers: auto = dnad's native depthwise-conv and BatchNorm kernels "
        "(dnad.native, compiled once per machine with the C++ compiler) where they build, else PyTorch's; "
        "aten = PyTorch's (the same results to float rounding)",
    )
    resource_wait_s: int | None = Field(
        None,
        ge=0,
        description="how long to wait for a joined cluster to grow (autoscaling) until it "
        "can hold the run; None = 600 s with ray.address, 0 (refuse at once) for a local Ray",
    )


class TeacherRunConfig(Strict):
    """Pipeline-side teacher settings (the teacher model itself is `search.distill.teacher`)."""

    cache_dir: str = "~/.cache/dnad/teachers"
    max_steps_per_epoch: int | None = Field(None, ge=1)


class DeployConfig(Strict):
    """What every retrained architecture gets besides its weights: an ONNX file and measured latency."""

    onnx: bool = Field(True, description="export models/<arch_id>/model.onnx and time it in ONNX Runtime")
    opset: int = Field(
        ONNX_OPSET, ge=ONNX_OPSETS[0], le=ONNX_OPSETS[1], description="ONNX opset of the export"
    )
    exporter: Exporter = Field(
        "dynamo",
        description="dynamo: torch.export + onnxscript's optimiser (the leaner graph, 10-20 s per network "
        "on one CPU thread); torchscript: the tracing exporter (about 1 s, the same logits, a slightly "
        "slower graph)",
    )
    latency_batch: int = Field(64, ge=1, description="the batch size timed besides batch 1")
    latency_runs: int = Field(50, ge=50, description="timed runs per figure (the median is recorded)")
    latency_warmup: int = Field(10, ge=1, description="untimed runs before timing")

    def batches(self) -> list[int]:
        return sorted({1, self.latency_batch})


class RetrainDataConfig(Strict):
    """How retraining's data differs from the search's (test split always whole unless data says so)."""

    train_subset: int | Literal["all", "same"] = Field("same", description="'same' = data.train_subset")
    augment: bool | None = Field(None, description="crop + flip while retraining; None = data.augment")


class RetrainStage(RetrainConfig):
    """The retrain recipe (`dnad.config.RetrainConfig`) plus when and how often the pipeline runs it."""

    start: Literal["at_emission", "after_search"] = Field(
        "at_emission",
        description="at_emission: an architecture's retraining is queued as soon as a search "
        "emits it and starts when the cluster has room, while the searches go on; after_search: when every "
        "search has finished (the staged order)",
    )
    stream: Literal["all", "front"] = Field(
        "all",
        description="all: every emission streams; front: only those non-dominated in (estimated "
        "MACs, the super-network's running validation accuracy) among the emissions so far",
    )
    rest: Literal["after_search", "none"] = Field(
        "after_search",
        description="stream=front: the other emissions are retrained when their search has "
        "finished (after_search) or not at all (none)",
    )
    min_macs_gap: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="skip an emission whose MACs are within this fraction of those of an architecture "
        "already kept from the same search (0.05: within 5 %): the front cannot tell such near-duplicates "
        "apart, and each costs a trial; 0 retrains every emission. Emissions of different sweep points "
        "are never compared",
    )
    repeats: int = Field(
        1,
        ge=1,
        description="retrainings per architecture, seeds retrain.seed + k (k = 0 is the model in "
        "models/; the table adds the mean and spread over repeats)",
    )


class RunConfig(Strict):
    """Everything one `pipeline/run.py` invocation does; saved as OUTPUT/config.yaml."""

    name: str = Field("dnad", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    output: str | None = None
    data: DataConfig = DataConfig()
    search: SearchConfig = SearchConfig()
    retrain: RetrainStage = RetrainStage()
    retrain_data: RetrainDataConfig = RetrainDataConfig()
    teacher: TeacherRunConfig = TeacherRunConfig()
    deploy: DeployConfig = DeployConfig()
    sweep: SweepConfig = SweepConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="before")
    @classmethod
    def _inject_seed(cls, d: Any) -> Any:
        """The top-level seed seeds data, search and retrain unless they set their own."""
        if isinstance(d, dict) and "seed" in d:
            d = dict(d)
            for k in ("data", "search", "retrain"):
                sub = d.get(k) or {}
                if isinstance(sub, dict) and "seed" not in sub:
                    d[k] = {**sub, "seed": d["seed"]}
        return d

    def retrain_data_config(self) -> DataConfig:
        rd, update = self.retrain_data, {}
        if rd.train_subset != "same":
            update["train_subset"] = None if rd.train_subset == "all" else rd.train_subset
        if rd.augment is not None:
            update["augment"] = rd.augment
        return self.data.model_copy(update=update) if update else self.data


def sweep_points(cfg: RunConfig) -> list[dict[str, Any]]:
    """Every trial of the sweep: {'trial_id', 'seed', and the swept values} (grid × num_samples)."""
    keys = [k for k in SWEEP_KEYS if getattr(cfg.sweep, k)]
    grid = list(itertools.product(*(getattr(cfg.sweep, k) for k in keys))) or [()]
    points = []
    for rep in range(cfg.sweep.num_samples):
        for values in grid:
            point = dict(zip(keys, values))
            point |= {"trial_id": f"t{len(points):02d}", "seed": cfg.search.seed + rep}
            points.append(point)
    return points


def swept_value(s: SearchConfig, key: str) -> Any:
    """The value of sweep key `key` in a search config."""
    v: Any = s
    for part in SWEEP_KEYS[key]:
        v = getattr(v, part)
    return v


def trial_search_config(cfg: RunConfig, point: dict[str, Any]) -> SearchConfig:
    """The SearchConfig of one sweep point (validated: a bad swept value names `sweep.<key>`)."""
    d = cfg.search.model_dump()
    d["seed"] = point.get("seed", cfg.search.seed)
    for key, path in SWEEP_KEYS.items():
        if key in point:
            node = d
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = point[key]
    try:
        return SearchConfig.model_validate(d)
    except ValidationError as e:
        err = e.errors()[0]
        key = next((k for k, path in SWEEP_KEYS.items() if tuple(err["loc"][: len(path)]) == path), None)
        where = f"sweep.{key}" if key else "search." + ".".join(map(str, err["loc"]))
        raise InputError(where, err.get("input"), err["msg"].removeprefix("Value error, ")) from None


def search_plan(cfg: RunConfig, point: dict[str, Any], n_train: int) -> SearchPlan:
    """What the search of one sweep point really runs on `n_train` training images (`dnad.budget`)."""
    from dnad.search import strategy_class

    s = trial_search_config(cfg, point)
    images = strategy_class(s.strategy).images_per_epoch(n_train)
    return plan_search(s, steps_per_epoch(images, s.batch_size, cfg.ray.workers, s.max_steps_per_epoch))


def retrain_plan(cfg: RunConfig, n_train: int) -> RetrainConfig:
    """The retrain recipe with the epochs it really runs on `n_train` training images."""
    r = cfg.retrain
    return plan_retrain(r, steps_per_epoch(n_train, r.batch_size, 1, r.max_steps_per_epoch))


def needs_teacher(cfg: RunConfig) -> bool:
    """Whether any search of the sweep distils from a teacher (then the teacher stage makes one)."""
    from dnad.search import uses_teacher

    return any(uses_teacher(trial_search_config(cfg, p)) for p in sweep_points(cfg))


def initial_sparsity(cfg: SearchConfig) -> float:
    """S of the search's fresh super-network (`dnad.supernet.fresh_sparsity`), without building it."""
    from dnad.ops import resolve_op_set
    from dnad.supernet import fresh_sparsity

    return fresh_sparsity(cfg.supernet.cells, cfg.supernet.nodes, len(resolve_op_set(cfg.supernet.ops)))


# -- profiles and overrides ------------------------------------------------------------------------
def profiles() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def read_yaml(path: Path, field: str) -> dict[str, Any]:
    try:
        d = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise InputError(field, str(path), f"cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise InputError(field, str(path), f"not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise InputError(field, str(path), "the file must hold a mapping of config keys")
    return d


def load_profile(name: str) -> dict[str, Any]:
    if name not in profiles():
        raise InputError("--profile", name, f"unknown profile; choose one of {', '.join(profiles())}")
    return read_yaml(CONFIG_DIR / f"{name}.yaml", "--profile")


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b.c=value` pairs (value parsed as YAML) set into a copy of the nested dict `d`."""
    d = copy.deepcopy(d)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise InputError("override", item, "expected key=value with a dotted key, e.g. search.epochs=3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = d
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise InputError(
                    ".".join(parts[: i + 1]), nxt, f"is a value, so it has no key {parts[i + 1]!r}"
                )
            node = nxt
        node[parts[-1]] = value
    return d


def _known_keys(loc: tuple) -> list[str]:
    model: Any = RunConfig
    for p in loc[:-1]:
        field = model.model_fields.get(str(p)) if isinstance(model, type) else None
        model = field.annotation if field is not None else None
    if isinstance(model, type) and issubclass(model, BaseModel):
        return sorted(model.model_fields)
    return []


def validate(d: dict[str, Any]) -> RunConfig:
    """dict -> RunConfig; the first validation error becomes an InputError."""
    try:
        return RunConfig.model_validate(d)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(p for p in err["loc"] if not str(p).startswith(("function-", "literal[")))
        where = ".".join(map(str, loc)) or "config"
        value = err.get("input")
        hint = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            known = _known_keys(loc)
            hint = "unknown key" + (f"; known keys here: {', '.join(known)}" if known else "")
        if isinstance(value, dict):
            value = "{...}"
        raise InputError(where, value, hint) from None


def _resolve_paths(d: dict[str, Any]) -> dict[str, Any]:
    """Relative paths become absolute before the config leaves this process (Ray workers run in other
    folders): resolved against the current folder, or the repo root for files shipped in it."""

    def absolute(p: Any) -> Any:
        if not isinstance(p, str) or not p or "://" in p or Path(p).expanduser().is_absolute():
            return p
        here = Path(p).resolve()
        return str(here if here.exists() or not (CONFIG_DIR.parent / p).exists() else CONFIG_DIR.parent / p)

    t = d.get("search", {}).get("distill", {}).get("teacher", {})
    if isinstance(t, dict):
        for key in ("genotype", "checkpoint"):
            if key in t:
                t[key] = absolute(t[key])
    data = d.get("data")
    if isinstance(data, dict) and "root" in data:
        data["root"] = absolute(data["root"])
    return d


def build_config(
    profile: str | None, config_path: str | None, overrides: list[str], smoke: bool = False
) -> RunConfig:
    """Profile (or YAML file) [shrunk for --smoke-test] + overrides -> validated RunConfig."""
    if config_path is not None:
        base = read_yaml(Path(config_path), "--config")
    else:
        base = load_profile(profile or "quick")
    if smoke:
        base = smoke_dict(validate(_resolve_paths(base)), load_profile("tiny"))
    cfg = validate(_resolve_paths(apply_overrides(base, overrides)))
    for point in sweep_points(cfg):
        trial_search_config(cfg, point)
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    """Plain YAML of the resolved config (tuples become lists; nothing is pickled)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
