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
