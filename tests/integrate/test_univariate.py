"""Tests of the S = 1 closed forms against mpmath (incl. far tails), tilings and autograd."""
import math

import mpmath as mp
import pytest
import torch

from pyro_cpa.integrate.univariate import interval_moments, log1mexp, log_ndtr_diff, ndtr, std_moments_1d

INF = float("inf")


@pytest.fixture(autouse=True)
def _mp_precision():
    with mp.workdps(50):
        yield


def _ref_interval(a, b):
    """(log P, E[u|.], E[u²|.]) with mpmath at 50 digits."""
    a, b = mp.mpf(a), mp.mpf(b)
    if a + b > 0:  # reflect so that the subtraction happens in the small tail
        P = mp.ncdf(-a) - mp.ncdf(-b)
    else:
        P = mp.ncdf(b) - mp.ncdf(a)
    pa = mp.npdf(a) if mp.isfinite(a) else mp.mpf(0)
    pb = mp.npdf(b) if mp.isfinite(b) else mp.mpf(0)
    apa = a * pa if mp.isfinite(a) else mp.mpf(0)
    bpb = b * pb if mp.isfinite(b) else mp.mpf(0)
    return float(mp.log(P)), float((pa - pb) / P), float(1 + (apa - bpb) / P)


CASES = [(30, 31), (-40, -39), (-1e-10, 1e-10), (-3, 2), (5, INF), (-INF, -38), (-INF, INF), (-8, 8),
         (0, 1e-12), (37, 37 + 1e-9), (-0.5, 0.7), (1, 2), (-2, -1), (0.1, 0.3), (-1, 1e-8), (2, 4),
         (-INF, 0.3), (-INF, 6), (-6, INF), (12, 12.5), (-25, -3), (-1e-3, INF), (0, 0.5), (-0.5, 0)]


@pytest.mark.parametrize("a,b", CASES)
def test_log_ndtr_diff_and_moments_vs_mpmath(a, b):
    lp_ref, m_ref, m2_ref = _ref_interval(a, b)
    lp, m, m2 = interval_moments(torch.tensor(a), torch.tensor(b))
    assert lp.item() == pytest.approx(lp_ref, rel=1e-14, abs=1e-15)
    assert m.item() == pytest.approx(m_ref, rel=1e-9, abs=1e-12)
    assert m2.item() == pytest.approx(m2_ref, rel=1e-9, abs=1e-12)


def test_log_ndtr_diff_random_vs_mpmath():
    a = torch.randn(300) * 10
    b = a + torch.rand(300) * torch.tensor([1e-6, 1e-2, 1.0, 10.0]).repeat(75)
    lp = log_ndtr_diff(a, b)
    for ai, bi, li in zip(a.tolist(), b.tolist(), lp.tolist()):
        assert li == pytest.approx(_ref_interval(ai, bi)[0], rel=1e-13, abs=1e-14)


def test_empty_and_helpers():
    assert log_ndtr_diff(torch.tensor(1.0), torch.tensor(1.0)).item() == -INF
    assert log_ndtr_diff(torch.tensor(2.0), torch.tensor(1.0)).item() == -INF
    x = torch.tensor([-1e-20, -0.1, -1.0, -50.0])
    ref = [float(mp.log(1 - mp.exp(mp.mpf(v)))) for v in x.tolist()]
    torch.testing.assert_close(log1mexp(x), torch.tensor(ref), rtol=1e-15, atol=0)
    torch.testing.assert_close(ndtr(torch.tensor(-8.0)), torch.tensor(float(mp.ncdf(-8))), rtol=1e-14, atol=0)


def test_std_moments_1d_constraints_padding_batch():
    # rows: u <= 1.5, -u <= 0.5 (u >= -0.5), padding, u <= 3 (redundant)
    G = torch.tensor([[1.0], [-1.0], [0.0], [1.0]])
    d = torch.tensor([1.5, 0.5, INF, 3.0])
    G = G.expand(2, 3, 4, 1)
    d = d.expand(2, 3, 4).clone()
    d[1, 2, 0] = -0.7  # becomes empty: u <= -0.7 and u >= -0.5
    d[0, 1, 1] = INF   # lower bound removed
    res = std_moments_1d(G, d)
    assert res.log_mass.shape == (2, 3) and res.mean.shape == (2, 3, 1) and res.second_moment.shape == (2, 3, 1, 1)
    lp, m, m2 = _ref_interval(-0.5, 1.5)
    assert res.log_mass[0, 0].item() == pytest.approx(lp, rel=1e-14)
    assert res.mean[0, 0, 0].item() == pytest.approx(m, rel=1e-13)
    assert res.second_moment[0, 0, 0, 0].item() == pytest.approx(m2, rel=1e-13)
    lp, m, m2 = _ref_interval(-INF, 1.5)
    assert res.log_mass[0, 1].item() == pytest.approx(lp, rel=1e-14)
    assert res.mean[0, 1, 0].item() == pytest.approx(m, rel=1e-13)
    assert res.log_mass[1, 2].item() == -INF
    assert res.mean[1, 2].abs().max() == 0 and res.second_moment[1, 2].abs().max() == 0
    assert torch.isfinite(res.mean).all() and torch.isfinite(res.second_moment).all()
    assert (res.log_mass_stderr == 0).all()
    # zero row with d < 0: empty
    assert std_moments_1d(torch.tensor([[0.0]]), torch.tensor([-1.0])).log_mass.item() == -INF
    # no constraints at all: the whole line
    full = std_moments_1d(torch.tensor([[0.0]]), torch.tensor([INF]))
    assert full.log_mass.item() == 0 and full.mean.item() == 0 and full.second_moment.item() == 1


def test_tiling_sums_to_one_and_moments_add_up():
    cuts = torch.sort(torch.randn(20) * 3).values
    lo = torch.cat([torch.tensor([-INF]), cuts])
    hi = torch.cat([cuts, torch.tensor([INF])])
    G = torch.tensor([[1.0], [-1.0]]).expand(21, 2, 1)
    d = torch.stack([hi, -lo], dim=-1)
    res = std_moments_1d(G, d)
    P = res.log_mass.exp()
    assert P.sum().item() == pytest.approx(1.0, abs=1e-14)
    assert (P * res.mean[:, 0]).sum().item() == pytest.approx(0.0, abs=1e-14)
    assert (P * res.second_moment[:, 0, 0]).sum().item() == pytest.approx(1.0, abs=1e-13)


def test_far_tail_log_mass():
    # u >= 35 : log Q(35) from mpmath
    res = std_moments_1d(torch.tensor([[-1.0]]), torch.tensor([-35.0]))
    assert res.log_mass.item() == pytest.approx(float(mp.log(mp.ncdf(-35))), rel=1e-15)
    assert res.mean.item() == pytest.approx(float(mp.npdf(35) / mp.ncdf(-35)), rel=1e-14)


def test_gradcheck_wrt_d_and_G():
    d0 = torch.tensor([[1.5, 0.5, 3.0], [-2.0, 6.0, 9.0], [40.0, -39.0, 50.0]])
    g0 = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [-1.0, 1.0, -1.0]])

    def f(d, g):
        G = torch.cat([g, torch.zeros(3, 1)], dim=-1).unsqueeze(-1)  # a padding row
        dd = torch.cat([d, torch.full((3, 1), INF)], dim=-1)
        r = std_moments_1d(G, dd)
        return r.log_mass, r.mean, r.second_moment

    assert torch.autograd.gradcheck(f, (d0.clone().requires_grad_(), g0.clone().requires_grad_()))


def test_padding_and_infinite_bounds_give_finite_gradients():
    d = torch.tensor([1.0, INF, INF], requires_grad=True)
    G = torch.tensor([[1.0], [-1.0], [0.0]], requires_grad=True)
    r = std_moments_1d(G, d)
    (r.log_mass + r.mean.sum() + r.second_moment.sum()).backward()
    assert torch.isfinite(d.grad).all() and torch.isfinite(G.grad).all()
    # exact derivative of log P = log Φ(1): φ(1)/Φ(1) (from the log_mass term alone)
    d2 = torch.tensor([1.0, INF], requires_grad=True)
    std_moments_1d(torch.tensor([[1.0], [0.0]]), d2).log_mass.backward()
    assert d2.grad[0].item() == pytest.approx(float(mp.npdf(1) / mp.ncdf(1)), rel=1e-14)
    assert d2.grad[1].item() == 0


def test_device_dtype_float32():
    r = std_moments_1d(torch.tensor([[1.0], [-1.0]], dtype=torch.float32), torch.tensor([1.0, 1.0], dtype=torch.float32))
    assert r.log_mass.dtype == torch.float32
    assert r.log_mass.item() == pytest.approx(math.log(math.erf(1 / math.sqrt(2))), rel=1e-6)


MASS_PATHS_RTOL = 1e-15
"""need_moments=False takes log P from log_ndtr_diff, need_moments=True from interval_stats' signed mixture / narrow
quadrature: two machine-precision formulas (each checked against mpmath in test_univariate_tails.py; measured within
6e-16 of mpmath on these intervals, so up to ~1e-15 apart)."""


def test_need_moments_false_gives_the_same_log_mass():
    G = torch.tensor([[[1.0], [-1.0]], [[1.0], [0.0]], [[1.0], [-1.0]], [[-1.0], [0.0]]])
    d = torch.tensor([[2.0, 0.5], [-30.0, INF], [-3.0, 3.5], [-1e3, INF]])
    full = std_moments_1d(G, d)
    fast = std_moments_1d(G, d, need_moments=False)
    torch.testing.assert_close(full.log_mass, fast.log_mass, rtol=MASS_PATHS_RTOL, atol=0)
    assert fast.mean.shape == (4, 1) and fast.second_moment.shape == (4, 1, 1)
    assert fast.mean.abs().max() == 0 and fast.second_moment.abs().max() == 0
