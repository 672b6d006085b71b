"""Small polyhedron helpers (double description with pycddlib, Chebyshev centres with HiGHS).

A polyhedron is ``{z : H z <= c}``. Its V-representation is ``conv(vertices) + cone(rays) +
span(lines)``; rays and lines are returned with unit norm.
"""
from __future__ import annotations

from dataclasses import dataclass

import cdd
import numpy as np


@dataclass
class VRep:
    vertices: np.ndarray   # (nv, S)
    rays: np.ndarray       # (nr, S), unit norm
    lines: np.ndarray      # (nl, S), unit norm
    incidence: np.ndarray  # (k, nv + nr + nl) bool: generator g lies on the hyperplane of row i

    @property
    def bounded(self) -> bool:
        return self.rays.shape[0] == 0 and self.lines.shape[0] == 0

    def homogeneous(self) -> np.ndarray:
        """Generators as rows ``[1, v]``, ``[0, r]``, ``[0, l]`` (same order as ``incidence``)."""
        S = self.vertices.shape[1]
        top = np.concatenate([np.ones((len(self.vertices), 1)), self.vertices], 1)
        rest = np.concatenate([np.zeros((len(self.rays) + len(self.lines), 1)),
                               np.concatenate([self.rays, self.lines]).reshape(-1, S)], 1)
        return np.concatenate([top, rest])

    def is_full_dimensional(self, rtol: float = 1e-9) -> bool:
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
    order = np.concatenate([np.nonzero(isv)[0], np.nonzero(isr)[0], np.nonzero(lin)[0]])
    V = G[isv, 1:]
    D = G[:, 1:]
    nrm = np.linalg.norm(D, axis=1)
    nrm[nrm == 0] = 1.0
    # cdd appends an artificial row (the hyperplane at infinity) for unbounded polyhedra: drop it
    inc_sets = cdd.copy_input_incidence(poly)[:H.shape[0]]
    inc = np.zeros((H.shape[0], G.shape[0]), dtype=bool)
    for i, st in enumerate(inc_sets):
        if st:
            inc[i, list(st)] = True
    inc = inc[:, order]
    if V.shape[0] == 0:
        # cdd leaves out the apex of a cone when it is the origin
        if (c < -1e-9 * np.linalg.norm(H, axis=1)).any():
            return None
        V = np.zeros((1, S))
        inc = np.concatenate([(np.abs(c) <= 1e-9 * np.linalg.norm(H, axis=1))[:, None], inc], 1)
    return VRep(vertices=V, rays=D[isr] / nrm[isr, None], lines=D[lin] / nrm[lin, None], incidence=inc)


def facet_rows(incidence: np.ndarray, priority: np.ndarray | None = None) -> np.ndarray:
    """Indices of the non-redundant rows of a full-dimensional polyhedron, from the incidence.

    A row defines a facet iff the set of generators on its hyperplane is not strictly contained in
    another row's set; rows with the same set define the same facet and only the one with the
    smallest ``priority`` (default: row index) is kept.
    """
    T = incidence
    k = T.shape[0]
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    prio = np.arange(k) if priority is None else np.asarray(priority)
    not_sub = (T[:, None, :] & ~T[None, :, :]).any(-1)     # [i, j]: T_i not a subset of T_j
    sub = ~not_sub
    np.fill_diagonal(sub, False)
    strict = sub & not_sub.T
    equal = sub & sub.T
    earlier = (prio[None, :] < prio[:, None]) | ((prio[None, :] == prio[:, None]) &
                                                 (np.arange(k)[None, :] < np.arange(k)[:, None]))
    redundant = strict.any(1) | (equal & earlier).any(1) | ~T.any(1)
    return np.nonzero(~redundant)[0]


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
