"""S = 2 pairs integrated on their region's polygon edges, computed once per region and translated per pair
(issue 12: chunked.region_polygons / pair_edges), against the per-pair path (whiten + polygon_edges per pair:
``gaussian_polytope_moments`` and the autograd replay's ``pair_terms``), near and far from the prior, with and
without autograd."""
import pytest
import torch
from torch import nn

import pyro_cpa.integrate.bivariate as biv
from pyro_cpa.distributions import CPAMarginal, chunked
from pyro_cpa.integrate import gaussian_polytope_moments
from pyro_cpa.nn import mlp

EPS = torch.finfo(torch.float64).eps
PATH_RTOL = 1e-11
"""Translated vs per-pair edges: both integrate the pair's polygon up to a perturbation of its offsets by
~eps·(1 + |ĉ| + |ĥ||μ|) (d itself carries that rounding; tests/integrate/test_bivariate_translate.py bounds it
by the edge weights). On these models (|ĉ| up to ~1e3 for the far data) that is <= ~1e-12 relative to
1 + |value|; 1e-11 leaves a margin for other CPUs' rounding."""
MOMENT_RTOL_PER_NAT = 1e-12
"""... plus this per nat of |log P| for the moments, relative to 1 + |E[z]| (as in
tests/integrate/test_perturbation_2d3d.py: the edge weights exp(log φ − log P) lose eps·|log P|; pairs kept by the
pruning bound can have log P ~ −5e5, far-out slivers without weight in log p) ..."""
MOMENT_MIN_LOGP = -1e6
"""... on the pairs with log P >= this (as there; the far model below keeps wedges with log P ~ −1e7, weight
e^{−1e7} in log p, whose moments both paths give to ~1e-5 only)."""
GRAD_RTOL = 1e-9
"""Gradients along the two paths (analytic mass gradient at the translated vs recomputed edges; the moments'
autograd through translate_edges vs through polygon_edges), relative to the largest entry."""


def _marginal(seed=0, far=False, widths=(6, 6), D=3):
    """far: observation noise 100× smaller, so that Σ_ω = L Lᵀ is small and the regions are far from v = 0 in
    their whitened coordinates v = L⁻¹z (|ĉ| ~ 1e2–1e3, cancelling in d = ĉ − ĥᵀμ)."""
    dec = mlp([2, *widths, D], nn.ReLU, seed=seed)
    return CPAMarginal(dec, torch.tensor([0.3, 0.5, 0.4][:D]) * (0.01 if far else 1.0), 1.1)


def _data(m, N, far):
    """Samples, and (far) samples pushed out along the decoder's range (posteriors far from the prior too)."""
    with torch.no_grad():
        x = m.sample((N,))
    return x * 5.0 if far else x


def _reference(p, x):
    """Per-pair path: every (datum, region) pair whitened and its polygon's edges computed on its own."""
    rg = chunked.region_gaussians(p.A, p.b, x, p.obs_var, p.prior_var)
    mom = gaussian_polytope_moments(rg.loc, rg.scale_tril, p.H, p.c)
    return rg.log_kappa + mom.log_mass, mom


def _close(a, b, tol=PATH_RTOL):
    fin = torch.isfinite(a)
    return bool(((a - b)[fin].abs() <= tol * (1.0 + b[fin].abs())).all())


def test_region_tangents_are_the_transposed_cholesky_solve():
    """ê_j = L⁻ᵀe_j (elementwise substitution) against LAPACK's triangular solve, and ê_jᵀμ = e_j·(L⁻¹μ)."""
    m = _marginal(far=True)
    x = _data(m, 4, far=True)
    p = m._params()
    with torch.no_grad():
        rg = chunked.region_gaussians(p.A, p.b, x, p.obs_var, p.prior_var)
        wh = chunked.whiten_chunk(rg, p.H, p.c)
        poly = chunked.region_polygons(wh, rg.scale_tril)
        L = rg.scale_tril
        ref = torch.linalg.solve_triangular(L.transpose(-1, -2), poly.edges.e.transpose(-1, -2), upper=True)
        torch.testing.assert_close(poly.e_hat, ref.transpose(-1, -2), rtol=1e-14, atol=1e-14)
        delta = torch.linalg.solve_triangular(L, rg.loc.unsqueeze(-1), upper=False).squeeze(-1)   # (n, R, 2)
        shift = (poly.e_hat * rg.loc.unsqueeze(-2)).sum(-1)
        torch.testing.assert_close(shift, (poly.edges.e * delta.unsqueeze(-2)).sum(-1),
                                   rtol=1e-12, atol=1e-12 * (1 + rg.loc.abs().max()).item())


@pytest.mark.parametrize("far", [False, True])
@pytest.mark.parametrize("need_moments", [False, True])
def test_translated_pairs_equal_the_per_pair_path(far, need_moments, monkeypatch):
    m = _marginal(far=far)
    x = _data(m, 12, far)
    p = m._params()
    with torch.no_grad():
        rg = chunked.region_gaussians(p.A, p.b, x, p.obs_var, p.prior_var)
        per_pair = chunked.region_polygons(chunked.whiten_chunk(rg, p.H, p.c), rg.scale_tril).per_pair
    calls = []
    real_edges = biv.polygon_edges
    monkeypatch.setattr(chunked, "polygon_edges", lambda G, d, **k: calls.append(d.shape) or real_edges(G, d, **k))
    with torch.no_grad():
        res = chunked.evaluate_chunk(p, x, None, 0, prune_tol=m.prune_tol, need_moments=need_moments, mc_kwargs={})
        terms, mom = _reference(p, x)
    R, F = p.c.shape
    kept = torch.isfinite(res.terms)
    # the edges once per region, not per pair — except the pairs of regions with parallel lines (strips), whose
    # tie/empty-strip decisions are taken at the pair's own scale (chunked.region_polygons)
    assert calls[0] == (R, F)
    assert sum(c[0] for c in calls[1:]) == int(kept[:, per_pair].sum())
    assert kept.sum() > x.shape[0]            # several regions per datum
    assert _close(res.terms[kept], terms[kept])
    if far:
        wh = chunked.whiten_chunk(chunked.region_gaussians(p.A, p.b, x, p.obs_var, p.prior_var), p.H, p.c)
        assert wh.c_hat[torch.isfinite(wh.c_hat)].abs().max() > 100.0   # far regions in v: |ĉ| large
    if need_moments:
        sel = kept & (mom.log_mass >= MOMENT_MIN_LOGP)
        assert sel.sum() > x.shape[0]
        tol = (PATH_RTOL + MOMENT_RTOL_PER_NAT * mom.log_mass[sel].abs()).unsqueeze(-1)
        # the moments are accurate in u = L⁻¹(z − μ) and mapped back by L: the error's scale is ‖L‖ (1 + |E[u]|)
        rg = chunked.region_gaussians(p.A, p.b, x, p.obs_var, p.prior_var)
        L = rg.scale_tril.expand(rg.loc.shape + (2,))[sel].detach()
        mu = rg.loc[sel].detach()
        Eu = torch.linalg.solve_triangular(L, (mom.mean[sel] - mu).unsqueeze(-1), upper=False).squeeze(-1)
        scale = (1.0 + mu.norm(dim=-1) + L.norm(dim=(-1, -2)) * (1.0 + Eu.norm(dim=-1))).unsqueeze(-1)
        assert ((res.mom.mean[sel] - mom.mean[sel]).abs() <= tol * scale).all()
        assert ((res.mom.covariance[sel] - mom.covariance[sel]).abs() <= (tol * scale ** 2)[..., None]).all()


def _leaves(p, x):
    return [t.detach().clone().requires_grad_(True) for t in (x, *p)]


@pytest.mark.parametrize("need_moments", [False, True])
def test_forward_values_under_grad_equal_those_without(need_moments):
    """The autograd path takes the same translated edges: bitwise the same values as without autograd, for
    evaluate_chunk (terms, moments) and for log_prob (its forward pass and the recomputing backward's)."""
    m = _marginal()
    x = _data(m, 10, far=False)
    p = m._params()
    kw = dict(prune_tol=m.prune_tol, need_moments=need_moments, mc_kwargs={})
    with torch.no_grad():
        plain = chunked.evaluate_chunk(p, x, None, 0, **kw)
    xs, *ps = _leaves(p, x)
    with torch.enable_grad():
        graph = chunked.evaluate_chunk(chunked.RegionParams(*ps), xs, None, 0, **kw)
    assert graph.terms.requires_grad
    assert torch.equal(plain.terms, graph.terms.detach())
    if need_moments:
        assert torch.equal(plain.mom.mean, graph.mom.mean.detach())
        assert torch.equal(plain.mom.covariance, graph.mom.covariance.detach())
    with torch.no_grad():
        lp = m.log_prob(x)
    lp_grad = m.log_prob(x.clone().requires_grad_(True))
    assert lp_grad.requires_grad and torch.equal(lp, lp_grad.detach())


@pytest.mark.parametrize("far", [False, True])
@pytest.mark.parametrize("need_moments", [False, True])
def test_gradients_through_translated_edges_equal_the_per_pair_path(far, need_moments):
    """∂/∂(x, A, b, H, c, σx², σz²) of Σ_n log p(x_n) = Σ_n logsumexp_ω t_nω (and of Σ w_nω a_nω·E[z | x_n, ω]
    with the posterior weights w_nω and random a_nω, with moments) along evaluate_chunk's translated edges and
    along the per-pair path (the replay's pair_terms; gaussian_polytope_moments for the moments)."""
    m = _marginal(seed=1, far=far)
    x = _data(m, 6, far)
    p = m._params()
    with torch.no_grad():
        terms = chunked.evaluate_chunk(p, x, None, 0, prune_tol=m.prune_tol, need_moments=False, mc_kwargs={}).terms
    kept = torch.isfinite(terms)
    n_idx, r_idx = kept.nonzero(as_tuple=True)
    w = (terms - terms.logsumexp(-1, keepdim=True)).exp()[n_idx, r_idx]
    a = torch.randn(n_idx.shape + (2,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def objective(t, mean):
        lse = torch.stack([t[n_idx == n].logsumexp(0) for n in range(x.shape[0])]).sum()   # Σ_n log p(x_n)
        return lse + (w.unsqueeze(-1) * a * mean).sum() if need_moments else lse

    leaves = _leaves(p, x)
    res = chunked.evaluate_chunk(chunked.RegionParams(*leaves[1:]), leaves[0], None, 0, prune_tol=m.prune_tol,
                                 need_moments=need_moments, mc_kwargs={})
    got = torch.autograd.grad(objective(res.terms[n_idx, r_idx], res.mom.mean[n_idx, r_idx] if need_moments else None),
                              leaves)
    leaves = _leaves(p, x)
    q = chunked.RegionParams(*leaves[1:])
    t = chunked.pair_terms(q, leaves[0], None, n_idx, r_idx, None, mc_kwargs={})
    mean = None
    if need_moments:
        rg = chunked.affine_gaussians(q.A[r_idx], q.b[r_idx], leaves[0][n_idx], q.obs_var, q.prior_var)
        mean = gaussian_polytope_moments(rg.loc, rg.scale_tril, q.H[r_idx], q.c[r_idx]).mean
    ref = torch.autograd.grad(objective(t, mean), leaves)
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= GRAD_RTOL * (1.0 + b.abs().max())
