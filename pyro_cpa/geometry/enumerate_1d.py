"""Exact region enumeration for a one-dimensional latent space (S = 1) by breakpoints.

The real line is kept as a sorted list of breakpoints ``β_1 < ... < β_K`` splitting it into the
K + 1 intervals ``(-inf, β_1), (β_1, β_2), ..., (β_K, +inf)``. On every interval the input of the
current layer is affine in z, so every pre-activation ``t_j(z) = M_j z + m_j`` of the next layer is
affine there and has at most one root ``-m_j / M_j``; roots strictly inside an interval split it.
Everything is vectorised over intervals and units in torch: the only Python loop is over layers.

Tolerance: a root closer than ``tol * max(1, |x|)`` to an endpoint ``x`` of its interval, or to
another new root, does not create a new breakpoint, i.e. intervals thinner than that are merged
into a neighbour.
"""
from __future__ import annotations

import torch

from ..nn.network import CPANetwork
from .regions import RegionEnumeration

DEFAULT_TOL = 1e-9


def enumerate_breakpoints(net: CPANetwork, max_regions: int, tol: float = DEFAULT_TOL,
                          budget_error=None) -> RegionEnumeration:
    """All intervals of linearity of a CPA network with one latent dimension.

    Args:
        net: the network (``net.in_features`` must be 1).
        max_regions: budget, checked after each layer (``budget_error(found, layers_done)`` is raised).
        tol: relative tolerance, see the module docstring.
    """
    if net.in_features != 1:
        raise ValueError(f"the 'breakpoints' method needs a one-dimensional latent space, got S={net.in_features}")
    dt = torch.float64
    with torch.no_grad():
        maps = [(W.detach().to(dt).cpu(), v.detach().to(dt).cpu()) for W, v in net.affine_maps()]
    bps = torch.zeros(0, dtype=dt)          # sorted breakpoints (K,)
    bunit = torch.zeros(0, dtype=torch.long)  # global unit creating each breakpoint
    P = torch.ones(1, 1, dtype=dt)          # layer input h = P z + p on each interval, (K+1, n_in)
    p = torch.zeros(1, 1, dtype=dt)
    patterns: list[torch.Tensor] = []
    offset = 0
    inf = torch.tensor([float("inf")], dtype=dt)
    for l, (W, v) in enumerate(maps[:-1]):
        n = W.shape[0]
        M = P @ W.T                          # (K+1, n)
        m = p @ W.T + v
        nz = M != 0
        root = torch.where(nz, -m / torch.where(nz, M, torch.ones_like(M)), torch.zeros_like(M))
        lo_m = torch.cat([-inf, bps + tol * bps.abs().clamp(min=1.0)])
        hi_m = torch.cat([bps - tol * bps.abs().clamp(min=1.0), inf])
        inside = nz & torch.isfinite(root) & (root > lo_m[:, None]) & (root < hi_m[:, None])
        new_r = root[inside]
        new_u = torch.nonzero(inside)[:, 1] + offset
        if new_r.numel():
            new_r, order = torch.sort(new_r, stable=True)
            new_u = new_u[order]
            keep = torch.ones_like(new_r, dtype=torch.bool)
            keep[1:] = (new_r[1:] - new_r[:-1]) > tol * new_r[1:].abs().clamp(min=1.0)
            new_r, new_u = new_r[keep], new_u[keep]
            all_r = torch.cat([bps, new_r])
            all_u = torch.cat([bunit, new_u])
            all_r, order = torch.sort(all_r, stable=True)
            all_u = all_u[order]
        else:
            all_r, all_u = bps, bunit
        # parent (old interval) of every new interval, from its left endpoint
        parent = torch.zeros(all_r.numel() + 1, dtype=torch.long)
        parent[1:] = torch.searchsorted(bps, all_r, right=True)
        bps, bunit = all_r, all_u
        x = _interior(bps)
        t = M[parent] * x[:, None] + m[parent]
        q = t >= 0
        patterns = [pt[parent] for pt in patterns] + [q]
        d = torch.where(q, torch.ones_like(t), torch.full_like(t, net.negative_slopes[l]))
        P = d * M[parent]
        p = d * m[parent]
        offset += n
        if budget_error is not None and bps.numel() + 1 > max_regions:
            raise budget_error(bps.numel() + 1, l + 1)
    K = bps.numel()
    F = min(K, 2)
    facets = torch.full((K + 1, F), -1, dtype=torch.long)
    if K >= 1:
        if K == 1:
            facets[:, 0] = bunit[0]
        else:
            facets[1:, 0] = bunit            # left endpoint of intervals 1..K
            facets[:-1, 1] = bunit           # right endpoint of intervals 0..K-1
            facets[0, 0], facets[0, 1] = bunit[0], -1
    return RegionEnumeration(patterns=patterns, facets=facets, interior_points=_interior(bps)[:, None])


def _interior(bps: torch.Tensor) -> torch.Tensor:
    """A point inside every interval: midpoints, and for the outer rays a point well inside."""
    K = bps.numel()
    if K == 0:
        return torch.zeros(1, dtype=bps.dtype)
    span = (bps[-1] - bps[0]).clamp(min=1.0)
    x = torch.empty(K + 1, dtype=bps.dtype)
    x[0] = bps[0] - span
    x[-1] = bps[-1] + span
    if K > 1:
        x[1:-1] = 0.5 * (bps[1:] + bps[:-1])
    return x
