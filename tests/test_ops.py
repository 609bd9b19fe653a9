import pytest
import torch

from dnad.ops import OP_SETS, OPS, build_op, register_op, resolve_op_set

ALL_OPS = sorted(OPS)


@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("affine", [False, True])
def test_op_shape_finite_and_gradients(name, stride, affine):
    C = 8
    op = build_op(name, C, C, stride, affine)
    x = torch.randn(4, C, 14, 14, requires_grad=True)
    y = op(x)
    assert y.shape == (4, C, 7 if stride == 2 else 14, 7 if stride == 2 else 14)
    assert torch.isfinite(y).all()
    if name == "none":  # constant zeros: no parameters, nothing to differentiate
        assert not y.requires_grad and not list(op.parameters())
        return
    (y * torch.randn_like(y)).sum().backward()
    for n, p in op.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: {n} got no gradient"
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL_OPS)
def test_op_changes_channels(name):
    y = build_op(name, 4, 8, 1, True)(torch.randn(2, 4, 8, 8))
    assert y.shape == (2, 8, 8, 8)


def test_odd_spatial_stride2():
    for name in ("skip_connect", "sep_conv_3x3", "dil_conv_5x5", "max_pool_3x3"):
        assert build_op(name, 4, 4, 2, False)(torch.randn(2, 4, 7, 7)).shape == (2, 4, 4, 4)


def test_registry_rejects_duplicates_and_resolves_sets():
    with pytest.raises(ValueError, match="already registered"):
        register_op("skip_connect")(lambda *a: None)
    assert resolve_op_set("reference") == ("sep_conv_3x3", "skip_connect", "dil_conv_5x5")
    assert len(resolve_op_set("darts8")) == 8 and set(OP_SETS["darts8"]) <= set(OPS)
    with pytest.raises(ValueError, match="unknown op set"):
        resolve_op_set("nope")
    with pytest.raises(ValueError, match="empty"):
        resolve_op_set(())
    with pytest.raises(ValueError, match="unknown op"):
        resolve_op_set(("sep_conv_3x3", "conv_9x9"))
