import math

import numpy as np
import pytest
import torch
from scipy import stats

from pyro_cpa import PyroCPAError
from pyro_cpa.glm import Bernoulli, Binomial, EDFDistribution, Gamma, Gaussian, Poisson, get_family

#: tolerance of float64 comparisons with SciPy / torch.distributions
TOL = 1e-12

FAMILIES = [Gaussian(0.7), Bernoulli(), Binomial(5), Poisson(), Gamma(2.5)]


def _theta(fam, n=50):
    th = torch.randn(n) * 2
    return -torch.exp(th * 0.5) if isinstance(fam, Gamma) else th


def _samples(fam, theta):
    torch.manual_seed(1)
    return fam.sample(theta)


def _scipy(fam, theta):
    th = theta.numpy()
    if isinstance(fam, Gaussian):
        return stats.norm(th, math.sqrt(float(fam.dispersion)))
    if isinstance(fam, Bernoulli):
        return stats.bernoulli(1 / (1 + np.exp(-th)))
    if isinstance(fam, Binomial):
        return stats.binom(fam.total_count, 1 / (1 + np.exp(-th)))
    if isinstance(fam, Poisson):
        return stats.poisson(np.exp(th))
    k = float(fam.shape)
    return stats.gamma(k, scale=-1 / (th * k))


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_log_prob_mean_variance_match_scipy(fam):
    th = _theta(fam)
    x = _samples(fam, th)
    ref = _scipy(fam, th)
    lp = fam.log_prob(x, th)
    ref_lp = ref.logpdf(x.numpy()) if isinstance(fam, (Gaussian, Gamma)) else ref.logpmf(x.numpy())
    np.testing.assert_allclose(lp.numpy(), ref_lp, rtol=1e-11, atol=TOL)
    np.testing.assert_allclose(fam.mean(th).numpy(), ref.mean(), rtol=1e-12)
    np.testing.assert_allclose(fam.variance(th).numpy(), ref.var(), rtol=1e-11)
    d = fam.distribution(th)
    assert isinstance(d, EDFDistribution)
    np.testing.assert_allclose(d.log_prob(x).numpy(), lp.numpy(), rtol=0, atol=0)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_derivatives_match_autograd(fam):
    th = _theta(fam).requires_grad_(True)
    F = fam.log_normalizer(th)
    (d1,) = torch.autograd.grad(F.sum(), th, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), th)
    np.testing.assert_allclose(d1.detach().numpy(), fam.mean(th).detach().numpy(), rtol=1e-12, atol=TOL)
    np.testing.assert_allclose(d2.numpy(), fam.variance_function(th).detach().numpy(), rtol=1e-12, atol=TOL)


def test_matches_torch_distributions():
    th = torch.randn(30) * 3
    xb = torch.bernoulli(torch.sigmoid(th))
    assert torch.allclose(Bernoulli().log_prob(xb, th), torch.distributions.Bernoulli(logits=th).log_prob(xb),
                          atol=TOL, rtol=0)
    xn = torch.distributions.Binomial(7, logits=th).sample()
    assert torch.allclose(Binomial(7).log_prob(xn, th), torch.distributions.Binomial(7, logits=th).log_prob(xn),
                          atol=1e-11, rtol=0)
    xp = torch.poisson(torch.exp(th))
    assert torch.allclose(Poisson().log_prob(xp, th), torch.distributions.Poisson(torch.exp(th)).log_prob(xp),
                          atol=1e-10, rtol=1e-12)


def test_no_overflow_for_large_natural_parameters():
    th = torch.tensor([-800.0, -50.0, 50.0, 800.0])
    for fam, x in [(Bernoulli(), torch.tensor([1.0, 0.0, 1.0, 0.0])), (Binomial(3), torch.tensor([3.0, 0, 3, 1]))]:
        lp = fam.log_prob(x, th)
        assert torch.isfinite(lp).all()
    assert Bernoulli().log_prob(torch.tensor([0.0]), torch.tensor([800.0])).item() == pytest.approx(-800.0)
    lp = Poisson().log_prob(torch.tensor([0.0, 3.0, 2.0, 1.0]), th)
    assert not torch.isnan(lp).any()
    assert lp[0].item() == pytest.approx(0.0) and lp[-1].item() == -math.inf


def test_linearly_canonical_activations():
    eta = torch.linspace(-5, 5, 21)
    m = Bernoulli().activation("tanh")
    assert torch.allclose(m(eta), 0.5 * torch.tanh(eta) + 0.5, atol=TOL)
    assert torch.allclose(Bernoulli().activation("sigmoid")(eta), torch.sigmoid(eta))
    assert torch.allclose(Binomial(4).activation("tanh")(eta), 4 * (0.5 * torch.tanh(eta) + 0.5), atol=TOL)
    assert torch.allclose(Poisson().activation(0.5)(eta), torch.exp(0.5 * eta))
    for fam in FAMILIES:
        th = _theta(fam)
        assert torch.allclose(fam.link(fam.mean(th)), th, atol=1e-9)


def test_taylor_constants_table_2():
    assert Bernoulli().taylor_at_zero() == pytest.approx((math.log(2), 0.5, 0.25))
    assert Gaussian(3.0).taylor_at_zero() == pytest.approx((0.0, 0.0, 1.0))
    assert Poisson().taylor_at_zero() == pytest.approx((1.0, 1.0, 1.0))
    assert Binomial(6).taylor_at_zero() == pytest.approx((6 * math.log(2), 3.0, 1.5))
    with pytest.raises(PyroCPAError, match="does not contain 0"):
        Gamma(2.0).taylor_at_zero()


def test_bad_parameters_raise():
    with pytest.raises(PyroCPAError):
        Gaussian(-1.0)
    with pytest.raises(PyroCPAError):
        Gaussian(float("nan"))
    with pytest.raises(PyroCPAError):
        Binomial(0)
    with pytest.raises(PyroCPAError):
        Binomial(2.5)
    with pytest.raises(PyroCPAError):
        Gamma(0.0)
    with pytest.raises(PyroCPAError):
        Bernoulli().activation("relu")
    with pytest.raises(PyroCPAError):
        Bernoulli().activation(0.0)
    with pytest.raises(PyroCPAError):
        get_family("student-t")
    with pytest.raises(PyroCPAError, match="strictly negative"):
        Gamma(1.0).distribution(torch.tensor([0.5]))
    with pytest.raises(PyroCPAError, match="support"):
        Bernoulli().validate_x(torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError):
        Poisson().distribution(torch.zeros(2), validate_args=True).log_prob(torch.tensor([1.5, 1.0]))


#: log1p / logaddexp and the final sums are correctly rounded to a few ulps: relative agreement with mpmath.
MPMATH_RTOL = 1e-14
#: below the smallest normal float64 only absolute precision exists (e.g. log(1 + e^−745) = 5e-324).
SUBNORMAL_ATOL = torch.finfo(torch.float64).tiny
#: log C(n, x) = lgamma(n + 1) − lgamma(x + 1) − lgamma(n − x + 1) is exact to a few ulps of lgamma(n + 1).
LGAMMA_ULPS = 4


@pytest.mark.parametrize("fam, xs", [(Bernoulli(), (0.0, 1.0)), (Binomial(5), (0.0, 2.0, 5.0))])
def test_item10_bernoulli_binomial_log_prob_is_exact_for_large_logits(fam, xs):
    """x ϑ − n log(1 + e^ϑ) + log C(n, x) against mpmath (400 digits, so that ϑ − log(1 + e^ϑ) keeps e^{−|ϑ|}),
    including |ϑ| > 20 where softplus's threshold used to return ϑ itself (Bernoulli at ϑ = 20.05: 0.0 instead of
    −1.96e-9)."""
    import mpmath

    n = fam.total_count
    eps = torch.finfo(torch.float64).eps
    atol = SUBNORMAL_ATOL + (LGAMMA_ULPS * eps * math.lgamma(n + 1) if n > 1 else 0.0)
    thetas = [-745.0, -40.0, -20.05, -1.5, 0.0, 0.7, 20.05, 35.0, 40.0, 700.0]
    with mpmath.workdps(400):
        for x in xs:
            th = torch.tensor(thetas)
            got = fam.log_prob(torch.full_like(th, x), th)
            for t, g in zip(thetas, got.tolist()):
                T = mpmath.mpf(t)
                F = n * mpmath.log1p(mpmath.exp(T))
                ref = float(x * T - F + mpmath.log(mpmath.binomial(n, int(x))))
                assert abs(g - ref) <= MPMATH_RTOL * abs(ref) + atol, (x, t, g, ref)
                assert abs(fam.log_normalizer(torch.tensor(t)).item() - float(F)) <= MPMATH_RTOL * float(F) + \
                    SUBNORMAL_ATOL
    assert Bernoulli().log_prob(torch.tensor(1.0), torch.tensor(20.05)).item() == pytest.approx(-1.960629972e-9,
                                                                                                 rel=1e-9)


def test_item10_bernoulli_log_prob_gradient_is_exact_at_zero():
    """d/dϑ [x ϑ − log(1 + e^ϑ)] = x − σ(ϑ): 0.5 and −0.5 at ϑ = 0 (no branch on the sign of ϑ)."""
    th = torch.zeros(2, requires_grad=True)
    Bernoulli().log_prob(torch.tensor([1.0, 0.0]), th).sum().backward()
    assert th.grad.tolist() == [0.5, -0.5]
