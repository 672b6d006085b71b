r"""Standard-normal mass and moments on a convex polytope in 3-D (S = 3), batched and differentiable.

Whitened problem: u ~ N(0, I_3) on ω = {u : g_jᵀu <= d_j} (unit rows; padding rows g = 0, d = +inf).

**Mass: flux formula (faces → edges → 1-D integrals).** The field F(u) = −u Q(|u|)/(4π|u|³), with
Q(ρ) = P(|u| > ρ) = 2Φ̄(ρ) + 2ρφ(ρ), has div F = φ₃ away from 0, flux −1 out of the origin and none at
infinity; on the plane of facet j, F·g_j dA is −1/(4π) Q(ρ) dΩ, so the flux through facet j is minus the
mass M_j of the cone {λy : y ∈ facet j, λ >= 1} beyond it. By the divergence theorem, for a polytope whose
boundary avoids the origin,

    P = 1[0 ∈ ω] − Σ_j sign(d_j) M_j.

With facet j's polygon in its own coordinates u = d_j g_j + Q_j y (foot point y = 0; a = |d_j|), M_j is a
2-D integral of a radial function, (a/4π) ∫ Q(ρ)/ρ³ dy with ρ² = a² + |y|², and ∫_ρ^∞ Q(s)/s² ds = 2Φ̄(ρ)/ρ
turns it (2-D divergence theorem in the facet's plane) into a sum over the facet's edges k (in-plane
distance h_jk of the foot point, edge points h n + t e with t_lo < t < t_hi):

    M_j = 1[foot ∈ facet j] Φ̄(a) − Σ_k sign(h_jk) E_jk,
    E_jk = (a/2π) ∫_{t_lo}^{t_hi} h Φ̄(ρ) / (ρ (h² + t²)) dt,   ρ² = a² + h² + t²,  h = |h_jk|

(the mass of the part of that cone beyond edge k as well: every term is a positive mass). Each E_jk is
computed with full relative precision in log space: Φ̄(ρ) = erfcx(ρ/√2) e^{−ρ²/2}/2, the edge is split at
t = 0 into half intervals 0 <= p < t < q, the factor e^{−(a² + h² + p²)/2} is taken out and the rest is
integrated by Gauss–Legendre (``flux_nodes`` = 12 per piece) in s = t − p on pieces where the Gaussian
factor falls by a bounded amount and, near the foot point, at t = h·3^k (the poles ±ih; the branch points
±i(a² + h²)^{1/2} of 1/ρ lie farther out). The same nodes give the facets' 2-D masses P_j (the 2-D flux
formula of :mod:`~pyro_cpa.integrate.bivariate`, integrand without the factor erfcx/ρ). The terms are
summed relative to the largest; the sum is used where its cancellation amplifies the rounding error by at
most ``flux_max_amp`` = 1e3 (measured: <~ 2e-12 relative on random ReLU cells, also far out where P
underflows) and where neither the origin nor a facet's foot point lies on (or within a tolerance of) a
boundary: ~99 % of the pairs of a random ReLU partition. The others (thin slivers) use the slicing below.

**Fallback: slicing.** Let w be the unit vector to the polytope's nearest point to the origin (distance r; any
direction when the origin is inside). The nearest point is the feasible one of smallest norm among the
projections of the origin on the facets, the ridges (pairs of planes) and the vertices (triples), all
enumerated in torch. With v1 = w·u and an orthonormal basis Q of w⊥,

    P = ∫ φ(v1) P₂(v1) dv1,   P₂(v1) = mass of the polygon {y : (Qᵀg_k)ᵀ y <= d_k − (g_k·w) v1},

by Gauss–Legendre (``num_nodes`` per piece) on pieces split at the vertices' v1 (P₂ is analytic
between them), where a plane's in-slice distance crosses ``levels`` (planes nearly parallel to the
slices), where a ridge's point in the slice is nearest to / at distance ``ridge_levels`` from the
slice origin (ridges nearly parallel to the slices), and at v1 = sqrt(r² + 2s), s in ``s_cuts`` (bounded fall of the Gaussian weight per piece;
truncation at s = 50). Only planes and ridges that are faces of the polytope (through a feasible vertex)
give cuts, and only pieces of positive length are evaluated (8 Gauss–Legendre nodes each: agrees with 24
nodes to ~1e-13 relative on random ReLU cells). Each slice is exact in log space
(:func:`~pyro_cpa.integrate.bivariate.log_mass_2d`, flux formula) and the sum is a logsumexp, so far-out
polytopes keep their relative accuracy. A slice whose flux formula is ill-conditioned (thin slivers) takes
the Owen's-T value when its absolute error, weighted by φ(v1), is negligible against the polytope's mass
(``slice_rel_tol``), and the nested log-space slicing otherwise.

**Moments** (divergence theorem): with facet masses P_j (2-D, in facet coordinates u = d_j g_j + Q_j y,
constraints (Q_jᵀg_k)ᵀ y <= d_k − (g_j·g_k) d_j, rows renormalised) and the facets' conditional means μ_j,
r_j = exp(log φ(d_j) + log P_j − log P):

    E[u | ω] = −Σ_j r_j g_j,   E[u uᵀ | ω] = I − Σ_j r_j g_j (d_j g_j + Q_j μ_j)ᵀ   (symmetrised).

(The ridge masses of maths.md enter through μ_j, the 2-D divergence formula on each facet: μ_j = −Σ_k r_jk n_jk
from the edges' 1-D masses, or :func:`~pyro_cpa.integrate.bivariate.std_moments_2d` where that cancels or
the facet's flux value is not trusted.) Results are exact to ~1e-12 relative (quadrature rules chosen to
reach ~1e-13). An empty polytope returns log_mass = -inf, mean = 0, second_moment = 0 (NaN-free).
"""
from __future__ import annotations

import functools
import itertools
import math

import torch

from .._shapes import broadcast_shapes
from .bivariate import _decay_cuts, _in_chunks, DEFAULT_NUM_NODES as DEFAULT_NUM_NODES_2D, DEFAULT_S_CUTS, \
    DEFAULT_SWITCH_MASS, log_mass_2d, polygon_edges, std_moments_2d
from .types import StandardMoments
from .univariate import LOG_SQRT_2PI, _gl_nodes, interval_moments

__all__ = ["std_moments_3d", "log_mass_3d", "DEFAULT_NUM_NODES_3D", "DEFAULT_FEAS_TOL"]

DEFAULT_NUM_NODES_3D = 8
DEFAULT_FEAS_TOL = 1e-10
DEFAULT_RIDGE_LEVELS = (2.0, 5.0, 8.0)
DEFAULT_SLICE_REL_TOL = 1e-12
DEFAULT_LEVELS = (-4.0, 0.0, 4.0)   # in-slice distances of a plane where the slicing axis is cut
DEFAULT_FACET_TIE_TOL = 1e-12
_PARALLEL_TOL = 1e-14   # in-slice / in-facet normal norms below this: the plane is parallel
_DIV_TINY = 1e-300
_R_TINY = 1e-150
_CHUNK_3D = 16   # polytopes per chunk (each has a few hundred slices)
_OWENS_ABS_ERR = 1e-15
_SLICE_MAX_AMP = 1e4   # flux-formula cancellation accepted in the slices (error <~ 1e-12 relative)
DEFAULT_FLUX_NODES = 12          # Gauss–Legendre nodes per piece of the edge integrals (3-D and facet 2-D flux)
DEFAULT_FLUX_Z_CUTS = (0.5, 2.0, 5.0, 10.0, 18.0, 30.0, 45.0)   # Gaussian-decay cuts (truncation at 45)
DEFAULT_FLUX_H_RATIO = 3.0       # geometric cuts t = h·ratio^k near the foot point of an edge
DEFAULT_FLUX_H_LEVELS = 9        # ... k < levels; an edge with h·ratio^levels < 1 near its foot is not resolved
DEFAULT_FLUX_MAX_AMP = 1e3       # accepted amplification Σ|terms| / P of the flux sums (error <~ 1e-12 relative)
DEFAULT_MEAN_MAX_AMP_2D = 1e3    # facet means: the edge formula is replaced where Σ r_jk > this·(1 + |μ_j|) ...
DEFAULT_FACET_MEAN_WEIGHT = 100.0  # ... and r_j Σ_k r_jk > this (its error ~1e-15 Σ_k r_jk, weighted by r_j: > 1e-13)
_ON_PLANE_TOL = 1e-150   # |d_j| <= this on a facet: the origin is on the boundary (sign(d_j) undefined): slicing
_CHUNK_FLUX = 512        # polytopes per chunk of the flux formula
_SQRT1_2 = math.sqrt(0.5)
_LOG_2PI = math.log(2.0 * math.pi)
_LOG_4PI = math.log(4.0 * math.pi)


def _basis(g: torch.Tensor) -> torch.Tensor:
    """(..., 3, 2) orthonormal basis of the plane ⊥ unit vector g (arbitrary rotation within it)."""
    ex = torch.zeros_like(g)
    ex[..., 0] = 1.0
    ey = torch.zeros_like(g)
    ey[..., 1] = 1.0
    a = torch.where((g[..., :1].abs() < 0.9), ex, ey)
    q1 = a - (a * g).sum(-1, keepdim=True) * g
    q1 = q1 / q1.norm(dim=-1, keepdim=True)
    q2 = torch.cross(g, q1, dim=-1)
    return torch.stack([q1, q2], dim=-1)


def _project_rows(Gs, ds, real, Q, shift, parallel_tol=_PARALLEL_TOL):
    """2-D constraints (Qᵀg_k)ᵀ y <= d_k − shift_k, rows renormalised; parallel rows -> 0 / ±inf, -1."""
    G2 = (Gs.unsqueeze(-1) * Q.unsqueeze(-3)).sum(-2)        # (..., F, 2)
    n = G2.norm(dim=-1)
    rhs = ds - shift
    ok = real & (n > parallel_tol)
    ns = torch.where(ok, n, torch.ones_like(n))
    G2 = torch.where(ok.unsqueeze(-1), G2 / ns.unsqueeze(-1), torch.zeros_like(G2))
    inf = torch.full_like(rhs, float("inf"))
    d2 = torch.where(ok, rhs / ns, torch.where(real & (rhs < 0), -torch.ones_like(rhs), inf))
    return G2, d2, n


def _nearest_point(Gs, ds, real, tol):
    """Nearest point of the polytope to the origin (flat batch (B, F, 3)); returns p, r, inside, nonempty, verts."""
    B, F, _ = Gs.shape
    dtype, device = ds.dtype, ds.device
    inside = ((ds >= 0) | ~real).all(-1)

    def feasible(x):  # x (B, C, 3)
        gx = (Gs.unsqueeze(-3) * x.unsqueeze(-2)).sum(-1)          # (B, C, F) elementwise: no shape-dependent BLAS
        viol = (gx - ds.unsqueeze(-2)) > tol * (1.0 + ds.abs().unsqueeze(-2))
        return ~(viol & real.unsqueeze(-2)).any(-1)

    cands, oks = [], []
    # facets
    cands.append(ds.unsqueeze(-1) * Gs)
    oks.append(real)
    # ridges
    if F >= 2:
        pr = torch.tensor(list(itertools.combinations(range(F), 2)), device=device)
        gi, gj = Gs[:, pr[:, 0]], Gs[:, pr[:, 1]]
        di, dj = ds[:, pr[:, 0]], ds[:, pr[:, 1]]
        c = (gi * gj).sum(-1)
        den = 1.0 - c * c
        okr = real[:, pr[:, 0]] & real[:, pr[:, 1]] & (den > 1e-12)
        dens = torch.where(okr, den, torch.ones_like(den))
        al = (di - c * dj) / dens
        be = (dj - c * di) / dens
        cands.append(al.unsqueeze(-1) * gi + be.unsqueeze(-1) * gj)
        oks.append(okr)
    verts = None
    if F >= 3:
        tr = torch.tensor(list(itertools.combinations(range(F), 3)), device=device)
        g1, g2, g3 = Gs[:, tr[:, 0]], Gs[:, tr[:, 1]], Gs[:, tr[:, 2]]
        c23, c31, c12 = torch.cross(g2, g3, dim=-1), torch.cross(g3, g1, dim=-1), torch.cross(g1, g2, dim=-1)
        det = (g1 * c23).sum(-1)
        okv = real[:, tr[:, 0]] & real[:, tr[:, 1]] & real[:, tr[:, 2]] & (det.abs() > 1e-12)
        dets = torch.where(okv, det, torch.ones_like(det))
        v = (ds[:, tr[:, 0], None] * c23 + ds[:, tr[:, 1], None] * c31 + ds[:, tr[:, 2], None] * c12) / dets.unsqueeze(-1)
        v = torch.where(okv.unsqueeze(-1), v, torch.zeros_like(v))
        cands.append(v)
        oks.append(okv)
    X = torch.cat(cands, dim=1)
    OK = torch.cat(oks, dim=1) & feasible(X)
    if F >= 3:
        nv = v.shape[1]
        verts, vok = X[:, -nv:], OK[:, -nv:]
    else:
        verts, vok = X.new_zeros(B, 0, 3), OK.new_zeros(B, 0)
    n2 = torch.where(OK, (X * X).sum(-1), torch.full_like(OK, float("inf"), dtype=dtype))
    j = n2.argmin(-1)
    p = X.gather(1, j[:, None, None].expand(-1, 1, 3)).squeeze(1)
    nonempty = inside | OK.any(-1)
    r = p.norm(dim=-1)
    inside = inside | (r <= _R_TINY)                 # any slicing direction is exact; avoids p/r at r ~ 0
    return p, r, inside, nonempty, verts, vok


def _ridge_cuts(Gs, ds, real, w, Q, lo, ridge_levels):
    """v1 where each ridge line's point in the slice is closest to the slice origin and at distance L.

    A ridge nearly parallel to the slices makes the slice polygon's vertex run away fast (a steep,
    Gaussian-like fall of P₂); cutting there keeps each piece's integrand resolvable.
    """
    B, F, _ = Gs.shape
    if F < 2:
        return lo.new_zeros(B, 0)
    pr = torch.tensor(list(itertools.combinations(range(F), 2)), device=ds.device)
    gi, gj = Gs[:, pr[:, 0]], Gs[:, pr[:, 1]]
    di, dj = ds[:, pr[:, 0]], ds[:, pr[:, 1]]
    c = (gi * gj).sum(-1)
    den = 1.0 - c * c
    ok = real[:, pr[:, 0]] & real[:, pr[:, 1]] & (den > 1e-12)
    dens = torch.where(ok, den, torch.ones_like(den))
    x0 = ((di - c * dj) / dens).unsqueeze(-1) * gi + ((dj - c * di) / dens).unsqueeze(-1) * gj
    t = torch.cross(gi, gj, dim=-1)
    t = t / torch.where(ok, t.norm(dim=-1), torch.ones_like(den)).unsqueeze(-1)
    wt = (t * w.unsqueeze(-2)).sum(-1)
    v0 = (x0 * w.unsqueeze(-2)).sum(-1)
    y0 = (x0.unsqueeze(-1) * Q.unsqueeze(-3)).sum(-2)
    tq = (t.unsqueeze(-1) * Q.unsqueeze(-3)).sum(-2)
    slanted = ok & (wt.abs() > 1e-12)
    wts = torch.where(slanted, wt, torch.ones_like(wt))
    m = tq / wts.unsqueeze(-1)
    mm = torch.where(slanted, (m * m).sum(-1), torch.ones_like(wt))
    vstar = v0 - torch.where(slanted, (y0 * m).sum(-1) / mm, torch.zeros_like(wt))
    ystar2 = ((y0 + (vstar - v0).unsqueeze(-1) * m) ** 2).sum(-1)
    L = torch.tensor(ridge_levels, dtype=ds.dtype, device=ds.device)
    arg = (L * L - ystar2.unsqueeze(-1)) / mm.unsqueeze(-1)
    pos = arg > 0
    off = torch.where(pos, torch.sqrt(torch.where(pos, arg, torch.ones_like(arg))), torch.zeros_like(arg))
    off = torch.where(slanted.unsqueeze(-1), off, torch.zeros_like(off))
    cuts = torch.cat([vstar.unsqueeze(-1), vstar.unsqueeze(-1) - off, vstar.unsqueeze(-1) + off], dim=-1)
    cuts = torch.where(ok.unsqueeze(-1), cuts, lo[:, None, None])
    return cuts.reshape(B, -1)


def _incidence(F: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    i2, i1 = _incidence_cpu(F)
    return i2.to(device), i1.to(device)


@functools.lru_cache(maxsize=32)
def _incidence_cpu(F: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C3, C2) and (C3, F) 0/1 matrices: which plane pairs / planes each triple of planes contains."""
    pairs = list(itertools.combinations(range(F), 2))
    pos = {pr: k for k, pr in enumerate(pairs)}
    tr = list(itertools.combinations(range(F), 3))
    i2 = torch.zeros(len(tr), len(pairs), device="cpu")
    i1 = torch.zeros(len(tr), F, device="cpu")
    for k, (a, b, c) in enumerate(tr):
        for pr in ((a, b), (a, c), (b, c)):
            i2[k, pos[pr]] = 1.0
        i1[k, [a, b, c]] = 1.0
    return i2, i1


def _segment_logsumexp(x: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """logsumexp of ``x`` within segments ``seg`` (values in [0, n)); -inf for empty segments."""
    m = x.new_full((n,), float("-inf")).scatter_reduce(0, seg, x.detach(), "amax")
    mf = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = x.new_zeros(n).index_add(0, seg, torch.exp(x - mf.index_select(0, seg)))
    return mf + torch.log(s)


def _compact_rows(G: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (B, F', 3), (B, F') with the real rows first (order kept) and trailing all-padding columns cut."""
    F = d.shape[-1]
    Gf = G.reshape(-1, F, 3)
    df = d.reshape(-1, F)
    real = (Gf.abs().sum(-1) > 0) & (df < float("inf"))
    if df.shape[0] == 0 or bool(real.all()):
        return Gf, df
    order = torch.argsort((~real).to(torch.int8), dim=-1, stable=True)
    Fm = max(int(real.sum(-1).max()), 1)
    keep = ~real & ((Gf.abs().sum(-1) == 0) & (df < 0))   # an always-violated zero row must survive
    if bool(keep.any()):
        return Gf, df
    order = order[:, :Fm]
    return Gf.gather(1, order.unsqueeze(-1).expand(-1, -1, 3)), df.gather(1, order)


def _by_row_count(fn, G: torch.Tensor, d: torch.Tensor, chunk: int, **kw):
    """``fn(G, d, **kw)`` on the groups of polytopes with the same number of real rows, each compacted to it
    (real rows first, order kept) and cut into chunks of ``chunk``; results scattered back to the batch.

    The facet-polygon work grows like F³ per polytope: padding every polytope to the largest F of a batch
    (here 8 against a mean of ~5 real rows) multiplies it, and a polytope's result would depend on the batch
    it came in. Polytopes with an always-violated zero row keep all their rows (see :func:`_compact_rows`).
    ``fn`` returns a tensor (n,) or a :class:`StandardMoments` of flat tensors.
    """
    batch = broadcast_shapes(G.shape[:-2], d.shape[:-1])
    F = d.shape[-1]
    n = math.prod(batch)
    Gf = G.expand(batch + (F, 3)).reshape(n, F, 3)
    df = d.expand(batch + (F,)).reshape(n, F)
    zero = Gf.abs().sum(-1) == 0
    real = ~zero & (df < float("inf"))
    key = torch.where((zero & (df < 0)).any(-1), torch.full_like(df[:, 0], F + 1, dtype=torch.long), real.sum(-1))
    if n == 0:
        out = fn(Gf, df, **kw)
        return out.reshape(batch) if isinstance(out, torch.Tensor) else \
            type(out)(*(None if f is None else f.reshape(batch + f.shape[1:]) for f in out))
    order = torch.argsort((~real).to(torch.int8), dim=-1, stable=True)
    outs = []
    for k in torch.unique(key).tolist():
        idx = (key == k).nonzero().squeeze(-1)
        if k <= F:
            o = order.index_select(0, idx)[:, :max(k, 1)]
            Gk = Gf.index_select(0, idx).gather(1, o.unsqueeze(-1).expand(-1, -1, 3))
            dk = df.index_select(0, idx).gather(1, o)
        else:
            Gk, dk = Gf.index_select(0, idx), df.index_select(0, idx)
        parts = [fn(Gk[i:i + chunk], dk[i:i + chunk], **kw) for i in range(0, idx.numel(), chunk)]
        if isinstance(parts[0], torch.Tensor):
            outs.append((idx, torch.cat(parts)))
        else:
            outs.append((idx, type(parts[0])(*(None if f[0] is None else torch.cat(f) for f in zip(*parts)))))

    def scatter(vals):
        out = vals[0].new_zeros((n,) + vals[0].shape[1:])
        for (idx, _), v in zip(outs, vals):
            out = out.index_copy(0, idx, v)
        return out.reshape(batch + vals[0].shape[1:])

    if isinstance(outs[0][1], torch.Tensor):
        return scatter([o for _, o in outs])
    return type(outs[0][1])(*(None if f[0] is None else scatter(list(f)) for f in zip(*(o for _, o in outs))))


def _facet_polygons(G, d, facet_tie_tol):
    r"""Each plane's facet polygon in its own coordinates u = d_j g_j + Q_j y (flat (B, F, 3), (B, F)).

    Constraints (Q_jᵀg_k)ᵀ y <= d_k − (g_j·g_k) d_j, rows renormalised (g_j·g_k elementwise, no matmul);
    parallel planes give 0 / +inf (no constraint) or 0 / −1 (the facet is empty); duplicated planes (the same
    plane twice within ``facet_tie_tol``) keep their first copy. Returns (Gs, ds, real, Qj, G2 (B, F, F, 2),
    d2 (B, F, F)) with padding rows zeroed.
    """
    F = d.shape[-1]
    norm = G.norm(dim=-1)
    real = (norm > 0) & (d < float("inf"))
    Gs = torch.where(real.unsqueeze(-1), G, torch.zeros_like(G))
    ds = torch.where(real, d, torch.zeros_like(d))
    gj = torch.where(real.unsqueeze(-1), Gs, torch.ones_like(Gs) / 3 ** 0.5)
    Qj = _basis(gj)                                           # (..., F, 3, 2)
    c = (Gs.unsqueeze(-2) * Gs.unsqueeze(-3)).sum(-1)         # c[j, k] = g_j·g_k, elementwise
    shift = c * ds.unsqueeze(-1)                              # (g_j·g_k) d_j
    Gk = Gs.unsqueeze(-3).expand(-1, F, F, 3)
    dk = ds.unsqueeze(-2).expand(-1, F, F)
    rk = real.unsqueeze(-2).expand(-1, F, F) & ~torch.eye(F, dtype=torch.bool, device=d.device)
    rk = rk & real.unsqueeze(-1)                              # padding planes have no facet
    G2, d2, n = _project_rows(Gk, dk, rk, Qj, shift)
    idx = torch.arange(F, device=d.device)
    dup = rk & (n <= _PARALLEL_TOL) & (c > 0) & ((dk - shift).abs() <= facet_tie_tol * (1 + ds.abs().unsqueeze(-1))) \
        & (idx.unsqueeze(0) < idx.unsqueeze(-1))
    d2 = torch.where(dup, -torch.ones_like(d2), d2)
    G2 = torch.where(dup.unsqueeze(-1), torch.zeros_like(G2), G2)
    return Gs, ds, real, Qj, G2, d2


def _flux_sum(logs, signs, owner, n, lead):
    """(m, S, A) with S = Σ sign·exp(l − m), A = Σ exp(l − m) per segment (m = the segment's largest term).

    ``lead`` (n,) is a first term of sign +1 per segment (log 1[0 ∈ ω], -inf if absent). Sums by ``index_add``
    in the order of the terms (the same for a pair whatever the batch around it)."""
    m = lead.scatter_reduce(0, owner, logs, "amax")
    m_ok = torch.isfinite(m)
    m = torch.where(m_ok, m, torch.zeros_like(m))
    e0 = torch.exp(lead - m)
    e = torch.exp(logs - m.index_select(0, owner))
    return m, m_ok, e0.index_add(0, owner, signs * e), e0.index_add(0, owner, e)


def _flux_3d(Gs, ds, real, G2, d2, edges, *, num_nodes, z_cuts, h_ratio, h_levels, max_amp):
    r"""The flux formulas of the module doc on every facet polygon's edges (flat batch; no autograd).

    Returns ``(logP, ok, log_Pf, ok_f, live)``: the 3-D log mass and where it is trusted (B,), the facets'
    2-D log masses and where they are trusted (B, F), and which planes are facets (non-empty polygons).
    Every (facet j, edge k) is split at t = 0 into half intervals 0 <= p < t < q; with s = t − p (nodes
    kept relative to p, so that far out the Gaussian factor exp(−s(s + 2p)/2) keeps its relative precision),
    both integrands share the Gauss–Legendre nodes: pieces where the Gaussian factor falls by a bounded
    amount (s = sqrt(p² + 2z) − p, z in ``z_cuts``, truncated at the last) and, near the foot point, at
    t = h·ratio^k (the poles ±ih of h/(h² + t²); the branch points ±ic of 1/ρ lie farther, c >= h).
    """
    B, F = ds.shape
    dtype, device = ds.dtype, ds.device
    Gs2, ds2, e2, t_lo, t_hi, exists, empty2, whole2 = edges
    a = ds.abs()
    live = real & ~empty2
    real2 = (G2.abs().sum(-1) > 0) & (d2 < float("inf"))
    foot_in = live & ((ds2 > 0) | ~real2).all(-1)            # the foot point d_j g_j inside facet j
    inside = ((ds > 0) | ~real).all(-1)
    on_plane = (live & (a <= _ON_PLANE_TOL)).any(-1)         # the origin on a facet's plane: not trusted
    h = ds2.abs()
    edge = exists & (h > 0) & live.unsqueeze(-1)             # h = 0: the edge's terms are exactly 0
    p = torch.stack([t_lo.clamp(min=0), (-t_hi).clamp(min=0)], -1)      # (B, F, F, 2)
    q = torch.stack([t_hi.clamp(min=0), (-t_lo).clamp(min=0)], -1)
    valid = edge.unsqueeze(-1) & (q > p)
    idx = valid.reshape(-1).nonzero().squeeze(-1)
    pi = p.reshape(-1).index_select(0, idx)
    span = (q.reshape(-1).index_select(0, idx) - pi)
    fi = torch.div(idx, 2, rounding_mode="floor")            # (b, j, k)
    ji = torch.div(idx, 2 * F, rounding_mode="floor")        # (b, j)
    bi = torch.div(idx, 2 * F * F, rounding_mode="floor")    # b
    hi = h.reshape(-1).index_select(0, fi)
    ai = a.reshape(-1).index_select(0, ji)
    sh = torch.sign(ds2.reshape(-1).index_select(0, fi))
    Z = torch.tensor(z_cuts, dtype=dtype, device=device)
    HC = torch.tensor([h_ratio ** k for k in range(h_levels)], dtype=dtype, device=device)
    sz = 2.0 * Z / (torch.sqrt((pi * pi).unsqueeze(-1) + 2.0 * Z) + pi.unsqueeze(-1))   # sqrt(p² + 2z) − p
    sc = hi.unsqueeze(-1) * HC - pi.unsqueeze(-1)
    # the h-cuts (ascending) subdivide the first z-piece: clamped into it, the cuts stay sorted without a sort
    # (ties resolve to the bound: zero-length pieces are dropped)
    zero = torch.zeros_like(sc)
    sc = torch.where(sc <= zero, zero, sc)
    sc = torch.where(sc >= sz[:, :1], sz[:, :1], sc)
    unres = (hi * HC[-1] * h_ratio < 1.0) & (pi < 1.0)
    top = torch.where(span <= sz[:, -1], span, sz[:, -1]).unsqueeze(-1)
    cuts = torch.cat([torch.zeros_like(pi).unsqueeze(-1), sc, sz], -1)
    cuts = torch.where(cuts >= top, top, cuts)
    a0 = cuts[:, :-1]
    half = 0.5 * (cuts[:, 1:] - a0)
    K = half.shape[1]
    nz = (half > 0).reshape(-1).nonzero().squeeze(-1)
    a0f = a0.reshape(-1).index_select(0, nz)
    hf = half.reshape(-1).index_select(0, nz)
    owner = torch.div(nz, K, rounding_mode="floor")
    x, w = _gl_nodes(num_nodes, dtype, device)
    hh = hi.index_select(0, owner).unsqueeze(-1)
    pp = pi.index_select(0, owner).unsqueeze(-1)
    aa = ai.index_select(0, owner).unsqueeze(-1)
    # per node (in place: these are the largest temporaries)
    s = torch.addcmul((a0f + hf).unsqueeze(-1), hf.unsqueeze(-1), x)
    t = s + pp
    f2 = (s + 2.0 * pp).mul_(s).mul_(-0.5).exp_().mul_(w * hh)       # w·exp(−s(s + 2p)/2)·h
    t2 = t.mul_(t)
    f2.div_(t2 + hh * hh)                                           # ... / (h² + t²)
    rho = t2.add_(aa * aa + hh * hh).sqrt_()
    f3 = torch.special.erfcx(rho * _SQRT1_2).div_(rho).mul_(f2)     # ... · erfcx(ρ/√2)/ρ
    val2 = f2.sum(-1) * hf                                          # elementwise: no shape-dependent BLAS path
    val3 = f3.sum(-1) * hf
    I2 = torch.zeros_like(pi).index_add(0, owner, val2)
    I3 = torch.zeros_like(pi).index_add(0, owner, val3)
    # (an integral that underflows to 0 only occurs for h <~ 1e-300, where the result is not trusted anyway)
    tiny = torch.full_like(I2, _DIV_TINY)
    lD = -0.5 * (hi * hi + pi * pi) + torch.log(torch.where(I2 > tiny, I2, tiny)) - _LOG_2PI
    big_a = ai > _ON_PLANE_TOL
    lE = -0.5 * (ai * ai + hi * hi + pi * pi) + torch.log(torch.where(big_a, ai, torch.ones_like(ai))) \
        + torch.log(torch.where(I3 > tiny, I3, tiny)) - _LOG_4PI
    lE = torch.where(big_a, lE, torch.full_like(lE, float("-inf")))
    ninf = torch.full_like(a, float("-inf"))
    # 2-D facet masses P_j = 1[foot ∈ facet] − Σ_k sign(h_jk) D_jk
    lead2 = torch.where(foot_in, torch.zeros_like(a), ninf).reshape(-1)
    m2, m2_ok, S2, A2 = _flux_sum(lD, -sh, ji, B * F, lead2)
    bad2 = torch.zeros(B * F, dtype=dtype, device=device).index_add(0, ji, unres.to(dtype)) > 0
    ok_f = (m2_ok & (S2 > 0) & (A2 <= max_amp * S2) & ~bad2).reshape(B, F) & live
    log_pf = (m2 + torch.log(torch.where(S2 > 0, S2, torch.ones_like(S2)))).reshape(B, F)
    # 3-D mass P = 1[0 ∈ ω] − Σ_j sign(d_j) [1[foot ∈ facet j] Φ̄(|d_j|) − Σ_k sign(h_jk) E_jk]
    lF = torch.where(foot_in & (a > _ON_PLANE_TOL), torch.special.log_ndtr(-a), ninf)
    logs = torch.cat([lF.reshape(-1), lE])
    signs = torch.cat([-torch.sign(ds).reshape(-1), torch.sign(ds.reshape(-1).index_select(0, ji)) * sh])
    own = torch.cat([torch.arange(B, device=device).repeat_interleave(F), bi])
    lead = torch.where(inside, torch.zeros_like(a[:, 0]), ninf[:, 0])
    m, m_ok, S, A = _flux_sum(logs, signs, own, B, lead)
    bad = torch.zeros(B, dtype=dtype, device=device).index_add(0, bi, unres.to(dtype)) > 0
    ok = m_ok & (S > 0) & (A <= max_amp * S) & ~bad & ~on_plane
    logP = m + torch.log(torch.where(S > 0, S, torch.ones_like(S)))
    # no facet at all: the whole space (no real row) or empty (exactly, by the facet polygons)
    no_real = ~real.any(-1)
    no_facet = ~live.any(-1) & ~no_real
    logP = torch.where(no_facet, torch.full_like(logP, float("-inf")), logP)
    logP = torch.where(no_real, torch.zeros_like(logP), logP)
    ok = ok | no_real | no_facet
    return logP, ok, log_pf, ok_f, live


class _Facets:
    """Facet polygons, their edges and the flux terms of a flat batch (see :func:`_facets`)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _facets(G, d, *, facet_tie_tol, quad):
    """Facet polygons, their edges (:func:`polygon_edges`) and the flux formulas (flat (B, F, 3), (B, F))."""
    Gs, ds, real, Qj, G2, d2 = _facet_polygons(G, d, facet_tie_tol)
    edges = polygon_edges(G2, d2)
    with torch.no_grad():
        logP, ok, log_pf, ok_f, live = _flux_3d(Gs.detach(), ds.detach(), real, G2.detach(), d2.detach(),
                                                tuple(x.detach() for x in edges), **quad)
    return _Facets(Gs=Gs, ds=ds, real=real, Qj=Qj, G2=G2, d2=d2, edges=edges, logP=logP, ok=ok, log_pf=log_pf,
                   ok_f=ok_f, live=live)


def _facet_terms(fac, logP, *, switch_mass, num_nodes_2d, s_cuts, mean_max_amp=DEFAULT_MEAN_MAX_AMP_2D,
                 facet_mean_weight=DEFAULT_FACET_MEAN_WEIGHT):
    r"""Facet weights r_j = exp(log φ(d_j) + log P_j − log P) and facet mean points m_j = d_j g_j + Q_j μ_j.

    P_j and μ_j are the 2-D mass and mean of facet j (see :func:`_facet_polygons`): the flux value of
    :func:`_flux_3d` and the edge formula μ_j = −Σ_k r_jk n_jk, r_jk = exp(log φ(h_jk) + log ΔΦ_jk − log P_j),
    with the analytic gradient of log P_j (that of :func:`log_mass_2d`); facets whose flux value is not trusted
    or whose edge formula cancels (Σ_k r_jk > ``mean_max_amp`` (1 + |μ_j|)) where that matters
    (r_j Σ_k r_jk > ``facet_mean_weight``: the error ~eps Σ_k r_jk of μ_j, weighted by r_j in E[u | ω], above
    ~1e-13) take :func:`std_moments_2d`.
    Returns (Gs, ds, r, m) with padding rows zeroed (r = 0 there).
    """
    Gs, ds, Qj = fac.Gs, fac.ds, fac.Qj
    B, F = ds.shape
    Gs2, ds2, e2, t_lo, t_hi, exists, _, _ = fac.edges
    # 1-D edge moments of the existing edges only
    eidx = exists.reshape(-1).nonzero().squeeze(-1)
    ld_e, mu_x, _ = interval_moments(t_lo.reshape(-1).index_select(0, eidx), t_hi.reshape(-1).index_select(0, eidx))
    ldphi = torch.zeros_like(ds2).reshape(-1).index_put((eidx,), ld_e).reshape(ds2.shape)
    mu_e = torch.zeros_like(ds2).reshape(-1).index_put((eidx,), mu_x).reshape(ds2.shape)
    live = fac.live
    lpf0 = torch.where(live, fac.log_pf, torch.zeros_like(fac.log_pf))
    lpf = lpf0
    if torch.is_grad_enabled() and (ds2.requires_grad or Gs2.requires_grad):
        # log P_j with the analytic gradient ∂/∂d_k = r_jk, ∂/∂g_k = −r_jk x̄_jk (value untouched)
        lr2 = (-0.5 * ds2 * ds2 - LOG_SQRT_2PI + ldphi - lpf0.unsqueeze(-1)).detach()
        r2d = torch.where(exists, torch.exp(torch.where(exists, lr2, torch.zeros_like(lr2))), torch.zeros_like(lr2))
        xbar = (ds2.unsqueeze(-1) * Gs2 + mu_e.unsqueeze(-1) * e2).detach()
        sur = (r2d * (ds2 - (xbar * Gs2).sum(-1))).sum(-1)
        lpf = lpf0 + (sur - sur.detach())
    lr2 = -0.5 * ds2 * ds2 - LOG_SQRT_2PI + ldphi - lpf.unsqueeze(-1)
    r2 = torch.where(exists, torch.exp(torch.where(exists, lr2, torch.zeros_like(lr2))), torch.zeros_like(lr2))
    mu = -(r2.unsqueeze(-1) * Gs2).sum(-2)                                     # (B, F, 2)
    empty = torch.isneginf(logP)
    lp = torch.where(empty, torch.zeros_like(logP), logP).unsqueeze(-1)
    sr = r2.detach().sum(-1)
    cancels = sr > mean_max_amp * (1.0 + mu.detach().norm(dim=-1))
    # ... and matters: the facet's weight in E[u | ω] times the edge formula's rounding error (~eps Σ_k r_jk)
    lw = -0.5 * ds.detach() ** 2 - LOG_SQRT_2PI + lpf0 - lp + torch.log(torch.where(sr > 0, sr, torch.ones_like(sr)))
    redo = live & (~fac.ok_f | (cancels & ~(lw <= math.log(facet_mean_weight))))
    idx = redo.reshape(-1).nonzero().squeeze(-1)
    if idx.numel():
        sub = std_moments_2d(fac.G2.reshape(B * F, F, 2).index_select(0, idx),
                             fac.d2.reshape(B * F, F).index_select(0, idx), switch_mass=switch_mass,
                             num_nodes=num_nodes_2d, s_cuts=s_cuts, cov_max_amp=None)
        lpf = lpf.reshape(-1).index_put((idx,), sub.log_mass).reshape(B, F)
        mu = mu.reshape(-1, 2).index_put((idx,), sub.mean).reshape(B, F, 2)
    ok = live & ~torch.isneginf(lpf) & ~empty.unsqueeze(-1)
    lr = -0.5 * ds * ds - LOG_SQRT_2PI + torch.where(ok, lpf, torch.zeros_like(ds)) - lp
    rj = torch.where(ok, torch.exp(torch.where(ok, lr, torch.zeros_like(lr))), torch.zeros_like(lr))
    m = ds.unsqueeze(-1) * Gs + (Qj * mu.unsqueeze(-2)).sum(-1)
    return Gs, ds, rj, m


class _LogMass3d(torch.autograd.Function):
    """log P with the analytic divergence-theorem gradient: ∂log P/∂d_j = r_j, ∂log P/∂g_j = −r_j m_j."""

    @staticmethod
    def forward(ctx, G, d, kw):
        with torch.no_grad():
            lp = _log_mass_3d_impl(G, d, **kw)
        ctx.save_for_backward(G, d, lp)
        ctx.kw = kw
        return lp

    @staticmethod
    def backward(ctx, gout):
        G, d, lp = ctx.saved_tensors
        kw = ctx.kw
        F = d.shape[-1]
        fac = _facets(G.reshape(-1, F, 3), d.reshape(-1, F), facet_tie_tol=DEFAULT_FACET_TIE_TOL,
                      quad=_quad(kw))
        Gs, ds, rj, m = _facet_terms(fac, lp.reshape(-1), switch_mass=kw["switch_mass"],
                                     num_nodes_2d=kw["num_nodes_2d"], s_cuts=kw["s_cuts"])
        gr = gout.reshape(-1, 1) * rj
        return (-gr.unsqueeze(-1) * m).reshape(G.shape), gr.reshape(d.shape), None


def _quad(kw):
    """The flux-quadrature options of a keyword dict."""
    return dict(num_nodes=kw["flux_nodes"], z_cuts=DEFAULT_FLUX_Z_CUTS, h_ratio=DEFAULT_FLUX_H_RATIO,
                h_levels=DEFAULT_FLUX_H_LEVELS, max_amp=kw["flux_max_amp"])


def log_mass_3d(G: torch.Tensor, d: torch.Tensor, *, num_nodes: int = DEFAULT_NUM_NODES_3D,
                s_cuts=DEFAULT_S_CUTS, levels=DEFAULT_LEVELS, feas_tol: float = DEFAULT_FEAS_TOL,
                switch_mass: float = DEFAULT_SWITCH_MASS, num_nodes_2d: int = DEFAULT_NUM_NODES_2D,
                ridge_levels=DEFAULT_RIDGE_LEVELS, slice_rel_tol: float = DEFAULT_SLICE_REL_TOL,
                flux_nodes: int = DEFAULT_FLUX_NODES, flux_max_amp: float = DEFAULT_FLUX_MAX_AMP) -> torch.Tensor:
    """log P(u ∈ {G u <= d}) for u ~ N(0, I_3) (see module doc); -inf for empty polytopes.

    The flux formula (``flux_nodes`` Gauss–Legendre nodes per piece) is used where its cancellation amplifies
    the rounding error by at most ``flux_max_amp`` (and the origin / the facets' foot points are off the
    boundaries); the slicing quadrature (``num_nodes``, ``s_cuts``, ``levels``, ``ridge_levels``, ``feas_tol``)
    elsewhere. There, a slice whose 2-D flux formula is ill-conditioned uses the Owen's-T formula when its
    P₂ >= ``switch_mass`` or when its absolute error (<= 1e-15) weighted by φ(v1) is below ``slice_rel_tol``
    times the polytope's mass over the number of slices; the nested log-space slicing otherwise.

    **Gradients** are analytic (divergence theorem, from the facet masses and means): ∂log P/∂d_j = r_j,
    ∂log P/∂g_j = −r_j m_j (see :func:`_facet_terms`), exact wherever log P is.
    """
    kw = dict(num_nodes=num_nodes, s_cuts=s_cuts, levels=levels, feas_tol=feas_tol, switch_mass=switch_mass,
              num_nodes_2d=num_nodes_2d, ridge_levels=ridge_levels, slice_rel_tol=slice_rel_tol,
              flux_nodes=flux_nodes, flux_max_amp=flux_max_amp)
    if torch.is_grad_enabled() and (G.requires_grad or d.requires_grad):
        batch = broadcast_shapes(G.shape[:-2], d.shape[:-1])
        return _LogMass3d.apply(G.expand(batch + G.shape[-2:]), d.expand(batch + d.shape[-1:]), kw)
    return _log_mass_3d_impl(G, d, **kw)


def _log_mass_3d_impl(G, d, **kw):
    """:func:`log_mass_3d` without the custom gradient."""
    return _by_row_count(_log_mass_flat, G, d, _CHUNK_FLUX, kw=kw)


def _log_mass_flat(G, d, kw):
    return _mass_and_facets(G, d, kw, DEFAULT_FACET_TIE_TOL)[0]


def _mass_and_facets(Gf, df, kw, facet_tie_tol):
    """Flat log P (flux formula; slicing where it is not trusted) and the :func:`_facets` it came from."""
    fac = _facets(Gf, df, facet_tie_tol=facet_tie_tol, quad=_quad(kw))
    logP = fac.logP
    infeasible = ((Gf.norm(dim=-1) == 0) & (df < 0)).any(-1)
    logP = torch.where(infeasible, torch.full_like(logP, float("-inf")), logP)
    idx = (~fac.ok & ~infeasible).nonzero().squeeze(-1)
    if idx.numel():
        sl = _log_mass_slices(Gf.detach().index_select(0, idx), df.detach().index_select(0, idx),
                              **{k: v for k, v in kw.items() if k not in ("flux_nodes", "flux_max_amp")})
        logP = logP.index_put((idx,), sl)
    return logP, fac


def _log_mass_slices(G, d, *, num_nodes, s_cuts, levels, feas_tol, switch_mass, num_nodes_2d, ridge_levels,
                     slice_rel_tol):
    """log P by the slicing quadrature of the module doc (flat batch)."""
    out = _in_chunks(_log_mass_slices, G, d, _CHUNK_3D, num_nodes=num_nodes, s_cuts=s_cuts, levels=levels,
                     feas_tol=feas_tol, switch_mass=switch_mass, num_nodes_2d=num_nodes_2d,
                     ridge_levels=ridge_levels, slice_rel_tol=slice_rel_tol)
    if out is not None:
        return out
    batch = d.shape[:-1]
    Gf, df = _compact_rows(G, d)
    F = df.shape[-1]
    B = df.shape[0]
    dtype, device = df.dtype, df.device
    norm = Gf.norm(dim=-1)
    real = (norm > 0) & (df < float("inf"))
    Gs = torch.where(real.unsqueeze(-1), Gf, torch.zeros_like(Gf))
    ds = torch.where(real, df, torch.zeros_like(df))
    infeasible = ((norm == 0) & (df < 0)).any(-1)
    p, r, inside, nonempty, verts, vok = _nearest_point(Gs, ds, real, feas_tol)
    r = torch.where(inside, torch.zeros_like(r), r)
    e0 = torch.zeros(3, dtype=dtype, device=device)
    e0[0] = 1.0
    w = torch.where(inside.unsqueeze(-1), e0, p / torch.where(inside, torch.ones_like(r), r).unsqueeze(-1))
    Q = _basis(w)                                            # (B, 3, 2)
    al = (Gs * w.unsqueeze(-2)).sum(-1)                      # (B, F)
    # which planes / ridges are faces of the polytope (those through a feasible vertex; all of them when
    # the polytope has no vertex)
    if F >= 3:
        i2, i1 = (m.to(dtype) for m in _incidence(F, device))
        vf = vok.to(dtype)
        novert = ~vok.any(-1, keepdim=True)
        ridge_ok = ((vf @ i2) > 0) | novert
        plane_ok = ((vf @ i1) > 0) | novert
    else:
        ridge_ok = torch.ones(B, F * (F - 1) // 2, dtype=torch.bool, device=device)
        plane_ok = torch.ones(B, F, dtype=torch.bool, device=device)
    # cut points
    sc = torch.tensor(s_cuts, dtype=dtype, device=device)
    vmax = torch.sqrt(r * r + 2.0 * sc[-1])
    lo = torch.where(inside, -vmax, r)
    vv = (verts * w.unsqueeze(-2)).sum(-1)
    vv = torch.where(vok, vv, lo.unsqueeze(-1))
    decay = _decay_cuts(r, inside, sc)
    G2 = (Gs.unsqueeze(-1) * Q.unsqueeze(-3)).sum(-2)      # in-slice normals (B, F, 2), the same in every slice
    nq = G2.norm(dim=-1)
    lev = torch.tensor(levels, dtype=dtype, device=device)
    al_ok = real & (al.abs() > _DIV_TINY) & plane_ok   # |al| tiny: the cut moves to infinity (continuous)
    al_s = torch.where(al_ok, al, torch.ones_like(al))
    lcut = (ds.unsqueeze(-1) - nq.unsqueeze(-1) * lev) / al_s.unsqueeze(-1)
    lcut = torch.where(al_ok.unsqueeze(-1), lcut, lo[:, None, None]).reshape(B, -1)
    rcut = _ridge_cuts(Gs, ds, real, w, Q, lo, ridge_levels)
    if rcut.shape[-1]:
        rcut = torch.where(ridge_ok.repeat_interleave(rcut.shape[-1] // ridge_ok.shape[-1], dim=-1), rcut,
                           lo.unsqueeze(-1))
    cuts = torch.cat([vv, decay, lcut, rcut], dim=-1)
    # clamp to [lo, vmax]; ties resolve to the bound (no gradient on zero-length pieces)
    cuts = torch.where(cuts <= lo.unsqueeze(-1), lo.unsqueeze(-1), cuts)
    cuts = torch.where(cuts >= vmax.unsqueeze(-1), vmax.unsqueeze(-1), cuts)
    cuts = torch.sort(cuts, dim=-1).values
    a0 = cuts[..., :-1]
    half = 0.5 * (cuts[..., 1:] - a0)
    # the pieces of positive length, flat over the batch
    K = half.shape[-1]
    live = ~infeasible & nonempty & real.any(-1)
    pidx = ((half > 0) & live.unsqueeze(-1)).reshape(-1).nonzero().squeeze(-1)
    a0f = a0.reshape(-1).index_select(0, pidx)
    hf = half.reshape(-1).index_select(0, pidx)
    pb = torch.div(pidx, K, rounding_mode="floor")
    x, wt = _gl_nodes(num_nodes, dtype, device)
    v1 = ((a0f + hf).unsqueeze(-1) + hf.unsqueeze(-1) * x).reshape(-1)
    lw = (torch.log(hf).unsqueeze(-1) + torch.log(wt)).reshape(-1) - 0.5 * v1 * v1 - LOG_SQRT_2PI
    sb = pb.repeat_interleave(num_nodes)                     # pair of each slice
    # slice polygons {y : G2_k·y <= d_k − al_k v1}, rows renormalised (parallel rows: 0 / ±inf, -1)
    ok_row = real & (nq > _PARALLEL_TOL)
    ns = torch.where(ok_row, nq, torch.ones_like(nq))
    G2n = torch.where(ok_row.unsqueeze(-1), G2 / ns.unsqueeze(-1), torch.zeros_like(G2))
    rhs = ds.index_select(0, sb) - al.index_select(0, sb) * v1.unsqueeze(-1)
    okr = ok_row.index_select(0, sb)
    realr = real.index_select(0, sb)
    d2 = torch.where(okr, rhs / ns.index_select(0, sb),
                     torch.where(realr & (rhs < 0), -torch.ones_like(rhs), torch.full_like(rhs, float("inf"))))
    G2s = G2n.index_select(0, sb)
    # pass 1: flux formula, Owen's T where it is ill-conditioned
    rest = []

    def accept_all(idx, vals):
        rest.append((idx, vals))
        return torch.ones_like(idx, dtype=torch.bool)

    lp2 = log_mass_2d(G2s, d2, switch_mass=switch_mass, num_nodes=num_nodes_2d, s_cuts=s_cuts,
                      _accept_owens=accept_all, _max_amp=_SLICE_MAX_AMP)
    if rest and rest[0][0].numel():
        idx, vals = rest[0]
        trusted = torch.ones_like(lp2, dtype=torch.bool).index_fill(0, idx, False)
        trusted = trusted.index_put((idx,), vals >= math.log(switch_mass))
        ref = _segment_logsumexp(torch.where(trusted, lw + lp2, torch.full_like(lw, float("-inf"))), sb, B)
        nseg = torch.zeros(B, dtype=dtype, device=device).index_add(0, sb, torch.ones_like(lw))
        bound = math.log(slice_rel_tol / _OWENS_ABS_ERR) + ref - torch.log(nseg)
        sbi = sb.index_select(0, idx)
        need = ~trusted.index_select(0, idx) & (lw.index_select(0, idx) > bound.index_select(0, sbi))
        sub = idx[need]
        if sub.numel():
            lp2 = lp2.index_put((sub,), log_mass_2d(G2s.index_select(0, sub), d2.index_select(0, sub),
                                                    switch_mass=2.0, num_nodes=num_nodes_2d, s_cuts=s_cuts))
    logP = _segment_logsumexp(lw + lp2, sb, B)
    no_real = ~real.any(-1)
    logP = torch.where(no_real, torch.zeros_like(logP), logP)
    empty = infeasible | ~(nonempty | no_real)
    logP = torch.where(empty, torch.full_like(logP, float("-inf")), logP)
    return logP.reshape(batch)


def std_moments_3d(G: torch.Tensor, d: torch.Tensor, *, num_nodes: int = DEFAULT_NUM_NODES_3D,
                   s_cuts=DEFAULT_S_CUTS, levels=DEFAULT_LEVELS, feas_tol: float = DEFAULT_FEAS_TOL,
                   switch_mass: float = DEFAULT_SWITCH_MASS, num_nodes_2d: int = DEFAULT_NUM_NODES_2D,
                   facet_tie_tol: float = DEFAULT_FACET_TIE_TOL, ridge_levels=DEFAULT_RIDGE_LEVELS,
                   flux_nodes: int = DEFAULT_FLUX_NODES, flux_max_amp: float = DEFAULT_FLUX_MAX_AMP,
                   need_moments: bool = True) -> StandardMoments:
    r"""Mass and conditional moments of u ~ N(0, I_3) on {u : G u <= d} (see module doc).

    Args:
        G: (..., F, 3) unit outward normals (padding rows 0). d: (..., F) offsets (padding +inf).
        flux_nodes, flux_max_amp: Gauss–Legendre nodes per piece of the flux formula's edge integrals, and the
            largest amplification of rounding errors by its cancellation that is accepted (slicing otherwise).
        num_nodes: Gauss–Legendre nodes per piece along the slicing axis (slicing quadrature).
        s_cuts, levels, ridge_levels: extra cuts of the slicing axis (Gaussian decay; planes nearly parallel to slices).
        feas_tol: relative tolerance of the feasibility test of candidate nearest points / vertices (slicing).
        switch_mass, num_nodes_2d: options of the 2-D polygon masses (slices, and facets where their flux
            value is not trusted).
        facet_tie_tol: duplicated facets (same plane twice) are counted once (moments).
        need_moments: if False only log_mass is computed (mean and second_moment are returned as zeros).

    Returns:
        :class:`StandardMoments`: log_mass (...,), mean (..., 3), second_moment (..., 3, 3),
        log_mass_stderr = 0. Exact to ~1e-12 relative. Empty polytopes: -inf, 0, 0.
    """
    kw = dict(num_nodes=num_nodes, s_cuts=s_cuts, levels=levels, feas_tol=feas_tol, switch_mass=switch_mass,
              num_nodes_2d=num_nodes_2d, ridge_levels=ridge_levels, flux_nodes=flux_nodes,
              flux_max_amp=flux_max_amp)
    if not need_moments:
        logP = log_mass_3d(G, d, **kw)
        return StandardMoments(logP, logP.new_zeros(logP.shape + (3,)), logP.new_zeros(logP.shape + (3, 3)),
                               torch.zeros_like(logP))
    return _by_row_count(_std_moments_flat, G, d, _CHUNK_FLUX, kw=kw, facet_tie_tol=facet_tie_tol)


def _std_moments_flat(G, d, kw, facet_tie_tol):
    """:func:`std_moments_3d` on a flat batch (B, F, 3), (B, F) (one group of :func:`_by_row_count`)."""
    switch_mass, num_nodes_2d, s_cuts = kw["switch_mass"], kw["num_nodes_2d"], kw["s_cuts"]
    if torch.is_grad_enabled() and (G.requires_grad or d.requires_grad):
        # log P with its analytic gradient; the facets again, differentiably, for the moments
        logP = log_mass_3d(G, d, **kw)
        fac = _facets(G, d, facet_tie_tol=facet_tie_tol, quad=_quad(kw))
    else:
        logP, fac = _mass_and_facets(G, d, dict(kw, slice_rel_tol=DEFAULT_SLICE_REL_TOL), facet_tie_tol)
    Gs, ds, rj, m = _facet_terms(fac, logP, switch_mass=switch_mass, num_nodes_2d=num_nodes_2d, s_cuts=s_cuts)
    empty = torch.isneginf(logP)
    mean = -(rj.unsqueeze(-1) * Gs).sum(-2)
    Mm = (rj[..., None, None] * Gs.unsqueeze(-1) * m.unsqueeze(-2)).sum(-3)
    eye = torch.eye(3, dtype=d.dtype, device=d.device)
    second = eye - 0.5 * (Mm + Mm.transpose(-1, -2))
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    mean = torch.where(empty.unsqueeze(-1), zero, mean)
    second = torch.where(empty[..., None, None], zero, second)
    return StandardMoments(logP, mean, second, torch.zeros_like(logP))
