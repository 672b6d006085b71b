"""The exact posterior of a CPA model as a Pyro guide."""
from __future__ import annotations

import math
from contextlib import ExitStack

import pyro
import torch
from pyro.infer.autoguide import AutoGuide

from ..distributions import TruncatedGaussianMixture
from ..errors import PyroCPAError, check_not_tracing
from ..geometry.regions import DEFAULT_MAX_REGIONS
from ..infer.structure import full_data_structure, read_structure, trace_model
from ..integrate import integrate_whitened, whiten
from ._quantiles import bisect_quantiles, check_levels


class ExactPosteriorSite(TruncatedGaussianMixture):
    r"""The exact posterior p(z | x) as the distribution of the guide's latent site.

    It is the :class:`~pyro_cpa.distributions.TruncatedGaussianMixture` of
    :meth:`~pyro_cpa.distributions.CPAMarginal.posterior`, computed in float64 (``self.loc.dtype``), with
    what crosses into the Pyro program cast to the model's dtype ``model_dtype``: ``sample`` /
    ``rsample`` values, ``log_prob`` (its argument is cast up to the exact dtype first), ``mean``,
    ``covariance_matrix``, ``variance`` and ``cdf``. ``entropy`` (which Pyro's ELBOs do not call; the exact
    evaluation in :mod:`pyro_cpa.infer.evaluation` does) and the component quantities stay in float64.

    ``has_rsample`` is True, and that is exact, not an approximation: the posterior is built under
    ``torch.no_grad()``, so it has no parameter through which a sample could carry a gradient, and the
    pathwise derivative of a draw is exactly zero (``rsample`` refuses if a parameter requires grad).
    Hence estimators that require reparameterised guides (``TraceMeanField_ELBO``) accept it, and
    their gradient with respect to the model's parameters is E_q[∇θ log p(x, z)] (= ∇θ log p(x) by
    Fisher's identity at q = p(z | x)), the same as ``Trace_ELBO``'s.
    """

    has_rsample = True

    @classmethod
    def of(cls, posterior: TruncatedGaussianMixture, model_dtype: torch.dtype) -> "ExactPosteriorSite":
        new = posterior.expand(posterior.batch_shape, _instance=cls.__new__(cls))
        new.model_dtype = model_dtype
        return new

    def expand(self, batch_shape, _instance=None):
        new = super().expand(batch_shape, _instance=self._get_checked_instance(ExactPosteriorSite, _instance))
        new.model_dtype = self.model_dtype
        return new

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> torch.Tensor:
        return super().sample(sample_shape, generator=generator).to(self.model_dtype)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        if any(t.requires_grad for t in (self.logits, self.loc, self.scale_tril, self.H, self.c)):
            raise PyroCPAError("ExactPosteriorSite.rsample: a parameter requires grad, so a draw would need a "
                               "pathwise derivative the truncated mixture does not provide; build it under "
                               "torch.no_grad() (as ExactPosterior does)")
        return self.sample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return super().log_prob(value.to(self.loc.dtype)).to(self.model_dtype)

    @property
    def mean(self) -> torch.Tensor:
        return super().mean.to(self.model_dtype)

    @property
    def covariance_matrix(self) -> torch.Tensor:
        return super().covariance_matrix.to(self.model_dtype)

    def cdf(self, value: torch.Tensor) -> torch.Tensor:
        return super().cdf(value.to(self.loc.dtype)).to(self.model_dtype)


def truncated_mixture_quantiles(post: TruncatedGaussianMixture, q: torch.Tensor) -> torch.Tensor:
    r"""Coordinatewise marginal quantiles of a truncated Gaussian mixture: shape (Q,) + batch + (S,).

    The marginal CDF of coordinate d is

        F_d(t) = Σ_k π_k P(z_d <= t, z ∈ ω_k | k) / P_k,

    and P(z_d <= t, z ∈ ω_k | k) is the Gaussian mass of ω_k with the extra facet e_dᵀ z <= t (whitened:
    the row L_k[d, :] / ‖L_k[d, :]‖ with offset (t − μ_kd) / ‖L_k[d, :]‖), so every F_d(t) is a sum of
    exact polytope masses (machine precision for S <= 2, ~1e-10 for S = 3); F_d(t) = q is solved by
    bisection. S >= 4 would need Monte-Carlo masses, with which bisection is not reliable: refused.
    """
    S = post.event_shape[0]
    if S >= 4:
        raise PyroCPAError(f"exact quantiles need S <= 3 (polytope masses are Monte-Carlo estimates for S={S}); "
                           "use torch.quantile on guide.posterior(...).sample((n,)) instead")
    batch = post.batch_shape
    K, F = post.H.shape[-3], post.H.shape[-2]
    loc = post.loc.expand(batch + (K, S))
    L = post.scale_tril.expand(batch + (K, S, S))
    with torch.no_grad():
        G, d = whiten(loc, L, post.H.expand(batch + (K, F, S)), post.c.expand(batch + (K, F)), validate=False)
        row_norm = L.norm(dim=-1)  # batch + (K, S): ‖L_k[d, :]‖
        G_extra = (L / row_norm.unsqueeze(-1)).transpose(-3, -2).unsqueeze(-2)  # batch + (S, K, 1, S)
        G_all = torch.cat([G.unsqueeze(-4).expand(batch + (S, K, F, S)), G_extra], -2)  # batch + (S, K, F+1, S)
        lw = post.mixture_log_weights.expand(batch + (K,))
        use = lw > -math.inf  # components pruned to weight exactly 0 by construction (log-weight -inf)
        log_P = torch.where(use, post.component_log_mass.expand(batch + (K,)), torch.zeros_like(lw))
        lw_d, log_P_d, use_d = (t.unsqueeze(-2) for t in (lw, log_P, use))  # batch + (1, K)
        loc_d, norm_d = loc.transpose(-1, -2), row_norm.transpose(-1, -2)  # batch + (S, K)
        zero, eye = loc.new_zeros(S), torch.eye(S, dtype=loc.dtype, device=loc.device)

        def cdf(t):  # (Q,) + batch + (S,)
            d_extra = (t.unsqueeze(-1) - loc_d) / norm_d  # (Q,) + batch + (S, K)
            d_all = torch.cat([d.unsqueeze(-3).expand(d_extra.shape + (F,)), d_extra.unsqueeze(-1)], -1)
            active = use_d.expand(d_extra.shape)
            m = integrate_whitened(zero, eye, G_all, d_all, active=active, need_moments=False, **post.mc_kwargs)
            terms = torch.where(active, lw_d + m.log_mass - log_P_d, torch.full_like(m.log_mass, -math.inf))
            return terms.logsumexp(-1).exp()

        mean = post.mean
        spread = torch.diagonal(post.covariance_matrix, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        return bisect_quantiles(cdf, q, mean, 10 * spread)


class ExactPosterior(AutoGuide):
    r"""Guide whose latent site is drawn from the exact posterior p(z | x) of a CPA model.

    The decoder, σx, σz and the latent/observed sites are read from the model's trace (as Pyro's
    autoguides do), under the *current* parameters at every call. The posterior is the
    :class:`~pyro_cpa.distributions.TruncatedGaussianMixture` of
    :meth:`~pyro_cpa.distributions.CPAMarginal.posterior`, built under ``torch.no_grad()`` so no
    score-function gradient leaks into the model's parameters. With it, every particle of
    ``Trace_ELBO`` (or ``TraceMeanField_ELBO``) equals −log p(x) exactly (zero variance). Subsampled data
    plates are supported: the guide draws the plate indices and reads the matching observations.

    Dtypes: the posterior is computed in float64; the site's distribution is an
    :class:`ExactPosteriorSite`, whose samples and log-densities have the model's dtype (that of the
    latent value the model itself produces, e.g. float32 under Pyro's default), so SVI, ``Predictive``
    and ``Importance`` work on float32 models.

    JIT: the exact posterior cannot be traced (data-dependent region enumeration); under
    ``JitTrace_ELBO`` the guide raises :class:`~pyro_cpa.errors.NotTraceableError` at the first step.

    Args:
        model: a CPA model (see :mod:`pyro_cpa.infer.structure`).
        max_regions, prune_tol: passed to :class:`~pyro_cpa.distributions.CPAMarginal`.
    """

    def __init__(self, model, *, create_plates=None, max_regions: int = DEFAULT_MAX_REGIONS,
                 prune_tol: float = 40.0):
        super().__init__(model, create_plates=create_plates)
        self.max_regions, self.prune_tol = max_regions, prune_tol

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        structure = read_structure(trace_model(self.model, *args, **kwargs))
        if structure.latent is None:
            raise PyroCPAError("ExactPosterior needs a model with a latent site; a collapsed CPAMarginal model "
                               "needs no guide (use an empty guide)")
        self._latent = structure.latent
        site = self.prototype_trace.nodes[self._latent]
        self._latent_frames = [f for f in site["cond_indep_stack"] if f.vectorized]
        self._model_dtype = site["value"].dtype

    def posterior(self, *args, subsample: dict | None = None, **kwargs) -> TruncatedGaussianMixture:
        """The exact posterior (a TruncatedGaussianMixture, float64) over the data in the plate, current parameters."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        structure = read_structure(trace_model(self.model, *args, subsample=subsample, **kwargs))
        with torch.no_grad():
            marginal = structure.marginal(max_regions=self.max_regions, prune_tol=self.prune_tol)
            return marginal.posterior(structure.x.detach())

    def forward(self, *args, **kwargs):
        check_not_tracing("ExactPosterior")
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        subsample = {f.name: plates[f.name].indices for f in self._latent_frames
                     if plates[f.name].subsample_size < plates[f.name].size}
        post = ExactPosteriorSite.of(self.posterior(*args, subsample=subsample or None, **kwargs), self._model_dtype)
        with ExitStack() as stack:
            for frame in self._latent_frames:
                stack.enter_context(plates[frame.name])
            z = pyro.sample(self._latent, post)
        return {self._latent: z}

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict:
        """Coordinatewise quantiles of the exact posterior of every datum of the data plate (all data, also
        with a subsampled plate): ``{latent: tensor (len(quantiles), N, S)}`` in the model's dtype.

        Exact up to the bisection tolerance for S <= 3 (see :func:`truncated_mixture_quantiles`).
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        structure = full_data_structure(self.model, *args, **kwargs)
        post = structure.marginal(max_regions=self.max_regions, prune_tol=self.prune_tol).posterior(
            structure.x.detach())
        q = check_levels(quantiles, post.loc.dtype, post.loc.device)
        return {self._latent: truncated_mixture_quantiles(post, q).to(self._model_dtype)}

    def median(self, *args, **kwargs) -> dict:
        """The coordinatewise median of the exact posterior, ``quantiles([0.5])`` (not a mode: p(z | x) can be
        multimodal, and the median of a bimodal marginal can fall between the modes)."""
        return {k: v[0] for k, v in self.quantiles([0.5], *args, **kwargs).items()}
