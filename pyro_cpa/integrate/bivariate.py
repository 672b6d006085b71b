r"""Standard-normal mass and moments on a convex polygon (S = 2): exact, batched, differentiable.

Whitened problem: u ~ N(0, I_2) on ω = {u : g_iᵀu <= d_i} (unit rows g_i; padding rows g_i = 0,
d_i = +inf are ignored).

**Edges.** For line i with tangent e_i = (−g_i2, g_i1) (counter-clockwise), the points
d_i g_i + t e_i of ω have t_lo <= t <= t_hi with t_hi = min_{k: g_k·e_i > 0} (d_k − d_i g_k·g_i)/(g_k·e_i),
t_lo = max over g_k·e_i < 0 of the same (±inf allowed); the edge exists iff t_hi > t_lo.

**Mass (default): flux formula.** With F(u) = −u e^{−|u|²/2}/(2π|u|²) (div F = φ₂ away from 0, unit flux
out of the origin) the divergence theorem gives, for any polygon whose boundary avoids the origin,

    P = 1[0 ∈ ω] − Σ_i sign(d_i) D_i,   D_i = (h_i/2π) ∫_{t_lo}^{t_hi} e^{−(h_i² + t²)/2} / (h_i² + t²) dt

(h_i = |d_i|; no recession-cone term: the flux through the arc at infinity vanishes). Each D_i is
computed with full relative precision in log space: the edge is split at t = 0 into half intervals
0 <= p < t < q, and I = ∫_p^q e^{−(t² − p²)/2} h/(h² + t²) dt (D = e^{−(h² + p²)/2} I / 2π) comes from
:func:`~pyro_cpa.integrate.edge_flux.log_edge_flux` (Gauss–Legendre pieces with node counts certified per
piece by a Bernstein-ellipse bound, Gauss–Laguerre tails far out, singularity subtraction of the Lorentzian's
poles near the origin; ~16 nodes per half-edge on the benchmark's edges, max relative error of I ~2e-15 vs
mpmath: tests/integrate/test_edge_flux.py). The terms are summed relative to the largest; the result is used where this
cancellation amplifies the rounding error by at most ``DEFAULT_FLUX_MAX_AMP`` = 1e3 (measured: <= ~1e-12
relative, also far out where P underflows in linear space), i.e. almost everywhere.

**Fallback for small polygons** (the flux's usual refusals: small regions a few units out, whose edge terms
cancel): with c the mean of the vertices, ρ the largest vertex distance from c, the polygon is the union of the
triangles (c, edge i), v = u − c = s (h_i g_i + t e_i) (h_i = d_i − g_i·c, Jacobian s h_i), and

    P = φ₂(c) Σ_i h_i ∫_0^1 ∫_{edge i} s exp(−c·v − |v|²/2) dt ds

by an n × n Gauss–Legendre product rule (positive terms, no cancellation; the exponent varies by at most
|c|ρ + ρ²/2). n is the fewest of ``DEFAULT_CUBATURE_NODES`` whose fitted error model meets
``DEFAULT_CUBATURE_TOL`` = 1e-16 relative (polygons beyond n = 13 go on below); the mean and covariance of
:func:`std_moments_2d`'s centred fallback come from the same nodes.

**Fallback near the mean** (Owen's T, signed triangles from the origin; origin on the boundary, very thin
slivers):

    P = θ_∞/(2π) + Σ_i sign(d_i) [ (atan(t_hi/h_i) − atan(t_lo/h_i))/(2π) − T(h_i, t_hi/h_i) + T(h_i, t_lo/h_i) ],

h_i = |d_i|, θ_∞ the angle of the recession cone {r : G r <= 0} (0 for bounded polygons; the CCW angle
from the outgoing to the incoming unbounded edge otherwise). Its absolute error is ~1e-16, so it is
used where P >= ``switch_mass`` (default 1e-4, i.e. relative error <~ 1e-12).

**Fallback far from the mean** (log space, the rare remaining polygons): rotate so that v1 points at the polygon's
nearest point to the origin (distance r; any direction if r = 0), then

    P = ∫ φ(v1) [Φ(b(v1)) − Φ(a(v1))] dv1,

with [a(v1), b(v1)] the slice of ω, by Gauss–Legendre (``num_nodes`` per piece, default 16) on
pieces split at the vertices' v1 (where a, b are linear), where a line's slice bound crosses
``levels`` (default −4, 0, 4: steep Φ transitions of lines nearly parallel to the slices) and at
v1 = sqrt(r² + 2s), s in
``s_cuts`` (so the Gaussian weight falls by a bounded factor per piece), truncated at s = s_cuts[-1]
(= 50, a relative tail of e^-50). Each slice is exact via :func:`log_ndtr_diff` and the sum is a
logsumexp, so log P ≈ −500 keeps ~1e-13 relative accuracy.

**Moments** (divergence theorem), with ΔΦ_i = Φ(t_hi) − Φ(t_lo) and r_i = exp(log φ(d_i) + log ΔΦ_i − log P):

    E[u | ω] = −Σ_i r_i g_i,   E[u uᵀ | ω] = I − Σ_i r_i (d_i g_i + μ_i e_i) g_iᵀ  (symmetrised),

μ_i = E[t | t_lo < t < t_hi] = (φ(t_lo) − φ(t_hi))/ΔΦ_i. All in log space: conditional moments never
underflow. Results are exact to machine precision (quadrature rules chosen to reach ~1e-13). Where the
covariance E[uuᵀ] − E[u]E[u]ᵀ (or the mean) would cancel (far-out or thin polygons), :func:`centred_moments`
computes it centred: the cubature above, or the slicing quadrature with each slice's exact 1-D moments, cut at
``DEFAULT_CENTRED_S_CUTS`` (coarser than the mass's cuts, with the node count of its error model,
:func:`_centred_num_nodes`).

An empty polygon returns log_mass = -inf, mean = 0, second_moment = 0 (NaN-free).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from .._shapes import broadcast_shapes
from .edge_flux import log_edge_flux
from .owens_t import DEFAULT_OWENS_T_NODES, owens_t
from .types import StandardMoments
from .univariate import LOG_SQRT_2PI, _gl_nodes, interval_stats, log_ndtr_diff

__all__ = ["std_moments_2d", "polygon_edges", "translate_edges", "PolygonEdges", "log_mass_2d",
           "DEFAULT_SWITCH_MASS", "DEFAULT_NUM_NODES", "DEFAULT_S_CUTS"]

DEFAULT_SWITCH_MASS = 1e-4
DEFAULT_NUM_NODES = 16
DEFAULT_S_CUTS = (0.0, 0.5, 1.5, 3.5, 7.5, 15.0, 30.0, 50.0)
# slice-bound levels ±sqrt(2 s), s in DEFAULT_S_CUTS: the Gaussian factor falls by a bounded amount per piece
DEFAULT_LEVELS = tuple(sorted({sg * math.sqrt(2.0 * s) for s in DEFAULT_S_CUTS for sg in (-1.0, 1.0)}))
# cuts of the centred-moment slicing (centred_moments): coarser than the mass slicing's, chosen by the error model of
# _moments_slices (every pair of pieces within DEFAULT_CENTRED_TOL at DEFAULT_NUM_NODES nodes); levels ±sqrt(2 s)
DEFAULT_CENTRED_S_CUTS = (0.0, 6.0, 16.0, 30.0, 50.0)
DEFAULT_CENTRED_TOL = 1e-16
DEFAULT_COV_MAX_AMP = 1e4   # see std_moments_2d
DEFAULT_MEAN_MAX_AMP = 1e3  # see std_moments_2d
_R_TINY = 1e-150
_DIV_TINY = 1e-300     # guards divisions whose result is then discarded (continuous: the cut moves to infinity)
_TWO_PI = 2.0 * math.pi
_LOG_2PI = math.log(_TWO_PI)
DEFAULT_PARALLEL_TOL = 1e-14   # |g_i × g_k| <= this: lines i, k are parallel (see polygon_edges)
DEFAULT_TIE_TOL = 1e-12        # parallel lines closer than this (relative to 1 + |d|) coincide
DEFAULT_FLUX_MIN_H = 3.0 ** -9   # an edge this close to the origin (foot point within t < 1): Owen's-T fallback
DEFAULT_FLUX_MAX_AMP = 1e3
DEFAULT_CUBATURE_NODES = (4, 5, 6, 7, 9, 11, 13)   # node counts (per direction) of the small-polygon cubature
DEFAULT_CUBATURE_TOL = 1e-16    # model error (relative) that the cubature's node count must meet (see _cubature)
_CUBATURE_LIN_MODEL = (0.5, 0.34)    # (A, β): relative error A (β lin)^{2n}/(2n)! of the linear part (fitted, rounded up)
_CUBATURE_QUAD_MODEL = (0.5, 0.15)   # (A, β): relative error A (β quad)^n/n! of the quadratic part (fitted, rounded up)
_GROUP_MIN_ROWS = 512   # polygon_edges groups batches of at least this many polygons by facet count
_CHUNK = 8192   # pairs per chunk of the flattened batch (keeps the (chunk, F, F) temporaries in cache)


class PolygonEdges(NamedTuple):
    """The edges of a batch of polygons {u : G u <= d} (:func:`polygon_edges`, :func:`translate_edges`).

    Attributes (batch shape ``...``, F rows): ``Gs`` (..., F, 2) and ``ds`` (..., F), the rows with padding
    zeroed; ``e`` (..., F, 2) the tangents (−g_2, g_1); ``t_lo``, ``t_hi`` (..., F) the edge parameter ranges
    (safe values 0, 1 where the edge does not exist); ``exists`` (..., F); ``empty``, ``whole`` (...,) flags.
    """

    Gs: torch.Tensor
    ds: torch.Tensor
    e: torch.Tensor
    t_lo: torch.Tensor
    t_hi: torch.Tensor
    exists: torch.Tensor
    empty: torch.Tensor
    whole: torch.Tensor

    def map(self, fn) -> "PolygonEdges":
        """``fn(x, event_dims)`` applied to each field; ``event_dims`` is the number of its trailing non-batch
        dimensions (2 for Gs and e, 1 for the per-row fields, 0 for the flags)."""
        return PolygonEdges(*(fn(x, k) for x, k in zip(self, (2, 1, 2, 1, 1, 1, 0, 0))))

    def flat(self) -> "PolygonEdges":
        """The fields with the batch flattened to one dimension."""
        n = self.empty.numel()
        return self.map(lambda x, k: x.reshape((n,) + x.shape[x.dim() - k:]))

    def select(self, idx: torch.Tensor) -> "PolygonEdges":
        """The polygons ``idx`` of a flat batch (:meth:`flat`)."""
        return self.map(lambda x, k: x.index_select(0, idx))


def polygon_edges(G: torch.Tensor, d: torch.Tensor, *, parallel_tol: float = DEFAULT_PARALLEL_TOL,
                  tie_tol: float = DEFAULT_TIE_TOL) -> PolygonEdges:
    r"""Edges of {u : G u <= d} in 2-D.

    Each polygon's real rows (g_i != 0, d_i < inf) are taken in their order, and the polygons are grouped by
    their number k of real rows, so that the pairwise work is k² per polygon rather than F² on the padding
    (a Python loop over the <= F + 1 distinct counts, never over polygons). Every pairwise quantity is
    computed elementwise in a fixed order (no matmul, whose rounding depends on the shape), so that the
    result does not depend on batch shape, chunking, grouping or BLAS:

        c_ik = g_i·g_k,   s_ik = e_i·g_k = g_i0 g_k1 − g_i1 g_k0   (s_ki = −s_ik bitwise),
        num_ik = d_k − d_i c_ik.

    The self-term k = i is excluded by construction (off-diagonal mask). Lines with |s_ik| <= ``parallel_tol``
    are parallel: they never bound each other's edges; instead (δ = d_k − d_i, w = d_i + d_k, both exact
    (anti)symmetric in i, k; τ = ``tie_tol`` (1 + |d_i| + |d_k|))

    * same orientation (c_ik > 0): edge i is dropped if δ < −τ (line k is stricter) or |δ| <= τ and
      k < i (duplicates within τ: the first one is kept);
    * opposite orientation: a strip of width w <= τ is treated as empty (its mass is below τ φ).

    Otherwise the vertex of lines i, k is computed once, on the line of smaller index i < k,
    t_ik = num_ik / s_ik, and its parameter on line k is the projection of that same point,
    t_ki = d_i s_ki + c_ik t_ik, so that the two edges meeting there share the vertex (the contour
    closes even for nearly parallel lines, whose intersection is ill-conditioned). Then
    t_hi = min_{k: s_ik > tol} t_ik, t_lo = max_{k: s_ik < −tol} t_ik and edge i exists iff t_hi > t_lo.

    Returns :class:`PolygonEdges` ``(Gs, ds, e, t_lo, t_hi, exists, empty, whole)``: rows with padding zeroed
    (Gs, ds = 0), tangents e (..., F, 2), edge parameter ranges (..., F) (safe values 0, 1 where the edge does
    not exist), the existence mask, and (...,) flags for an empty polygon and for the whole plane.
    """
    batch = broadcast_shapes(G.shape[:-2], d.shape[:-1])
    F = G.shape[-2]
    n = math.prod(batch)
    out = _edges_flat(G.expand(batch + (F, 2)).reshape(n, F, 2), d.expand(batch + (F,)).reshape(n, F),
                      parallel_tol, tie_tol)
    return PolygonEdges(*(x.reshape(batch + x.shape[1:]) for x in out))


def translate_edges(edges: PolygonEdges, d: torch.Tensor, shift: torch.Tensor) -> PolygonEdges:
    r"""The edges of the translated polygon {u : G u <= d} from those of {v : G v <= ĉ}, u = v − δ, without
    pairwise work: O(F) per polygon instead of :func:`polygon_edges`' O(F²).

    With d_i = ĉ_i − g_i·δ, the point v = ĉ_i g_i + t' e_i of line i is u = d_i g_i + (t' − e_i·δ) e_i. A
    translation moves no line relative to another, so everything combinatorial — which lines bound edges,
    which vertex ends which edge, ``exists``, ``empty``, ``whole``, the parallel/tie decisions (made with the
    tolerances of :func:`polygon_edges` on ĉ) — is that of the untranslated polygon, and only

        ds_i = d_i,   t_lo,i = t'_lo,i − e_i·δ,   t_hi,i = t'_hi,i − e_i·δ   (±inf stay ±inf)

    move (on the existing edges; the others keep the safe values 0, 1). The caller supplies d (..., F) and
    shift_i = e_i·δ (..., F), both computed from the same δ; ``edges`` (those of {G v <= ĉ}) must have the batch
    shape of d (gather them per pair first). E.g. the polygon of (datum n, region ω) is that of the region in
    v = L_ω⁻¹z, translated by δ = L_ω⁻¹μ_nω: d_j = ĉ_j − ĥ_jᵀμ, e_j·δ = ê_jᵀμ with ĥ_j = L⁻ᵀg_j, ê_j = L⁻ᵀe_j
    (:func:`pyro_cpa.distributions.chunked.whiten_chunk`).

    Rounding: t'_lo, t'_hi carry the absolute error of vertices computed from ĉ (~eps·|ĉ|/|g_i × g_k|), the
    shift ~eps·|ê||μ|: the same absolute error as the vertices :func:`polygon_edges` computes from d, whose
    d_i = ĉ_i − ĥ_iᵀμ already carry ~eps(|ĉ| + |ĥ||μ|) (tests/integrate/test_bivariate_translate.py
    checks both against mpmath far from the origin). An edge shorter than the rounding of the shift can come out
    with t_lo = t_hi (rounding is monotone, never t_lo > t_hi); its mass is then 0 in every formula.
    """
    real = (edges.Gs != 0).any(-1)
    ds = torch.where(real, d, torch.zeros_like(d))
    t_lo = torch.where(edges.exists, edges.t_lo - shift, edges.t_lo)
    t_hi = torch.where(edges.exists, edges.t_hi - shift, edges.t_hi)
    return edges._replace(ds=ds, t_lo=t_lo, t_hi=t_hi)


def _edges_flat(G: torch.Tensor, d: torch.Tensor, parallel_tol: float, tie_tol: float):
    """:func:`polygon_edges` on a flat batch (B, F, 2), (B, F).

    Batches of at least ``_GROUP_MIN_ROWS`` polygons are grouped by their number of real rows (no pairwise
    work on padding); smaller ones are done in one padded pass (fewer, larger kernels). Both give bitwise the
    same values (the same elementwise operations; min/max are exact), so the result does not depend on the
    batch size."""
    B, F = d.shape
    norm = G.norm(dim=-1)
    real = (norm > 0) & (d < float("inf"))               # padding rows are exactly zero / +inf by construction
    infeasible = ((norm == 0) & (d < 0)).any(dim=-1)
    Gs = torch.where(real.unsqueeze(-1), G, torch.zeros_like(G))
    ds = torch.where(real, d, torch.zeros_like(d))
    e = torch.stack([-Gs[..., 1], Gs[..., 0]], dim=-1)
    cnt = real.sum(-1)
    whole = (cnt == 0) & ~infeasible
    if B < _GROUP_MIN_ROWS or F <= 1:
        lo, hi, ex, strip = _edges_group(Gs, ds, parallel_tol, tie_tol, real)
        empty = infeasible | strip | (~ex.any(-1) & ~whole)
        ex = ex & ~empty.unsqueeze(-1)
        return (Gs, ds, e, torch.where(ex, lo, torch.zeros_like(lo)), torch.where(ex, hi, torch.ones_like(hi)),
                ex, empty, whole)
    t_lo = ds.new_zeros(B * F)
    t_hi = ds.new_ones(B * F)
    exists = torch.zeros(B * F, dtype=torch.bool, device=d.device)
    empty = infeasible.clone()
    Gf, df = Gs.reshape(B * F, 2), ds.reshape(B * F)
    for k in cnt.unique().tolist():
        if k == 0:
            continue
        rows = (cnt == k).nonzero().squeeze(-1)
        n = rows.numel()
        pos = real.index_select(0, rows).nonzero()[:, 1].reshape(n, k)     # real rows in their order
        fidx = (rows.unsqueeze(-1) * F + pos).reshape(-1)
        lo, hi, ex, strip = _edges_group(Gf.index_select(0, fidx).reshape(n, k, 2),
                                         df.index_select(0, fidx).reshape(n, k), parallel_tol, tie_tol)
        emp = infeasible.index_select(0, rows) | strip | ~ex.any(-1)
        ex = ex & ~emp.unsqueeze(-1)
        empty = empty.index_copy(0, rows, emp)
        exists = exists.index_copy(0, fidx, ex.reshape(-1))
        t_lo = t_lo.index_copy(0, fidx, torch.where(ex, lo, torch.zeros_like(lo)).reshape(-1))
        t_hi = t_hi.index_copy(0, fidx, torch.where(ex, hi, torch.ones_like(hi)).reshape(-1))
    return Gs, ds, e, t_lo.reshape(B, F), t_hi.reshape(B, F), exists.reshape(B, F), empty, whole


def _edges_group(g: torch.Tensor, dd: torch.Tensor, parallel_tol: float, tie_tol: float,
                 real: torch.Tensor | None = None):
    """``(t_lo, t_hi, exists, strip_empty)`` of polygons with k rows each, (n, k, 2), (n, k) (see
    :func:`polygon_edges`; ``exists`` before the empty-polygon mask). ``real`` (n, k) marks the real rows
    (None: all are real)."""
    n, k = dd.shape
    if k <= 1:
        inf = torch.full_like(dd, float("inf"))
        ex = torch.ones_like(dd, dtype=torch.bool) if real is None else real
        return -inf, inf, ex, torch.zeros(n, dtype=torch.bool, device=dd.device)
    g0, g1 = g[..., 0], g[..., 1]
    gi0, gi1, gk0, gk1 = g0.unsqueeze(-1), g1.unsqueeze(-1), g0.unsqueeze(-2), g1.unsqueeze(-2)
    c = gi0 * gk0 + gi1 * gk1                           # c[i, k] = g_i·g_k (bitwise symmetric)
    s = gi0 * gk1 - gi1 * gk0                           # s[i, k] = e_i·g_k (bitwise antisymmetric)
    di, dk = dd.unsqueeze(-1), dd.unsqueeze(-2)
    num = dk - di * c                                   # d_k − d_i c_ik
    idx = torch.arange(k, device=dd.device)
    upper = idx.unsqueeze(-1) < idx.unsqueeze(0)        # [i, k]: i < k
    pair = upper | upper.transpose(0, 1)                # k != i
    if real is not None:
        pair = pair & real.unsqueeze(-1) & real.unsqueeze(-2)
    par = s.abs() <= parallel_tol
    own = num / torch.where(par, torch.ones_like(s), s)             # t_ik from line i's side
    other = dk * s + c * own.transpose(-1, -2)                      # t_ik as the projection of line k's t_ki
    t = torch.where(upper, own, other)
    inf = torch.full_like(t, float("inf"))
    t_hi = torch.where(pair & (s > parallel_tol), t, inf).amin(dim=-1)
    t_lo = torch.where(pair & (s < -parallel_tol), t, -inf).amax(dim=-1)
    # parallel pairs
    parm = pair & par
    tol = tie_tol * (1.0 + di.abs() + dk.abs())
    same = c > 0
    delta = dk - di
    dropped = parm & same & ((delta < -tol) | ((delta.abs() <= tol) & ~upper))
    strip_empty = (parm & ~same & (di + dk <= tol)).flatten(-2).any(dim=-1)
    exists = (t_hi > t_lo) & ~dropped.any(dim=-1)
    if real is not None:
        exists = exists & real
    return t_lo, t_hi, exists, strip_empty


def _in_chunks(fn, G: torch.Tensor, d: torch.Tensor, chunk: int, edges: PolygonEdges | None = None, **kw):
    """``fn(G, d, **kw)`` evaluated on chunks of the flattened batch (keeps the temporaries in cache);
    None when the batch fits in one chunk. ``fn`` returns a tensor (...,) or a :class:`StandardMoments`.
    Given ``edges`` (:class:`PolygonEdges` of the batch), each chunk gets its own as ``fn(..., edges=...)``."""
    batch = d.shape[:-1] if G.shape[:-2] == d.shape[:-1] else broadcast_shapes(G.shape[:-2], d.shape[:-1])
    F, S = G.shape[-2], G.shape[-1]
    n = math.prod(batch)
    if n <= chunk:
        return None
    Gf = G.expand(batch + (F, S)).reshape(n, F, S)
    df = d.expand(batch + (F,)).reshape(n, F)
    if edges is not None:
        ef = edges.flat()
        kw_at = lambda i: dict(kw, edges=ef.map(lambda x, k: x[i:i + chunk]))   # noqa: E731
    else:
        kw_at = lambda i: kw   # noqa: E731
    outs = [fn(Gf[i:i + chunk], df[i:i + chunk], **kw_at(i)) for i in range(0, n, chunk)]
    if isinstance(outs[0], torch.Tensor):
        return torch.cat(outs).reshape(batch)
    return type(outs[0])(*(None if f[0] is None else torch.cat(f).reshape(batch + f[0].shape[1:])
                           for f in zip(*outs)))


def _edge_stats(t_lo: torch.Tensor, t_hi: torch.Tensor, exists: torch.Tensor):
    """``(log ΔΦ_i, μ_i)`` of the existing edges (:func:`interval_stats` of (t_lo, t_hi), evaluated on those
    entries only); 0 elsewhere."""
    idx = exists.reshape(-1).nonzero().squeeze(-1)
    lm, mu, _ = interval_stats(t_lo.reshape(-1).index_select(0, idx), t_hi.reshape(-1).index_select(0, idx),
                               variance=False)
    z = t_lo.new_zeros(t_lo.numel())
    return z.index_copy(0, idx, lm).reshape(t_lo.shape), z.index_copy(0, idx, mu).reshape(t_lo.shape)


def _cross(x, y):
    return x[..., 0] * y[..., 1] - x[..., 1] * y[..., 0]


def _mass_owens(ds, e, t_lo, t_hi, exists, whole, owens_nodes):
    """The Owen's-T edge formula (absolute accuracy ~1e-16)."""
    h = ds.abs()
    use = exists & (h > 0)
    hs = torch.where(use, h, torch.ones_like(h))
    fhi, flo = torch.isfinite(t_hi), torch.isfinite(t_lo)
    a_hi = torch.where(fhi, torch.where(fhi, t_hi, torch.zeros_like(h)) / hs, t_hi)   # no inf·0 in backward
    a_lo = torch.where(flo, torch.where(flo, t_lo, torch.zeros_like(h)) / hs, t_lo)
    a_hi = torch.where(use, a_hi, torch.ones_like(h))
    a_lo = torch.where(use, a_lo, torch.zeros_like(h))
    tri = ((torch.atan(a_hi) - torch.atan(a_lo)) / _TWO_PI
           - owens_t(hs, a_hi, owens_nodes) + owens_t(hs, a_lo, owens_nodes))
    tri = torch.where(use, torch.sign(ds) * tri, torch.zeros_like(tri))
    out = exists & torch.isposinf(t_hi)
    inn = exists & torch.isneginf(t_lo)
    e_out = (e * out.unsqueeze(-1)).sum(-2)
    e_in = (e * inn.unsqueeze(-1)).sum(-2)
    one = (out.sum(-1) == 1) & (inn.sum(-1) == 1)
    cr = torch.clamp(_cross(e_out, -e_in), min=0.0)
    dt = (e_out * -e_in).sum(-1)
    cr = torch.where(one, cr, torch.zeros_like(cr))
    dt = torch.where(one, dt, torch.ones_like(dt))
    theta = torch.where(one, torch.atan2(cr, dt), torch.zeros_like(cr))
    theta = torch.where(whole, torch.full_like(theta, _TWO_PI), theta)
    return theta / _TWO_PI + tri.sum(-1)


def _cubature_spread(Gs, ds, e, t_lo, t_hi, exists):
    r"""``(c, lin, quad, bounded)`` of each polygon (flat batch) for :func:`_cubature`: the centre c (mean of the
    vertices V_i = d_i g_i + t_hi,i e_i), the spreads lin = |c| ρ and quad = ρ²/2 (ρ = max_i |V_i − c|) and whether
    the polygon is bounded (every existing edge finite) and has an edge. On the polygon v = u − c has |v| <= ρ,
    so the exponent −c·v − |v|²/2 of φ₂(u)/φ₂(c) varies by at most lin (linear part) and quad (quadratic part)."""
    fin = exists & torch.isfinite(t_lo) & torch.isfinite(t_hi)
    bounded = (fin | ~exists).all(-1) & exists.any(-1)
    th = torch.where(fin, t_hi, torch.zeros_like(t_hi))
    V = ds.unsqueeze(-1) * Gs + th.unsqueeze(-1) * e
    wf = fin.to(ds.dtype)
    c = (V * wf.unsqueeze(-1)).sum(-2) / wf.sum(-1).clamp(min=1.0).unsqueeze(-1)
    dv = V - c.unsqueeze(-2)
    rho2 = ((dv * dv).sum(-1) * wf).amax(-1).detach()               # the spreads only decide: no gradient
    return c, torch.sqrt((c.detach() ** 2).sum(-1) * rho2), 0.5 * rho2, bounded


@functools.lru_cache(maxsize=None)
def _cubature_limits(n: int, tol: float) -> tuple[float, float]:
    """The largest (lin, quad) spreads at which the n-node rule of :func:`_cubature` meets ``tol`` (relative error of
    the mass) by the error model of ``_CUBATURE_LIN_MODEL`` and ``_CUBATURE_QUAD_MODEL``."""
    (a_l, b_l), (a_q, b_q) = _CUBATURE_LIN_MODEL, _CUBATURE_QUAD_MODEL
    lin = math.exp((math.log(tol / a_l) + math.lgamma(2 * n + 1)) / (2 * n)) / b_l
    quad = math.exp((math.log(tol / a_q) + math.lgamma(n + 1)) / n) / b_q
    return lin, quad


def _cubature_tiers(lin, quad, bounded, tiers, need_moments, tol):
    """Node count per polygon: the first of ``tiers`` (increasing) whose model error at the polygon's spreads is
    within ``tol`` (0: none, the polygon is not for the cubature). The covariance costs one node (see
    :func:`_cubature`)."""
    lim = torch.tensor([_cubature_limits(n - 1 if need_moments else n, tol) for n in tiers], dtype=lin.dtype,
                       device=lin.device)                       # (tiers, 2), increasing in n
    k = torch.maximum(torch.searchsorted(lim[:, 0].contiguous(), lin), torch.searchsorted(lim[:, 1].contiguous(), quad))
    n_tab = torch.tensor(tuple(tiers) + (0,), dtype=torch.long, device=lin.device)
    return torch.where(bounded, n_tab.index_select(0, k.reshape(-1)).reshape(k.shape), torch.zeros_like(k))


def _edge_total(W: torch.Tensor) -> torch.Tensor:
    """Σ over the last three dimensions (edge, node, node) of W (B, F, n, n): per edge over its nodes, then over the
    edges in row order (a cumulative sum is sequential), so that padding rows (zeros, appended) leave the value
    unchanged to the last bit: a polygon's cubature does not depend on how many rows its batch is padded to."""
    return W.sum((-1, -2)).cumsum(-1)[..., -1]


def _cubature(Gs, ds, e, t_lo, t_hi, exists, c, num_nodes, need_moments):
    r"""log P (and E[u | ω], Cov[u | ω] if ``need_moments``) of small bounded polygons (flat batch) by a collapsed
    product Gauss–Legendre rule on the triangles (c, edge i).

    With c inside the polygon (:func:`_cubature_spread`), h_i = d_i − g_i·c >= 0 and τ_i = e_i·c, the polygon is
    the union of the triangles v = u − c = s (h_i g_i + t e_i), 0 <= s <= 1, t_lo,i − τ_i <= t <= t_hi,i − τ_i
    (Jacobian s h_i), so that

        P = φ₂(c) Σ_i h_i ∫∫ s exp(−s (h_i (g_i·c) + t τ_i) − s² (h_i² + t²)/2) ds dt,

    by ``num_nodes`` GL nodes in s and in t; every term is positive (no cancellation) and its exponent lies
    within [−lin − quad, lin + quad] (:func:`_cubature_spread`). The mean c + E[v] and the covariance
    E[(v − v̄)(v − v̄)ᵀ] are taken from the same nodes (two passes, non-negative sums). Error model (the integrand
    is entire; fitted to the measured worst relative errors of random triangles, with the constants rounded
    up): the mass is within A_l (β_l lin)^{2n}/(2n)! + A_q (β_q quad)^n/n! (``_CUBATURE_LIN_MODEL``,
    ``_CUBATURE_QUAD_MODEL``: the linear part of the exponent is resolved like e^{x} by GL, the quadratic part
    e^{−s²t²/2} only per power of s²t²), the covariance within that of n − 1 nodes (its integrand has two more
    powers of v); checked against mpmath in tests/integrate/test_bivariate_fallback.py. The rounding error is
    that of the vertices (absolute ~eps (|d| + |t|)), as for every S = 2 formula here.
    """
    dtype, device = ds.dtype, ds.device
    x, w = _gl_nodes(num_nodes, dtype, device)
    s = 0.5 * (1.0 + x)                                               # (n,) radial nodes on [0, 1]
    ws = (0.5 * w * s).unsqueeze(-1)                                  # GL weight · Jacobian factor s, (n, 1)
    s_, s2 = s.unsqueeze(-1), (s * s).unsqueeze(-1)
    cg = (Gs * c.unsqueeze(-2)).sum(-1)                               # g_i·c
    tau = (e * c.unsqueeze(-2)).sum(-1)                               # e_i·c
    h = torch.where(exists, (ds - cg).clamp(min=0.0), torch.zeros_like(ds))
    a = torch.where(exists, t_lo - tau, torch.zeros_like(ds))
    half = torch.where(exists, 0.5 * (t_hi - t_lo), torch.zeros_like(ds))
    t = (a + half).unsqueeze(-1) + half.unsqueeze(-1) * x             # (B, F, n) edge nodes
    lin = (h * cg).unsqueeze(-1) + t * tau.unsqueeze(-1)              # c·(h g + t e)
    quad = 0.5 * ((h * h).unsqueeze(-1) + t * t)                      # |h g + t e|² / 2
    expo = -(s_ * lin.unsqueeze(-2)) - s2 * quad.unsqueeze(-2)        # (B, F, n_s, n_t), within [−Δ, Δ]
    W = torch.exp(expo) * (ws * ((h * half).unsqueeze(-1) * w).unsqueeze(-2))
    tot = _edge_total(W)
    pos = tot > 0                                     # False only for a polygon of zero area (log P = -inf)
    logP = torch.where(pos, torch.log(torch.where(pos, tot, torch.ones_like(tot))),
                       torch.full_like(tot, float("-inf"))) - 0.5 * (c * c).sum(-1) - _LOG_2PI
    if not need_moments:
        return logP, None, None
    Wn = W / torch.where(pos, tot, torch.ones_like(tot))[:, None, None, None]
    v = [s_ * (h.unsqueeze(-1) * Gs[..., k:k + 1] + t * e[..., k:k + 1]).unsqueeze(-2) for k in (0, 1)]

    def total(y):
        return _edge_total(Wn * y)

    vbar = [total(vk) for vk in v]
    dv = [vk - vb[:, None, None, None] for vk, vb in zip(v, vbar)]
    cxx, cxy, cyy = total(dv[0] * dv[0]), total(dv[0] * dv[1]), total(dv[1] * dv[1])
    mean = c + torch.stack(vbar, -1)
    cov = torch.stack([torch.stack([cxx, cxy], -1), torch.stack([cxy, cyy], -1)], -2)
    return logP, mean, cov


def _cubature_small(Gs, ds, e, t_lo, t_hi, exists, need_moments, tiers=DEFAULT_CUBATURE_NODES,
                    tol=DEFAULT_CUBATURE_TOL):
    """:func:`_cubature` on the polygons (flat batch) that are small enough for one of the node counts ``tiers``
    (the fewest that meets ``tol`` by the error model, the mass's or the covariance's as ``need_moments``).

    Returns ``(sel, logP, mean, cov)``: ``sel`` (B,) marks the polygons done; the other outputs are over
    ``sel.nonzero()`` in order (mean, cov None without moments). A Python loop over the <= len(tiers) node
    counts, never over polygons; each polygon's value depends on its own inputs only."""
    c, lin, quad, bounded = _cubature_spread(Gs, ds, e, t_lo, t_hi, exists)
    n_of = _cubature_tiers(lin, quad, bounded, tiers, need_moments, tol)
    sel = n_of > 0
    present = torch.unique(n_of).tolist()
    if present == [0]:
        return sel, ds.new_zeros(0), *((ds.new_zeros(0, 2), ds.new_zeros(0, 2, 2)) if need_moments else (None, None))
    if len(present) == 1:              # one node count for all (the common case): no gather/scatter
        return (sel, *_cubature(Gs, ds, e, t_lo, t_hi, exists, c, present[0], need_moments))
    idx = sel.nonzero().squeeze(-1)
    m = idx.numel()
    logP = ds.new_zeros(m)
    mean = ds.new_zeros(m, 2) if need_moments else None
    cov = ds.new_zeros(m, 2, 2) if need_moments else None
    n_sel = n_of.index_select(0, idx)
    for n in present[1:] if present[0] == 0 else present:
        j = (n_sel == n).nonzero().squeeze(-1)
        k = idx.index_select(0, j)
        lp, mu, cv = _cubature(*(y.index_select(0, k) for y in (Gs, ds, e, t_lo, t_hi, exists)),
                               c.index_select(0, k), n, need_moments)
        logP = logP.index_put((j,), lp)
        if need_moments:
            mean = mean.index_put((j,), mu)
            cov = cov.index_put((j,), cv)
    return sel, logP, mean, cov


def _decay_cuts(r: torch.Tensor, inside: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
    """Slice-axis cuts v1 = ±sqrt(r² + 2s), s in ``sc``, where the Gaussian weight has fallen by e^{-s}.

    ``r`` is the distance of the nearest point along the slicing axis and ``inside`` marks pairs whose
    polytope contains the mean (cuts symmetric about 0 there). Shared by the S = 2 and S = 3 slicers.
    """
    r_in = torch.where(inside, torch.ones_like(r), r)          # no sqrt(0) in the unused branch
    decay = torch.sqrt(r_in.unsqueeze(-1) ** 2 + 2.0 * sc)
    if sc.shape[-1] % 2 == 0:
        sym = torch.sqrt(2.0 * sc[1::2])
        return torch.where(inside.unsqueeze(-1), torch.cat([-sym, sym]), decay)
    return torch.cat([decay, torch.where(inside.unsqueeze(-1), -decay, decay)], dim=-1)


def _slice_nodes(Gs, ds, e, t_lo, t_hi, exists, num_nodes, s_cuts, levels, parallel_tol=DEFAULT_PARALLEL_TOL,
                 moments=False):
    """Nodes of the log-space Gauss–Legendre slicing along the direction w of the nearest point (flat batch).

    Returns a dict: per node the slice coordinate ``v1``, the slice interval ``(lo, hi)`` in v2 = w⊥·u, its
    log mass ``lS`` = log(Φ(hi) − Φ(lo)), the log weight ``integrand`` (log of GL weight · φ(v1) · e^lS) and
    the owning polygon ``nb``; per polygon ``r`` (distance of the nearest point, 0 if inside), ``w`` and ``wp`` = w⊥.
    With ``moments`` the slices' log mass, mean ``m`` and variance ``c`` come from one :func:`interval_stats` call
    (≤ 1e-14 relative against mpmath, every regime); otherwise ``lS`` from :func:`log_ndtr_diff`.
    """
    dtype, device = ds.dtype, ds.device
    # nearest point of the polygon to the origin
    tc = torch.clamp(torch.zeros_like(t_lo), t_lo, t_hi)
    dist2 = torch.where(exists, ds * ds + tc * tc, torch.full_like(ds, float("inf")))
    real = Gs.abs().sum(-1) > 0
    inside = ((ds >= 0) | ~real).all(dim=-1)
    j = dist2.argmin(dim=-1, keepdim=True)
    p = (ds.gather(-1, j).unsqueeze(-1) * Gs.gather(-2, j.unsqueeze(-1).expand(-1, 1, 2))
         + tc.gather(-1, j).unsqueeze(-1) * e.gather(-2, j.unsqueeze(-1).expand(-1, 1, 2))).squeeze(-2)
    r = p.norm(dim=-1)
    inside = inside | (r <= _R_TINY)                 # any slicing direction is exact; avoids p/r at r ~ 0
    r = torch.where(inside, torch.zeros_like(r), r)
    w = torch.where(inside.unsqueeze(-1), torch.tensor([1.0, 0.0], dtype=dtype, device=device),
                    p / torch.where(inside, torch.ones_like(r), r).unsqueeze(-1))
    wp = torch.stack([-w[..., 1], w[..., 0]], dim=-1)
    al = (Gs * w.unsqueeze(-2)).sum(-1)                 # g_k·w
    be = (Gs * wp.unsqueeze(-2)).sum(-1)                # g_k·w⊥
    # cut points: vertices and the Gaussian-decay cuts
    vfin = exists & torch.isfinite(t_hi)
    t_hs = torch.where(vfin, t_hi, torch.zeros_like(t_hi))
    vert = ((ds.unsqueeze(-1) * Gs + t_hs.unsqueeze(-1) * e) * w.unsqueeze(-2)).sum(-1)
    sc = torch.tensor(s_cuts, dtype=dtype, device=device)
    smax = sc[-1]
    vmax = torch.sqrt(r * r + 2.0 * smax)
    lo = torch.where(inside, -vmax, r)
    vert = torch.where(vfin, vert, lo.unsqueeze(-1))
    decay = _decay_cuts(r, inside, sc)
    # where each edge's slice bound v2 = d_k be_k + t al_k crosses the levels, within the edge (t_lo <= t <= t_hi):
    # resolves the Φ transition of edges nearly parallel to the slices and the Gaussian factor of thin slivers
    lev = torch.tensor(levels, dtype=dtype, device=device)
    al_ok = exists & (al.abs() > _DIV_TINY)              # |al| <= tiny: the bound is constant along the edge
    al_s = torch.where(al_ok, al, torch.ones_like(al))
    tl = (lev - (ds * be).unsqueeze(-1)) / al_s.unsqueeze(-1)
    on_edge = al_ok.unsqueeze(-1) & (tl >= t_lo.unsqueeze(-1)) & (tl <= t_hi.unsqueeze(-1))
    lcut = (ds * al).unsqueeze(-1) - torch.where(on_edge, tl, torch.zeros_like(tl)) * be.unsqueeze(-1)
    lcut = torch.where(on_edge, lcut, lo[:, None, None]).reshape(lcut.shape[0], -1)
    cuts = torch.cat([vert, decay, lcut], dim=-1)
    # clamp to [lo, vmax]; ties resolve to the bound (no gradient on zero-length pieces)
    cuts = torch.where(cuts <= lo.unsqueeze(-1), lo.unsqueeze(-1), cuts)
    cuts = torch.where(cuts >= vmax.unsqueeze(-1), vmax.unsqueeze(-1), cuts)
    cuts = torch.sort(cuts, dim=-1).values
    a0 = cuts[..., :-1]
    half = 0.5 * (cuts[..., 1:] - a0)
    # only the pieces of positive length, flat over the batch
    B, K = half.shape
    pidx = (half > 0).reshape(-1).nonzero().squeeze(-1)
    a0f = a0.reshape(-1).index_select(0, pidx)
    hf = half.reshape(-1).index_select(0, pidx)
    pb = torch.div(pidx, K, rounding_mode="floor")
    # the lines that bound the slices are the same across a piece (the cuts include every vertex): they are
    # picked at the piece's midpoint, the pieces whose slices are empty there are dropped (their mass is 0),
    # and each node's slice is bounded by the two picked lines only
    rk = real.index_select(0, pb)
    bep = be.index_select(0, pb)
    bzero = rk & (bep.abs() <= parallel_tol)          # line parallel to the slices: a bound on v1 only
    bpos = rk & (bep > parallel_tol)
    bneg = rk & (bep < -parallel_tol)
    dsp, alp = ds.index_select(0, pb), al.index_select(0, pb)
    rhs = dsp - alp * (a0f + hf).unsqueeze(-1)        # (pieces, F) at the midpoints
    bnd = rhs / torch.where(bpos | bneg, bep, torch.ones_like(bep))   # double where: no 0/0 in the backward
    inf = torch.full_like(bnd, float("inf"))
    hi_m, jh = torch.where(bpos, bnd, inf).min(-1, keepdim=True)
    lo_m, jl = torch.where(bneg, bnd, -inf).max(-1, keepdim=True)
    keep = ((lo_m < hi_m).squeeze(-1) & ~(bzero & (rhs < 0)).any(-1)).nonzero().squeeze(-1)
    a0f, hf, pb, jh, jl = (t.index_select(0, keep) for t in (a0f, hf, pb, jh, jl))
    hfin = torch.isfinite(hi_m.index_select(0, keep))
    lfin = torch.isfinite(lo_m.index_select(0, keep))
    x, wt = _gl_nodes(num_nodes, dtype, device)
    v1 = (a0f + hf).unsqueeze(-1) + hf.unsqueeze(-1) * x                  # (pieces, nodes)
    logw = (torch.log(hf).unsqueeze(-1) + torch.log(wt)).reshape(-1)
    nb = pb.repeat_interleave(num_nodes)

    def bound(j, fin):
        dj, aj, bj = (t.index_select(0, pb).gather(-1, j) for t in (ds, al, be))
        bj = torch.where(fin, bj, torch.ones_like(bj))                    # double where (no 0/0)
        return (dj - aj * v1) / bj

    hi = torch.where(hfin, bound(jh, hfin), torch.full_like(v1, float("inf"))).reshape(-1)
    lo_ = torch.where(lfin, bound(jl, lfin), torch.full_like(v1, float("-inf"))).reshape(-1)
    v1 = v1.reshape(-1)
    if moments:
        lS, m, c = interval_stats(lo_, hi)
    else:
        lS, m, c = log_ndtr_diff(lo_, hi), None, None
    integrand = logw + lS - 0.5 * v1 * v1 - LOG_SQRT_2PI
    return dict(v1=v1, lo=lo_, hi=hi, lS=lS, m=m, c=c, integrand=integrand, nb=nb, B=B, r=r, w=w, wp=wp)


def _segment_logsumexp(x: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """logsumexp of ``x`` within segments ``seg`` (values in [0, n)); -inf for empty segments."""
    m = x.new_full((n,), float("-inf")).scatter_reduce(0, seg, x.detach(), "amax")
    mf = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    tot = x.new_zeros(n).index_add(0, seg, torch.exp(x - mf.index_select(0, seg)))
    pos = tot > 0                                        # False only for segments without mass (log = -inf)
    out = mf + torch.log(torch.where(pos, tot, torch.ones_like(tot)))
    return torch.where(pos, out, torch.full_like(out, float("-inf")))


def _log_mass_slices(Gs, ds, e, t_lo, t_hi, exists, num_nodes, s_cuts, levels):
    """log P by log-space Gauss–Legendre slicing along the direction of the nearest point (flat batch)."""
    nd = _slice_nodes(Gs, ds, e, t_lo, t_hi, exists, num_nodes, s_cuts, levels)
    return _segment_logsumexp(nd["integrand"], nd["nb"], nd["B"])


_CENTRED_MAX_NODES = 64


@functools.lru_cache(maxsize=None)
def _centred_num_nodes(s_cuts: tuple, tol: float) -> int:
    r"""The fewest Gauss–Legendre nodes per piece at which the slicing of :func:`_moments_slices`, cut by ``s_cuts``
    (decay cuts v1 = sqrt(r² + 2 s) and levels ±sqrt(2 s)), meets ``tol`` by its error model.

    Model: on a piece between decay cuts s_k < s_{k+1} the Gaussian factor e^{−v1²/2} falls by at most
    g_k = s_{k+1} − s_k, and between levels ±sqrt(2 s_j), ±sqrt(2 s_{j+1}) a slice bound's tail factor (φ(x)/|x|
    beyond the level, Φ is entire) by at most g_j; a piece inside both varies like e^{b t}, t in [−1, 1], with
    b = (g_k + g_j)/2 and carries a fraction <= e^{−(s_k + s_j)} of the mass. n-node Gauss–Legendre integrates
    e^{b t} with the relative error c_n b^{2n} · b/(1 − e^{−2b}), c_n = 2^{2n+1} (n!)^4 / ((2n + 1) ((2n)!)^3)
    (the rule's error term c_n f^{(2n)}(ξ)); the model is the largest of c_n b^{2n} b/(1 − e^{−2b}) e^{−(s_k + s_j)}
    over all pairs (k, j). The moments' extra factors (s, s², the slices' 1-D moments) are low-degree
    polynomials and ratios of the same entire functions. Checked against mpmath on far-out polygons in
    tests/integrate/test_bivariate_centred.py (a coarser cut set, whose model is far above ``tol``, fails there).
    """
    gaps = [(a, b - a) for a, b in zip(s_cuts[:-1], s_cuts[1:]) if b > a]
    for n in range(2, _CENTRED_MAX_NODES + 1):
        log_cn = ((2 * n + 1) * math.log(2.0) + 4 * math.lgamma(n + 1) - math.log(2 * n + 1)
                  - 3 * math.lgamma(2 * n + 1))
        worst = max(log_cn + 2 * n * math.log(bb) + math.log(bb / -math.expm1(-2.0 * bb)) - (sk + sj)
                    for sk, gk in gaps for sj, gj in gaps for bb in [0.5 * (gk + gj)])
        if worst <= math.log(tol):
            return n
    raise ValueError(f"centred_moments: the cuts s_cuts={s_cuts} need more than {_CENTRED_MAX_NODES} Gauss–Legendre "
                     f"nodes per piece to meet tol={tol}; use cuts whose gaps are smaller")


def _moments_slices(Gs, ds, e, t_lo, t_hi, exists, num_nodes, s_cuts, levels):
    r"""(E[u | ω], Cov[u | ω]) without cancellation, by the slicing quadrature in the frame of the nearest point.

    With s = w·u − r (>= 0 off the mean: the distance beyond the nearest point) and y = w⊥·u, each slice
    contributes its weight W_n = exp(integrand_n − log P) and the exact 1-D conditional mean m_n and variance
    c_n of y on its interval (:func:`interval_stats`, accurate in the tails and for narrow intervals). Then,
    with two passes (means first, then centred sums of squares: every term is non-negative),

        Var s = Σ W_n (s_n − s̄)²,  Cov(s, y) = Σ W_n (s_n − s̄)(m_n − ȳ),  Var y = Σ W_n [c_n + (m_n − ȳ)²],

    and Cov[u] = R [[Var s, Cov], [Cov, Var y]] Rᵀ with R = [w, w⊥], E[u] = (r + s̄) w + ȳ w⊥. The covariance's
    relative error is ~eps·(1 + r²), the conditioning of the covariance w.r.t. the offsets (E[uuᵀ] − E[u]E[u]ᵀ
    loses eps·r⁴ instead), plus the quadrature's error (:func:`_centred_num_nodes` for the cuts of
    :func:`centred_moments`); the mean has no cancellation (the edge formula −Σ r_i g_i cancels for small
    polygons, whose edge weights r_i ~ 1/width).
    """
    nd = _slice_nodes(Gs, ds, e, t_lo, t_hi, exists, num_nodes, s_cuts, levels, moments=True)
    nb, B = nd["nb"], nd["B"]
    logP = _segment_logsumexp(nd["integrand"], nb, B)
    lp = torch.where(torch.isfinite(logP), logP, torch.zeros_like(logP))
    W = torch.exp(nd["integrand"] - lp.index_select(0, nb))
    m, c = nd["m"], nd["c"]
    s = nd["v1"] - nd["r"].index_select(0, nb)

    def seg_sum(x):
        return x.new_zeros(B).index_add(0, nb, W * x)

    sbar, ybar = seg_sum(s), seg_sum(m)
    ds_ = s - sbar.index_select(0, nb)
    dy = m - ybar.index_select(0, nb)
    vss, vsy, vyy = seg_sum(ds_ * ds_), seg_sum(ds_ * dy), seg_sum(c + dy * dy)
    w, wp = nd["w"], nd["wp"]
    outer = lambda a, b: a.unsqueeze(-1) * b.unsqueeze(-2)     # noqa: E731
    cov = (vss[:, None, None] * outer(w, w) + vsy[:, None, None] * (outer(w, wp) + outer(wp, w))
           + vyy[:, None, None] * outer(wp, wp))
    mean = (nd["r"] + sbar).unsqueeze(-1) * w + ybar.unsqueeze(-1) * wp
    return mean, cov


class FlatEdges(NamedTuple):
    """The existing edges of a batch of ``B`` polygons, flat: one entry per edge, in (polygon, row) order.

    Attributes: ``pair`` (E,) the polygon of each edge; ``ds``, ``t_lo``, ``t_hi`` (E,) and ``Gs``, ``e`` (E, 2) as in
    :class:`PolygonEdges` (may be None where only the mass is wanted: :func:`flux_log_mass` does not read them);
    ``B`` the number of polygons. The S = 2 mass and moments are sums over these edges
    (:func:`flux_log_mass`, :func:`edge_moments`), so that a batch costs O(edges), not O(polygons × padded rows),
    and a caller that has the edges without padding (:func:`pyro_cpa.distributions.chunked.flat_pair_edges`)
    need not build the padded (B, F) arrays at all.
    """

    pair: torch.Tensor
    ds: torch.Tensor
    Gs: torch.Tensor
    e: torch.Tensor
    t_lo: torch.Tensor
    t_hi: torch.Tensor
    B: int


def flat_edges(edges: PolygonEdges) -> FlatEdges:
    """The existing edges of a flat batch of :class:`PolygonEdges` (B, F) as :class:`FlatEdges`."""
    B, F = edges.exists.shape
    eidx = edges.exists.reshape(-1).nonzero().squeeze(-1)
    pair = torch.div(eidx, F, rounding_mode="floor")
    return FlatEdges(pair, *(x.reshape((B * F,) + x.shape[2:]).index_select(0, eidx)
                             for x in (edges.ds, edges.Gs, edges.e, edges.t_lo, edges.t_hi)), B)


def _log_mass_flux(ds, t_lo, t_hi, exists, real, min_h=DEFAULT_FLUX_MIN_H, max_amp=DEFAULT_FLUX_MAX_AMP):
    r"""log P by the flux (divergence) formula (flat batch (B, F)): :func:`flux_log_mass` of the existing edges,
    the origin inside where every real row has d_i > 0."""
    inside = ((ds > 0) | ~real).all(-1)
    fe = flat_edges(PolygonEdges(ds.new_zeros(ds.shape + (2,)), ds, ds.new_zeros(ds.shape + (2,)), t_lo, t_hi,
                                 exists, inside, inside))
    return flux_log_mass(fe, inside, min_h=min_h, max_amp=max_amp)


def _pairs_of(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.stack([a, b], -1)`` for 1-D float64/float32 a, b (the same values): the interleaving as the real view
    of ``torch.complex(a, b)`` (~4x faster than torch's stack along a last dimension of 2)."""
    if a.dtype not in (torch.float64, torch.float32) or b.dtype != a.dtype or a.requires_grad or b.requires_grad:
        return torch.stack([a, b], -1)
    return torch.view_as_real(torch.complex(a, b))


def flux_log_mass(fe: FlatEdges, inside: torch.Tensor, *, min_h: float = DEFAULT_FLUX_MIN_H,
                  max_amp: float = DEFAULT_FLUX_MAX_AMP):
    r"""log P by the flux (divergence) formula with relative-accurate edge integrals, from the existing edges
    (:class:`FlatEdges`) and ``inside`` (B,) (the origin in the open polygon: d_i > 0 on every real row).

    Returns ``(log_mass, ok)`` (B,); ``ok`` is False where the result is not trusted (origin on the boundary,
    an edge closer than ``min_h`` to the origin with its foot point within t < 1, or cancellation amplifying
    the rounding error by more than ``max_amp``). The half-edges are taken in (polygon, edge, half) order and
    summed per polygon in that order (``index_add``), so each value depends on its own polygon only.
    """
    B = fe.B
    ds, t_lo, t_hi = fe.ds, fe.t_lo, fe.t_hi
    dtype, device = ds.dtype, ds.device
    h = ds.abs()
    zero = h == 0
    # origin on the (closed) boundary: an existing edge through it (none unless some h is 0: no pass over the edges)
    on_bnd = None
    if bool(zero.any()):
        through = zero & (t_lo <= 0) & (t_hi >= 0)
        on_bnd = ds.new_zeros(B).index_add(0, fe.pair, through.to(dtype)) > 0
    # half intervals 0 <= p < q <= inf of each edge (t >= 0 and the mirror of t <= 0), (E, 2) interleaved
    p = _pairs_of(t_lo.clamp(min=0), (-t_hi).clamp(min=0))
    q = _pairs_of(t_hi.clamp(min=0), (-t_lo).clamp(min=0))
    valid = q > p
    pos = h > 0
    if not bool(pos.all()):
        valid &= pos.unsqueeze(-1)
    idx = valid.reshape(-1).nonzero().squeeze(-1)
    pi = p.reshape(-1).index_select(0, idx)
    qi = q.reshape(-1).index_select(0, idx)
    fi = idx >> 1                                                        # the edge: idx // 2 (idx >= 0)
    bi = fe.pair.index_select(0, fi)
    di = ds.index_select(0, fi)
    hi = di.abs()
    si = -torch.sign(di)
    near = hi < min_h           # with p < 1: not resolved (none unless some edge is that close)
    unres = (near & (pi < 1.0)) if bool(near.any()) else None
    lD = -0.5 * (hi * hi + pi * pi) + log_edge_flux(hi, pi, qi) - _LOG_2PI
    # P = 1[0 in ω] + Σ -sign(d_i) D_i, combined relative to the largest term
    ninf = torch.full((B,), float("-inf"), dtype=dtype, device=device)
    m = ninf.scatter_reduce(0, bi, lD.detach(), "amax")
    m = torch.where(inside, torch.clamp(m, min=0.0), m)
    m_ok = torch.isfinite(m)
    m = torch.where(m_ok, m, torch.zeros_like(m))
    e = torch.exp(lD - m.index_select(0, bi))
    one = torch.where(inside, torch.exp(-m), torch.zeros_like(m))
    S = one.index_add(0, bi, si * e)
    A = one.index_add(0, bi, e)
    ok = m_ok & (S > 0) & (A <= max_amp * S)
    if unres is not None:
        ok &= ~(torch.zeros(B, dtype=dtype, device=device).index_add(0, bi, unres.to(dtype)) > 0)
    if on_bnd is not None:
        ok &= ~on_bnd
    return m + torch.log(torch.where(ok, S, torch.ones_like(S))), ok


def log_mass_2d(G: torch.Tensor, d: torch.Tensor, *, switch_mass: float = DEFAULT_SWITCH_MASS,
                num_nodes: int = DEFAULT_NUM_NODES, s_cuts=DEFAULT_S_CUTS,
                owens_nodes: int = DEFAULT_OWENS_T_NODES, levels=DEFAULT_LEVELS, edges: PolygonEdges | None = None,
                _accept_owens=None, _max_amp: float = DEFAULT_FLUX_MAX_AMP) -> torch.Tensor:
    r"""log P(u ∈ {G u <= d}) for u ~ N(0, I_2), batched (see module doc). -inf for empty polygons.

    The flux formula is used where it is well conditioned (almost everywhere); the other polygons use the
    small-polygon cubature where it meets its error model, then the Owen's-T formula where its P >= ``switch_mass``
    and the log-space slicing otherwise (``switch_mass > 1`` forces the slicing quadrature everywhere).

    **Gradients** are analytic (divergence theorem), the same for every branch: with the edge weights
    r_i = exp(log φ(d_i) + log ΔΦ_i − log P) and edge mean points x̄_i = d_i g_i + E[t | edge] e_i,

        ∂ log P / ∂d_i = r_i,   ∂ log P / ∂g_i = −r_i x̄_i,

    exact wherever log P is (no derivative of a quadrature rule, whose cuts move with the inputs).

    ``edges``: the polygons' :class:`PolygonEdges` when the caller already has them — :func:`polygon_edges`
    of (G, d), or :func:`translate_edges` of a polygon's edges computed once for many translates of it (e.g.
    one region, many data) — so that the O(F²) edge computation is skipped. They are taken as given (not
    checked against G, d) and used, detached, for the value and for the gradient above.

    ``_accept_owens(idx, log_P_owens) -> bool mask`` (internal, used by the 3-D slicing) may accept the
    Owen's-T value of further polygons (flat indices ``idx``) whose absolute error is known to be negligible.
    """
    kw = dict(switch_mass=switch_mass, num_nodes=num_nodes, s_cuts=s_cuts, owens_nodes=owens_nodes, levels=levels,
              _accept_owens=_accept_owens, _max_amp=_max_amp)
    edges = None if edges is None else edges.map(lambda x, k: x.detach())
    if torch.is_grad_enabled() and (G.requires_grad or d.requires_grad):
        batch = broadcast_shapes(G.shape[:-2], d.shape[:-1])
        G, d = G.expand(batch + G.shape[-2:]), d.expand(batch + d.shape[-1:])
        if edges is None:   # once, for the value and the gradient
            edges = polygon_edges(G.detach(), d.detach())
        return _LogMass2d.apply(G, d, edges, kw)
    return _log_mass_2d_impl(G, d, edges=edges, **kw)


class _LogMass2d(torch.autograd.Function):
    """log P with the analytic divergence-theorem gradient (see :func:`log_mass_2d`)."""

    @staticmethod
    def forward(ctx, G, d, edges, kw):
        with torch.no_grad():
            lp = _log_mass_2d_impl(G, d, edges=edges, **kw)
        ctx.save_for_backward(lp)
        ctx.edges = edges                 # detached (log_mass_2d): the edges the value was computed on
        return lp

    @staticmethod
    def backward(ctx, gout):
        (lp,) = ctx.saved_tensors
        Gs, ds, e, t_lo, t_hi, exists, empty, whole = ctx.edges
        ldphi, mu = _edge_stats(t_lo, t_hi, exists)
        fin = torch.isfinite(lp)
        ok = exists & fin.unsqueeze(-1)
        lps = torch.where(fin, lp, torch.zeros_like(lp)).unsqueeze(-1)
        lr = -0.5 * ds * ds - LOG_SQRT_2PI + ldphi - lps
        r = torch.where(ok, torch.exp(torch.where(ok, lr, torch.zeros_like(lr))), torch.zeros_like(lr))
        gr = gout.unsqueeze(-1) * r
        xbar = ds.unsqueeze(-1) * Gs + mu.unsqueeze(-1) * e
        return -gr.unsqueeze(-1) * xbar, gr, None, None


def _log_mass_2d_impl(G: torch.Tensor, d: torch.Tensor, *, switch_mass, num_nodes, s_cuts, owens_nodes, levels,
                      edges=None, _accept_owens=None, _max_amp=DEFAULT_FLUX_MAX_AMP) -> torch.Tensor:
    """:func:`log_mass_2d` without the custom gradient."""
    if _accept_owens is None:
        out = _in_chunks(_log_mass_2d_impl, G, d, _CHUNK, edges=edges, switch_mass=switch_mass, num_nodes=num_nodes,
                         s_cuts=s_cuts, owens_nodes=owens_nodes, levels=levels, _max_amp=_max_amp)
        if out is not None:
            return out
    Gs, ds, e, t_lo, t_hi, exists, empty, whole = polygon_edges(G, d) if edges is None else edges
    batch = ds.shape[:-1]
    F = ds.shape[-1]
    live = ~empty & ~whole
    flat = (Gs.reshape(-1, F, 2), ds.reshape(-1, F), e.reshape(-1, F, 2), t_lo.reshape(-1, F),
            t_hi.reshape(-1, F), exists.reshape(-1, F))
    real = flat[0].abs().sum(-1) > 0
    logP = ds.new_zeros(live.numel())
    if switch_mass <= 1.0:
        logP, ok = _log_mass_flux(flat[1], flat[3], flat[4], flat[5], real, max_amp=_max_amp)
        rest = live.reshape(-1) & ~ok
    else:
        rest = live.reshape(-1)
    idx = rest.nonzero().squeeze(-1)
    if idx.numel():
        sel = tuple(x.index_select(0, idx) for x in flat)
        vals = log_mass_fallback(sel, idx, switch_mass=switch_mass, num_nodes=num_nodes, s_cuts=s_cuts,
                                 owens_nodes=owens_nodes, levels=levels, _accept_owens=_accept_owens)
        logP = logP.index_put((idx,), vals)
    logP = logP.reshape(batch)
    logP = torch.where(whole, torch.zeros_like(logP), logP)
    return torch.where(empty, torch.full_like(logP, float("-inf")), logP)


def log_mass_fallback(sel, idx, *, switch_mass=DEFAULT_SWITCH_MASS, num_nodes=DEFAULT_NUM_NODES, s_cuts=DEFAULT_S_CUTS,
                      owens_nodes=DEFAULT_OWENS_T_NODES, levels=DEFAULT_LEVELS, _accept_owens=None) -> torch.Tensor:
    """log P of the polygons ``sel`` = (Gs, ds, e, t_lo, t_hi, exists) (flat batch, padded rows) where the flux
    formula is not trusted (or ``switch_mass > 1``): the small-polygon cubature where it meets its error model,
    then Owen's T where P >= ``switch_mass``, the log-space slicing otherwise (module doc). ``idx``: the polygons'
    flat indices in the caller's batch, for ``_accept_owens`` (see :func:`log_mass_2d`)."""
    vals = sel[1].new_full(idx.shape, float("nan"))
    need = torch.ones(idx.shape, dtype=torch.bool, device=sel[1].device)
    if switch_mass <= 1.0:
        # small bounded polygons: the cubature (relative accuracy at any P); then Owen's T where P >= switch_mass
        cub, lp_cub, _, _ = _cubature_small(*sel, need_moments=False)
        vals = vals.index_put((cub.nonzero().squeeze(-1),), lp_cub)
        need = ~cub
        oidx = need.nonzero().squeeze(-1)
        if oidx.numel():
            Gs_, ds_, e_, tl_, th_, ex_ = (x.index_select(0, oidx) for x in sel)
            P = _mass_owens(ds_, e_, tl_, th_, ex_, torch.zeros(oidx.shape, dtype=torch.bool, device=sel[1].device),
                            owens_nodes)
            lv = torch.log(torch.clamp(P, min=1e-300))
            vals = vals.index_put((oidx,), lv)
            ok_owens = P >= switch_mass
            if _accept_owens is not None:
                ok_owens = ok_owens | _accept_owens(idx.index_select(0, oidx), lv)
            need = need.index_put((oidx,), ~ok_owens)
    sub = need.nonzero().squeeze(-1)
    if sub.numel():
        sl = _log_mass_slices(*(x.index_select(0, sub) for x in sel), num_nodes, s_cuts, levels)
        vals = vals.index_put((sub,), sl)
    return vals


def edge_moments(fe: FlatEdges, logP: torch.Tensor, empty: torch.Tensor, whole: torch.Tensor, *,
                 cov_max_amp: float | None = DEFAULT_COV_MAX_AMP, mean_max_amp: float = DEFAULT_MEAN_MAX_AMP):
    r"""The divergence-theorem moments (module doc) of B polygons from their existing edges (:class:`FlatEdges`)
    and their log P (B,): with r_i = exp(log φ(d_i) + log ΔΦ_i − log P) and μ_i the edges' conditional means
    (:func:`interval_stats` of (t_lo, t_hi), once per edge),

        E[u] = −Σ_i r_i g_i,   E[uuᵀ] = I − sym Σ_i r_i (d_i g_i + μ_i e_i) g_iᵀ,   Cov = E[uuᵀ] − E[u]E[u]ᵀ,

    each sum per polygon in edge order (``index_add``). Returns ``(mean, second, cov, redo)``: (B, 2), (B, 2, 2),
    (B, 2, 2), 0 on ``empty`` polygons, and ``redo`` (B,) the polygons whose covariance (``cov_max_amp``) or
    mean (``mean_max_amp``) must come from :func:`centred_moments` instead (see :func:`std_moments_2d`)."""
    B, pair = fe.B, fe.pair
    ds = fe.ds
    lm, mu, _ = interval_stats(fe.t_lo, fe.t_hi, variance=False)
    lp = torch.where(empty, torch.zeros_like(logP), logP)
    r = torch.exp(-0.5 * ds * ds - LOG_SQRT_2PI + lm - lp.index_select(0, pair))
    g0, g1 = fe.Gs[:, 0], fe.Gs[:, 1]
    rm0 = r * (ds * g0 + mu * fe.e[:, 0])                                # r_i times the edge mean point
    rm1 = r * (ds * g1 + mu * fe.e[:, 1])
    # the per-polygon sums in one pass (rows: r g, r m_k g_l, r), each in edge order
    sums = ds.new_zeros(7, B).index_add(1, pair, torch.stack([r * g0, r * g1, rm0 * g0, rm0 * g1, rm1 * g0, rm1 * g1,
                                                               r.detach()]))
    mean = (-sums[:2].T).contiguous()     # (B, 2) rows: the norm below reduces 2 adjacent numbers per polygon
    off = 0.5 * (sums[3] + sums[4])
    second = torch.stack([1.0 - 0.5 * (sums[2] + sums[2]), -off, -off, 1.0 - 0.5 * (sums[5] + sums[5])],
                         -1).reshape(B, 2, 2)
    zero = torch.zeros((), dtype=ds.dtype, device=ds.device)
    mean = torch.where(empty.unsqueeze(-1), zero, mean)
    second = torch.where(empty.unsqueeze(-1).unsqueeze(-1), zero, second)
    cov = second - mean.unsqueeze(-1) * mean.unsqueeze(-2)
    # covariance: E[uuᵀ] − E[u]E[u]ᵀ where that subtraction is well conditioned, the centred computation otherwise
    mnorm = mean.detach().norm(dim=-1)
    if cov_max_amp is None:
        redo_cov = torch.zeros_like(empty)
    else:
        cd_ = cov.detach()                               # decisions only: no gradient through them
        a, b, c = cd_[..., 0, 0], cd_[..., 0, 1], cd_[..., 1, 1]
        lam_min = 0.5 * (a + c) - torch.sqrt(0.25 * (a - c) ** 2 + b * b)
        redo_cov = ~(lam_min * cov_max_amp > 1.0 + mnorm * mnorm)
    redo_mean = sums[6] > mean_max_amp * (1.0 + mnorm)      # −Σ r_i g_i cancels (small polygons)
    return mean, second, cov, ~empty & ~whole & (redo_cov | redo_mean)


def centred_moments(sel, *, s_cuts=DEFAULT_CENTRED_S_CUTS, tol: float = DEFAULT_CENTRED_TOL):
    """(E[u | ω], Cov[u | ω]) without cancellation of the polygons ``sel`` = (Gs, ds, e, t_lo, t_hi, exists) (flat
    batch, padded rows): the small-polygon cubature where it meets its error model, the centred slicing
    quadrature otherwise (see :func:`std_moments_2d`'s ``cov_max_amp``), cut at v1 = sqrt(r² + 2 s) and where a
    slice bound crosses ±sqrt(2 s), s in ``s_cuts``, with the fewest Gauss–Legendre nodes per piece whose error
    model meets ``tol`` (:func:`_centred_num_nodes`)."""
    cub, _, mc, cc = _cubature_small(*sel, need_moments=True)
    n = cub.shape[0]
    ms, cs = sel[1].new_zeros(n, 2), sel[1].new_zeros(n, 2, 2)
    cidx, sidx = cub.nonzero().squeeze(-1), (~cub).nonzero().squeeze(-1)
    if cidx.numel():
        ms, cs = ms.index_put((cidx,), mc), cs.index_put((cidx,), cc)
    if sidx.numel():
        s_cuts = tuple(float(s) for s in s_cuts)
        levels = tuple(sorted({sg * math.sqrt(2.0 * s) for s in s_cuts for sg in (-1.0, 1.0)}))
        m_, c_ = _moments_slices(*(x.index_select(0, sidx) for x in sel), _centred_num_nodes(s_cuts, tol), s_cuts,
                                 levels)
        ms, cs = ms.index_put((sidx,), m_), cs.index_put((sidx,), c_)
    return ms, cs


def std_moments_2d(G: torch.Tensor, d: torch.Tensor, *, switch_mass: float = DEFAULT_SWITCH_MASS,
                   num_nodes: int = DEFAULT_NUM_NODES, s_cuts=DEFAULT_S_CUTS,
                   owens_nodes: int = DEFAULT_OWENS_T_NODES, levels=DEFAULT_LEVELS,
                   need_moments: bool = True, cov_max_amp: float | None = DEFAULT_COV_MAX_AMP,
                   mean_max_amp: float = DEFAULT_MEAN_MAX_AMP, edges: PolygonEdges | None = None,
                   centred_s_cuts=DEFAULT_CENTRED_S_CUTS) -> StandardMoments:
    r"""Mass and conditional moments of u ~ N(0, I_2) on the polygon {u : G u <= d}, exact.

    Args:
        G: (..., F, 2) unit outward normals (padding rows 0). d: (..., F) offsets (padding +inf).
        switch_mass: where the flux formula is ill-conditioned, use the Owen's-T formula if its P >= switch_mass
            and log-space slicing otherwise (switch_mass > 1: slicing everywhere).
        num_nodes: Gauss–Legendre nodes per piece of the slicing quadrature of the mass.
        s_cuts: extra cuts v1 = sqrt(r² + 2 s) of the mass's slicing range; the last one truncates it.
        owens_nodes: Gauss–Legendre nodes of Owen's T.
        levels: the slicing quadrature is also cut where a line's slice bound crosses these values
            (resolves lines nearly parallel to the slices, and the kinks of exactly parallel ones).
        need_moments: if False only log_mass is computed (mean, second_moment, covariance are returned as zeros).
        cov_max_amp: the covariance is E[uuᵀ] − E[u]E[u]ᵀ where this subtraction amplifies rounding by at most
            amp = (1 + |E[u]|²)/λ_min <= cov_max_amp (measured error <= ~1e-12·amp in the metric of the
            covariance, i.e. <= 1e-8 at the default 1e4), and a centred computation otherwise (far-out or thin
            polygons): the small-polygon cubature where it meets its error model (``_cubature``: relative error
            ~1e-16 plus the vertices' rounding ~eps |c|/ρ), the centred slicing quadrature elsewhere (relative error
            ~eps·(1 + r²), r the distance of the polygon from the mean; cuts ``centred_s_cuts``, node count from
            their error model, :func:`_centred_num_nodes`); the mean and second moment of these polygons are taken
            from the same centred computation.
            None: never (the covariance is E[uuᵀ] − E[u]E[u]ᵀ everywhere: enough for callers that only need the
            second moment, e.g. the E-step's sums of E[zzᵀ]; the mean is still made accurate).
        mean_max_amp: where Σ_i r_i > mean_max_amp (1 + |E[u]|) (small polygons: the edge formula −Σ r_i g_i
            cancels, error ~1e-12 Σ r_i), the mean and second moment come from the centred computation too.
        edges: the polygons' :class:`PolygonEdges` (batch shape of d), if the caller has them: e.g.
            :func:`translate_edges` of one polygon's edges for many translates of it, which skips the O(F²)
            :func:`polygon_edges` per polygon. Taken as given (not checked against G, d); differentiable
            through their t_lo, t_hi, ds, Gs, e as :func:`polygon_edges`' own.
        centred_s_cuts: the cuts of the centred slicing quadrature (see :func:`centred_moments`).

    Returns:
        :class:`StandardMoments` (log_mass (...,), mean (..., 2), second_moment (..., 2, 2),
        log_mass_stderr = 0, covariance (..., 2, 2), symmetric positive semi-definite). Exact to machine precision (~1e-13 relative); see the module doc for the
        formulas. Empty polygons: log_mass = -inf, mean = 0, second_moment = 0.
    """
    out = _in_chunks(std_moments_2d, G, d, _CHUNK, edges=edges, switch_mass=switch_mass, num_nodes=num_nodes,
                     s_cuts=s_cuts, owens_nodes=owens_nodes, levels=levels, need_moments=need_moments,
                     cov_max_amp=cov_max_amp, mean_max_amp=mean_max_amp, centred_s_cuts=centred_s_cuts)
    if out is not None:
        return out
    if edges is None:
        edges = polygon_edges(G, d)
    empty, whole = edges.empty, edges.whole
    logP = log_mass_2d(G, d, switch_mass=switch_mass, num_nodes=num_nodes, s_cuts=s_cuts,
                       owens_nodes=owens_nodes, levels=levels, edges=edges)
    if not need_moments:
        z2 = logP.new_zeros(logP.shape + (2, 2))
        return StandardMoments(logP, logP.new_zeros(logP.shape + (2,)), z2, torch.zeros_like(logP), z2)
    batch, n = logP.shape, logP.numel()
    empty = (empty | torch.isneginf(logP)).reshape(n)
    padded = edges.flat()
    mean, second, cov, redo = edge_moments(flat_edges(padded), logP.reshape(n), empty, whole.reshape(n),
                                           cov_max_amp=cov_max_amp, mean_max_amp=mean_max_amp)
    idx = redo.nonzero().squeeze(-1)
    if idx.numel():
        ms, cs = centred_moments(padded.select(idx)[:6], s_cuts=centred_s_cuts)
        mean, second, cov = (x.index_put((idx,), y) for x, y in
                             ((mean, ms), (second, cs + ms.unsqueeze(-1) * ms.unsqueeze(-2)), (cov, cs)))
    mean, second, cov = mean.reshape(batch + (2,)), second.reshape(batch + (2, 2)), cov.reshape(batch + (2, 2))
    return StandardMoments(logP, mean, second, torch.zeros_like(logP), cov)
