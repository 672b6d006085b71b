"""The S = 2 flat-edge path's batching (issue 12): the pairs whose flux mass is not trusted get their fallback mass
once per chunk (mass alone) or per chunked.FALLBACK_BATCHES batches (with the moments), by
chunked.fallback_pair_log_mass; the edge quadrature evaluates its rules in row blocks (edge_flux.NODE_BLOCK), and
2-element rows are gathered as complex scalars (chunked._rows2). None of these may change a bit: each pair's value
depends on that pair alone, whatever the batch and block sizes."""
import pytest
import torch
from torch import nn

import pyro_cpa.integrate.edge_flux as ef
from pyro_cpa.distributions import CPAMarginal, chunked
from pyro_cpa.nn import mlp


def _far_marginal():
    """A [2, 10, 10, 2] decoder (218 regions) and 40 of its samples: ~120 kept pairs are small polygons a few units
    from their means, whose flux terms cancel beyond DEFAULT_FLUX_MAX_AMP (the fallback's pairs)."""
    m = CPAMarginal(mlp([2, 10, 10, 2], lambda: nn.LeakyReLU(0.1), seed=0), 0.3)
    torch.manual_seed(0)
    with torch.no_grad():
        x = m.sample((40,))
    return m, x


def _evaluate(m, x, need_moments):
    with torch.no_grad():
        return chunked.evaluate_chunk(m._params(), x, None, 0, prune_tol=m.prune_tol, need_moments=need_moments,
                                      mc_kwargs={})


@pytest.mark.parametrize("need_moments", [False, True])
def test_flat_path_values_do_not_depend_on_batch_or_block_size(need_moments, monkeypatch):
    m, x = _far_marginal()
    spy = []
    real = chunked.fallback_pair_log_mass
    monkeypatch.setattr(chunked, "fallback_pair_log_mass", lambda poly, pairs, *a: spy.append(pairs.numel())
                        or real(poly, pairs, *a))
    ref = _evaluate(m, x, need_moments)
    # the deferred fallback ran on some pairs, once per pruning pass (one group of FALLBACK_BATCHES batches here)
    assert spy and sum(spy) > 0 and len(spy) <= 2
    monkeypatch.setattr(chunked, "FLAT_PAIRS", 7)      # many batches, each with few pairs
    monkeypatch.setattr(ef, "NODE_BLOCK", 40)          # many row blocks in every rule evaluation
    small = _evaluate(m, x, need_moments)
    assert torch.equal(small.terms, ref.terms)
    if need_moments:
        assert torch.equal(small.mom.mean, ref.mom.mean) and torch.equal(small.mom.covariance, ref.mom.covariance)


def test_deferred_fallback_masses_equal_the_per_batch_fallback():
    """The fallback masses computed once per chunk equal those of log_mass_fallback on each pair's padded edges
    (the per-batch computation they replace) to the last bit, and they do replace untrusted flux values."""
    m, x = _far_marginal()
    p = m._params()
    with torch.no_grad():
        order, _ = chunked.facet_order(p.c)
        p = p._replace(H=p.H.gather(1, order.unsqueeze(-1).expand(p.H.shape)), c=p.c.gather(1, order))
        rg = chunked.region_gaussians(p.A, p.b, x, p.obs_var, p.prior_var)
        wh = chunked.whiten_chunk(rg, p.H, p.c)
        n, R, F = wh.d.shape
        poly = chunked.region_polygons(wh, rg.scale_tril)
        tmpl = chunked.edge_template(poly)
        d, loc = wh.d.reshape(n * R, F), rg.loc.reshape(n * R, 2)
        pairs = torch.arange(n * R)[~poly.per_pair.repeat(n)]
        fm = chunked.flat_batch_mass(poly, tmpl, pairs, R, loc, d, d.amin(-1), False)
        rest = pairs.index_select(0, fm.rest)
        assert rest.numel() > 0
        deferred = chunked.fallback_pair_log_mass(poly, rest, R, loc, d)
        for k in range(rest.numel()):   # one pair at a time: the per-pair value
            one = rest[k:k + 1]
            edges = chunked.pair_edges(poly, one % R, loc.index_select(0, one), d.index_select(0, one))
            assert torch.equal(deferred[k:k + 1], chunked.log_mass_fallback(edges[:6], torch.arange(1)))
        flux = fm.log_mass.index_select(0, fm.rest)
        assert not torch.equal(flux, deferred)


def test_complex_row_gather_equals_index_select():
    x = torch.randn(50, 2, dtype=torch.float64)
    idx = torch.tensor([3, 0, 49, 3, 17])
    assert torch.equal(chunked._rows2(x, idx), x.index_select(0, idx))
    assert torch.equal(chunked._rows2(x.T.contiguous().T, idx), x.index_select(0, idx))   # non-contiguous input


@pytest.mark.parametrize("dense_elements", [None, 2 ** 12])
def test_estep_pairs_equal_those_of_the_marginal(dense_elements, monkeypatch):
    """e_step integrates its pruning chunks by evaluate_chunk directly (no copies of the dense results): its statistics
    equal, bitwise, those assembled from CPAMarginal._pairs (the concatenated chunks), with one pruning chunk and with
    several (a small DENSE_ELEMENTS)."""
    from pyro_cpa.infer import estep

    m, x = _far_marginal()
    if dense_elements is not None:
        monkeypatch.setattr(chunked, "DENSE_ELEMENTS", dense_elements)
    p = m._params()
    R, D, S = p.A.shape
    rows = chunked.chunk_rows(R, D, p.H.shape[1], S, m.chunk_size)
    assert (rows < x.shape[0]) == (dense_elements is not None)        # several pruning chunks, or one
    got = estep.e_step(m, x)
    with torch.no_grad():
        terms, _, mom, _, _ = m._pairs(x, need_moments=True, centred_covariance=False)
    live = torch.isfinite(terms)
    lp = terms.logsumexp(-1)
    e0 = (terms - lp.unsqueeze(-1)).exp()
    mean = torch.where(live.unsqueeze(-1), mom.mean, torch.zeros_like(mom.mean))
    C = torch.where(live[..., None, None], mom.covariance, torch.zeros_like(mom.covariance))
    assert torch.equal(got.loglik, lp)
    # Z's last row and column: Σ_n e0 [m, 1]; its S × S block: Σ_n e0 (m mᵀ + C) (the same sums over n by another
    # product, so to rounding)
    torch.testing.assert_close(got.Z[:, :S, S], torch.einsum("nr,nrk->rk", e0, mean), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(got.Z[:, S, S], e0.sum(0), rtol=1e-13, atol=1e-15)
    second = mean.unsqueeze(-1) * mean.unsqueeze(-2) + C
    torch.testing.assert_close(got.Z[:, :S, :S], torch.einsum("nr,nrkl->rkl", e0, second), rtol=1e-13, atol=1e-15)
