"""Owen's T in torch against scipy.special.owens_t and mpmath; analytic gradients."""
import mpmath as mp
import numpy as np
import pytest
import scipy.special as sp
import torch

from pyro_cpa.integrate.owens_t import owens_t

INF = float("inf")


def test_owens_t_matches_scipy_on_random_grid():
    rng = np.random.default_rng(0)
    h = np.concatenate([rng.uniform(-12, 12, 4000), rng.uniform(-1, 1, 1000)])
    a = np.tan(rng.uniform(-np.pi / 2, np.pi / 2, 5000))
    v = owens_t(torch.tensor(h), torch.tensor(a)).numpy()
    assert np.max(np.abs(v - sp.owens_t(h, a))) <= 3e-16


def test_owens_t_vs_mpmath_relative():
    mp.mp.dps = 30

    def ref(h, a):
        return float(mp.quad(lambda x: mp.exp(-h * h * (1 + x * x) / 2) / (1 + x * x), [0, a]) / (2 * mp.pi))

    for h, a in [(0.3, 0.2), (2.0, 0.9), (5.0, 0.5), (8.0, 1.0), (1.0, 3.0), (3.0, 10.0), (0.0, 0.7)]:
        assert owens_t(torch.tensor(h), torch.tensor(a)).item() == pytest.approx(ref(h, a), rel=1e-13, abs=1e-300)


def test_special_values_and_symmetries():
    h = torch.tensor([0.0, 0.0, 1.3, -1.3, 2.0, 0.0, 40.0])
    a = torch.tensor([INF, -INF, INF, -INF, 0.0, 1.0, 0.5])
    v = owens_t(h, a)
    q = 0.5 * torch.special.erfc(torch.tensor(1.3) / 2 ** 0.5)
    expect = torch.tensor([0.25, -0.25, q / 2, -q / 2, 0.0, 0.125, 0.0])
    torch.testing.assert_close(v, expect, rtol=1e-15, atol=1e-17)
    x = torch.randn(50) * 3
    y = torch.randn(50) * 2
    torch.testing.assert_close(owens_t(-x, y), owens_t(x, y), rtol=0, atol=0)
    torch.testing.assert_close(owens_t(x, -y), -owens_t(x, y), rtol=0, atol=0)


def test_broadcast_shapes():
    assert owens_t(torch.randn(3, 1), torch.randn(1, 4)).shape == (3, 4)


def test_gradcheck_and_gradgradcheck():
    h = torch.tensor([0.3, -1.2, 2.5, 0.7, 4.0], requires_grad=True)
    a = torch.tensor([0.5, -2.0, 0.9, 7.0, -0.3], requires_grad=True)
    assert torch.autograd.gradcheck(owens_t, (h, a))
    assert torch.autograd.gradgradcheck(owens_t, (h, a))


def test_gradient_at_infinite_a_is_finite():
    h = torch.tensor([0.0, 1.0, -2.0], requires_grad=True)
    a = torch.tensor([INF, -INF, INF], requires_grad=True)
    owens_t(h, a).sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(a.grad).all()
    # d/dh Q(|h|)/2 = -φ(h)/2 sign(h)
    assert h.grad[1].item() == pytest.approx(-(-0.5 * np.exp(-0.5) / np.sqrt(2 * np.pi)), rel=1e-14)
