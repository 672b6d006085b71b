"""Gradients of the S = 1 integrals through every branch (issue 10: a torch.where over a log(0) branch gave
NaN gradients). References: torch.autograd.gradcheck (central finite differences) and the closed-form
derivatives evaluated with mpmath:

    ∂ log P/∂β = ρ_β,  ∂ log P/∂α = −ρ_α,                    ρ_x = φ(x)/P,
    ∂ E[u]/∂β = ρ_β (β − m),  ∂ E[u]/∂α = ρ_α (m − α),
    ∂ Var/∂β = ρ_β ((β − m)² − v),  ∂ Var/∂α = ρ_α (v − (α − m)²).
"""
import math

import mpmath as mp
import pytest
import torch

from pyro_cpa.integrate.univariate import interval_stats, log_ndtr_diff, std_moments_1d

INF = float("inf")
GRAD_RTOL = 1e-7
"""Relative accuracy of autograd against the mpmath derivatives (incl. the far tails)."""

# (name, α, β): one case per branch of log_ndtr_diff / interval_stats
BRANCHES = [
    ("narrow_centre", -1e-7, 2e-7),
    ("narrow_far_left", -40.0, -40.0 + 1e-9),
    ("narrow_far_right", 30.0, 30.0 + 1e-10),
    ("far_left_tail", -45.0, -38.0),
    ("far_right_tail", 38.0, 39.5),
    ("very_far_right", 1e3, 1e3 + 0.01),
    ("one_sided_right", 3.0, INF),
    ("one_sided_left", -INF, -7.0),
    ("one_sided_far", 200.0, INF),
    ("straddling", -0.7, 1.3),
    ("straddling_wide", -3.0, 8.0),
    ("moderate", 0.4, 2.6),
    ("cf_band_edge", 1.5, 3.0),
    ("narrow_reflected", -1.3, -0.9),     # α + β < 0: the quadrature takes the signed a + b (no reflection)
    ("symmetric_narrow", -0.4, 0.4),      # α + β = 0 exactly
    ("symmetric_wide", -3.0, 3.0),        # the signed mixture at the tie of its reflection (α + β = 0)
    ("straddling_wide_reflected", -8.0, 3.0),
]


def _mp_derivatives(a, b):
    with mp.workdps(120):
        a, b = mp.mpf(a), mp.mpf(b)
        pdf = (lambda x: mp.npdf(x) if mp.isfinite(x) else mp.mpf(0))
        xpdf = (lambda x: x * mp.npdf(x) if mp.isfinite(x) else mp.mpf(0))
        if a + b > 0:
            P = (mp.ncdf(-a) if mp.isfinite(a) else 1) - (mp.ncdf(-b) if mp.isfinite(b) else 0)
        else:
            P = (mp.ncdf(b) if mp.isfinite(b) else 1) - (mp.ncdf(a) if mp.isfinite(a) else 0)
        m = (pdf(a) - pdf(b)) / P
        v = 1 + (xpdf(a) - xpdf(b)) / P - m * m
        ra, rb = pdf(a) / P, pdf(b) / P
        fin = (lambda x, val: val if mp.isfinite(x) else mp.mpf(0))
        d_lp = (-ra, rb)
        d_m = (fin(a, ra * (m - a)), fin(b, rb * (b - m)))
        d_v = (fin(a, ra * (v - (a - m) ** 2)), fin(b, rb * ((b - m) ** 2 - v)))
        return [[float(x) for x in pair] for pair in (d_lp, d_m, d_v)]


@pytest.mark.parametrize("name,a,b", BRANCHES, ids=[c[0] for c in BRANCHES])
def test_gradients_match_closed_form_derivatives(name, a, b):
    A = torch.tensor(a, requires_grad=True)
    B = torch.tensor(b, requires_grad=True)
    lp, m, v = interval_stats(A, B)
    ref = _mp_derivatives(a, b)
    for out, (da_r, db_r) in zip((lp, m, v), ref):
        da, db = torch.autograd.grad(out, (A, B), retain_graph=True)
        for got, want in ((da.item(), da_r), (db.item(), db_r)):
            assert math.isfinite(got)
            assert got == pytest.approx(want, rel=GRAD_RTOL, abs=1e-300), (name, got, want)


# finite differences resolve the derivative only where |log P| * eps / h is small: finite, not subnormal-narrow,
# |log P| < ~1e3 (the far cases are covered by the closed-form derivatives above)
FD_CASES = [c for c in BRANCHES if math.isfinite(c[1]) and math.isfinite(c[2]) and c[2] - c[1] > 1e-6
            and abs(c[1]) < 100]


@pytest.mark.parametrize("name,a,b", FD_CASES, ids=[c[0] for c in FD_CASES])
def test_gradcheck_finite_differences(name, a, b):
    A = torch.tensor([a], requires_grad=True)
    B = torch.tensor([b], requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: interval_stats(x, y), (A, B), eps=1e-7, atol=1e-6, rtol=1e-5)


def test_gradcheck_std_moments_1d_mixed_branches():
    """Rows u <= β, −u <= −α with padding; a batch covering narrow, tails, one-sided and straddling."""
    lo = torch.tensor([-0.7, 38.0, -45.0, 3.0, -0.2])
    hi = torch.tensor([1.3, 39.5, -38.0, 3.3, 0.3])

    def f(lo, hi):
        G = torch.tensor([[1.0], [-1.0], [0.0]]).expand(5, 3, 1)
        d = torch.stack([hi, -lo, torch.full_like(lo, INF)], -1)
        r = std_moments_1d(G, d)
        return r.log_mass, r.mean, r.covariance

    assert torch.autograd.gradcheck(f, (lo.clone().requires_grad_(), hi.clone().requires_grad_()),
                                    eps=1e-7, atol=1e-6, rtol=1e-5)


EDGE = [(1.0, 1.0), (2.0, 1.0), (-INF, INF), (-INF, -INF), (INF, INF), (0.0, 5e-324), (-5e-324, 5e-324),
        (-40.0, -40.0 + 1e-14), (30.0, 30.0 + 1e-14), (-1000.0, -1000.0 + 1e-12), (-1e-20, 1e-20), (-INF, -40.0),
        (40.0, INF), (1e4, INF), (-1e4, 1e4), (5.0, 5.0 + 5e-15)]


@pytest.mark.parametrize("a,b", EDGE)
def test_no_nan_gradients_at_edge_cases(a, b):
    """Empty, equal, infinite, subnormal-width and far-tail intervals: NaN-free values and gradients."""
    A = torch.tensor(a, requires_grad=True)
    B = torch.tensor(b, requires_grad=True)
    lp = log_ndtr_diff(A, B)
    _, m, v = interval_stats(A, B)
    total = torch.where(torch.isfinite(lp), lp, torch.zeros_like(lp)) + m + v
    ga, gb = torch.autograd.grad(total, (A, B), retain_graph=True)
    assert not torch.isnan(lp) and not torch.isnan(m) and not torch.isnan(v)
    assert not torch.isnan(ga) and not torch.isnan(gb)
    # the moment gradients alone are finite (the log-mass gradient of a subnormal width is ±inf = ±1/width)
    ga, gb = torch.autograd.grad(m + v, (A, B))
    assert torch.isfinite(ga) and torch.isfinite(gb)
