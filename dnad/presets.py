"""Named presets. `tiny` drives tests, smoke runs and notebook tests: seconds on a CPU."""

from __future__ import annotations

from dnad.config import (
    DataConfig,
    DistillConfig,
    RetrainConfig,
    SearchConfig,
    ShrinkConfig,
    SupernetConfig,
    TeacherConfig,
)


def tiny_data(**kw) -> DataConfig:
    """256 synthetic 3×16×16 images, 5 classes."""
    return DataConfig(**({"dataset": "fake", "image_size": 16, "fake_size": 256, "num_classes": 5} | kw))


def tiny_search(**kw) -> SearchConfig:
    """3 cells at C=4, an aggressive shrink schedule that emits within a few dozen steps."""
    base = dict(
        supernet=SupernetConfig(C=4, cells=3),
        shrink=ShrinkConfig(gamma0=0.05, gamma_max=0.2, phi=1.3, k=0.95, n_max=0.5, tau=0.5, t_max=2, s_min=60.0),
        distill=DistillConfig(enabled=False, teacher=TeacherConfig(arch="resnet18", epochs=1)),
        epochs=4, warmup_epochs=1, batch_size=32, a_lr=0.5, log_every=2,
    )  # fmt: skip
    return SearchConfig(**(base | kw))


def tiny_retrain(**kw) -> RetrainConfig:
    return RetrainConfig(**({"C": 4, "epochs": 2, "batch_size": 32, "auxiliary_weight": 0.4} | kw))
