"""Training a network from scratch: derived architectures (spec §6) and teachers. No Ray in here.

SGD with momentum (or AdamW), cosine (or linear-with-warm-up) schedule computed from the epoch (so resuming
needs no scheduler state), drop-path rising linearly to p_max, auxiliary loss, grad clipping. The
reported accuracy is the final epoch's, never the best epoch's. On a CUDA device each training step is
replayed as one CUDA graph after a few eager warm-up steps (`cfg.cuda_graph`, see `dnad.cudagraph`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dnad import optim
from dnad.config import RetrainConfig
from dnad.cudagraph import StaticStep, unsupported_reason
from dnad.data import BatchIterator, DatasetBundle
from dnad.fastops import preferred_format, to_layout
from dnad.fold import fold_batchnorm
from dnad.guard import BatchNormStats, NonFiniteGuard, all_finite, rng_state, set_rng_state
from dnad.network import Network, auto_drop_path

log = logging.getLogger(__name__)
GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before the first capture (PyTorch's advice)


def lr_at(cfg: RetrainConfig, epoch: int, step_frac: float = 0.0) -> float:
    """Learning rate at (fractional) epoch `epoch + step_frac`."""
    e = epoch + step_frac
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * e / cfg.epochs))
    if cfg.warmup_epochs and e < cfg.warmup_epochs:
        return cfg.lr * (e + 1e-3) / cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1)
    return cfg.lr * max(0.0, 1.0 - (e - cfg.warmup_epochs) / span)


def make_optimizer(cfg: RetrainConfig, model: nn.Module, fast: bool = True) -> torch.optim.Optimizer:
    """The weight optimizer of `cfg.optimizer` (its lr is set every step from `lr_at`); `fast`: fused
    on the CPU (`dnad.optim`), else PyTorch's default implementation (the benchmarks' baseline)."""
    ps = model.parameters()
    if cfg.optimizer == "adamw":
        return optim.adamw(ps, fast, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optim.sgd(ps, fast, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def eval_batch_size(device: torch.device | str) -> int:
    """Test batches: 256 on the CPU; 1024 on a GPU, where a batch costs about its kernel launches."""
    return 256 if torch.device(device).type == "cpu" else 1024


def evaluate(
    model: nn.Module, batches: BatchIterator, device: torch.device, fold: bool = True
) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) over every image of `batches`, in eval mode. `fold`: run
    an inference copy with the BNs folded into their convs (`dnad.fold`: the same logits to float
    rounding, about a fifth less time on the CPU); `model` itself is not changed."""
    was = model.training
    model.eval()
    net = fold_batchnorm(model) if fold else model
    correct, total, loss = 0, 0, 0.0
    with torch.inference_mode():
        for x, y in batches.iterate(0):
            x, y = to_layout(x.to(device), preferred_format(device)), y.to(device)
            logits = net(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += y.numel()
    model.train(was)
    return correct / max(total, 1), loss / max(total, 1)


class RetrainLoop:
    """Trains `model` on `data.train`; evaluates on `data.val` every `cfg.eval_every` epochs and after
    the last one, and on `data.test` once, after the last epoch (when `test`). Validation accuracy is
    what architectures are chosen by; the test accuracy is only reported."""

    def __init__(
        self,
        cfg: RetrainConfig,
        model: nn.Module,
        data: DatasetBundle,
        device: str | torch.device = "cpu",
        callback: Callable[[dict[str, Any]], None] | None = None,
        augment: bool = True,
        cutout: int = 0,
        stage: str = "retrain",
        progress: Callable[[dict[str, Any]], None] | None = None,
        progress_every: int = 10,
        test: bool = True,
    ):
        """`callback` gets each epoch's record; `progress`, if given, gets a row every
        `progress_every` steps inside an epoch: {"progress": epochs done as a float, running
        "train_loss", "train_acc", "img_per_s"} (for progress displays). `test=False`: never touch the
        test split (teachers)."""
        self.cfg, self.model, self.data, self.callback = cfg, model, data, callback
        self.progress, self.progress_every = progress, max(1, progress_every)
        self.device = torch.device(device)
        self.fmt = preferred_format(self.device)
        self.model.to(self.device, memory_format=self.fmt)
        self.opt = make_optimizer(cfg, model)
        self.train_batches = data.iterator(
            "train", cfg.batch_size, seed=cfg.seed, augment=augment, cutout=cutout
        )
        eval_bs = eval_batch_size(self.device)
        self.val_batches = data.iterator("val", eval_bs, seed=cfg.seed)
        self.test_batches = data.iterator("test", eval_bs, seed=cfg.seed) if test else None
        self.guard = NonFiniteGuard(stage, cfg.max_nonfinite)
        self.bn_stats = BatchNormStats(model)  # put back when a step is skipped
        if isinstance(model, Network):
            self.p_max = (
                auto_drop_path(model.genotype.num_pairs, model.genotype.num_cells)
                if cfg.drop_path == "auto"
                else float(cfg.drop_path)
            )
        else:
            self.p_max = 0.0
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        # CUDA graph state (see dnad.cudagraph): eager warm-up steps, then one captured step replayed
        reason = unsupported_reason(self.opt)
        on_gpu = self._graph_capable()
        self.graphs = cfg.cuda_graph == "auto" and on_gpu and reason is None
        if cfg.cuda_graph == "auto" and on_gpu and reason is not None:
            log.warning("%s: eager steps, no CUDA graph (%s)", stage, reason)
        self._static: StaticStep | None = None
        self._drop_p = 0.0
        self._graph_key: float | None = None
        self._warm = 0

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(self.model, Network):
            return self.model.forward_train(x)
        return self.model(x), None

    def _loss(self, logits: torch.Tensor, aux: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        ls = self.cfg.label_smoothing
        loss = F.cross_entropy(logits, y, label_smoothing=ls)
        if aux is not None:
            loss = loss + self.cfg.auxiliary_weight * F.cross_entropy(aux, y, label_smoothing=ls)
        return loss

    def _eager_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[bool, float, int]:
        """One ordinary step: (kept, loss, correct); a non-finite one is undone (BN statistics put back)."""
        self.bn_stats.save()
        logits, aux = self._forward(x)
        loss = self._loss(logits, aux, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if all_finite(loss.detach(), norm):
            self.opt.step()
            return True, float(loss.detach()), int((logits.detach().argmax(1) == y).sum())
        self.bn_stats.restore()
        return False, float("nan"), 0

    def _graph_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[bool, float, int] | None:
        """The step through a CUDA graph (after the warm-up); None = graphs turned off, run it eagerly."""
        st = self._static
        if st is None:
            # the last warm-up step left every used parameter's gradient in place: bind to those
            st = self._static = StaticStep(
                self.model, self.opt, self._loss, self._forward, self.cfg.grad_clip, x.clone(), y.clone()
            )
        if x.shape != st.x.shape:  # never with drop_last batches; be safe anyway
            self._stop_graphs(f"batch shape {tuple(x.shape)} differs from the captured {tuple(st.x.shape)}")
            return None
        key = self._drop_p  # baked into the graph: re-capture when it changes (once per epoch at most)
        st.x.copy_(x)
        st.y.copy_(y)
        return self._run_graph(st, key, lr)

    def _graph_capable(self) -> bool:
        return self.device.type == "cuda"

    def _run_graph(self, st: StaticStep, key: float, lr: float) -> tuple[bool, float, int]:
        """Replay the captured step, capturing it first (again when the drop-path rate `key` changed)."""
        if st.graph is None or key != self._graph_key:
            st.graph = None
            torch.cuda.synchronize(self.device)
            st.capture()
            self._graph_key = key
            log.debug("captured a CUDA graph of one training step (drop-path %.3f)", key)
        return st.replay(lr)

    def _stop_graphs(self, why: str) -> None:
        log.warning("CUDA graphs off for the rest of this run: %s", why)
        if self._static is not None:
            self._static.flush()
            self._static.graph = None
        self._static, self.graphs = None, False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[bool, float, int]:
        if self.graphs and self._warm >= GRAPH_WARMUP_STEPS:
            try:
                r = self._graph_step(x, y, lr)
            except Exception as e:  # a capture the graph cannot hold: fall back, keep the run going
                self._stop_graphs(f"{type(e).__name__}: {e}")
                r = None
            if r is not None:
                return r
        elif self.graphs:  # an eager warm-up step, on a side stream on CUDA
            self._warm += 1
            if self.device.type == "cuda":
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    r = self._eager_step(x, y)
                torch.cuda.current_stream(self.device).wait_stream(side)
                return r
        return self._eager_step(x, y)

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs

    def run_epoch(self) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        model.train()
        if isinstance(model, Network):
            self._drop_p = self.p_max * self.epoch / cfg.epochs
            model.set_drop_path(self._drop_p)
        n = self.train_batches.num_batches(self.epoch)
        if cfg.max_steps_per_epoch:
            n = min(n, cfg.max_steps_per_epoch)
        t0, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
        for b, (x, y) in enumerate(self.train_batches.iterate(self.epoch)):
            if b >= n:
                break
            for g in self.opt.param_groups:
                g["lr"] = lr_at(cfg, self.epoch, b / n)
            x, y = (
                to_layout(x.to(self.device, non_blocking=True), self.fmt),
                y.to(self.device, non_blocking=True),
            )
            ok, loss_v, n_correct = self._step(x, y, self.opt.param_groups[0]["lr"])
            if self.guard.check(self.step, ok, "loss or gradient"):
                loss_sum += loss_v * y.numel()
                correct += n_correct
                seen += y.numel()
            self.step += 1
            if self.progress is not None and (b + 1) % self.progress_every == 0 and b + 1 < n:
                self.progress({
                    "progress": self.epoch + (b + 1) / n, "train_loss": loss_sum / max(seen, 1),
                    "train_acc": correct / max(seen, 1),
                    "img_per_s": seen / max(time.perf_counter() - t0, 1e-9),
                })  # fmt: skip
        if self._static is not None:
            self._static.flush()
        train_s = time.perf_counter() - t0
        self.epoch += 1
        nan = float("nan")
        every, last = cfg.eval_every, self.epoch == cfg.epochs
        due = last or (every > 0 and self.epoch % every == 0)
        val_acc, val_loss = evaluate(model, self.val_batches, self.device) if due else (nan, nan)
        # the final epoch's test accuracy is reported next to the validation accuracy that chose the model
        tested = last and self.test_batches is not None
        test_acc, test_loss = evaluate(model, self.test_batches, self.device) if tested else (nan, nan)
        rec = {
            "epoch": self.epoch, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "val_acc": val_acc, "val_loss": val_loss, "test_acc": test_acc, "test_loss": test_loss,
            "lr": self.opt.param_groups[0]["lr"], "img_per_s": seen / max(train_s, 1e-9),
            "epoch_s": time.perf_counter() - t0,
        }  # fmt: skip
        self.history.append(rec)
        if self.callback is not None:
            self.callback(rec)
        return rec

    def run(self, on_epoch_end: Callable[[RetrainLoop], None] | None = None) -> dict[str, Any]:
        """Train to the last epoch; returns the final epoch's record."""
        while not self.done:
            self.run_epoch()
            if on_epoch_end is not None:
                on_epoch_end(self)
        return self.history[-1] if self.history else {}

    def state_dict(self) -> dict[str, Any]:
        if self._static is not None:
            self._static.flush()
        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "guard": self.guard.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "rng": rng_state(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.model.load_state_dict(d["model"])
        self.opt.load_state_dict(d["opt"])
        if self._static is not None:  # its update holds the optimizer's old state tensors: start over
            self._static.graph = None
            self._static, self._warm = None, 0
        self.guard.load_state_dict(d["guard"])
        self.epoch, self.step, self.history = int(d["epoch"]), int(d["step"]), list(d["history"])
        set_rng_state(d["rng"])
