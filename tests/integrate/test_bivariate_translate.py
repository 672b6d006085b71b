"""S = 2 polygon edges translated instead of recomputed (issue 12): ``translate_edges`` of a polygon's edges
{G v <= ĉ} gives the edges of {G u <= ĉ − Gδ} for every translate δ.

Checked against the per-polygon ``polygon_edges`` path (the same polygon through other rounding) on cells of
line arrangements with every awkward kind of line (parallel strips, duplicates, nearly parallel lines), moved far
from the origin (|ĉ| and |δ| up to 1e5, cancelling in d = ĉ − Gδ), and against independent mpmath references
(rotated boxes: products of 1-D masses; general polygons: mpmath slicing) of the exact polygon the inputs
describe, i.e. including the rounding of ĉ and δ themselves.
"""
from __future__ import annotations

import math
import zlib

import mpmath as mp
import pytest
import torch
from polygon_reference import triangle

from pyro_cpa.integrate import std_moments
from pyro_cpa.integrate.bivariate import log_mass_2d, polygon_edges, std_moments_2d, translate_edges

EPS = torch.finfo(torch.float64).eps
ROUNDING_ULPS = 16.0
MIN_LOG_MASS = -1e6   # cells compared (see test_translated_edges_agree_with_per_polygon_edges)
"""Both paths integrate the polygon up to a perturbation of its offsets by ~eps·scale (scale = 1 + max|ĉ| + |δ|:
d = ĉ − Gδ carries that rounding, and so do the translated vertices), and ∂log P/∂d_i = r_i (the edge weights),
so |Δ log P| <= ROUNDING_ULPS · eps · scale · (1 + Σ_i r_i) and |Δ E[u]| likewise times (1 + |E[u]|) (measured:
<= 2.1 ulps on the sets below)."""
REF_DPS = 40
"""mpmath digits of the references (their own error is far below the tolerances)."""


def _cells(n: int, g: torch.Generator, kind: str):
    """The 2^n sign cells {s_j (g_j·u − o_j) <= 0} of n random lines (many are empty), with a degeneracy in
    lines 0 and 1: an exact strip, a duplicated line or two lines at angle 1e-8."""
    th = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    off = torch.randn(n, generator=g, dtype=torch.float64) * 1.5
    if kind == "strip":
        th[1], off[1] = th[0] + math.pi, -off[0] + 1e-2
    elif kind == "duplicate":
        th[1], off[1] = th[0], off[0]
    elif kind == "near_parallel":
        th[1] = th[0] + 1e-8
    G0 = torch.stack([th.cos(), th.sin()], -1)
    signs = torch.tensor([[1.0 if (k >> j) & 1 else -1.0 for j in range(n)] for k in range(2 ** n)],
                         dtype=torch.float64)
    return signs.unsqueeze(-1) * G0, signs * off


def _dot(G: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """g_j·δ per row, summed over the two coordinates in a fixed order (as the library does)."""
    return G[..., 0] * delta[..., None, 0] + G[..., 1] * delta[..., None, 1]


def _translated(G, c_hat, delta):
    """(d, edges of {G u <= d} by translation) for d = ĉ − Gδ."""
    d = c_hat - _dot(G, delta)
    e = torch.stack([-G[..., 1], G[..., 0]], -1)
    return d, translate_edges(polygon_edges(G, c_hat), d, _dot(e, delta))


def _edge_weight_sum(G, d):
    """Σ_i r_i = Σ_i |∂ log P/∂d_i| (the conditioning of log P in the offsets)."""
    dd = d.clone().requires_grad_(True)
    lp = log_mass_2d(G, dd)
    fin = torch.isfinite(lp)
    (gr,) = torch.autograd.grad(lp[fin].sum(), dd)
    return gr.abs().sum(-1)


def _scale(c_hat, delta):
    return 1.0 + torch.where(torch.isfinite(c_hat), c_hat.abs(), torch.zeros_like(c_hat)).amax(-1) + delta.norm(dim=-1)


def _tolerance(G, d, c_hat, delta):
    return ROUNDING_ULPS * EPS * _scale(c_hat, delta) * (1.0 + _edge_weight_sum(G, d))


@pytest.mark.parametrize("kind", ["generic", "strip", "duplicate", "near_parallel"])
@pytest.mark.parametrize("scale", [0.0, 10.0, 1e3, 1e5])
def test_translated_edges_agree_with_per_polygon_edges(kind, scale):
    """Cells moved by δ (|δ| ~ scale): ĉ = d0 + Gδ is large and cancels in d = ĉ − Gδ ~ d0; the translated and
    the recomputed edges give the same mass and moments within the rounding of d itself."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind}/{scale}".encode()))   # not hash(): salted per process
    G, d0 = _cells(5, g, kind)
    delta = torch.randn(G.shape[0], 2, generator=g, dtype=torch.float64) * scale
    c_hat = d0 + _dot(G, delta)
    d, edges = _translated(G, c_hat, delta)
    ref = std_moments_2d(G, d)
    got = std_moments_2d(G, d, edges=edges)
    # cells with log P below MIN_LOG_MASS (near-parallel lines ~1e8 out: log P ~ −1e16) are outside the
    # tolerance model: their vertex is ill-conditioned (1/|g_i × g_k| ~ 1e8) and either path may call a strip of
    # width below the rounding of its offsets empty; such terms weigh e^{−1e6} in any sum
    fin = torch.isfinite(ref.log_mass) & (ref.log_mass > MIN_LOG_MASS)
    fin_got = torch.isfinite(got.log_mass) & (got.log_mass > MIN_LOG_MASS)
    assert torch.equal(fin, fin_got) and fin.sum() >= 8   # same live cells, enough of them
    tol = _tolerance(G, d, c_hat, delta)[fin]
    assert ((got.log_mass - ref.log_mass)[fin].abs() <= tol).all()
    m_tol = tol * (1.0 + ref.mean[fin].norm(dim=-1))
    assert ((got.mean - ref.mean)[fin].abs().amax(-1) <= m_tol).all()
    # the mass alone (need_moments=False) and through the dispatcher take the same edges
    lm = std_moments(G, d, need_moments=False, edges=edges).log_mass
    assert torch.equal(lm, got.log_mass)
    if scale == 0.0:   # no translation: the edges are bitwise those of polygon_edges
        assert torch.equal(got.log_mass[fin], ref.log_mass[fin])


def test_a_wrong_shift_is_detected():
    """The tolerance above is tight: an edge parameter off by 1e-7 (or the shift's sign flipped) fails it."""
    g = torch.Generator().manual_seed(3)
    G, d0 = _cells(4, g, "generic")
    delta = torch.randn(G.shape[0], 2, generator=g, dtype=torch.float64) * 10.0
    c_hat = d0 + _dot(G, delta)
    d = c_hat - _dot(G, delta)
    e = torch.stack([-G[..., 1], G[..., 0]], -1)
    ref = log_mass_2d(G, d)
    fin = torch.isfinite(ref)
    tol = _tolerance(G, d, c_hat, delta)[fin]
    for shift in (_dot(e, delta) + 1e-7, -_dot(e, delta)):
        bad = log_mass_2d(G, d, edges=translate_edges(polygon_edges(G, c_hat), d, shift))
        assert ((bad - ref)[fin].abs() > tol).any()


# ------------------------------------------------------------------------------------------- mpmath references
def _mp_interval(a, b):
    """log of Φ(b) − Φ(a) in mpmath (reflected so that no 1 − 1 cancels)."""
    return mp.log(mp.ncdf(-a) - mp.ncdf(-b) if a + b > 0 else mp.ncdf(b) - mp.ncdf(a))


def _mp_box_log_mass(rot: float, lo, hi) -> float:
    """log P of the box {lo <= Rᵀu <= hi} (R the rotation by ``rot``): a product of 1-D masses."""
    with mp.workdps(REF_DPS):
        return float(sum(_mp_interval(mp.mpf(a), mp.mpf(b)) for a, b in zip(lo, hi)))


def _mp_polygon_log_mass(G: torch.Tensor, c_hat: torch.Tensor, delta: torch.Tensor) -> float:
    """log P(u ∈ {G (u + δ) <= ĉ}) for the float inputs taken exactly (mpmath, ``REF_DPS`` digits), by slices
    x = u_1: P = ∫ φ(x) [Φ(b(x)) − Φ(a(x))] dx on pieces between the vertices' x (where a, b are linear), each
    split into 16 for the tanh-sinh rule (the integrand scaled to O(1), since mp.quad's stopping rule is
    absolute). No row may have g_2 = 0 (every line bounds the slices)."""
    with mp.workdps(REF_DPS):
        rows = []
        for (g0, g1), c in zip(G.tolist(), c_hat.tolist()):
            g0, g1 = mp.mpf(g0), mp.mpf(g1)
            rows.append((g0, g1, mp.mpf(c) - g0 * mp.mpf(delta[0].item()) - g1 * mp.mpf(delta[1].item())))
        xs = []
        for i in range(len(rows)):
            for k in range(i + 1, len(rows)):
                (a0, a1, ad), (b0, b1, bd) = rows[i], rows[k]
                det = a0 * b1 - a1 * b0
                if det != 0:
                    xs.append((ad * b1 - a1 * bd) / det)
        xs = sorted(xs)

        def slice_bounds(x):
            lo, hi = -mp.inf, mp.inf
            for g0, g1, dd in rows:
                y = (dd - g0 * x) / g1
                if g1 > 0:
                    hi = min(hi, y)
                else:
                    lo = max(lo, y)
            return lo, hi

        def f(x):
            lo, hi = slice_bounds(x)
            return mp.npdf(x) * mp.exp(_mp_interval(lo, hi)) if lo < hi else mp.mpf(0)

        pts = [xs[0] - 40] + xs + [xs[-1] + 40]
        fine = []
        for a, b in zip(pts[:-1], pts[1:]):
            fine += [a + (b - a) * j / 16 for j in range(16)]
        fine.append(pts[-1])
        # mp.quad stops on an absolute error: scale the integrand to O(1) (far polygons have P ~ e^-458)
        scale = max(f((a + b) / 2) for a, b in zip(fine[:-1], fine[1:]))
        return float(mp.log(mp.quad(lambda x: f(x) / scale, fine)) + mp.log(scale))


def test_mpmath_polygon_reference_on_the_fartriangle():
    """The slicing reference above on the triangle (30,1), (31,3), (32,−1) rotated by 0.7 (its log P, from an
    independent 40-digit mpmath x-slicing, is in tests/integrate/test_bivariate.py)."""
    G, c = triangle([(30, 1), (31, 3), (32, -1)], 0.7)
    assert _mp_polygon_log_mass(G, c, torch.zeros(2, dtype=torch.float64)) == pytest.approx(-458.07842127602751959544,
                                                                                            rel=1e-15)


@pytest.mark.parametrize("rot,lo,hi,far", [
    (0.3, (-1.0, -0.5), (2.0, 1.5), 1e3),        # near the mean, region 1e3 away from v = 0
    (1.1, (3.0, -0.5), (3.7, 1.5), 1e4),
    (2.0, (31.0, -1.0), (31.2, 0.5), 1e3),       # far out in u too: log P ~ −480
    (0.7, (-2.0, 0.2), (-1.9999, 0.3), 1e5),     # thin
])
def test_translated_boxes_against_mpmath(rot, lo, hi, far):
    """A box given exactly in u; the inputs are the region's offsets ĉ = fl(d + Gδ) for a far δ (the rounding of
    a region far from the prior), then d = ĉ − Gδ; both paths against the exact 1-D mpmath product."""
    R = torch.tensor([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]], dtype=torch.float64)
    G = torch.cat([R.T, -R.T])
    d_exact = torch.tensor([hi[0], hi[1], -lo[0], -lo[1]], dtype=torch.float64)
    delta = far * torch.tensor([0.6, -0.8], dtype=torch.float64)
    c_hat = d_exact + _dot(G, delta)
    d, edges = _translated(G, c_hat, delta)
    ref = _mp_box_log_mass(rot, lo, hi)
    tol = _tolerance(G, d, c_hat, delta).item()
    assert abs(log_mass_2d(G, d, edges=edges).item() - ref) <= tol
    assert abs(log_mass_2d(G, d).item() - ref) <= tol


@pytest.mark.parametrize("V,rot,far", [
    ([(-1.0, -1.0), (2.0, -0.5), (0.0, 1.5)], 0.2, 1e3),
    ([(0.5, 0.1), (0.9, 0.15), (0.6, 0.4)], 1.3, 1e4),
    ([(30, 1), (31, 3), (32, -1)], 0.7, 1e3),     # log P ~ −458 after the translation back
    ([(5.0, -20.0), (6.0, -19.0), (5.5, -18.0)], 2.9, 1e5),
])
def test_translated_triangles_against_mpmath(V, rot, far):
    """Triangles given in u, whose region lies |δ| = far from the origin (ĉ = fl(d + Gδ)): the translated edges'
    log P against mpmath slicing of the exact polygon {G (u + δ) <= ĉ} of the float inputs."""
    G, d_exact = triangle(V, rot)
    delta = far * torch.tensor([-0.28, 0.96], dtype=torch.float64)
    c_hat = d_exact + _dot(G, delta)
    d, edges = _translated(G, c_hat, delta)
    ref = _mp_polygon_log_mass(G, c_hat, delta)
    tol = _tolerance(G, d, c_hat, delta).item()
    got = log_mass_2d(G, d, edges=edges).item()
    assert abs(got - ref) <= tol
    assert abs(log_mass_2d(G, d).item() - ref) <= tol


def test_translated_edges_keep_infinite_ends_and_safe_values():
    """Unbounded edges stay unbounded; edges that do not exist keep the safe range (0, 1); padding rows (G = 0,
    ĉ = +inf) stay padding."""
    G = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    c_hat = torch.tensor([[1.0, 2.0, 5.0, math.inf]], dtype=torch.float64)    # row 2 is redundant (x <= 5)
    delta = torch.tensor([[3.0, -4.0]], dtype=torch.float64)
    d, edges = _translated(G, c_hat, delta)
    direct = polygon_edges(G, d)
    assert torch.equal(edges.exists, direct.exists) and edges.exists.tolist() == [[True, True, False, False]]
    assert torch.equal(edges.t_lo, direct.t_lo) and torch.equal(edges.t_hi, direct.t_hi)
    assert torch.isinf(edges.t_lo[0, 0]) and torch.isinf(edges.t_hi[0, 1])
    assert edges.t_lo[0, 2] == 0.0 and edges.t_hi[0, 2] == 1.0
    assert torch.equal(edges.ds, direct.ds) and edges.ds[0, 3] == 0.0
