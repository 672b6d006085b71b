"""Small polyhedron helpers (double description with pycddlib, Chebyshev centres with HiGHS).

A polyhedron is ``{z : H z <= c}``. Its V-representation is ``conv(vertices) + cone(rays) +
span(lines)``; rays and lines are returned with unit norm.
"""
from __future__ import annotations

from dataclasses import dataclass

import cdd
import numpy as np


#: cdd omits the apex of a cone at the origin: the origin is the apex when every row has
#: ``c >= -APEX_TOL |h|`` and lies on the rows with ``|c| <= APEX_TOL |h|``.
APEX_TOL = 1e-9


@dataclass
class VRep:
    """V-representation of ``{z : H z <= c}`` with the incidence of its rows.

    ``masks[i]`` is the set of generators on the hyperplane of row i, as an integer bit mask
    (bit ``bits[g]`` for the g-th generator in the order vertices, rays, lines).
    """

    vertices: np.ndarray   # (nv, S)
    rays: np.ndarray       # (nr, S), unit norm
    lines: np.ndarray      # (nl, S), unit norm
    masks: list            # per row, int bit mask of incident generators
    bits: list             # bit position of each generator (vertices, rays, lines order)

    @property
    def bounded(self) -> bool:
        return self.rays.shape[0] == 0 and self.lines.shape[0] == 0

    @property
    def incidence(self) -> np.ndarray:
        """(k, nv + nr + nl) bool: generator g lies on the hyperplane of row i."""
        b = np.array(self.bits, dtype=object)
        return np.array([[(m >> int(x)) & 1 for x in b] for m in self.masks], dtype=bool).reshape(
            len(self.masks), len(self.bits))

    def homogeneous(self) -> np.ndarray:
        """Generators as rows ``[1, v]``, ``[0, r]``, ``[0, l]`` (same order as ``incidence``)."""
        S = self.vertices.shape[1]
        top = np.concatenate([np.ones((len(self.vertices), 1)), self.vertices], 1)
        rest = np.concatenate([np.zeros((len(self.rays) + len(self.lines), 1)),
                               np.concatenate([self.rays, self.lines]).reshape(-1, S)], 1)
        return np.concatenate([top, rest])

    def is_full_dimensional(self, rtol: float = 1e-9) -> bool:
        """Whether the homogeneous generators span R^(S+1) (SVD)."""
        Hg = self.homogeneous()
        if len(self.vertices) == 0:
            return False
        sv = np.linalg.svd(Hg / np.linalg.norm(Hg, axis=1, keepdims=True), compute_uv=False)
        return sv.size >= Hg.shape[1] and sv[Hg.shape[1] - 1] > rtol * max(sv[0], 1.0)

    def interior_point(self) -> np.ndarray:
        """A point strictly inside (a positive combination of all generators): the vertex mean
        pushed along the mean of the rays by the size of the vertex set (at least 1)."""
        x = self.vertices.mean(0)
        if len(self.rays):
            size = max(1.0, float(np.linalg.norm(self.vertices - x, axis=1).max()))
            x = x + size * self.rays.mean(0)
        return x


def vrep(H: np.ndarray, c: np.ndarray) -> VRep | None:
    """V-representation of ``{z : H z <= c}`` (rows should be normalised); ``None`` if empty."""
    S = H.shape[1]
    k = H.shape[0]
    arr = np.concatenate([c[:, None], -H], axis=1)
    poly = cdd.polyhedron_from_matrix(cdd.matrix_from_array(arr, rep_type=cdd.RepType.INEQUALITY))
    gen = cdd.copy_generators(poly)
    G = np.asarray(gen.array, dtype=np.float64).reshape(-1, S + 1)
    if G.shape[0] == 0:
        return None
    lin = np.zeros(G.shape[0], dtype=bool)
    lin[list(gen.lin_set)] = True
    isv = (G[:, 0] > 0.5) & ~lin
    isr = ~isv & ~lin
    order = np.concatenate([np.nonzero(isv)[0], np.nonzero(isr)[0], np.nonzero(lin)[0]]).tolist()
    V = G[isv, 1:]
    D = G[:, 1:]
    nrm = np.linalg.norm(D, axis=1)
    nrm[nrm == 0] = 1.0     # only vertex rows at the origin have a zero direction part; never used below
    # cdd appends an artificial row (the hyperplane at infinity) for unbounded polyhedra: drop it
    masks = [sum(1 << g for g in st) for st in cdd.copy_input_incidence(poly)[:k]]
    masks += [0] * (k - len(masks))
    if V.shape[0] == 0:
        # cdd leaves out the apex of a cone when it is the origin
        rn = np.linalg.norm(H, axis=1)
        if (c < -APEX_TOL * rn).any():
            return None
        V = np.zeros((1, S))
        apex = G.shape[0]
        on = np.abs(c) <= APEX_TOL * rn
        masks = [m | (1 << apex) if o else m for m, o in zip(masks, on.tolist())]
        order = [apex] + order
    return VRep(vertices=V, rays=D[isr] / nrm[isr, None], lines=D[lin] / nrm[lin, None], masks=masks, bits=order)


def facet_masks(masks: list, priority) -> list:
    """Indices of the non-redundant rows of a full-dimensional polyhedron, from incidence bit masks.

    A row defines a facet iff the set of generators on its hyperplane is not strictly contained in
    another row's set (for minimal generators, a face's generators determine it); rows with the
    same set define the same facet and only the one with the smallest ``priority`` is kept.
    """
    k = len(masks)
    keep = []
    for i in range(k):
        mi = masks[i]
        if mi == 0:
            continue
        pi = (priority[i], i)
        for j in range(k):
            if j != i:
                mj = masks[j]
                if mi & mj == mi and (mi != mj or (priority[j], j) < pi):
                    break
        else:
            keep.append(i)
    return keep


def facet_rows(incidence: np.ndarray, priority=None) -> np.ndarray:
    """:func:`facet_masks` for a boolean incidence matrix (k rows, generators as columns)."""
    T = np.asarray(incidence, dtype=bool)
    masks = [sum(1 << int(g) for g in np.nonzero(row)[0]) for row in T]
    prio = list(range(len(masks))) if priority is None else [int(p) for p in priority]
    return np.array(facet_masks(masks, prio), dtype=np.int64)


def linprog_robust(cost, A_ub, b_ub, bounds):
    """``scipy.optimize.linprog`` with HiGHS; when the dual simplex ends in HiGHS's "model status
    unknown" (it happens on degenerate LPs whose optimal face is unbounded), retry with the
    interior-point solver."""
    from scipy.optimize import linprog

    res = linprog(cost, A_ub=A_ub, b_ub=b_ub, bounds=bounds, method="highs")
    if res.status == 4:
        res = linprog(cost, A_ub=A_ub, b_ub=b_ub, bounds=bounds, method="highs-ipm")
    return res


def chebyshev_center(H: np.ndarray, c: np.ndarray, max_radius: float = 1.0) -> tuple[np.ndarray, float]:
    """Centre and radius of the largest ball (radius capped at ``max_radius``, so the LP is bounded
    also for unbounded polyhedra) inside ``{z : H z <= c}``; radius <= 0 means no interior."""
    S = H.shape[1]
    nrm = np.linalg.norm(H, axis=1)
    keep = nrm > 0
    if (c[~keep] < 0).any():
        return np.full(S, np.nan), -np.inf
    H, c, nrm = H[keep] / nrm[keep, None], c[keep] / nrm[keep], nrm[keep]   # normalised rows
    A = np.concatenate([H, np.ones((len(c), 1))], axis=1)
    obj = np.zeros(S + 1)
    obj[-1] = -1.0
    bounds = [(None, None)] * S + [(None, max_radius)]
    res = linprog_robust(obj, A, c, bounds)
    if res.status != 0:
        return np.full(S, np.nan), -np.inf
    return res.x[:S], float(res.x[-1])
