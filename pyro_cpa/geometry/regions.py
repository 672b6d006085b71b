"""The partition of latent space into the linear regions of a CPA decoder."""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..nn.network import CPANetwork, as_cpa_network
from .maps import RegionMaps, region_hyperplanes, region_maps

DEFAULT_MAX_REGIONS = 100_000


@dataclass
class RegionEnumeration:
    """What an enumerator finds (the discrete, non-differentiable part of a partition).

    Attributes:
        patterns: per activation layer, a bool tensor (R, n_l): unit active (pre-activation >= 0).
        facets: (R, F) long, indices into the concatenated units (layer by layer) of the constraints
            that are facets of each region (non-redundant H-representation), padded with -1.
        interior_points: (R, S), a point strictly inside each region.
    """

    patterns: list[torch.Tensor]
    facets: torch.Tensor
    interior_points: torch.Tensor


class LinearRegions:
    """The linear regions ω of a CPA decoder g: a partition of the whole latent space R^S.

    On region ω, ``g(z) = A[ω] z + b[ω]`` and ``ω = {z : H[ω] z <= c[ω]}`` (non-redundant; unbounded
    regions stay unbounded). Facet rows are padded to a common count F with ``H = 0``, ``c = +inf``
    (constraints that are always satisfied); ``facet_mask`` marks the real ones.

    The activation patterns, facet lists and interior points are discrete and fixed at enumeration;
    ``A, b, H, c`` and :meth:`maps` are recomputed from the decoder's *current* weights and are
    differentiable with respect to them (valid while the weights have not moved so far that the
    partition changes combinatorially — see :meth:`is_stale`).
    """

    def __init__(self, network: CPANetwork, enumeration: RegionEnumeration, method: str = ""):
        self.network = network
        self.patterns = [p.bool() for p in enumeration.patterns]
        self.facets = enumeration.facets.long()
        self.interior_points = enumeration.interior_points
        self.method = method
        self._version = network.parameters_version()
        codes = torch.cat(self.patterns, dim=-1) if self.patterns else \
            torch.zeros(len(self.interior_points), 0, dtype=torch.bool)
        self._codes = codes

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return int(self.interior_points.shape[0])

    @property
    def latent_dim(self) -> int:
        return self.network.in_features

    @property
    def data_dim(self) -> int:
        return self.network.out_features

    @property
    def facet_mask(self) -> torch.Tensor:
        """(R, F) bool: which padded facet rows are real constraints."""
        return self.facets >= 0

    def is_stale(self) -> bool:
        """True if the decoder's parameters changed since enumeration (the partition may have moved)."""
        return self.network.parameters_version() != self._version

    # ------------------------------------------------------------------ live maps
    def maps(self, dtype: torch.dtype | None = None) -> RegionMaps:
        """Per-region affine maps of every layer (for the M-step); see :class:`RegionMaps`."""
        return region_maps(self.network, self.patterns, dtype)

    def affine(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.maps(dtype)
        return m.A, m.b

    def polytopes(self, dtype: torch.dtype | None = None,
                  maps: RegionMaps | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-redundant H-representation: H (R, F, S), c (R, F); padding rows are H=0, c=+inf."""
        H_all, c_all = region_hyperplanes(self.network, self.patterns, dtype, maps)
        idx = self.facets.clamp(min=0).to(H_all.device)
        H = torch.gather(H_all, 1, idx.unsqueeze(-1).expand(-1, -1, H_all.shape[-1]))
        c = torch.gather(c_all, 1, idx)
        mask = self.facet_mask.to(H_all.device)
        H = torch.where(mask.unsqueeze(-1), H, torch.zeros_like(H))
        c = torch.where(mask, c, torch.full_like(c, float("inf")))
        return H, c

    @property
    def A(self) -> torch.Tensor:
        return self.affine()[0]

    @property
    def b(self) -> torch.Tensor:
        return self.affine()[1]

    @property
    def H(self) -> torch.Tensor:
        return self.polytopes()[0]

    @property
    def c(self) -> torch.Tensor:
        return self.polytopes()[1]

    # ------------------------------------------------------------------ point location
    def locate(self, z: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
        """Index of the region containing each latent point; ``z`` has shape (..., S), result (...).

        Points are matched by activation pattern (exact). A point on a shared boundary is assigned to
        one of the regions it touches.
        """
        if z.shape[-1] != self.latent_dim:
            raise ValueError(f"locate expects points of shape (..., {self.latent_dim}), got {tuple(z.shape)}")
        if not torch.isfinite(z).all():
            raise ValueError("locate: z contains NaN or infinite entries")
        batch = z.shape[:-1]
        flat = z.reshape(-1, self.latent_dim)
        codes = self._codes.to(flat.device)
        if codes.shape[1] == 0:
            return torch.zeros(batch, dtype=torch.long, device=z.device)
        weights = (2.0 * codes.to(torch.float64) - 1.0)  # (R, U)
        U = codes.shape[1]
        out = []
        for start in range(0, flat.shape[0], chunk_size):
            pts = flat[start:start + chunk_size]
            q = torch.cat(self.network.activation_pattern(pts.to(torch.float64)), dim=-1)
            score = (2.0 * q.to(torch.float64) - 1.0) @ weights.T  # U where the pattern matches
            best = score.argmax(dim=-1)
            matched = score.gather(1, best.unsqueeze(1)).squeeze(1) == U
            if not bool(matched.all()):
                # boundary or degenerate points: pick the region with the largest minimal slack
                H, c = self.polytopes(torch.float64)
                with torch.no_grad():
                    slack = c.unsqueeze(0) - torch.einsum("rfs,ns->nrf", H, pts[~matched].to(torch.float64))
                    best[~matched] = slack.min(dim=-1).values.argmax(dim=-1)
            out.append(best)
        return torch.cat(out).reshape(batch)

    def __repr__(self) -> str:
        return (f"LinearRegions(num_regions={len(self)}, S={self.latent_dim}, D={self.data_dim}, "
                f"method='{self.method}')")


def linear_regions(decoder, max_regions: int = DEFAULT_MAX_REGIONS, method: str = "auto",
                   tol: float | None = None, progress: bool = True) -> LinearRegions:
    """Enumerate the linear regions of a CPA ``decoder`` over the whole latent space R^S.

    Args:
        decoder: an ``nn.Sequential`` of supported layers (see :mod:`pyro_cpa.nn`) or a :class:`CPANetwork`.
        max_regions: budget; enumeration stops with :class:`~pyro_cpa.errors.RegionBudgetExceeded`
            (reporting how far it got) once more regions than this are found.
        method: ``"auto"`` (breakpoints for S=1, polygon splitting for S=2, LP refinement for S>=3),
            or one of ``"breakpoints"``, ``"polygons"``, ``"lp"``.
        tol: tolerance deciding whether a hyperplane cuts a region (defaults: 16 unit roundoffs per
            accumulated term, relative to the rounding scale, for S <= 2; 1e-7 for the LP method;
            see :mod:`pyro_cpa.geometry.enumerate`).
        progress: show a tqdm progress bar once the enumeration has run for 2 s (``False``: never).

    The enumeration is exact: every region of positive volume is found once, except, for S >= 2,
    cells thinner than the tolerance band, which are merged into a neighbour (for S = 1 only cells
    a relative perturbation of the weights of order ``tol`` can close). The budget is checked as
    regions are found, so a refusal comes promptly; :func:`~pyro_cpa.geometry.estimate_cost`
    predicts the count first.
    """
    from .enumerate import enumerate_regions

    net = as_cpa_network(decoder)
    net.check_eval_mode()
    if max_regions < 1:
        raise ValueError(f"max_regions must be a positive integer, got {max_regions}")
    enum, used = enumerate_regions(net, max_regions=max_regions, method=method, tol=tol, progress=progress)
    return LinearRegions(net, enum, method=used)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_linear_regions(decoder, max_regions: int = DEFAULT_MAX_REGIONS) -> LinearRegions:
    """:func:`linear_regions`, memoised per decoder module and parameter state.

    The partition is recomputed as soon as any parameter or buffer of the decoder changes (e.g. after
    an optimiser step), so a cached partition is never stale.
    """
    net = as_cpa_network(decoder)
    key = net.module
    version = net.parameters_version()
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == version and hit[1] >= max_regions:
        return hit[2]
    regions = linear_regions(net, max_regions=max_regions)
    _CACHE[key] = (version, max_regions, regions)
    return regions
