r"""A mixture of multivariate Gaussians, each truncated to its own convex polytope.

    p(z) = Σ_k π_k · N(z; μ_k, Σ_k) 1{H_k z <= c_k} / P_k,     P_k = ∫_{H_k z <= c_k} N(z; μ_k, Σ_k) dz,

with π = softmax(logits). Polytopes may be unbounded; padding rows (H = 0, c = +inf) are ignored.
This is the exact posterior p(z | x) of a CPA decoder (one component per linear region), but the
class is general.
"""
from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from pyro.distributions.util import broadcast_shape
from torch.distributions import constraints
from torch.distributions.utils import lazy_property

from ..integrate import PolytopeMoments, gaussian_polytope_moments, whiten
from ..integrate.sampling import sample_std_polytope
from ..integrate.univariate import interval_from_constraints, log_ndtr_diff


class _UnionOfPolytopes(constraints.Constraint):
    """Support of a truncated mixture: z lies in (the closure of) at least one component's polytope."""

    event_dim = 1

    def __init__(self, H: torch.Tensor, c: torch.Tensor, tol: float):
        self.H, self.c, self.tol = H, c, tol
        super().__init__()

    def check(self, value: torch.Tensor) -> torch.Tensor:
        slack = self.c - torch.einsum("...kfs,...s->...kf", self.H, value).unsqueeze(-3).squeeze(-3)
        return (slack >= -self.tol * (1 + self.c.abs().nan_to_num(posinf=0.0))).all(-1).any(-1)


class TruncatedGaussianMixture(TorchDistribution):
    r"""Mixture of Gaussians truncated to polytopes (see module docstring). ``has_rsample`` is False.

    Args:
        logits: (..., K) unnormalised log mixture weights of the truncated components.
        loc: (..., K, S) means μ_k of the untruncated Gaussians.
        scale_tril: (..., K, S, S) Cholesky factors of Σ_k.
        H: (..., K, F, S), c: (..., K, F): the polytope of each component (rows H=0, c=+inf pad).
        tiles: declare that the polytopes tile R^S with disjoint interiors (e.g. the regions of a
            decoder); then the support is ``real_vector`` and the entropy is exact.
        component_moments: optional precomputed :class:`~pyro_cpa.integrate.PolytopeMoments` of the
            components (as returned by :func:`~pyro_cpa.integrate.gaussian_polytope_moments`), to skip
            recomputation; must match the other arguments.
        boundary_tol: relative tolerance when testing whether a point lies in a polytope (points on
            a facet belong to it).
        mc_kwargs: options of the S >= 4 Monte-Carlo integrator (``num_samples``, ``generator``...).

    Exactness: ``log_prob``, ``mean``, ``covariance_matrix``, ``cdf`` and the component masses are exact to
    machine precision for S <= 2 and ~1e-10 for S = 3; for S >= 4 masses and moments are Monte-Carlo
    estimates (see ``component_log_mass_stderr``). ``sample`` draws exact i.i.d. samples for every S.
    """

    arg_constraints = {
        "logits": constraints.real_vector,
        "loc": constraints.independent(constraints.real, 2),
        "scale_tril": constraints.independent(constraints.lower_cholesky, 1),
        "H": constraints.independent(constraints.real, 3),
        "c": constraints.independent(constraints.real, 2),
    }
    has_rsample = False

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor, H: torch.Tensor,
                 c: torch.Tensor, *, tiles: bool = False, component_moments: PolytopeMoments | None = None,
                 boundary_tol: float = 1e-9, mc_kwargs: dict | None = None, validate_args=None):
        if loc.dim() < 2:
            raise ValueError(f"loc must have shape (..., K, S), got {tuple(loc.shape)}")
        K, S = loc.shape[-2:]
        if logits.shape[-1:] != (K,) or scale_tril.shape[-3:] != (K, S, S) or H.shape[-3] != K \
                or H.shape[-1] != S or c.shape[-2:] != H.shape[-3:-1]:
            raise ValueError(
                "inconsistent shapes: expected logits (..., K), loc (..., K, S), scale_tril (..., K, S, S), "
                f"H (..., K, F, S), c (..., K, F); got {tuple(logits.shape)}, {tuple(loc.shape)}, "
                f"{tuple(scale_tril.shape)}, {tuple(H.shape)}, {tuple(c.shape)}")
        batch_shape = broadcast_shape(logits.shape[:-1], loc.shape[:-2], scale_tril.shape[:-3], H.shape[:-3],
                                      c.shape[:-2])
        self.logits, self.loc, self.scale_tril, self.H, self.c = logits, loc, scale_tril, H, c
        self.tiles = tiles
        self.boundary_tol = boundary_tol
        self.mc_kwargs = dict(mc_kwargs or {})
        if component_moments is not None:
            self.__dict__["component_moments"] = component_moments
        super().__init__(batch_shape, torch.Size((S,)), validate_args=validate_args)
        if self._validate_args:
            F = H.shape[-2]
            if F and bool(((H.abs().sum(-1) == 0) & torch.isfinite(c)).any()):
                raise ValueError("a polytope row has H = 0 with finite c; padding rows must have c = +inf")

    # ------------------------------------------------------------------ Pyro contract
    @staticmethod
    def infer_shapes(logits, loc, scale_tril, H, c, **kwargs):
        batch_shape = broadcast_shape(logits[:-1], loc[:-2], scale_tril[:-3], H[:-3], c[:-2])
        return batch_shape, loc[-1:]

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(TruncatedGaussianMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        K, S = self.loc.shape[-2:]
        F = self.H.shape[-2]
        new.logits = self.logits.expand(batch_shape + (K,))
        new.loc = self.loc.expand(batch_shape + (K, S))
        new.scale_tril = self.scale_tril.expand(batch_shape + (K, S, S))
        new.H = self.H.expand(batch_shape + (K, F, S))
        new.c = self.c.expand(batch_shape + (K, F))
        new.tiles, new.boundary_tol, new.mc_kwargs = self.tiles, self.boundary_tol, self.mc_kwargs
        if "component_moments" in self.__dict__:
            m = self.component_moments
            new.__dict__["component_moments"] = PolytopeMoments(
                m.log_mass.expand(batch_shape + (K,)), m.mean.expand(batch_shape + (K, S)),
                m.covariance.expand(batch_shape + (K, S, S)), m.log_mass_stderr.expand(batch_shape + (K,)))
        super(TruncatedGaussianMixture, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def enumerate_support(self, expand=True):
        raise NotImplementedError("TruncatedGaussianMixture is a continuous distribution: it has no finite support "
                                  "to enumerate (do not mark its site for enumeration)")

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_support", None)
        return state

    @constraints.dependent_property
    def support(self):
        if self.tiles:
            return constraints.real_vector
        return _UnionOfPolytopes(self.H, self.c, self.boundary_tol)

    # ------------------------------------------------------------------ components
    @lazy_property
    def component_moments(self) -> PolytopeMoments:
        """Mass and conditional moments of every component on its polytope (batch + (K,))."""
        return gaussian_polytope_moments(self.loc, self.scale_tril, self.H, self.c, **self.mc_kwargs)

    @property
    def component_log_mass(self) -> torch.Tensor:
        """log P_k, the Gaussian mass of each component's polytope, shape batch + (K,)."""
        return self.component_moments.log_mass

    @property
    def component_log_mass_stderr(self) -> torch.Tensor:
        return self.component_moments.log_mass_stderr

    @lazy_property
    def mixture_log_weights(self) -> torch.Tensor:
        """log π_k (normalised), shape batch + (K,)."""
        return self.logits - self.logits.logsumexp(-1, keepdim=True)

    # ------------------------------------------------------------------ density
    def _inside(self, value: torch.Tensor) -> torch.Tensor:
        slack = self.c - torch.einsum("...kfs,...ks->...kf", self.H, value)
        scale = 1 + self.c.abs().nan_to_num(posinf=0.0)
        return (slack >= -self.boundary_tol * scale).all(-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:  # shape and NaN only: outside the support log_prob is -inf, not an error
            if value.shape[-1:] != self.event_shape:
                raise ValueError(f"value must have shape (..., {self.event_shape[0]}); got {tuple(value.shape)}")
            if bool(torch.isnan(value).any()):
                raise ValueError("value contains NaN")
        v = value.unsqueeze(-2)  # (..., 1, S)
        diff = v - self.loc
        sol = torch.linalg.solve_triangular(self.scale_tril, diff.unsqueeze(-1), upper=False).squeeze(-1)
        S = self.event_shape[0]
        half_logdet = torch.diagonal(self.scale_tril, dim1=-2, dim2=-1).log().sum(-1)
        log_normal = -0.5 * (sol.square().sum(-1) + S * math.log(2 * math.pi)) - half_logdet
        inside = self._inside(v.expand(diff.shape))
        terms = self.mixture_log_weights + log_normal - self.component_log_mass
        terms = torch.where(inside & (self.mixture_log_weights > -math.inf), terms, torch.full_like(terms, -math.inf))
        return terms.logsumexp(-1)

    # ------------------------------------------------------------------ moments
    @property
    def mean(self) -> torch.Tensor:
        w = self.mixture_log_weights.exp()
        return (w.unsqueeze(-1) * self.component_moments.mean).sum(-2)

    @property
    def covariance_matrix(self) -> torch.Tensor:
        r"""Law of total variance, Σ_k π_k [Cov_k + (m_k − m)(m_k − m)ᵀ]: a weighted sum of PSD terms (no
        E[zzᵀ] − m mᵀ subtraction), so it is PSD by construction and as accurate as the component covariances."""
        m = self.component_moments
        w = self.mixture_log_weights.exp()[..., None, None]
        dev = m.mean - self.mean.unsqueeze(-2)
        return (w * (m.covariance + dev.unsqueeze(-1) * dev.unsqueeze(-2))).sum(-3)

    @property
    def variance(self) -> torch.Tensor:
        return torch.diagonal(self.covariance_matrix, dim1=-2, dim2=-1)

    def cdf(self, value: torch.Tensor) -> torch.Tensor:
        """P(Z <= value) for S = 1, exact; ``value`` has shape sample + batch + (1,) (or without the 1)."""
        if self.event_shape[0] != 1:
            raise NotImplementedError("cdf is defined for S = 1 only")
        G, d = whiten(self.loc, self.scale_tril, self.H, self.c)
        lower, upper, _ = interval_from_constraints(G, d)  # whitened, batch + (K,)
        v = value[..., 0] if value.shape[-1:] == (1,) else value
        t = (v.unsqueeze(-1) - self.loc[..., 0]) / self.scale_tril[..., 0, 0]
        hi = torch.minimum(torch.maximum(t, lower), upper)
        # the same log_ndtr_diff as the component masses (exact for narrow intervals too; the former
        # difference of log Φ's lost ~eps/width there: cdf 1.0000034 measured); the fraction is exactly 1
        # past the upper end and clamped to <= 1, so the cdf lies in [0, 1]
        log_part = log_ndtr_diff(lower, hi)
        lw = self.mixture_log_weights
        use = (hi > lower) & (lw > -math.inf)
        log_frac = torch.clamp(log_part - self.component_log_mass, max=0.0)
        log_frac = torch.where(hi >= upper, torch.zeros_like(log_frac), log_frac)
        log_frac = torch.where(use, log_frac, torch.full_like(log_part, -math.inf))
        return torch.clamp((lw + log_frac).logsumexp(-1).exp(), max=1.0)

    def entropy(self, num_samples: int = 20000) -> torch.Tensor:
        r"""Differential entropy.

        Exact when ``tiles`` is True (disjoint components; any S, with the S >= 4 moment error):
        H = −Σ_k π_k log π_k + Σ_k π_k (log P_k + ½ log det(2π Σ_k) + ½ tr(Σ_k⁻¹ E_k[(z−μ_k)(z−μ_k)ᵀ])).
        Otherwise a Monte-Carlo estimate −mean(log p(z_i)) over ``num_samples`` exact draws; its standard
        error is stored in ``self.entropy_stderr``.
        """
        if self.tiles:
            m = self.component_moments
            lw = self.mixture_log_weights
            w = lw.exp()
            S = self.event_shape[0]
            diff = m.mean - self.loc
            second = m.covariance + diff.unsqueeze(-1) * diff.unsqueeze(-2)
            Linv = torch.linalg.solve_triangular(self.scale_tril, torch.eye(S, dtype=self.loc.dtype,
                                                                          device=self.loc.device), upper=False)
            maha = (Linv @ second @ Linv.transpose(-1, -2)).diagonal(dim1=-2, dim2=-1).sum(-1)
            half_logdet = torch.diagonal(self.scale_tril, dim1=-2, dim2=-1).log().sum(-1)
            per = m.log_mass + half_logdet + 0.5 * S * math.log(2 * math.pi) + 0.5 * maha - lw
            per = torch.where(w > 0, per, torch.zeros_like(per))
            self.entropy_stderr = torch.zeros(self.batch_shape, dtype=self.loc.dtype, device=self.loc.device)
            return (w * per).sum(-1)
        with torch.no_grad():
            z = self.sample((num_samples,))
            lp = self.log_prob(z)
        self.entropy_stderr = lp.std(0) / math.sqrt(num_samples)
        return -lp.mean(0)

    # ------------------------------------------------------------------ sampling
    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact i.i.d. draws: a component k ~ Categorical(π), then z ~ N(μ_k, Σ_k) truncated to ω_k.

        S = 1 inverts each draw's truncated CDF. For S >= 2 the minimax-tilting proposal is solved once per
        distinct (batch element, component) pair actually drawn, and each pair gets as many exact
        accept–reject draws as were assigned to it.
        """
        sample_shape = torch.Size(sample_shape)
        with torch.no_grad():
            K, S = self.loc.shape[-2:]
            F = self.H.shape[-2]
            B = torch.Size(self.batch_shape).numel()
            n = sample_shape.numel()
            probs = self.mixture_log_weights.expand(self.batch_shape + (K,)).exp().reshape(B, K)
            k = torch.multinomial(probs, n, replacement=True, generator=generator).T  # (n, B)
            pair = (torch.arange(B, device=k.device) * K + k).reshape(-1)  # flat (batch, component) index
            loc = self.loc.expand(self.batch_shape + (K, S)).reshape(B * K, S)
            L = self.scale_tril.expand(self.batch_shape + (K, S, S)).reshape(B * K, S, S)
            H = self.H.expand(self.batch_shape + (K, F, S)).reshape(B * K, F, S)
            c = self.c.expand(self.batch_shape + (K, F)).reshape(B * K, F)
            if S == 1:
                G, d = whiten(loc[pair], L[pair], H[pair], c[pair])
                u = sample_std_polytope(G, d, generator=generator)
            else:
                uniq, inv = torch.unique(pair, return_inverse=True)
                counts = torch.bincount(inv, minlength=len(uniq))
                order = torch.argsort(inv, stable=True)
                first = torch.cumsum(counts, 0) - counts
                rank = torch.empty_like(inv)
                rank[order] = torch.arange(len(inv), device=inv.device) - first[inv[order]]
                G, d = whiten(loc[uniq], L[uniq], H[uniq], c[uniq])
                from ..integrate.tilting import sample_truncated_std
                draws = sample_truncated_std(G, d, (int(counts.max()),), generator=generator)  # (m, U, S)
                u = draws[rank, inv]
            z = loc[pair] + (L[pair] @ u.unsqueeze(-1)).squeeze(-1)
            return z.reshape(sample_shape + self.batch_shape + (S,))
