"""S = 3 flux formula (facets -> edges -> 1-D integrals) against independent references: rotated prisms
(triangle x interval, mpmath quadrature of the triangle), SciPy's trivariate normal CDF on trihedral cones,
Monte Carlo with confidence bounds on random ReLU cells, finite differences for the gradients."""
import math

import mpmath as mp
import pytest
import torch

from pyro_cpa.integrate.trivariate import (DEFAULT_FACET_TIE_TOL, DEFAULT_FLUX_MAX_AMP, DEFAULT_FLUX_NODES,
                                           _compact_rows, _facets, _quad, std_moments_3d)

INF = float("inf")
MASS_RTOL = 1e-12      # relative error of P (absolute error of log P) claimed by the module doc ...
LOGP_COND = 1e-14      # ... plus the float64 conditioning of log P far out (inputs known to eps·r, gradient ~r)
MOMENT_ATOL = 1e-11    # moments, in units of max(1, |E[u]|) (resp. its square)


def _flux_trusted(G, d):
    """Whether the flux formula (not the slicing fallback) gives log P for each polytope of a flat batch."""
    Gc, dc = _compact_rows(G, d)
    with torch.no_grad():
        fac = _facets(Gc, dc, facet_tie_tol=DEFAULT_FACET_TIE_TOL,
                      quad=_quad(dict(flux_nodes=DEFAULT_FLUX_NODES, flux_max_amp=DEFAULT_FLUX_MAX_AMP)))
    return fac.ok


def _triangle_ref(V):
    """log mass, mean (2,) and second moment (2, 2) of N(0, I_2) on the triangle with vertices V (3, 2), by
    mpmath: ∫ φ(x) [Φ(b(x)) − Φ(a(x))] dx (and the x/y moments) split at the vertices' x."""
    mp.mp.dps = 20
    V = [(mp.mpf(float(x)), mp.mpf(float(y))) for x, y in V]
    xs = sorted(v[0] for v in V)

    def bounds(x):
        ys = []
        for i in range(3):
            (x0, y0), (x1, y1) = V[i], V[(i + 1) % 3]
            if min(x0, x1) <= x <= max(x0, x1) and x0 != x1:
                ys.append(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
        return min(ys), max(ys)

    def mom(x, k):
        a, b = bounds(x)
        if k == "P":
            return mp.npdf(x) * (mp.ncdf(b) - mp.ncdf(a))
        if k == "x":
            return x * mom(x, "P")
        if k == "xx":
            return x * x * mom(x, "P")
        if k == "y":
            return mp.npdf(x) * (mp.npdf(a) - mp.npdf(b))
        if k == "xy":
            return x * mom(x, "y")
        # E[y² 1] over the slice: ΔΦ + aφ(a) − bφ(b)
        return mp.npdf(x) * (mp.ncdf(b) - mp.ncdf(a) + a * mp.npdf(a) - b * mp.npdf(b))

    # split where x²/2 crosses multiples of 1/2 as well (mp.quad misjudges its error on a Gaussian peak: 1e-4
    # relative on ∫_24^26 φ unsplit), so that φ(x) falls by at most e^{-1/2} per piece
    pts = set(xs)
    for x0, x1 in zip(xs[:-1], xs[1:]):
        lo, hi = (min(abs(x0), abs(x1)) if x0 * x1 > 0 else 0), max(abs(x0), abs(x1))
        for k in range(int(lo * lo) + 1, int(hi * hi) + 1):
            for sg in (-1, 1):
                if x0 < sg * mp.sqrt(k) < x1:
                    pts.add(sg * mp.sqrt(k))
    xs = sorted(pts)
    q = {k: mp.quad(lambda x: mom(x, k), xs) for k in ("P", "x", "y", "xx", "xy", "yy")}
    P = q["P"]
    mean = [float(q["x"] / P), float(q["y"] / P)]
    sec = [[float(q["xx"] / P), float(q["xy"] / P)], [float(q["xy"] / P), float(q["yy"] / P)]]
    return float(mp.log(P)), torch.tensor(mean, dtype=torch.float64), torch.tensor(sec, dtype=torch.float64)


def _interval_ref(a, b):
    mp.mp.dps = 30
    a, b = mp.mpf(a), mp.mpf(b)
    P = mp.ncdf(-a) - mp.ncdf(-b) if a + b > 0 else mp.ncdf(b) - mp.ncdf(a)
    return float(mp.log(P)), float((mp.npdf(a) - mp.npdf(b)) / P), float(1 + (a * mp.npdf(a) - b * mp.npdf(b)) / P)


def rotated_prism(seed, V, lo, hi):
    """{triangle V in (u1, u2)} x [lo, hi] in u3, rotated by a random orthogonal R: (G, d, log P, E[u], E[uuᵀ])."""
    V = torch.tensor(V, dtype=torch.float64)
    rows, offs = [], []
    for i in range(3):
        p0, p1 = V[i], V[(i + 1) % 3]
        n = torch.tensor([p1[1] - p0[1], -(p1[0] - p0[0])])
        if (n * (V[(i + 2) % 3] - p0)).sum() > 0:
            n = -n
        n = n / n.norm()
        rows.append(torch.cat([n, torch.zeros(1)]))
        offs.append((n * p0).sum())
    rows += [torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, -1.0])]
    offs += [torch.tensor(hi), torch.tensor(-lo)]
    R, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    G = torch.stack(rows) @ R.T
    d = torch.stack([torch.as_tensor(o, dtype=torch.float64) for o in offs])
    lt, mt, st = _triangle_ref(V)
    li, mi, si = _interval_ref(lo, hi)
    m = torch.cat([mt, torch.tensor([mi], dtype=torch.float64)])
    S = torch.zeros(3, 3, dtype=torch.float64)
    S[:2, :2] = st
    S[2, 2] = si
    S[:2, 2] = S[2, :2] = mt * mi
    return G, d, lt + li, R @ m, R @ S @ R.T


PRISMS = [  # (triangle, lo, hi): containing the mean, off to one side, far out, a long thin triangle
    ([[-1.0, -0.8], [1.5, -0.3], [0.2, 1.7]], -0.7, 1.2),
    ([[0.4, 0.3], [2.5, 0.1], [1.1, 2.2]], -2.0, 0.3),
    ([[24.0, -1.0], [26.0, 0.5], [24.5, 1.5]], -1.0, 2.0),
    ([[0.5, -3.0], [0.9, -3.0], [0.6, 3.0]], 0.5, 1.5),
]


@pytest.mark.parametrize("V,lo,hi", PRISMS)
def test_rotated_prisms_against_mpmath(V, lo, hi):
    G, d, lp, m, S = rotated_prism(3, V, lo, hi)
    assert bool(_flux_trusted(G.unsqueeze(0), d.unsqueeze(0)).all())   # the new path, not the fallback
    r = std_moments_3d(G, d)
    assert abs(r.log_mass.item() - lp) <= MASS_RTOL + LOGP_COND * abs(lp)
    scale = max(1.0, m.abs().max().item())
    torch.testing.assert_close(r.mean, m, rtol=0, atol=MOMENT_ATOL * scale)
    torch.testing.assert_close(r.second_moment, S, rtol=0, atol=MOMENT_ATOL * scale ** 2)


def test_trihedral_cones_against_scipy():
    """Three planes: P = Φ₃(d; G Gᵀ), SciPy's trivariate normal CDF (absolute accuracy ~1e-8 at abseps 1e-10)."""
    from scipy.stats import multivariate_normal
    g = torch.Generator().manual_seed(7)
    for _ in range(4):
        G = torch.randn(3, 3, generator=g, dtype=torch.float64)
        G = G / G.norm(dim=-1, keepdim=True)
        d = torch.randn(3, generator=g, dtype=torch.float64)
        assert bool(_flux_trusted(G.unsqueeze(0), d.unsqueeze(0)).all())
        ref = multivariate_normal(mean=[0.0] * 3, cov=(G @ G.T).numpy(), abseps=1e-10, releps=0).cdf(d.numpy())
        assert std_moments_3d(G, d).log_mass.exp().item() == pytest.approx(ref, abs=5e-8)


@pytest.mark.slow
def test_relu_cells_against_monte_carlo():
    """Random cells of a [3, 8, 8] ReLU partition (the benchmark's pairs): mass and mean within 5 standard errors
    of 4·10⁶ Monte Carlo draws."""
    from pyro_cpa import linear_regions
    from pyro_cpa.nn import mlp
    net = mlp([3, 8, 8], seed=0)
    H, c = (t.detach().double() for t in linear_regions(net).polytopes())
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(H.shape[0], generator=g)[:6]
    H, c = H[idx], c[idx]
    s = H.norm(dim=-1)
    real = (s > 0) & torch.isfinite(c)
    G = torch.where(real.unsqueeze(-1), H / torch.where(real, s, torch.ones_like(s)).unsqueeze(-1), torch.zeros_like(H))
    d = torch.where(real, c / torch.where(real, s, torch.ones_like(s)), torch.full_like(c, INF))
    r = std_moments_3d(G, d)
    n = 4_000_000
    u = torch.randn(n, 3, generator=g, dtype=torch.float64)
    checked = 0
    for k in range(G.shape[0]):
        inside = ((u @ G[k][real[k]].T) <= d[k][real[k]]).all(-1)
        p = inside.double().mean().item()
        if p < 1e-3:
            continue
        checked += 1
        P = r.log_mass[k].exp().item()
        assert abs(P - p) <= 5 * math.sqrt(P * (1 - P) / n)
        sel = u[inside]
        se = sel.std(0) / math.sqrt(sel.shape[0])
        assert bool(((sel.mean(0) - r.mean[k]).abs() <= 5 * se).all())
    assert checked >= 3


@pytest.mark.parametrize("moments", [False, True])
def test_gradcheck_prism(moments):
    """Analytic gradients (log P and, through the facet masses, the mean) against finite differences on a
    non-box polytope, w.r.t. the offsets and the angle of one facet."""
    G, d, *_ = rotated_prism(5, PRISMS[1][0], PRISMS[1][1], PRISMS[1][2])
    G = torch.cat([G, torch.zeros(1, 3, dtype=torch.float64)])
    d = torch.cat([d, torch.tensor([INF], dtype=torch.float64)]).requires_grad_(True)
    th = torch.zeros(1, dtype=torch.float64, requires_grad=True)

    def f(dx, t):
        c, s = torch.cos(t), torch.sin(t)
        z = torch.zeros(1, dtype=torch.float64)
        e3 = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        Rz = torch.stack([torch.cat([c, -s, z]), torch.cat([s, c, z]), e3])
        r = std_moments_3d(torch.cat([G[:1] @ Rz.T, G[1:]]), dx)
        return (r.log_mass, r.mean) if moments else r.log_mass

    assert torch.autograd.gradcheck(f, (d, th), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_flux_and_slicing_agree_and_batch_invariant():
    """The flux formula against the slicing quadrature (forced by flux_max_amp = 0) on random cells, and
    bitwise the same result for a polytope alone, in a batch and after padding."""
    from pyro_cpa import linear_regions
    from pyro_cpa.nn import mlp
    net = mlp([3, 8, 8], seed=2)
    H, c = (t.detach().double() for t in linear_regions(net).polytopes())
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(H.shape[0], (12,), generator=g)
    loc = torch.randn(12, 3, generator=g, dtype=torch.float64)
    H, c = H[idx], c[idx] - (H[idx] * loc.unsqueeze(-2)).sum(-1)
    s = H.norm(dim=-1)
    real = (s > 0) & torch.isfinite(c)
    G = torch.where(real.unsqueeze(-1), H / torch.where(real, s, torch.ones_like(s)).unsqueeze(-1), torch.zeros_like(H))
    d = torch.where(real, c / torch.where(real, s, torch.ones_like(s)), torch.full_like(c, INF))
    flux = std_moments_3d(G, d)
    sliced = std_moments_3d(G, d, flux_max_amp=0.0, need_moments=False)
    assert bool(_flux_trusted(G, d).float().mean() > 0.5)
    torch.testing.assert_close(flux.log_mass, sliced.log_mass, rtol=0, atol=2e-11)
    one = std_moments_3d(G[3], d[3])
    Gp = torch.cat([G, torch.zeros(12, 2, 3, dtype=torch.float64)], 1)
    dp = torch.cat([d, torch.full((12, 2), INF, dtype=torch.float64)], 1)
    pad = std_moments_3d(Gp.reshape(3, 4, -1, 3), dp.reshape(3, 4, -1))
    assert torch.equal(one.log_mass, flux.log_mass[3]) and torch.equal(one.mean, flux.mean[3])
    assert torch.equal(pad.log_mass.reshape(-1), flux.log_mass) and torch.equal(pad.mean.reshape(-1, 3), flux.mean)
