"""dnad.fold: BN folded into the conv before it gives the same logits as the eval-mode network, for
every op of the DARTS space, every stem, both memory layouts; the trained model is left untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dnad.config import DataConfig
from dnad.data import load_dataset
from dnad.fold import count_batchnorms, fold_batchnorm
from dnad.genotype import Genotype, reduction_indices
from dnad.network import build_model
from dnad.ops import FactorizedReduce, ReLUConvBN, resolve_op_set
from dnad.retrain import evaluate


def dense(cells: int = 3, nodes: int = 3) -> Genotype:
    ops = resolve_op_set("darts8")
    cell = tuple(tuple((i, o) for i in range(k + 2) for o in ops) for k in range(nodes))
    return Genotype(cells=(cell,) * cells, reductions=reduction_indices(cells))


def randomise(model: nn.Module, channels: int, size: int, layout: torch.memory_format) -> None:
    """Non-trivial BN affine parameters and running statistics (a few training-mode forwards)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine:
            m.weight.data = torch.rand(m.num_features, generator=g) * 1.5 + 0.25
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.5
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model((torch.randn(8, channels, size, size, generator=g) * 2 + 0.3).to(memory_format=layout))
    model.eval()


@pytest.mark.parametrize("size,stem", [(16, "auto"), (15, "auto"), (32, "imagenet")])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_folded_network_matches_eval_network_and_leaves_it_alone(size, stem, layout):
    torch.manual_seed(0)
    model = build_model(dense(), 4, 5, 3, size, stem=stem).to(memory_format=layout)
    randomise(model, 3, size, layout)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 3, size, size).to(memory_format=layout)
    folded = fold_batchnorm(model)
    assert count_batchnorms(model) > 0 and count_batchnorms(folded) == 0
    assert any(isinstance(m, FactorizedReduce) for m in folded.modules())  # reduction cells covered
    with torch.inference_mode():
        ref, got = model(x), folded(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert not model.training  # the model's mode and state are what they were
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in folded.parameters())


def test_non_affine_bn_folds_and_bn_without_running_statistics_is_left():
    torch.manual_seed(0)
    seq = ReLUConvBN(4, 6, 3, 1, 1, affine=False)
    free = nn.Sequential(nn.Conv2d(4, 6, 1, bias=True), nn.BatchNorm2d(6, track_running_stats=False))
    randomise(seq, 4, 9, torch.contiguous_format)
    x = torch.randn(5, 4, 9, 9)
    for m in (seq, free.eval()):
        f = fold_batchnorm(m)
        torch.testing.assert_close(f(x), m(x), rtol=1e-4, atol=1e-5)
    assert count_batchnorms(fold_batchnorm(seq)) == 0
    assert count_batchnorms(fold_batchnorm(free)) == 1  # batch statistics even in eval: not foldable


def test_evaluate_folded_equals_unfolded():
    data = load_dataset(DataConfig(dataset="fake", image_size=12, channels=1, num_classes=4, fake_size=80,
                                   val_size=40, augment=False))  # fmt: skip
    torch.manual_seed(0)
    model = build_model(dense(cells=2, nodes=2), 4, 4, 1, 12)
    randomise(model, 1, 12, torch.contiguous_format)
    model.train()  # evaluate puts the mode back
    batches = data.iterator("val", 16, seed=0)
    acc_f, loss_f = evaluate(model, batches, torch.device("cpu"), fold=True)
    acc_u, loss_u = evaluate(model, batches, torch.device("cpu"), fold=False)
    assert model.training
    assert acc_f == acc_u and 0.0 < loss_f
    assert loss_f == pytest.approx(loss_u, rel=1e-5)
