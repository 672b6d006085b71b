"""Exact enumeration of all linear regions of a CPA network over the whole latent space R^S.

Three methods (``method="auto"`` picks by the latent dimension S):

* ``"breakpoints"`` (S = 1, :mod:`.enumerate_1d`): layer-wise splitting of intervals at the roots of
  the pre-activations, vectorised in torch.
* ``"polygons"`` (S = 2, :mod:`.enumerate_2d`): layer-wise convex polygon splitting, vectorised over
  polygons in numpy; the whole plane (unbounded cells included) is covered exactly by four projective
  charts, one per quadrant, in which the line at infinity is an ordinary edge.
* ``"lp"`` (any S, default for S >= 3, :mod:`.enumerate_nd`): layer-wise refinement of polyhedra in
  double description (H- and V-representation, computed with pycddlib), which handles unbounded
  regions through their rays and lines; the facets come from the incidence of generators and
  constraints.

Tolerance: every method takes a relative tolerance ``tol``. A hyperplane cuts a region only if it
leaves a part of relative thickness more than ``tol`` on both sides; thinner slivers are merged
into the neighbouring region (so regions thinner than ``tol`` relative to the size of the
coordinates are not reported). Defaults: ``1e-9`` for ``"breakpoints"`` and ``"polygons"``,
``1e-7`` for ``"lp"`` (the zero tolerance of cddlib's floating-point arithmetic).
"""
from __future__ import annotations

import torch

from ..errors import PyroCPAError, RegionBudgetExceeded
from ..nn.network import CPANetwork
from .regions import DEFAULT_MAX_REGIONS, RegionEnumeration

METHODS = ("auto", "breakpoints", "polygons", "lp")


def _budget_error(net: CPANetwork, max_regions: int):
    def make(found: int, layers_done: int) -> RegionBudgetExceeded:
        return RegionBudgetExceeded(
            f"region enumeration of the decoder (latent dim S={net.in_features}, hidden widths "
            f"{list(net.widths)}) found more than max_regions={max_regions} linear regions: at least "
            f"{found} regions after {layers_done} of {len(net.widths)} activation layers. Raise "
            f"max_regions (linear_regions(decoder, max_regions=...)) or shrink the network (fewer or "
            f"narrower hidden layers, or a smaller latent dimension).",
            regions_found=found, layers_done=layers_done)
    return make


def resolve_method(method: str, S: int) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown region enumeration method {method!r}; choose one of {METHODS}")
    if method == "auto":
        return "breakpoints" if S == 1 else ("polygons" if S == 2 else "lp")
    if method == "breakpoints" and S != 1:
        raise ValueError(f"method 'breakpoints' needs a latent dimension S=1, got S={S}; use 'auto'")
    if method == "polygons" and S != 2:
        raise ValueError(f"method 'polygons' needs a latent dimension S=2, got S={S}; use 'auto'")
    return method


def enumerate_regions(net: CPANetwork, max_regions: int = DEFAULT_MAX_REGIONS, method: str = "auto",
                      tol: float | None = None) -> tuple[RegionEnumeration, str]:
    """Enumerate every full-dimensional linear region of ``net`` over R^S.

    Args:
        net: the canonical view of the decoder.
        max_regions: raise :class:`~pyro_cpa.errors.RegionBudgetExceeded` once more regions are found
            (checked after every layer, and within a layer for ``"lp"``).
        method: ``"auto"``, ``"breakpoints"`` (S=1), ``"polygons"`` (S=2) or ``"lp"`` (any S).
        tol: relative tolerance below which slivers are merged (see the module docstring);
            ``None`` uses the method's default.

    Returns:
        the :class:`RegionEnumeration` and the name of the method used.
    """
    S = net.in_features
    used = resolve_method(method, S)
    with torch.no_grad():
        for l, (W, v) in enumerate(net.affine_maps()):
            if not (torch.isfinite(W).all() and torch.isfinite(v).all()):
                raise PyroCPAError(f"the decoder's affine map T_{l} has NaN or infinite weights; "
                                   "cannot enumerate its linear regions")
    err = _budget_error(net, max_regions)
    if used == "breakpoints":
        from .enumerate_1d import DEFAULT_TOL, enumerate_breakpoints
        enum = enumerate_breakpoints(net, max_regions, tol=DEFAULT_TOL if tol is None else tol, budget_error=err)
    elif used == "polygons":
        from .enumerate_2d import DEFAULT_TOL, enumerate_polygons
        enum = enumerate_polygons(net, max_regions, tol=DEFAULT_TOL if tol is None else tol, budget_error=err)
    else:
        from .enumerate_nd import DEFAULT_TOL, enumerate_lp
        enum = enumerate_lp(net, max_regions, tol=DEFAULT_TOL if tol is None else tol, budget_error=err)
    return enum, used
