"""The optimizers dnad builds, with the fastest implementation PyTorch has for where the params live.

On the CPU, `torch.optim.Adam`/`AdamW`/`SGD` default to a Python loop over the parameters (one
handful of small ops per tensor per step); the derived and search networks have hundreds to
thousands of small tensors (the `quick` family's densest network: 941), so that loop costs more than
the update's arithmetic. `fused=True` runs the whole update in one C++ kernel per tensor, with the
same algorithm (the same state, `state_dict` and hyper-parameters; float rounding may differ in the
last bit). On CUDA PyTorch already defaults to its multi-tensor (`foreach`) path, and the CUDA-graph
step (`dnad.cudagraph`) re-writes the update itself, so nothing changes there.

The fused CPU kernels walk a param, its grad and its state tensors as flat memory and ignore their
strides: a channels_last param next to a contiguous state tensor (what a checkpoint gives back, as
safetensors stores contiguous tensors) or a contiguous grad is updated with the wrong elements,
silently. So every optimizer built here re-lays, before each step and after `load_state_dict`, any
grad or state tensor whose strides differ from its param's into the param's own layout (a copy, only
where they differ: autograd already gives grads the param's strides).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def fast_options(params: Iterable[torch.Tensor]) -> dict[str, Any]:
    """`{"fused": True}` when every param is a floating-point CPU tensor (PyTorch's fused CPU kernels
    for Adam, AdamW and SGD), else `{}` (PyTorch's own default)."""
    ps = list(params)
    if ps and all(p.device.type == "cpu" and p.is_floating_point() for p in ps):
        return {"fused": True}
    return {}


def match_layouts(opt: torch.optim.Optimizer) -> int:
    """Give every grad and state tensor of `opt` its param's strides (a copy where they differ);
    returns how many were re-laid."""
    moved = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.stride() != p.stride():
                p.grad = torch.empty_like(p).copy_(p.grad)
                moved += 1
            state = opt.state.get(p)
            for k, v in (state or {}).items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
                    moved += 1
    return moved


def _match_layouts_hook(opt: torch.optim.Optimizer, *_: Any) -> None:
    """`match_layouts` as a step pre-hook (opt, args, kwargs) and a load-state-dict post-hook (opt)."""
    match_layouts(opt)


def _build(cls: type[torch.optim.Optimizer], params: Iterable[torch.Tensor], fast: bool, kw: Any) -> Any:
    ps = list(params)
    if not fast:
        return cls(ps, **kw)
    opt = cls(ps, **kw, **fast_options(ps))
    if opt.defaults.get("fused"):
        opt.register_step_pre_hook(_match_layouts_hook)
        opt.register_load_state_dict_post_hook(_match_layouts_hook)
    return opt


def adam(params: Iterable[torch.Tensor], fast: bool = True, **kw: Any) -> torch.optim.Adam:
    """`torch.optim.Adam(params, **kw)`, fused and guarded on the CPU; `fast=False`: PyTorch's default."""
    return _build(torch.optim.Adam, params, fast, kw)


def adamw(params: Iterable[torch.Tensor], fast: bool = True, **kw: Any) -> torch.optim.AdamW:
    """`torch.optim.AdamW(params, **kw)`, as `adam`."""
    return _build(torch.optim.AdamW, params, fast, kw)


def sgd(params: Iterable[torch.Tensor], fast: bool = True, **kw: Any) -> torch.optim.SGD:
    """`torch.optim.SGD(params, **kw)`, as `adam`."""
    return _build(torch.optim.SGD, params, fast, kw)
