"""SNPS ("search by deleting") and DNAD (SNPS + knowledge distillation, "search by imitating"): the
method of this project (spec §2-5).

One-level optimisation: one forward/backward per training batch, Adam on weights + distiller
adapters and SGD on α both step. After warm-up the loss is `(L_CE + λ·L_KD)·(1 + γ·S) + γ·μ·S`, pairs
under the threshold are deleted after every step and the shrink controller decides when to emit an
architecture. Resumable from `state_dict()` at any step. If a torch.distributed process group is
initialised, the loop runs data-parallel with DDP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dnad import optim
from dnad.complexity import relative_cost_weights
from dnad.config import SearchConfig
from dnad.data import DatasetBundle
from dnad.distill import Distiller, FrozenTeacher
from dnad.genotype import Genotype
from dnad.guard import BatchNormStats, NonFiniteGuard, all_finite
from dnad.search import EpochSearch, register_strategy, to_device
from dnad.shrink import ShrinkController
from dnad.supernet import SuperNet


class SearchModule(nn.Module):
    """Super-network + distiller behind one `forward` that returns the loss parts (DDP wraps this)."""

    def __init__(self, net: SuperNet, distiller: Distiller | None, knowledge_rate: float):
        super().__init__()
        self.net, self.distiller, self.knowledge_rate = net, distiller, knowledge_rate

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        teacher_out: tuple | None,
        gamma: float,
        mu: float,
        shrinking: bool,
    ) -> dict[str, torch.Tensor]:
        if self.distiller is not None and teacher_out is not None:
            logits, feats = self.net(x, with_features=True)
            kd, feat, logit = self.distiller(feats, teacher_out[1], logits, teacher_out[0])
        else:
            logits = self.net(x)
            kd = feat = logit = logits.new_zeros(())
        ce = F.cross_entropy(logits, y)
        S = self.net.sparsity()
        base = ce + self.knowledge_rate * kd
        loss = base * (1.0 + gamma * S) + gamma * mu * S if shrinking else base
        return {
            "loss": loss,
            "ce": ce,
            "kd": kd,
            "kd_feat": feat,
            "kd_logit": logit,
            "S": S,
            "logits": logits,
        }


def build_supernet(cfg: SearchConfig, data: DatasetBundle, **kw: Any) -> SuperNet:
    """The search space of `cfg.supernet` on `data`'s shape (`kw`: the strategy's mixing and sharing)."""
    s = cfg.supernet
    net = SuperNet(
        C=s.C, num_cells=s.cells, num_classes=data.num_classes, in_channels=data.in_channels,
        image_size=data.image_size, ops=s.ops, nodes=s.nodes, baseline=s.baseline, alpha_init=s.alpha_init,
        stem=s.stem, **kw,
    )  # fmt: skip
    if cfg.shrink.sparsity != "uniform" and not kw:
        net.set_cost_weights(relative_cost_weights(net, cfg.shrink.sparsity))
    return net


@register_strategy("dnad")
class SearchLoop(EpochSearch):
    """DNAD: SNPS with distillation from a frozen teacher (when `cfg.distill.enabled` and a teacher
    is given). `run()` returns the emissions; `state_dict()` resumes it."""

    uses_teacher = True

    def __init__(
        self,
        cfg: SearchConfig,
        data: DatasetBundle,
        teacher: nn.Module | None = None,
        device: str | torch.device = "cpu",
        callback: Any = None,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = True,
        teacher_val_acc: float | None = None,
    ):
        """`teacher_val_acc`: the teacher's validation accuracy, if known: a teacher near chance, or
        below the super-network after warm-up, is reported in `notes` (and, with
        `distill.weak_teacher="drop"`, distillation stops there)."""
        super().__init__(cfg, data, teacher, device, callback, rank, world_size, augment, teacher_val_acc)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.net = build_supernet(cfg, data).to(self.device, memory_format=self.fmt)
        self.teacher = None
        distiller = None
        if self.uses_teacher and cfg.distill.enabled and teacher is not None:
            self.teacher = FrozenTeacher(teacher).to(self.device, memory_format=self.fmt)
            in_shape = (data.in_channels, data.image_size, data.image_size)
            t_ch = self.teacher.probe_channels(in_shape)
            s_ch = [self.net.plans[t].C_out for t in self.net.taps]
            distiller = Distiller(s_ch, t_ch, cfg.distill).to(self.device, memory_format=self.fmt)
        self.module = SearchModule(self.net, distiller, cfg.distill.knowledge_rate)
        self.ddp: nn.Module = self.module
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(
                self.module, device_ids=ids, find_unused_parameters=True
            )
        self.adapter_params = list(distiller.parameters()) if distiller is not None else []
        self.w_opt = optim.adam(
            self.net.weight_parameters() + self.adapter_params,
            lr=cfg.w_lr, betas=cfg.w_betas, weight_decay=cfg.w_weight_decay,
        )  # fmt: skip
        self.a_opt = optim.sgd(self.net.arch_parameters(), lr=cfg.a_lr, momentum=cfg.a_momentum)
        self.controller = ShrinkController(cfg.shrink)
        self.guard = NonFiniteGuard("search", cfg.max_nonfinite)
        self.bn_stats = BatchNormStats(self.module)  # put back when a step is skipped
        self.train_batches = data.iterator(
            "train", cfg.batch_size, seed=cfg.seed, augment=augment, rank=rank, world_size=world_size
        )
        self.warmup_val_acc: float | None = None  # on `val_images` validation images, after warm-up
        self.kd_off = False
        self.teacher_val_acc = teacher_val_acc
        if self.teacher is not None and teacher_val_acc is not None:
            chance = 1.0 / data.num_classes
            if teacher_val_acc < chance + 0.1 * (1.0 - chance):
                self._weak_teacher(f"near chance ({100 * chance:.1f} %)")

    # -- one step ---------------------------------------------------------------------------------
    def _shrinking(self) -> bool:
        return self.epoch >= self.cfg.warmup_epochs

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """backward, clip, weight step, α step, zero grads, delete + controller update."""
        x, y = to_device(self, x, y)
        shrinking = self._shrinking()
        distil = self.module.distiller is not None and not self.kd_off
        teacher_out = self.teacher.forward_features(x) if distil else None
        self.ddp.train()
        self.bn_stats.save()
        out = self.ddp(x, y, teacher_out, self.controller.gamma, self.controller.mu, shrinking)
        out["loss"].backward()
        clip = self.cfg.grad_clip
        norms = [
            nn.utils.clip_grad_norm_(self.net.weight_parameters(), clip),
            nn.utils.clip_grad_norm_(self.net.arch_parameters(), clip),
        ]
        if self.adapter_params:
            norms.append(nn.utils.clip_grad_norm_(self.adapter_params, clip))
        ok = self.guard.check(self.step, all_finite(out["loss"].detach(), *norms), "loss or gradient")
        if ok:
            self.w_opt.step()
            self.a_opt.step()
            self.net.enforce_deleted()
        else:
            self.bn_stats.restore()
        self.w_opt.zero_grad(set_to_none=True)
        self.a_opt.zero_grad(set_to_none=True)
        if ok and not all_finite(self.net.alpha.detach()):
            raise RuntimeError("α became non-finite after a finite step")  # cannot happen with clipped grads
        deleted, emitted = 0, False
        if ok and shrinking:
            deleted = self.net.delete_below_threshold()
            emitted = self.controller.step(deleted)
        self.step += 1
        S = float(out["S"].detach())
        if shrinking and self.controller.should_stop(S):
            self.stop_requested = True
        if emitted:
            self.emit(False, S, self.controller.gamma, self.controller.mu)
        acc = float((out["logits"].detach().argmax(1) == y).float().mean())
        return {k: float(out[k].detach()) for k in ("loss", "ce", "kd", "kd_feat", "kd_logit")} | {
            "S": S, "acc": acc, "deleted": deleted, "emitted": emitted, "skipped": not ok,
        }  # fmt: skip

    def derive(self) -> Genotype:
        return self.net.export()

    def end_epoch(self) -> None:
        if self.epoch == self.cfg.warmup_epochs and self.warmup_val_acc is None:
            self._after_warmup()
        if self.stop_requested or self.epoch >= self.cfg.epochs:
            S = float(self.net.sparsity().detach())
            self.emit(True, S, self.controller.gamma, self.controller.mu)
            self.done = True

    def metrics_extra(self, m: dict[str, Any]) -> dict[str, Any]:
        return {
            "S": m["S"], "gamma": self.controller.gamma, "mu": self.controller.mu,
            "shrinking": self._shrinking(), "kd_on": self.module.distiller is not None and not self.kd_off,
        }  # fmt: skip

    # -- the teacher check ------------------------------------------------------------------------
    def _after_warmup(self) -> None:
        self.warmup_val_acc = self.evaluate_val(self.cfg.val_images)
        t = self.teacher_val_acc
        if self.teacher is not None and t is not None and t < self.warmup_val_acc and not self.kd_off:
            self._weak_teacher(f"below the super-network after warm-up ({100 * self.warmup_val_acc:.1f} %)")

    def _weak_teacher(self, why: str) -> None:
        drop = self.cfg.distill.weak_teacher == "drop"
        self.notes.append(
            f"the teacher's validation accuracy ({100 * (self.teacher_val_acc or 0):.1f} %) is {why}: "
            + (f"distillation off from step {self.step} (search.distill.weak_teacher=drop)" if drop
               else "distilling anyway (search.distill.weak_teacher=keep)")
        )  # fmt: skip
        self.kd_off = self.kd_off or drop

    # -- resume -----------------------------------------------------------------------------------
    def strategy_state(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "w_opt": self.w_opt.state_dict(),
            "a_opt": self.a_opt.state_dict(),
            "controller": self.controller.state_dict(),
            "guard": self.guard.state_dict(),
            "teacher_check": {"after_warmup": self.warmup_val_acc, "kd_off": self.kd_off},
        }

    def load_strategy_state(self, d: dict[str, Any]) -> None:
        self.module.load_state_dict(d["module"])
        self.w_opt.load_state_dict(d["w_opt"])
        self.a_opt.load_state_dict(d["a_opt"])
        self.controller.load_state_dict(d["controller"])
        self.guard.load_state_dict(d["guard"])
        t = d.get("teacher_check") or {}
        self.warmup_val_acc, self.kd_off = t.get("after_warmup"), bool(t.get("kd_off", False))


@register_strategy("snps")
class SNPSSearch(SearchLoop):
    """SNPS alone: the same search without distillation (no teacher is made or read)."""

    uses_teacher = False
