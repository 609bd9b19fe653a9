import json

import pytest
import torch

from dnad.genotype import DARTS_V2_NORMAL, DARTS_V2_REDUCE, Genotype, from_darts
from dnad.network import auto_drop_path, build_model


def small_genotype():
    cell = (
        ((0, "sep_conv_3x3"), (1, "skip_connect")),
        ((2, "dil_conv_5x5"),),
        ((0, "skip_connect"), (3, "sep_conv_3x3")),
        ((4, "sep_conv_3x3"),),
    )
    return Genotype(cells=(cell, cell, cell), reductions=(1, 2))


def test_canonical_json_and_id_are_order_independent():
    g = small_genotype()
    shuffled = Genotype(
        cells=tuple(tuple(tuple(reversed(node)) for node in cell) for cell in g.cells), reductions=(2, 1)
    )
    assert g == shuffled and g.to_json() == shuffled.to_json() and g.arch_id == shuffled.arch_id
    d = json.loads(g.to_json())
    assert d["format_version"] == 1 and list(d) == sorted(d)
    assert Genotype.from_json(g.to_json()) == g
    assert len(g.sha256) == 64 and g.arch_id == g.sha256[:16]


def test_invalid_genotypes_rejected():
    with pytest.raises(ValueError, match="not computed yet"):
        Genotype(cells=((((2, "skip_connect"),),),), reductions=())
    with pytest.raises(ValueError, match="unknown op"):
        Genotype(cells=((((0, "conv_9"),),),), reductions=())
    with pytest.raises(ValueError, match="keeps no pair"):
        Genotype(cells=(((),),), reductions=())
    with pytest.raises(ValueError, match="unknown genotype keys"):
        Genotype.from_dict({"cells": [], "reductions": [], "extra": 1})


def test_build_model_and_aux_head(tmp_path):
    g = small_genotype()
    g.save(tmp_path / "g.json")
    assert Genotype.load(tmp_path / "g.json") == g
    m = build_model(g, C=4, num_classes=7, in_channels=1, image_size=28, auxiliary=True)
    m.train()
    logits, aux = m.forward_train(torch.randn(2, 1, 28, 28))
    assert logits.shape == aux.shape == (2, 7)
    m.eval()
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    # retrain BNs are affine
    assert all(bn.affine for bn in m.modules() if isinstance(bn, torch.nn.BatchNorm2d))


def test_unread_cells_are_not_built_and_window_stays_right():
    reads_input1_only = (((1, "sep_conv_3x3"),), ((2, "skip_connect"),))
    normal = (((0, "sep_conv_3x3"),), ((2, "sep_conv_3x3"),))
    g = Genotype(cells=(normal, normal, normal, reads_input1_only), reductions=(1, 2))
    m = build_model(g, C=4, num_classes=3, image_size=16)
    assert m.live == [True, True, False, True]
    assert isinstance(m.cells[2], torch.nn.Identity)
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_drop_path_schedule_formula():
    assert auto_drop_path(8 * 20, 20) == pytest.approx(0.3)
    assert auto_drop_path(8 * 8 + 112, 8) == pytest.approx(0.45)


def test_darts_v2_expands_to_3_3m_params():
    g = from_darts(DARTS_V2_NORMAL, DARTS_V2_REDUCE, num_cells=20)
    assert g.num_cells == 20 and g.reductions == (6, 13)
    # DARTS input 1 (previous cell) is our input 0
    assert g.cells[0][0] == ((0, "sep_conv_3x3"), (1, "sep_conv_3x3"))
    m = build_model(g, C=36, num_classes=10, in_channels=3, image_size=32, auxiliary=True)
    params = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("aux_head."))
    assert params == pytest.approx(3.3e6, rel=0.03)
