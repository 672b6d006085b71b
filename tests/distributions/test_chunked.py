"""The chunked evaluation's own steps (issue 12): whitening a chunk at once, the pruning bound, and the grouping of
kept pairs by their region's real facet count, each against the per-pair reference formulas."""
import math

import pytest
import torch
from torch import nn

from pyro_cpa.distributions import CPAMarginal, chunked
from pyro_cpa.integrate import gaussian_polytope_moments, whiten
from pyro_cpa.nn import mlp

REL_TOL = 1e-13
"""Same formulas along different paths (dense per-region normals vs per-pair whitening; padded vs compacted
constraint rows): agreement to a few ulps of the values' magnitude."""


def _marginal(S, seed=0, widths=(6, 6), D=3):
    dec = mlp([S, *widths, D], nn.ReLU if S > 1 else (lambda: nn.LeakyReLU(0.2)), seed=seed)
    return CPAMarginal(dec, torch.tensor([0.3, 0.5, 0.4][:D]), 1.1)


def _data(m, N, missing=False):
    with torch.no_grad():
        x = m.sample((N,))
    if missing:
        x[0, 1] = math.nan
        x[2, 0] = x[2, 2] = math.nan
    return x


def _close(a, b, tol=REL_TOL):
    fin = torch.isfinite(b)
    assert torch.equal(fin, torch.isfinite(a))
    return bool(((a - b)[fin].abs() <= tol * (1.0 + b[fin].abs())).all())


@pytest.mark.parametrize("missing", [False, True])
def test_whiten_chunk_equals_per_pair_whitening(missing):
    m = _marginal(2)
    x = _data(m, 5, missing)
    p = m._params()
    observed = chunked.observed_mask(x)
    with torch.no_grad():
        rg = chunked.region_gaussians(p.A, p.b, x, p.obs_var, p.prior_var, observed)
        wh = chunked.whiten_chunk(rg, p.H, p.c)
        N, R = rg.log_kappa.shape
        L = rg.scale_tril if rg.scale_tril.dim() == 4 else rg.scale_tril.expand(N, R, 2, 2)
        G_ref, d_ref = whiten(rg.loc, L, p.H.expand(N, *p.H.shape), p.c.expand(N, *p.c.shape))
        G = wh.G if wh.G.dim() == 4 else wh.G.expand(N, *wh.G.shape)
    assert wh.G.dim() == (4 if missing else 3)  # per region without missing data
    assert _close(G, G_ref) and _close(wh.d, d_ref)
    assert torch.isinf(d_ref).any()  # the padding rows are exercised


def test_mass_upper_bound_is_the_free_bound_and_bounds_the_terms():
    """u = log κ + log Φ(min_j d_j) equals log κ + min_j log Φ(d_j) and is >= the exact term log κ + log P."""
    m = _marginal(2)
    x = _data(m, 8)
    p = m._params()
    with torch.no_grad():
        rg = chunked.region_gaussians(p.A, p.b, x, p.obs_var, p.prior_var)
        wh = chunked.whiten_chunk(rg, p.H, p.c)
        u = chunked.mass_upper_bound(rg, wh.d)
        assert _close(u, rg.log_kappa + torch.special.log_ndtr(wh.d).amin(-1))
        exact = rg.log_kappa + gaussian_polytope_moments(rg.loc, rg.scale_tril, p.H, p.c, need_moments=False).log_mass
        assert (u >= exact - REL_TOL * exact.abs().clamp_min(1.0)).all()


@pytest.mark.parametrize("S", [1, 2, 3])
@pytest.mark.parametrize("need_moments", [False, True])
def test_pairs_grouped_by_facet_count_equal_the_padded_rows(S, need_moments, monkeypatch):
    """Integrating each pair on its region's real facets alone (grouped by count) gives the padded path's values."""
    m = _marginal(S, widths=(4, 4) if S == 3 else (6, 6))
    x = _data(m, 2 if S == 3 else 4)
    p = m._params()
    kw = dict(prune_tol=m.prune_tol, need_moments=need_moments, mc_kwargs={})
    with torch.no_grad():
        grouped = chunked.evaluate_chunk(p, x, None, 0, **kw)
        monkeypatch.setattr(chunked, "GROUP_BY_FACETS_MAX_S", 0)
        padded = chunked.evaluate_chunk(p, x, None, 0, **kw)
    F = p.H.shape[1]
    counts = {bt.facets for bt in grouped.batches}
    assert len(counts) > 1 and min(counts) < F  # several groups, fewer rows than the padded F
    assert {bt.facets for bt in padded.batches} == {F}
    assert _close(grouped.terms, padded.terms)
    if need_moments:
        assert _close(grouped.mom.mean, padded.mom.mean) and _close(grouped.mom.covariance, padded.mom.covariance)


@pytest.mark.parametrize("S", [1, 2, 3, 4, 5])
def test_cholesky_solve_small_equals_an_lu_solve(S):
    """The substitution solve (S <= 4; torch.cholesky_solve above) against LAPACK's LU solve of M x = y, M = L Lᵀ,
    with broadcast batch shapes (R, S, S) against (N, R, S) and cond(M) up to 1e8."""
    from pyro_cpa.distributions.region_gaussians import cholesky_solve_small

    g = torch.Generator().manual_seed(S)
    Q = torch.linalg.qr(torch.randn(7, S, S, generator=g)).Q
    M = Q @ torch.diag_embed(torch.logspace(-8, 0, S).expand(7, S)) @ Q.transpose(-1, -2)
    M = 0.5 * (M + M.transpose(-1, -2))
    L = torch.linalg.cholesky(M)
    y = torch.randn(3, 7, S, generator=g)
    x = cholesky_solve_small(y, L)
    ref = torch.linalg.solve(M, y.unsqueeze(-1)).squeeze(-1)
    assert x.shape == ref.shape
    # backward stable: residual within a few eps of ‖M‖·‖x‖; forward error within cond(M)·eps of the reference
    resid = (M @ x.unsqueeze(-1)).squeeze(-1) - y
    eps = torch.finfo(x.dtype).eps
    assert (resid.norm(dim=-1) <= 1e2 * eps * M.norm(dim=(-2, -1)) * x.norm(dim=-1)).all()
    assert ((x - ref).norm(dim=-1) <= 1e2 * 1e8 * eps * ref.norm(dim=-1)).all()


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 6])
def test_sum_last_is_the_left_to_right_sum(k):
    """region_gaussians.sum_last: ((x_0 + x_1) + x_2) + ... in float64, per row (Python's float additions as the
    reference), for the short rows it sums elementwise and the long ones it leaves to torch (to rounding)."""
    from pyro_cpa.distributions.region_gaussians import SEQUENTIAL_SUM_MAX, sum_last
    x = torch.randn(5, 3, k, dtype=torch.float64) * torch.logspace(-8, 8, max(k, 1), dtype=torch.float64)[:k]
    out = sum_last(x)
    assert out.shape == (5, 3)
    ref = torch.tensor([[sum(row.tolist()) for row in plane] for plane in x], dtype=torch.float64)
    if k <= SEQUENTIAL_SUM_MAX:
        assert torch.equal(out, ref)
    else:
        bound = k * torch.finfo(torch.float64).eps * x.abs().sum(-1)   # any summation order's rounding
        assert ((out - ref).abs() <= bound).all()
