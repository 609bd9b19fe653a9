"""dnad's native CPU kernels (`dnad.native`, used through `dnad.fastops`): the same numbers as
PyTorch's kernels (float64 to ~1e-12, float32 to rounding), grads included, every geometry the
search spaces use and the odd ones around them; the fallbacks when they are off or cannot build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_fastops import _ConvLog
from torch import nn

from dnad import native
from dnad.fastops import (
    NATIVE_FORWARD_MACS,
    BatchNorm2d,
    DepthwiseConv2d,
    aten_kernels,
    batch_norm_train,
    native_depthwise,
    native_depthwise_forward,
    native_for,
    reference_kernels,
)
from dnad.genotype import Genotype
from dnad.network import build_model

CL = torch.channels_last
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    native.library() is None, reason=f"native kernels not built: {native.reason()}"
)


def _cl(*shape: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).contiguous(memory_format=CL)


def _by_dnad(t: torch.Tensor) -> bool:
    """Whether `t` came out of one of dnad's native autograd functions."""
    return type(t.grad_fn).__name__ in ("_NativeBatchNormBackward", "_NativeDepthwiseBackward")


# channels that fill whole vectors (8, 16), leave a tail (5, 12, 13) or are below one vector (3);
# maps of odd and even sides, smaller than the kernel's reach, one image
DW_CASES = [
    (n, c, h, w, k, s, d)
    for (n, c, h, w) in [
        (2, 8, 7, 7),
        (1, 16, 8, 6),
        (3, 5, 9, 4),
        (2, 12, 3, 5),
        (2, 13, 14, 14),
        (1, 3, 2, 2),
    ]
    for (k, s, d) in [
        (3, 1, 1),
        (5, 1, 1),
        (3, 2, 1),
        (5, 2, 1),
        (3, 1, 2),
        (5, 1, 2),
        (3, 2, 2),
        (5, 2, 2),
        (7, 1, 1),
    ]
]


@pytest.mark.parametrize("n,c,h,w,k,s,d", DW_CASES)
def test_depthwise_matches_conv2d_in_float64(n, c, h, w, k, s, d):
    x = _cl(n, c, h, w).requires_grad_()
    weight = torch.randn(c, 1, k, k, dtype=torch.float64, requires_grad=True)
    p = d * (k - 1) // 2
    ref = F.conv2d(x, weight, None, s, p, d, c)
    got = native_depthwise(x, weight, s, d, p)
    assert got.shape == ref.shape and got.is_contiguous(memory_format=CL) and _by_dnad(got)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(ref, (x, weight), g)
    gx2, gw2 = torch.autograd.grad(got, (x, weight), g)
    torch.testing.assert_close(gx2, gx, rtol=0, atol=1e-12)
    torch.testing.assert_close(gw2, gw, rtol=0, atol=1e-11)
    assert gx2.is_contiguous(memory_format=CL)


def test_depthwise_gradcheck():
    x = _cl(2, 9, 6, 5).requires_grad_()
    for k, s, d in [(3, 1, 1), (5, 2, 2), (3, 1, 2)]:
        weight = torch.randn(9, 1, k, k, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda a, b, s=s, d=d, k=k: native_depthwise(a, b, s, d, d * (k - 1) // 2), (x, weight)
        )


def test_depthwise_only_requested_grads():
    x = _cl(2, 8, 6, 6).requires_grad_()
    weight = torch.randn(8, 1, 3, 3, dtype=torch.float64)  # frozen weight: only the input grad
    (gx,) = torch.autograd.grad(native_depthwise(x, weight, 1, 1, 1).sum(), (x,))
    (ref,) = torch.autograd.grad(F.conv2d(x, weight, None, 1, 1, 1, 8).sum(), (x,))
    torch.testing.assert_close(gx, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k,s,d", [(3, 1, 1), (5, 1, 2), (5, 2, 2)])
def test_depthwise_float32_and_threads(k, s, d):
    """float32 within rounding of PyTorch's; two threads give what one gives (float64 to 1e-12, and
    float32 runs repeat bit for bit)."""
    x64 = _cl(8, 16, 14, 14)
    w64 = torch.randn(16, 1, k, k, dtype=torch.float64)
    p = d * (k - 1) // 2
    ref = F.conv2d(x64, w64, None, s, p, d, 16)
    x32, w32 = x64.float().requires_grad_(), w64.float().requires_grad_()
    y = native_depthwise(x32, w32, s, d, p)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    runs = {}
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            runs[t] = torch.autograd.grad(native_depthwise(x32, w32, s, d, p), (x32, w32), g)
            again = torch.autograd.grad(native_depthwise(x32, w32, s, d, p), (x32, w32), g)
            assert all(torch.equal(a, b) for a, b in zip(runs[t], again))
            runs[t] = [r.double() for r in runs[t]]
    finally:
        torch.set_num_threads(threads)
    x64.requires_grad_()
    w64.requires_grad_()
    ref_grads = torch.autograd.grad(F.conv2d(x64, w64, None, s, p, d, 16), (x64, w64), g.double())
    for t in (1, 2):
        torch.testing.assert_close(runs[t][0], ref_grads[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(runs[t][1], ref_grads[1], rtol=1e-4, atol=1e-3)


def test_depthwise_module_dispatch():
    """`DepthwiseConv2d` runs the native kernel on channels_last CPU float maps only, and PyTorch's under
    `aten_kernels()`, `reference_kernels()` and for NCHW maps; forcing impl='native' on NCHW relayouts."""
    m = DepthwiseConv2d(8, 5, stride=1, dilation=2).double()
    x = _cl(2, 8, 10, 10)
    assert m.choose_impl(x) == "native"
    assert m.choose_impl(x.contiguous()) == "poly_cl"  # NCHW: the measured table
    with aten_kernels():
        assert m.choose_impl(x) == "poly_cl"
    with reference_kernels():
        assert m.active_impl(x) == "plain"
    forced = DepthwiseConv2d(8, 5, stride=1, dilation=2, impl="native").double()
    forced.load_state_dict(m.state_dict())
    y = forced(x.contiguous())
    assert y.is_contiguous()  # back in the caller's layout
    torch.testing.assert_close(y, F.conv2d(x, m.weight, None, 1, 4, 2, 8), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="float32/float64 CPU"):
        forced(x.half())


@pytest.mark.parametrize("n,c,h,w,k,s,d", DW_CASES)
def test_inference_forward_matches_conv2d_in_float64(n, c, h, w, k, s, d):
    x = _cl(n, c, h, w)
    weight = torch.randn(c, 1, k, k, dtype=torch.float64)
    p = d * (k - 1) // 2
    ref = F.conv2d(x, weight, None, s, p, d, c)
    got = native_depthwise_forward(x, weight, s, d, p)
    assert got.shape == ref.shape and got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # float32, a weight of another dtype and layout, two threads
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got32 = native_depthwise_forward(x.float(), weight.float().contiguous(memory_format=CL), s, d, p)
    finally:
        torch.set_num_threads(threads)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=1e-5, atol=1e-5)


def _aten_convs(m: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """How many ATen convolutions `m(x)` runs, and its output."""
    with _ConvLog() as log:
        y = m(x)
    return len(log.convs), y


def test_small_inference_forward_runs_dnads_kernel_in_the_callers_layout():
    """No autograd graph and at most NATIVE_FORWARD_MACS: dnad's direct forward, whatever the input's
    layout, output in that layout; with a graph, above the limit, under `aten_kernels()`,
    `reference_kernels()`, a forced variant or tracing: PyTorch's convolution, the same numbers."""
    m = DepthwiseConv2d(8, 5, stride=1, dilation=2).double()
    ref = nn.Conv2d(8, 8, 5, 1, 4, 2, 8, bias=False).double()
    ref.load_state_dict(m.state_dict())
    for x in (_cl(1, 8, 10, 10), _cl(2, 8, 9, 7).contiguous()):
        want = ref(x)
        with torch.no_grad():  # (a dispatch mode sees nothing under inference_mode)
            assert m.choose_impl(x) == "native"
            convs, y = _aten_convs(m, x)
        assert convs == 0 and y.is_contiguous(memory_format=CL) == x.is_contiguous(memory_format=CL)
        torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
        with torch.inference_mode():
            assert m.choose_impl(x) == "native"
            torch.testing.assert_close(m(x), want, rtol=0, atol=1e-12)
        convs, y = _aten_convs(m, x)  # the weight requires grad: the training path
        assert convs == 1 and y.requires_grad
        torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    x = _cl(1, 8, 10, 10)
    big = _cl(NATIVE_FORWARD_MACS // (8 * 10 * 10 * 25) + 1, 8, 10, 10)
    forced = DepthwiseConv2d(8, 5, stride=1, dilation=2, impl="poly_cl").double()
    forced.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert _aten_convs(m, big)[0] == 1
        torch.testing.assert_close(_aten_convs(m, big)[1], ref(big), rtol=0, atol=1e-12)
        assert _aten_convs(m, big[:1])[0] == 0
        assert m(big[:0]).shape == (0, 8, 10, 10)  # an empty batch
        assert DepthwiseConv2d(8, 3).to("meta")(x).shape == x.shape  # a weight off the CPU: PyTorch's path
        with aten_kernels():
            assert _aten_convs(m, x)[0] == 1
        with reference_kernels():
            assert _aten_convs(m, x)[0] == 1
        assert _aten_convs(forced, x)[0] == 1
        plain3x3 = DepthwiseConv2d(8, 3).double()
        assert _aten_convs(plain3x3, x)[0] == 0
        traced = torch.jit.trace(plain3x3, x)  # a tracer must see the convolution
        assert "aten::_convolution" in str(traced.graph)


def test_eval_forward_of_a_network_native_equals_aten():
    """A derived network in eval mode at batch 1 and 3 (every depthwise conv on dnad's inference
    kernel) gives PyTorch's logits in float64."""
    geno = Genotype.from_json((REPO / "benchmarks/genotypes/quick_densest.json").read_text())
    torch.manual_seed(0)
    net = build_model(geno, 4, 10, 1, 28).double().eval()
    convs = [mod for mod in net.modules() if isinstance(mod, nn.Conv2d)]
    dense = sum(not isinstance(mod, DepthwiseConv2d) for mod in convs)
    for n in (1, 3):
        x = _cl(n, 1, 28, 28, seed=n)
        with torch.no_grad():
            ran, got = _aten_convs(net, x)
            with aten_kernels():
                ran_aten, want = _aten_convs(net, x)
        assert ran == dense < len(convs) == ran_aten  # the depthwise ones ran on dnad's kernel
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("n,c,h,w", [(4, 8, 7, 7), (3, 13, 5, 4), (2, 3, 1, 2), (16, 24, 6, 6)])
def test_batch_norm_matches_in_float64(n, c, h, w, affine):
    x = (_cl(n, c, h, w) * 3 + 1).requires_grad_()
    weight = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine else None
    bias = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine else None
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    ref = F.batch_norm(x, rm, rv, weight, bias, True, 0.1, 1e-5)
    got = batch_norm_train(x, rm2, rv2, weight, bias, 0.1, 1e-5)
    assert _by_dnad(got)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(rm2, rm, rtol=0, atol=1e-14)
    torch.testing.assert_close(rv2, rv, rtol=0, atol=1e-13)
    g = torch.randn_like(ref)
    inputs = (x, weight, bias) if affine else (x,)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_batch_norm_gradcheck_and_float32():
    x = _cl(3, 5, 4, 3).requires_grad_()
    wb = (
        (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_(),
        torch.randn(5, dtype=torch.float64).requires_grad_(),
    )
    assert torch.autograd.gradcheck(
        lambda a, w, b: batch_norm_train(a, None, None, w, b, 0.1, 1e-5), (x, *wb)
    )
    x64 = _cl(64, 8, 14, 14) * 2 + 3
    ref = F.batch_norm(x64, None, None, None, None, True, 0.1, 1e-5)
    got = batch_norm_train(x64.float(), None, None, None, None, 0.1, 1e-5)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_batch_norm_module_and_fallbacks():
    """The module keeps nn.BatchNorm2d's state dict and counters; eval mode, NCHW maps, one value per
    channel and `aten_kernels()` take PyTorch's path (which raises its own error for one value)."""
    bn, ref = BatchNorm2d(8).double(), nn.BatchNorm2d(8).double()
    assert list(bn.state_dict()) == list(ref.state_dict())
    x = _cl(4, 8, 5, 5)
    for _ in range(2):
        torch.testing.assert_close(bn(x), ref(x), rtol=0, atol=1e-12)
    assert int(bn.num_batches_tracked) == 2
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=0, atol=1e-14)
    assert native_for(x) is not None and native_for(x.contiguous()) is None
    with aten_kernels():
        assert native_for(x) is None
        y = bn(x)
        assert not _by_dnad(y) and type(y.grad_fn).__name__ == "NativeBatchNormBackward0"
        torch.testing.assert_close(y, ref(x), rtol=0, atol=1e-12)
    bn.eval()
    torch.testing.assert_close(bn(x), ref.eval()(x), rtol=0, atol=1e-12)
    bn.train()
    with pytest.raises(ValueError, match="more than 1 value"):
        bn(_cl(1, 8, 1, 1))


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_training_step_native_equals_aten(drop_path):
    """A derived network's training step (the densest `quick` genotype: dilated convs, reductions,
    odd 7×7 maps) on the native kernels equals PyTorch's kernels in float64: logits, every parameter
    grad and the BN running statistics."""
    geno = Genotype.from_json((REPO / "benchmarks/genotypes/quick_densest.json").read_text())
    torch.manual_seed(0)
    a = build_model(geno, 4, 10, 1, 28).double().to(memory_format=CL)
    b = build_model(geno, 4, 10, 1, 28).double().to(memory_format=CL)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m.set_drop_path(drop_path)
    x = _cl(6, 1, 28, 28)
    y = torch.randint(0, 10, (6,))
    torch.manual_seed(1)
    la = F.cross_entropy(a(x), y)
    la.backward()
    torch.manual_seed(1)  # the same drop-path draws
    with aten_kernels():
        lb = F.cross_entropy(b(x), y)
        lb.backward()
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-12)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-9, atol=1e-11, msg=name)
    for (name, ba), bb in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(ba, bb, rtol=0, atol=1e-12, msg=name)


def test_build_failure_falls_back_with_a_reason(tmp_path):
    """With no working compiler the library is None, `reason()` says why, and training still runs on
    PyTorch's kernels."""
    code = (
        "import torch; from dnad import native; from dnad.fastops import BatchNorm2d, describe_cpu_kernels\n"
        "assert native.library() is None, native.library()\n"
        "print(native.reason()); print(describe_cpu_kernels())\n"
        "bn = BatchNorm2d(4); y = bn(torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last))\n"
        "y.sum().backward(); print('trained')\n"
    )
    env = {**os.environ, "CXX": "/bin/false", "PATH": str(tmp_path), "DNAD_NATIVE_CACHE": str(tmp_path / "c")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "could not build kernels.cpp" in lines[0]
    assert lines[1].startswith("PyTorch's (") and lines[-1] == "trained"


def test_build_cache_is_keyed_and_reused(tmp_path):
    """A fresh cache folder builds once (one library per key); a second process loads it from there."""
    code = "from dnad import native; lib = native.library(); print(lib.path, lib.built_s is None)"
    env = {**os.environ, "DNAD_NATIVE_CACHE": str(tmp_path)}
    first = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO, timeout=300
    )
    second = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    path1, cached1 = first.stdout.split()
    path2, cached2 = second.stdout.split()
    assert path1 == path2 and Path(path1).parent.parent == tmp_path
    assert (cached1, cached2) == ("False", "True")
    assert not list(tmp_path.rglob(".build-*"))  # no temporary files left behind


def test_retrain_benchmark_alternates_native_and_aten(load_benchmark, capsys):
    """`benchmarks/retrain_speed.py --kernels auto aten` times both in the same rounds and says which
    kernels each row ran on."""
    bench = load_benchmark("retrain_speed")
    argv = ["--genotype", str(REPO / "benchmarks/genotypes/quick_sparsest.json"), "--C", "4", "--size", "16",
            "--batch", "8", "--steps", "2", "--rounds", "1", "--kernels", "auto", "aten", "--device", "cpu"]  # fmt: skip
    assert bench.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kernels"].split(" (")[0] for r in rows] == ["dnad native", "PyTorch's"]
    assert rows[0]["ratio_vs_aten"] == pytest.approx(rows[0]["img_per_s"] / rows[1]["img_per_s"], rel=0.02)
    assert "ratio_vs_aten" not in rows[1]
