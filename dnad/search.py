"""The DNAD / SNPS search loop (spec §3–5) — no Ray in here.

One-level optimisation: one forward/backward per training batch, Adam on weights + distiller
adapters and SGD on α both step. After warm-up the loss is
`(L_CE + λ·L_KD)·(1 + γ·S) + γ·μ·S`, pairs under the threshold are deleted after every step and the
shrink controller decides when to emit an architecture. Resumable from `state_dict()` at any step.
If a torch.distributed process group is initialised, the loop runs data-parallel with DDP.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dnad.complexity import genotype_cost, relative_cost_weights
from dnad.config import SearchConfig
from dnad.data import DatasetBundle
from dnad.distill import Distiller, FrozenTeacher
from dnad.fastops import preferred_format, to_layout
from dnad.guard import BatchNormStats, NonFiniteGuard, all_finite, rng_state, set_rng_state
from dnad.shrink import ShrinkController
from dnad.supernet import SuperNet

MetricsCallback = Callable[[dict[str, Any]], None]


@dataclass
class Emission:
    """A stable point of the shrinking trajectory (or the final architecture)."""

    index: int
    step: int
    epoch: int
    S: float
    gamma: float
    mu: float
    alive_pairs: int
    params: int  # analytic, at search width C
    macs: int
    arch_id: str
    genotype: str  # canonical JSON
    final: bool = False
    val_acc: float = float("nan")  # the super-network's running validation accuracy when it emitted


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


def build_supernet(cfg: SearchConfig, data: DatasetBundle) -> SuperNet:
    s = cfg.supernet
    net = SuperNet(
        C=s.C, num_cells=s.cells, num_classes=data.num_classes, in_channels=data.in_channels,
        image_size=data.image_size, ops=s.ops, nodes=s.nodes, baseline=s.baseline, alpha_init=s.alpha_init,
        stem=s.stem,
    )  # fmt: skip
    if cfg.shrink.sparsity != "uniform":
        net.set_cost_weights(relative_cost_weights(net, cfg.shrink.sparsity))
    return net


class SearchLoop:
    """Runs the search epoch by epoch. `run()` returns the emissions; `state_dict()` resumes it."""

    def __init__(
        self,
        cfg: SearchConfig,
        data: DatasetBundle,
        teacher: nn.Module | None = None,
        device: str | torch.device = "cpu",
        callback: MetricsCallback | None = None,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = True,
        teacher_val_acc: float | None = None,
    ):
        """`teacher_val_acc`: the teacher's validation accuracy, if known: a teacher near chance, or
        below the super-network after warm-up, is reported in `notes` (and, with
        `distill.weak_teacher="drop"`, distillation stops there)."""
        self.cfg, self.data, self.device, self.callback = cfg, data, torch.device(device), callback
        self.rank, self.world_size = rank, world_size
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.fmt = preferred_format(self.device)
        self.net = build_supernet(cfg, data).to(self.device, memory_format=self.fmt)
        self.teacher = None
        distiller = None
        if cfg.distill.enabled and teacher is not None:
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
        self.w_opt = torch.optim.Adam(
            self.net.weight_parameters() + self.adapter_params,
            lr=cfg.w_lr, betas=cfg.w_betas, weight_decay=cfg.w_weight_decay,
        )  # fmt: skip
        self.a_opt = torch.optim.SGD(self.net.arch_parameters(), lr=cfg.a_lr, momentum=cfg.a_momentum)
        self.controller = ShrinkController(cfg.shrink)
        self.guard = NonFiniteGuard("search", cfg.max_nonfinite)
        self.bn_stats = BatchNormStats(self.module)  # put back when a step is skipped
        self.batches = data.iterator(
            "train", cfg.batch_size, seed=cfg.seed, augment=augment, rank=rank, world_size=world_size
        )
        self.val_batches = data.iterator("val", cfg.batch_size, seed=cfg.seed)
        self.epoch = self.batch = self.step = 0
        self.stop_requested = False
        self.done = False
        self.emissions: list[Emission] = []
        self._window = _Window()
        self.val_acc = float("nan")  # running (EMA) accuracy on one validation batch per logged step
        self.warmup_val_acc: float | None = None  # on `val_images` validation images, after warm-up
        self.kd_off = False
        self.notes: list[str] = []  # what the search decided on its own, for the console and the log
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
        x, y = to_layout(x.to(self.device, non_blocking=True), self.fmt), y.to(self.device, non_blocking=True)
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
            self._emit(S, final=False)
        acc = float((out["logits"].detach().argmax(1) == y).float().mean())
        return {k: float(out[k].detach()) for k in ("loss", "ce", "kd", "kd_feat", "kd_logit")} | {
            "S": S, "acc": acc, "deleted": deleted, "emitted": emitted, "skipped": not ok,
        }  # fmt: skip

    def _emit(self, S: float, final: bool) -> Emission:
        g = self.net.export()
        d = self.data
        macs, params = genotype_cost(
            g, self.net.C, d.num_classes, d.in_channels, d.image_size, self.net.stem_kind
        )
        e = Emission(
            index=len(self.emissions), step=self.step, epoch=self.epoch, S=S, gamma=self.controller.gamma,
            mu=self.controller.mu, alive_pairs=g.num_pairs, params=params, macs=macs, arch_id=g.arch_id,
            genotype=g.to_json(), final=final,
            val_acc=self.val_acc if self.val_acc == self.val_acc else self._running_val(),
        )  # fmt: skip
        self.emissions.append(e)
        return e

    # -- epochs -----------------------------------------------------------------------------------
    def steps_in_epoch(self) -> int:
        n = self.batches.num_batches(self.epoch)
        cap = self.cfg.max_steps_per_epoch
        return min(n, cap) if cap else n

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
                self.callback(self._metrics(m))
        self.epoch += 1
        self.batch = 0
        if self.epoch == self.cfg.warmup_epochs and self.warmup_val_acc is None:
            self._after_warmup()
        if self.stop_requested or self.epoch >= self.cfg.epochs:
            self._emit(float(self.net.sparsity().detach()), final=True)
            self.done = True

    # -- validation and the teacher check ---------------------------------------------------------
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
    def _running_val(self) -> float:
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

    def _metrics(self, m: dict[str, Any]) -> dict[str, Any]:
        d = self.data
        g = self.net.export()
        macs, _ = genotype_cost(g, self.net.C, d.num_classes, d.in_channels, d.image_size, self.net.stem_kind)
        avg = self._window.pop()
        val = self._running_val()
        return {
            "step": self.step, "epoch": self.epoch, "batch": self.batch, "loss": avg["loss"], "ce": avg["ce"],
            "kd": avg["kd"], "S": m["S"], "gamma": self.controller.gamma, "mu": self.controller.mu,
            "alive_pairs": g.num_pairs, "est_macs": macs, "train_acc": avg["acc"], "img_per_s": avg["img_per_s"],
            "emitted": m["emitted"], "emissions": len(self.emissions), "shrinking": self._shrinking(),
            "val_acc": val, "kd_on": self.module.distiller is not None and not self.kd_off,
        }  # fmt: skip

    def run(self, on_epoch_end: Callable[[SearchLoop], None] | None = None) -> list[Emission]:
        """Run until the stop rule or max epochs; `on_epoch_end` is where callers checkpoint."""
        while not self.done:
            self.run_epoch()
            if on_epoch_end is not None:
                on_epoch_end(self)
        return self.emissions

    # -- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "w_opt": self.w_opt.state_dict(),
            "a_opt": self.a_opt.state_dict(),
            "controller": self.controller.state_dict(),
            "guard": self.guard.state_dict(),
            "position": {"epoch": self.epoch, "batch": self.batch, "step": self.step},
            "stop_requested": self.stop_requested,
            "done": self.done,
            "emissions": [asdict(e) for e in self.emissions],
            "rng": rng_state(),
            "val": {"running": self.val_acc, "after_warmup": self.warmup_val_acc, "kd_off": self.kd_off,
                    "notes": list(self.notes)},
        }  # fmt: skip

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.module.load_state_dict(d["module"])
        self.w_opt.load_state_dict(d["w_opt"])
        self.a_opt.load_state_dict(d["a_opt"])
        self.controller.load_state_dict(d["controller"])
        self.guard.load_state_dict(d["guard"])
        pos = d["position"]
        self.epoch, self.batch, self.step = int(pos["epoch"]), int(pos["batch"]), int(pos["step"])
        self.stop_requested, self.done = bool(d["stop_requested"]), bool(d["done"])
        self.emissions = [Emission(**e) for e in d["emissions"]]
        set_rng_state(d["rng"])
        v = d.get("val") or {}  # checkpoints written before the validation split existed have none
        self.val_acc, self.warmup_val_acc = float(v.get("running", float("nan"))), v.get("after_warmup")
        self.kd_off, self.notes = bool(v.get("kd_off", False)), list(v.get("notes", []))


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
