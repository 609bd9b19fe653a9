"""The `tiny` profile (configs/tiny.yaml: the smoke-test preset) as library configs for unit tests:
the same data and shrink schedule, at half the width (C=4) and with distillation off unless a test
asks for it, so that a search or retrain runs in a second or two. One source: change the profile,
and these follow."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from dnad.config import DataConfig, RetrainConfig, SearchConfig

PROFILE = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
UNIT_C = 4  # half the profile's width


@lru_cache(maxsize=1)
def _profile() -> dict[str, Any]:
    return yaml.safe_load(PROFILE.read_text())


def tiny_data(**kw: Any) -> DataConfig:
    """The profile's data: 256 synthetic 3×16×16 images, 5 classes."""
    return DataConfig(**(copy.deepcopy(_profile()["data"]) | kw))


def tiny_search(**kw: Any) -> SearchConfig:
    """The profile's search (3 cells, its aggressive shrink schedule) at C=4, distillation off."""
    d = copy.deepcopy(_profile()["search"])
    d["supernet"]["C"] = UNIT_C
    d["distill"]["enabled"] = False
    return SearchConfig(**(d | kw))


def tiny_retrain(**kw: Any) -> RetrainConfig:
    """The profile's retraining at C=4, with the auxiliary head on (so the tests exercise it)."""
    return RetrainConfig(
        **(copy.deepcopy(_profile()["retrain"]) | {"C": UNIT_C, "auxiliary_weight": 0.4} | kw)
    )
