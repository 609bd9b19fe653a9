"""The CUDA-graph training step (dnad.cudagraph) on the CPU: its optimizer update against torch's own,
and the retrain loop on the graph path (the captured step function run directly, `EmulatedGraphLoop`)
against the ordinary eager loop. Capture and replay themselves are tested in test_cuda.py."""

import copy

import pytest
import torch
from presets import tiny_data, tiny_retrain, tiny_search
from torch import nn

from dnad.cudagraph import FunctionalUpdate, unsupported_reason
from dnad.data import load_dataset
from dnad.genotype import Genotype
from dnad.network import build_model
from dnad.retrain import GRAPH_WARMUP_STEPS, RetrainLoop
from dnad.strategies.snps import SearchLoop


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


OPTS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05),
    "adamw-no-wd": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.0, betas=(0.8, 0.95), eps=1e-6),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=3e-4),
    "sgd-plain": lambda p: torch.optim.SGD(p, lr=0.05),
}


@pytest.mark.parametrize("name", list(OPTS))
def test_functional_update_equals_the_torch_optimizer(name):
    ref, mine = _net(), _net()
    ref_opt, my_opt = OPTS[name](ref.parameters()), OPTS[name](mine.parameters())
    upd = None
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        lr = 0.01 * (1 + step) / 6
        for model, opt in ((ref, ref_opt), (mine, my_opt)):
            opt.param_groups[0]["lr"] = lr
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
        ref_opt.step()
        if upd is None:
            upd = FunctionalUpdate(my_opt, list(mine.parameters()))
        upd.scalars.copy_(torch.tensor(upd.prepare(lr)))
        upd([p.grad for p in mine.parameters()])
        upd.committed()
    upd.flush()
    for a, b in zip(ref.parameters(), mine.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    sa, sb = ref_opt.state_dict()["state"], my_opt.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for key in sa[k]:
            torch.testing.assert_close(sa[k][key], sb[k][key], rtol=1e-6, atol=1e-7)


def test_unsupported_optimizers_are_named():
    ps = list(_net().parameters())
    assert unsupported_reason(torch.optim.AdamW(ps, amsgrad=True)) is not None
    assert "nesterov" in unsupported_reason(torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True))
    assert "RMSprop" in unsupported_reason(torch.optim.RMSprop(ps))
    assert unsupported_reason(torch.optim.AdamW(ps)) is None


@pytest.fixture(scope="module")
def data():
    return load_dataset(tiny_data())


@pytest.fixture(scope="module")
def genotype(data):
    """The tiny super-network's cells with three ops a node (a 3×3 sep conv of the first input, a
    dilated 5×5 conv of the second, a skip of the newest): every kind of layer and a drop path,
    in under a third of the dense network's time."""
    dense = SearchLoop(tiny_search(epochs=2), data).net.export().to_dict()
    keep = lambda j, e: tuple(e) in {(0, "sep_conv_3x3"), (1, "dil_conv_5x5"), (j + 1, "skip_connect")}  # noqa: E731
    dense["cells"] = [
        [[e for e in node if keep(j, e)] for j, node in enumerate(cell)] for cell in dense["cells"]
    ]
    return Genotype.from_dict(dense)


class EmulatedGraphLoop(RetrainLoop):
    """The CUDA-graph path on the CPU: the captured step function run directly instead of replayed."""

    def _graph_capable(self) -> bool:
        return True

    def _run_graph(self, st, key, lr):
        return st.run_eager(lr)


def _loop(data, genotype, graphs: bool, **kw) -> RetrainLoop:
    torch.manual_seed(0)
    model = build_model(genotype, 4, data.num_classes, 3, 16, auxiliary=True)
    cls = EmulatedGraphLoop if graphs else RetrainLoop
    return cls(tiny_retrain(**kw), model, data)


def _assert_same_model(a: RetrainLoop, b: RetrainLoop, tol: float = 2e-3) -> None:
    """The two models agree to `tol` in relative (global L2) terms. Not bitwise: the captured update
    rounds differently from torch's fused CPU kernels in the last bit, and training on 256 images
    amplifies that a little with every step (measured: 7e-4 after 24 AdamW steps)."""
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    floats = [k for k in sa if sa[k].is_floating_point()]
    diff = sum(float((sa[k] - sb[k]).pow(2).sum()) for k in floats) ** 0.5
    norm = sum(float(sa[k].pow(2).sum()) for k in floats) ** 0.5
    assert diff <= tol * norm, f"relative difference {diff / norm:.2e}"
    for k in sa:
        if not sa[k].is_floating_point():
            assert torch.equal(sa[k], sb[k]), k  # BN step counters


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_graph_step_trains_like_the_eager_loop(data, genotype, opt):
    """Warm-up, binding, a drop-path change at every epoch: the same weights, optimizer state and
    per-epoch figures as ordinary eager steps."""
    kw = dict(optimizer=opt, lr=0.003 if opt == "adamw" else 0.01, drop_path=0.2, epochs=3)
    eager, graph = _loop(data, genotype, False, **kw), _loop(data, genotype, True, **kw)
    for loop in (eager, graph):
        torch.manual_seed(1)  # the same drop-path draws
        loop.run()
    assert graph.graphs and graph._static is not None  # the graph path really ran (and did not fall back)
    assert graph.train_batches.num_batches() * 3 > GRAPH_WARMUP_STEPS
    _assert_same_model(eager, graph, 2e-3 if opt == "adamw" else 1e-2)
    se, sg = eager.state_dict()["opt"]["state"], graph.state_dict()["opt"]["state"]
    assert se.keys() == sg.keys()
    for k in se:
        assert se[k].keys() == sg[k].keys()
        if "step" in se[k]:
            assert float(se[k]["step"]) == float(sg[k]["step"]) == 3 * graph.train_batches.num_batches()
    for re, rg in zip(eager.history, graph.history):
        assert re["train_loss"] == pytest.approx(rg["train_loss"], rel=5e-3)
        assert re["val_loss"] == pytest.approx(rg["val_loss"], rel=1e-2)  # accuracy near chance: noisy


def test_graph_step_skips_a_nonfinite_step(data, genotype):
    from test_guard import poison

    eager, graph = _loop(data, genotype, False, epochs=2), _loop(data, genotype, True, epochs=2)
    for loop in (eager, graph):
        poison(loop.train_batches, lambda e, b: e == 1 and b == 2)  # after the warm-up: a replayed step
        torch.manual_seed(1)
        loop.run()
    assert graph._static is not None and graph.guard.skipped_total == eager.guard.skipped_total == 1
    assert all(torch.isfinite(t.float()).all() for t in graph.model.state_dict().values())
    _assert_same_model(eager, graph)  # parameters, BN statistics and counters put back as eagerly


def test_graph_loop_checkpoint_resumes_on_the_eager_path(data, genotype):
    full = _loop(data, genotype, True, epochs=3)
    torch.manual_seed(1)
    full.run()
    part = _loop(data, genotype, True, epochs=3)
    torch.manual_seed(1)
    part.run_epoch()
    part.run_epoch()
    state = copy.deepcopy(part.state_dict())
    resumed = _loop(data, genotype, False, epochs=3)
    resumed.load_state_dict(state)
    resumed.run()
    _assert_same_model(full, resumed)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
