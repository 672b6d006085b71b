r"""Memory-bounded evaluation of the exact marginal: chunked pruning, batched pairs, recomputed backward.

For data x_n and regions ω the marginal is log p(x_n) = logsumexp_ω t_nω, t_nω = log κ_ω(x_n) + log P_ω(x_n)
(:mod:`pyro_cpa.distributions.cpa_marginal`). It is computed in three steps, none of which holds an
(N, R) array:

1. **Pruning, per chunk of data** (no autograd): for the chunk's (datum, region) pairs the free upper bound
   u_nω = log κ_ω(x_n) + min_j log Φ(d_j) ≥ t_nω is formed densely; pairs with
   u_nω ≥ max_ω u_nω − prune_tol are integrated, then those of the rest with u_nω ≥ log p(x_n) − prune_tol.
   A chunk has at most :data:`DENSE_ELEMENTS` elements per dense temporary (rows × R × (D + F + S²)).
2. **Integration, per batch of kept pairs** (:func:`pair_batch`, within :data:`PAIR_ELEMENTS`): t_nω for the
   gathered pairs, from the chunk's whitened constraints (:func:`whiten_chunk`: normals once per region,
   distances per pair, which the bound of step 1 also uses); for S <= 3 the pairs are grouped by their region's
   number of real facets f and integrated on those f rows alone (:func:`facet_order`), not on F padded rows.
   For S = 2 without missing data the whitened polygon of pair (n, ω) is region ω's polygon in v = L_ω⁻¹z
   translated by L_ω⁻¹μ_nω, so its edges are computed once per region and translated per pair in O(F)
   (:func:`region_polygons`, :func:`pair_edges`), not recomputed in O(F²) per pair.
3. **Reduction**: log p(x_n) = logsumexp over the kept pairs of datum n; only the (N,) results are kept.

**Autograd** (:class:`_RecomputedLogProb`): the forward pass keeps log p (N,) and the kept pairs' indices
(one int64 per kept pair, for the whole data); the backward pass replays each batch of step 2 with
autograd on (κ, μ, Σ recomputed for exactly those pairs by :func:`~.region_gaussians.affine_gaussians`) and
accumulates ∂ log p(x_n)/∂θ = Σ_ω w_nω ∂t_nω/∂θ, w_nω = exp(t_nω − log p(x_n)), into the gradients of
the region parameters (A_ω, b_ω, H_ω, c_ω — themselves differentiable functions of the decoder's weights,
outside this function), of σx², σz² and of x. The partition and the set of kept pairs are constants
of the step (pruned pairs carry weight < e^{−prune_tol}; their gradient was already 0 up to that weight).
Memory under autograd is O(one batch) for the graph plus 8 bytes per kept pair, instead of ~15 KB per
(datum, region) pair for the full graph. The S >= 4 Monte-Carlo integrator is replayed on the RNG state
(torch's and that of a ``generator`` in ``mc_kwargs``) saved before each batch, so the gradient is that of
the very estimate the forward pass returned.

Values are those of the dense evaluation up to rounding; the pruning error is as documented in
:class:`~pyro_cpa.distributions.CPAMarginal` (relative error below R·exp(−prune_tol)).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .._threads import with_library_threads
from ..integrate import PolytopeMoments, integrate_whitened, std_moments, whiten
from ..integrate.bivariate import (DEFAULT_COV_MAX_AMP, DEFAULT_PARALLEL_TOL, FlatEdges, PolygonEdges, _pairs_of,
                                   centred_moments, edge_moments, flux_log_mass, log_mass_fallback, polygon_edges,
                                   translate_edges)
from .region_gaussians import RegionGaussians, affine_gaussians, region_gaussians

DENSE_ELEMENTS = 2 ** 21
"""Budget of the dense pruning step: rows per chunk are chosen so that rows · R · (D + F + S²) <= this (at
least one row). 2²¹ float64 elements = 16 MB per temporary."""

PAIR_ELEMENTS = 2 ** 18
"""Budget of one batch of kept pairs: :func:`pair_batch` pairs, so that pairs · F² · S <= this. The
integrators' temporaries grow as F² (S = 2: (pairs, F, F)); under autograd the backward pass holds the graph
of one batch at a time (measured ~1 KB per pair for S = 1, F = 2 and ~15 KB for S = 2, F = 9)."""

PAIR_ELEMENTS_NO_GRAD = 2 ** 20
"""The same budget for S = 2 batches without an autograd graph (log p and E-steps under ``no_grad``): the S = 2
kernel's per-call cost is dominated by ~200 small tensor operations per edge-flux call at the default budget
(measured: exact log p of benchmarks/run.py's [2, 16, 16, 2], N = 1000, 1.38 s at 2¹⁸ vs 1.04 s at 2²⁰ on one
thread; values identical to the last bit, since every pair's result depends on that pair alone)."""

FLAT_PAIRS = 2 ** 13
"""S = 2 pairs per batch of the flat-edge path (:func:`flat_batch_moments`, no autograd): ~4.6 half-edges per pair on
benchmarks/run.py's [2, 16, 16, 2], i.e. ~4·10⁴ edge integrals per call of the edge quadrature, where it is fastest
per edge (larger calls leave the cache: measured 1.0 s for all 2.3·10⁶ at once vs 0.63 s in calls of ~2.5·10⁴)."""

FALLBACK_BATCHES = 8
"""Batches of the S = 2 flat-edge path whose untrusted flux masses (~0.5 % of the pairs on benchmarks/run.py's
[2, 16, 16, 2]) get their fallback in one call before their moments (:func:`fallback_pair_log_mass`): one call per
batch cost ~1 ms, mostly fixed (measured: 71 calls, 3,012 pairs, 0.07 s per E-step there). The group's edges
(:class:`~pyro_cpa.integrate.bivariate.FlatEdges`, 64 B per edge, a few edges per pair) are held meanwhile: a few
hundred bytes per pair, ~20 MB at 8 batches of :data:`FLAT_PAIRS`. Values do not depend on it (each pair's
value depends on that pair alone)."""


class RegionParams(NamedTuple):
    """The differentiable inputs of the marginal given the partition.

    Attributes:
        A: (R, D, S), b: (R, D): the affine maps g(z) = A_ω z + b_ω.
        H: (R, F, S), c: (R, F): the regions {z : H_ω z <= c_ω}; padding rows have H = 0, c = +inf.
        obs_var: (D,) σx²; prior_var: (S,) σz².
    """

    A: torch.Tensor
    b: torch.Tensor
    H: torch.Tensor
    c: torch.Tensor
    obs_var: torch.Tensor
    prior_var: torch.Tensor


class _Batch(NamedTuple):
    """One batch of kept pairs: flat indices n·R + ω into the data (global n), the number of facet rows the
    integrator saw (:func:`facet_order`), and the RNG states before it."""

    pairs: torch.Tensor
    facets: int
    rng: tuple | None


def pair_batch(F: int, S: int, graph: bool = True) -> int:
    """Kept pairs integrated per batch (see :data:`PAIR_ELEMENTS`, and :data:`PAIR_ELEMENTS_NO_GRAD` for S = 2
    batches that hold no autograd graph; at least 1)."""
    budget = PAIR_ELEMENTS_NO_GRAD if S == 2 and not graph else PAIR_ELEMENTS
    return max(1, budget // max(1, F * F * S))


def chunk_rows(R: int, D: int, F: int, S: int, chunk_size: int) -> int:
    """Data per pruning chunk: at most ``chunk_size`` and within :data:`DENSE_ELEMENTS` (at least 1)."""
    return max(1, min(int(chunk_size), DENSE_ELEMENTS // max(1, R * (D + F + S * S))))


def _rng_state(mc_kwargs: dict, device: torch.device) -> tuple:
    """The RNG states the Monte-Carlo integrator draws from: torch's CPU generator, the accelerator's default
    generator when the data live there, and a ``generator`` passed in ``mc_kwargs``."""
    gen = mc_kwargs.get("generator")
    accel = torch.get_device_module(device).get_rng_state(device) if device.type != "cpu" else None
    return torch.get_rng_state(), accel, None if gen is None else gen.get_state()


def _set_rng_state(state: tuple, mc_kwargs: dict, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.get_device_module(device).set_rng_state(state[1], device)
    if state[2] is not None:
        mc_kwargs["generator"].set_state(state[2])


def facet_order(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per region, the order of its constraint rows with the real facets (c finite) first, in their original
    order, and the padding (c = +inf) after: (R, F) indices, and the number of real rows per region (R,).

    A region padded to F rows costs the integrators O(F²) (S = 2) or more while the mean real count is ~4;
    with the real rows first, pairs of regions with f real facets are integrated on their first f rows alone
    (:func:`evaluate_chunk` groups kept pairs by f). Padding rows are ignored by the integrators, so the
    values are those of the padded rows; the grouping depends only on the region, not on the chunking.
    """
    real = torch.isfinite(c)
    return torch.argsort((~real).to(torch.int32), dim=-1, stable=True), real.sum(-1)


GROUP_BY_FACETS_MAX_S = 3
"""Kept pairs are grouped by their region's real facet count (:func:`facet_order`) for S up to this; the
S >= 4 Monte-Carlo integrator sees the padded rows, so that its random draws do not depend on the grouping."""


class Whitened(NamedTuple):
    """The whitened constraints of every (datum, region) pair of a chunk (see :func:`whiten_chunk`).

    Attributes:
        G: (R, F, S) unit normals Lᵀh_j/‖Lᵀh_j‖ (0 on padding rows) — (n, R, F, S) with missing data, where
            Σ_ω depends on the datum.
        d: (n, R, F) distances (c_j − h_jᵀμ)/‖Lᵀh_j‖ (+inf on padding rows).
        c_hat: (R, F) or (n, R, F) the region's offsets ĉ_j = c_j/‖Lᵀh_j‖ in v = L⁻¹z (+inf on padding rows).
        h_hat: like G, the scaled normals ĥ_j = h_j/‖Lᵀh_j‖ = L⁻ᵀg_j (0 on padding rows): d = ĉ − ĥᵀμ.
    """

    G: torch.Tensor
    d: torch.Tensor
    c_hat: torch.Tensor
    h_hat: torch.Tensor


def whiten_chunk(rg: RegionGaussians, H: torch.Tensor, c: torch.Tensor) -> Whitened:
    """:func:`~pyro_cpa.integrate.whiten` of all pairs of a chunk at once, with the normals formed per region.

    Without missing data Σ_ω = L_ω L_ωᵀ does not depend on the datum, so g_j = L_ωᵀh_j/s_j, s_j = ‖L_ωᵀh_j‖,
    and the scaled constraint ĥ_j = h_j/s_j, ĉ_j = c_j/s_j are formed once per region, and per pair only
    d_j = ĉ_j − ĥ_jᵀμ_nω (n, R, F), summed over the S coordinates in a fixed order, elementwise, so that each
    value is independent of the chunk's shape. Padding rows (s = 0 or c = +inf) get g = 0, ĥ = 0, ĉ = +inf,
    hence d = +inf, as in ``whiten``.
    """
    L = rg.scale_tril  # (R, S, S) or (n, R, S, S)
    S = L.shape[-1]
    Gt = (H.unsqueeze(-1) * L.unsqueeze(-3)).sum(-2)  # rows Lᵀh_j: Gt[..., f, t] = Σ_s H[f, s] L[s, t]
    s = Gt.norm(dim=-1)
    real = (s > 0) & torch.isfinite(c)
    s_safe = torch.where(real, s, torch.ones_like(s))
    G = torch.where(real.unsqueeze(-1), Gt / s_safe.unsqueeze(-1), torch.zeros_like(Gt))
    h = torch.where(real.unsqueeze(-1), H / s_safe.unsqueeze(-1), torch.zeros_like(Gt))
    c_hat = torch.where(real, c / s_safe, torch.full_like(s, math.inf))
    # d = ((ĉ − ĥ_0 μ_0) − ĥ_1 μ_1) − ..., into one (n, R, F) buffer (the same operations, fewer large temporaries)
    loc = rg.loc.unsqueeze(-2)
    d = (h[..., 0].contiguous() * loc[..., 0]).neg_().add_(c_hat)     # ĉ + (−ĥ_0 μ_0) = ĉ − ĥ_0 μ_0 exactly
    for k in range(1, S):
        d.sub_(h[..., k].contiguous() * loc[..., k])
    return Whitened(G, d, c_hat, h)


class RegionPolygons(NamedTuple):
    """S = 2 without missing data: each region's polygon in v = L_ω⁻¹z, for :func:`pair_edges`.

    Attributes:
        edges: :class:`~pyro_cpa.integrate.bivariate.PolygonEdges` (R, F) of {v : g_jᵀv <= ĉ_j}.
        e_hat: (R, F, 2) ê_j = L_ω⁻ᵀe_j (e_j = (−g_j2, g_j1) the tangent of line j; 0 on padding rows).
        per_pair: (R,) regions with two parallel lines (|g_i × g_k| <= ``DEFAULT_PARALLEL_TOL``): their pairs
            take :func:`~pyro_cpa.integrate.bivariate.polygon_edges` of their own (G, d) (see
            :func:`region_polygons`).
    """

    edges: PolygonEdges
    e_hat: torch.Tensor
    per_pair: torch.Tensor


def region_polygons(wh: Whitened, scale_tril: torch.Tensor) -> RegionPolygons:
    r"""The region polygons {v : g_jᵀv <= ĉ_j}, v = L_ω⁻¹z, of :func:`whiten_chunk`'s output (S = 2, Σ_ω per
    region), with their edges (:func:`~pyro_cpa.integrate.bivariate.polygon_edges`: R polygons, not n·R) and
    the tangents mapped back, ê_j = L⁻ᵀe_j: with δ = L⁻¹μ, e_j·δ = ê_jᵀμ, the shift of line j's edge parameter
    for the pair (see :func:`pair_edges`). ê solves Lᵀê = e elementwise (L lower-triangular 2 × 2:
    ê_1 = e_1/L_11, ê_0 = (e_0 − L_10 ê_1)/L_00), so each value depends on its own region only.

    Regions with two parallel lines (strips, duplicated facets) are flagged ``per_pair``: polygon_edges decides
    their ties and empty strips with a tolerance relative to the offsets, and the region's offsets ĉ in v can be
    far larger than the pair's d (a cell of width 1e-12 at z = −0.7 under a slope-1e12 piece: |ĉ| ~ 7e13, d ~ 50,
    strip width 100 in whitened units, which ĉ's scale would call empty); the pair's own d keeps the decision at
    the scale where the pair's mass is. Without parallel lines no decision depends on the offsets' scale.
    """
    edges = polygon_edges(wh.G, wh.c_hat)
    e = edges.e
    L00, L10, L11 = (scale_tril[:, i, j].unsqueeze(-1) for i, j in ((0, 0), (1, 0), (1, 1)))
    e1 = e[..., 1] / L11
    e0 = (e[..., 0] - L10 * e1) / L00
    g0, g1 = wh.G[..., 0], wh.G[..., 1]
    cross = g0.unsqueeze(-1) * g1.unsqueeze(-2) - g1.unsqueeze(-1) * g0.unsqueeze(-2)   # (R, F, F) g_i × g_k
    real = (wh.G != 0).any(-1)
    off_diag = ~torch.eye(real.shape[-1], dtype=torch.bool, device=real.device)     # i != k by construction
    par = (cross.abs() <= DEFAULT_PARALLEL_TOL) & real.unsqueeze(-1) & real.unsqueeze(-2) & off_diag
    return RegionPolygons(edges, torch.stack([e0, e1], -1), par.flatten(-2).any(-1))


def pair_edges(poly: RegionPolygons, rows: torch.Tensor, loc: torch.Tensor, d: torch.Tensor) -> PolygonEdges:
    r"""The whitened polygons' edges of the pairs (datum, region ``rows``) (P,) with means ``loc`` (P, 2) and
    distances ``d`` (P, f) (the first f rows of :func:`whiten_chunk`'s d): the region's edges gathered and
    translated (:func:`~pyro_cpa.integrate.bivariate.translate_edges`) by shift_j = ê_jᵀμ, summed over the two
    coordinates in a fixed order, elementwise (as d in :func:`whiten_chunk`), so that each value is independent
    of the batch. O(f) per pair instead of the O(f²) of :func:`~pyro_cpa.integrate.bivariate.polygon_edges`."""
    f = d.shape[-1]
    edges = poly.edges.map(lambda x, k: x[:, :f] if k else x).select(rows)
    e_hat = poly.e_hat[:, :f].index_select(0, rows)
    shift = e_hat[..., 0] * loc[:, 0].unsqueeze(-1)
    shift = shift + e_hat[..., 1] * loc[:, 1].unsqueeze(-1)
    out = translate_edges(edges, d, shift)
    own = poly.per_pair.index_select(0, rows).nonzero().squeeze(-1)   # regions with parallel lines
    if own.numel():
        G = poly.edges.Gs[:, :f].index_select(0, rows.index_select(0, own))
        mine = polygon_edges(G, d.index_select(0, own))
        out = PolygonEdges(*(x.index_put((own,), y) for x, y in zip(out, mine)))
    return out


class EdgeTemplate(NamedTuple):
    """The existing edges of every region polygon (:class:`RegionPolygons`), flat in (region, row) order, for
    :func:`flat_pair_edges`; regions flagged ``per_pair`` have none here (their pairs take :func:`pair_edges`).

    Attributes: ``count`` (R,) edges per region, ``start`` (R,) the first edge's index; per edge (Et,) ``row`` (the
    constraint row), ``t_lo``, ``t_hi``, and (Et, 2) ``Gs``, ``e``, ``e_hat``.
    """

    count: torch.Tensor
    start: torch.Tensor
    row: torch.Tensor
    t_lo: torch.Tensor
    t_hi: torch.Tensor
    Gs: torch.Tensor
    e: torch.Tensor
    e_hat: torch.Tensor


def edge_template(poly: RegionPolygons) -> EdgeTemplate:
    """:class:`EdgeTemplate` of the region polygons (O(R·F), once per chunk)."""
    ed = poly.edges
    R, F = ed.exists.shape
    ex = ed.exists & ~poly.per_pair.unsqueeze(-1)
    count = ex.sum(-1)
    tidx = ex.reshape(-1).nonzero().squeeze(-1)
    take = lambda x: x.reshape((R * F,) + x.shape[2:]).index_select(0, tidx)   # noqa: E731
    return EdgeTemplate(count, torch.cumsum(count, 0) - count, tidx % F, take(ed.t_lo), take(ed.t_hi), take(ed.Gs),
                        take(ed.e), take(poly.e_hat))


def _rows2(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, idx)`` for x (n, 2) float64/float32, as one gather of complex scalars (the same bits,
    ~2x faster than torch's gather of 2-element rows)."""
    if x.dtype not in (torch.float64, torch.float32) or not x.is_contiguous():
        return x.index_select(0, idx)
    return torch.view_as_real(torch.view_as_complex(x).index_select(0, idx))


def flat_pair_edges(tmpl: EdgeTemplate, pairs: torch.Tensor, rows: torch.Tensor, loc: torch.Tensor,
                    d: torch.Tensor, need_normals: bool = True) -> FlatEdges:
    r"""The existing edges of the whitened polygons of the pairs ``pairs`` (P,) (flat indices into ``loc`` (·, 2),
    ``d`` (·, F) of :func:`whiten_chunk`) of regions ``rows`` (P,), as :class:`~pyro_cpa.integrate.bivariate.FlatEdges`:
    region ω's edges gathered from ``tmpl`` and translated by shift_j = ê_jᵀμ (the same elementwise operations as
    :func:`pair_edges`, hence the same values), d_j gathered from the pair's row j. O(edges) work and memory, no
    (P, F) padding. Without ``need_normals`` (the mass alone) ``Gs`` and ``e`` are None."""
    P, F = pairs.shape[0], d.shape[-1]
    cnt = tmpl.count.index_select(0, rows)
    E = int(cnt.sum())
    pe = torch.repeat_interleave(torch.arange(P, device=pairs.device), cnt, output_size=E)
    first = torch.cumsum(cnt, 0) - cnt
    t = (tmpl.start.index_select(0, rows) - first).index_select(0, pe) + torch.arange(E, device=pairs.device)
    pi = pairs.index_select(0, pe)
    ds = d.reshape(-1).index_select(0, pi * F + tmpl.row.index_select(0, t))
    loc_e = _rows2(loc, pi)
    e_hat = _rows2(tmpl.e_hat, t)
    shift = e_hat[:, 0] * loc_e[:, 0]
    shift = shift + e_hat[:, 1] * loc_e[:, 1]
    Gs, e = (_rows2(tmpl.Gs, t), _rows2(tmpl.e, t)) if need_normals else (None, None)
    return FlatEdges(pe, ds, Gs, e, tmpl.t_lo.index_select(0, t) - shift, tmpl.t_hi.index_select(0, t) - shift, P)


class FlatMass(NamedTuple):
    """The flux mass of a batch of S = 2 pairs (:func:`flat_batch_mass`): their edges ``fe``, regions ``rows``,
    ``empty`` / ``whole`` polygons, ``log_mass`` (B,) (0 on whole, −inf on empty polygons) and ``rest`` the batch
    positions whose flux mass is not trusted (neither empty nor whole): their log_mass must be replaced by
    :func:`fallback_pair_log_mass` (for many batches at once) before :func:`flat_batch_moments`."""

    fe: FlatEdges
    rows: torch.Tensor
    empty: torch.Tensor
    whole: torch.Tensor
    log_mass: torch.Tensor
    rest: torch.Tensor


def flat_batch_mass(poly: RegionPolygons, tmpl: EdgeTemplate, pairs: torch.Tensor, R: int, loc: torch.Tensor,
                    d: torch.Tensor, d_min: torch.Tensor, need_normals: bool) -> FlatMass:
    """log P of the S = 2 pairs ``pairs`` (flat n·R + ω indices into ``loc`` (n·R, 2), ``d`` (n·R, F), ``d_min``
    (n·R,) = min_j d_j) of regions without parallel lines, without autograd, on their existing edges alone
    (:func:`flat_pair_edges`; their normals too when ``need_normals``, for :func:`flat_batch_moments`): the flux
    mass (:func:`~pyro_cpa.integrate.bivariate.flux_log_mass`), with the pairs whose value is not trusted left to
    :func:`fallback_pair_log_mass` (the few of many batches in one call). The same formulas and decisions as
    ``integrate_whitened(..., edges=pair_edges(...))``: masses equal to the last bit."""
    rows = pairs % R
    fe = flat_pair_edges(tmpl, pairs, rows, loc, d, need_normals=need_normals)
    empty, whole = poly.edges.empty.index_select(0, rows), poly.edges.whole.index_select(0, rows)
    logP, ok = flux_log_mass(fe, d_min.index_select(0, pairs) > 0)
    rest = (~empty & ~whole & ~ok).nonzero().squeeze(-1)
    logP = torch.where(whole, torch.zeros_like(logP), logP)
    logP = torch.where(empty, torch.full_like(logP, -math.inf), logP)
    return FlatMass(fe, rows, empty, whole, logP, rest)


def flat_batch_moments(fm: FlatMass, pairs: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor,
                       centred_covariance: bool) -> tuple[PolytopeMoments, torch.Tensor]:
    """:func:`~pyro_cpa.integrate.integrate_whitened` of the pairs ``pairs`` of :func:`flat_batch_mass`'s ``fm``
    (its ``log_mass`` complete: the ``rest`` replaced by their fallback masses; ``loc`` (n·R, 2), ``scale_tril``
    (R, 2, 2)): the edge moments (:func:`~pyro_cpa.integrate.bivariate.edge_moments`) on the mass's edges. The
    same formulas and decisions as ``integrate_whitened(..., edges=pair_edges(...))``: moments to rounding (their
    edge sums are taken per pair in edge order). Returns the moments and the pairs (flat indices) whose moments
    must be replaced by :func:`centred_pair_moments` (for a whole chunk at once)."""
    logP = fm.log_mass
    m_u, _, cov_u, redo = edge_moments(fm.fe, logP, fm.empty | torch.isneginf(logP), fm.whole,
                                       cov_max_amp=DEFAULT_COV_MAX_AMP if centred_covariance else None)
    return _to_z(PolytopeMoments(logP, m_u, cov_u, torch.zeros_like(logP)), _rows2(loc, pairs),
                 scale_tril.index_select(0, fm.rows)), pairs.index_select(0, redo.nonzero().squeeze(-1))


def _to_z(std: PolytopeMoments, loc: torch.Tensor, L: torch.Tensor) -> PolytopeMoments:
    """The moments of z = μ + L u from those of u (as :func:`~pyro_cpa.integrate.integrate_whitened`), S = 2:
    E[z] = μ + L E[u], Cov[z] = (L Cov[u]) Lᵀ, each entry a sum of two products in index order (elementwise on
    (B,) planes: batched 2×2 matrix products cost ~5x more per pair)."""
    (l00, l01), (l10, l11) = L[..., 0, :].unbind(-1), L[..., 1, :].unbind(-1)
    m0, m1 = std.mean.unbind(-1)
    mean = _pairs_of(loc[..., 0] + (l00 * m0 + l01 * m1), loc[..., 1] + (l10 * m0 + l11 * m1))
    (c00, c01), (c10, c11) = std.covariance[..., 0, :].unbind(-1), std.covariance[..., 1, :].unbind(-1)
    p00, p01 = l00 * c00 + l01 * c10, l00 * c01 + l01 * c11            # L Cov[u]
    p10, p11 = l10 * c00 + l11 * c10, l10 * c01 + l11 * c11
    cov = torch.stack([p00 * l00 + p01 * l01, p00 * l10 + p01 * l11, p10 * l00 + p11 * l01, p10 * l10 + p11 * l11],
                      -1).reshape(std.covariance.shape)
    return std._replace(mean=mean, covariance=cov)


def fallback_pair_log_mass(poly: RegionPolygons, pairs: torch.Tensor, R: int, loc: torch.Tensor,
                           d: torch.Tensor) -> torch.Tensor:
    """log P of the pairs ``pairs`` whose flux mass :func:`flat_batch_moments` did not trust
    (:func:`~pyro_cpa.integrate.bivariate.log_mass_fallback` on their padded edges), all of a chunk's at once: one
    call instead of one per batch (each pair's value depends on that pair alone)."""
    edges = pair_edges(poly, pairs % R, loc.index_select(0, pairs), d.index_select(0, pairs))
    return log_mass_fallback(edges[:6], torch.arange(pairs.numel(), device=pairs.device))


def centred_pair_moments(poly: RegionPolygons, pairs: torch.Tensor, R: int, loc: torch.Tensor,
                         scale_tril: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[z], Cov[z]) of the pairs ``pairs`` that :func:`flat_batch_moments` marked for the centred computation
    (:func:`~pyro_cpa.integrate.bivariate.centred_moments` on their padded edges), all of a chunk's at once: one
    call instead of one per batch (each pair's value depends on that pair alone)."""
    rows, lp = pairs % R, loc.index_select(0, pairs)
    ms, cs = centred_moments(pair_edges(poly, rows, lp, d.index_select(0, pairs))[:6])
    std = _to_z(PolytopeMoments(None, ms, cs, None), lp, scale_tril.index_select(0, rows))
    return std.mean, std.covariance


def mass_upper_bound(rg: RegionGaussians, d: torch.Tensor, d_min: torch.Tensor | None = None) -> torch.Tensor:
    """u = log κ + min_j log Φ(d_j) = log κ + log Φ(min_j d_j) >= log κ + log P (Φ is increasing, so the
    minimum is taken before the one log Φ per pair). ``d`` (n, R, F) from :func:`whiten_chunk`, or its minimum
    over the rows ``d_min`` (n, R) if the caller has it; shape (n, R)."""
    if d.shape[-1] == 0:
        return rg.log_kappa
    return rg.log_kappa + torch.special.log_ndtr(d.amin(-1) if d_min is None else d_min)


def pair_terms(params: RegionParams, x: torch.Tensor, observed: torch.Tensor | None, n_idx: torch.Tensor,
               r_idx: torch.Tensor, rows: torch.Tensor | None, *, mc_kwargs: dict) -> torch.Tensor:
    """t = log κ + log P for the pairs (x[n_idx], ω = r_idx), shape (P,), with κ, μ, chol Σ computed for exactly
    these pairs (differentiable in ``params`` and ``x``), on the constraint rows ``rows`` (P, f) of each pair's
    region (all rows when None): the backward pass of :class:`_RecomputedLogProb`."""
    obs = None if observed is None else observed[n_idx]
    prg = affine_gaussians(params.A[r_idx], params.b[r_idx], x[n_idx], params.obs_var, params.prior_var, obs)
    if rows is None:
        H, c = params.H[r_idx], params.c[r_idx]
    else:
        H, c = params.H[r_idx.unsqueeze(-1), rows], params.c[r_idx.unsqueeze(-1), rows]
    G, d = whiten(prg.loc, prg.scale_tril, H, c, validate=False)
    return prg.log_kappa + std_moments(G, d, need_moments=False, **mc_kwargs).log_mass


class ChunkResult(NamedTuple):
    """Dense results of one chunk of data (rows ``start:stop``), from :func:`evaluate_chunk`.

    ``terms`` (n, R) is log κ + log P on kept pairs and −inf elsewhere; ``mom`` the moments (n, R, ...) as
    :func:`~pyro_cpa.integrate.integrate_whitened` returns them for pruned pairs (log P = −inf, mean = μ,
    covariance 0, stderr 0) — mean and covariance None when ``need_moments`` is False;
    ``rg`` the dense Gaussians; ``batches`` the kept pairs (global flat indices n·R + ω), batch by batch.
    """

    terms: torch.Tensor
    mom: PolytopeMoments
    rg: RegionGaussians
    batches: list


def evaluate_chunk(params: RegionParams, xc: torch.Tensor, oc: torch.Tensor | None, start: int, *,
                   prune_tol: float, need_moments: bool, mc_kwargs: dict,
                   centred_covariance: bool = True, replay: bool = False) -> ChunkResult:
    """Steps 1–2 of the module docstring for the data ``xc`` (n, D) (global rows from ``start``).

    The Gaussians, whitened constraints and moments are computed in the caller's grad mode (dense for the
    chunk: :func:`whiten_chunk`; the integrator sees gathered rows of them, grouped by the region's number of
    real facets for S <= :data:`GROUP_BY_FACETS_MAX_S`); the pruning bound is detached.
    Batches hold :func:`pair_batch` pairs for the rows they are integrated on; under autograd, or when they
    will be ``replay``-ed under autograd (:class:`_RecomputedLogProb`), for the padded F rows, since a pair's
    graph does not shrink in proportion to its rows.
    """
    R, _, S = params.A.shape
    n = xc.shape[0]
    F = params.H.shape[1]
    group = S <= GROUP_BY_FACETS_MAX_S
    if group:
        order, facets = facet_order(params.c.detach())
        params = params._replace(H=params.H.gather(1, order.unsqueeze(-1).expand(params.H.shape)),
                                 c=params.c.gather(1, order))
    rg = region_gaussians(params.A, params.b, xc, params.obs_var, params.prior_var, oc)
    wh = whiten_chunk(rg, params.H, params.c)
    with torch.no_grad():
        d_low = wh.d.detach().amin(-1) if F else None     # (n, R): the bound's, and the flat path's origin test
        bound = mass_upper_bound(rg, wh.d.detach(), d_low)
    d_flat = wh.d.reshape(n * R, F)
    per_datum_G = wh.G.dim() == 4  # missing data: Σ_ω, hence the normals, depend on the datum
    rows = n * R if per_datum_G else R
    G_flat = wh.G.reshape(rows, F, S)
    L_flat = rg.scale_tril.reshape(rows, S, S)
    loc_flat = rg.loc.reshape(n * R, S)
    out = {"log_mass": bound.new_full((n * R,), -math.inf), "log_mass_stderr": bound.new_zeros(n * R)}
    if need_moments:
        out["mean"] = loc_flat.clone()
        out["covariance"] = bound.new_zeros(n * R, S, S)
    batches = []
    graph = replay or torch.is_grad_enabled()
    # S = 2, Σ_ω per region: each region's polygon edges once, translated per pair (region_polygons, pair_edges)
    poly = region_polygons(wh, rg.scale_tril) if S == 2 and not per_datum_G else None
    # without autograd, the pairs of regions without parallel lines take the flat-edge path (flat_batch_moments)
    tmpl = edge_template(poly) if poly is not None and not graph else None
    d_min = d_low.reshape(n * R) if tmpl is not None and F else None

    def integrate(mask: torch.Tensor) -> torch.Tensor:
        flat = mask.reshape(-1).nonzero().squeeze(-1)
        if d_min is not None:
            own = poly.per_pair.index_select(0, flat % R)
            plain, flat = flat[~own], flat[own]
            redo = []
            idxs = [plain[first:first + FLAT_PAIRS] for first in range(0, plain.numel(), FLAT_PAIRS)]
            for g in range(0, len(idxs), FALLBACK_BATCHES if need_moments else 1):
                grp = idxs[g:g + FALLBACK_BATCHES] if need_moments else idxs[g:g + 1]
                fms = [flat_batch_mass(poly, tmpl, idx, R, loc_flat, d_flat, d_min, need_moments) for idx in grp]
                rest = [idx.index_select(0, fm.rest) for idx, fm in zip(grp, fms)]
                if not need_moments:   # the fallback masses: once per chunk, below
                    for idx, fm in zip(grp, fms):
                        out["log_mass"].index_copy_(0, idx, fm.log_mass)
                    redo.extend(rest)
                else:                  # the fallback masses of these batches in one call, then the moments
                    rest_all = torch.cat(rest)
                    if rest_all.numel():
                        fb = fallback_pair_log_mass(poly, rest_all, R, loc_flat, d_flat)
                        for fm, part in zip(fms, fb.split([r.numel() for r in rest])):
                            fm.log_mass.index_put_((fm.rest,), part)
                    for idx, fm in zip(grp, fms):
                        mom, rd = flat_batch_moments(fm, idx, loc_flat, L_flat, centred_covariance)
                        for k in ("log_mass", "mean", "covariance"):   # (the standard error is 0, as initialised)
                            out[k].index_copy_(0, idx, getattr(mom, k))
                        redo.append(rd)
                batches.extend(_Batch(idx + start * R, F, None) for idx in grp)
            # the batches' flagged pairs, all at once: centred moments (need_moments), else fallback masses
            redo = torch.cat(redo) if redo else plain
            if redo.numel() and need_moments:
                mean, cov = centred_pair_moments(poly, redo, R, loc_flat, L_flat, d_flat)
                out["mean"].index_put_((redo,), mean)
                out["covariance"].index_put_((redo,), cov)
            elif redo.numel():
                out["log_mass"].index_put_((redo,), fallback_pair_log_mass(poly, redo, R, loc_flat, d_flat))
        if group:  # pairs by their region's real facet count f (in index order), integrated on the first f rows
            key = facets.index_select(0, flat % R)
            groups = [(f, flat[key == f]) for f, size in enumerate(torch.bincount(key, minlength=F + 1).tolist())
                      if size]
        else:
            groups = [(F, flat)]
        for f, members in groups:
            step = pair_batch(F if graph else f, S, graph)
            for first in range(0, members.numel(), step):
                idx = members[first:first + step]
                rng = _rng_state(mc_kwargs, xc.device) if S >= 4 else None
                row = idx if per_datum_G else idx % R
                G, d = G_flat[:, :f].index_select(0, row), d_flat[:, :f].index_select(0, idx)
                loc = loc_flat.index_select(0, idx)
                edges = None if poly is None else pair_edges(poly, row, loc, d)
                if need_moments:
                    mom = integrate_whitened(loc, L_flat.index_select(0, row), G, d,
                                             centred_covariance=centred_covariance, edges=edges, **mc_kwargs)
                else:  # the mass alone: no moment assembly
                    std = std_moments(G, d, need_moments=False, edges=edges, **mc_kwargs)
                    mom = PolytopeMoments(std.log_mass, None, None, std.log_mass_stderr)
                for k in out:
                    out[k].index_put_((idx,), getattr(mom, k))
                batches.append(_Batch(idx + start * R, f, rng))
        return rg.log_kappa + out["log_mass"].reshape(n, R)

    active = bound >= bound.amax(-1, keepdim=True) - prune_tol
    terms = integrate(active)
    extra = ~active & (bound >= terms.detach().logsumexp(-1, keepdim=True) - prune_tol)
    if bool(extra.any()):
        terms = integrate(extra)
    mom = PolytopeMoments(out["log_mass"].reshape(n, R),
                          out["mean"].reshape(n, R, S) if need_moments else None,
                          out["covariance"].reshape(n, R, S, S) if need_moments else None,
                          out["log_mass_stderr"].reshape(n, R))
    return ChunkResult(terms, mom, rg, batches)


def _log_prob_chunks(params: RegionParams, x: torch.Tensor, observed: torch.Tensor | None, *, prune_tol: float,
                     chunk_size: int, mc_kwargs: dict, keep_batches: bool):
    """log p (N,), its Monte-Carlo standard error (N,) and (if asked) the kept-pair batches; no autograd."""
    R, D, S = params.A.shape
    rows = chunk_rows(R, D, params.H.shape[1], S, chunk_size)
    lp, err, batches = [], [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], rows):
            xc = x[start:start + rows]
            oc = None if observed is None else observed[start:start + rows]
            res = evaluate_chunk(params, xc, oc, start, prune_tol=prune_tol, need_moments=False,
                                 mc_kwargs=mc_kwargs, replay=keep_batches)
            lpc = res.terms.logsumexp(-1)
            lp.append(lpc)
            if S >= 4:  # the exact integrators (S <= 3) have stderr 0 by construction
                w = (res.terms - lpc.unsqueeze(-1)).exp()
                err.append((w.square() * res.mom.log_mass_stderr.square()).sum(-1).sqrt())
            if keep_batches:
                batches += res.batches
    lp = torch.cat(lp) if lp else x.new_zeros(0)
    err = torch.cat(err) if err else torch.zeros_like(lp)
    return lp, err, batches


class _RecomputedLogProb(torch.autograd.Function):
    """log p (N,) with a backward pass that replays the kept-pair batches one at a time (module docstring)."""

    @staticmethod
    def forward(ctx, options: dict, x, A, b, H, c, obs_var, prior_var):
        params = RegionParams(A, b, H, c, obs_var, prior_var)
        observed = observed_mask(x)
        lp, err, batches = _log_prob_chunks(params, x, observed, keep_batches=True, **options)
        ctx.options, ctx.batches = options, batches
        ctx.save_for_backward(x, lp, *params)
        ctx.mark_non_differentiable(err)
        return lp, err

    @staticmethod
    @once_differentiable
    @with_library_threads
    def backward(ctx, grad_lp, _grad_err):
        x, lp, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        R = params[0].shape[0]
        mc_kwargs = ctx.options["mc_kwargs"]
        observed = observed_mask(x)
        xs = torch.where(observed, x, torch.zeros_like(x)) if observed is not None else x
        grads = [None] * len(needs)
        rng_after = _rng_state(mc_kwargs, x.device) if any(bt.rng is not None for bt in ctx.batches) else None
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) for t, need in zip([xs] + params, needs)]
            wanted = [i for i, need in enumerate(needs) if need]
            group = params[0].shape[-1] <= GROUP_BY_FACETS_MAX_S
            order = facet_order(params[3])[0] if group else None  # the forward pass's rows (evaluate_chunk)
            for batch in ctx.batches:
                if batch.rng is not None:
                    _set_rng_state(batch.rng, mc_kwargs, x.device)
                n_idx, r_idx = batch.pairs // R, batch.pairs % R
                rows = order.index_select(0, r_idx)[:, :batch.facets] if group else None
                t = pair_terms(RegionParams(*leaves[1:]), leaves[0], observed, n_idx, r_idx, rows,
                               mc_kwargs=mc_kwargs)
                w = (t.detach() - lp[n_idx]).exp() * grad_lp[n_idx]
                # the vector-Jacobian product wᵀ ∂t as the gradient of the scalar Σ t w (the same bits: the
                # backward of the sum and the product hands each t exactly w); autograd.grad with grad_outputs
                # would import SymPy on first use in torch 2.13 (0.2–0.4 s, see pyro_cpa._shapes)
                g = torch.autograd.grad((t * w).sum(), [leaves[i] for i in wanted], allow_unused=True)
                for i, gi in zip(wanted, g):
                    if gi is not None:
                        grads[i] = gi if grads[i] is None else grads[i] + gi
        if rng_after is not None:
            _set_rng_state(rng_after, mc_kwargs, x.device)
        return (None, *grads)


def observed_mask(x: torch.Tensor) -> torch.Tensor | None:
    """(N, D) bool mask of observed (non-NaN) entries, or None when everything is observed."""
    observed = ~torch.isnan(x)
    return None if bool(observed.all()) else observed


@with_library_threads
def chunked_log_prob(params: RegionParams, x: torch.Tensor, *, prune_tol: float, chunk_size: int,
                     mc_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log p(x_n) (N,) for flat data x (N, D) (NaN = missing) and its Monte-Carlo standard error (N,).

    Memory O(chunk) with or without autograd (module docstring); differentiable in ``params`` and ``x``.
    """
    options = dict(prune_tol=prune_tol, chunk_size=chunk_size, mc_kwargs=mc_kwargs)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)):
        return _RecomputedLogProb.apply(options, x, *params)
    lp, err, _ = _log_prob_chunks(params, x, observed_mask(x), keep_batches=False, **options)
    return lp, err
