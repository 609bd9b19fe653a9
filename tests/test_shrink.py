import pytest

from dnad.config import ShrinkConfig
from dnad.shrink import ShrinkController

CFG = ShrinkConfig(
    gamma0=1.0, gamma_max=4.0, phi=2.0, k=0.5, n_max=0.3, tau=0.5, t_max=2, mu0=0.1, rho=1.5, xi=0.5
)


def test_scripted_sequence_matches_hand_computation():
    c = ShrinkController(CFG)
    deleted = [1, 0, 0, 0, 0, 0, 0, 3]
    # hand-computed (γ, μ, rate, stable, emitted) after each step
    expected = [
        (0.5, 0.1, 0.5, 0, False),  # deleting: γ·k
        (1.0, 0.1, 0.25, 0, False),  # stalled, γ < γ_max
        (2.0, 0.1, 0.125, 0, False),
        (4.0, 0.1, 0.0625, 1, False),  # γ ≥ γ_max: count stability
        (8.0, 0.15, 0.03125, 0, True),  # t = t_max: emit, μ·ρ, n_max·ξ, t = 0
        (16.0, 0.15, 0.015625, 1, False),
        (32.0, 0.225, 0.0078125, 0, True),
        (16.0, 0.225, 1.50390625, 0, False),  # deleting again
    ]
    for p, (g, mu, r, t, em) in zip(deleted, expected):
        assert c.step(p) is em
        assert c.gamma == pytest.approx(g)
        assert c.mu == pytest.approx(mu)
        assert c.state.rate == pytest.approx(r)
        assert c.state.stable == t
    assert c.state.emissions == [5, 7]
    assert c.state.n_max == pytest.approx(0.3 * 0.5 * 0.5)


def test_gamma_is_not_capped_and_state_roundtrip():
    c = ShrinkController(CFG)
    for _ in range(20):
        c.step(0)
    assert c.gamma == pytest.approx(2.0**20)
    d = c.state_dict()
    c2 = ShrinkController(CFG)
    c2.load_state_dict(d)
    assert c2.state_dict() == d
    assert c.step(0) == c2.step(0) and c.state_dict() == c2.state_dict()


def test_stop_rule():
    c = ShrinkController(ShrinkConfig(s_min=250))
    assert c.should_stop(249.9) and not c.should_stop(250.0)


def test_cifar_defaults():
    s = ShrinkConfig()
    assert (s.gamma0, s.gamma_max, s.phi, s.k, s.n_max, s.tau, s.t_max, s.mu0, s.rho, s.xi, s.s_min) == (
        1e-4,
        0.10,
        1.01,
        0.99,
        0.005,
        0.90,
        50,
        0.1,
        1.5,
        1.0,
        250,
    )
