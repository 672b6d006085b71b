"""S = 2 fallbacks where the flux formula is refused: the small-polygon cubature (bivariate._cubature) against
independent mpmath references (40-digit slices, 1-D Gaussian moments in closed form), at the limits of its
node-count tiers, through the public entry points, batch-shape independence and gradients."""
from __future__ import annotations

import math

import pytest
import torch

from pyro_cpa.integrate import bivariate as bv
from pyro_cpa.integrate.bivariate import log_mass_2d, polygon_edges, std_moments_2d
from polygon_reference import mp_polygon_moments, polygon

# log P: relative error of P (absolute in log P), beyond the rounding of log P itself (~eps |log P|)
TOL_LOG_MASS = 3e-15
TOL_MEAN = 3e-15          # |Δ mean| / (1 + |mean|)
TOL_COV = 1e-13           # ‖Δ Cov‖₂ / ‖Cov‖₂ (well-conditioned polygons: the vertices' rounding is ~eps |c| / ρ)


def _triangle(centre, radius, rot):
    """Equilateral triangle: centre (R cos a, R sin a), circumradius ``radius``, rotated by ``rot``."""
    R, a = centre
    cx, cy = R * math.cos(a), R * math.sin(a)
    return polygon([(cx + radius * math.cos(rot + 2 * math.pi * k / 3), cy + radius * math.sin(rot + 2 * math.pi * k / 3))
                     for k in range(3)])


def _cubature(G, d, need_moments):
    E = polygon_edges(G.unsqueeze(0), d.unsqueeze(0))
    a = (E.Gs, E.ds, E.e, E.t_lo, E.t_hi, E.exists)
    c, lin, quad, bounded = bv._cubature_spread(*a)
    n = bv._cubature_tiers(lin, quad, bounded, bv.DEFAULT_CUBATURE_NODES, need_moments, bv.DEFAULT_CUBATURE_TOL)
    sel, lp, mean, cov = bv._cubature_small(*a, need_moments=need_moments)
    assert sel.all()
    return int(n), lp[0], (None if mean is None else mean[0]), (None if cov is None else cov[0]), (a, c)


def _check(lp, mean, cov, ref):
    lr, mr, cr = ref
    assert abs(lp - lr) <= TOL_LOG_MASS + 4 * 2.2e-16 * abs(lr)
    if mean is not None:
        assert (mean - mr).norm() <= TOL_MEAN * (1 + mr.norm())
        assert torch.linalg.matrix_norm(cov - cr, ord=2) <= TOL_COV * torch.linalg.matrix_norm(cr, ord=2)


# (need_moments, expected node count, centre distance R, circumradius ρ, a node count that does not meet the
# tolerances): lin = R ρ, quad = ρ²/2 just inside the tier's limits (the linear part limits the first cases, the
# quadratic part the last of each kind). The model is conservative for the linear part (fitted to the worst shapes):
# the equilateral triangle at lin = 6 needs 10 nodes where the model asks for 13.
TIER_CASES = [(False, 4, 2.3, 0.05, 2), (False, 7, 4.33, 0.3, 5), (False, 11, 0.5, 1.5, 9),
              (True, 5, 2.1, 0.055, 3), (True, 9, 2.86, 0.7, 7), (True, 13, 6.0, 1.0, 8), (True, 11, 0.3, 1.25, 9)]


@pytest.mark.parametrize("need_moments,tier,R,rho,fewer", TIER_CASES)
def test_cubature_meets_its_error_model_at_the_tier_limits(need_moments, tier, R, rho, fewer):
    G, d = _triangle((R, 0.4), rho, 0.3)
    n, lp, mean, cov, (a, c) = _cubature(G, d, need_moments)
    assert n == tier
    ref = mp_polygon_moments(G, d)
    _check(lp.item(), mean, cov, ref)
    # the test can fail: fewer nodes than the tier's do not meet the tolerances
    lp2, mean2, cov2 = bv._cubature(*a, c, fewer, need_moments)
    with pytest.raises(AssertionError):
        _check(lp2[0].item(), None if mean2 is None else mean2[0], None if cov2 is None else cov2[0], ref)


# small triangles a few units from the mean, like the regions of a [2,16,16,2] decoder that the flux formula refuses
# (its terms cancel by more than DEFAULT_FLUX_MAX_AMP): their rounding is ~eps |c| / ρ (the vertices), hence
TOL_THIN_LOG_MASS = 1e-12
TOL_THIN_COV = 1e-11
SMALL_CASES = [((0.7, 0.2), 3e-4, 0.1), ((1.6, 2.0), 3e-4, 1.3), ((3.1, -1.0), 2e-4, 2.9), ((2.4, 4.0), 2.5e-4, -0.6)]


def test_log_mass_of_small_triangles_refused_by_the_flux_formula():
    tri = [_triangle(*case) for case in SMALL_CASES]
    G, d = torch.stack([t[0] for t in tri]), torch.stack([t[1] for t in tri])
    E = polygon_edges(G, d)
    real = E.Gs.abs().sum(-1) > 0
    _, ok = bv._log_mass_flux(E.ds, E.t_lo, E.t_hi, E.exists, real)
    assert not ok.any()                                  # the fallback is exercised
    lp = log_mass_2d(G, d)
    for k, (Gk, dk) in enumerate(tri):
        ref = mp_polygon_moments(Gk, dk)[0]
        assert abs(lp[k].item() - ref) <= TOL_THIN_LOG_MASS


def test_moments_of_small_far_polygons_take_the_cubature():
    # a small triangle 8 units out and a small pentagon 5 units out: E[uuᵀ] − E[u]E[u]ᵀ cancels (cov_max_amp)
    G1, d1 = _triangle((8.0, 0.7), 0.05, 0.2)
    G2, d2 = polygon([(5.0 + 0.04 * math.cos(0.3 + 1.2566 * k), 0.5 + 0.03 * math.sin(0.3 + 1.2566 * k))
                       for k in range(5)])
    for G, d in ((G1, d1), (G2, d2)):
        r = std_moments_2d(G, d)
        lam = torch.linalg.eigvalsh(r.covariance)[0]
        assert (1 + r.mean.norm() ** 2) / lam > bv.DEFAULT_COV_MAX_AMP      # the centred fallback is exercised
        lr, mr, cr = mp_polygon_moments(G, d)
        assert abs(r.log_mass.item() - lr) <= TOL_THIN_LOG_MASS
        assert (r.mean - mr).norm() <= TOL_MEAN * (1 + mr.norm())
        assert torch.linalg.matrix_norm(r.covariance - cr, ord=2) <= TOL_THIN_COV * torch.linalg.matrix_norm(cr, ord=2)


def _mixed_batch():
    """Triangles for every path: flux near the mean, the cubature at several node counts, the slicing far out."""
    cases = [((0.3, 0.1), 1.0, 0.2), ((2.3, 0.4), 0.05, 0.3), ((4.33, 1.0), 0.3, 0.1), ((8.0, 2.0), 0.05, 0.7),
             ((0.5, 3.0), 1.5, 0.2), ((12.0, -0.5), 2.0, 0.4), ((30.0, 1.1), 1.0, 0.9)] + SMALL_CASES
    tri = [_triangle(*c) for c in cases]
    return torch.stack([t[0] for t in tri]), torch.stack([t[1] for t in tri])


def test_results_do_not_depend_on_the_batch():
    G, d = _mixed_batch()
    full = std_moments_2d(G, d)
    lp_full = log_mass_2d(G, d)
    perm = torch.tensor([5, 0, 9, 3, 10, 1, 7, 2, 8, 4, 6])
    permuted = std_moments_2d(G[perm], d[perm])
    for k in range(G.shape[0]):
        one = std_moments_2d(G[k], d[k])
        assert torch.equal(log_mass_2d(G[k], d[k]), lp_full[k])
        for f in ("log_mass", "mean", "covariance", "second_moment"):
            assert torch.equal(getattr(one, f), getattr(full, f)[k])
    for f in ("log_mass", "mean", "covariance"):
        assert torch.equal(getattr(permuted, f), getattr(full, f)[perm])


def test_gradients_through_the_cubature():
    G, d = _triangle((8.0, 0.7), 0.05, 0.2)
    E = polygon_edges(G.unsqueeze(0), d.unsqueeze(0))
    c, lin, quad, bounded = bv._cubature_spread(E.Gs, E.ds, E.e, E.t_lo, E.t_hi, E.exists)
    assert bv._cubature_tiers(lin, quad, bounded, bv.DEFAULT_CUBATURE_NODES, True, bv.DEFAULT_CUBATURE_TOL).item() > 0
    d = d.clone().requires_grad_(True)

    def f(dd):
        r = std_moments_2d(G, dd)
        return r.log_mass, r.mean, r.covariance * 1e3       # the covariance is ~1e-4: scaled to the tolerances

    assert torch.autograd.gradcheck(f, (d,))
