"""`benchmarks/op_times.py`: the op-by-op timer of the speed benchmarks counts every ATen call of a
step, forward and backward, once, in the row of its kind and shapes, and its table adds up."""

import re
import time

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def op_times(load_benchmark):
    return load_benchmark("op_times")


def step(x, w_dw, w_pw):
    """A depthwise 5×5 conv, a 1×1 conv, BN, ReLU, a loss and its backward."""
    y = F.conv2d(x, w_dw, padding=2, groups=x.shape[1])
    y = F.batch_norm(F.conv2d(y, w_pw), None, None, training=True)
    F.relu(y).sum().backward()


def test_every_conv_call_forward_and_backward_is_counted_once_under_its_shapes(op_times):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6)  # no grad: the first conv's backward computes the weight grad only
    w_dw = torch.randn(8, 1, 5, 5, requires_grad=True)
    w_pw = torch.randn(3, 8, 1, 1, requires_grad=True)
    steps = 3
    with op_times.OpTimer() as timer:
        t0 = time.perf_counter()
        for _ in range(steps):
            step(x, w_dw, w_pw)
        wall = time.perf_counter() - t0
    calls = dict(timer.calls)
    assert calls["aten.convolution dw 5×5 (4, 8, 6, 6)→8"] == steps
    assert calls["aten.convolution 1×1 (4, 8, 6, 6)→3"] == steps
    assert calls["aten.convolution_backward dw 5×5 (4, 8, 6, 6)→8 grad weight"] == steps
    assert calls["aten.convolution_backward 1×1 (4, 8, 6, 6)→3 grad input+weight"] == steps
    assert calls["aten.native_batch_norm"] == calls["aten.native_batch_norm_backward"] == steps
    assert sum(v for k, v in calls.items() if k.startswith("aten.convolution")) == 4 * steps
    assert 0 < timer.total() <= wall
    # the grads are those of the same step run without the timer
    g = w_dw.grad / steps
    w_dw.grad = None
    w_pw.grad = None
    step(x, w_dw, w_pw)
    torch.testing.assert_close(w_dw.grad, g)


def test_table_lists_the_costliest_rows_first_with_shares_of_the_step(op_times):
    timer = op_times.OpTimer()
    timer.seconds.update({"a": 0.3, "b": 0.1, "c": 0.6})
    timer.calls.update({"a": 4, "b": 2, "c": 2})
    lines = timer.table(steps=2, step_s=1.0, rows=2).splitlines()
    assert lines[0].startswith("inside ATen ops: 500.0 ms per step of a 1000.0 ms step")
    rows = [re.split(r"\s+", ln.strip()) for ln in lines[2:]]
    assert [r[-1] for r in rows] == ["c", "a"]  # costliest first, cut at `rows`
    assert [r[0] for r in rows] == ["30.0%", "15.0%"]  # of the 1 s step, per step
    assert [r[2] for r in rows] == ["1", "2"]  # calls per step
    assert [r[3] for r in rows] == ["300000", "75000"]  # µs per call
    # without a step time the shares are of the time inside ops
    assert timer.table(steps=1).splitlines()[2].startswith(" 60.0%")
