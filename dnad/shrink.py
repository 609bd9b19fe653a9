"""The SNPS shrink controller (spec §4; the reference code calls it the Pruner).

It watches how many pairs each step deletes and steers the sparsity pressure γ so that the
super-network keeps shrinking at about `n_max` deletions per step; when shrinking has stalled under
high pressure for `t_max` steps the current architecture is a stable point and is emitted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dnad.config import ShrinkConfig


@dataclass
class ControllerState:
    gamma: float
    mu: float
    n_max: float
    rate: float = 0.0  # smoothed deletions per step (EMA)
    stable: int = 0  # consecutive stalled steps with γ ≥ γ_max
    steps: int = 0
    emissions: list[int] = field(default_factory=list)  # controller steps at which it emitted


class ShrinkController:
    """γ/μ schedule with emissions. Call `step(deleted)` once per optimiser step after warm-up.

    `step` returns True when the current architecture should be emitted.
    """

    def __init__(self, cfg: ShrinkConfig):
        self.cfg = cfg
        self.state = ControllerState(gamma=cfg.gamma0, mu=cfg.mu0, n_max=cfg.n_max)

    @property
    def gamma(self) -> float:
        return self.state.gamma

    @property
    def mu(self) -> float:
        return self.state.mu

    def shrink_step(self, deleted: int) -> bool:
        """Update γ, μ, the smoothed rate and the stability counter after a step deleting `deleted`."""
        s, c = self.state, self.cfg
        s.steps += 1
        s.rate = c.tau * s.rate + (1.0 - c.tau) * deleted
        if s.rate < s.n_max:  # stalled: push harder
            s.gamma *= c.phi
            s.stable = s.stable + 1 if s.gamma >= c.gamma_max else 0
            if s.stable >= c.t_max:
                s.mu *= c.rho
                s.n_max *= c.xi
                s.stable = 0
                s.emissions.append(s.steps)
                return True
        else:  # deleting: ease off
            s.gamma *= c.k
            s.stable = 0
        return False

    step = shrink_step

    def should_stop(self, sparsity: float) -> bool:
        """The search ends (at the end of the epoch) once S < S_min."""
        return sparsity < self.cfg.s_min

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        d = dict(d)
        d["emissions"] = list(d.get("emissions", []))
        self.state = ControllerState(**d)
