"""Exact region enumeration for a two-dimensional latent space (S = 2) by convex polygon splitting.

Unbounded cells without a bounding box
--------------------------------------
The plane is covered by four projective charts, one per closed quadrant ``(sx x >= 0, sy y >= 0)``.
A point z = ρ (x, y) / w is stored in homogeneous coordinates X = (x, y, w), w >= 0, normalised to
the chart plane ``sx x + sy y + w = 1``; the quadrant then becomes the triangle with vertices
(0, 0, 1) (the origin), (sx, 0, 0) and (0, sy, 0) (points at infinity), and its edge ``w = 0`` is the
line at infinity. An affine function ``t(z) = a·z + b`` becomes the *linear* form
``G·X = ρ a·(x, y) + b w = w t(z)``, whose sign is that of ``t`` (w > 0 inside). So every cell of the
arrangement, bounded or not, is a union of at most four ordinary convex polygons, one per chart,
and polygon clipping by linear forms is exact — nothing beyond any box can be missed. Pieces are
merged back into regions by their activation pattern (the set of points with a given pattern is
convex, so a pattern is one region). ρ is a length scale (the 90% quantile of the distances of the
first layer's lines to the origin, at least 1) so that the interesting part of the plane fills the
charts.

Algorithm
---------
Layer by layer, for each unit of the layer (a Python loop over units), every current polygon is
split by the unit's linear form on that polygon (which depends only on the activation pattern of
the earlier layers), all polygons at once with a vectorised Sutherland–Hodgman step in numpy.
Edges carry the index of the unit that created them (``-2`` for the chart walls, which are
relabelled to a unit whose line runs along them, ``-3`` for the line at infinity); the facets of a
region are the labels >= 0 of the edges of its pieces.

Tolerance (``tol``, default 16 unit roundoffs, 3.6e-15): a vertex X is on the line of the form g
when ``|g·X| <= tol (n + 2) |g|⁺``, where n is the number of terms accumulated in g (2 plus the
widths of the earlier layers, the factor of the rounding bound γ_n) and ``|g|⁺`` the norm of the
absolute-value accumulation of g (the same products and sums as g over absolute values, carried
through the layers: it bounds the rounding error of g and, unlike |g|, does not shrink when g
cancels). A line splits a polygon only when it leaves vertices beyond that band on both sides
(chart coordinates are O(1)); thinner slivers are merged into the neighbouring cell, so a cell is
lost only if it is within a few hundred roundoffs of degenerate (e.g. a first-layer cell 1e-12
wide is kept). Chart coordinates shrink like ρ/|z| far from the origin, so a cell at distance
r ≫ ρ is resolved down to a size of about ``tol (n + 2) r² / ρ``.

Exact by construction: the activation pattern of a piece is the side of each line that the
clipping step decided (``>= 0`` side for pieces within the band), never the sign of a form
evaluated again near zero; wall vertices have an exactly zero coordinate (convex combinations of
two vertices with a zero coordinate), so "the piece touches a chart wall" is an exact test.

Budget: after every unit, the number of cells is bounded below by the number of pieces not
touching a chart wall plus a quarter of those touching one (a cell is cut into at most four pieces,
one per chart, and only along the walls); the enumeration is refused as soon as this bound passes
``max_regions``, so memory stays proportional to the budget.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..nn.network import CPANetwork
from .maps import form_maps, push_step, select_maps
from .regions import RegionEnumeration

DEFAULT_TOL = 16 * 2.0 ** -53
WALL = -2
INFINITY = -3
PAD = -9


def _initial_charts() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X, labs = [], []
    for sx, sy in ((1, 1), (-1, 1), (-1, -1), (1, -1)):
        X.append([[0.0, 0.0, 1.0], [sx, 0.0, 0.0], [0.0, sy, 0.0]])
        labs.append([WALL, INFINITY, WALL])
    return np.array(X), np.full(4, 3, dtype=np.int64), np.array(labs, dtype=np.int64)


def _clip(X, cnt, lab, g, gabs, label, band):
    """Split every polygon cut by the linear form ``g`` (P, 3); returns the new arrays, ``src`` and
    ``side``.

    ``src`` maps each output polygon to its input polygon; ``side`` says whether it lies on the
    ``g >= 0`` side (within the band ``band |gabs|``, see the module docstring). Polygons cut by
    ``g`` are replaced by their ``g >= 0`` part, their ``g <= 0`` part is appended at the end.
    """
    P, V, _ = X.shape
    s = np.einsum("pvk,pk->pv", X, g)
    eps = band * np.sqrt(np.einsum("pk,pk->p", gabs, gabs))
    kk = np.arange(V)
    valid = kk[None, :] < cnt[:, None]
    s[(np.abs(s) <= eps[:, None]) | ~valid] = 0.0
    haspos = (s > 0).any(1)
    hasneg = (s < 0).any(1)
    cut = haspos & hasneg
    nxt = kk[None, :] + 1
    nxt = np.where(nxt >= cnt[:, None], 0, nxt)
    sb = np.take_along_axis(s, nxt, 1)
    # a chart wall along which this unit's line runs becomes a facet of that unit
    wall = valid & (lab == WALL) & (s == 0) & (sb == 0) & ((haspos | hasneg) & ~cut)[:, None]
    if wall.any():
        lab = lab.copy()
        lab[wall] = label
    idx = np.nonzero(cut)[0]
    side = ~hasneg
    if idx.size == 0:
        return X, cnt, lab, np.arange(P), side
    Xc, lc, sc, sbc, vc = X[idx], lab[idx], s[idx], sb[idx], valid[idx]
    Xb = np.take_along_axis(Xc, nxt[idx][..., None], 1)
    cross = vc & (sc * sbc < 0)
    denom = np.where(cross, sbc - sc, 1.0)
    Xx = (sbc[..., None] * Xc - sc[..., None] * Xb) / denom[..., None]
    C = idx.size
    nx = cross.astype(np.int64)
    sides = []
    for sig in (1.0, -1.0):
        sa, sbb = sig * sc, sig * sbc
        keep_a = vc & (sa >= 0)
        la = np.where((sbb >= 0) | (sa > 0), lc, label)
        lx = np.where(sa > 0, label, lc)
        na = keep_a.astype(np.int64)
        tot = na + nx
        start = np.cumsum(tot, 1) - tot
        sides.append((keep_a, la, lx, na, start, tot.sum(1)))
    Vn = max(V, int(sides[0][5].max()), int(sides[1][5].max()))
    Xn = np.zeros((P + C, Vn, 3))
    Xn[:P, :V] = X
    Ln = np.full((P + C, Vn), PAD, dtype=np.int64)
    Ln[:P, :V] = lab
    cntn = np.concatenate([cnt, np.zeros(C, dtype=np.int64)])
    rows_out = (idx, P + np.arange(C))
    cr, ck = np.nonzero(cross)
    for (keep_a, la, lx, na, start, newcnt), rows in zip(sides, rows_out):
        Xn[rows] = 0.0
        Ln[rows] = PAD
        cntn[rows] = newcnt
        r, k = np.nonzero(keep_a)
        pos = start[r, k]
        Xn[rows[r], pos] = Xc[r, k]
        Ln[rows[r], pos] = la[r, k]
        pos = start[cr, ck] + na[cr, ck]
        Xn[rows[cr], pos] = Xx[cr, ck]
        Ln[rows[cr], pos] = lx[cr, ck]
    src = np.concatenate([np.arange(P), idx])
    side = np.concatenate([side | cut, np.zeros(C, dtype=bool)])
    return Xn, cntn, Ln, src, side


def _cells_lower_bound(X, cnt) -> int:
    """A lower bound on the number of cells the pieces ``X`` make up (see the module docstring)."""
    V = X.shape[1]
    nxt = np.arange(V)[None, :] + 1
    nxt = np.where(nxt >= cnt[:, None], 0, nxt)
    Xb = np.take_along_axis(X, nxt[..., None], 1)
    valid = np.arange(V)[None, :] < cnt[:, None]
    on_wall = valid & (((X[..., 0] == 0) & (Xb[..., 0] == 0)) | ((X[..., 1] == 0) & (Xb[..., 1] == 0)))
    n_wall = int(on_wall.any(1).sum())
    return len(X) - n_wall + -(-n_wall // 4)


#: Seconds between progress reports (each costs a pass over the pieces).
REPORT_EVERY = 0.5
#: Pieces per chunk when the next layer's linear forms are built (bounds the temporary memory).
FORM_CHUNK = 8192


def _next_pre(net, l, act, q, T, Ta, par):
    """Homogeneous pre-activations of layer ``l + 1`` on every piece (and their absolute-value
    accumulations): the selection of layer ``l`` under the pieces' patterns ``q`` applied to the
    pre-activations ``T[par]`` of layer ``l``, pushed through ``T_{l+1}``; in chunks of pieces."""
    Tt, Tat = torch.from_numpy(T), torch.from_numpy(Ta)
    out, outa = [], []
    for a in range(0, len(par), FORM_CHUNK):
        pp = torch.from_numpy(par[a:a + FORM_CHUNK])
        qq = torch.from_numpy(q[a:a + FORM_CHUNK])
        Tp, Tap = Tt[pp], Tat[pp]
        P, p, sel = select_maps(act, qq, Tp[..., :2], Tp[..., 2])
        Pa, pa, _ = select_maps(act, qq, Tap[..., :2], Tap[..., 2], absolute=True, sel=sel)
        M, m = push_step(net, l + 1, P, p)
        Ma, ma = push_step(net, l + 1, Pa, pa, absolute=True)
        out.append(torch.cat([M, m[..., None]], -1))
        outa.append(torch.cat([Ma, ma[..., None]], -1))
    return torch.cat(out).numpy(), torch.cat(outa).numpy()


def _forms(act, T, Ta):
    """Homogeneous forms of a layer from its homogeneous pre-activations (and absolute accumulations)."""
    Tt, Tat = torch.from_numpy(T), torch.from_numpy(Ta)
    F, f = form_maps(act, Tt[..., :2], Tt[..., 2])
    Fa, fa = form_maps(act, Tat[..., :2], Tat[..., 2], absolute=True)
    return torch.cat([F, f[..., None]], -1).numpy(), torch.cat([Fa, fa[..., None]], -1).numpy()


def _codes_unique(codes: np.ndarray):
    packed = np.ascontiguousarray(np.packbits(codes, axis=1))
    if packed.shape[1] == 0:
        keys = np.zeros(codes.shape[0], dtype=np.uint8)
    else:
        keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    return first, inv.ravel()


@torch.no_grad()
def enumerate_polygons(net: CPANetwork, max_regions: int, tol: float = DEFAULT_TOL,
                       budget_error=None, progress=None) -> RegionEnumeration:
    """All linear regions of a CPA network with a two-dimensional latent space (see module docstring)."""
    if net.in_features != 2:
        raise ValueError(f"the 'polygons' method needs a two-dimensional latent space, got S={net.in_features}")
    acts = net.activations
    if not acts:
        return RegionEnumeration(patterns=[], facets=torch.full((1, 0), -1, dtype=torch.long, device="cpu"),
                                 interior_points=torch.zeros(1, 2, dtype=torch.float64, device="cpu"))
    # first layer's pre-activations t = M0 z + m0 and their forms (lines) W0 z + v0
    eye = torch.eye(2, dtype=torch.float64, device="cpu")[None]  # the enumeration runs on the CPU
    origin = torch.zeros(1, 2, dtype=torch.float64, device="cpu")
    M0, m0 = push_step(net, 0, eye, origin)
    Ma0, ma0 = push_step(net, 0, eye, origin,
                         absolute=True)
    W0, v0 = (t[0].numpy() for t in form_maps(acts[0], M0, m0))
    rn = np.linalg.norm(W0, axis=1)
    dist = np.abs(v0[rn > 0]) / rn[rn > 0]
    rho = max(1.0, float(np.quantile(dist, 0.9))) if dist.size else 1.0
    scale = torch.tensor([rho, rho, 1.0], dtype=torch.float64, device="cpu")
    T = (torch.cat([M0, m0[..., None]], -1) * scale).numpy()
    Ta = (torch.cat([Ma0, ma0[..., None]], -1) * scale).numpy()

    X, cnt, lab = _initial_charts()
    # homogeneous pre-activations of the current layer (one set per polygon before the layer's
    # splits) and their absolute-value accumulations; G, Ga: the layer's forms (lines)
    T, Ta = T.repeat(len(X), 0), Ta.repeat(len(X), 0)
    pats: list[np.ndarray] = []
    offset = 0
    L = len(acts)
    next_report = time.monotonic() + REPORT_EVERY
    acc = 0
    for l in range(L):
        act = acts[l]
        G, Ga = _forms(act, T, Ta)
        n = G.shape[1]
        acc += (2 if l == 0 else acts[l - 1].n_out) + 1 + (act.negative_slope is None)
        band = tol * (acc + 1)
        par = np.arange(len(X))
        q = np.zeros((len(X), n), dtype=bool)
        for j in range(n):
            X, cnt, lab, src, side = _clip(X, cnt, lab, G[par, j], Ga[par, j], offset + j, band)
            par, q = par[src], q[src]
            q[:, j] = side
            due = progress is not None and time.monotonic() >= next_report
            if len(X) > max_regions or due:       # pieces >= cells: the bound only when it can matter
                found = _cells_lower_bound(X, cnt)
                if due:
                    progress(found)
                    next_report = time.monotonic() + REPORT_EVERY
                if budget_error is not None and found > max_regions:
                    raise budget_error(found, l)
        pats = [pt[par] for pt in pats] + [q]
        offset += n
        if l + 1 < L:
            T, Ta = _next_pre(net, l, act, q, T, Ta, par)
        if budget_error is not None:
            first, _ = _codes_unique(np.concatenate(pats, axis=1))
            if first.size > max_regions:
                raise budget_error(int(first.size), l + 1)

    codes = np.concatenate(pats, axis=1) if pats else np.zeros((len(X), 0), dtype=bool)
    first, inv = _codes_unique(codes)
    R = first.size
    # interior point: vertex mean of each region's largest piece
    Vn = X.shape[1]
    nxt = np.arange(Vn)[None, :] + 1
    nxt = np.where(nxt >= cnt[:, None], 0, nxt)
    Xb = np.take_along_axis(X, nxt[..., None], 1)
    valid = np.arange(Vn)[None, :] < cnt[:, None]
    area = 0.5 * np.abs(np.where(valid, X[..., 0] * Xb[..., 1] - Xb[..., 0] * X[..., 1], 0.0).sum(1))
    order = np.argsort(-area, kind="stable")
    _, pos = np.unique(inv[order], return_index=True)
    best = order[pos]                                     # (R,) piece per region, regions sorted by id
    centre = X[best].sum(1) / cnt[best][:, None]
    interior = rho * centre[:, :2] / centre[:, 2:3]
    patterns = [torch.from_numpy(np.ascontiguousarray(pt[best])) for pt in pats]
    # facets: distinct unit labels of the edges of all pieces of a region
    r, k = np.nonzero(valid & (lab >= 0))
    U = max(offset, 1)
    keys = np.unique(inv[r] * U + lab[r, k])
    reg, unit = keys // U, keys % U
    nf = np.bincount(reg, minlength=R)
    F = int(nf.max()) if nf.size else 0
    facets = np.full((R, F), -1, dtype=np.int64)
    if keys.size:
        starts = np.cumsum(nf) - nf
        facets[reg, np.arange(keys.size) - starts[reg]] = unit
    return RegionEnumeration(patterns=patterns, facets=torch.from_numpy(facets),
                             interior_points=torch.from_numpy(np.ascontiguousarray(interior)))
