"""Perturbation tests for the exact S = 2 and S = 3 integrals (issue 10).

Random polygons of every awkward kind (bounded, unbounded, thin slivers, nearly and exactly parallel lines,
duplicated lines, the origin on an edge or a vertex, F = 1 .. 20 with redundant rows) are evaluated as
given, unbatched (F, 2), batched, chunked, with every input nudged by a few ulps and rotated by a random
orthogonal matrix; the answers must agree with each other and with independent references:

* tilings: the cells of a line arrangement partition the plane, so Σ P = 1, Σ P E[u] = 0, Σ P E[uuᵀ] = I
  (exact values, whatever the cells);
* rotated boxes: products of 1-D masses and moments in mpmath;
* mpmath quadrature (slices, 30 digits) for the cases of issue 10: nearly parallel adjacent edges (D3),
  thin wedges at the origin (D4), far thin wedges (D5), far boxes (covariance, D2).

The same generators and checks run at a larger size in ``benchmarks/audit_integrals.py``.
"""
from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch

import pyro_cpa.integrate.bivariate as biv
from pyro_cpa.integrate.bivariate import log_mass_2d, std_moments_2d
from pyro_cpa.integrate.trivariate import std_moments_3d

INF = float("inf")
EPS = torch.finfo(torch.float64).eps
# documented tolerances
BATCH_RTOL = 1e-13        # unbatched vs batched vs chunked: identical operations per polygon
ROT_ATOL = 1e-11          # rotation: the same polygon through different rounding (log P; moments scaled)
NUDGE_ATOL = 1e-9         # a few ulps on every input: log P moves by the conditioning only
NUDGE_ATOL_NEAR_PAR = 1e-6   # lines at angle δ >= 1e-9: vertices move by eps·|d|/δ along the edges
TILING_ATOL = 1e-11       # Σ P, Σ P E[u], Σ P E[uuᵀ] over the cells of an arrangement
BOX_RTOL = 1e-11          # rotated boxes vs 1-D mpmath products (log P)
MOMENT_ATOL = 1e-10       # E[u] under rotation, relative to 1 + |E[u]| ...
MOMENT_RTOL_PER_NAT = 1e-12   # ... plus this per nat of |log P| (edge weights exp(log φ − log P) lose eps·|log P|)
MOMENT_MIN_LOGP = -1e6
FAR_LOGP = -1e10

KINDS = ("generic", "parallel", "duplicate", "near_parallel", "origin_edge", "origin_vertex", "far", "sliver")


# ----------------------------------------------------------------------------------------------- generators
def arrangement(kind: str, n: int, g: torch.Generator, pad_to: int = 0):
    """Cells {s_j (g_j·u − o_j) <= 0} of a random arrangement of n lines: G (2^n, F, 2), d (2^n, F).

    ``kind`` injects a degeneracy into lines 0 and 1; ``pad_to`` appends redundant rows (copies of the cell's
    own constraints, offsets increased by 1) up to F = pad_to, which exercises F >= 15.
    """
    th = torch.rand(n, generator=g) * 2 * math.pi
    off = torch.randn(n, generator=g) * 1.5
    if n >= 2:
        if kind == "parallel":
            th[1] = th[0] + (math.pi if torch.rand(1, generator=g).item() < 0.5 else 0.0)
            off[1] = off[0] + 10 ** (-3 + 3 * torch.rand(1, generator=g).item())
        elif kind == "duplicate":
            th[1], off[1] = th[0], off[0]
        elif kind == "near_parallel":
            th[1] = th[0] + 10 ** (-9 + 3 * torch.rand(1, generator=g).item())
        elif kind == "origin_vertex":
            off[1] = 0.0
        elif kind == "sliver":
            off[1] = off[0] + 10 ** (-6 + 3 * torch.rand(1, generator=g).item())
            th[1] = th[0] + 10 ** (-4 + 2 * torch.rand(1, generator=g).item())
    if kind in ("origin_edge", "origin_vertex"):
        off[0] = 0.0
    G0 = torch.stack([th.cos(), th.sin()], -1)
    if kind == "far":
        off = off + G0 @ (torch.randn(2, generator=g) * 12.0)
    signs = torch.tensor([[1.0 if (k >> j) & 1 else -1.0 for j in range(n)] for k in range(2 ** n)])
    G = signs.unsqueeze(-1) * G0
    d = signs * off
    if pad_to > n:
        reps = pad_to - n
        idx = torch.arange(reps) % n
        G = torch.cat([G, G[:, idx]], 1)
        d = torch.cat([d, d[:, idx] + 1.0 + torch.rand(reps, generator=g)], 1)
    return G, d


def random_rotation(g: torch.Generator) -> torch.Tensor:
    a = torch.rand(1, generator=g).item() * 2 * math.pi
    R = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return R if torch.rand(1, generator=g).item() < 0.5 else R @ torch.diag(torch.tensor([1.0, -1.0]))


def nudge(x: torch.Tensor, g: torch.Generator, ulps: int = 4) -> torch.Tensor:
    k = torch.randint(-ulps, ulps + 1, x.shape, generator=g).to(x.dtype)
    return torch.where(torch.isfinite(x), x * (1.0 + k * EPS), x)


def _interval_mp(a, b):
    """log P, mean, variance of N(0, 1) on (a, b), in mpmath (40 digits)."""
    with mp.workdps(40):
        a, b = mp.mpf(a), mp.mpf(b)
        P = mp.ncdf(-a) - mp.ncdf(-b) if a + b > 0 else mp.ncdf(b) - mp.ncdf(a)
        pa = mp.npdf(a) if mp.isfinite(a) else mp.mpf(0)
        pb = mp.npdf(b) if mp.isfinite(b) else mp.mpf(0)
        apa = a * pa if mp.isfinite(a) else mp.mpf(0)
        bpb = b * pb if mp.isfinite(b) else mp.mpf(0)
        m = (pa - pb) / P
        return float(mp.log(P)), float(m), float(1 + (apa - bpb) / P - m * m)


def rotated_box(rot, lo, hi):
    """{lo <= Rᵀu <= hi} in S = len(lo) dimensions (R: rotation by ``rot`` (S = 2) or an orthogonal matrix)."""
    S = len(lo)
    R = torch.tensor([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]]) if S == 2 else rot
    G = torch.cat([R.T, -R.T])
    d = torch.cat([torch.tensor(hi, dtype=torch.float64), -torch.tensor(lo, dtype=torch.float64)])
    keep = torch.isfinite(d)
    refs = [_interval_mp(a, b) for a, b in zip(lo, hi)]
    m = torch.tensor([r[1] for r in refs])
    C = torch.diag(torch.tensor([r[2] for r in refs]))
    return G[keep], d[keep], sum(r[0] for r in refs), R @ m, R @ C @ R.T


def random_boxes(num: int, g: torch.Generator, S: int = 2):
    out = []
    for _ in range(num):
        lo, hi = [], []
        for _ in range(S):
            c = (torch.rand(1, generator=g).item() - 0.5) * (60.0 if torch.rand(1, generator=g).item() < 0.3 else 6.0)
            w = 10 ** (-6 + 7 * torch.rand(1, generator=g).item())
            a, b = c - w / 2, c + w / 2
            u = torch.rand(1, generator=g).item()
            if u < 0.15:
                a = -INF
            elif u < 0.3:
                b = INF
            lo.append(a)
            hi.append(b)
        if S == 2:
            rot = torch.rand(1, generator=g).item() * 2 * math.pi
        else:
            rot, _ = torch.linalg.qr(torch.randn(S, S, generator=g))
        out.append(rotated_box(rot, lo, hi) + (min(y - x for x, y in zip(lo, hi)),))
    return out


def cases_2d(num_arrangements: int, seed: int):
    """(kind, G, d) for num_arrangements arrangements of 1..6 lines, half of them padded to 12..20 rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(num_arrangements):
        kind = KINDS[k % len(KINDS)]
        n = [1, 2, 3, 4, 5, 6, 6, 6][k % 8] if kind == "generic" else 6
        pad = 12 + int(torch.randint(0, 9, (1,), generator=g)) if k % 2 else 0
        G, d = arrangement(kind, n, g, pad)
        out.append((kind, G, d))
    return out


def check_tiling(G, d, r):
    near = r.log_mass > FAR_LOGP        # P = 0 in float beyond; moments there are not meaningful
    r = type(r)(*(x[near] for x in r))
    P = r.log_mass.exp()
    assert torch.isfinite(r.mean).all() and torch.isfinite(r.second_moment).all()
    assert abs(P.sum().item() - 1.0) <= TILING_ATOL * len(P)
    torch.testing.assert_close((P[:, None] * r.mean).sum(0), torch.zeros(2), rtol=0, atol=TILING_ATOL * len(P))
    torch.testing.assert_close((P[:, None, None] * r.second_moment).sum(0), torch.eye(2), rtol=0,
                               atol=TILING_ATOL * len(P))


def _close_logp(a, b, atol, rtol=0.0):
    # log P < FAR_LOGP (polygons ~1e5 sd out, only from nearly parallel lines) may come out as -inf
    fa, fb = torch.isfinite(a) & (a > FAR_LOGP), torch.isfinite(b) & (b > FAR_LOGP)
    assert torch.equal(fa, fb), "a perturbation changed which polygons are empty"
    err = (a[fa] - b[fb]).abs()
    tol = atol + rtol * torch.maximum(a[fa].abs(), b[fb].abs())
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max()):.3e}"


# ---------------------------------------------------------------------------------------------------- S = 2
def test_tilings_nudges_rotations_batches_2d(monkeypatch):
    """~10^4 cells: tilings are exact; batch shape, chunking, ulp nudges and rotations do not matter."""
    g = torch.Generator().manual_seed(7)
    cases = cases_2d(200, seed=7)
    total = 0
    singles = 0
    for kind, G, d in cases:
        r = std_moments_2d(G, d)
        check_tiling(G, d, r)
        total += len(d)
        # unbatched (F, 2) for a few cells of every arrangement
        for i in torch.randperm(len(d), generator=g)[:2].tolist():
            one = std_moments_2d(G[i], d[i])
            _close_logp(one.log_mass.reshape(1), r.log_mass[i].reshape(1), 0.0, BATCH_RTOL)
            torch.testing.assert_close(one.mean, r.mean[i], rtol=BATCH_RTOL, atol=BATCH_RTOL)
            singles += 1
        # a few ulps on every input
        Gn, dn = nudge(G, g), nudge(d, g)
        ill = kind in ("near_parallel", "sliver")      # ill-conditioned vertices: rounding moves them
        tol = NUDGE_ATOL_NEAR_PAR if ill else NUDGE_ATOL
        _close_logp(log_mass_2d(Gn, dn), r.log_mass, tol, tol)
        # rotation (and reflection) invariance
        Q = random_rotation(g)
        rr = std_moments_2d(G @ Q.T, d)
        tol = NUDGE_ATOL_NEAR_PAR if ill else ROT_ATOL
        _close_logp(rr.log_mass, r.log_mass, tol, tol)
        # moments: relative error ~eps·|log P|·(cancellation among the edge terms); cells beyond ~1e3 sd
        # (log P < -MOMENT_MIN_LOGP, only from nearly parallel lines) are excluded
        ok = torch.isfinite(r.log_mass) & (r.log_mass > MOMENT_MIN_LOGP)
        scale = 1.0 + r.mean[ok].abs().amax(-1)
        err = (rr.mean[ok] - r.mean[ok] @ Q.T).abs().amax(-1) / scale
        mtol = (NUDGE_ATOL_NEAR_PAR if ill else MOMENT_ATOL) + MOMENT_RTOL_PER_NAT * r.log_mass[ok].abs()
        assert bool((err <= mtol).all()), float((err - mtol).max())
    assert total >= 10_000 and singles >= 300
    # chunking: the same batch through chunks of 61
    G, d = cases[3][1], cases[3][2]
    full = std_moments_2d(G, d)
    monkeypatch.setattr(biv, "_CHUNK", 61)
    chunked = std_moments_2d(G.repeat(3, 1, 1), d.repeat(3, 1))
    _close_logp(chunked.log_mass, full.log_mass.repeat(3), 0.0, BATCH_RTOL)


def test_issue_example_rotated_box_unbatched():
    # issue 10: rot 0.3, [-1, 2] x [-0.5, 1.5] unbatched gave -0.3166 (true -0.6707)
    G, d, lp, m, C = rotated_box(0.3, [-1.0, -0.5], [2.0, 1.5])
    for Gx, dx in [(G, d), (G[None], d[None]), (G.expand(5, 4, 2), d.expand(5, 4))]:
        r = std_moments_2d(Gx, dx)
        assert torch.allclose(r.log_mass, torch.tensor(lp), rtol=1e-13, atol=0)


def test_random_rotated_boxes_vs_1d_products():
    g = torch.Generator().manual_seed(3)
    boxes = random_boxes(300, g)
    F = max(b[0].shape[0] for b in boxes)
    G = torch.stack([torch.cat([b[0], torch.zeros(F - b[0].shape[0], 2)]) for b in boxes])
    d = torch.stack([torch.cat([b[1], torch.full((F - b[1].shape[0],), INF)]) for b in boxes])
    lp = torch.tensor([b[2] for b in boxes])
    r = std_moments_2d(G, d)
    # conditioning: the rounded normals move a side of a box of width w at distance |d| by ~eps |d|, i.e. a
    # relative change ~eps·|d|/w of the mass (1e-9 for w = 1e-6 at |d| = 30)
    cond = torch.tensor([16 * EPS * (1 + b[1].abs().max().item()) / b[5] for b in boxes])
    err = (r.log_mass - lp).abs()
    assert bool((err <= 1e-12 + BOX_RTOL * lp.abs() + cond).all()), float((err - cond).max())
    for k, (_, _, lpk, m, C, w) in enumerate(boxes):
        scale = max(1.0, m.abs().max().item())
        tol = MOMENT_ATOL + MOMENT_RTOL_PER_NAT * abs(lpk) + 10 * cond[k].item()
        torch.testing.assert_close(r.mean[k], m, rtol=0, atol=tol * scale)
        # covariance: relative to its own size (no E[uu] − mm cancellation)
        torch.testing.assert_close(r.covariance[k], C, rtol=0, atol=1e-8 * C.abs().max().item())
        assert torch.linalg.eigvalsh(r.covariance[k]).min() > 0


# ------------------------------------------------------------------------------- mpmath quadrature (issue D2–D5)
def mp_polygon(G, d, dps=30, nsub=16):
    """log P, mean, covariance of N(0, I_2) on {G u <= d} by mpmath slicing along the nearest-point direction.

    The float inputs are taken as exact. Vertices from all pairs of lines (clipped by a box of radius
    max|d| + 15, negligible mass beyond); slices v1 from the nearest point to sqrt(r² + 160), each piece
    between vertices split into ``nsub`` sub-pieces; slice intervals from the half-planes directly.
    """
    rows = [(mp.mpf(a), mp.mpf(b), mp.mpf(c)) for (a, b), c in zip(G.tolist(), d.tolist()) if c != INF]
    with mp.workdps(dps):
        R = max(abs(c) for _, _, c in rows) + 15
        box = [(mp.mpf(1), mp.mpf(0), R), (mp.mpf(-1), mp.mpf(0), R), (mp.mpf(0), mp.mpf(1), R), (mp.mpf(0), mp.mpf(-1), R)]
        allr = rows + box
        tol = mp.mpf(10) ** (-dps + 8)
        V = []
        for i in range(len(allr)):
            for j in range(i + 1, len(allr)):
                (a1, b1, c1), (a2, b2, c2) = allr[i], allr[j]
                det = a1 * b2 - a2 * b1
                if det == 0:
                    continue
                x, y = (c1 * b2 - c2 * b1) / det, (a1 * c2 - a2 * c1) / det
                if all(a * x + b * y <= c + tol * (1 + abs(c)) for a, b, c in allr):
                    V.append((x, y))
        inside = all(c >= 0 for _, _, c in rows)
        # nearest point: minimise over vertices and feet of perpendiculars that are feasible
        cand = V + [(c * a / (a * a + b * b), c * b / (a * a + b * b)) for a, b, c in rows]   # feet (|g| != 1 by ulps)
        cand = [p for p in cand if all(a * p[0] + b * p[1] <= c + tol * (1 + abs(c)) for a, b, c in allr)]
        p = min(cand, key=lambda q: q[0] ** 2 + q[1] ** 2)
        r = mp.mpf(0) if inside else mp.sqrt(p[0] ** 2 + p[1] ** 2)
        rot = mp.mpf(0) if inside else mp.atan2(p[1], p[0])
        c, s = mp.cos(rot), mp.sin(rot)
        cons = [(c * a + s * b, -s * a + c * b, cc) for a, b, cc in rows]
        xmax = mp.sqrt(r * r + 160)
        xmin = -xmax if inside else r
        xs = sorted({min(max(c * x + s * y, xmin), xmax) for x, y in V} | {xmin, xmax})
        pts = []
        for a, b in zip(xs[:-1], xs[1:]):
            if b > a:
                pts += [a + (b - a) * k / nsub for k in range(nsub)]
        pts.append(xs[-1])

        ptol = mp.mpf(10) ** (-dps + 5)   # rows parallel to the slices (|b| at rounding level of the rotation)

        def bounds(x):
            lo, hi = -mp.inf, mp.inf
            for a, b, cc in cons:
                if b > ptol:
                    hi = min(hi, (cc - a * x) / b)
                elif b < -ptol:
                    lo = max(lo, (cc - a * x) / b)
                elif a * x > cc:
                    return None
            return (lo, hi) if hi > lo else None

        def moments(x):  # (mass, ∫y, ∫y²) of the slice, times φ(x)
            bd = bounds(x)
            if bd is None:
                return mp.mpf(0), mp.mpf(0), mp.mpf(0)
            lo, hi = bd
            P = mp.ncdf(hi) - mp.ncdf(lo) if lo + hi < 0 else mp.ncdf(-lo) - mp.ncdf(-hi)
            fl, fh = (mp.npdf(t) if mp.isfinite(t) else mp.mpf(0) for t in (lo, hi))
            tl, th = (t * mp.npdf(t) if mp.isfinite(t) else mp.mpf(0) for t in (lo, hi))
            return mp.npdf(x) * P, mp.npdf(x) * (fl - fh), mp.npdf(x) * (P + tl - th)

        def quad(f):
            return sum(mp.quad(f, [a, b]) for a, b in zip(pts[:-1], pts[1:]))

        P = quad(lambda x: moments(x)[0])
        m1 = quad(lambda x: x * moments(x)[0]) / P
        m2 = quad(lambda x: moments(x)[1]) / P
        c11 = quad(lambda x: (x - m1) ** 2 * moments(x)[0]) / P
        c12 = quad(lambda x: (x - m1) * (moments(x)[1] - m2 * moments(x)[0])) / P
        c22 = quad(lambda x: moments(x)[2] - 2 * m2 * moments(x)[1] + m2 * m2 * moments(x)[0]) / P
        Rm = mp.matrix([[c, -s], [s, c]])
        Cm = Rm * mp.matrix([[c11, c12], [c12, c22]]) * Rm.T
        mean = torch.tensor([float(c * m1 - s * m2), float(s * m1 + c * m2)])
        cov = torch.tensor([[float(Cm[0, 0]), float(Cm[0, 1])], [float(Cm[1, 0]), float(Cm[1, 1])]])
        return float(mp.log(P)), mean, cov


def _lines_through(vertices):
    """(G, d) of the convex polygon with the given counter-clockwise vertices."""
    G, d = [], []
    n = len(vertices)
    for i in range(n):
        p, q = vertices[i], vertices[(i + 1) % n]
        nrm = torch.tensor([q[1] - p[1], -(q[0] - p[0])])
        nrm = nrm / nrm.norm()
        G.append(nrm)
        d.append(float(nrm @ p))
    return torch.stack(G), torch.tensor(d)


def _wedge(apex, direction, angle):
    a = direction
    n1 = torch.tensor([math.cos(a + math.pi / 2 - angle / 2), math.sin(a + math.pi / 2 - angle / 2)])
    n2 = torch.tensor([math.cos(a - math.pi / 2 + angle / 2), math.sin(a - math.pi / 2 + angle / 2)])
    G = torch.stack([n1, n2])
    return G, G @ torch.as_tensor(apex, dtype=torch.float64)


@pytest.mark.slow
def test_issue_cases_vs_mpmath_quadrature():
    """D3 (nearly parallel adjacent edges), D4 (thin wedges at the origin), D5 (far thin wedges: mass, mean,
    covariance), each against mpmath quadrature of the float inputs taken as exact."""
    cases = []
    # D3: a pentagon with one edge replaced by two edges at an angle ~1e-10 (bumped midpoint)
    V = [torch.tensor([2.5, 0.3]), torch.tensor([0.4, 2.9]), torch.tensor([-1.8, 0.8]), torch.tensor([-0.7, -1.9]),
         torch.tensor([1.9, -1.4])]
    p, q = V[0], V[1]
    nrm = torch.tensor([q[1] - p[1], -(q[0] - p[0])])
    V.insert(1, 0.5 * (p + q) + nrm * 1e-10)
    cases.append(("D3", *_lines_through(V), 1e-12, None))
    # D4: thin wedges with the apex next to the origin (the slicing fallback lost ~2e-5 of the mass)
    cases.append(("D4", *_wedge([3e-6, -1e-6], 1.1, 3e-6), 1e-10, None))
    G, d = _wedge([-2e-5, 1e-5], -2.3, 5e-5)
    cases.append(("D4", torch.cat([G, torch.tensor([[math.cos(-2.3), math.sin(-2.3)]])]), torch.cat([d, torch.tensor([7.0])]),
                  1e-10, None))
    # D5: far thin wedges (mean was (-233, 948) vs (-24.7, 6.6); covariance cancelled)
    cases.append(("D5", *_wedge([-22.0, 5.5], 0.35, 6e-10), 1e-6, 1e-5))
    cases.append(("D5", *_wedge([9.0, -13.0], 2.6, 1e-7), 1e-7, 1e-5))
    for name, G, d, tol, cov_tol in cases:
        lp, m, C = mp_polygon(G, d)
        r = std_moments_2d(G, d)
        # backward stability: the error is within the spread of results for inputs nudged by a few ulps
        # (a wedge of angle 6e-10 moves its apex by eps·|d|/angle ~ 1e-5 per ulp)
        g = torch.Generator().manual_seed(0)
        nudged = [std_moments_2d(nudge(G, g), nudge(d, g)) for _ in range(4)]
        s_lp = max(abs(x.log_mass.item() - r.log_mass.item()) for x in nudged)
        s_m = max((x.mean - r.mean).abs().max().item() for x in nudged)
        assert abs(r.log_mass.item() - lp) <= 2 * s_lp + tol * max(1.0, abs(lp)), (name, r.log_mass.item(), lp)
        assert (r.mean - m).abs().max().item() <= 2 * s_m + 1e-9 * max(1.0, m.abs().max().item()), (name, r.mean, m)
        if cov_tol is not None:
            # positive definite (its thin direction is ~1e-17: E[uuᵀ] − E[u]E[u]ᵀ gave negative eigenvalues),
            # entries accurate relative to the largest one
            assert torch.linalg.eigvalsh(r.covariance).min() > 0
            assert (r.covariance - C).abs().max() <= cov_tol * C.abs().max(), (name, r.covariance, C)


def test_far_boxes_covariance_is_psd_and_accurate():
    # D2 for S = 2: whitened distance 50 .. 5000, where E[uuᵀ] − E[u]E[u]ᵀ loses eps·r⁴
    for rot, lo, hi in [(0.3, [50.0, -1.0], [51.0, 2.0]), (1.0, [500.0, 3.0], [500.5, 4.0]),
                        (2.0, [5000.0, -2.0], [5001.0, INF]), (0.7, [-30.0, 10.0], [-29.99, 10.3])]:
        G, d, lp, m, C = rotated_box(rot, lo, hi)
        r = std_moments_2d(G, d)
        assert r.log_mass.item() == pytest.approx(lp, rel=1e-12)
        r_dist = max(abs(x) for x in lo + hi if x != INF)
        ev = torch.linalg.eigvalsh(r.covariance)
        assert ev.min() > 0
        Lc = torch.linalg.cholesky(C)
        E = torch.linalg.solve_triangular(Lc, torch.linalg.solve_triangular(Lc, r.covariance - C, upper=False).T,
                                          upper=False)
        assert E.abs().max() <= 1e-14 * r_dist ** 2 + 1e-12


# ---------------------------------------------------------------------------------------------- gradients
def _theta_poly(d, th, pad=True):
    G = torch.stack([th.cos(), th.sin()], -1)
    if pad:  # a padding row: its 0/0 in an unused branch gave NaN gradients (issue 10, exact MLE)
        G, d = torch.cat([G, torch.zeros(1, 2)]), torch.cat([d, torch.tensor([INF])])
    return G, d


@pytest.mark.parametrize("d0,angles,switch_mass,branch", [
    ([1.0, 0.8, 0.5], [0.1, 2.2, 4.0], biv.DEFAULT_SWITCH_MASS, "flux"),
    ([1e-7, 0.8, 0.5], [0.1, 2.2, 4.0], biv.DEFAULT_SWITCH_MASS, "owens"),        # origin next to an edge
    ([-7.0, 9.0, 8.5], [0.1, 2.2, 4.0], 2.0, "slicing"),
    ([0.3, -0.2], [0.0, 2.0], 2.0, "slicing"),                                     # unbounded wedge
    ([2e-6, 2e-6, 3.0], [0.0, math.pi + 1e-5, 1.6], biv.DEFAULT_SWITCH_MASS, "slicing"),  # sliver at the origin
])
def test_gradcheck_every_branch_2d(d0, angles, switch_mass, branch):
    G0, dd0 = _theta_poly(torch.tensor(d0), torch.tensor(angles))
    # the branch really is taken
    ed = biv.polygon_edges(G0[None], dd0[None])
    real = torch.ones(1, len(dd0), dtype=torch.bool)
    _, ok = biv._log_mass_flux(ed[1], ed[3], ed[4], ed[5], real & ed[5])
    if branch == "flux":
        assert ok.all()
    elif switch_mass <= 1.0:
        assert not ok.any()
        if switch_mass <= 1.0:
            P = biv._mass_owens(ed[1], ed[2], ed[3], ed[4], ed[5], ed[7], 20)
            assert (P >= switch_mass).all() == (branch == "owens")

    def f(d, th):
        G, dd = _theta_poly(d, th)
        r = std_moments_2d(G, dd, switch_mass=switch_mass)
        if thin:  # finite differences of the moments of a 4e-6-wide sliver are noise (value error / step)
            return r.log_mass
        return r.log_mass, r.mean, r.second_moment, r.covariance

    thin = min(abs(x) for x in d0) < 1e-5 and branch == "slicing"
    d = torch.tensor(d0, requires_grad=True)
    th = torch.tensor(angles, requires_grad=True)
    # finite-difference steps well below the smallest length of the polygon (1e-7: origin offset, sliver width)
    step = 1e-9 if min(abs(x) for x in d0) < 1e-3 else 1e-6
    assert torch.autograd.gradcheck(f, (d, th), eps=step, atol=1e-6, rtol=1e-5)


def test_no_nan_gradients_from_padding_and_empty_polygons():
    G, d = arrangement("generic", 4, torch.Generator().manual_seed(1), pad_to=7)
    G = torch.cat([G, torch.zeros(G.shape[0], 2, 2)], 1)
    d = torch.cat([d, torch.full((d.shape[0], 2), INF)], 1).requires_grad_(True)
    for sm in (biv.DEFAULT_SWITCH_MASS, 2.0):
        r = std_moments_2d(G, d, switch_mass=sm)
        ok = torch.isfinite(r.log_mass)
        (grad,) = torch.autograd.grad(r.log_mass[ok].sum() + r.mean.sum() + r.covariance.sum(), d)
        assert torch.isfinite(grad).all()


def exact_mle_nonfinite_steps(steps: int) -> int:
    """Exact MLE (collapse + SVI, Adam 1e-2) on a [2, 16, 16, 2] ReLU decoder and noisy_circle(200): the number
    of steps with a non-finite loss or parameter (a step that raises counts and stops the run). Shared with
    benchmarks/audit_integrals.py, which runs the issue's 200 steps."""
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO
    from torch import nn
    from torch.distributions import constraints

    from pyro_cpa.datasets import noisy_circle
    from pyro_cpa.distributions import CPALikelihood
    from pyro_cpa.infer import collapse, empty_guide

    pyro.clear_param_store()
    x = noisy_circle(200)
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2)).double()

    def model(x):
        pyro.module("decoder", dec)
        s = pyro.param("obs_scale", torch.tensor(0.5), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", CPALikelihood(dec, z, s), obs=x)

    svi = SVI(collapse(model), empty_guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    bad = 0
    for _ in range(steps):
        try:
            loss = svi.step(x)
        except Exception:  # noqa: BLE001 - a NaN parameter makes the model raise; count it and stop
            return bad + 1
        bad += int(not math.isfinite(loss) or any(not torch.isfinite(p).all() for p in dec.parameters()))
    return bad


@pytest.mark.slow
def test_exact_mle_s2_decoder_runs_without_nan():
    """Finite losses and parameters for 3 exact-MLE steps (issue 10: 354 NaN gradient entries at step 2)."""
    assert exact_mle_nonfinite_steps(3) == 0


# ---------------------------------------------------------------------------------------------------- S = 3
def test_rotated_boxes_3d_nudged_batched_rotated():
    g = torch.Generator().manual_seed(11)
    boxes = random_boxes(6, g, S=3)
    F = max(b[0].shape[0] for b in boxes)
    G = torch.stack([torch.cat([b[0], torch.zeros(F - b[0].shape[0], 3)]) for b in boxes])
    d = torch.stack([torch.cat([b[1], torch.full((F - b[1].shape[0],), INF)]) for b in boxes])
    lp = torch.tensor([b[2] for b in boxes])
    r = std_moments_3d(G, d)
    _close_logp(r.log_mass, lp, 1e-10, 1e-10)
    for k, (_, _, _, m, C, w) in enumerate(boxes):
        # S = 3 thin slabs: measured mean error ~1e-11/width relative (facet moments; issue 10 follow-up)
        scale = max(1.0, m.abs().max().item())
        torch.testing.assert_close(r.mean[k], m, rtol=0, atol=(1e-8 + 1e-11 / w) * scale)
    # unbatched, nudged, rotated
    one = std_moments_3d(G[0], d[0])
    _close_logp(one.log_mass.reshape(1), r.log_mass[:1], 0.0, BATCH_RTOL)
    _close_logp(std_moments_3d(nudge(G, g), nudge(d, g), need_moments=False).log_mass, r.log_mass, 1e-9, 1e-9)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    _close_logp(std_moments_3d(G @ Q.T, d, need_moments=False).log_mass, r.log_mass, 1e-10, 1e-10)


@pytest.mark.parametrize("lo,hi,moments", [([-1, -0.5, 0.2], [2, 1.5, 1.0], True),     # near
                                           ([6, -1, -0.5], [6.5, 2, 3], True),          # far
                                           ([0.5, -1, -2], [0.5 + 1e-4, 1, 0.5], False)])  # thin slab
def test_gradcheck_3d_wrt_d_and_a_rotation(lo, hi, moments):
    """S = 3 gradients w.r.t. the offsets and the angle of one facet (with a padding row), every branch: the
    rotation derivative of the slicing quadrature was wrong (sign flipped far out) before the analytic
    divergence-theorem gradient."""
    R, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(2)))
    G, d, *_ = rotated_box(R, lo, hi)
    G = torch.cat([G, torch.zeros(1, 3)])
    d = torch.cat([d, torch.tensor([INF])]).requires_grad_(True)
    th = torch.zeros(1, requires_grad=True)

    def f(dx, t):
        c, s = torch.cos(t), torch.sin(t)
        Rz = torch.stack([torch.cat([c, -s, torch.zeros(1)]), torch.cat([s, c, torch.zeros(1)]),
                          torch.tensor([0.0, 0.0, 1.0])])
        r = std_moments_3d(torch.cat([G[:1] @ Rz.T, G[1:]]), dx)
        return (r.log_mass, r.mean) if moments else r.log_mass

    eps = 1e-6 if hi[0] - lo[0] > 1e-3 else 1e-8
    assert torch.autograd.gradcheck(f, (d, th), eps=eps, atol=1e-5, rtol=1e-4)
