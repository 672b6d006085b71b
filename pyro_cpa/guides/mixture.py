r"""Multimodal guides: per-datum and amortised mixtures of full-covariance Gaussians.

Both guides use q(z) = Σ_k π_k N(z; m_k, L_k L_kᵀ), π = softmax(logits), and make every particle of
Pyro's ``Trace_ELBO`` an unbiased estimate of the *true* evidence lower bound and of its gradient,

    ELBO(q) = E_q[log p(x, z) − log q(z)] = Σ_k π_k E_{q_k}[f(z)] <= log p(x),   f(z) = log p(x, z) − log q(z),

where log q(z) is always the mixture's *marginal* log-density (never log q(k) + log q(z | k), which would
bound the joint of (k, z) and be looser by E_q[H(q(k | z))]). Two estimators (``estimator=``):

``"score"`` (default). The guide samples an auxiliary index k ~ Categorical(π) with
:class:`MixtureComponentIndex` — log-prob 0, score function log π_k — and then z = m_k + L_k ε with
:class:`MixtureComponentDraw`, whose log-prob is the marginal log q(z). Trace_ELBO's particle value is
log p(x, z) − 0 − log q(z) = f(z), with (k, z) an exact draw of q, so its mean is ELBO(q). Its surrogate
gradient is ∇_θ f(z(θ, ε)) |_k + f(z)·∇log π_k (Pyro's reward log_r = log p − log q(z) = f, per datum),
and E[∇f(z_k(θ, ε))] = Σ_k π_k ∇E_{q_k}[f] with π held fixed, E[f ∇log π_k] = Σ_k (∇π_k) E_{q_k}[f]; their
sum is ∇Σ_k π_k E_{q_k}[f] = ∇ELBO (product rule), so the gradient is unbiased, including the weights.

``"implicit"``. A single site :class:`GaussianMixture` with a fully reparameterised ``rsample``
(implicit reparameterisation of the distributional transform; proof in its docstring). Also unbiased,
but the weights' gradient is carried by samples crossing the low-density gap between separated
components, so its variance explodes there (measured: the weights barely move on a bimodal posterior);
use it for overlapping components only.

**Which ELBOs.** ``Trace_ELBO`` (either estimator), ``TraceGraph_ELBO``, and ``JitTrace_ELBO`` with
``"score"``. ``TraceMeanField_ELBO`` works with ``estimator="implicit"`` only: it requires every guide
site to be reparameterised and drops score-function terms, so with ``"score"`` Pyro refuses
("All distributions in the guide must be fully reparameterized.") — rightly, since without the
REINFORCE term of the index site the weights' gradient would be biased. ``"implicit"`` cannot be
traced by ``torch.jit`` (its ``rsample`` calls ``torch.autograd.grad``) and raises
:class:`~pyro_cpa.errors.NotTraceableError` under ``JitTrace_ELBO``.
"""
from __future__ import annotations

import math
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.util import broadcast_shape
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroParam
from pyro.ops.tensor_utils import periodic_repeat
from torch.distributions import constraints

from ..errors import PyroCPAError, check_not_tracing
from ..infer.structure import read_structure, trace_model
from ._quantiles import check_levels, mixture_marginal_quantiles
from .amortized import _AmortizedGuide, _lower_triangular, _tril_size

__all__ = ["GaussianMixture", "MixtureComponentIndex", "MixtureComponentDraw", "AutoMixture", "AmortizedMixture"]


def _pick(t: torch.Tensor, k: torch.Tensor, tail: tuple) -> torch.Tensor:
    """t: k.shape-broadcastable + (K,) + tail; gather the component k of every batch element."""
    t = t.expand(k.shape + t.shape[-1 - len(tail):])
    idx = k.reshape(k.shape + (1,) * (1 + len(tail))).expand(k.shape + (1,) + tail)
    return t.gather(k.dim(), idx).squeeze(k.dim())


class GaussianMixture(TorchDistribution):
    r"""Mixture of K full-covariance Gaussians with exact density and implicitly reparameterised samples.

        q(z) = Σ_k π_k N(z; loc_k, scale_tril_k scale_trilᵀ_k),   π = softmax(logits).

    Args:
        logits: (..., K) unnormalised log weights.
        loc: (..., K, S) component means.
        scale_tril: (..., K, S, S) lower Cholesky factors of the component covariances.

    **The estimator.** ``rsample`` draws an exact sample z ~ q (k ~ Categorical(π), ε ~ N(0, I),
    z = loc_k + scale_tril_k ε) and attaches to it the *implicit reparameterisation* gradient of the
    multivariate distributional transform (Graves 2016, "Stochastic backpropagation through mixture
    density distributions"; Figurnov, Mohamed & Mnih 2018, "Implicit reparameterization gradients").
    Let F(z; θ) = (F_1, …, F_S) with F_d = Q_θ(z_d | z_{<d}) the conditional CDFs of q. For a mixture,

        F_d(z) = Σ_k w_{k,d}(z_{<d}) Φ(ε_{k,d}(z)),   w_{k,d} ∝ π_k q_k(z_{<d}),
        ε_k(z) = scale_tril_k⁻¹ (z − loc_k)   (forward substitution, so ε_{k,d} depends on z_{≤d}),

    because under component k, z_d | z_{<d} ~ N(loc_{k,d} + Σ_{j<d} L_{k,dj} ε_{k,j}, L_{k,dd}²).

    *Unbiasedness.* The map T_θ: z ↦ F(z; θ) is a bijection of R^S onto (0, 1)^S that sends q_θ to the
    uniform distribution (Rosenblatt transform), so z = T_θ⁻¹(u) with u ~ U(0, 1)^S is a
    reparameterisation of q_θ, and for any f that is C¹ in (z, θ) with integrable derivatives,
    ∇_θ E_{q_θ}[f(z, θ)] = E_u[∇_θ f(T_θ⁻¹(u), θ)] (differentiation under the integral sign). The
    derivative of the inverse follows from the implicit function theorem applied to F(z(θ); θ) = u:

        ∂z/∂θ = −(∇_z F)⁻¹ ∇_θ F,

    where ∇_z F is lower triangular with diagonal q(z_d | z_{<d}) > 0, hence invertible. ``rsample``
    returns ``z̃ = z − J⁻¹ (F(z; θ) − stop_grad F(z; θ))`` with J = ∇_z F evaluated at the drawn z (no
    gradient): its *value* is exactly z and its Jacobian with respect to θ is exactly −J⁻¹∇_θF. Only the
    law of z matters for the value, and the ancestral draw (k, ε) produces z ~ q_θ exactly; the
    gradient is therefore that of the distributional-transform reparameterisation, evaluated at an exact
    draw of q_θ. Hence, for Pyro's ``Trace_ELBO`` (which, for a site with ``has_rsample``, returns
    log p(x, z̃) − log q(z̃) and differentiates it pathwise), every particle is an unbiased estimate
    of ELBO(q) and of its gradient with respect to logits, loc and scale_tril — including the weights,
    which a plain "sample k, then z" scheme would not differentiate.

    *Caveat.* Between well-separated components q is tiny while ∇_θF is not, so the weights' gradient
    comes from rare samples in the gap with huge ∂z/∂θ: unbiased, but heavy-tailed. The mixture guides
    therefore default to the ``"score"`` estimator (see :mod:`pyro_cpa.guides.mixture`).
    """

    arg_constraints = {
        "logits": constraints.real_vector,
        "loc": constraints.independent(constraints.real, 2),
        "scale_tril": constraints.independent(constraints.lower_cholesky, 1),
    }
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor, validate_args=None):
        if loc.dim() < 2:
            raise ValueError(f"loc must have shape (..., K, S), got {tuple(loc.shape)}")
        K, S = loc.shape[-2:]
        if logits.shape[-1:] != (K,) or scale_tril.shape[-3:] != (K, S, S):
            raise ValueError(f"inconsistent shapes: logits {tuple(logits.shape)}, loc {tuple(loc.shape)}, "
                             f"scale_tril {tuple(scale_tril.shape)}; expected (..., K), (..., K, S), (..., K, S, S)")
        batch_shape = broadcast_shape(logits.shape[:-1], loc.shape[:-2], scale_tril.shape[:-3])
        self.logits, self.loc, self.scale_tril = logits, loc, scale_tril
        super().__init__(batch_shape, torch.Size((S,)), validate_args=validate_args)

    @staticmethod
    def infer_shapes(logits, loc, scale_tril):
        return broadcast_shape(logits[:-1], loc[:-2], scale_tril[:-3]), loc[-1:]

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GaussianMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        K, S = self.loc.shape[-2:]
        new.logits = self.logits.expand(batch_shape + (K,))
        new.loc = self.loc.expand(batch_shape + (K, S))
        new.scale_tril = self.scale_tril.expand(batch_shape + (K, S, S))
        super(GaussianMixture, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def num_components(self) -> int:
        return self.loc.shape[-2]

    @property
    def mixture_log_weights(self) -> torch.Tensor:
        """log π_k, shape batch + (K,)."""
        return self.logits - self.logits.logsumexp(-1, keepdim=True)

    # ------------------------------------------------------------------ density
    def component_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log N(value; loc_k, Σ_k) for every component, shape sample + batch + (K,)."""
        diff = value.unsqueeze(-2) - self.loc
        L = self.scale_tril.expand(diff.shape + diff.shape[-1:])
        sol = torch.linalg.solve_triangular(L, diff.unsqueeze(-1), upper=False).squeeze(-1)
        half_logdet = torch.diagonal(self.scale_tril, dim1=-2, dim2=-1).log().sum(-1)
        S = self.event_shape[0]
        return -0.5 * (sol.square().sum(-1) + S * math.log(2 * math.pi)) - half_logdet

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return (self.mixture_log_weights + self.component_log_prob(value)).logsumexp(-1)

    @property
    def mean(self) -> torch.Tensor:
        return (self.mixture_log_weights.exp().unsqueeze(-1) * self.loc).sum(-2).expand(
            self.batch_shape + self.event_shape)

    @property
    def covariance_matrix(self) -> torch.Tensor:
        w = self.mixture_log_weights.exp()[..., None, None]
        cov = self.scale_tril @ self.scale_tril.transpose(-1, -2)
        second = (w * (cov + self.loc.unsqueeze(-1) * self.loc.unsqueeze(-2))).sum(-3)
        mean = self.mean
        return second - mean.unsqueeze(-1) * mean.unsqueeze(-2)

    @property
    def variance(self) -> torch.Tensor:
        return torch.diagonal(self.covariance_matrix, dim1=-2, dim2=-1)

    # ------------------------------------------------------------------ sampling
    def _draw(self, sample_shape) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        K, S = self.loc.shape[-2:]
        with torch.no_grad():
            probs = self.mixture_log_weights.exp().expand(self.batch_shape + (K,))
            n = int(torch.Size(sample_shape).numel())
            k = torch.multinomial(probs.reshape(-1, K), n, replacement=True)  # (B, n)
            k = k.T.reshape(torch.Size(sample_shape) + self.batch_shape)
            loc = _pick(self.loc.detach(), k, (S,))
            L = _pick(self.scale_tril.detach(), k, (S, S))
            eps = torch.randn(shape, dtype=loc.dtype, device=loc.device)
            return loc + (L @ eps.unsqueeze(-1)).squeeze(-1)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self._draw(sample_shape)

    def conditional_cdfs(self, value: torch.Tensor, logits=None, loc=None, scale_tril=None) -> torch.Tensor:
        """F_d = Q(z_d <= value_d | z_{<d} = value_{<d}) for d = 1..S (the Rosenblatt transform)."""
        logits = self.logits if logits is None else logits
        loc = self.loc if loc is None else loc
        scale_tril = self.scale_tril if scale_tril is None else scale_tril
        diff = value.unsqueeze(-2) - loc  # (..., K, S)
        L = scale_tril.expand(diff.shape + diff.shape[-1:])
        eps = torch.linalg.solve_triangular(L, diff.unsqueeze(-1), upper=False).squeeze(-1)
        log_diag = torch.diagonal(scale_tril, dim1=-2, dim2=-1).log()
        log_dens = -0.5 * eps.square() - 0.5 * math.log(2 * math.pi) - log_diag  # (..., K, S)
        prefix = torch.cumsum(log_dens, -1) - log_dens  # log q_k(z_{<d}) (exclusive cumulative sum)
        log_w = (logits - logits.logsumexp(-1, keepdim=True)).unsqueeze(-1) + prefix
        w = torch.softmax(log_w, dim=-2)
        return (w * torch.special.ndtr(eps)).sum(-2)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """An exact draw z ~ q carrying the implicit-reparameterisation gradient (see the class doc)."""
        check_not_tracing("GaussianMixture.rsample (the 'implicit' estimator)",
                          because="its implicit-reparameterisation gradient calls torch.autograd.grad inside the "
                                  "forward pass, which a traced graph cannot record; use estimator='score' with "
                                  "JitTrace_ELBO")
        z = self._draw(sample_shape)
        params = (self.logits, self.loc, self.scale_tril)
        if not torch.is_grad_enabled() or not any(p.requires_grad for p in params):
            return z
        S = self.event_shape[0]
        detached = tuple(p.detach() for p in params)
        with torch.enable_grad():
            z0 = z.detach().requires_grad_()
            F0 = self.conditional_cdfs(z0, *detached)
            rows = [torch.autograd.grad(F0[..., d].sum(), z0, retain_graph=d + 1 < S)[0] for d in range(S)]
        J = torch.stack(rows, -2)  # ∂F_d/∂z_j, lower triangular (F_d depends on z_{<=d} only)
        F = self.conditional_cdfs(z, *params)
        delta = torch.linalg.solve_triangular(J, (F - F.detach()).unsqueeze(-1), upper=False).squeeze(-1)
        return z - delta

    def entropy(self):
        raise NotImplementedError("a Gaussian mixture has no closed-form entropy; see "
                                  "pyro_cpa.infer.evaluation.gaussian_mixture_entropy")


class MixtureComponentIndex(TorchDistribution):
    r"""The auxiliary component index k ~ Categorical(π) of the ``"score"`` estimator.

    Its ``log_prob`` is 0 (the index is a sampling device, not part of q: nothing of log q(k) enters the
    ELBO) while its ``score_parts`` carry the score function ∇log π_k, so that Pyro's ``Trace_ELBO`` adds
    the REINFORCE term (log p(x, z) − log q(z))·∇log π_k for the choice of component.
    """

    arg_constraints = {"logits": constraints.real_vector}
    has_rsample = False

    def __init__(self, logits: torch.Tensor, validate_args=None):
        self.logits = logits
        super().__init__(logits.shape[:-1], torch.Size(), validate_args=validate_args)

    @constraints.dependent_property
    def support(self):
        return constraints.integer_interval(0, self.logits.shape[-1] - 1)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return MixtureComponentIndex(self.logits.expand(batch_shape + self.logits.shape[-1:]), validate_args=False)

    def sample(self, sample_shape=torch.Size()):
        return dist.Categorical(logits=self.logits, validate_args=False).sample(sample_shape)

    def _log_weight(self, value):
        log_w = self.logits - self.logits.logsumexp(-1, keepdim=True)
        log_w = log_w.expand(value.shape + log_w.shape[-1:])
        return log_w.gather(-1, value.long().unsqueeze(-1)).squeeze(-1)

    def log_prob(self, value):
        return torch.zeros_like(self._log_weight(value))

    def score_parts(self, value):
        log_w = self._log_weight(value)
        return ScoreParts(log_prob=torch.zeros_like(log_w), score_function=log_w, entropy_term=0)


class MixtureComponentDraw(TorchDistribution):
    r"""z | k for the ``"score"`` estimator: z = loc_k + L_k ε (reparameterised), scored by the *marginal* log q(z).

    Together with :class:`MixtureComponentIndex` (log-prob 0) the guide's log-density is exactly the
    mixture's marginal log q(z), so the ELBO is the true one (not the joint (k, z) bound).
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, mixture: GaussianMixture, component: torch.Tensor, validate_args=None):
        batch_shape = broadcast_shape(mixture.batch_shape, component.shape)
        self.mixture = mixture.expand(batch_shape)
        self.component = component.expand(batch_shape)
        super().__init__(batch_shape, mixture.event_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return MixtureComponentDraw(self.mixture.expand(batch_shape), self.component.expand(batch_shape),
                                    validate_args=False)

    def rsample(self, sample_shape=torch.Size()):
        if torch.Size(sample_shape):
            raise ValueError("MixtureComponentDraw draws one z per sampled component; use an empty sample_shape")
        S = self.event_shape[0]
        loc = _pick(self.mixture.loc, self.component, (S,))
        L = _pick(self.mixture.scale_tril, self.component, (S, S))
        eps = torch.randn(loc.shape, dtype=loc.dtype, device=loc.device)
        return loc + (L @ eps.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, value):
        return self.mixture.log_prob(value)


def _sample_mixture_site(name: str, fn: GaussianMixture, estimator: str):
    if estimator == "implicit":
        return pyro.sample(name, fn)
    k = pyro.sample(f"{name}_component", MixtureComponentIndex(fn.logits), infer={"is_auxiliary": True})
    return pyro.sample(name, MixtureComponentDraw(fn, k))


def _check_estimator(estimator: str) -> str:
    if estimator not in ("implicit", "score"):
        raise PyroCPAError(f"estimator must be 'implicit' or 'score', got {estimator!r}")
    return estimator


# ---------------------------------------------------------------------- per-datum mixture guide
class AutoMixture(AutoGuide):
    r"""Per-datum mixture of ``num_components`` full-covariance Gaussians on the latent site of a CPA model.

    Parameters are stored per datum, like :class:`~pyro.infer.autoguide.AutoNormal`'s (shapes
    ``(N, K)``, ``(N, K, S)``, ``(N, K, S, S)`` for logits, locs and Cholesky factors, N the full size of
    the data plate) and are indexed by the plate's subsample indices, so subsampled plates work. The
    latent site's distribution is a :class:`GaussianMixture`, whose log-density is the mixture's
    marginal; ``Trace_ELBO`` is then an unbiased estimate of the true ELBO and of its gradient (estimators and
    proofs in the module docstring).

    Args:
        model: a CPA model.
        num_components: K.
        estimator: ``"score"`` (default) or ``"implicit"``, see the module docstring.
        init_scale: initial standard deviation of every component (Cholesky factor init_scale·I).
        init_spread: the component means start at N(0, init_spread²) draws (symmetry breaking).
    """

    def __init__(self, model, num_components: int, *, init_scale: float = 0.1, init_spread: float = 1.0,
                 estimator: str = "score", create_plates=None):
        if int(num_components) < 1:
            raise PyroCPAError(f"num_components must be a positive integer, got {num_components}")
        if not init_scale > 0:
            raise PyroCPAError(f"init_scale must be positive, got {init_scale}")
        super().__init__(model, create_plates=create_plates)
        self.num_components = int(num_components)
        self.estimator = _check_estimator(estimator)
        self._init_scale, self._init_spread = float(init_scale), float(init_spread)

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        structure = read_structure(trace_model(self.model, *args, **kwargs))
        if structure.latent is None:
            raise PyroCPAError("AutoMixture needs a model with a latent site")
        self._latent = structure.latent
        site = self.prototype_trace.nodes[self._latent]
        self._latent_frames = [f for f in site["cond_indep_stack"] if f.vectorized]
        value = site["value"].detach()
        K, S = self.num_components, value.shape[-1]
        for frame in site["cond_indep_stack"]:
            full_size = frame.full_size or frame.size
            if full_size != frame.size:
                value = periodic_repeat(value, full_size, frame.dim - 1).contiguous()
        batch = value.shape[:-1]
        loc = self._init_spread * torch.randn(batch + (K, S), dtype=value.dtype, device=value.device)
        eye = torch.eye(S, dtype=value.dtype, device=value.device)
        deep_setattr(self, "logits", PyroParam(value.new_zeros(batch + (K,)), constraints.real, 1))
        deep_setattr(self, "locs", PyroParam(loc, constraints.real, 2))
        deep_setattr(self, "scale_trils", PyroParam((self._init_scale * eye).expand(batch + (K, S, S)).clone(),
                                                    constraints.lower_cholesky, 3))

    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        with ExitStack() as stack:
            for frame in self._latent_frames:
                stack.enter_context(plates[frame.name])
            fn = GaussianMixture(self.logits, self.locs, self.scale_trils)
            z = _sample_mixture_site(self._latent, fn, self.estimator)
        return {self._latent: z}

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict:
        """Coordinatewise quantiles of every datum's mixture (all N data): ``{latent: (Q, N, S)}``.

        Exact up to the bisection tolerance (see :func:`pyro_cpa.guides._quantiles.mixture_marginal_quantiles`).
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        fn = GaussianMixture(self.logits, self.locs, self.scale_trils)
        q = check_levels(quantiles, torch.float64, self.locs.device)
        out = mixture_marginal_quantiles(fn.mixture_log_weights.double(), fn.loc.double(), fn.scale_tril.double(), q)
        return {self._latent: out.to(self.locs.dtype)}

    def median(self, *args, **kwargs) -> dict:
        """The coordinatewise median of each datum's mixture, ``quantiles([0.5])`` (not a mode: a mixture can be
        multimodal, and the median of a bimodal marginal can fall between the modes)."""
        return {k: v[0] for k, v in self.quantiles([0.5], *args, **kwargs).items()}


# ---------------------------------------------------------------------- amortised mixture guide
class AmortizedMixture(_AmortizedGuide):
    r"""Amortised (VAE-style) mixture guide: an encoder maps x to K components (logits, means, Cholesky factors).

    The default encoder is an MLP D → hidden → K·(1 + S + S(S+1)/2) with ReLU activations. A custom
    ``encoder`` must map x (..., D) to either a tensor of that size (per component: 1 logit, S means,
    S(S+1)/2 raw lower-triangular entries whose diagonal goes through softplus) or a tuple
    ``(logits (..., K), loc (..., K, S), scale_tril (..., K, S, S))``. The latent site's density is the
    mixture's marginal (true ELBO; ``estimator`` as for :class:`AutoMixture`). Subsampled plates work:
    the observations of the current indices are read from a model trace.
    """

    def __init__(self, model, num_components: int, encoder=None, hidden=(64, 64), *, estimator: str = "score",
                 create_plates=None):
        if int(num_components) < 1:
            raise PyroCPAError(f"num_components must be a positive integer, got {num_components}")
        self.num_components = int(num_components)
        self.estimator = _check_estimator(estimator)
        super().__init__(model, encoder=encoder, hidden=hidden, create_plates=create_plates)

    def _output_size(self, S: int) -> int:
        return self.num_components * (1 + S + _tril_size(S))

    def _distribution(self, out):
        K, S = self.num_components, self.latent_dim
        if isinstance(out, (tuple, list)):
            logits, loc, scale_tril = out
        else:
            out = out.reshape(out.shape[:-1] + (K, 1 + S + _tril_size(S)))
            logits, loc, raw = out[..., 0], out[..., 1:1 + S], out[..., 1 + S:]
            scale_tril = _lower_triangular(raw, S, self.min_scale)
        return GaussianMixture(logits, loc, scale_tril)

    def _sample_latent(self, fn):
        return _sample_mixture_site(self._latent, fn, self.estimator)

    def _marginal_quantiles(self, fn, q):
        return mixture_marginal_quantiles(fn.mixture_log_weights.double(), fn.loc.double(), fn.scale_tril.double(), q)
