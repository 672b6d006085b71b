"""Exact region enumeration in any latent dimension by layer-wise refinement of polyhedra.

Every region is kept in double description: its non-redundant H-representation ``H z <= c`` (one
row per facet, labelled by the unit that defines it) and its V-representation (vertices, extreme
rays and lines, from pycddlib). Unbounded regions need no bounding box: they simply have rays or
lines.

Layer by layer, on each region of the earlier layers every unit of the next layer has an affine
pre-activation ``t(z) = a·z + b``; it cuts the region iff ``t`` takes both signs on the generators
(a vertex value beyond the tolerance band, or a ray/line along which ``t`` grows or falls). This
test is exact and costs no LP, and is vectorised over the units. The cutting units then split the
region one after the other; each split builds the H-representation of both halves, computes their
V-representation with cdd and drops the rows that became redundant: a row is a facet iff its set of
incident generators is not strictly contained in another row's (rows with equal sets describe the
same hyperplane, and the one of the earliest unit is kept). The interior point of a region is a
positive combination of all its generators (vertex mean, moved along the rays for unbounded
regions), which is strictly inside.

Tolerance: a generator ``x`` is taken on the hyperplane if ``|t(x)| <= tol (|a| |x| + |b| + |a|)``
(for rays/lines: ``|a·r| <= tol |a|``); a unit cuts a region only if it has generators beyond that
band on both sides. A split is cancelled (the sliver merged into the other side) when a half is
not full-dimensional in cdd's result, i.e. when the positive combination of its generators is not
strictly inside all its rows. The default ``1e-7`` is cddlib's own floating-point zero tolerance.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..nn.network import CPANetwork
from .polytope import VRep, facet_masks, vrep
from .maps import form_maps, push_step, select_maps
from .regions import RegionEnumeration

DEFAULT_TOL = 1e-7
#: A child polyhedron is full-dimensional when its interior point has slack above
#: ``INTERIOR_TOL * (1 + max|x|)`` in every (normalised) row.
INTERIOR_TOL = 1e-9
#: Seconds between progress reports.
REPORT_EVERY = 0.5


class _Region:
    __slots__ = ("H", "c", "labels", "v", "bits", "P", "p")

    def __init__(self, H, c, labels, v, bits, P, p):
        self.H, self.c, self.labels, self.v, self.bits, self.P, self.p = H, c, labels, v, bits, P, p


def _sides(v: VRep, M: np.ndarray, m: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """For the affine forms ``t = M z + m`` (n, S), (n,): does t take values > band / < -band?"""
    an = np.linalg.norm(M, axis=1)
    vals = v.vertices @ M.T + m                                     # (nv, n)
    band = tol * (np.linalg.norm(v.vertices, axis=1)[:, None] * an + np.abs(m) + an)
    pos = (vals > band).any(0)
    neg = (vals < -band).any(0)
    if len(v.rays):
        rv = v.rays @ M.T
        pos |= (rv > tol * an).any(0)
        neg |= (rv < -tol * an).any(0)
    if len(v.lines):
        lv = np.abs(v.lines @ M.T)
        both = (lv > tol * an).any(0)
        pos |= both
        neg |= both
    return pos, neg


def _child(H, c, labels, row: np.ndarray, rhs: float, label: int):
    """The region ``{H z <= c, row·z <= rhs}`` in double description, redundant rows removed;
    ``None`` if cdd does not find it full-dimensional (a sliver below the tolerance)."""
    H = np.concatenate([H, row[None]], 0)
    c = np.append(c, rhs)
    labels = np.append(labels, label)
    try:
        v = vrep(H, c)
    except (RuntimeError, ValueError):   # cddlib gave up (numerically hopeless sliver)
        return None
    if v is None:
        return None
    # full-dimensional iff the point inside (a positive combination of all generators) is strictly
    # inside every row: a lower-dimensional result would make some row an implicit equality
    x = v.interior_point()
    if not (c - H @ x > INTERIOR_TOL * (1.0 + np.abs(x).max())).all():
        return None
    keep = facet_masks(v.masks, labels.tolist())
    v.masks = [v.masks[i] for i in keep]
    return H[keep], c[keep], labels[keep], v


@torch.no_grad()
def enumerate_lp(net: CPANetwork, max_regions: int, tol: float = DEFAULT_TOL,
                 budget_error=None, progress=None) -> RegionEnumeration:
    """All linear regions of a CPA network with any latent dimension (see module docstring)."""
    S = net.in_features
    whole = VRep(vertices=np.zeros((1, S)), rays=np.zeros((0, S)), lines=np.eye(S), masks=[],
                 bits=list(range(S + 1)))
    regions = [_Region(np.zeros((0, S)), np.zeros(0), np.zeros(0, dtype=np.int64), whole, [],
                       np.eye(S), np.zeros(S))]
    offset = 0
    L = len(net.activations)
    next_report = time.monotonic() + REPORT_EVERY
    for l in range(L):
        act = net.activations[l]
        out: list[_Region] = []
        for idx, reg in enumerate(regions):
            Mt, mt = push_step(net, l, torch.from_numpy(reg.P)[None], torch.from_numpy(reg.p)[None])
            Mf, mf = form_maps(act, Mt, mt)
            M, m = Mf[0].numpy(), mf[0].numpy()
            pos, neg = _sides(reg.v, M, m, tol)
            bits = ~neg
            cutting = np.nonzero(pos & neg)[0]
            pieces = [(reg.H, reg.c, reg.labels, reg.v, bits)]
            for j in cutting:
                a = M[j]
                nrm = np.linalg.norm(a)
                a_n, m_n = a / nrm, m[j] / nrm
                new = []
                for H, c, labels, v, bts in pieces:
                    ps, ng = _sides(v, a[None], m[j:j + 1], tol)
                    if ps[0] and ng[0]:
                        up = _child(H, c, labels, -a_n, m_n, offset + j)       # t >= 0
                        dn = _child(H, c, labels, a_n, -m_n, offset + j)       # t <= 0
                        if up is not None and dn is not None:
                            b_up, b_dn = bts.copy(), bts.copy()
                            b_up[j], b_dn[j] = True, False
                            new.append(up + (b_up,))
                            new.append(dn + (b_dn,))
                            continue
                        bts = bts.copy()
                        bts[j] = dn is None      # the sliver is merged into the other side
                    else:
                        bts = bts.copy()
                        bts[j] = not ng[0]
                    new.append((H, c, labels, v, bts))
                pieces = new
                found = len(out) + len(pieces) + len(regions) - idx - 1
                if budget_error is not None and found > max_regions:
                    raise budget_error(found, l)
            for H, c, labels, v, bts in pieces:
                P, p, _ = select_maps(act, torch.from_numpy(bts)[None], Mt, mt)
                out.append(_Region(H, c, labels, v, reg.bits + [bts], P[0].numpy(), p[0].numpy()))
            if progress is not None and time.monotonic() >= next_report:
                progress(len(out) + len(regions) - idx - 1)
                next_report = time.monotonic() + REPORT_EVERY
        regions = out
        offset += act.num_forms
        if budget_error is not None and len(regions) > max_regions:
            raise budget_error(len(regions), l + 1)

    R = len(regions)
    F = max((len(r.labels) for r in regions), default=0)
    facets = np.full((R, F), -1, dtype=np.int64)
    for i, r in enumerate(regions):
        facets[i, :len(r.labels)] = np.sort(r.labels)
    patterns = [torch.from_numpy(np.stack([r.bits[l] for r in regions])) for l in range(L)]
    interior = np.stack([r.v.interior_point() for r in regions]) if R else np.zeros((0, S))
    return RegionEnumeration(patterns=patterns, facets=torch.from_numpy(facets),
                             interior_points=torch.from_numpy(interior))
