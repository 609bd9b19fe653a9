"""DARTS (Liu et al. 2019), first order, in this search space: the classic baseline.

Mixing: a softmax over the ops of every edge (node, input), every pair computed; one α for all normal
cells and one for all reduction cells (DARTS' shared topology). The training images are split into two
class-stratified halves: every step updates the weights on a batch of the first half and, after the
warm-up epochs, α on a batch of the second (first-order: ∇α L_val(w, α) at the current weights; the
validation split that chooses models is never used). The weights' optimizer is the search's own (Adam,
as for SNPS), α's is DARTS' (Adam, `search.darts`).

Derivation (DARTS'): per node, each input's strongest op ('none' excluded), and the two inputs whose
strongest op weighs most; the normal and reduction cells are then repeated over the network. The
derived architecture is emitted after every epoch past the warm-up (the last one marked final), so a
search gives a family along its trajectory rather than a single point.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dnad import optim
from dnad.config import SearchConfig
from dnad.data import BatchIterator, DatasetBundle, halves
from dnad.genotype import Genotype
from dnad.guard import BatchNormStats, NonFiniteGuard, all_finite
from dnad.search import EpochSearch, register_strategy, to_device
from dnad.strategies.snps import build_supernet


@register_strategy("darts")
class DartsSearch(EpochSearch):
    """First-order DARTS on the SNPS search space (see the module docstring)."""

    uses_teacher = False

    @staticmethod
    def images_per_epoch(n_train: int) -> int:
        return n_train // 2  # the weight half (the α half is the other)

    def __init__(self, cfg: SearchConfig, data: DatasetBundle, teacher: Any = None, device: Any = "cpu",
                 callback: Any = None, rank: int = 0, world_size: int = 1, augment: bool = True,
                 teacher_val_acc: float | None = None):  # fmt: skip
        super().__init__(cfg, data, None, device, callback, rank, world_size, augment)
        torch.manual_seed(cfg.seed)
        self.net = build_supernet(cfg, data, mixing="softmax", shared_alpha=True)
        self.net.to(self.device, memory_format=self.fmt)
        self.ddp: nn.Module = self.net
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(
                self.net, device_ids=ids, find_unused_parameters=True
            )
        self.w_opt = optim.adam(
            self.net.weight_parameters(), lr=cfg.w_lr, betas=cfg.w_betas, weight_decay=cfg.w_weight_decay
        )
        d = cfg.darts
        self.a_opt = optim.adam(
            self.net.arch_parameters(), lr=d.a_lr, betas=d.a_betas, weight_decay=d.a_weight_decay
        )
        self.guard = NonFiniteGuard("search", cfg.max_nonfinite)
        self.bn_stats = BatchNormStats(self.net)
        w_half, a_half = halves(data.train, cfg.seed)
        kw = {"seed": cfg.seed, "train": True, "augment": augment, "mean": data.mean, "std": data.std,
              "rank": rank, "world_size": world_size}  # fmt: skip
        self.train_batches = BatchIterator(w_half, cfg.batch_size, **kw)
        self.alpha_batches = BatchIterator(a_half, cfg.batch_size, **(kw | {"seed": cfg.seed + 1}))
        self._alpha_iter: Any = None
        self._alpha_at: tuple[int, int] | None = None

    def steps_in_epoch(self) -> int:
        return min(super().steps_in_epoch(), self.alpha_batches.num_batches(self.epoch))

    def _alpha_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The α-half batch paired with the current weight batch (a pure function of epoch and batch)."""
        if self._alpha_at != (self.epoch, self.batch):
            self._alpha_iter = self.alpha_batches.iterate(self.epoch, start_batch=self.batch)
        self._alpha_at = (self.epoch, self.batch + 1)
        return next(self._alpha_iter)

    def _learning_alpha(self) -> bool:
        return self.epoch >= self.cfg.warmup_epochs

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """α step on an α-half batch (after warm-up), then the weight step on `x`, `y`."""
        self.ddp.train()
        clip = self.cfg.grad_clip
        xa, ya = self._alpha_batch()
        ok = True
        if self._learning_alpha():
            xa, ya = to_device(self, xa, ya)
            self.bn_stats.save()  # the α batch's forward must leave BN statistics as they were
            loss_a = F.cross_entropy(self.ddp(xa), ya)
            self.a_opt.zero_grad(set_to_none=True)
            loss_a.backward()
            norm = nn.utils.clip_grad_norm_(self.net.arch_parameters(), clip)
            self.bn_stats.restore()
            if all_finite(loss_a.detach(), norm):
                self.a_opt.step()
            self.a_opt.zero_grad(set_to_none=True)
            self.w_opt.zero_grad(set_to_none=True)
        x, y = to_device(self, x, y)
        self.bn_stats.save()
        logits = self.ddp(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.net.weight_parameters(), clip)
        ok = self.guard.check(self.step, all_finite(loss.detach(), norm), "loss or gradient")
        if ok:
            self.w_opt.step()
        else:
            self.bn_stats.restore()
        self.w_opt.zero_grad(set_to_none=True)
        self.a_opt.zero_grad(set_to_none=True)
        self.step += 1
        acc = float((logits.detach().argmax(1) == y).float().mean())
        ce = float(loss.detach()) if ok else float("nan")
        return {"loss": ce, "ce": ce, "kd": 0.0, "acc": acc, "emitted": False, "skipped": not ok}

    @torch.no_grad()
    def derive(self) -> Genotype:
        """DARTS' derivation: two inputs per node, each with its strongest op ('none' excluded)."""
        net = self.net
        ops = net.op_names
        n_ops = len(ops)
        w = net.mixing_weights()
        cells = []
        for row in w:
            spec, start = [], 0
            for k in range(net.nodes):
                edges = []
                for i in range(k + 2):
                    ew = row[start + i * n_ops : start + (i + 1) * n_ops]
                    cand = [(float(ew[o]), ops[o]) for o in range(n_ops) if ops[o] != "none"]
                    strength, op = max(cand)
                    edges.append((strength, i, op))
                start += (k + 2) * n_ops
                keep = sorted(edges, reverse=True)[:2]
                spec.append(tuple((i, op) for _, i, op in keep))
            cells.append(tuple(spec))
        return Genotype(cells=tuple(cells), reductions=tuple(p.index for p in net.plans if p.reduction))

    def end_epoch(self) -> None:
        last = self.epoch >= self.cfg.epochs
        if self.epoch > self.cfg.warmup_epochs or last:
            self.emit(final=last)
        self.done = last

    def strategy_state(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "w_opt": self.w_opt.state_dict(), "a_opt": self.a_opt.state_dict(),
                "guard": self.guard.state_dict()}  # fmt: skip

    def load_strategy_state(self, d: dict[str, Any]) -> None:
        self.net.load_state_dict(d["net"])
        self.w_opt.load_state_dict(d["w_opt"])
        self.a_opt.load_state_dict(d["a_opt"])
        self.guard.load_state_dict(d["guard"])
        self._alpha_at = None
