"""The engine on a CUDA device: fast depthwise ops, the search with distillation, checkpoints that move
between GPU and CPU, supernet/derived parity and retraining. Skipped where no GPU is visible (CI);
run them on a GPU machine with `python -m pytest -m gpu`."""

import itertools

import pytest
import torch
from presets import tiny_data, tiny_retrain, tiny_search
from torch import nn

from dnad.checkpoint import load_checkpoint, save_checkpoint
from dnad.config import DistillConfig
from dnad.data import load_dataset
from dnad.distill import ResNetTeacher
from dnad.fastops import IMPLS, DepthwiseConv2d
from dnad.network import build_model
from dnad.reference import textbook
from dnad.retrain import RetrainLoop
from dnad.strategies.snps import SearchLoop
from dnad.supernet import SuperNet

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEV = "cuda"


@pytest.fixture(scope="module")
def data():
    return load_dataset(tiny_data())


@pytest.mark.parametrize(
    ("k", "d", "s", "impl"),
    [(k, d, s, i) for k, d, s in itertools.product((3, 5), (1, 2), (1, 2)) for i in IMPLS
     if d == 2 or not i.startswith("poly")],
)  # fmt: skip
def test_fast_depthwise_matches_conv2d_on_cuda(k, d, s, impl):
    torch.manual_seed(k * 10 + d + s)
    m = DepthwiseConv2d(8, k, stride=s, dilation=d, impl=impl).to(DEV)
    ref = nn.Conv2d(8, 8, k, s, m.padding, d, groups=8, bias=False).to(DEV)
    ref.load_state_dict(m.state_dict())
    x1 = torch.randn(4, 8, 28, 28, device=DEV, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = m(x1), ref(x2)
    g = torch.randn_like(y2)
    y1.backward(g)
    y2.backward(g)
    # cuDNN may use TF32 for convolutions: compare with a tolerance relative to the magnitudes
    for a, b in ((y1, y2), (x1.grad, x2.grad), (m.weight.grad, ref.weight.grad)):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3 * scale)


def test_search_with_distillation_runs_on_cuda_and_resumes_on_cpu(data, tmp_path):
    cfg = tiny_search(epochs=2, distill=DistillConfig(enabled=True, temperature=2.0))
    teacher = ResNetTeacher("resnet18", data.num_classes, data.in_channels, data.image_size)
    rows = []
    loop = SearchLoop(cfg, data, teacher=teacher, device=DEV, callback=rows.append)
    assert loop.net.alpha.is_cuda and all(p.is_cuda for p in loop.net.parameters())
    emissions = loop.run()
    assert emissions and any(r["kd"] > 0 for r in rows)
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in rows])))
    save_checkpoint(tmp_path / "ck", loop.state_dict())
    # a GPU checkpoint loads on a CPU-only loop (tensors are mapped to the CPU)
    cpu = SearchLoop(cfg, data, teacher=teacher, device="cpu")
    cpu.load_state_dict(load_checkpoint(tmp_path / "ck"))
    assert torch.equal(cpu.net.alpha, loop.net.alpha.cpu())
    assert cpu.net.alive_pairs() == loop.net.alive_pairs()


def test_supernet_and_derived_network_agree_on_cuda(weighted_like):
    torch.manual_seed(1)
    net = SuperNet(C=4, num_cells=4, num_classes=5, in_channels=3, image_size=16)
    with torch.no_grad():
        net.alpha.uniform_(-1.0, 3.0)
    net.delete_below_threshold()
    net = net.to(DEV)
    net.train()
    for _ in range(3):
        net(torch.randn(8, 3, 16, 16, device=DEV))
    net.eval()
    g = net.export()
    model = build_model(g, C=4, num_classes=5, in_channels=3, image_size=16).to(DEV)
    model.load_state_dict(net.state_dict(), strict=False)
    ref = weighted_like(net, model).eval()
    model.eval()
    x = torch.randn(4, 3, 16, 16, device=DEV)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(model(x), textbook(model).eval()(x), rtol=2e-3, atol=2e-3)


def test_retrain_on_cuda(data):
    emitted = SearchLoop(tiny_search(epochs=2), data, device=DEV).run()[-1]
    from dnad.genotype import Genotype

    model = build_model(Genotype.from_json(emitted.genotype), C=4, num_classes=data.num_classes,
                        in_channels=3, image_size=16, auxiliary=True)  # fmt: skip
    recs = []
    loop = RetrainLoop(tiny_retrain(optimizer="adamw", lr=0.003), model, data, DEV, callback=recs.append)
    final = loop.run()
    assert next(model.parameters()).is_cuda
    assert [r["epoch"] for r in recs] == [1, 2] and 0.0 <= final["test_acc"] <= 1.0


# ------------------------------------------------------------------ training steps as CUDA graphs
def _graph_loop(data, cuda_graph: str, model=None, **kw) -> RetrainLoop:
    from dnad.genotype import Genotype

    torch.manual_seed(0)
    if model is None:
        g = Genotype.from_json(SearchLoop(tiny_search(epochs=2), data).net.export().to_json())
        model = build_model(
            g, C=4, num_classes=data.num_classes, in_channels=3, image_size=16, auxiliary=True
        )
    return RetrainLoop(tiny_retrain(cuda_graph=cuda_graph, **kw), model, data, DEV)


def _rel_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    ks = [k for k in sa if sa[k].is_floating_point()]
    num = sum(float((sa[k] - sb[k]).pow(2).sum()) for k in ks) ** 0.5
    return num / sum(float(sa[k].pow(2).sum()) for k in ks) ** 0.5


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_cuda_graph_retraining_matches_eager(data, opt):
    kw = dict(optimizer=opt, lr=0.003 if opt == "adamw" else 0.01, drop_path=0.2, epochs=3)
    eager, graph = _graph_loop(data, "off", **kw), _graph_loop(data, "auto", **kw)
    captures = []
    orig = graph._graph_step

    def spy(x, y, lr):
        before = graph._static.graph if graph._static is not None else None
        r = orig(x, y, lr)
        if graph._static is not None and graph._static.graph is not before:
            captures.append(graph._drop_p)
        return r

    graph._graph_step = spy
    for loop in (eager, graph):
        torch.manual_seed(1)
        loop.run()
    assert not eager.graphs and eager._static is None
    assert graph.graphs and graph._static is not None and graph._static.graph is not None
    assert captures == sorted(set(captures)) and len(captures) >= 2  # re-captured when drop-path changed
    assert _rel_diff(eager.model, graph.model) < 2e-2  # cuDNN/TF32 and drop-path draws differ slightly
    for re, rg in zip(eager.history, graph.history):
        assert re["train_loss"] == pytest.approx(rg["train_loss"], rel=2e-2)


def test_cuda_graph_skips_a_nonfinite_step_and_checkpoint_resumes_on_cpu(data, tmp_path):
    from test_guard import poison

    loop = _graph_loop(data, "auto", epochs=3, optimizer="adamw", lr=0.003)
    poison(loop.train_batches, lambda e, b: e == 1 and b == 2)
    loop.run_epoch()
    loop.run_epoch()
    assert loop.graphs and loop._static is not None and loop.guard.skipped_total == 1
    assert all(torch.isfinite(t.float()).all() for t in loop.model.state_dict().values())
    save_checkpoint(tmp_path / "ck", loop.state_dict())
    n = 2 * loop.train_batches.num_batches() - 1
    assert {float(s["step"]) for s in loop.opt.state.values()} == {float(n)}  # the skipped one not counted
    cpu_model = _graph_loop(data, "off").model.cpu()
    cpu = RetrainLoop(tiny_retrain(epochs=3, optimizer="adamw", lr=0.003), cpu_model, data, "cpu")
    cpu.load_state_dict(load_checkpoint(tmp_path / "ck"))
    rec = cpu.run()
    assert rec["epoch"] == 3 and 0.0 <= rec["test_acc"] <= 1.0


def test_cuda_graph_trains_a_torchvision_teacher(data):
    model = ResNetTeacher("resnet18", data.num_classes, data.in_channels, data.image_size).net
    loop = _graph_loop(data, "auto", model=model, epochs=1, optimizer="sgd", lr=0.05, auxiliary_weight=0.0)
    rec = loop.run()
    assert loop._static is not None and loop._static.graph is not None
    assert 0.0 <= rec["test_acc"] <= 1.0 and rec["train_loss"] == rec["train_loss"]
