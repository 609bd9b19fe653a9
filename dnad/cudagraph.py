"""A whole training step as one CUDA graph: forward, loss, backward, grad clipping, the optimizer update
and the finite check, captured once and replayed. No Ray in here.

Why: the derived networks are many small kernels (5,000-14,000 ATen ops per training step at C = 7);
replaying a captured graph launches them from the GPU side instead of one host call each. Measured on
an H200 at batch 512 (benchmarks/retrain_speed.py): 9-15 % faster than eager steps; at that batch the
kernels themselves (fp32 depthwise convolutions), not their launches, take most of the time.

What capture needs, and how each is met here:
- no host syncs and no host-side scalars that change between steps. The learning rate and Adam's bias
  corrections change every step, so the optimizer update is re-written with `torch._foreach_*` ops that
  read them from a small device tensor filled before each replay (`FunctionalUpdate`; the same
  arithmetic, in the same order, as `torch.optim.AdamW` / `torch.optim.SGD` with foreach, so the
  optimizer's `state_dict()` stays the standard one and a checkpoint resumes on any device);
- a skipped non-finite step (the retrain loop's guard): the graph first copies every mutable tensor
  (parameters, buffers, optimizer state) into a backup, and the host puts them back when the step's
  finite flag is 0 (one small device-to-host read per step: loss, correct count, flag);
- drop-path's probability is a Python float baked into the graph, so a change of it (once per epoch)
  re-captures; its Bernoulli draws use PyTorch's graph-safe CUDA generator;
- eager warm-up steps on a side stream before the first capture (they are ordinary training steps).

Anything the graph path cannot express (another optimizer, AMSGrad, Nesterov, several param groups,
a capture error) leaves the loop on its eager path with one warning.

`StaticStep.run_eager()` executes the very same step function without capture; the CPU tests compare it
with the retrain loop's ordinary eager step, so only capture and replay themselves need a GPU to test.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

# (logits, auxiliary logits or None, labels) -> the scalar training loss
LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def unsupported_reason(opt: torch.optim.Optimizer) -> str | None:
    """Why `FunctionalUpdate` cannot stand in for `opt` (None when it can)."""
    if len(opt.param_groups) != 1:
        return f"{len(opt.param_groups)} param groups"
    g = opt.param_groups[0]
    if isinstance(opt, torch.optim.AdamW):
        if g.get("amsgrad") or g.get("maximize") or g.get("differentiable"):
            return "AdamW with amsgrad/maximize/differentiable"
        if isinstance(g["lr"], torch.Tensor) or isinstance(g["betas"][0], torch.Tensor):
            return "tensor hyper-parameters"
        return None
    if type(opt) is torch.optim.SGD:
        if g.get("nesterov") or g.get("maximize") or g.get("dampening", 0) != 0:
            return "SGD with nesterov/maximize/dampening"
        return None
    return f"optimizer {type(opt).__name__}"


class FunctionalUpdate:
    """`opt.step()` for the params in `params`, as foreach ops whose step-dependent scalars come from the
    device tensor `self.scalars`; `prepare(lr)` computes them on the host before each step.

    The state tensors are `opt.state[p]`'s own (exp_avg, exp_avg_sq / momentum_buffer), created here
    where missing exactly as the optimizer would on its first step. Adam's `step` counters are kept on
    the host and written back by `flush()`.
    """

    def __init__(self, opt: torch.optim.Optimizer, params: list[nn.Parameter]):
        reason = unsupported_reason(opt)
        if reason is not None:
            raise ValueError(f"no captured update for {reason}")
        self.opt, self.params = opt, params
        self.group = opt.param_groups[0]
        self.adam = isinstance(opt, torch.optim.AdamW)
        dev = params[0].device
        self.scalars = torch.zeros(3, device=dev)
        self.state_tensors: list[torch.Tensor] = []
        if self.adam:
            steps = set()
            for p in params:
                st = opt.state[p]
                if "exp_avg" not in st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                steps.add(float(st["step"]))
            if len(steps) != 1:
                raise ValueError(f"params are at different Adam steps {sorted(steps)}")
            self.step = int(steps.pop())
            self.exp_avgs = [opt.state[p]["exp_avg"] for p in params]
            self.exp_avg_sqs = [opt.state[p]["exp_avg_sq"] for p in params]
            self.state_tensors = self.exp_avgs + self.exp_avg_sqs
        else:
            self.step = 0
            self.bufs: list[torch.Tensor] = []
            if self.group["momentum"] != 0:
                for p in params:
                    st = opt.state[p]
                    if st.get("momentum_buffer") is None:  # buf = 0·m + g on the first step = clone(g)
                        st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self.bufs.append(st["momentum_buffer"])
                self.state_tensors = list(self.bufs)
        self.pending = 0  # Adam steps taken since the last flush()

    def prepare(self, lr: float) -> list[float]:
        """The host-side scalars of the next step (written into `self.scalars` by the caller)."""
        g = self.group
        if self.adam:
            beta1, beta2 = g["betas"]
            t = self.step + self.pending + 1
            bc1, bc2 = 1 - beta1**t, 1 - beta2**t
            return [1 - lr * g["weight_decay"], bc2**0.5, (lr / bc1) * -1]
        return [-lr, 0.0, 0.0]

    def committed(self) -> None:
        """The step just run was kept (not skipped)."""
        self.pending += 1

    def flush(self) -> None:
        """Write the steps taken into the optimizer's state (Adam's per-param `step`)."""
        if self.adam and self.pending:
            self.step += self.pending
            for p in self.params:
                self.opt.state[p]["step"].fill_(float(self.step))
        self.pending = 0

    @torch.no_grad()
    def __call__(self, grads: list[torch.Tensor]) -> None:
        g, s, params = self.group, self.scalars, self.params
        if self.adam:
            beta1, beta2 = g["betas"]
            if g["weight_decay"] != 0:
                torch._foreach_mul_(params, s[0])
            torch._foreach_lerp_(self.exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(self.exp_avg_sqs, beta2)
            torch._foreach_addcmul_(self.exp_avg_sqs, grads, grads, 1 - beta2)
            denom = torch._foreach_sqrt(self.exp_avg_sqs)
            torch._foreach_div_(denom, s[1])
            torch._foreach_add_(denom, g["eps"])
            upd = torch._foreach_div(self.exp_avgs, denom)
            torch._foreach_mul_(upd, s[2])
            torch._foreach_add_(params, upd)
            return
        if g["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=g["weight_decay"])
        if g["momentum"] != 0:
            torch._foreach_mul_(self.bufs, g["momentum"])
            torch._foreach_add_(self.bufs, grads)
            grads = self.bufs
        upd = torch._foreach_mul(grads, s[0])
        torch._foreach_add_(params, upd)


class StaticStep:
    """One training step on fixed input tensors `x`, `y`, whose outputs land in `self.out` =
    [finite flag, loss, correct]. `run_eager()` executes it; `capture()` records it as a CUDA graph
    that `replay()` runs; a step whose flag is 0 is undone (`restore()`).

    Build it right after an ordinary backward pass: the update runs over the params that got gradients
    then, and every tensor it can change (those params, the model's buffers, the optimizer state) gets
    a backup slot."""

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        loss_fn: LossFn,
        forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
        grad_clip: float,
        x: torch.Tensor,
        y: torch.Tensor,
    ):
        self.model, self.opt, self.loss_fn, self.forward = model, opt, loss_fn, forward
        self.grad_clip = grad_clip
        self.x, self.y = x, y
        with_grad = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        self.update = FunctionalUpdate(opt, with_grad)
        self.live = [p.data for p in with_grad] + list(model.buffers()) + self.update.state_tensors
        self.backup = [t.clone() for t in self.live]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out = torch.zeros(3, device=x.device)

    def _body(self) -> None:
        torch._foreach_copy_(self.backup, self.live)
        logits, aux = self.forward(self.x)
        loss = self.loss_fn(logits, aux, self.y)
        loss.backward()
        grads = [p.grad for p in self.update.params]
        norm = nn.utils.clip_grad_norm_(self.update.params, self.grad_clip, foreach=True)
        with torch.no_grad():
            ok = torch.isfinite(loss.detach()) & torch.isfinite(norm)
            correct = (logits.detach().argmax(1) == self.y).sum()
            self.update(grads)  # type: ignore[arg-type]
            torch.stack([ok.float(), loss.detach().float(), correct.float()], out=self.out)

    def set_lr(self, lr: float) -> None:
        self.update.scalars.copy_(torch.tensor(self.update.prepare(lr)), non_blocking=False)

    def run_eager(self, lr: float) -> tuple[bool, float, int]:
        """The step without capture (what the graph replays, run directly: the CPU tests use it)."""
        self.opt.zero_grad(set_to_none=True)
        self.set_lr(lr)
        self._body()
        return self._finish()

    def capture(self, pool: object | None = None) -> None:
        """Record the step as a CUDA graph (nothing runs until `replay`)."""
        self.opt.zero_grad(set_to_none=True)  # backward allocates the grads inside the graph's pool
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            self._body()
        self.graph = g

    def replay(self, lr: float) -> tuple[bool, float, int]:
        assert self.graph is not None
        self.set_lr(lr)
        self.graph.replay()
        return self._finish()

    def _finish(self) -> tuple[bool, float, int]:
        ok, loss, correct = self.out.tolist()
        if ok:
            self.update.committed()
        else:
            self.restore()
        return bool(ok), loss, int(correct)

    @torch.no_grad()
    def restore(self) -> None:
        torch._foreach_copy_(self.live, self.backup)

    def flush(self) -> None:
        self.update.flush()
