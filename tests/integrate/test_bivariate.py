"""S = 2: Owen's-T edge formula and log-space slicing against independent references."""
import itertools
import math

import mpmath as mp
import pytest
import torch
from polygon_reference import triangle
from scipy import integrate

from pyro_cpa.integrate.bivariate import log_mass_2d, std_moments_2d

INF = float("inf")


def poly(angles, d):
    th = torch.as_tensor(angles, dtype=torch.float64)
    return torch.stack([th.cos(), th.sin()], -1), torch.as_tensor(d, dtype=torch.float64)


def _interval_ref(a, b):
    a, b = mp.mpf(a), mp.mpf(b)
    P = mp.ncdf(-a) - mp.ncdf(-b) if a + b > 0 else mp.ncdf(b) - mp.ncdf(a)
    pa = mp.npdf(a) if mp.isfinite(a) else 0
    pb = mp.npdf(b) if mp.isfinite(b) else 0
    apa = a * pa if mp.isfinite(a) else 0
    bpb = b * pb if mp.isfinite(b) else 0
    return mp.log(P), (pa - pb) / P, 1 + (apa - bpb) / P


def rotated_box(rot, x0, x1, y0, y1):
    """Box [x0,x1]x[y0,y1] rotated by rot; reference moments from products of 1-D mpmath terms."""
    G, d = poly([rot, rot + math.pi, rot + math.pi / 2, rot - math.pi / 2], [x1, -x0, y1, -y0])
    keep = [i for i, v in enumerate([x1, -x0, y1, -y0]) if v != INF]
    G, d = G[keep], d[keep]
    lx, mx, sx = _interval_ref(x0, x1)
    ly, my, sy = _interval_ref(y0, y1)
    R = torch.tensor([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    m = R @ torch.tensor([float(mx), float(my)])
    S = R @ torch.tensor([[float(sx), float(mx * my)], [float(mx * my), float(sy)]]) @ R.T
    return G, d, float(lx + ly), m, S


@pytest.mark.parametrize("box", [(0.3, -1.0, 2.0, -0.5, 1.5), (1.1, 3.0, 3.7, -0.5, 1.5), (-0.4, 10.0, 10.5, -2.0, 3.0),
                                 (2.0, 31.0, 31.2, -1.0, 0.5), (0.7, -INF, -29.0, 2.0, INF), (2.5, 0.5, INF, -INF, 0.2)])
def test_rotated_boxes_near_and_far(box):
    G, d, lp, m, S = rotated_box(*box)
    r = std_moments_2d(G, d)
    assert r.log_mass.item() == pytest.approx(lp, rel=1e-12, abs=1e-14)
    scale = max(1.0, m.abs().max().item())
    torch.testing.assert_close(r.mean, m, rtol=0, atol=1e-11 * scale)
    torch.testing.assert_close(r.second_moment, S, rtol=0, atol=1e-10 * scale ** 2)


def test_far_triangle_log_mass_about_minus_458():
    # triangle (30,1), (31,3), (32,-1), rotated: mpmath (40 digits, x-slices) gives -458.07842127602751959544
    G, d = triangle([(30, 1), (31, 3), (32, -1)], 0.7)
    assert log_mass_2d(G, d).item() == pytest.approx(-458.07842127602751959544, rel=1e-13)


def test_triangle_moments_vs_dblquad():
    # triangle with vertices (-1,-1), (2,-0.5), (0,1.5)
    G, d = triangle([(-1.0, -1.0), (2.0, -0.5), (0.0, 1.5)])
    r = std_moments_2d(G, d)

    def lohi(x):
        lo = -1.0 + (x + 1.0) * (0.5 / 3.0)
        hi = -1.0 + (x + 1.0) * 2.5 if x <= 0 else 1.5 - x
        return lo, hi

    def mom(f):
        return integrate.dblquad(lambda y, x: f(x, y) * math.exp(-(x * x + y * y) / 2) / (2 * math.pi), -1.0, 2.0,
                                 lambda x: lohi(x)[0], lambda x: lohi(x)[1], epsabs=1e-13, epsrel=1e-11)[0]

    P = mom(lambda x, y: 1.0)
    assert r.log_mass.exp().item() == pytest.approx(P, rel=1e-11)
    torch.testing.assert_close(r.mean, torch.tensor([mom(lambda x, y: x), mom(lambda x, y: y)]) / P, rtol=1e-10, atol=1e-12)
    S = torch.tensor([[mom(lambda x, y: x * x), mom(lambda x, y: x * y)], [mom(lambda x, y: x * y), mom(lambda x, y: y * y)]]) / P
    torch.testing.assert_close(r.second_moment, S, rtol=1e-10, atol=1e-12)


def _arrangement_cells(n_lines, seed, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    th = torch.rand(n_lines, generator=g) * 2 * math.pi
    off = torch.randn(n_lines, generator=g) * scale
    G0 = torch.stack([th.cos(), th.sin()], -1)
    signs = torch.tensor(list(itertools.product([1.0, -1.0], repeat=n_lines)))
    return signs.unsqueeze(-1) * G0, signs * off


def test_tiling_masses_and_moments_sum_up():
    G, d = _arrangement_cells(6, 1)
    r = std_moments_2d(G, d)
    P = r.log_mass.exp()
    assert P.sum().item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close((P.unsqueeze(-1) * r.mean).sum(0), torch.zeros(2), rtol=0, atol=1e-12)
    torch.testing.assert_close((P[:, None, None] * r.second_moment).sum(0), torch.eye(2), rtol=0, atol=1e-12)
    assert torch.isfinite(r.mean).all() and torch.isfinite(r.second_moment).all()
    assert (torch.isneginf(r.log_mass)).any()  # some sign patterns are empty
    # the same tiling far from the mean: masses sum to Φ-tail free total 1 too
    r2 = std_moments_2d(G, d + (G @ torch.tensor([0.05, 0.02])))
    assert r2.log_mass.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_slicing_agrees_with_owens_t_formula_near_the_mean():
    G, d = _arrangement_cells(5, 3)
    a = log_mass_2d(G, d)
    b = log_mass_2d(G, d, switch_mass=2.0)  # force the slicing quadrature everywhere
    ok = torch.isfinite(a)
    torch.testing.assert_close(a[ok], b[ok], rtol=1e-12, atol=1e-13)
    assert torch.equal(torch.isfinite(b), ok)


def test_padding_batch_shapes_and_special_cases():
    G, d = poly([0.1, 2.2, 4.0], [1.0, 0.8, 0.5])
    ref = std_moments_2d(G, d)
    Gp = torch.cat([torch.zeros(1, 2), G, torch.zeros(2, 2)]).expand(2, 3, 6, 2)
    dp = torch.cat([torch.tensor([INF]), d, torch.tensor([INF, INF])]).expand(2, 3, 6)
    r = std_moments_2d(Gp, dp)
    assert r.log_mass.shape == (2, 3) and r.mean.shape == (2, 3, 2) and r.second_moment.shape == (2, 3, 2, 2)
    torch.testing.assert_close(r.log_mass, ref.log_mass.expand(2, 3), rtol=1e-15, atol=0)
    torch.testing.assert_close(r.second_moment, ref.second_moment.expand(2, 3, 2, 2), rtol=1e-14, atol=0)
    # duplicate constraint: no double counting
    Gd, dd = torch.cat([G, G[:1]]), torch.cat([d, d[:1]])
    torch.testing.assert_close(std_moments_2d(Gd, dd).log_mass, ref.log_mass, rtol=1e-15, atol=0)
    # empty polygon (y <= -1 and y >= 1) and the whole plane
    Ge, de = poly([math.pi / 2, -math.pi / 2], [-1.0, -1.0])
    e = std_moments_2d(Ge, de)
    assert e.log_mass.item() == -INF and e.mean.abs().max() == 0 and e.second_moment.abs().max() == 0
    w = std_moments_2d(torch.zeros(2, 2), torch.full((2,), INF))
    assert w.log_mass.item() == 0 and torch.equal(w.second_moment, torch.eye(2))
    # a wedge (unbounded): mass by the recession-cone angle, checked in polar coordinates
    Gw, dw = poly([0.0, 2.0], [0.3, -0.2])
    Pw = integrate.quad(lambda t: _ray_mass(Gw, dw, t), -math.pi, math.pi, points=[0.0, 1.0, 2.0, -2.0, -1.0], limit=200,
                        epsabs=1e-14)[0] / (2 * math.pi)
    assert std_moments_2d(Gw, dw).log_mass.exp().item() == pytest.approx(Pw, rel=1e-9)


def _ray_mass(G, d, t):
    """∫ over the ray at angle t of ρ e^{-ρ²/2} 1_ω dρ (convex: ω ∩ ray is an interval)."""
    u = (math.cos(t), math.sin(t))
    lo, hi = 0.0, INF
    for (g0, g1), dj in zip(G.tolist(), d.tolist()):
        gu = g0 * u[0] + g1 * u[1]
        if gu > 0:
            hi = min(hi, dj / gu)
        elif gu < 0:
            lo = max(lo, dj / gu)
        elif dj < 0:
            return 0.0
    if lo >= hi:
        return 0.0
    return math.exp(-lo * lo / 2) - (math.exp(-hi * hi / 2) if hi < INF else 0.0)


@pytest.mark.parametrize("d0,angles", [([1.0, 0.8, 0.5], [0.1, 2.2, 4.0]),     # near: Owen's T
                                       ([-7.0, 9.0, 8.5], [0.1, 2.2, 4.0]),    # far: slicing
                                       ([0.3, -0.2], [0.0, 2.0])])             # unbounded wedge
def test_gradcheck_wrt_d_and_angles(d0, angles):
    def f(d, th):
        G = torch.stack([th.cos(), th.sin()], -1)
        r = std_moments_2d(torch.cat([G, torch.zeros(1, 2)]), torch.cat([d, torch.tensor([INF])]))
        return r.log_mass, r.mean, r.second_moment

    d = torch.tensor(d0, requires_grad=True)
    th = torch.tensor(angles, requires_grad=True)
    assert torch.autograd.gradcheck(f, (d, th), eps=1e-5, atol=1e-6, rtol=1e-6)


def test_gradient_of_log_mass_is_divergence_theorem():
    # ∂P/∂d_i = φ(d_i) ΔΦ_i: compare autograd with the mean formula E[u] = -Σ g_i ∂P/∂d_i / P
    G, d = poly([0.1, 2.2, 4.0], [-7.0, 9.0, 8.5])
    d.requires_grad_(True)
    r = std_moments_2d(G, d)
    (grad,) = torch.autograd.grad(r.log_mass, d)
    torch.testing.assert_close(-(grad.unsqueeze(-1) * G).sum(0), r.mean.detach(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("shift,scale", [(0.0, 1.5), (4.0, 1.0), (12.0, 3.0), (40.0, 0.5)])
def test_flux_formula_agrees_with_slicing_on_random_cells(shift, scale):
    # cells of a random line arrangement, moved away from the mean: the flux formula (default path) against
    # the forced log-space slicing quadrature
    G, d = _arrangement_cells(6, 11, scale=scale)
    d = d - shift * (G @ torch.tensor([0.6, 0.8]))
    a = log_mass_2d(G, d)
    b = log_mass_2d(G, d, switch_mass=2.0)
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    ok = torch.isfinite(a)
    torch.testing.assert_close(a[ok], b[ok], rtol=1e-12, atol=1e-11)


def test_thin_slivers_near_and_far():
    # thin rotated boxes (width 1e-3 .. 1e-6): exact references from 1-D mpmath terms
    for x0, w, rot in [(-0.3, 1e-3, 0.4), (2.0, 1e-5, 1.3), (9.0, 1e-6, -2.0), (0.0, 1e-4, 0.0)]:
        G, dd, lp, m, S = rotated_box(rot, x0, x0 + w, -1.0, 2.5)
        r = std_moments_2d(G, dd)
        assert r.log_mass.item() == pytest.approx(lp, rel=1e-12, abs=1e-10)
        scale = max(1.0, m.abs().max().item())
        torch.testing.assert_close(r.mean, m, rtol=0, atol=1e-9 * scale)


def test_need_moments_false_gives_the_same_log_mass():
    G, d = _arrangement_cells(5, 3)
    full = std_moments_2d(G, d)
    fast = std_moments_2d(G, d, need_moments=False)
    assert torch.equal(full.log_mass, fast.log_mass)
    assert fast.mean.shape == full.mean.shape and fast.second_moment.shape == full.second_moment.shape
    assert fast.mean.abs().max() == 0 and fast.second_moment.abs().max() == 0
