r"""The exact marginal distribution of a CPA decoder's output.

    z ~ N(0, diag(prior_scale²)),   x = g(z) + ε,   ε ~ N(0, diag(obs_scale²)),

    log p(x) = logsumexp_ω [ log N(x; b_ω, Σx + A_ω Σz A_ωᵀ) + log P_ω(μ_ω(x), Σ_ω) ]

over the linear regions ω of g (Theorem 1 of Balestriero et al.). See
:mod:`pyro_cpa.distributions.region_gaussians` for κ_ω, μ_ω, Σ_ω.
"""
from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

from .._shapes import broadcast_shapes
from ..errors import PyroCPAError, check_not_tracing
from ..geometry.regions import DEFAULT_MAX_REGIONS, LinearRegions, cached_linear_regions
from ..integrate import PolytopeMoments, gaussian_polytope_moments
from ..nn.network import as_cpa_network
from .chunked import RegionParams, chunk_rows, chunked_log_prob, evaluate_chunk, observed_mask
from .s1_kernel import s1_log_prob
from .truncated_mixture import TruncatedGaussianMixture


def _as_scale(value, size: int, name: str, dim_name: str, dtype, device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device) if not isinstance(value, torch.Tensor) else value
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, size)):
        raise PyroCPAError(f"{name} must be a scalar or a vector of length {dim_name}={size}; got shape "
                           f"{tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise PyroCPAError(f"{name} must be finite and strictly positive; got {t.detach().cpu().tolist()}")
    return t


def _model_dtype(decoder, *scales) -> torch.dtype:
    """The dtype of the Pyro program: the promotion of the decoder's floating parameters and of tensor scales."""
    dtypes = [p.dtype for p in decoder.parameters() if p.is_floating_point()]
    dtypes += [s.dtype for s in scales if isinstance(s, torch.Tensor) and s.is_floating_point()]
    out = dtypes[0] if dtypes else torch.get_default_dtype()
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _check_expand(old: torch.Size, new: torch.Size, name: str) -> None:
    """Pyro's expand rule: new dims may be prepended and size-1 dims grown; nothing else may change."""
    if len(new) < len(old) or any(o != 1 and o != n for o, n in zip(reversed(old), reversed(new))):
        raise ValueError(f"{name}: cannot expand batch shape {tuple(old)} to {tuple(new)} (existing dims of size "
                         "> 1 must keep their size, and dims cannot be removed)")



def _check_representable(A: torch.Tensor, b: torch.Tensor, obs_var: torch.Tensor, prior_var: torch.Tensor) -> None:
    """Raise when the exact computation cannot be represented in the working dtype: a non-finite affine map
    (A_ω, b_ω), or a posterior precision 1/σz² + Σ_d A_ωd²/σx_d² that overflows (e.g. decoder weights of
    1e100). Without this check such decoders give a silent NaN or an opaque Cholesky failure."""
    with torch.no_grad():
        prec = prior_var.reciprocal().sum() + (A * A / obs_var.unsqueeze(-1)).sum((-1, -2))
        ok = bool(torch.isfinite(A).all()) and bool(torch.isfinite(b).all()) and bool(torch.isfinite(prec).all())
    if not ok:
        big = float(A.detach().abs().nan_to_num(math.inf).max()) if A.numel() else 0.0
        raise PyroCPAError(
            f"The decoder's affine maps are not representable in {A.dtype}: the largest |A_ω| is {big:.3g} with "
            f"σx = {float(obs_var.min().sqrt()):.3g}, so the posterior precision AᵀΣx⁻¹A overflows (or a map is "
            "not finite). Rescale the data and the decoder (e.g. standardise x, re-initialise the weights).")

class CPAMarginal(TorchDistribution):
    r"""Exact marginal p(x) of x = g(z) + ε for a CPA decoder g (see module docstring).

    Args:
        decoder: a CPA ``nn.Module`` (see :mod:`pyro_cpa.nn`), latent dim S, output dim D.
        obs_scale: σx, scalar (isotropic) or (D,) (diagonal).
        prior_scale: σz, scalar or (S,).
        max_regions: budget of the region enumeration.
        prune_tol: (datum, region) pairs whose upper bound log κ + min_j log Φ(d_j) lies more than
            ``prune_tol`` nats below the running log p(x) are skipped; the relative error this causes
            is below R·exp(−prune_tol) (≈ 4e-13 for R = 1e5 at the default 40).
        chunk_size: at most this many data per pruning chunk (fewer when R is large: a chunk's dense
            temporaries stay within :data:`~pyro_cpa.distributions.chunked.DENSE_ELEMENTS`); results do not
            depend on it. ``log_prob`` holds O(chunk) memory with or without autograd.
        dtype: dtype of all exact computations (float64 by default, whatever the decoder's dtype).
        mc_kwargs: options of the S >= 4 Monte-Carlo integrator.
        partition: ``"global"`` (enumerate every region once) or ``"local"`` (S <= 2, ReLU-type layers, no
            missing data): per datum, only the regions meeting a certified neighbourhood of its posterior mass
            (:mod:`pyro_cpa.geometry.local`), for decoders whose global partition is too large. ``log_prob``
            then sets ``self.log_prob_bound``: per datum, the log of a certified upper bound of the neglected
            fraction of p(x) (log p(x) <= log_prob + log1p(exp(log_prob_bound))).
        local_tol: the local partition's target: neglected fraction <= exp(-local_tol).

    Dtypes: the exact computation runs in ``dtype``; what goes back to the Pyro program is in the model's
    dtype ``model_dtype`` (the promotion of the decoder's parameters and tensor scales — float32 for a
    float32 model): ``sample``, ``mean``, ``variance``, ``covariance_matrix``, ``entropy``, and ``log_prob`` /
    ``impute`` (promoted with the value's dtype). :meth:`posterior` returns the exact posterior in ``dtype``.
    Tensors created here live on the decoder's device.

    Tracing: the exact computation enumerates regions and selects (datum, region) pairs from tensor
    values, so it cannot be recorded by ``torch.jit.trace`` (``JitTrace_ELBO``): it raises
    :class:`~pyro_cpa.errors.NotTraceableError` rather than replay a frozen graph.

    Missing data: NaN entries of ``x`` are missing; ``log_prob`` marginalises them exactly and
    :meth:`impute` returns their exact conditional mean and covariance.

    Exactness: log_prob, posterior, mean, covariance_matrix, impute are exact to machine precision for
    S <= 2, to ~1e-10 for S = 3 and Monte-Carlo estimates (with ``log_prob_stderr``) for S >= 4.
    """

    arg_constraints = {"obs_scale": constraints.positive, "prior_scale": constraints.positive}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, decoder, obs_scale, prior_scale=1.0, *, max_regions: int = DEFAULT_MAX_REGIONS,
                 prune_tol: float = 40.0, chunk_size: int = 1024, dtype: torch.dtype = torch.float64,
                 mc_kwargs: dict | None = None, regions: LinearRegions | None = None, partition: str = "global",
                 local_tol: float = 40.0, validate_args=None):
        check_not_tracing("CPAMarginal")
        if partition not in ("global", "local"):
            raise PyroCPAError(f"partition must be 'global' or 'local', got {partition!r}")
        self.partition, self.local_tol = partition, float(local_tol)
        self.network = as_cpa_network(decoder)
        self.decoder = self.network.module
        ref = next(iter(self.decoder.parameters()), torch.empty(0, device=torch.get_default_device()))
        self.model_dtype = _model_dtype(self.decoder, obs_scale, prior_scale)
        S, D = self.network.in_features, self.network.out_features
        self.obs_scale = _as_scale(obs_scale, D, "obs_scale", "D", dtype, ref.device)
        self.prior_scale = _as_scale(prior_scale, S, "prior_scale", "S", dtype, ref.device)
        self.max_regions, self.prune_tol, self.chunk_size = max_regions, prune_tol, chunk_size
        self.dtype = dtype
        self.mc_kwargs = dict(mc_kwargs or {})
        self._regions = regions
        self._region_params_memo = None
        super().__init__(torch.Size(), torch.Size((D,)), validate_args=validate_args)

    # ------------------------------------------------------------------ Pyro contract
    @staticmethod
    def infer_shapes(**arg_shapes):
        raise NotImplementedError("CPAMarginal's event shape depends on its decoder; construct it to read shapes")

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        _check_expand(self.batch_shape, batch_shape, "CPAMarginal.expand")
        return self._with_batch_shape(batch_shape, self._get_checked_instance(CPAMarginal, _instance))

    def _with_batch_shape(self, batch_shape: torch.Size, new=None) -> "CPAMarginal":
        new = self._get_checked_instance(CPAMarginal, None) if new is None else new
        for k in ("network", "decoder", "obs_scale", "prior_scale", "max_regions", "prune_tol", "chunk_size",
                  "dtype", "model_dtype", "mc_kwargs", "_regions", "_region_params_memo", "partition", "local_tol"):
            setattr(new, k, getattr(self, k))
        super(CPAMarginal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def enumerate_support(self, expand=True):
        raise NotImplementedError("CPAMarginal is a continuous distribution on R^D: it has no finite support to "
                                  "enumerate (do not mark its site for enumeration)")

    def _out_dtype(self, value: torch.Tensor | None = None) -> torch.dtype:
        if value is not None and value.is_floating_point():
            return torch.promote_types(self.model_dtype, value.dtype)
        return self.model_dtype

    @property
    def latent_dim(self) -> int:
        return self.network.in_features

    @property
    def regions(self) -> LinearRegions:
        """The decoder's linear regions under its current parameters (memoised per parameter state)."""
        if self._regions is not None and not self._regions.is_stale():
            return self._regions
        self._regions = cached_linear_regions(self.decoder, self.max_regions)
        return self._regions

    def _variances(self) -> tuple[torch.Tensor, torch.Tensor]:
        S, D = self.network.in_features, self.network.out_features
        return (self.obs_scale.to(self.dtype) ** 2).expand(D), (self.prior_scale.to(self.dtype) ** 2).expand(S)

    def _region_params(self):
        """A (R, D, S), b (R, D), H (R, F, S), c (R, F) of the current partition, from the decoder's current
        weights (differentiable). Without autograd they are memoised with the partition (same parameter state)."""
        regions = self.regions
        memo = self._region_params_memo
        if memo is not None and memo[0] is regions and not torch.is_grad_enabled():
            return memo[1]
        maps = regions.maps(self.dtype)
        H, c = regions.polytopes(self.dtype, maps=maps)
        out = maps.A, maps.b, H, c
        self._region_params_memo = (regions, out) if not torch.is_grad_enabled() else None
        return out

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        check_not_tracing("CPAMarginal")
        D = self.event_shape[0]
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        if x.dim() == 0 or x.shape[-1] != D:
            raise PyroCPAError(f"x must have shape (..., D={D}); got {tuple(x.shape)}")
        if bool(torch.isinf(x).any()):
            raise PyroCPAError("x contains infinite entries; use NaN to mark missing coordinates")
        return x.to(self.dtype)

    # ------------------------------------------------------------------ the exact computation
    def _params(self) -> RegionParams:
        """A_ω, b_ω, H_ω, c_ω of the current partition, σx², σz² (differentiable in the decoder and scales)."""
        A, b, H, c = self._region_params()
        obs_var, prior_var = self._variances()
        _check_representable(A, b, obs_var, prior_var)
        return RegionParams(A, b, H, c, obs_var, prior_var)

    def _pairs(self, x: torch.Tensor, need_moments: bool = True, centred_covariance: bool = True):
        """For flat x (N, D): terms log κ + log P (N, R) (−inf on pruned pairs), their Monte-Carlo standard
        errors, the moments and Gaussians of every pair, and (A, b, H, c). Memory O(N·R) (dense results).
        ``centred_covariance=False``: see :func:`~pyro_cpa.integrate.std_moments` (for sums of second moments)."""
        params = self._params()
        observed = observed_mask(x)
        R, D, S = params.A.shape
        rows = chunk_rows(R, D, params.H.shape[1], S, self.chunk_size)
        res = [evaluate_chunk(params, x[i:i + rows], None if observed is None else observed[i:i + rows], i,
                              prune_tol=self.prune_tol, need_moments=need_moments, mc_kwargs=self.mc_kwargs,
                              centred_covariance=centred_covariance)
               for i in range(0, x.shape[0], rows)]
        terms = torch.cat([r.terms for r in res])
        fields = PolytopeMoments._fields if need_moments else ("log_mass", "log_mass_stderr")
        mom = PolytopeMoments(**{f: torch.cat([getattr(r.mom, f) for r in res]) if f in fields else None
                                 for f in PolytopeMoments._fields})
        loc = torch.cat([r.rg.loc for r in res])
        scale_tril = torch.cat([r.rg.scale_tril.expand(r.rg.loc.shape[:-1] + (S, S)) for r in res])
        return terms, mom.log_mass_stderr, mom, (loc, scale_tril), params[:4]

    def _use_s1_kernel(self, flat: torch.Tensor) -> bool:
        """Whether :meth:`log_prob` takes the fused S = 1 kernel (:func:`~.s1_kernel.s1_log_prob`): S = 1, global
        partition, no missing entry in ``flat``, and no autograd graph wanted (grad mode off, or neither the data
        nor the decoder's parameters nor the scales require grad)."""
        if self.latent_dim != 1:
            return False
        if torch.is_grad_enabled() and (flat.requires_grad or self.obs_scale.requires_grad
                                        or self.prior_scale.requires_grad
                                        or any(p.requires_grad for p in self.decoder.parameters())):
            return False
        return not bool(torch.isnan(flat).any())

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Exact log p(x), shape ``broadcast(value.shape[:-1], batch_shape)``; NaN entries are marginalised.

        Memory O(chunk) with or without autograd (:mod:`~pyro_cpa.distributions.chunked`): the backward pass
        recomputes the kept (datum, region) pairs batch by batch. ``self.log_prob_stderr`` is set to the
        Monte-Carlo standard error of each value (S >= 4; exactly 0 for S <= 3). For S = 1 without autograd and
        without missing entries the fused kernel (:mod:`~pyro_cpa.distributions.s1_kernel`) integrates every
        (datum, region) pair, chunk by chunk, with no pruning: the same exact value, ~1e-15 relative from the
        pruned generic path and the more exact of the two (it drops no pair above e^-700 of the datum's mass).
        """
        out = self._out_dtype(value if isinstance(value, torch.Tensor) else None)
        x = self._check_x(value)
        flat = x.reshape(-1, x.shape[-1])
        if self.partition == "local":       # per-datum local partitions with a certified bound (geometry.local)
            from ..geometry.local import local_log_prob
            res = local_log_prob(self.network, flat, *self._variances(), self.local_tol, prune_tol=self.prune_tol,
                                 dtype=self.dtype)
            self.log_prob_bound = res.log_bound.reshape(x.shape[:-1]).to(out)
            self.local_stats = {"pairs": res.pairs, "regions": res.regions, **res.partition.seconds}
            lp, err = res.log_prob, torch.zeros_like(res.log_prob)
        elif self._use_s1_kernel(flat):   # S = 1, no autograd graph wanted, no missing entries: every pair at once
            lp = s1_log_prob(self, flat)
            err = torch.zeros_like(lp)
        else:
            lp, err = chunked_log_prob(self._params(), flat, prune_tol=self.prune_tol, chunk_size=self.chunk_size,
                                       mc_kwargs=self.mc_kwargs)
        self.log_prob_stderr = err.reshape(x.shape[:-1]).detach().to(out)
        lp = lp.reshape(x.shape[:-1]).to(out)
        return lp if not self.batch_shape else lp.expand(broadcast_shapes(lp.shape, self.batch_shape))

    def posterior(self, value: torch.Tensor) -> TruncatedGaussianMixture:
        """The exact posterior p(z | x) (NaN entries of x unobserved), batch shape ``value.shape[:-1]``.

        It is computed and returned in ``dtype`` (float64 by default), whatever the model's dtype;
        :class:`~pyro_cpa.guides.ExactPosterior` hands its draws to the model in the model's dtype.
        """
        x = self._check_x(value)
        flat = x.reshape(-1, x.shape[-1])
        terms, _, mom, (loc, scale_tril), (A, b, H, c) = self._pairs(flat, need_moments=True)
        batch = x.shape[:-1]
        R, F, S = H.shape
        return TruncatedGaussianMixture(
            terms.reshape(batch + (R,)), loc.reshape(batch + (R, S)), scale_tril.reshape(batch + (R, S, S)),
            H.expand(batch + (R, F, S)), c.expand(batch + (R, F)), tiles=True,
            component_moments=PolytopeMoments(*(t.reshape(batch + t.shape[1:]) for t in mom)),
            mc_kwargs=self.mc_kwargs, validate_args=False)

    # ------------------------------------------------------------------ moments, sampling, imputation
    @staticmethod
    def _pushforward(weights, A, b, mean, cov, obs_var):
        """Mean and covariance of x = A_ω z + b_ω + ε with ω ~ weights and z | ω ~ (mean, cov)."""
        Am = torch.einsum("rds,...rs->...rd", A, mean) + b
        w = weights.unsqueeze(-1)
        mu = (w * Am).sum(-2)
        second = torch.einsum("...r,rds,...rst,ret->...de", weights, A, cov, A) + \
            torch.einsum("...r,...rd,...re->...de", weights, Am, Am)
        return mu, second - mu.unsqueeze(-1) * mu.unsqueeze(-2) + torch.diag_embed(obs_var)

    def _prior_moments(self):
        check_not_tracing("CPAMarginal")
        A, b, H, c = self._region_params()
        obs_var, prior_var = self._variances()
        S = self.latent_dim
        mom = gaussian_polytope_moments(torch.zeros(S, dtype=self.dtype, device=A.device),
                                        torch.diag(prior_var.sqrt()), H, c, **self.mc_kwargs)
        return self._pushforward(mom.log_mass.exp(), A, b, mom.mean, mom.covariance, obs_var)

    @property
    def mean(self) -> torch.Tensor:
        """E[x] = Σ_ω A_ω E[z 1_ω] + b_ω P_ω (exact)."""
        return self._prior_moments()[0].to(self.model_dtype).expand(self.batch_shape + self.event_shape)

    @property
    def covariance_matrix(self) -> torch.Tensor:
        """Cov[x] = Σx + Σ_ω E[(A_ω z + b_ω)(A_ω z + b_ω)ᵀ 1_ω] − E[x]E[x]ᵀ (exact)."""
        return self._prior_moments()[1].to(self.model_dtype).expand(
            self.batch_shape + self.event_shape + self.event_shape)

    @property
    def variance(self) -> torch.Tensor:
        return torch.diagonal(self.covariance_matrix, dim1=-2, dim2=-1)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Exact draws z ~ N(0, Σz), x = g(z) + ε (computed in ``dtype``, returned in ``model_dtype``)."""
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            obs_var, prior_var = self._variances()
            z = torch.randn(shape + (self.latent_dim,), dtype=self.dtype, device=prior_var.device) * prior_var.sqrt()
            x = self.network.preactivations(z)[1].to(self.dtype)
            return (x + torch.randn_like(x) * obs_var.sqrt()).to(self.model_dtype)

    def entropy(self, num_samples: int = 4096) -> torch.Tensor:
        r"""A **Monte-Carlo estimate** of the differential entropy H = −E_p[log p(x)] (no closed form exists).

        H ≈ −(1/n) Σ_i log p(x_i) over ``num_samples`` exact draws x_i ~ p, each log p(x_i) exact (S <= 3);
        its standard error std(log p(x_i)) / √n is stored in ``self.entropy_stderr``. Every batch
        element is the same distribution, so one estimate is expanded to ``batch_shape``.
        """
        if int(num_samples) < 2:
            raise PyroCPAError(f"entropy needs num_samples >= 2 for its standard error; got {num_samples}")
        base = self._with_batch_shape(torch.Size())
        with torch.no_grad():
            lp = base.log_prob(base.sample((int(num_samples),)))
        self.entropy_stderr = (lp.std() / math.sqrt(int(num_samples))).expand(self.batch_shape)
        return (-lp.mean()).expand(self.batch_shape)

    def impute(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact E[x | x_obs] and Cov[x | x_obs], where NaN entries of ``value`` are the missing ones.

        Returns ``(mean, cov)`` of shapes (..., D) and (..., D, D); observed entries of ``mean`` equal the
        data and their rows/columns of ``cov`` are zero.
        """
        out = self._out_dtype(value if isinstance(value, torch.Tensor) else None)
        x = self._check_x(value)
        flat = x.reshape(-1, x.shape[-1])
        terms, _, mom, _, (A, b, H, c) = self._pairs(flat, need_moments=True)
        obs_var, _ = self._variances()
        weights = (terms - terms.logsumexp(-1, keepdim=True)).exp()
        mu, cov = self._pushforward(weights, A, b, mom.mean, mom.covariance, obs_var)
        missing = torch.isnan(flat)
        mu = torch.where(missing, mu, flat)
        keep = (missing.unsqueeze(-1) & missing.unsqueeze(-2)).to(cov.dtype)
        cov = cov * keep
        return mu.reshape(x.shape).to(out), cov.reshape(x.shape + x.shape[-1:]).to(out)
