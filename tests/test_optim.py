"""dnad.optim: the fused CPU optimizers are the same algorithm as PyTorch's default ones (numerics
within float rounding over several steps, gradients of a real network), and are only chosen where
PyTorch has the kernels."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dnad import optim
from dnad.checkpoint import load_checkpoint, save_checkpoint
from dnad.genotype import Genotype
from dnad.network import build_model

GENOTYPE = Path(__file__).resolve().parents[1] / "benchmarks/genotypes/quick_sparsest.json"
KINDS = {
    "adam": (optim.adam, torch.optim.Adam, dict(lr=5e-3, betas=(0.5, 0.999), weight_decay=3e-4)),
    "adamw": (optim.adamw, torch.optim.AdamW, dict(lr=5e-3, weight_decay=0.01)),
    "sgd": (optim.sgd, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=3e-4)),
}


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    g = Genotype.from_json(GENOTYPE.read_text())
    return build_model(g, 4, 10, 1, 16)


def batches(steps: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randn(8, 1, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def clipped_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    F.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    for x, y in batches(steps, seed):
        opt.zero_grad(set_to_none=True)
        clipped_grads(model, x, y)
        opt.step()


def train_pair(a: torch.nn.Module, oa: torch.optim.Optimizer, b: torch.nn.Module, ob: torch.optim.Optimizer,
               steps: int, seed: int = 1) -> None:  # fmt: skip
    """`oa` and `ob` step on the same gradients: `a`'s, copied into `b`'s params. Two networks trained
    apart compare the network's amplification of float rounding, not the optimizers: over 5 steps of
    this net it reached 2e-5 on one CPU (an AMD VM, 2026-12-04) while five steps on equal grads differ
    by 6e-8."""
    for x, y in batches(steps, seed):
        oa.zero_grad(set_to_none=True)
        ob.zero_grad(set_to_none=True)
        clipped_grads(a, x, y)
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            pb.grad = pa.grad.clone()  # the grad's own layout, as autograd gave it
        oa.step()
        ob.step()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fused_cpu_optimizer_matches_the_default(kind: str) -> None:
    ours, theirs, kw = KINDS[kind]
    a = tiny_net()
    b = copy.deepcopy(a)
    oa, ob = ours(a.parameters(), **kw), theirs(b.parameters(), **kw)
    assert oa.defaults.get("fused") is True and not ob.defaults.get("fused")
    before = [p.detach().clone() for p in a.parameters()]
    train_pair(a, oa, b, ob, 5)
    assert any(not torch.equal(p0, p) for p0, p in zip(before, a.parameters()))  # the steps moved the weights
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    for sa, sb in zip(oa.state.values(), ob.state.values(), strict=True):
        for key in sb:
            torch.testing.assert_close(torch.as_tensor(sa[key]).float(), torch.as_tensor(sb[key]).float(),
                                       rtol=1e-4, atol=1e-6)  # fmt: skip


def test_fused_state_round_trips_through_a_checkpoint(tmp_path) -> None:
    """A resumed run (weights_only checkpoint) continues exactly as one that never stopped."""
    a = tiny_net()
    oa = optim.adamw(a.parameters(), lr=5e-3, weight_decay=0.01)
    train(a, oa, 3)
    path = save_checkpoint(tmp_path / "ck", {"model": a.state_dict(), "opt": oa.state_dict()})
    b = tiny_net()
    ob = optim.adamw(b.parameters(), lr=5e-3, weight_decay=0.01)
    state = load_checkpoint(path)
    b.load_state_dict(state["model"])
    ob.load_state_dict(state["opt"])
    train(a, oa, 3, seed=2)
    train(b, ob, 3, seed=2)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_fast_options_only_where_the_kernels_are() -> None:
    assert optim.fast_options([torch.zeros(3)]) == {"fused": True}
    assert optim.fast_options([]) == {}
    assert optim.fast_options([torch.zeros(3, dtype=torch.int64)]) == {}
    assert optim.fast_options([torch.zeros(3, device="meta")]) == {}
    w = torch.zeros(3, requires_grad=True)
    assert not optim.adamw([w], fast=False, lr=1e-3).defaults.get("fused")  # the benchmarks' baseline
    assert optim.adamw([w], lr=1e-3).defaults.get("fused")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fused_update_of_channels_last_params_with_other_layouts(kind: str) -> None:
    """PyTorch's fused CPU kernels read a grad or state tensor as flat memory whatever its strides;
    a contiguous grad or (as a checkpoint gives back) contiguous state next to a channels_last param
    must still get the default optimizer's update."""
    ours, theirs, kw = KINDS[kind]
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 4, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last)
    grads = [torch.randn(6, 4, 3, 3, generator=gen) for _ in range(3)]
    a, b = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    oa, ob = ours([a], **kw), theirs([b], **kw)
    assert a.stride() != grads[0].stride() and oa.defaults.get("fused")
    for i, g in enumerate(grads):
        a.grad, b.grad = g.clone(), g.clone()  # contiguous grads, channels_last params
        oa.step()
        ob.step()
        if i == 0:  # through a state dict of contiguous tensors, as a checkpoint stores them
            sd = oa.state_dict()
            for st in sd["state"].values():
                for k, v in st.items():
                    st[k] = v.contiguous() if v.dim() else v
            oa.load_state_dict(sd)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
