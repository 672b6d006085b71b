"""Pyro's generic distribution checks (tests/distributions/test_distributions.py of Pyro), run on CPAMarginal and
TruncatedGaussianMixture: support and log_prob shapes, infer_shapes, score errors, expand (new dims, existing
dims, subsequent expands, and the three test_expand_error cases, with the class's expand and with Pyro's default
ExpandedDistribution), sample/log_prob consistency (Pyro's goodness-of-fit test), enumerate_support, entropy
shape, pickling. Issue 11, items 9 (expand, entropy) and "Pyro's own generic distribution checks".
"""
import math
import pickle

import pytest
import torch
from pyro.distributions import TorchDistribution
from pyro.distributions.testing.gof import auto_goodness_of_fit
from pyro.distributions.util import broadcast_shape
from torch import nn

from pyro_cpa.distributions import CPAMarginal, TruncatedGaussianMixture

#: Pyro's own threshold for its goodness-of-fit p-values (tests/common.py: TEST_FAILURE_RATE).
TEST_FAILURE_RATE = 1e-3
#: Tolerance of equalities between two evaluations of the same float64 formula (batched vs unbatched).
SAME_FORMULA_RTOL = 1e-12


def _decoder(S, D, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(S, 6), nn.LeakyReLU(0.2), nn.Linear(6, D)).double()


def _marginal_s1():
    return CPAMarginal(_decoder(1, 2), 0.3)


def _marginal_s2():
    return CPAMarginal(_decoder(2, 3, seed=1), torch.tensor([0.3, 0.4, 0.5]), 0.8)


def _posterior_s2():
    d = _marginal_s2()
    torch.manual_seed(3)
    return d.posterior(d.sample((3,)))  # batch (3,), tiles R^2


def _two_intervals_1d():
    """Overlapping components, not a tiling: N(0, 1) on [-1, 2] and N(1, 0.5²) on [0.5, inf)."""
    inf = float("inf")
    return TruncatedGaussianMixture(torch.tensor([0.3, -0.2]), torch.tensor([[0.0], [1.0]]),
                                    torch.tensor([[[1.0]], [[0.5]]]), torch.tensor([[[1.0], [-1.0]], [[-1.0], [0.0]]]),
                                    torch.tensor([[2.0, 1.0], [-0.5, inf]]))


DISTS = {"marginal_s1": _marginal_s1, "marginal_s2": _marginal_s2, "posterior_s2": _posterior_s2,
         "mixture_1d": _two_intervals_1d}


@pytest.fixture(params=list(DISTS), ids=list(DISTS))
def small(request):
    return DISTS[request.param]()


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=SAME_FORMULA_RTOL, atol=0.0)


def check_sample_shapes(small, large):
    """Pyro's check_sample_shapes: the expanded distribution agrees with the small one."""
    x = small.sample()
    _close(small.log_prob(x).expand(large.batch_shape), large.log_prob(x))
    x = large.sample()
    _close(small.log_prob(x), large.log_prob(x))


def test_support_shape_and_batch_log_prob_shape(small):
    x = small.sample((4,))
    assert small.support.event_dim == small.event_dim == 1
    ok = small.support.check(x)
    assert ok.shape == broadcast_shape(small.batch_shape, x.shape[:x.dim() - 1]) and bool(ok.all())
    assert not small.support.is_discrete
    assert small.log_prob(x).shape == (4,) + small.batch_shape


def test_infer_shapes():
    d = _two_intervals_1d()
    shapes = {k: getattr(d, k).shape for k in ("logits", "loc", "scale_tril", "H", "c")}
    assert TruncatedGaussianMixture.infer_shapes(**shapes) == (d.batch_shape, d.event_shape)
    post = _posterior_s2()
    shapes = {k: getattr(post, k).shape for k in ("logits", "loc", "scale_tril", "H", "c")}
    assert TruncatedGaussianMixture.infer_shapes(**shapes) == (post.batch_shape, post.event_shape)
    with pytest.raises(NotImplementedError, match="decoder"):  # CPAMarginal's shapes come from its decoder
        CPAMarginal.infer_shapes(obs_scale=(), prior_scale=())


def test_score_errors(small):
    d = small if small.batch_shape else small.expand((2,))
    d = TruncatedGaussianMixture(d.logits, d.loc, d.scale_tril, d.H, d.c) if isinstance(d, TruncatedGaussianMixture) \
        else d  # Pyro validates by default; the posterior is built with validate_args=False for speed
    if d.event_shape[0] > 1:  # with a (1,) event, a trailing 1 is a valid event: nothing to refuse
        with pytest.raises((ValueError, RuntimeError)):  # wrong event dim
            d.log_prob(torch.ones(d.shape() + (1,)))
    shape = d.shape()
    with pytest.raises((ValueError, RuntimeError)):  # non-broadcastable batch
        d.log_prob(torch.ones((shape[0] + 1,) + shape[1:]))


@pytest.mark.parametrize("sample_shape", [(), (2,), (2, 3)])
@pytest.mark.parametrize("default", [False, True])
def test_expand_new_dim_and_expand_by(small, sample_shape, default):
    shape = torch.Size(sample_shape) + small.batch_shape
    large = TorchDistribution.expand(small, shape) if default else small.expand(shape)
    assert large.batch_shape == shape
    check_sample_shapes(small, large)
    by = small.expand_by(sample_shape)
    assert by.batch_shape == shape


@pytest.mark.parametrize("default", [False, True])
def test_expand_existing_dim(small, default):
    small = small.expand((1,) + small.batch_shape)
    batch_shape = torch.Size((5,)) + small.batch_shape[1:]
    large = TorchDistribution.expand(small, batch_shape) if default else small.expand(batch_shape)
    assert large.batch_shape == batch_shape
    check_sample_shapes(small, large)


@pytest.mark.parametrize("sample_shapes", [[(2, 1), (2, 3)], [(2, 1, 1), (2, 1, 3), (2, 5, 3)]])
@pytest.mark.parametrize("default", [False, True])
def test_subsequent_expands_ok(small, sample_shapes, default):
    d, original = small, small.batch_shape
    for shape in sample_shapes:
        proposed = torch.Size(shape) + original
        n = TorchDistribution.expand(d, proposed) if default else d.expand(proposed)
        assert n.batch_shape == proposed
        check_sample_shapes(d, n)
        d = n


@pytest.mark.parametrize("initial_shape, proposed_shape", [[(2, 1), (4, 3)], [(2, 4), (2, 2, 1)], [(1, 2, 1), (2, 1)]])
@pytest.mark.parametrize("default", [False, True])
def test_item9_expand_error(small, initial_shape, proposed_shape, default):
    initial = torch.Size(initial_shape) + small.batch_shape
    large = TorchDistribution.expand(small, initial) if default else small.expand(initial)
    with pytest.raises((RuntimeError, ValueError)):
        large.expand(torch.Size(proposed_shape) + small.batch_shape)


def test_enumerate_support_raises_with_a_message(small):
    assert not small.has_enumerate_support
    with pytest.raises(NotImplementedError, match="continuous"):
        small.enumerate_support()


def test_pickle_round_trip_gives_the_same_log_prob(small):
    x = small.sample((5,))
    copy = pickle.loads(pickle.dumps(small))
    assert copy.batch_shape == small.batch_shape and copy.event_shape == small.event_shape
    _close(copy.log_prob(x), small.log_prob(x))


def test_batch_entropy_shape(small):
    d = small.expand((2,) + small.batch_shape)
    kwargs = {"num_samples": 256} if isinstance(d, CPAMarginal) else {}  # a Monte-Carlo estimate: keep it short
    assert d.entropy(**kwargs).shape == d.batch_shape


@pytest.mark.parametrize("name", ["marginal_s1", "posterior_s2", "mixture_1d"])
def test_samples_fit_the_density(name):
    """Pyro's test_gof: exact draws against the exact density (log_prob), Pyro's goodness-of-fit test."""
    d = DISTS[name]()
    n = 4000
    samples = d.sample((n,))
    probs = d.log_prob(samples).exp().reshape(n, -1)
    samples = samples.reshape(probs.shape + d.event_shape)
    for b in range(probs.shape[-1]):
        assert auto_goodness_of_fit(samples[:, b], probs[:, b]) > TEST_FAILURE_RATE


def test_item9_entropy_is_a_labelled_monte_carlo_estimate_matching_the_gaussian_closed_form():
    """An affine decoder g(z) = W z + b makes p(x) = N(b, σz² W Wᵀ + σx² I): closed-form entropy."""
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(2, 3)).double()
    sx, sz = 0.4, 1.3
    d = CPAMarginal(dec, sx, sz)
    W = dec[0].weight.detach()
    cov = sz ** 2 * W @ W.T + sx ** 2 * torch.eye(3)
    exact = 0.5 * torch.logdet(2 * math.pi * math.e * cov)
    assert "Monte-Carlo estimate" in CPAMarginal.entropy.__doc__
    batched = d.expand((2,))
    est = batched.entropy(num_samples=4000)
    assert est.shape == (2,) and batched.entropy_stderr.shape == (2,)
    stderr = float(batched.entropy_stderr[0])
    assert stderr > 0
    assert abs(float(est[0]) - float(exact)) < 5 * stderr
