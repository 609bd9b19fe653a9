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


@pytest.mark.parametrize("size", [8, 7, 1])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_factorized_reduce_equals_darts_formula(size, layout):
    """DARTS: cat(conv_1(x), conv_2(x[:, :, 1:, 1:])) at stride 2, the offset branch zero-padded at the
    far edge; ours runs conv_2 on the odd/odd phase. Same values and grads, grad in x's layout."""
    import torch.nn.functional as F

    from dnad.fastops import phase
    from dnad.ops import FactorizedReduce

    torch.manual_seed(0)
    fr = FactorizedReduce(6, 8, affine=True).double()
    x = torch.randn(3, 6, size, size, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(3, 8, (size + 1) // 2, (size + 1) // 2, dtype=torch.float64)
    ours = fr.from_relu(x)
    ref_b = F.conv2d(F.pad(x2[:, :, 1:, 1:], (0, 1, 0, 1)), fr.conv_2.weight, stride=2)
    ref = F.batch_norm(
        torch.cat([F.conv2d(x2, fr.conv_1.weight, stride=2), ref_b], 1),
        None,
        None,
        fr.bn.weight,
        fr.bn.bias,
        True,
    )
    assert torch.allclose(ours, ref, atol=1e-12)
    ours.backward(g)
    ref.backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-12)
    # the phase gather hands its grad back in x's layout (autograd's slice backward would not)
    p = phase(x, 1)
    (gx,) = torch.autograd.grad(p, x, torch.randn_like(p))
    assert gx.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", ["non-affine", "affine", "momentum-none", "untracked"])
def test_scaled_bn_equals_bn_times_scale(train, kind):
    from dnad.ops import scaled_bn

    def make():
        torch.manual_seed(0)
        bn = torch.nn.BatchNorm2d(
            5, affine=kind == "affine", momentum=None if kind == "momentum-none" else 0.1,
            track_running_stats=kind != "untracked",
        ).double()  # fmt: skip
        if bn.track_running_stats:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        return bn.train(train)

    a, b = make(), make()
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y1 = scaled_bn(a, x, s)
    g = torch.randn_like(y1)
    (gx1, gs1) = torch.autograd.grad(y1, (x, s), g)
    y2 = b(x) * s
    (gx2, gs2) = torch.autograd.grad(y2, (x, s), g)
    assert torch.allclose(y1, y2, atol=1e-12)
    assert torch.allclose(gx1, gx2, atol=1e-10) and torch.allclose(gs1, gs2, atol=1e-10)
    for (n, u), (_, v) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.allclose(u.double(), v.double()), n
