"""Comparing search strategies by the fronts they give: hypervolume with bootstrap confidence intervals.
Pure functions of a run's tables (no Ray); `benchmarks/quality.py` drives the runs.

A run with `sweep.strategy=[...]` and `sweep.num_samples=S` holds one search per (strategy, seed); every
architecture it emitted was retrained `retrain.repeats` times. For one search, its front is the set of
its architectures in (validation error, log10 MACs), and its quality the hypervolume that front
dominates up to a fixed reference point (larger is better). A method's figure is the mean over its
search seeds; the 95 % interval comes from a bootstrap that resamples the search seeds and, for every
architecture, which of its retrainings counts, so both sources of noise are in it. Differences between
two methods are paired by seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

HV_REF = (0.5, 10.0)  # (validation error, log10 MACs): worse than anything worth keeping


def hypervolume(error: np.ndarray, log_macs: np.ndarray, ref: tuple[float, float] = HV_REF) -> float:
    """Area dominated by the points (minimising both) and bounded by `ref`."""
    pts = sorted((float(c), float(e)) for e, c in zip(error, log_macs) if e < ref[0] and c < ref[1])
    hv, best_err = 0.0, ref[0]
    for i, (c, e) in enumerate(pts):
        best_err = min(best_err, e)
        nxt = pts[i + 1][0] if i + 1 < len(pts) else ref[1]
        hv += (ref[0] - best_err) * (nxt - c)
    return hv


@dataclass(frozen=True)
class Search:
    """One search of the run: its strategy and seed, and per architecture its log10 MACs and the
    validation error of each retraining (architectures × repeats, NaN where a retraining failed)."""

    trial_id: str
    strategy: str
    seed: int
    arch_ids: tuple[str, ...]
    log_macs: np.ndarray
    errors: np.ndarray

    def hv(self, choice: np.ndarray | None = None) -> float:
        """Hypervolume with repeat `choice[a]` of every architecture (None: the mean over repeats)."""
        if not len(self.arch_ids):
            return 0.0
        err = (
            np.nanmean(self.errors, axis=1) if choice is None else self.errors[np.arange(len(choice)), choice]
        )
        ok = ~np.isnan(err)
        return hypervolume(err[ok], self.log_macs[ok])


def searches(archs: pd.DataFrame, retrained: pd.DataFrame, points: list[dict]) -> list[Search]:
    """The `Search` of every sweep point (`points`: trial_id, seed, strategy) from the results tables:
    an architecture belongs to every search that emitted it (`sources`)."""
    runs = retrained[retrained["status"] == "ok"]
    err = runs.pivot_table(index="arch_id", columns="repeat", values="val_error", aggfunc="first")
    out = []
    for p in points:
        tid = p["trial_id"]
        mine = archs[
            archs["sources"]
            .fillna("")
            .str.split(";")
            .apply(lambda s, t=tid: any(x.split("#")[0] == t for x in s))
        ]
        mine = mine[mine["arch_id"].isin(err.index)]
        e = (
            err.loc[mine["arch_id"]].to_numpy(dtype=float)
            if len(mine)
            else np.zeros((0, max(err.shape[1], 1)))
        )
        out.append(Search(tid, p["strategy"], int(p["seed"]), tuple(mine["arch_id"]),
                          np.log10(mine["macs"].to_numpy(dtype=float)), e))  # fmt: skip
    return out


def _choices(s: Search, rng: np.random.Generator) -> np.ndarray:
    """A random finished repeat for every architecture of `s`."""
    out = np.zeros(len(s.arch_ids), dtype=int)
    for a in range(len(s.arch_ids)):
        ok = np.flatnonzero(~np.isnan(s.errors[a]))
        out[a] = rng.choice(ok) if len(ok) else 0
    return out


def compare(found: list[Search], pairs: list[tuple[str, str]], n_boot: int = 2000, seed: int = 0) -> dict:
    """Per strategy: mean hypervolume over its seeds and a 95 % bootstrap interval; per pair (a, b):
    the mean paired difference a − b (same seed index), its interval and the share of replicates > 0."""
    rng = np.random.default_rng(seed)
    by = {}
    for s in found:
        by.setdefault(s.strategy, []).append(s)
    for v in by.values():
        v.sort(key=lambda s: s.seed)
    point = {m: float(np.mean([s.hv() for s in v])) for m, v in by.items()}
    n = min(len(v) for v in by.values())
    reps: dict[str, list[np.ndarray]] = {m: [] for m in by}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)  # the same resampled seed indices for every method: paired
        for m, v in by.items():
            reps[m].append(np.array([v[i].hv(_choices(v[i], rng)) for i in idx]))
    stats = {}
    for m, rs in reps.items():
        means = np.array([r.mean() for r in rs])
        stats[m] = {"hv": point[m], "lo": float(np.percentile(means, 2.5)), "hi": float(np.percentile(means, 97.5)),
                    "seeds": len(by[m]), "per_seed": [s.hv() for s in by[m]]}  # fmt: skip
    diffs = {}
    for a, b in pairs:
        if a in reps and b in reps:
            d = np.array([ra.mean() - rb.mean() for ra, rb in zip(reps[a], reps[b])])
            paired = [x.hv() - y.hv() for x, y in zip(by[a][:n], by[b][:n])]
            diffs[f"{a} - {b}"] = {"diff": float(np.mean(paired)), "lo": float(np.percentile(d, 2.5)),
                                   "hi": float(np.percentile(d, 97.5)), "p_gt_0": float((d > 0).mean())}  # fmt: skip
    return {"methods": stats, "differences": diffs, "n_boot": n_boot, "ref": HV_REF}
