"""Stage budgets that mean the same on 2,000 images as on 60,000. No Ray in here.

A profile states each stage's length as epochs *and* a minimum number of optimisation steps; the
stage runs whichever is longer, so a small dataset gets more epochs rather than a handful of steps.
The search's warm-up grows in proportion, and the shrink controller's per-step constants, tuned for a
number of shrinking steps (`ShrinkConfig.tuned_steps`), are rescaled to the steps the search really
takes: over r = steps / tuned_steps times the steps, the stability window t_max grows r times, the
target deletion rate n_max shrinks r times, and the per-step factors φ, k and τ become their r-th
roots, so γ, the smoothed rate and the emissions follow the same course over the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dnad.config import RetrainConfig, SearchConfig


def steps_per_epoch(n_images: int, batch_size: int, world_size: int = 1, cap: int | None = None) -> int:
    """Optimisation steps in one epoch of `n_images` (the last partial batch dropped, as in training)."""
    steps = math.ceil(n_images / world_size) // batch_size
    return min(steps, cap) if cap else steps


def epochs_for(epochs: int, min_steps: int, per_epoch: int) -> int:
    """The epochs a stage runs: at least `epochs`, and enough for `min_steps` steps (a stage that
    takes no steps, e.g. random search, keeps its epochs)."""
    return max(epochs, math.ceil(min_steps / per_epoch)) if per_epoch > 0 else epochs


@dataclass(frozen=True)
class SearchPlan:
    """What a search will really do on its data: epochs, warm-up, steps and the shrink rescaling."""

    config: SearchConfig  # explicit epochs / warm-up / shrink constants; min_steps and tuned_steps spent
    steps_per_epoch: int
    shrink_scale: float  # r: shrinking steps / tuned_steps (1 = constants as given)

    @property
    def steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch


def plan_search(cfg: SearchConfig, per_epoch: int) -> SearchPlan:
    """The search `cfg` describes, on a dataset giving `per_epoch` steps per epoch."""
    epochs = epochs_for(cfg.epochs, cfg.min_steps, per_epoch)
    warmup = cfg.warmup_epochs
    if epochs != cfg.epochs:  # the same share of the run, and at least one shrinking epoch
        warmup = min(round(cfg.warmup_epochs * epochs / cfg.epochs), epochs - 1)
    sh, r = cfg.shrink, 1.0
    if sh.tuned_steps is not None:
        r = max((epochs - warmup) * per_epoch, 1) / sh.tuned_steps
        sh = sh.model_copy(update={
            "t_max": max(1, round(sh.t_max * r)), "n_max": sh.n_max / r, "phi": sh.phi ** (1 / r),
            "k": sh.k ** (1 / r), "tau": sh.tau ** (1 / r), "tuned_steps": None,
        })  # fmt: skip
    planned = cfg.model_copy(update={"epochs": epochs, "warmup_epochs": warmup, "min_steps": 0, "shrink": sh})
    return SearchPlan(SearchConfig.model_validate(planned.model_dump()), per_epoch, r)


def plan_retrain(cfg: RetrainConfig, per_epoch: int) -> RetrainConfig:
    """`cfg` with the epochs it really runs on a dataset giving `per_epoch` steps per epoch."""
    epochs = epochs_for(cfg.epochs, cfg.min_steps, per_epoch)
    return cfg.model_copy(update={"epochs": epochs, "min_steps": 0})
