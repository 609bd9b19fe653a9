import math

import pytest
import torch

from dnad.network import build_model
from dnad.reference import textbook
from dnad.supernet import SuperNet, node_segments


def tiny(**kw):
    args = dict(C=4, num_cells=3, num_classes=5, in_channels=3, image_size=16)
    args.update(kw)
    return SuperNet(**args)


def set_node_weights(net, cell, node, weights):
    """Give node `node` of `cell` these normalised weights (by setting α proportional to them)."""
    a, b = net.segments[node - 2]
    with torch.no_grad():
        net.alpha[cell, a:b] = torch.tensor(weights, dtype=torch.float32)


def test_fresh_cell_sparsity_reference_values():
    from dnad.supernet import fresh_sparsity

    net = tiny(num_cells=1)
    assert float(net.sparsity()) == pytest.approx(72.03, abs=0.01)
    assert fresh_sparsity(1, 4, 3) == pytest.approx(float(net.sparsity()), rel=1e-6)
    assert fresh_sparsity(3, 4, 3) == pytest.approx(float(tiny(num_cells=3).sparsity()), rel=1e-6)
    for j in range(2, 6):  # one op per node at w = 1
        n = j * 3
        set_node_weights(net, 0, j, [1.0] + [0.0] * (n - 1))
    assert float(net.sparsity()) == pytest.approx(15.73, abs=0.01)
    for j in range(2, 6):  # two ops per node at w = 0.5
        n = j * 3
        set_node_weights(net, 0, j, [1.0, 1.0] + [0.0] * (n - 2))
    assert float(net.sparsity()) == pytest.approx(26.06, abs=0.01)


def test_segments():
    assert node_segments(4, 3) == [(0, 6), (6, 15), (15, 27), (27, 42)]
    net = tiny()
    assert net.alpha.shape == (3, 42)


def test_mixing_weights_relu_normalised_and_uniform_at_init():
    net = tiny()
    w = net.mixing_weights()
    for a, b in net.segments:
        assert torch.allclose(w[:, a:b].sum(1), torch.ones(3))
        assert torch.allclose(w[:, a:b], torch.full_like(w[:, a:b], 1.0 / (b - a)))


def test_all_nonpositive_node_has_no_nan_and_keeps_strongest():
    net = tiny()
    a, b = net.segments[1]
    with torch.no_grad():
        net.alpha[0, a:b] = -torch.arange(1, b - a + 1, dtype=torch.float32)  # strongest is index a
    w = net.mixing_weights()
    assert torch.isfinite(w).all()
    assert w[0, a] == 1.0 and w[0, a + 1 : b].sum() == 0
    net.delete_below_threshold()
    assert not net.deleted[0, a] and net.deleted[0, a + 1 : b].all()
    y = net(torch.randn(2, 3, 16, 16))
    assert torch.isfinite(y).all()
    assert len(net.export().cells[0][1]) == 1


def test_deletion_is_permanent():
    net = tiny()
    with torch.no_grad():
        net.alpha[1, 0] = 0.0
    assert net.delete_below_threshold() == 1
    assert net.alpha[1, 0] == -1000.0
    with torch.no_grad():
        net.alpha[1, 0] = 5.0  # an optimizer pushes it back up ...
    net.enforce_deleted()  # ... the loop pins it again after every step
    assert net.mixing_weights()[1, 0] == 0.0
    assert net.delete_below_threshold() == 0 and net.deleted.sum() == 1


def count_calls(net):
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    for cell in net.cells:
        for edge in cell.edges.values():
            # the op's last module that is not a BN runs exactly once per computed pair (the leading
            # ReLU may be shared; the final BN may run as a functional call with the mixing weight)
            mods = [m for m in edge.modules() if not isinstance(m, torch.nn.BatchNorm2d)]
            mods[-1].register_forward_hook(hook)
    return calls


def test_deleted_pairs_are_not_computed():
    net = tiny()
    calls = count_calls(net)
    x = torch.randn(2, 3, 16, 16)
    net(x)
    assert calls["n"] == 3 * 42
    with torch.no_grad():
        net.alpha[:, ::2] = 0.0  # half of the pairs
    deleted = net.delete_below_threshold()
    calls["n"] = 0
    net(x)
    assert calls["n"] == 3 * 42 - deleted == net.alive_pairs()


def test_dead_cells_and_unread_inputs_are_skipped():
    net = tiny(num_cells=4)  # reductions at 1, 2
    P = net.alpha.shape[1]
    with torch.no_grad():
        # cell 3 reads only its input 1 (cell 1), so cell 2 is dead: nobody reads it
        for a, b in net.segments:
            for col in range(a, b):
                i = (col - a) // 3
                if i == 0:
                    net.alpha[3, col] = 0.0
    net.delete_below_threshold()
    calls = {c: 0 for c in range(4)}
    for c, cell in enumerate(net.cells):
        cell.register_forward_hook(lambda *_, c=c: calls.__setitem__(c, calls[c] + 1))
    pre_calls = {"pre0": 0}
    net.cells[3].inputs.pre0.register_forward_hook(lambda *_: pre_calls.__setitem__("pre0", 1))
    y = net(torch.randn(2, 3, 16, 16))
    assert torch.isfinite(y).all() and P == 42
    assert calls == {0: 1, 1: 1, 2: 0, 3: 1}
    assert pre_calls["pre0"] == 0


@pytest.mark.parametrize("in_ch,size,cells", [(1, 28, 3), (3, 32, 3), (3, 224, 3)])
def test_stems(in_ch, size, cells):
    net = SuperNet(C=4, num_cells=cells, num_classes=10, in_channels=in_ch, image_size=size)
    logits, feats = net.forward_features(torch.randn(2, in_ch, size, size))
    assert logits.shape == (2, 10)
    assert [f.shape[1] for f in feats] == [net.plans[t].C_out for t in net.taps]


def test_arch_and_weight_parameters_disjoint():
    net = tiny()
    a = {id(p) for p in net.arch_parameters()}
    w = {id(p) for p in net.weight_parameters()}
    assert a and w and not (a & w)
    assert a | w == {id(p) for p in net.parameters()}


def test_parity_supernet_vs_derived_network(weighted_like):
    torch.manual_seed(1)
    net = tiny(num_cells=4)
    with torch.no_grad():
        net.alpha.uniform_(-1.0, 3.0)
    net.delete_below_threshold()
    # give the BN running stats something non-trivial
    net.train()
    for _ in range(3):
        net(torch.randn(8, 3, 16, 16))
    net.eval()
    g = net.export()
    model = build_model(g, C=4, num_classes=5, in_channels=3, image_size=16)
    missing, _unexpected = model.load_state_dict(net.state_dict(), strict=False)
    assert all(k.endswith((".weight", ".bias")) for k in missing)  # affine BN params only (init 1/0)
    assert all(model.state_dict()[k].dim() == 1 for k in missing)
    ref = weighted_like(net, model).eval()
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(net(x), ref(x), atol=1e-5)
        assert torch.allclose(model(x), textbook(model).eval()(x), atol=1e-5)  # fast derived = textbook
    assert math.isclose(sum(len(n) for cell in g.cells for n in cell), net.alive_pairs())


@pytest.mark.parametrize("layouts", ["nchw", "channels_last", "mixed"])
def test_weighted_sum_matches_plain_sum_values_and_grads(layouts):
    from dnad.supernet import weighted_sum

    def make(k):
        t = torch.randn(2, 3, 4, 5, dtype=torch.float64)
        if layouts == "channels_last" or (layouts == "mixed" and k == 1):
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_()

    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    xs = [make(k) for k in range(3)]
    assert torch.autograd.gradcheck(lambda w, *xs: weighted_sum(w, list(xs)), (w, *xs))
    plain = sum(w[k] * xs[k] for k in range(3))
    assert torch.allclose(weighted_sum(w, xs), plain)


@pytest.mark.parametrize("prescale", [False, True])
@pytest.mark.parametrize("n_plain", [0, 2])
def test_weighted_sum_with_phased_terms_matches_merged_sum(n_plain, prescale):
    from dnad.fastops import merge_phases, split_phases
    from dnad.ops import Phased
    from dnad.supernet import weighted_sum

    cl = torch.channels_last
    w = torch.rand(n_plain + 2, dtype=torch.float64, requires_grad=True)
    plain = [
        torch.randn(2, 3, 6, 4, dtype=torch.float64).contiguous(memory_format=cl) for _ in range(n_plain)
    ]
    phased = [split_phases(torch.randn(2, 3, 6, 4, dtype=torch.float64), cl) for _ in range(2)]
    leaves = [t.requires_grad_() for t in plain + phased]

    def fast(w, *ts):  # phased terms first: the sum must reorder them after the plain ones
        terms = [Phased(t, 6, 4, cl) for t in ts[n_plain:]] + list(ts[:n_plain])
        w_terms = torch.cat([w[n_plain:], w[:n_plain]])
        if not prescale:
            return weighted_sum(w_terms, terms)
        # every other term carries its weight already (as an op with the weight folded into its BN)
        pre = [k % 2 == 0 for k in range(len(terms))]
        terms = [w_terms[k] * t if pre[k] and not isinstance(t, Phased) else t for k, t in enumerate(terms)]
        terms = [
            Phased(w_terms[k] * t.y, 6, 4, cl) if pre[k] and isinstance(t, Phased) else t
            for k, t in enumerate(terms)
        ]
        return weighted_sum(w_terms, terms, pre)

    def reference(w, *ts):
        merged = list(ts[:n_plain]) + [merge_phases(t, 6, 4, cl) for t in ts[n_plain:]]
        return sum(w[k] * merged[k] for k in range(len(merged)))

    assert torch.allclose(fast(w, *leaves), reference(w, *leaves))
    assert fast(w, *leaves).is_contiguous(memory_format=cl)
    assert torch.autograd.gradcheck(fast, (w, *leaves))


@pytest.mark.parametrize("size", [8, 7])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_supernet_fast_paths_match_textbook_forward(size, layout):
    """Shared ReLU/phase views, phase-domain dilated convs + BN, the copy-free merge and mixing
    weights folded into BN against each op's own forward with plain `F.conv2d` kernels and
    Σ w·op(x): same logits, same grads for inputs, weights and α, same BN running statistics, in
    training mode, on even maps (phase domain) and odd ones (fallback)."""

    from dnad.reference import TextbookMixedCell

    torch.manual_seed(0)
    net = SuperNet(C=4, num_cells=3, num_classes=5, in_channels=3, image_size=size).double()
    with torch.no_grad():
        net.alpha.add_(torch.rand_like(net.alpha))  # distinct mixing weights
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    if layout == "channels_last":
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def run(model):
        xi = x.clone().requires_grad_()
        logits = model(xi)
        (logits * torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return logits.detach(), xi.grad, grads, dict(model.named_buffers())

    assert_same_as_textbook(net, run, layout, TextbookMixedCell)


def assert_same_as_textbook(model, run, layout: str, cell_type) -> None:
    """`run(model)` (logits, input grad, parameter grads, buffers) equals `run` of its textbook copy
    in the same layout with plain kernels."""
    import copy

    from dnad.fastops import reference_kernels

    fast = run(copy.deepcopy(model))
    ref_net = textbook(model)
    assert all(type(c) is cell_type for c in ref_net.cells)
    if layout == "channels_last":  # same layout on both sides: the comparison is of the maths only
        ref_net = ref_net.to(memory_format=torch.channels_last)
    with reference_kernels():
        ref = run(ref_net)
    assert torch.allclose(fast[0], ref[0], atol=1e-10)
    assert torch.allclose(fast[1], ref[1], atol=1e-10)
    assert fast[2].keys() == ref[2].keys()
    for name in fast[2]:
        assert torch.allclose(fast[2][name], ref[2][name], atol=1e-9), name
    for name in fast[3]:
        assert torch.allclose(fast[3][name].double(), ref[3][name].double()), name


def test_weighted_sum_refuses_phased_terms_of_an_odd_map():
    from dnad.fastops import split_phases
    from dnad.ops import Phased
    from dnad.supernet import weighted_sum

    y = split_phases(torch.randn(2, 3, 7, 7), torch.contiguous_format)
    with pytest.raises(ValueError, match="even-sized"):
        weighted_sum(torch.ones(1), [Phased(y, 7, 7, torch.contiguous_format)])


@pytest.mark.parametrize("drop", [0.0, 0.4])
@pytest.mark.parametrize("size", [8, 7])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_derived_network_training_step_matches_textbook(size, layout, drop):
    """The derived network's node sums (`node_sum`: phase-domain terms added into strided views,
    one dense copy of the node's grad for all its terms) and drop-path on phase-domain terms against
    each edge's own forward, plain kernels and `acc + h`: same logits, same grads for the input and
    every weight, same BN running statistics, in training mode with and without drop-path, on even
    maps (phase domain) and odd ones (fallback)."""
    import copy

    from dnad.reference import TextbookDerivedCell

    torch.manual_seed(0)
    net = SuperNet(C=4, num_cells=3, num_classes=5, in_channels=3, image_size=size)
    genotype = net.export()  # every pair alive: nodes sum several ops, dilated convs among them
    assert any("dil_conv" in op for cell in genotype.cells for node in cell for _, op in node)
    model = build_model(genotype, C=4, num_classes=5, in_channels=3, image_size=size).double()
    model.train()
    model.set_drop_path(drop)
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    if layout == "channels_last":
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )

    def run(m):
        torch.manual_seed(1)  # the same drop-path draws on both sides
        xi = x.clone().requires_grad_()
        logits = m(xi)
        (logits * torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)).sum().backward()
        return logits.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}, dict(m.named_buffers())

    assert_same_as_textbook(model, run, layout, TextbookDerivedCell)
    if drop:  # drop-path did drop something: the comparison above was of non-trivial masks
        undropped = copy.deepcopy(model)
        undropped.set_drop_path(0.0)
        assert not torch.allclose(run(copy.deepcopy(model))[0], run(undropped)[0])


def test_node_sum_grad_is_dense_for_a_channel_slice():
    """A node's grad arrives as a channel slice of the cell output's grad: every term gets it dense."""
    from dnad.supernet import node_sum

    cl = torch.channels_last
    a = torch.randn(2, 3, 4, 4).contiguous(memory_format=cl).requires_grad_()
    b = torch.randn(2, 3, 4, 4).contiguous(memory_format=cl).requires_grad_()
    seen = []
    for t in (a, b):
        t.register_hook(lambda g: seen.append(g.is_contiguous(memory_format=cl)))
    s = node_sum([a, b])
    out = torch.cat([s, torch.zeros_like(s)], dim=1)
    out.backward(torch.randn_like(out).contiguous(memory_format=cl))
    assert seen == [True, True]
    assert torch.equal(s, a + b)
