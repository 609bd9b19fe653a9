import pytest
import torch

from dnad.complexity import count_complexity, genotype_cost, op_cost, relative_cost_weights
from dnad.genotype import DARTS_V2_NORMAL, DARTS_V2_REDUCE, from_darts
from dnad.network import build_model
from dnad.ops import OPS, build_op
from dnad.supernet import SuperNet


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("stride", [1, 2])
def test_op_cost_table_matches_ptflops(name, stride):
    op = build_op(name, 8, 8, stride, affine=True)
    c = count_complexity(op, (8, 14, 14))
    assert op_cost(name, 8, 8, stride, 14) == (c.macs, c.params)


@pytest.mark.parametrize("in_ch,size,seed", [(1, 28, 0), (3, 32, 1), (3, 64, 2)])
def test_derived_network_analytic_vs_ptflops_within_2pct(in_ch, size, seed):
    torch.manual_seed(seed)
    net = SuperNet(C=6, num_cells=5, num_classes=10, in_channels=in_ch, image_size=size, stem="cifar")
    with torch.no_grad():
        net.alpha.uniform_(-1.0, 3.0)
    net.delete_below_threshold()
    g = net.export()
    model = build_model(g, C=8, num_classes=10, in_channels=in_ch, image_size=size, auxiliary=True)
    c = count_complexity(model, (in_ch, size, size))
    macs, params = genotype_cost(g, 8, 10, in_ch, size)
    assert c.backend == "aten" and c.ptflops_version
    assert macs == pytest.approx(c.macs, rel=0.02)
    assert params == c.params  # aux head excluded on both sides


def test_imagenet_stem_cost_and_darts_flops():
    g = from_darts(DARTS_V2_NORMAL, DARTS_V2_REDUCE, num_cells=14)
    macs, params = genotype_cost(g, 48, 1000, 3, 224)
    # DARTS paper, ImageNet mobile setting: 4.7M params (its 574M FLOPs came from another counter,
    # which also counts non-conv ops; conv+matmul MACs are ~8% lower)
    assert params == pytest.approx(4.7e6, rel=0.05)
    c = count_complexity(build_model(g, C=48, num_classes=1000, image_size=224), (3, 224, 224))
    assert (macs, params) == (c.macs, c.params)


def test_relative_cost_weights_mean_one_and_skip_floor():
    net = SuperNet(C=4, num_cells=3, num_classes=5, image_size=16)
    w = relative_cost_weights(net, "macs")
    assert w.shape == net.alpha.shape
    assert torch.all(w >= 0.05)
    # skip_connect at stride 1 is free: it sits at the floor; dil_conv_5x5 is costlier than skip
    assert w[0, 1] == pytest.approx(0.05) and w[0, 2] > w[0, 1]


@pytest.mark.parametrize("op", sorted(OPS))
def test_measured_op_cost_equals_the_formulas(op):
    """The generic count on the built module (how ops registered without a formula are costed)
    agrees with every built-in formula, at both strides, channel changes, odd sizes, affine or not."""
    from dnad.complexity import measured_op_cost

    for c_in, c_out, stride in [(8, 8, 1), (8, 8, 2), (8, 16, 1), (8, 16, 2)]:
        for h in (8, 7):
            for affine in (True, False):
                assert measured_op_cost(op, c_in, c_out, stride, h, affine) == op_cost(
                    op, c_in, c_out, stride, h, affine
                ), (c_in, c_out, stride, h, affine)


@pytest.fixture
def custom_op():
    """A user's op registered for one test (a 3x3 conv + BN, label "c3"), unregistered afterwards."""
    from dnad.ops import OP_INFO, register_op

    name = "test_conv_3x3"

    @register_op(name, short="c3", color="#123456")
    def _make(C_in, C_out, stride, affine):
        return torch.nn.Sequential(
            torch.nn.Conv2d(C_in, C_out, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(C_out, affine=affine)
        )

    yield name
    OPS.pop(name)
    OP_INFO.pop(name)


def test_a_registered_op_is_costed_searched_and_drawn(custom_op):
    """An op registered by a user works everywhere a built-in does: cost (conv MACs and params counted
    on the module), cost-weighted sparsity, the super-network, and the cell figure's colour/label."""
    from dnad.figures import op_color, op_short

    macs, params = op_cost(custom_op, 8, 8, 1, 8, affine=True)
    assert macs == 8 * 8 * 9 * 8 * 8 and params == 8 * 8 * 9 + 2 * 8
    net = SuperNet(
        C=4, num_cells=3, num_classes=5, in_channels=3, image_size=16, ops=(custom_op, "skip_connect")
    )
    w = relative_cost_weights(net, "macs")
    assert torch.isfinite(w).all() and w.shape == net.cost_weight.shape
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    assert (op_color(custom_op), op_short(custom_op)) == ("#123456", "c3")
    assert op_short("unknown_op") == "unknown_op" and op_color("unknown_op").startswith("#")
