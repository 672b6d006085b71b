r"""A CPA network read as a GLM decoder: z ↦ natural parameter ϑ(z) ↦ x | z ~ EDF(ϑ(z), φ).

The network η = g(z) is continuous piecewise affine (``nn.Linear`` + ReLU / LeakyReLU / Abs, see
:mod:`pyro_cpa.nn`); the decoder's output activation is the (linearly) canonical m(η) = F′(ρ η), so
the natural parameter is ϑ(z) = ρ g(z) — again CPA. The mean of x | z is m(g(z)).

β-VAE objective. :meth:`GLMDecoder.model` puts ``poutine.scale(scale=β)`` around the latent site; a
guide's latent site must carry the same scale (wrap any guide with :func:`beta_scaled_guide`, or use
:class:`~pyro_cpa.glm.vae.BetaVAE`), so that Trace_ELBO / TraceMeanField_ELBO compute

    E_q[log p(x|z)] − β KL(q(z|x) ‖ N(0, I))    (eq. 1).

Alternatively ``beta_mode="likelihood"`` scales the *observation* site by 1/β, which needs no change
to the guide and optimises the same objective divided by β (same maximisers).

For the Gaussian family the observation distribution is
:class:`~pyro_cpa.distributions.CPALikelihood`, so the model is a CPA model in the sense of
:mod:`pyro_cpa.infer.structure`: exact likelihood (CPAMarginal), exact posterior and AmortizedNormal
apply unchanged.
"""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import nn

from ..distributions import CPALikelihood, CPAMarginal
from ..errors import PyroCPAError
from ..nn.network import as_cpa_network
from .families import EDFamily, Gaussian, get_family

__all__ = ["GLMDecoder", "beta_scaled_guide"]


class GLMDecoder(nn.Module):
    r"""GLM decoder x | z ~ EDF(ϑ(z) = ρ g(z), φ) with a CPA network g (see module docstring).

    Args:
        net: a CPA ``nn.Module`` (``nn.Sequential`` of supported layers) with S inputs and d outputs.
        family: an :class:`~pyro_cpa.glm.families.EDFamily` or its name.
        activation: the output activation m(η) = F′(ρη): a name from ``family.linearly_canonical``
            (``"canonical"``, Bernoulli ``"sigmoid"``/``"tanh"``, …) or the number ρ.
        learn_dispersion: Gaussian family only — learn φ = σ² (stored as ``log_dispersion``, a
            parameter of this module, initialised at the family's φ).

    Raises:
        NotCPAError: ``net`` is not CPA.  PyroCPAError: bad family/activation, ρ ≠ 1 for the Gaussian
        family (fold the factor into the last layer), learned dispersion for a non-Gaussian family.
    """

    def __init__(self, net: nn.Module, family="bernoulli", activation="canonical", learn_dispersion: bool = False):
        super().__init__()
        self.network = as_cpa_network(net)
        self.net = self.network.module
        fam = get_family(family)
        self._family = fam
        self.rho = fam.rho(activation)
        if isinstance(fam, Gaussian) and self.rho != 1.0:
            raise PyroCPAError("the Gaussian family needs ρ = 1 (identity activation); fold the factor into the "
                               "network's last layer")
        self.learn_dispersion = bool(learn_dispersion)
        if self.learn_dispersion:
            if not isinstance(fam, Gaussian):
                raise PyroCPAError(f"learn_dispersion is only supported for the Gaussian family; the {fam.name} "
                                   "family has a fixed dispersion")
            ref = next(iter(self.net.parameters()))
            self.log_dispersion = nn.Parameter(torch.log(fam.dispersion.detach()).to(ref))

    # ------------------------------------------------------------------ basic quantities
    @property
    def latent_dim(self) -> int:
        return self.network.in_features

    @property
    def data_dim(self) -> int:
        return self.network.out_features

    @property
    def family(self) -> EDFamily:
        """The family with the current (possibly learned) dispersion."""
        if self.learn_dispersion:
            return self._family.with_dispersion(torch.exp(self.log_dispersion))
        return self._family

    @property
    def dispersion(self) -> torch.Tensor:
        return self.family.dispersion

    def set_dispersion(self, value) -> None:
        """Set φ (the learned parameter if ``learn_dispersion``, else the fixed family's)."""
        fam = self._family.with_dispersion(value)
        if self.learn_dispersion:
            with torch.no_grad():
                self.log_dispersion.copy_(torch.log(fam.dispersion))
        else:
            self._family = fam

    def natural_parameter(self, z: torch.Tensor) -> torch.Tensor:
        """ϑ(z) = ρ g(z), shape batch + (d,)."""
        if z.shape[-1] != self.latent_dim:
            raise PyroCPAError(f"z must have shape (..., S={self.latent_dim}); got {tuple(z.shape)}")
        eta = self.net(z)
        return eta if self.rho == 1.0 else self.rho * eta

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder mean m(g(z)) = F′(ϑ(z))."""
        return self.family.mean(self.natural_parameter(z))

    def likelihood(self, z: torch.Tensor):
        """The distribution of x | z (event dimension d): CPALikelihood for Gaussian, else an EDF."""
        fam = self.family
        if isinstance(fam, Gaussian):
            return CPALikelihood(self.net, z, fam.dispersion.to(z).sqrt())
        return fam.distribution(self.natural_parameter(z)).to_event(1)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x | z) summed over the d coordinates."""
        return self.family.log_prob(x, self.natural_parameter(z)).sum(-1)

    # ------------------------------------------------------------------ Pyro model
    def model(self, x: torch.Tensor, beta: float = 1.0, batch_size: int | None = None,
              beta_mode: str = "latent", name: str = "glm_decoder"):
        r"""Pyro model: z ~ N(0, I_S), x | z ~ EDF(ϑ(z)) in a ``data`` plate (subsampled if ``batch_size``).

        ``beta_mode="latent"`` scales the latent site ``z`` by β (the guide must scale its ``z`` too,
        see :func:`beta_scaled_guide`); ``"likelihood"`` scales the observation site by 1/β instead.
        """
        beta = float(beta)
        if not math.isfinite(beta) or beta <= 0:
            raise PyroCPAError(f"beta must be finite and > 0; got {beta}")
        if beta_mode not in ("latent", "likelihood"):
            raise PyroCPAError(f"beta_mode must be 'latent' or 'likelihood'; got {beta_mode!r}")
        pyro.module(name, self)
        S = self.latent_dim
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            with poutine.scale(scale=beta if beta_mode == "latent" else 1.0):
                z = pyro.sample("z", dist.Normal(zero, 1.0 + zero).expand([S]).to_event(1))
            with poutine.scale(scale=1.0 / beta if beta_mode == "likelihood" else 1.0):
                pyro.sample("x", self.likelihood(z), obs=x[idx])
        return z

    # ------------------------------------------------------------------ exact likelihood
    def exact_log_prob(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Exact log p(x) = log ∫ p(x|z) N(z; 0, I) dz per datum: CPAMarginal for the Gaussian family
        (any S), region-wise quadrature (:func:`~pyro_cpa.glm.quadrature.quadrature_log_prob`) otherwise (S <= 2)."""
        fam = self.family
        if isinstance(fam, Gaussian):
            return CPAMarginal(self.net, fam.dispersion.sqrt(), **kwargs).log_prob(x)
        from .quadrature import quadrature_log_prob
        return quadrature_log_prob(self, x, **kwargs).log_prob


def beta_scaled_guide(guide, beta: float):
    """Wrap any guide so that all its sample sites carry the scale β (pairs with ``GLMDecoder.model``)."""
    beta = float(beta)
    if not math.isfinite(beta) or beta <= 0:
        raise PyroCPAError(f"beta must be finite and > 0; got {beta}")
    return poutine.scale(guide, scale=beta)
