"""Typed, frozen, validated configuration of the library (pydantic v2, unknown keys rejected).

Every model here is plain data: it serialises to JSON/YAML and is never pickled into checkpoints.
Defaults follow the CIFAR script values of the method spec (`docs/DESIGN.md`).
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# ONNX export choices, named once (dnad.deploy, the pipeline's deploy config and pipeline/export.py)
Exporter = Literal["dynamo", "torchscript"]
EXPORTERS: tuple[str, ...] = get_args(Exporter)
ONNX_OPSETS = (17, 23)  # the opsets torch.onnx writes here (inclusive)
ONNX_OPSET = 18  # the default

DatasetName = Literal["fashion_mnist", "cifar10", "cifar100", "imagenet", "imagefolder", "fake"]


class Strict(BaseModel):
    """Base: frozen, unknown keys rejected, assignments validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DataConfig(Strict):
    """Which images, how many, and how they are augmented."""

    dataset: DatasetName = "fashion_mnist"
    root: str | None = Field(None, description="dataset folder; None = the dataset's default location")
    train_subset: int | None = Field(None, ge=1, description="use only this many training images")
    val_size: int | float = Field(
        0.1,
        description="validation images held out of the training split before any subset is taken: a "
        "fraction (0 < v < 1) or a number of images (>= 1); architectures are chosen on them",
    )
    test_subset: int | None = Field(None, ge=1, description="evaluate on this many test images")
    augment: bool = True
    cutout: int = Field(0, ge=0, description="cutout square side in pixels; 0 = off")
    image_size: int | None = Field(
        None,
        ge=8,
        description="fake/imagefolder: side of the square images; None = from the data (the "
        "median shorter side, to a multiple of 4, at most MAX_AUTO_IMAGE_SIZE = 224)",
    )
    channels: int | None = Field(
        None,
        ge=1,
        le=4,
        description="fake/imagefolder: 1 (grayscale) or 3 (RGB); None = from the data "
        "(1 when every image is grayscale; fake: 3)",
    )
    num_classes: int | None = Field(None, ge=2, description="fake/imagefolder: number of classes")
    mean: tuple[float, ...] | None = Field(
        None,
        description="per-channel pixel mean (pixel/255); None = the dataset's published value, or "
        "computed from the training images (image folders, fake)",
    )
    std: tuple[float, ...] | None = Field(None, description="per-channel pixel std (pixel/255); see mean")
    bad_files: Literal["skip", "error"] = Field(
        "skip",
        description="image folders: files that are not readable images are skipped with a "
        "warning naming how many and the first few (skip) or refused before the run starts (error)",
    )
    cache_dir: str = Field(
        "~/.cache/dnad/data", description="image folders: scans, statistics and decoded small images"
    )
    fake_size: int = Field(512, ge=8, description="fake: number of training images")
    seed: int = 0

    @field_validator("val_size")
    @classmethod
    def _val_size(cls, v: int | float) -> int | float:
        if isinstance(v, float) and v >= 1.0 and v.is_integer():
            v = int(v)
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError("must be a fraction in (0, 1) or a number of images >= 1")
        if isinstance(v, int) and v < 1:
            raise ValueError(
                "must be a fraction in (0, 1) or a number of images >= 1 (a validation split is "
                "required: models are chosen on it)"
            )
        return v

    @model_validator(mode="after")
    def _stats_fit(self) -> DataConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both data.mean and data.std, or neither")
        if self.mean is not None and (len(self.mean) != len(self.std) or min(self.std) <= 0):
            raise ValueError("data.mean and data.std need one value per channel, std > 0")
        return self


class SupernetConfig(Strict):
    """Shape of the search super-network."""

    C: int = Field(16, ge=2, description="initial channels")
    cells: int = Field(8, ge=2, description="number of cells; reductions at cells//3 and 2*cells//3")
    ops: str | tuple[str, ...] = Field("reference", description="op-set name or explicit op names")
    nodes: int = Field(4, ge=1, le=8)
    baseline: float = Field(0.01, gt=0.0, lt=1.0, description="threshold on normalised mixing weights")
    alpha_init: float = Field(2.0, gt=0.0)
    stem: Literal["auto", "cifar", "half", "imagenet"] = Field(
        "auto", description="auto: cifar below 64 px, half (stride 2) to 127 px, imagenet from 128 px"
    )

    @field_validator("ops")
    @classmethod
    def _ops_known(cls, v: str | tuple[str, ...]) -> str | tuple[str, ...]:
        from dnad.ops import resolve_op_set  # local: ops imports torch

        resolve_op_set(v)
        return v


class ShrinkConfig(Strict):
    """SNPS controller constants (spec §4, CIFAR column by default)."""

    gamma0: float = Field(1e-4, gt=0.0)
    gamma_max: float = Field(0.10, gt=0.0)
    phi: float = Field(1.01, gt=1.0, description="γ growth factor while shrinking stalls")
    k: float = Field(0.99, gt=0.0, le=1.0, description="γ decay factor while deleting")
    n_max: float = Field(0.005, gt=0.0, description="target smoothed deletions per step")
    tau: float = Field(0.90, ge=0.0, lt=1.0)
    t_max: int = Field(50, ge=1)
    mu0: float = Field(0.1, ge=0.0)
    rho: float = Field(1.5, ge=1.0)
    xi: float = Field(1.0, gt=0.0)
    s_min: float = Field(250.0, gt=0.0, description="stop once S < s_min")
    sparsity: Literal["uniform", "macs", "params"] = "uniform"
    tuned_steps: int | None = Field(
        None,
        ge=1,
        description="the number of shrinking steps the per-step constants (t_max, n_max, phi, "
        "k, tau) are tuned for; the search rescales them to the steps it really takes (dnad.budget); "
        "None = use them as given",
    )


class TeacherConfig(Strict):
    """Where the frozen teacher comes from."""

    kind: Literal["torchvision", "genotype", "checkpoint"] = "torchvision"
    arch: str = Field("resnet18", description="torchvision: model name")
    genotype: str | None = Field(None, description="genotype: path to a genotype JSON")
    checkpoint: str | None = Field(None, description="checkpoint: path to a teacher checkpoint folder")
    C: int = Field(36, ge=2, description="genotype teacher: initial channels")
    epochs: int = Field(10, ge=0, description="training epochs when the teacher is trained here (at least)")
    min_steps: int = Field(
        0, ge=0, description="at least this many optimisation steps: on a small dataset the epochs grow"
    )
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.05, gt=0.0)


class DistillConfig(Strict):
    """DNAD knowledge distillation (spec §5)."""

    enabled: bool = True
    teacher: TeacherConfig = TeacherConfig()
    knowledge_rate: float = Field(1.0, ge=0.0, description="λ")
    feature_ratios: tuple[float, float, float] = (0.2, 0.3, 0.5)
    logit_weight: float = Field(1.0, ge=0.0, description="β")
    temperature: float = Field(4.0, gt=0.0, description="T")
    weak_teacher: Literal["drop", "keep"] = Field(
        "drop",
        description="a teacher near chance, or below the super-network's validation accuracy "
        "after warm-up, is reported; drop: search on without distillation; keep: distil anyway",
    )


class DartsConfig(Strict):
    """The `darts` strategy's architecture optimizer (DARTS' own: Adam on α)."""

    a_lr: float = Field(3e-4, gt=0.0)
    a_betas: tuple[float, float] = (0.5, 0.999)
    a_weight_decay: float = Field(1e-3, ge=0.0)


class RandomConfig(Strict):
    """The `random` strategy: genotypes sampled in the search space."""

    count: int = Field(6, ge=1, description="genotypes sampled per search")
    macs_fraction: tuple[float, float] = Field(
        (0.35, 1.0), description="their MACs, as fractions of the dense super-network's (search width)"
    )

    @field_validator("macs_fraction")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError("must be 0 < low <= high <= 1")
        return v


class SearchConfig(Strict):
    """One search: the space, the strategy, and the loop."""

    strategy: str = Field(
        "dnad", description="dnad (SNPS + distillation), snps, darts or random (dnad.search registry)"
    )
    darts: DartsConfig = DartsConfig()
    random: RandomConfig = RandomConfig()

    supernet: SupernetConfig = SupernetConfig()
    shrink: ShrinkConfig = ShrinkConfig()
    distill: DistillConfig = DistillConfig()
    epochs: int = Field(120, ge=1, description="search epochs (at least; see min_steps)")
    warmup_epochs: int = Field(5, ge=0, description="epochs without shrinking (scaled with the epochs)")
    min_steps: int = Field(
        0,
        ge=0,
        description="at least this many optimisation steps: on a small dataset the epochs (and "
        "warm-up epochs, in proportion) grow until the search takes this many (dnad.budget)",
    )
    val_images: int = Field(
        1000, ge=1, description="validation images on which the super-network is measured after warm-up"
    )
    batch_size: int = Field(64, ge=1)
    w_lr: float = Field(5e-4, gt=0.0)
    w_betas: tuple[float, float] = (0.5, 0.999)
    w_weight_decay: float = Field(3e-4, ge=0.0)
    a_lr: float = Field(0.2, gt=0.0)
    a_momentum: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float = Field(5.0, gt=0.0)
    log_every: int = Field(10, ge=1, description="steps between metric callbacks")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on steps per epoch (smoke tests)")
    max_nonfinite: int = Field(5, ge=1, description="consecutive non-finite steps before DivergenceError")
    seed: int = 0

    @field_validator("strategy")
    @classmethod
    def _strategy_known(cls, v: str) -> str:
        from dnad.search import strategy_class  # local: the strategies import torch

        strategy_class(v)
        return v

    @model_validator(mode="after")
    def _warmup_fits(self) -> SearchConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} must be < epochs={self.epochs} (no shrinking would happen)"
            )
        return self


class RetrainConfig(Strict):
    """Training a derived architecture from scratch (spec §6)."""

    C: int = Field(36, ge=2)
    epochs: int = Field(600, ge=1, description="training epochs (at least; see min_steps)")
    min_steps: int = Field(
        0, ge=0, description="at least this many optimisation steps: on a small dataset the epochs grow"
    )
    batch_size: int = Field(96, ge=1)
    lr: float = Field(0.025, gt=0.0)
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="sgd: SGD with momentum (spec §6); adamw: AdamW (faster on very short runs)"
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only")
    weight_decay: float = Field(3e-4, ge=0.0)
    schedule: Literal["cosine", "linear_warmup"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float = Field(5.0, gt=0.0)
    auxiliary_weight: float = Field(0.4, ge=0.0, description="0 disables the auxiliary head")
    drop_path: float | Literal["auto"] = Field("auto", description="max drop-path prob; auto = spec §6")
    max_nonfinite: int = Field(5, ge=1)
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on steps per epoch (smoke tests)")
    eval_every: int = Field(
        1,
        ge=0,
        description="validation every N epochs; 0 = after the last only (the test split is "
        "evaluated once, after the last epoch)",
    )
    cuda_graph: Literal["auto", "off"] = Field(
        "auto",
        description="auto: on a CUDA device, capture each training step as one CUDA graph and replay it "
        "(fewer host launches per step); off: eager steps",
    )
    seed: int = 0

    @field_validator("drop_path")
    @classmethod
    def _dp_range(cls, v: float | str) -> float | str:
        if v != "auto" and not 0.0 <= float(v) < 1.0:
            raise ValueError("drop_path must be 'auto' or a probability in [0, 1)")
        return v
