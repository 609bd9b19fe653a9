"""Search strategies: one protocol, one registry, the epoch loop they share. No Ray in here.

The search *space* is `dnad.supernet.SuperNet` (cells, ops, the pairs a node may mix); a search
*strategy* decides how the architecture is learnt in it and when it emits architectures; the
orchestration (`pipeline/`) runs any strategy the same way. Built in (`dnad/strategies/`):

| name | what | emissions |
|---|---|---|
| `dnad` | SNPS (per-cell α, ReLU mixing, progressive deletion under adaptive sparsity pressure) + knowledge distillation from a frozen teacher | every stable point of the shrinking, and the final network |
| `snps` | the same without distillation | the same |
| `darts` | first-order DARTS: per-edge softmax, one shared normal and one shared reduction topology, α learnt on the other half of the training images, two inputs per node at derivation | the derived architecture after every epoch past warm-up |
| `random` | genotypes sampled in the same space, within a MACs range | `search.random.count` of them at once, no training |

Every strategy emits `Emission` records (genotype JSON, step, MACs/params at search width, the
super-network's running validation accuracy), so collection, retraining, models and reports need no
strategy-specific code. A new strategy is one file in `dnad/strategies/` whose class is decorated with
`@register_strategy("name")`, plus its import in `dnad/strategies/__init__.py` (docs/DESIGN.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol

import torch

from dnad.config import SearchConfig
from dnad.data import DatasetBundle
from dnad.fastops import preferred_format, to_layout
from dnad.genotype import Genotype
from dnad.guard import rng_state, set_rng_state

MetricsCallback = Callable[[dict[str, Any]], None]


@dataclass
class Emission:
    """An architecture a search puts forward (a stable point of SNPS' shrinking, DARTS' derivation at
    the end of an epoch, a random sample)."""

    index: int
    step: int
    epoch: int
    S: float  # SNPS sparsity (NaN for strategies without one)
    gamma: float
    mu: float
    alive_pairs: int
    params: int  # analytic, at search width C
    macs: int
    arch_id: str
    genotype: str  # canonical JSON
    final: bool = False
    val_acc: float = float("nan")  # the super-network's running validation accuracy when it emitted


class SearchStrategy(Protocol):
    """What the orchestration needs of a search: run it (epoch by epoch, checkpointing in
    `on_epoch_end`), resume it, and read its emissions and its own decisions (`notes`)."""

    uses_teacher: ClassVar[bool]
    epoch: int
    step: int
    done: bool
    emissions: list[Emission]
    notes: list[str]

    def run(self, on_epoch_end: Callable[[Any], None] | None = None) -> list[Emission]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: dict[str, Any]) -> None: ...


STRATEGIES: dict[str, type] = {}


def register_strategy(name: str) -> Callable[[type], type]:
    """Class decorator adding a strategy under `name`; a duplicate name is an error."""

    def deco(cls: type) -> type:
        if name in STRATEGIES:
            raise ValueError(f"search strategy {name!r} is already registered")
        STRATEGIES[name] = cls
        cls.name = name
        return cls

    return deco


def strategy_class(name: str) -> type:
    """The registered class of strategy `name` (ValueError naming the known ones)."""
    import dnad.strategies  # noqa: F401  (registers the built-in strategies)

    if name not in STRATEGIES:
        raise ValueError(f"unknown search strategy {name!r}; registered: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


def make_search(cfg: SearchConfig, data: DatasetBundle, **kw: Any) -> SearchStrategy:
    """The strategy `cfg.strategy`, built on `data` (keyword arguments as `EpochSearch`)."""
    return strategy_class(cfg.strategy)(cfg, data, **kw)


def uses_teacher(cfg: SearchConfig) -> bool:
    """Whether a search with `cfg` distils from a teacher (a teacher must then be made first)."""
    return bool(strategy_class(cfg.strategy).uses_teacher and cfg.distill.enabled)


def emission(
    index: int, step: int, epoch: int, g: Genotype, cost: tuple[int, int], val_acc: float, final: bool,
    S: float = math.nan, gamma: float = math.nan, mu: float = math.nan,
) -> Emission:  # fmt: skip
    """An `Emission` of genotype `g` with its (MACs, params) `cost`."""
    return Emission(
        index=index, step=step, epoch=epoch, S=S, gamma=gamma, mu=mu, alive_pairs=g.num_pairs,
        params=cost[1], macs=cost[0], arch_id=g.arch_id, genotype=g.to_json(), final=final, val_acc=val_acc,
    )  # fmt: skip


class EpochSearch:
    """The loop every training strategy shares: epochs of `train_step`s on this rank's shard of the
    training images, resumable mid-epoch; a metrics row (`metrics_row`) every `log_every` steps with a
    running validation accuracy of the super-network; `end_epoch` after each epoch.

    A subclass builds `self.net` (a `SuperNet`) and implements `train_step(x, y)` (returning at least
    loss, ce, kd, S, acc and emitted), `derive()` (the architecture it stands for now),
    `end_epoch()`, and `strategy_state()` / `load_strategy_state()` for its own state.
    """

    uses_teacher: ClassVar[bool] = False
    name: ClassVar[str] = ""

    @staticmethod
    def images_per_epoch(n_train: int) -> int:
        """Training images one epoch steps through (DARTS: the half its weights train on)."""
        return n_train

    def __init__(
        self,
        cfg: SearchConfig,
        data: DatasetBundle,
        teacher: torch.nn.Module | None = None,
        device: str | torch.device = "cpu",
        callback: MetricsCallback | None = None,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = True,
        teacher_val_acc: float | None = None,
    ):
        """`teacher`/`teacher_val_acc`: for strategies that distil (others ignore them)."""
        self.cfg, self.data, self.device, self.callback = cfg, data, torch.device(device), callback
        self.rank, self.world_size, self.augment = rank, world_size, augment
        self.fmt = preferred_format(self.device)
        self.val_batches = data.iterator("val", cfg.batch_size, seed=cfg.seed)
        self.epoch = self.batch = self.step = 0
        self.stop_requested = False
        self.done = False
        self.emissions: list[Emission] = []
        self.notes: list[str] = []  # what the search decided on its own, for the console and the log
        self.val_acc = math.nan  # running (EMA) accuracy on one validation batch per logged step
        self._window = _Window()

    # -- hooks ------------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def derive(self) -> Genotype:
        """The architecture the search stands for now (what an emission at this point would be)."""
        raise NotImplementedError

    def end_epoch(self) -> None:
        """After `self.epoch` was advanced: emit, stop, decide (default: nothing)."""

    def strategy_state(self) -> dict[str, Any]:
        return {}

    def load_strategy_state(self, d: dict[str, Any]) -> None:
        pass

    def metrics_extra(self, m: dict[str, Any]) -> dict[str, Any]:
        """Strategy-specific values of a metrics row (S, γ, μ, ...); `m`: the step's `train_step` result."""
        return {"S": math.nan, "gamma": math.nan, "mu": math.nan}

    # -- shared -----------------------------------------------------------------------------------
    @property
    def batches(self):
        """This rank's training batches (a strategy may train on a part of the training images)."""
        return self.train_batches

    def steps_in_epoch(self) -> int:
        n = self.batches.num_batches(self.epoch)
        cap = self.cfg.max_steps_per_epoch
        return min(n, cap) if cap else n

    def cost(self, g: Genotype) -> tuple[int, int]:
        """(MACs, params) of `g` at search width (analytic)."""
        from dnad.complexity import genotype_cost

        d = self.data
        return genotype_cost(g, self.net.C, d.num_classes, d.in_channels, d.image_size, self.net.stem_kind)

    def emit(
        self, final: bool, S: float = math.nan, gamma: float = math.nan, mu: float = math.nan
    ) -> Emission:
        g = self.derive()
        val = self.val_acc if self.val_acc == self.val_acc else self.running_val()
        e = emission(len(self.emissions), self.step, self.epoch, g, self.cost(g), val, final, S, gamma, mu)
        self.emissions.append(e)
        return e

    def run_epoch(self) -> None:
        """Train from the current position to the end of the epoch (resumes mid-epoch exactly)."""
        n = self.steps_in_epoch()
        for x, y in self.batches.iterate(self.epoch, start_batch=self.batch):
            if self.batch >= n:
                break
            m = self.train_step(x, y)
            self.batch += 1
            self._window.add(m, x.shape[0] * self.world_size)
            if self.callback is not None and (
                m["emitted"] or self.step % self.cfg.log_every == 0 or self.batch == n
            ):
                self.callback(self.metrics_row(m))
        self.epoch += 1
        self.batch = 0
        self.end_epoch()

    def run(self, on_epoch_end: Callable[[Any], None] | None = None) -> list[Emission]:
        """Run until the strategy is done; `on_epoch_end` is where callers checkpoint."""
        while not self.done:
            self.run_epoch()
            if on_epoch_end is not None:
                on_epoch_end(self)
        return self.emissions

    @torch.no_grad()
    def evaluate_val(self, max_images: int | None = None) -> float:
        """Top-1 of the super-network (eval mode) on the first `max_images` validation images."""
        was = self.net.training
        self.net.eval()
        correct = seen = 0
        for x, y in self.val_batches.iterate(0):
            x = to_layout(x.to(self.device), self.fmt)
            correct += int((self.net(x).argmax(1).cpu() == y).sum())
            seen += len(y)
            if max_images is not None and seen >= max_images:
                break
        self.net.train(was)
        return correct / max(seen, 1)

    @torch.no_grad()
    def running_val(self) -> float:
        """One more validation batch (they rotate) folded into the running validation accuracy."""
        nb = self.val_batches.num_batches()
        k = (self.step // self.cfg.log_every) % nb
        x, y = next(self.val_batches.iterate(0, start_batch=k))
        was = self.net.training
        self.net.eval()
        acc = float((self.net(to_layout(x.to(self.device), self.fmt)).argmax(1).cpu() == y).float().mean())
        self.net.train(was)
        self.val_acc = acc if self.val_acc != self.val_acc else 0.7 * self.val_acc + 0.3 * acc
        return self.val_acc

    def metrics_row(self, m: dict[str, Any]) -> dict[str, Any]:
        g = self.derive()
        avg = self._window.pop()
        val = self.running_val()
        return {
            "step": self.step, "epoch": self.epoch, "batch": self.batch, "loss": avg["loss"], "ce": avg["ce"],
            "kd": avg["kd"], "alive_pairs": g.num_pairs, "est_macs": self.cost(g)[0], "train_acc": avg["acc"],
            "img_per_s": avg["img_per_s"], "emitted": m["emitted"], "emissions": len(self.emissions),
            "val_acc": val, **self.metrics_extra(m),
        }  # fmt: skip

    # -- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.name,
            "position": {"epoch": self.epoch, "batch": self.batch, "step": self.step},
            "stop_requested": self.stop_requested,
            "done": self.done,
            "emissions": [asdict(e) for e in self.emissions],
            "rng": rng_state(),
            "val": {"running": self.val_acc, "notes": list(self.notes)},
            **self.strategy_state(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        saved = d.get("strategy")  # checkpoints written before strategies existed are SNPS/DNAD ones
        if saved is not None and saved != self.name:
            raise ValueError(f"a {saved} checkpoint cannot resume a {self.name} search")
        self.load_strategy_state(d)
        pos = d["position"]
        self.epoch, self.batch, self.step = int(pos["epoch"]), int(pos["batch"]), int(pos["step"])
        self.stop_requested, self.done = bool(d["stop_requested"]), bool(d["done"])
        self.emissions = [Emission(**e) for e in d["emissions"]]
        set_rng_state(d["rng"])
        v = d.get("val") or {}  # checkpoints written before the validation split existed have none
        self.val_acc = float(v.get("running", math.nan))
        self.notes = list(v.get("notes", []))


class _Window:
    """Averages of the per-step metrics since the last callback, and the images/s over that span."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.images = 0
        self.t0 = time.perf_counter()

    def add(self, m: dict[str, Any], images: int) -> None:
        for k in ("loss", "ce", "kd", "acc"):
            self.sums[k] = self.sums.get(k, 0.0) + m[k]
        self.n += 1
        self.images += images

    def pop(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {k: v / max(self.n, 1) for k, v in self.sums.items()} | {"img_per_s": self.images / dt}
        self.__init__()
        return out


def to_device(loop: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on the loop's device, in its layout."""
    return to_layout(x.to(loop.device, non_blocking=True), loop.fmt), y.to(loop.device, non_blocking=True)
