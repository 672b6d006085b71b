"""Exact results must not depend on batch shape, chunking, thread count or a few ulps of input (issue 10).

Every check compares the library with itself under a change that is an identity in exact arithmetic, so the
tolerances are a few hundred ulps: any discrete decision that amplifies rounding (a self-term that should
be 0, a tie broken by rounding, a BLAS path that depends on the shape) shows up as an O(1) difference.
The exact values themselves are checked against independent references in the per-module tests.
"""
import pytest
import torch
from torch import nn

from pyro_cpa.distributions import CPAMarginal
from pyro_cpa.infer.estep import e_step
from pyro_cpa.nn import mlp

BATCH_RTOL = 1e-13      # unbatched vs batched vs chunked: same operations up to summation order
THREAD_RTOL = 1e-12     # 1 vs 2 vs 4 intra-op threads
NUDGE_RTOL = 1e-10      # inputs moved by a few ulps: log p is smooth, so it moves by ~1e-15 relative


def _decoder(widths, seed, act=nn.ReLU):
    return mlp(widths, act, seed=seed)


CASES = [
    # (widths, activation, N): S = 1, 2 (incl. a region with many facets) and 3
    ([1, 16, 16, 3], nn.ReLU, 64),
    ([2, 12, 12, 2], lambda: nn.LeakyReLU(0.2), 40),
    ([2, 24, 2], nn.ReLU, 30),
    ([3, 5, 2], nn.ReLU, 5),
]


def _marginal(widths, act, chunk_size=1024):
    dec = _decoder(widths, seed=len(widths) + widths[1], act=act)
    return CPAMarginal(dec, obs_scale=0.3, prior_scale=1.0, chunk_size=chunk_size)


def _data(marginal, N, seed=1):
    g = torch.Generator().manual_seed(seed)
    D = marginal.event_shape[0]
    return torch.randn(N, D, generator=g, dtype=torch.float64) * 1.5


def _close(a, b, rtol):
    a, b = a.detach(), b.detach()
    scale = torch.maximum(a.abs(), b.abs()).clamp(min=1.0)
    return bool(((a - b).abs() <= rtol * scale).all())


@pytest.mark.parametrize("widths,act,N", CASES)
def test_log_prob_independent_of_batch_shape_and_chunking(widths, act, N):
    m = _marginal(widths, act)
    x = _data(m, N)
    batched = m.log_prob(x)
    single = torch.stack([m.log_prob(x[i]) for i in range(N)])
    assert _close(batched, single, BATCH_RTOL)
    half = N // 2
    reshaped = m.log_prob(x[:2 * half].reshape(2, half, -1)).reshape(-1)
    assert _close(batched[:2 * half], reshaped, BATCH_RTOL)
    for chunk in (1, 7):
        chunked = _marginal(widths, act, chunk_size=chunk).log_prob(x)
        assert _close(batched, chunked, BATCH_RTOL)


@pytest.mark.parametrize("widths,act,N", CASES[:3])
def test_posterior_moments_independent_of_batch_shape(widths, act, N):
    m = _marginal(widths, act)
    x = _data(m, N)[:8]
    post = m.posterior(x)
    for i in range(x.shape[0]):
        p1 = m.posterior(x[i])
        assert _close(post.mean[i], p1.mean, BATCH_RTOL)
        assert _close(post.covariance_matrix[i], p1.covariance_matrix, 1e-11)


@pytest.mark.parametrize("widths,act,N", CASES)
def test_log_prob_and_estep_independent_of_thread_count(widths, act, N):
    m = _marginal(widths, act)
    x = _data(m, N)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            lp = m.log_prob(x)
            st = e_step(m, x)
            results.append((lp, st.Z, st.X, st.q, st.loglik))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert _close(a, b, THREAD_RTOL)


@pytest.mark.parametrize("widths,act,N", CASES)
def test_log_prob_stable_under_ulp_nudges(widths, act, N):
    m = _marginal(widths, act)
    x = _data(m, N)
    base = m.log_prob(x)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        k = torch.randint(-4, 5, x.shape, generator=g).to(x.dtype)
        nudged = x + k * torch.finfo(x.dtype).eps * x.abs()
        assert _close(base, m.log_prob(nudged), NUDGE_RTOL)
    # nudge the decoder's weights too: the partition moves by ulps, the density must not jump
    m2 = _marginal(widths, act)
    with torch.no_grad():
        for p in m2.decoder.parameters():
            k = torch.randint(-4, 5, p.shape, generator=g).to(p.dtype)
            p.add_(k * torch.finfo(p.dtype).eps * p.abs())
    assert _close(base, m2.log_prob(x), NUDGE_RTOL)


def _tangent_decoder(S, K, seed=0):
    """One ReLU layer whose K hyperplanes w_k·z = 1 are tangent to the unit sphere: the central region is a
    polytope with K facets (F >= 15 reaches the BLAS path of batched matmuls in 2-D, issue 10 D1)."""
    g = torch.Generator().manual_seed(seed)
    if S == 2:
        th = torch.arange(K, dtype=torch.float64) * 2 * torch.pi / K + 0.1
        W = torch.stack([th.cos(), th.sin()], -1)
    else:
        W = torch.randn(K, S, generator=g, dtype=torch.float64)
        W = W / W.norm(dim=-1, keepdim=True)
    first, last = nn.Linear(S, K).double(), nn.Linear(K, 2).double()
    with torch.no_grad():
        first.weight.copy_(W)
        first.bias.fill_(-1.0)
        last.weight.copy_(torch.randn(2, K, generator=g, dtype=torch.float64))
        last.bias.zero_()
    return nn.Sequential(first, nn.ReLU(), last)


@pytest.mark.parametrize("S,K", [(2, 20), (2, 5), (3, 7)])
def test_many_facet_regions_tile_and_agree_unbatched(S, K):
    """The prior masses of the regions sum to 1 (they tile R^S) also when a region has many facets, and
    each region's mass is the same whether integrated alone or in a batch."""
    from pyro_cpa import linear_regions
    from pyro_cpa.integrate import gaussian_polytope_moments

    regions = linear_regions(_tangent_decoder(S, K))
    H, c = regions.H.detach(), regions.c.detach()
    zero, eye = torch.zeros(S, dtype=H.dtype), torch.eye(S, dtype=H.dtype)
    batched = gaussian_polytope_moments(zero, eye, H, c).log_mass
    assert batched.exp().sum().item() == pytest.approx(1.0, abs=1e-11)
    central = int(torch.isfinite(c).sum(-1).argmax())
    alone = gaussian_polytope_moments(zero, eye, H[central], c[central]).log_mass
    assert _close(alone, batched[central], BATCH_RTOL)


def test_estep_second_moments_do_not_need_the_centred_covariance():
    """The E-step asks S = 2 for second moments only (``centred_covariance=False``, ~6× faster). What it sums,
    Σ_ω e0_nω E[z̃z̃ᵀ | x_n, ω], is the same up to rounding: the two paths differ (by up to ~1e-8 relative)
    only on far-out polygons, whose posterior weight e0 is negligible."""
    m = _marginal([2, 16, 16, 2], nn.ReLU)
    x = _data(m, 6)
    with torch.no_grad():
        terms, _, mom, _, _ = m._pairs(x)
        fast = m._pairs(x, centred_covariance=False)[2]
    e0 = (terms - terms.logsumexp(-1, keepdim=True)).exp()
    live = torch.isfinite(terms)

    def weighted(mo):
        mean = torch.where(live.unsqueeze(-1), mo.mean, torch.zeros_like(mo.mean))
        second = mo.covariance + mean.unsqueeze(-1) * mean.unsqueeze(-2)
        second = torch.where(live[..., None, None], second, torch.zeros_like(second))
        return (e0.unsqueeze(-1) * mean).sum(1), (e0[..., None, None] * second).sum(1)

    for a, b in zip(weighted(mom), weighted(fast)):
        assert _close(a, b, BATCH_RTOL)
    assert not torch.equal(mom.covariance[live], fast.covariance[live])   # the switch does change the method
