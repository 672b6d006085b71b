"""pyro_cpa.integrate.edge_flux.log_edge_flux against mpmath (issue 12, "S=2 kernel").

I(h, p, q) = ∫_p^q exp(−(t² − p²)/2) h/(h² + t²) dt by Legendre pieces with certified node counts, a singularity-
subtracted first piece near the origin and Gauss–Laguerre tails (module doc). The reference is mpmath's
tanh-sinh quadrature (:func:`_ref_log_I`, 25 digits). Edges: the random
audit set (h log-uniform in [1e-3, 1e3], p = 0 or log-uniform in [1e-4, 1e2], lengths log-uniform in [1e-6, 1e2]
or infinite) plus one edge per branch of the algorithm and its boundaries. Measured on 3,000 random edges and
2,000 half-edges of the S = 2 log p benchmark: max |Δ log I| 2.0e-15 (median 2.0e-16; the fixed 12-node rule it
replaces: 1.9e-15, median 1.9e-16), of which all but 5.8e-16 is the float64 spacing of log I itself.
"""
import math

import mpmath as mp
import numpy as np
import pytest
import torch

from pyro_cpa.integrate.edge_flux import (LAG_LOG_TOL, LAG_NODES, LAG_T2_GRID, DEFAULT_LAG_T2,
                                          log_edge_flux)

REL_TOL = 1e-15        # |Δ log I| (relative error of I) beyond one spacing of log I; measured max 5.8e-16
LOG_ULPS = 1.0         # the returned log I is a float64: allow this many ulps of |log I| on top
COARSE_FLOOR = 1e-12   # rules sized for tol = 1e-6 (low base levels) must miss by more than this somewhere
AUDIT_CASES = 150

# one edge per branch: (h, p, q)
BRANCHES = [
    (0.3043, 1.3602, 1.3963),             # near the origin, short: subtracted first piece with few nodes
    (0.9, 0.0, 0.999),                    # subtracted first piece of full length
    (1e-3, 0.0, math.inf), (1e3, 0.0, math.inf), (1.4, 0.0, math.inf),   # Legendre pieces + Laguerre tail from t² = 24
    (0.5, 0.3, 5.2), (2.0, 0.0, 6.7),     # several Legendre pieces, no tail (z_q < 14)
    (0.7, 2.0, 6.0),                      # Legendre pieces then a Laguerre difference (z_q >= z_0 + 2)
    (4.67, 59.69134882020855, 59.71265190519205),   # far, short: two Legendre pieces far out (z_q = 1.27)
    (0.8, 6.0, 6.0 + 1e-9), (0.8, 300.0, 300.0 + 1e-12),                # far, tiny length
    (1.0, 6.0, math.sqrt(36.0 + 3.99)), (1.0, 6.0, math.sqrt(36.0 + 4.01)),   # z_q just below / above 2
    (0.2, 6.0, 9.0), (5e-3, 50.0, math.inf), (3.0, 500.0, 501.0),      # far: Laguerre (difference)
    (0.5, math.sqrt(24.0) - 1e-9, math.inf), (0.5, math.sqrt(24.0) + 1e-9, math.inf),   # around p² = T²
    (0.5, 4.0, math.sqrt(16.0 + 2 * 45.0)), (0.5, 4.0, math.sqrt(16.0 + 2 * 45.1)),    # q at z = 45 (dropped tail)
    (1e-3, 1e-4, 1e-4 + 1e-6), (1e3, 1e-4, 1e2), (2e-3, 98.8, 98.8 + 1e-6),
]


def _edges(n, seed):
    rng = np.random.default_rng(seed)
    h = 10 ** rng.uniform(-3, 3, n)
    p = np.where(rng.uniform(size=n) < 0.3, 0.0, 10 ** rng.uniform(-4, 2, n))
    q = np.where(rng.uniform(size=n) < 0.3, np.inf, p + 10 ** rng.uniform(-6, 2, n))
    fixed = [(1e-3, 0.0, np.inf), (1e3, 0.0, np.inf), (1e-3, 0.5, 2.0), (1.4, 0.0, np.inf), (0.9, 1.05, 3.0),
             (0.3, 98.8, 98.8 + 1e-6), (5e-3, 50.0, np.inf)]
    fh, fp, fq = (np.array(v) for v in zip(*fixed))
    return np.concatenate([h, fh]), np.concatenate([p, fp]), np.concatenate([q, fq])


def _ref_log_I(h, p, q):
    """mpmath tanh-sinh quadrature, split at h·3^k (the poles ±ih) and at Gaussian-decay points."""
    mp.mp.dps = 25
    h, p = mp.mpf(h), mp.mpf(p)
    top = mp.sqrt(p * p + 2 * 60)                              # tail beyond: relative e^-60
    qq = top if math.isinf(q) else min(mp.mpf(q), top)
    pts = {p, qq}
    pts.update(c for c in (h * mp.mpf(3) ** k for k in range(-1, 14)) if p < c < qq)
    pts.update(c for c in (mp.sqrt(p * p + 2 * z) for z in (0.25, 1, 3, 7, 14, 25, 40)) if p < c < qq)
    val = mp.quad(lambda t: mp.exp(-(t - p) * (t + p) / 2) * h / (h * h + t * t), sorted(pts))
    return mp.log(val)


def _err(got: torch.Tensor, ref) -> np.ndarray:
    """|Δ log I| minus LOG_ULPS spacings of log I (the float64 representation of the result)."""
    out = []
    for g, r in zip(got.tolist(), ref):
        out.append(float(abs(mp.mpf(g) - r)) - LOG_ULPS * np.spacing(abs(float(r))))
    return np.array(out)


@pytest.fixture(scope="module")
def audit_set():
    h, p, q = _edges(AUDIT_CASES, seed=2026)
    bh, bp, bq = (np.array(v) for v in zip(*BRANCHES))
    h, p, q = np.concatenate([h, bh]), np.concatenate([p, bp]), np.concatenate([q, bq])
    ref = [_ref_log_I(*a) for a in zip(h, p, q)]
    return tuple(torch.tensor(v, dtype=torch.float64) for v in (h, p, q)) + (ref,)


def test_against_mpmath(audit_set):
    h, p, q, ref = audit_set
    err = _err(log_edge_flux(h, p, q), ref)
    i = int(err.argmax())
    assert err.max() <= REL_TOL, (err.max(), h[i].item(), p[i].item(), q[i].item())


def test_audit_detects_a_loose_rule(audit_set):
    h, p, q, ref = audit_set
    loose = log_edge_flux(h, p, q, tol=1e-6, gl_levels=(3, 40), sub_levels=(3, 40), lag_levels=(2, 40))
    assert _err(loose, ref).max() > COARSE_FLOOR


def test_each_value_depends_on_its_own_edge_only(audit_set):
    h, p, q, _ = audit_set
    full = log_edge_flux(h, p, q)
    single = torch.cat([log_edge_flux(h[i:i + 1], p[i:i + 1], q[i:i + 1]) for i in range(len(h))])
    perm = torch.randperm(len(h), generator=torch.Generator().manual_seed(0))
    assert torch.equal(full, single)
    assert torch.equal(full[perm], log_edge_flux(h[perm], p[perm], q[perm]))
    twice = log_edge_flux(torch.cat([h, h.flip(0)]), torch.cat([p, p.flip(0)]), torch.cat([q, q.flip(0)]))
    assert torch.equal(twice[:len(h)], full) and torch.equal(twice[len(h):], full.flip(0))


def test_uses_fewer_nodes_than_fixed_twelve_per_piece():
    """Node counts are a property of the inputs and the tables (not of the CPU). The rule it replaces took 12
    nodes per piece at z = 0.5, 2, 5, 10, 18, 30, 45 (10 for a subtracted first piece): here 10 + 24 + 48 + 96 +
    96 = 274 nodes; now one piece at 10, two, four, and Laguerre tails far out."""
    count = {}
    h = torch.tensor([0.6, 1.1, 1.5, 1.5, 1.2], dtype=torch.float64)
    p = torch.tensor([0.2, 1.5, 3.0, 7.0, 30.0], dtype=torch.float64)
    q = torch.tensor([0.35, 1.9, 5.0, math.inf, math.inf], dtype=torch.float64)
    log_edge_flux(h, p, q, _count=count)
    assert count["nodes"] <= 274 // 2


@pytest.mark.parametrize("rows", [(0, 2, 8), pytest.param(tuple(range(len(LAG_T2_GRID))), marks=pytest.mark.slow)])
def test_laguerre_table_against_mpmath(rows):
    """LAG_NODES[i][j] Gauss–Laguerre nodes (mpmath's own rule, 30 digits) integrate the tail
    ∫_0^∞ e^{−s} h/((h² + t0² + 2s) sqrt(t0² + 2s)) ds within exp(LAG_LOG_TOL[j]) at t0² = LAG_T2_GRID[i]."""
    hs = (0.0, 1e-3, 0.3, 3.0, 100.0)
    with mp.workdps(30):
        for i in rows:
            t02 = mp.mpf(LAG_T2_GRID[i])
            for hv in hs:
                h = mp.mpf(hv)
                g = (lambda s: 1 / (t02 + 2 * s) ** mp.mpf(1.5)) if hv == 0 else \
                    (lambda s: h / ((h * h + t02 + 2 * s) * mp.sqrt(t02 + 2 * s)))
                ref = mp.quad(lambda s: mp.exp(-s) * g(s), [0, 1, 5, 20, 60, mp.inf])
                for j, lt in enumerate(LAG_LOG_TOL):
                    rule = mp.gauss_quadrature(LAG_NODES[i][j], "laguerre")
                    val = mp.fsum(w * g(x) for x, w in zip(*rule))
                    assert abs(val / ref - 1) < mp.exp(lt), (i, hv, j)


def test_bad_configuration_raises():
    h = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="lag_t2"):
        log_edge_flux(h, 0 * h, 2 * h, lag_t2=LAG_T2_GRID[0] / 2)
    with pytest.raises(ValueError, match="lag_min_dz"):
        log_edge_flux(h, 0 * h, 2 * h, lag_min_dz=0.0)
    assert DEFAULT_LAG_T2 >= LAG_T2_GRID[0]
