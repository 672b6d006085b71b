"""Exact-input polygons for the S = 2 reference tests, and an independent mpmath reference for their
Gaussian mass and moments."""
import math

import mpmath as mp
import torch

REF_DPS = 30


def triangle(V, rot: float = 0.0):
    """(G (3, 2), d (3,)): the triangle with vertices ``V`` rotated by ``rot`` as {u : G u <= d}, G the unit
    outward normals of its edges (float64)."""
    c, s = math.cos(rot), math.sin(rot)
    V = [(c * x - s * y, s * x + c * y) for x, y in V]
    G, d = [], []
    for i in range(3):
        p, q, o = V[i], V[(i + 1) % 3], V[(i + 2) % 3]
        n = (q[1] - p[1], -(q[0] - p[0]))
        nn = math.hypot(*n)
        n = (n[0] / nn, n[1] / nn)
        if n[0] * (o[0] - p[0]) + n[1] * (o[1] - p[1]) > 0:
            n = (-n[0], -n[1])
        G.append(n)
        d.append(n[0] * p[0] + n[1] * p[1])
    return torch.tensor(G, dtype=torch.float64), torch.tensor(d, dtype=torch.float64)


def polygon(vertices):
    """(G, d) of the convex polygon with these counter-clockwise vertices (unit outward normals)."""
    G, d = [], []
    k = len(vertices)
    for i in range(k):
        (x0, y0), (x1, y1) = vertices[i], vertices[(i + 1) % k]
        n = (y1 - y0, -(x1 - x0))
        nn = math.hypot(*n)
        G.append((n[0] / nn, n[1] / nn))
        d.append((n[0] * x0 + n[1] * y0) / nn)
    return torch.tensor(G, dtype=torch.float64), torch.tensor(d, dtype=torch.float64)


def mp_polygon_moments(G, d, axis=(1.0, 0.0), dps: int = REF_DPS):
    """(log P, mean, covariance) of N(0, I₂) on {G u <= d} (any convex polygon, bounded or not), the float inputs taken
    exactly, in mpmath: slices across ``axis`` (a unit vector; any axis gives the same integral, a direction towards
    the polygon keeps the pieces short), tanh-sinh on pieces between the vertices and on a grid of the Gaussian decay
    along the axis, the slices' 1-D moments in closed form (mpmath ncdf/npdf), integrands scaled to O(1)."""
    with mp.workdps(dps):
        a0, a1 = (mp.mpf(x) for x in axis)
        rows = []
        for (g0, g1), c in zip(G.tolist(), d.tolist()):
            if g0 == 0 and g1 == 0:
                continue
            g0, g1 = mp.mpf(g0), mp.mpf(g1)
            rows.append((g0 * a0 + g1 * a1, -g0 * a1 + g1 * a0, mp.mpf(c)))   # (g·axis, g·axis⊥, d)
        xlo, xhi, xs, r2 = -mp.inf, mp.inf, [], None
        for gx, gy, c in rows:
            if gy == 0:
                xlo, xhi = (xlo, min(xhi, c / gx)) if gx > 0 else (max(xlo, c / gx), xhi)
        for i in range(len(rows)):
            for k in range(i + 1, len(rows)):
                (p0, p1, pd), (q0, q1, qd) = rows[i], rows[k]
                det = p0 * q1 - p1 * q0
                if det != 0:
                    x, y = (pd * q1 - p1 * qd) / det, (p0 * qd - pd * q0) / det
                    if all(g0 * x + g1 * y <= c + (1 + abs(c)) * mp.mpf(10) ** (5 - dps) for g0, g1, c in rows):
                        xs.append(x)
                        r2 = x * x + y * y if r2 is None else min(r2, x * x + y * y)

        def bounds(x):
            lo, hi = -mp.inf, mp.inf
            for gx, gy, c in rows:
                if gy != 0:
                    y = (c - gx * x) / gy
                    lo, hi = (lo, min(hi, y)) if gy > 0 else (max(lo, y), hi)
            return lo, hi

        def interval(lo, hi):
            P = mp.ncdf(-lo) - mp.ncdf(-hi) if lo + hi > 0 else mp.ncdf(hi) - mp.ncdf(lo)
            pl = mp.npdf(lo) if mp.isfinite(lo) else 0
            ph = mp.npdf(hi) if mp.isfinite(hi) else 0
            return P, pl - ph, P + (lo * pl if mp.isfinite(lo) else 0) - (hi * ph if mp.isfinite(hi) else 0)

        def feasible(x):
            lo, hi = bounds(x)
            return xlo < x < xhi and lo < hi

        # the x-range: between the vertices, open to ±inf where the slices beyond the last vertex are not empty
        # (convexity), clipped at |x| <= X, X² = r² + 160 with r >= the polygon's distance from the origin (a vertex's
        # or, without vertices, the largest |d|): the mass beyond is below e^-80 of the mass near the nearest point
        x0 = -mp.inf if not xs or feasible(min(xs) - 1) else min(xs)
        x1 = mp.inf if not xs or feasible(max(xs) + 1) else max(xs)
        x0, x1 = max(x0, xlo), min(x1, xhi)
        r2 = max(c * c for _, _, c in rows) if r2 is None else r2
        big = mp.sqrt(r2 + 160)
        x0, x1 = max(x0, -big), min(x1, big)
        # breakpoints: the vertices and x = ±sqrt(2 s), s = 0, 3, 6, ... (the Gaussian falls by <= e^-3 per piece)
        pts = sorted({x0, x1} | set(xs) | {sg * mp.sqrt(2 * s) for s in range(0, int(r2 / 2) + 84, 3) for sg in (-1, 1)})
        pts = [p for p in pts if x0 <= p <= x1]
        scale = max(mp.npdf(p) * interval(*bounds(p))[0] for p in pts if bounds(p)[0] < bounds(p)[1])

        def f(x, k):
            lo, hi = bounds(x)
            if not lo < hi:
                return mp.mpf(0)
            P, m1, m2 = interval(lo, hi)
            return mp.npdf(x) / scale * (P, x * P, m1, x * x * P, x * m1, m2)[k]

        I = [mp.quad(lambda x: f(x, k), pts) for k in range(6)]
        mx, my = I[1] / I[0], I[2] / I[0]
        cxx, cxy, cyy = I[3] / I[0] - mx * mx, I[4] / I[0] - mx * my, I[5] / I[0] - my * my
        R = [[a0, -a1], [a1, a0]]                        # u = x axis + y axis⊥
        m = [R[i][0] * mx + R[i][1] * my for i in range(2)]
        C = [[sum(R[i][p] * [[cxx, cxy], [cxy, cyy]][p][q] * R[j][q] for p in range(2) for q in range(2))
              for j in range(2)] for i in range(2)]
        return (float(mp.log(I[0]) + mp.log(scale)), torch.tensor([float(v) for v in m], dtype=torch.float64),
                torch.tensor([[float(v) for v in r] for r in C], dtype=torch.float64))
