"""Ctrl-C in the driver (pipeline.raytools.ctrl_c_stops): Ray's blocking waits poll for signals from
C++ and may drop the KeyboardInterrupt they turn into a status, so a run went on after Ctrl-C. Here a
loop that drops the first interrupt raised inside its wait stands in for Ray's; no Ray is started."""

import os
import signal
import threading
import time

import pytest

from pipeline.raytools import any_frame, ctrl_c_stops, in_ray

INTERVAL = 0.1


def ray_like_loop(seconds: float, dropped: list[int]) -> None:
    """Waits in short slices; the first KeyboardInterrupt raised inside a wait is dropped (as Ray's
    check_signals -> Status::Interrupted -> a wait that returns anyway), later ones propagate."""
    end = time.monotonic() + seconds
    while True:
        try:
            if time.monotonic() >= end:
                return
            time.sleep(0.02)
        except KeyboardInterrupt:
            if dropped:
                raise
            dropped.append(1)


def inside_loop(frame) -> bool:
    return any_frame(frame, lambda f: f.f_code is ray_like_loop.__code__)


def ctrl_c_in(seconds: float) -> threading.Timer:
    t = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    t.start()
    return t


def test_without_the_guard_the_loop_drops_ctrl_c():
    dropped: list[int] = []
    ctrl_c_in(0.2)
    t0 = time.monotonic()
    try:
        ray_like_loop(1.0, dropped)  # runs to its end: the one Ctrl-C is lost
    except KeyboardInterrupt:  # (outside a wait: a failure here, not the end of the whole session)
        pytest.fail("the interrupt was not raised inside the loop's wait")
    assert dropped == [1] and time.monotonic() - t0 >= 1.0


def test_the_guard_raises_it_again_until_it_is_out_of_the_loop():
    before = signal.getsignal(signal.SIGINT)
    dropped: list[int] = []
    t0 = time.monotonic()
    ctrl_c_in(0.2)
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_stops(INTERVAL, inside_loop):
            ray_like_loop(30.0, dropped)
    took = time.monotonic() - t0
    assert dropped == [1] and took < 0.2 + 5 * INTERVAL + 1.0, took
    assert signal.getsignal(signal.SIGINT) is before  # restored
    time.sleep(4 * INTERVAL)  # and nothing more is raised afterwards (this would raise KeyboardInterrupt)


def test_outside_the_loop_ctrl_c_is_raised_once():
    raised = 0
    with ctrl_c_stops(INTERVAL, inside_loop):
        ctrl_c_in(0.05)
        try:
            time.sleep(2.0)
        except KeyboardInterrupt:
            raised += 1
        time.sleep(5 * INTERVAL)  # our own code (cleanup, messages): the watcher leaves it alone
    assert raised == 1


def test_off_the_main_thread_it_is_a_no_op():
    before = signal.getsignal(signal.SIGINT)
    seen: list[object] = []

    def body():
        with ctrl_c_stops(INTERVAL, inside_loop):
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [before]


def test_in_ray_tells_ray_frames_from_ours():
    import sys

    import ray

    assert not in_ray(sys._getframe())
    frames: list[bool] = []
    code = compile("probe()", os.path.join(os.path.dirname(ray.__file__), "fake_module.py"), "exec")
    exec(code, {"probe": lambda: frames.append(in_ray(sys._getframe()))})
    assert frames == [True]
