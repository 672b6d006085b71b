"""Exact region enumeration for a one-dimensional latent space (S = 1) by breakpoints.

The real line is kept as a sorted list of breakpoints ``β_1 < ... < β_K`` splitting it into the
K + 1 intervals ``(-inf, β_1), (β_1, β_2), ..., (β_K, +inf)``. On every interval the input of the
current layer is affine in z, so every pre-activation ``t_j(z) = M_j z + m_j`` of the next layer is
affine there and has at most one root ``r = -m_j / M_j``; roots inside an interval split it.
Everything is vectorised over intervals and units in torch: the only Python loop is over layers.

Every cell is kept, however thin (a cell of width 1e-9 carrying a slope of 1e9 is as important as a
wide one). Only roots that floating point cannot tell apart are identified. Along with ``M`` and
``m`` the enumerator carries their *absolute-value accumulations* ``|M|⁺, |m|⁺`` (the same products
and sums taken over absolute values: running error analysis, the rounding error of ``M`` and ``m``
is at most ``γ_n |M|⁺``, ``γ_n |m|⁺``). A root's rounding scale is its componentwise condition

    cond(r) = (|m|⁺ + |M|⁺ |r|) / |M|,

(how far r moves under relative perturbations of all the weights, to first order) and its
uncertainty is ``err(r) = tol · (n + 2) · cond(r) + 4 ulp(r)``, where n is the number of terms
accumulated on the way to the root (the latent dimension plus the widths of the earlier layers,
the factor of the rounding bound γ_n) and ``tol`` defaults to 16 unit roundoffs (3.6e-15): a
root is uncertain by 16 roundoffs per accumulated term, which covers the rounding and a nudge of
every weight by a few ulps. Decisions, each with that named tolerance:

* a slope with ``|M| <= tol (n + 2) |M|⁺`` is rounding noise: t is constant on the interval (no
  root); a constant with ``m >= -tol (n + 2) |m|⁺`` counts as active (ties go to "active", as in
  ``t >= 0``);
* a root within ``err(r) + err(β)`` of an endpoint β of its interval lies *on* β (it does not
  split; the unit changes sign at β);
* roots in the same interval closer than the sum of their ``err`` are one breakpoint (its facet
  is the unit with the smallest index, as for the other enumerators).

The activation pattern of a new interval is read from the position of each unit's root relative
to the interval (left of it: sign of M; right of it: minus the sign of M), never from the sign of
a pre-activation evaluated near zero, so patterns and breakpoints are consistent by construction.
The result is the exact partition of a network whose weights differ from the given ones by a
relative perturbation of order ``tol (n + 2)`` (to first order); a cell is lost only if such a
perturbation can close it (e.g. a cell 1e-12 wide at z = 0.7 in the first layer is kept; one of
1e-15 is not). ``tol = 0`` identifies only roots within 4 ulps of each other (float64 cannot place a
point strictly between them).
"""
from __future__ import annotations

import torch

from ..nn.activations import Elementwise
from ..nn.network import CPANetwork
from .maps import form_maps, push_step, select_maps
from .regions import RegionEnumeration

#: Rounding tolerance per accumulated term, relative to the absolute-value accumulations (16 unit
#: roundoffs; see the module docstring).
DEFAULT_TOL = 16 * 2.0 ** -53
#: Roots closer than this many ulps are always identified (no float64 point lies strictly between).
ULP_FLOOR = 4.0


def _ulp(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    return torch.nextafter(a, torch.full_like(a, float("inf"))) - a


@torch.no_grad()
def enumerate_breakpoints(net: CPANetwork, max_regions: int, tol: float = DEFAULT_TOL,
                          budget_error=None, progress=None) -> RegionEnumeration:
    """All intervals of linearity of a CPA network with one latent dimension.

    Args:
        net: the network (``net.in_features`` must be 1).
        max_regions: budget, checked after each layer (``budget_error(found, layers_done)`` is raised).
        tol: relative rounding tolerance, see the module docstring.
        progress: optional callback ``progress(regions_so_far)`` called after every layer.
    """
    if net.in_features != 1:
        raise ValueError(f"the 'breakpoints' method needs a one-dimensional latent space, got S={net.in_features}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    dt, _CPU = torch.float64, torch.device("cpu")  # the enumeration runs on the CPU (see enumerate_regions)
    bps = torch.zeros(0, dtype=dt, device=_CPU)            # sorted breakpoints (K,)
    berr = torch.zeros(0, dtype=dt, device=_CPU)           # their uncertainty err(β)
    bunit = torch.zeros(0, dtype=torch.long, device=_CPU)  # global form creating each breakpoint
    # layer input h = P z + p on each interval, (K+1, n_in, 1), and its absolute-value accumulation
    P, p = torch.ones(1, 1, 1, dtype=dt, device=_CPU), torch.zeros(1, 1, dtype=dt, device=_CPU)
    Pa, pa = P.clone(), p.clone()
    patterns: list[torch.Tensor] = []
    offset = 0
    acc = 0
    inf = torch.tensor([float("inf")], dtype=dt, device=_CPU)
    zero = torch.zeros(1, dtype=dt, device=_CPU)
    for l, act in enumerate(net.activations):
        I = bps.numel() + 1
        # terms accumulated so far (one more for a kink other than 0 or a difference of two entries)
        acc += P.shape[1] + 1 + (act.negative_slope is None)
        rtol = tol * (acc + 1)
        Mt, mt = push_step(net, l, P, p)                              # pre-activations (I, n_l, 1), (I, n_l)
        Mat, mat = push_step(net, l, Pa, pa, absolute=True)
        if _units_are_forms(act):     # the forms are the units (t − (−0.0) = t, |t|⁺ + 0 = |t|⁺ for |t|⁺ >= +0)
            M, m, Ma, ma = Mt[..., 0], mt, Mat[..., 0], mat
        else:
            Mf, m = form_maps(act, Mt, mt)                            # forms (I, n, 1), (I, n)
            Maf, ma = form_maps(act, Mat, mat, absolute=True)
            M, Ma = Mf[..., 0], Maf[..., 0]
        n = M.shape[1]
        sloped = M.abs() > rtol * Ma
        Msafe = torch.where(sloped, M, torch.ones_like(M))
        root = torch.where(sloped, -m / Msafe, torch.zeros_like(M))
        err = torch.where(sloped, rtol * (ma + Ma * root.abs()) / Msafe.abs() + ULP_FLOOR * _ulp(root),
                          torch.zeros_like(M))
        lo, hi = torch.cat([-inf, bps])[:, None], torch.cat([bps, inf])[:, None]
        elo, ehi = torch.cat([zero, berr])[:, None], torch.cat([berr, zero])[:, None]
        at_lo = root <= lo + (elo + err)        # the root lies on or left of the interval
        at_hi = root >= hi - (ehi + err)        # on or right of it
        inside = sloped & ~at_lo & ~at_hi
        # sign of t on an interval the unit does not split (the interval's midpoint decides only where the root
        # lies on both of its ends; q_flat is read where the form is sloped)
        q_const = m >= -rtol * ma
        q_flat = at_lo == (M > 0)
        both = at_lo & at_hi & sloped
        if bool(both.any()):
            mid = _interior_of(lo[:, 0], hi[:, 0])[:, None]
            q_flat = torch.where(both, M * mid + m >= -rtol * (ma + Ma * mid.abs()), q_flat)
        q_base = torch.where(sloped, q_flat, q_const)                # (I, n)

        ii, jj = torch.nonzero(inside, as_tuple=True)               # row-major: by interval, then unit
        r, e, u = root[ii, jj], err[ii, jj], jj + offset
        # sort by position (intervals are disjoint and ordered, so this sorts by interval first)
        order = torch.argsort(r, stable=True)
        ii, jj, r, e, u = ii[order], jj[order], r[order], e[order], u[order]
        # clusters of roots that cannot be told apart (same interval, gap <= sum of uncertainties)
        newc = torch.ones_like(r, dtype=torch.bool)
        if r.numel() > 1:
            newc[1:] = (ii[1:] != ii[:-1]) | (r[1:] - r[:-1] > e[1:] + e[:-1])
        cid = torch.cumsum(newc.long(), 0) - 1                      # cluster of each root
        C = int(newc.sum())
        # representative of a cluster: the root of its smallest unit; uncertainty covers all members
        big = torch.iinfo(torch.long).max
        umin = torch.full((C,), big, dtype=torch.long, device=_CPU).scatter_reduce(0, cid, u, "amin")
        rep_idx = torch.nonzero(u == umin[cid])[:, 0]                # one per cluster, in order
        c_r = r[rep_idx]
        c_e = torch.zeros(C, dtype=dt, device=_CPU).scatter_reduce(0, cid, (r - c_r[cid]).abs() + e, "amax")
        c_u = u[rep_idx]
        # merge the cluster breakpoints into the sorted list (they lie strictly between old ones)
        all_r = torch.cat([bps, c_r])
        all_e = torch.cat([berr, c_e])
        all_u = torch.cat([bunit, c_u])
        order = torch.argsort(all_r, stable=True)
        pos = torch.empty_like(order)
        pos[order] = torch.arange(order.numel(), device=_CPU)
        new_pos = pos[bps.numel():]                                 # index of each cluster breakpoint
        bps, berr, bunit = all_r[order], all_e[order], all_u[order]
        # parent (old interval) of every new interval: number of old breakpoints left of it
        is_old = torch.zeros(bps.numel(), dtype=torch.long, device=_CPU)
        is_old[pos[:all_r.numel() - C]] = 1
        parent = torch.cat([torch.zeros(1, dtype=torch.long, device=_CPU), torch.cumsum(is_old, 0)])
        # breakpoint index of the root of each (old interval, unit) that splits it, else -1
        KB = torch.full((I, n), -1, dtype=torch.long, device=_CPU)
        KB[ii, jj] = new_pos[cid]
        child = torch.arange(bps.numel() + 1, device=_CPU)[:, None]
        kb = KB.index_select(0, parent)
        Mp = M.index_select(0, parent)
        q = torch.where(kb >= 0, (child > kb) == (Mp > 0), q_base.index_select(0, parent))
        patterns = [pt.index_select(0, parent) for pt in patterns] + [q]
        # the selection of a one-kink layer: piece 1 where q, else piece 0 (act.select's gather, the same values)
        sel = None
        if _units_are_forms(act):
            slopes, offs = act.slopes_and_offsets(dt, _CPU)
            sel = (None, torch.where(q, slopes[1], slopes[0]), torch.where(q, offs[1], offs[0]))
        P, p, sel = select_maps(act, q, Mt.index_select(0, parent), mt.index_select(0, parent), sel=sel)
        Pa, pa, _ = select_maps(act, q, Mat.index_select(0, parent), mat.index_select(0, parent), absolute=True,
                                sel=sel)
        offset += n
        if progress is not None:
            progress(bps.numel() + 1)
        if budget_error is not None and bps.numel() + 1 > max_regions:
            raise budget_error(bps.numel() + 1, l + 1)
    K = bps.numel()
    F = min(K, 2)
    facets = torch.full((K + 1, F), -1, dtype=torch.long, device=_CPU)
    if K >= 1:
        if K == 1:
            facets[:, 0] = bunit[0]
        else:
            facets[1:, 0] = bunit            # left endpoint of intervals 1..K
            facets[:-1, 1] = bunit           # right endpoint of intervals 0..K-1
            facets[0, 0], facets[0, 1] = bunit[0], -1
    lo = torch.cat([-inf, bps])
    hi = torch.cat([bps, inf])
    return RegionEnumeration(patterns=patterns, facets=facets, interior_points=_interior_of(lo, hi)[:, None])


def _units_are_forms(act) -> bool:
    """Whether the forms of ``act`` are its units themselves (one kink at 0 per unit, no second term): then
    :func:`~pyro_cpa.geometry.maps.form_maps` returns t + (−0.0) (the same bits) and |t|⁺ + 0.0 (the same bits:
    absolute-value accumulations are sums of non-negative terms, never −0.0), so it need not run."""
    return isinstance(act, Elementwise) and act.kinks == (0.0,)


def _interior_of(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """A point inside every interval (lo, hi): midpoints, and for the outer rays a point well inside.

    Breakpoints are at least ``ULP_FLOOR`` ulps apart, so every midpoint is strictly inside.
    """
    fin = torch.isfinite(lo) & torch.isfinite(hi)
    both = torch.cat([lo[torch.isfinite(lo)], hi[torch.isfinite(hi)]])
    if both.numel() == 0:
        return torch.zeros_like(lo)
    span = (both.max() - both.min()).clamp(min=1.0)
    lo_f = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi_f = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    return torch.where(fin, 0.5 * lo_f + 0.5 * hi_f,
                       torch.where(torch.isfinite(lo), lo_f + span, hi_f - span))
