r"""Amortised (VAE-style) Gaussian guide for CPA models: an encoder maps x to q(z | x) = N(μ(x), Σ(x)).

Pyro's own :class:`~pyro.infer.autoguide.AutoNormal`, :class:`~pyro.infer.autoguide.AutoMultivariateNormal`
and :class:`~pyro.infer.autoguide.AutoDelta` work unchanged on CPA models; :class:`AmortizedNormal` adds
the encoder guide of a VAE. Its exact ELBO and KL to the true posterior are given by
:func:`pyro_cpa.infer.exact_elbo` / :func:`pyro_cpa.infer.posterior_kl`.
"""
from __future__ import annotations

from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import SoftplusLowerCholeskyTransform
from pyro.infer.autoguide import AutoGuide
from torch import nn
from torch.distributions.utils import vec_to_tril_matrix
from torch.nn.functional import softplus

from ..errors import PyroCPAError
from ..infer.structure import read_structure, trace_model
from ._quantiles import check_levels, normal_quantiles

__all__ = ["AmortizedNormal", "mlp_encoder"]


def _tril_size(S: int) -> int:
    return S * (S + 1) // 2


_SOFTPLUS_TRIL = SoftplusLowerCholeskyTransform()


def _lower_triangular(raw: torch.Tensor, S: int, min_scale: float) -> torch.Tensor:
    """(..., S(S+1)/2) raw entries (row-major lower triangle) → (..., S, S) Cholesky factor.

    Pyro's ``SoftplusLowerCholeskyTransform`` of torch's ``vec_to_tril_matrix`` (softplus on the
    diagonal), plus ``min_scale`` on the diagonal.
    """
    if raw.shape[-1] != _tril_size(S):
        raise PyroCPAError(f"expected {_tril_size(S)} lower-triangular entries for S={S}; got {raw.shape[-1]}")
    L = _SOFTPLUS_TRIL(vec_to_tril_matrix(raw))
    return L + min_scale * torch.eye(S, dtype=raw.dtype, device=raw.device)


def mlp_encoder(in_features: int, hidden, out_features: int, dtype=None) -> nn.Module:
    """The default encoder: Linear → ReLU → … → Linear."""
    layers, width = [], in_features
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, out_features))
    net = nn.Sequential(*layers)
    return net.to(dtype) if dtype is not None else net


class _AmortizedGuide(AutoGuide):
    """Shared plumbing of the amortised guides: read S, D, site names; read x for the current subsample."""

    min_scale = 1e-6

    def __init__(self, model, encoder=None, hidden=(64, 64), *, create_plates=None):
        super().__init__(model, create_plates=create_plates)
        self.hidden = tuple(int(h) for h in hidden)
        if encoder is not None:
            if not isinstance(encoder, nn.Module):
                raise PyroCPAError(f"encoder must be an nn.Module (its parameters are registered with "
                                   f"pyro.module); got {type(encoder).__name__}")
            self.encoder = encoder

    def _output_size(self, S: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _distribution(self, out):  # pragma: no cover - abstract
        raise NotImplementedError

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        structure = read_structure(trace_model(self.model, *args, **kwargs))
        if structure.latent is None:
            raise PyroCPAError(f"{type(self).__name__} needs a model with a latent site")
        self._latent, self._observed = structure.latent, structure.observed
        self.latent_dim = int(structure.prior_scale.shape[-1])
        self.data_dim = int(structure.x.shape[-1])
        site = self.prototype_trace.nodes[self._latent]
        self._latent_frames = [f for f in site["cond_indep_stack"] if f.vectorized]
        if getattr(self, "encoder", None) is None:
            self.encoder = mlp_encoder(self.data_dim, self.hidden, self._output_size(self.latent_dim),
                                       dtype=structure.x.dtype)

    def _current_plates_and_x(self, *args, **kwargs):
        plates = self._create_plates(*args, **kwargs)
        subsample = {f.name: plates[f.name].indices for f in self._latent_frames
                     if plates[f.name].subsample_size < plates[f.name].size}
        tr = trace_model(self.model, *args, subsample=subsample or None, **kwargs)
        return plates, tr.nodes[self._observed]["value"]

    def encode(self, x: torch.Tensor):
        """The guide's distribution q(z | x) for observations x (..., D), batch shape x.shape[:-1]."""
        return self._distribution(self.encoder(x))

    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates, x = self._current_plates_and_x(*args, **kwargs)
        pyro.module(f"{self._pyro_name}.encoder", self.encoder)
        fn = self.encode(x.detach())
        with ExitStack() as stack:
            for frame in self._latent_frames:
                stack.enter_context(plates[frame.name])
            z = self._sample_latent(fn)
        return {self._latent: z}

    def _sample_latent(self, fn):
        return pyro.sample(self._latent, fn)

    def _marginal_quantiles(self, fn, q: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict:
        """Coordinatewise quantiles of q(z | x) for the data of the current plate: ``{latent: (Q, N, S)}``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        _, x = self._current_plates_and_x(*args, **kwargs)
        fn = self.encode(x)
        q = check_levels(quantiles, torch.float64, x.device)
        return {self._latent: self._marginal_quantiles(fn, q).to(x.dtype)}

    def median(self, *args, **kwargs) -> dict:
        """The coordinatewise median of q(z | x) for the data of the current plate (``quantiles([0.5])``)."""
        return {k: v[0] for k, v in self.quantiles([0.5], *args, **kwargs).items()}


class AmortizedNormal(_AmortizedGuide):
    r"""VAE-style encoder guide: q(z | x) = N(μ(x), diag σ(x)²), or N(μ(x), L(x) L(x)ᵀ) if ``full_covariance``.

    Args:
        model: a CPA model (S, D and the observed site are read from its trace).
        encoder: an ``nn.Module`` mapping x (..., D) to either a tensor (..., 2S) — means, then raw scales
            (softplus) — or (..., S + S(S+1)/2) with ``full_covariance`` — means, then the raw
            lower-triangular entries (row-major, as torch's ``vec_to_tril_matrix``; Pyro's
            ``SoftplusLowerCholeskyTransform`` puts the diagonal through softplus); or to a tuple ``(loc, scale)``
            / ``(loc, scale_tril)``. Default: an MLP with ``hidden`` ReLU layers.
        hidden: widths of the default MLP.
        full_covariance: a full covariance through a Cholesky factor instead of a diagonal one.

    The encoder is registered with ``pyro.module`` at every call, so ``SVI`` trains it. With a subsampled
    data plate the guide reads the observations of the current indices from a model trace.
    """

    def __init__(self, model, encoder=None, hidden=(64, 64), full_covariance: bool = False, *, create_plates=None):
        self.full_covariance = bool(full_covariance)
        super().__init__(model, encoder=encoder, hidden=hidden, create_plates=create_plates)

    def _output_size(self, S: int) -> int:
        return S + (_tril_size(S) if self.full_covariance else S)

    def _distribution(self, out):
        S = self.latent_dim
        if isinstance(out, (tuple, list)):
            loc, scale = out
        else:
            loc, raw = out[..., :S], out[..., S:]
            scale = _lower_triangular(raw, S, self.min_scale) if self.full_covariance \
                else softplus(raw) + self.min_scale
        if self.full_covariance:
            return dist.MultivariateNormal(loc, scale_tril=scale)
        return dist.Normal(loc, scale).to_event(1)

    def _marginal_quantiles(self, fn, q):
        """loc_d + s_d Φ⁻¹(q), s_d the marginal standard deviation (closed form; the median is the mean)."""
        if isinstance(fn, dist.MultivariateNormal):
            loc, scale = fn.loc, fn.scale_tril.norm(dim=-1)
        else:
            loc, scale = fn.base_dist.loc, fn.base_dist.scale
        return normal_quantiles(loc.double(), scale.double(), q)
