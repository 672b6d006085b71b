"""S = 2 kernel: polygons grouped by their number of real facets give the same values as the padded path.

``polygon_edges`` groups batches of >= ``_GROUP_MIN_ROWS`` polygons by facet count (no pairwise work on padding)
and runs smaller batches in one padded pass. Both must agree bitwise on rows with mixed counts, padding at any
position, 0-real-facet rows, empty and unbounded polygons, and every result must be independent of how the batch
is split or ordered. The edges are also checked against a brute-force per-line interval computation.
"""
import math

import pytest
import torch

import pyro_cpa.integrate.bivariate as biv
from pyro_cpa.integrate.bivariate import log_mass_2d, polygon_edges, std_moments_2d

INF = float("inf")
F = 8
EDGE_RTOL = 1e-12
"""Brute-force edge end points vs polygon_edges (both are a few flops from the inputs; vertices of nearly parallel
lines are excluded from the random rows, so 1e-12 relative is loose)."""


def _row(angles, offsets, slots):
    G = torch.zeros(F, 2)
    d = torch.full((F,), INF)
    for a, o, s in zip(angles, offsets, slots):
        G[s] = torch.tensor([math.cos(a), math.sin(a)])
        d[s] = o
    return G, d


def _mixed_batch(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [
        _row([], [], []),                                           # whole plane
        _row([0.3], [0.5], [4]),                                    # half-plane
        _row([0.0, 2.0], [0.3, -0.2], [6, 1]),                      # unbounded wedge
        _row([0.0, math.pi], [-1.0, 0.5], [2, 5]),                  # empty: opposite half-planes
        _row([0.0, math.pi], [0.2, 0.3], [7, 0]),                   # strip
        _row([0.1, 2.2, 4.0, 0.1], [1.0, 0.8, 0.5, 1.0], [0, 3, 5, 6]),  # duplicate line
        _row([0.1, 2.2, 4.0], [-7.0, 9.0, 8.5], [1, 2, 7]),         # far out: slicing
        _row([0.1, 2.2, 4.0, 1.0], [1.0, 0.8, 0.5, 5.0], [0, 1, 2, 3]),  # redundant facet
    ]
    G = torch.stack([r[0] for r in rows])
    d = torch.stack([r[1] for r in rows])
    zero_row = (torch.zeros(1, F, 2), torch.full((1, F), INF))
    zero_row[1][0, 3] = -1.0                                       # 0ᵀu <= -1: empty
    Gs, ds = [G, zero_row[0]], [d, zero_row[1]]
    m = n - G.shape[0] - 1
    k = torch.randint(1, F + 1, (m,), generator=g)
    ang = torch.rand(m, F, generator=g) * 2 * math.pi
    off = torch.randn(m, F, generator=g) * 2.0 + 1.0
    keep = torch.rand(m, F, generator=g).argsort(-1) < k.unsqueeze(-1)   # k real facets at random slots
    Gs.append(torch.where(keep.unsqueeze(-1), torch.stack([ang.cos(), ang.sin()], -1), torch.zeros(m, F, 2)))
    ds.append(torch.where(keep, off, torch.full_like(off, INF)))
    return torch.cat(Gs), torch.cat(ds)


def _split(fn, G, d, size):
    outs = [fn(G[i:i + size], d[i:i + size]) for i in range(0, G.shape[0], size)]
    if isinstance(outs[0], torch.Tensor):
        return torch.cat(outs)
    cat = [torch.cat(f) for f in zip(*outs)]
    return tuple(cat) if type(outs[0]) is tuple else type(outs[0])(*cat)


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y) or (x.is_floating_point() and torch.equal(x.isnan(), y.isnan())
                                     and torch.equal(x.nan_to_num(), y.nan_to_num()))


def test_grouped_edges_equal_padded_edges_bitwise():
    G, d = _mixed_batch()
    assert G.shape[0] >= biv._GROUP_MIN_ROWS
    counts = (torch.isfinite(d)).sum(-1)
    assert len(counts.unique()) == F + 1                           # every facet count 0..F occurs
    grouped = polygon_edges(G, d)
    padded = _split(polygon_edges, G, d, 100)                      # 100 < _GROUP_MIN_ROWS: one padded pass each
    _assert_same(grouped, padded)
    empty, whole = grouped[6], grouped[7]
    assert bool(empty[3]) and bool(empty[8]) and bool(whole[0]) and not bool(whole[1])
    exists = grouped[5]
    assert torch.isposinf(grouped[4][:3][exists[:3]]).any()        # unbounded edges survive the grouping
    perm = torch.randperm(G.shape[0], generator=torch.Generator().manual_seed(1))
    _assert_same(tuple(x[perm] for x in grouped), polygon_edges(G[perm], d[perm]))


def test_grouped_edges_match_brute_force_intervals():
    G, d = _mixed_batch(n=600, seed=2)
    Gs, ds, e, t_lo, t_hi, exists, empty, whole = polygon_edges(G, d)
    Gn, dn = G.numpy(), d.numpy()
    checked = 0
    for b in range(9, 200):                                        # random rows: no exact ties by construction
        real = [i for i in range(F) if math.isfinite(dn[b, i])]
        for i in real:
            gi = Gn[b, i]
            ei = (-gi[1], gi[0])
            lo, hi, feasible = -INF, INF, True
            for k in real:
                if k == i:
                    continue
                gk = Gn[b, k]
                s = ei[0] * gk[0] + ei[1] * gk[1]
                num = dn[b, k] - dn[b, i] * (gi[0] * gk[0] + gi[1] * gk[1])
                if abs(s) < 1e-9:                                  # parallel: the line holds or fails as a whole
                    feasible &= num >= 0
                elif s > 0:
                    hi = min(hi, num / s)
                else:
                    lo = max(lo, num / s)
            ok = feasible and hi > lo and not bool(empty[b])
            assert bool(exists[b, i]) == ok, (b, i)
            if ok:
                for got, want in ((t_lo[b, i].item(), lo), (t_hi[b, i].item(), hi)):
                    assert got == want or math.isclose(got, want, rel_tol=EDGE_RTOL, abs_tol=EDGE_RTOL)
                checked += 1
    assert checked > 300


@pytest.mark.parametrize("kw", [dict(), dict(cov_max_amp=None)])
def test_mass_and_moments_independent_of_grouping_and_order(kw):
    G, d = _mixed_batch(n=700, seed=3)
    full = std_moments_2d(G, d, **kw)
    _assert_same(full, _split(lambda a, b: std_moments_2d(a, b, **kw), G, d, 64))
    perm = torch.randperm(G.shape[0], generator=torch.Generator().manual_seed(4))
    _assert_same(tuple(x[perm] for x in full), std_moments_2d(G[perm], d[perm], **kw))
    lm = log_mass_2d(G, d)
    _assert_same((lm,), (_split(log_mass_2d, G, d, 64),))
    torch.testing.assert_close(lm, full.log_mass, rtol=0, atol=0)
    assert torch.isneginf(lm[[3, 8]]).all() and lm[0] == 0 and torch.isfinite(lm[9:]).sum() > 400
