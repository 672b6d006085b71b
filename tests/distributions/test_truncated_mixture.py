import math
import pickle

import pytest
import torch
from scipy import integrate
from pyro.distributions.testing.gof import auto_goodness_of_fit

from pyro_cpa.distributions import TruncatedGaussianMixture

TEST_FAILURE_RATE = 1e-3


def _two_component_1d():
    """Overlapping components: N(0,1) on [-1, 2] and N(1, 0.5²) on [0.5, inf)."""
    logits = torch.tensor([0.3, -0.2])
    loc = torch.tensor([[0.0], [1.0]])
    scale_tril = torch.tensor([[[1.0]], [[0.5]]])
    H = torch.tensor([[[1.0], [-1.0]], [[-1.0], [0.0]]])
    c = torch.tensor([[2.0, 1.0], [-0.5, float("inf")]])
    return TruncatedGaussianMixture(logits, loc, scale_tril, H, c)


def _polygon_2d():
    """Two components in 2-D: a triangle and an unbounded wedge, overlapping."""
    logits = torch.tensor([0.0, 0.5])
    loc = torch.tensor([[0.2, -0.1], [-0.5, 0.5]])
    A = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale_tril = torch.stack([torch.linalg.cholesky(A @ A.T), torch.linalg.cholesky(torch.eye(2) * 0.7)])
    inf = float("inf")
    H = torch.tensor([[[-1.0, 0.0], [0.0, -1.0], [1.0, 1.0]], [[1.0, -1.0], [-1.0, -1.0], [0.0, 0.0]]])
    c = torch.tensor([[0.5, 0.5, 1.0], [0.0, 0.5, inf]])
    return TruncatedGaussianMixture(logits, loc, scale_tril, H, c)


def _quad(f, pieces=((-1.0, 0.5), (0.5, 2.0), (2.0, math.inf))):
    return sum(integrate.quad(f, a, b, epsabs=1e-13, epsrel=1e-12)[0] for a, b in pieces)


def _density(d):
    return lambda z: d.log_prob(torch.tensor([z])).exp().item()


def test_1d_density_normalises_and_moments_match_quadrature():
    d = _two_component_1d()
    p = _density(d)
    assert abs(_quad(p) - 1) < 1e-10
    m = _quad(lambda z: z * p(z))
    v = _quad(lambda z: (z - m) ** 2 * p(z))
    assert abs(d.mean.item() - m) < 1e-10
    assert abs(d.variance.item() - v) < 1e-10
    assert d.log_prob(torch.tensor([-1.5])).item() == -math.inf  # outside the support
    assert not bool(d.support.check(torch.tensor([-1.5])))


def test_1d_cdf_and_entropy_against_quadrature():
    d = _two_component_1d()
    p = _density(d)
    for t in (0.0, 1.3, 3.5):
        ref = _quad(p, [(a, min(b, t)) for a, b in ((-1.0, 0.5), (0.5, 2.0), (2.0, math.inf)) if a < t])
        assert abs(d.cdf(torch.tensor([t])).item() - ref) < 1e-10
    ref = _quad(lambda z: -p(z) * math.log(p(z)) if p(z) > 0 else 0.0)
    est = d.entropy(num_samples=200000)
    assert abs(est - ref) < 5 * d.entropy_stderr + 1e-3


def test_1d_samples_goodness_of_fit():
    d = _two_component_1d()
    s = d.sample((20000,))
    gof = auto_goodness_of_fit(s, d.log_prob(s).exp())
    assert gof > TEST_FAILURE_RATE


def test_2d_density_normalises_and_sample_moments():
    d = _polygon_2d()
    # component masses against plain Monte Carlo from each untruncated Gaussian
    n = 400000
    u = torch.randn(n, 2, 2)
    z = d.loc + (d.scale_tril @ u.unsqueeze(-1)).squeeze(-1)
    inside = (torch.einsum("kfs,nks->nkf", d.H, z) <= d.c).all(-1).double()
    frac, se = inside.mean(0), inside.std(0) / math.sqrt(n)
    assert ((frac - d.component_log_mass.exp()).abs() < 5 * se).all()
    s = d.sample((20000,))
    assert bool(d.support.check(s).all())
    se = d.variance.sqrt() / math.sqrt(20000)
    assert ((s.mean(0) - d.mean).abs() < 5 * se).all()
    torch.testing.assert_close(torch.cov(s.T), d.covariance_matrix, atol=0.05, rtol=0.05)
    gof = auto_goodness_of_fit(s, d.log_prob(s).exp())
    assert gof > TEST_FAILURE_RATE


def test_batch_shapes_expand_pickle_and_infer_shapes():
    d = _two_component_1d()
    e = d.expand((3, 2))
    assert e.batch_shape == (3, 2) and e.event_shape == (1,)
    s = e.sample((5,))
    assert s.shape == (5, 3, 2, 1)
    assert e.log_prob(s).shape == (5, 3, 2)
    assert e.mean.shape == (3, 2, 1)
    batch, event = TruncatedGaussianMixture.infer_shapes(logits=(4, 2), loc=(4, 2, 1), scale_tril=(2, 1, 1),
                                                         H=(2, 2, 1), c=(2, 2))
    assert batch == (4,) and event == (1,)
    d2 = pickle.loads(pickle.dumps(d))
    z = torch.tensor([[0.7]])
    torch.testing.assert_close(d2.log_prob(z), d.log_prob(z))


def test_invalid_arguments():
    d = _two_component_1d()
    with pytest.raises(ValueError):
        TruncatedGaussianMixture(d.logits, d.loc, -d.scale_tril, d.H, d.c, validate_args=True)
    with pytest.raises(ValueError):
        TruncatedGaussianMixture(d.logits[:1], d.loc, d.scale_tril, d.H, d.c)
    with pytest.raises(ValueError):
        TruncatedGaussianMixture(torch.tensor([float("nan"), 0.0]), d.loc, d.scale_tril, d.H, d.c,
                                 validate_args=True)


CDF_MONOTONE_TOL = 4 * torch.finfo(torch.float64).eps
"""Allowed decrease of the cdf between increasing points (round-off where log_ndtr_diff switches branch)."""


def _interval_mixture(lo, hi, loc, scale, logits):
    K = lo.shape[0]
    H = torch.tensor([[1.0], [-1.0]]).expand(K, 2, 1)
    return TruncatedGaussianMixture(logits, loc.view(K, 1), scale.view(K, 1, 1), H, torch.stack([hi, -lo], -1))


def test_cdf_in_unit_interval_and_monotone_with_narrow_components():
    """Issue 10 D6: components of width 1e-10..1 made the cdf exceed 1 (1.0000034 measured before the fix)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        K = 3
        lo = torch.randn(K, generator=g) * 3
        hi = lo + 10 ** (torch.rand(K, generator=g) * 10 - 10)
        d = _interval_mixture(lo, hi, torch.randn(K, generator=g) * 3, torch.rand(K, generator=g) * 2 + 0.1,
                              torch.randn(K, generator=g))
        t = torch.sort(torch.cat([torch.linspace(-10, 10, 101), lo, hi, 0.5 * (lo + hi), hi + 1e-12])).values
        F = d.cdf(t.unsqueeze(-1))
        assert (F >= 0).all() and (F <= 1).all()
        assert (F.diff() >= -CDF_MONOTONE_TOL).all()
        assert F[-1].item() == pytest.approx(1.0, abs=CDF_MONOTONE_TOL)


def test_cdf_of_narrow_component_matches_mpmath():
    """One component N(0.25, 2²) on [1.125, 1.125 + 2⁻²⁷] and a wide one; cdf at interior points vs mpmath.

    Dyadic numbers keep the whitening exact: inside an interval of width w the cdf's condition number is
    ~|t|/w, so a rounded input would move it by ~1e-8 relative and hide the error under test."""
    import mpmath as mp
    w = 2.0 ** -27
    lo, hi = torch.tensor([1.125, -2.0]), torch.tensor([1.125 + w, 3.0])
    loc, sc, logits = torch.tensor([0.25, 0.0]), torch.tensor([2.0, 1.0]), torch.tensor([0.4, -0.1])
    d = _interval_mixture(lo, hi, loc, sc, logits)
    pts = [1.125 + w / 4, 1.125 + w / 2, 1.125 + w, 2.0]
    with mp.workdps(60):
        w = [mp.exp(mp.mpf(x)) for x in logits.tolist()]
        w = [x / sum(w) for x in w]

        def comp(k, t):
            a, b = (mp.mpf(lo[k].item()) - loc[k].item()) / sc[k].item(), (mp.mpf(hi[k].item()) - loc[k].item()) / sc[k].item()
            x = min(max((mp.mpf(t) - loc[k].item()) / sc[k].item(), a), b)
            return (mp.ncdf(x) - mp.ncdf(a)) / (mp.ncdf(b) - mp.ncdf(a))
        ref = [float(w[0] * comp(0, t) + w[1] * comp(1, t)) for t in pts]
    torch.testing.assert_close(d.cdf(torch.tensor(pts).unsqueeze(-1)), torch.tensor(ref), rtol=1e-12, atol=0)


def test_covariance_is_total_variance_and_accurate_far_out():
    """Components far from 0 with tiny spread: E[z²] − m² (≈1e10 − 1e10) would leave rounding noise of ~1e-6
    against a variance of ~1e-7; the law of total variance is exact. Reference: mpmath moments at 80 digits."""
    import mpmath as mp
    lo = torch.tensor([1e5, 1e5 + 2e-4])
    hi = torch.tensor([1e5 + 1e-3, 1e5 + 5e-4])
    loc, sc, logits = torch.tensor([1e5 - 0.5, 1e5]), torch.tensor([0.1, 1e-3]), torch.tensor([0.2, -0.3])
    d = _interval_mixture(lo, hi, loc, sc, logits)
    with mp.workdps(80):
        w = [mp.exp(mp.mpf(x)) for x in logits.tolist()]
        w = [x / sum(w) for x in w]
        mom = []
        for k in range(2):
            a = (mp.mpf(lo[k].item()) - loc[k].item()) / sc[k].item()
            b = (mp.mpf(hi[k].item()) - loc[k].item()) / sc[k].item()
            P = mp.ncdf(b) - mp.ncdf(a)
            m = (mp.npdf(a) - mp.npdf(b)) / P
            m2 = 1 + (a * mp.npdf(a) - b * mp.npdf(b)) / P
            mom.append((loc[k].item() + sc[k].item() * m, sc[k].item() ** 2 * (m2 - m * m)))
        mean = sum(wk * mk for wk, (mk, _) in zip(w, mom))
        var = sum(wk * (vk + (mk - mean) ** 2) for wk, (mk, vk) in zip(w, mom))
    cov = d.covariance_matrix
    assert cov.item() > 0
    assert cov.item() == pytest.approx(float(var), rel=1e-9)
    assert d.mean.item() == pytest.approx(float(mean), rel=1e-15)


def test_covariance_psd_in_2d():
    d = _polygon_2d()
    ev = torch.linalg.eigvalsh(d.covariance_matrix)
    assert (ev > 0).all()
