"""CPAMarginal.log_prob with memory O(chunk): values and gradients against a full-graph reference,
finite differences, invariance to chunking, bounded saved memory under autograd (issue 12, issue 11 item 7)."""
import math

import pytest
import torch
from torch import nn

from pyro_cpa.distributions import CPAMarginal, chunked
from pyro_cpa.geometry.regions import linear_regions
from pyro_cpa.integrate import gaussian_polytope_moments
from pyro_cpa.nn import mlp

REL_TOL = 1e-12
"""Values and gradients of the chunked evaluation against the full-graph reference (relative, norm-wise per
parameter tensor): both are exact formulas evaluated in float64 along different paths."""
FD_STEP, FD_RTOL = 1e-6, 1e-6
"""Central differences: truncation O(h²·f''') ~ 1e-12 and rounding O(eps/h) ~ 1e-10 relative, far below FD_RTOL."""


def _net(widths, act, seed=0):
    return mlp(widths, act, seed=seed)


def _case(S, missing, seed=0, N=6):
    act = (lambda: nn.LeakyReLU(0.2)) if S == 1 else nn.ReLU
    dec = _net([S, 5, 5, 3], act, seed)
    sx = torch.tensor([0.3, 0.5, 0.4], requires_grad=True)
    sz = torch.full((S,), 1.2, requires_grad=True)
    with torch.no_grad():
        x = CPAMarginal(dec, sx.detach(), sz.detach()).sample((N,))
    if missing:
        x[0, 1] = math.nan
        x[3, 0] = x[3, 2] = math.nan
    return dec, sx, sz, x.requires_grad_(True)


def _reference_log_prob(dec, sx, sz, x):
    """Full autograd graph, no pruning, no chunking: log κ from torch's MultivariateNormal on the observed
    coordinates, log P from gaussian_polytope_moments, one datum at a time."""
    regions = linear_regions(dec)
    maps = regions.maps(torch.float64)
    A, b = maps.A, maps.b
    H, c = regions.polytopes(torch.float64, maps=maps)
    out = []
    for n in range(x.shape[0]):
        obs = ~torch.isnan(x[n].detach())
        Ao, bo, xo = A[:, obs], b[:, obs], x[n][obs]
        Sx = torch.diag(sx[obs] ** 2)
        Sz = torch.diag(sz ** 2)
        C = Sx + Ao @ Sz @ Ao.transpose(-1, -2)
        log_kappa = torch.distributions.MultivariateNormal(bo, C).log_prob(xo)
        prec = torch.linalg.inv(Sz) + Ao.transpose(-1, -2) @ torch.linalg.inv(Sx) @ Ao
        cov = torch.linalg.inv(prec)
        mu = (cov @ Ao.transpose(-1, -2) @ ((xo - bo) / sx[obs] ** 2).unsqueeze(-1)).squeeze(-1)
        log_mass = gaussian_polytope_moments(mu, torch.linalg.cholesky(cov), H, c, need_moments=False).log_mass
        out.append(torch.logsumexp(log_kappa + log_mass, -1))
    return torch.stack(out)


def _grads(lp, dec, sx, sz, x):
    params = list(dec.parameters()) + [sx, sz, x]
    return torch.autograd.grad(lp.sum(), params)


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny))


@pytest.fixture(params=["default", "tiny_chunks"])
def chunking(request, monkeypatch):
    """Default budgets, or budgets small enough for several pruning chunks and pair batches."""
    if request.param == "tiny_chunks":
        monkeypatch.setattr(chunked, "DENSE_ELEMENTS", 64)
        monkeypatch.setattr(chunked, "PAIR_ELEMENTS", 1)
    return request.param


@pytest.mark.parametrize("S", [1, 2])
@pytest.mark.parametrize("missing", [False, True])
def test_values_and_gradients_equal_full_graph(S, missing, chunking):
    dec, sx, sz, x = _case(S, missing)
    ref = _reference_log_prob(dec, sx, sz, x)
    g_ref = _grads(ref, dec, sx, sz, x)
    lp = CPAMarginal(dec, sx, sz).log_prob(x)
    g = _grads(lp, dec, sx, sz, x)
    assert _rel(lp.detach(), ref.detach()) < REL_TOL
    for gi, ri in zip(g, g_ref):
        assert torch.isfinite(gi).all()
        assert _rel(gi, ri) < REL_TOL
    if missing:  # missing entries carry no likelihood: zero gradient
        assert g[-1][0, 1] == 0 and g[-1][3, 0] == 0 and g[-1][3, 2] == 0


def test_tiny_chunks_really_split(monkeypatch):
    """The tiny-budget fixture does exercise several chunks and batches (so the test above is not vacuous)."""
    monkeypatch.setattr(chunked, "DENSE_ELEMENTS", 64)
    monkeypatch.setattr(chunked, "PAIR_ELEMENTS", 1)
    dec, sx, sz, x = _case(2, False)
    m = CPAMarginal(dec, sx, sz)
    R = len(m.regions)
    assert chunked.chunk_rows(R, 3, m.regions.facets.shape[1], 2, m.chunk_size) == 1
    lp, _, batches = chunked._log_prob_chunks(m._params(), x.detach(), None, prune_tol=m.prune_tol,
                                               chunk_size=m.chunk_size, mc_kwargs={}, keep_batches=True)
    assert len(batches) > x.shape[0] and max(bt.pairs.numel() for bt in batches) == 1


def test_gradient_matches_finite_differences():
    dec, sx, sz, x = _case(2, True, seed=3, N=4)
    lp = CPAMarginal(dec, sx, sz).log_prob(x).sum()
    w = dec[2].weight
    g_w, g_sx, g_sz, g_x = torch.autograd.grad(lp, [w, sx, sz, x])

    def f():
        with torch.no_grad():
            return float(CPAMarginal(dec, sx, sz).log_prob(x).sum())

    checks = [(w, (1, 2), g_w), (w, (4, 0), g_w), (sx, (1,), g_sx), (sz, (0,), g_sz), (x, (2, 1), g_x)]
    for t, idx, g in checks:
        with torch.no_grad():
            t0 = float(t[idx])
            t[idx] = t0 + FD_STEP
        up = f()
        with torch.no_grad():
            t[idx] = t0 - FD_STEP
        down = f()
        with torch.no_grad():
            t[idx] = t0
        fd = (up - down) / (2 * FD_STEP)
        assert abs(fd - float(g[idx])) <= FD_RTOL * max(1.0, abs(fd)), (idx, fd, float(g[idx]))


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves while ``fn`` runs."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_saved_memory_under_autograd_is_not_per_pair():
    """Autograd keeps at most O(N) (+ 8 bytes per kept pair), not ~15 KB per (datum, region) pair."""
    dec = _net([2, 16, 16, 2], nn.ReLU, seed=1)
    sx = torch.tensor(0.3, requires_grad=True)
    m = CPAMarginal(dec, sx)
    R = len(m.regions)
    x = torch.randn(60, 2) * 2
    (_, small) = _saved_bytes(lambda: m.log_prob(x[:10]))
    lp, large = _saved_bytes(lambda: m.log_prob(x))
    per_datum = (large - small) / 50
    assert per_datum <= 8 * R + 64 * 2, (per_datum, R)
    lp.sum().backward()
    assert torch.isfinite(sx.grad)


@pytest.mark.parametrize("use_generator", [False, True])
def test_monte_carlo_backward_replays_the_forward_draws(monkeypatch, use_generator):
    """S >= 4: the backward pass replays the forward's random draws batch by batch, so its gradient is that of
    the estimate the forward pass returned, and it leaves the RNG where the forward pass left it.

    The integrator is replaced by a differentiable random one (the upper bound times a random factor, drawn
    from torch's RNG like the tilting integrator) so that the check isolates the replay; the reference is the
    full graph of the same batches on the same seed. Draws come from torch's generator or from a ``generator``
    passed in ``mc_kwargs``."""
    from pyro_cpa.integrate import StandardMoments, log_mass_upper_bound

    def noisy(G, d, *, need_moments, **kwargs):
        bound = log_mass_upper_bound(G, d)
        factor = 1.0 + 0.2 * torch.rand(bound.shape, dtype=bound.dtype, generator=kwargs.get("generator"))
        return StandardMoments(bound * factor, None, None, torch.zeros_like(bound))

    monkeypatch.setattr(chunked, "std_moments", noisy)
    monkeypatch.setattr(chunked, "PAIR_ELEMENTS", 1)
    dec = _net([4, 3, 2], nn.ReLU, seed=2)
    sx = torch.tensor(0.4, requires_grad=True)
    x = torch.randn(3, 2)
    gen = torch.Generator() if use_generator else None
    mc = {"generator": gen} if use_generator else {}
    seed = (lambda s: gen.manual_seed(s)) if use_generator else torch.manual_seed
    state = gen.get_state if use_generator else torch.get_rng_state
    m = CPAMarginal(dec, sx, mc_kwargs=mc)
    assert len(m.regions) * x.shape[0] > 2  # several batches (one pair each), several draws
    seed(7)
    lp = m.log_prob(x)
    after_forward = state()
    (g,) = torch.autograd.grad(lp.sum(), [sx])
    assert torch.equal(state(), after_forward)
    seed(7)
    res = chunked.evaluate_chunk(m._params(), x, None, 0, prune_tol=m.prune_tol, need_moments=False, mc_kwargs=mc)
    lp_ref = res.terms.logsumexp(-1)
    (g_ref,) = torch.autograd.grad(lp_ref.sum(), [sx])
    assert _rel(lp.detach(), lp_ref.detach()) < REL_TOL
    assert _rel(g, g_ref) < REL_TOL
    seed(8)  # other draws give another gradient: the comparison above can fail
    res = chunked.evaluate_chunk(m._params(), x, None, 0, prune_tol=m.prune_tol, need_moments=False, mc_kwargs=mc)
    (g_other,) = torch.autograd.grad(res.terms.logsumexp(-1).sum(), [sx])
    assert _rel(g_other, g_ref) > 1e3 * REL_TOL
