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

Tolerances (each method takes ``tol``; ``None`` uses the method's default):

* ``"breakpoints"``: ``tol`` (default 16 unit roundoffs) times the number of accumulated terms
  multiplies the rounding scale of each root (its componentwise condition number, from
  absolute-value accumulations of the weights). Every cell float64 can resolve is kept, however
  thin; roots closer than their rounding uncertainty are one breakpoint. See :mod:`.enumerate_1d`.
* ``"polygons"``: a vertex lies on a line when ``|G·X| <= tol (n + 2) |G|⁺`` (chart coordinates are
  O(1), ``|G|⁺`` is the absolute-value accumulation of the line's homogeneous coefficients, n the
  number of accumulated terms); default 16 unit roundoffs. Only cells that thin (relative to the
  chart) are merged into a neighbour. See :mod:`.enumerate_2d`.
* ``"lp"``: a generator lies on a hyperplane when ``|t(x)| <= tol (|a| |x| + |b| + |a|)``; default
  ``1e-7``, the zero tolerance of cddlib's floating-point arithmetic, so cells thinner than about
  1e-7 relative to the size of the coordinates are merged into a neighbour.

Cost: the budget ``max_regions`` is checked as the regions grow (after every unit for
``"polygons"``, every split for ``"lp"``, every layer for ``"breakpoints"``, whose layers are
cheap), so a refusal comes promptly and memory stays proportional to the budget. A progress bar
(tqdm, on stderr) appears when an enumeration runs for more than two seconds; ``progress=False``
turns it off. :func:`pyro_cpa.geometry.estimate_cost` predicts regions, pairs and memory first.
"""
from __future__ import annotations

import copy
import time

import torch
from tqdm.auto import tqdm

from ..errors import PyroCPAError, RegionBudgetExceeded
from ..nn.network import CPANetwork, as_cpa_network
from .regions import DEFAULT_MAX_REGIONS, RegionEnumeration

METHODS = ("auto", "breakpoints", "polygons", "lp")


def _budget_error(net: CPANetwork, max_regions: int):
    def make(found: int, layers_done: int) -> RegionBudgetExceeded:
        return RegionBudgetExceeded(
            f"region enumeration of the decoder (latent dim S={net.in_features}, hidden widths "
            f"{list(net.widths)}) found more than max_regions={max_regions} linear regions: at least "
            f"{found} regions after {layers_done} of {len(net.widths)} activation layers. Fixes: raise "
            f"max_regions (linear_regions(decoder, max_regions=...), or max_regions=... of CPAMarginal / "
            f"EM / log_evidence) if the time and memory are affordable (see "
            f"pyro_cpa.geometry.estimate_cost), narrow the network (fewer or narrower hidden layers), or "
            f"use fewer latent dimensions.",
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


#: Seconds an enumeration runs before its progress bar appears.
PROGRESS_DELAY = 2.0
#: Random lines used for the progress bar's estimated total (see :mod:`.cost`).
PROGRESS_LINES = 16


def _on_cpu(net: CPANetwork) -> CPANetwork:
    """``net`` itself on the CPU, else a CPU copy: the enumeration (numpy, SciPy, pycddlib steps) runs on the
    host; its patterns, facets and interior points are CPU tensors that :class:`LinearRegions` moves to the
    decoder's device where it combines them with the weights."""
    if net._ref().device.type == "cpu":
        return net
    return as_cpa_network(copy.deepcopy(net.module).cpu())


def enumerate_regions(net: CPANetwork, max_regions: int = DEFAULT_MAX_REGIONS, method: str = "auto",
                      tol: float | None = None, progress: bool = True) -> tuple[RegionEnumeration, str]:
    """Enumerate every full-dimensional linear region of ``net`` over R^S.

    Args:
        net: the canonical view of the decoder.
        max_regions: raise :class:`~pyro_cpa.errors.RegionBudgetExceeded` once more regions are found
            (checked as regions are found, see the module docstring).
        method: ``"auto"``, ``"breakpoints"`` (S=1), ``"polygons"`` (S=2) or ``"lp"`` (any S).
        tol: relative tolerance below which slivers are merged (see the module docstring);
            ``None`` uses the method's default.
        progress: show a tqdm progress bar (stderr) once the enumeration has run for
            ``PROGRESS_DELAY`` seconds; ``False`` never shows one.

    Returns:
        the :class:`RegionEnumeration` and the name of the method used.
    """
    S = net.in_features
    used = resolve_method(method, S)
    net.check_eval_mode()
    with torch.no_grad():
        for l, step in enumerate(net._affine_steps):
            for name, m in step.modules:
                if not all(bool(torch.isfinite(t).all()) for t in list(m.parameters()) + list(m.buffers())
                           if t.is_floating_point()):
                    raise PyroCPAError(f"the decoder's affine map T_{l} has NaN or infinite weights (layer "
                                       f"'{name}'); cannot enumerate its linear regions")
        for a in net.activations:
            prelu = getattr(a, "prelu", None)
            if prelu is not None and not bool(torch.isfinite(prelu.weight).all()):
                raise PyroCPAError(f"the decoder's activation {a!r} has NaN or infinite slopes; cannot "
                                   "enumerate its linear regions")
    err = _budget_error(net, max_regions)
    if used == "breakpoints":
        from .enumerate_1d import DEFAULT_TOL, enumerate_breakpoints as run
    elif used == "polygons":
        from .enumerate_2d import DEFAULT_TOL, enumerate_polygons as run
    else:
        from .enumerate_nd import DEFAULT_TOL, enumerate_lp as run
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be a non-negative number, got {tol}")
    start = time.monotonic()
    with tqdm(desc=f"linear regions (S={S}, {used})", unit=" regions", delay=PROGRESS_DELAY,
              disable=not progress, leave=False, dynamic_ncols=True) as bar:
        def report(found: int) -> None:
            if bar.total is None and not bar.disable and time.monotonic() - start >= PROGRESS_DELAY:
                # the bar is about to show: give it the a-priori estimate as its total (an ETA)
                from .cost import estimate_regions
                bar.total = int(round(estimate_regions(net, num_lines=PROGRESS_LINES)[0]))
                bar.set_postfix_str(f"total ~{bar.total} estimated, max_regions={max_regions}", refresh=False)
            bar.update(found - bar.n)
        enum = run(_on_cpu(net), max_regions, tol=DEFAULT_TOL if tol is None else tol, budget_error=err,
                   progress=report)
    return enum, used
