r"""MLE-B initialisation of a β-VAE (Appendix B.3 of Sicks et al.), in one call.

From the closed-form maximiser of L̂ (:func:`~pyro_cpa.glm.analysis.mle`, R = I):

* decoder output layer ("x̂"): weight Ŵ/ρ, bias b̂/ρ (ρ of the linearly canonical activation). If the
  layer has more inputs than κ (a decoder with hidden layers), the first κ columns get Ŵ/ρ and the
  rest zero (the paper's rule for over-parametrised nets; exact only for an affine decoder);
* encoder mean layer ("μz"): weight W_e = Σ̂z Ŵᵀ/(βφ) = K⁻¹ L Uᵀ / F″(0), bias −W_e x̄ (eq. 20; the
  paper prints +W_e x̄, a sign slip: μ̂z = W_e (x − x̄)). For an encoder with a hidden body the same
  rule is applied to the first d columns (heuristic, as in the paper);
* encoder log-variance layer ("log σz²"): bias log diag Σ̂z (eq. 19); its weight is set to zero by
  default (Σ̂z does not depend on x) — ``logvar_weight="keep"`` keeps the existing (He) weights as in
  the paper;
* Gaussian family with a learned dispersion: φ := σ̂² (eq. 18).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import PyroCPAError
from .analysis import GLMMLE, mle
from .decoder import GLMDecoder
from .families import Gaussian

__all__ = ["mle_b_init", "he_init"]


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def he_init(*modules: nn.Module) -> None:
    """The benchmark ("Bench"): He (Kaiming-normal, ReLU gain) weights and zero biases for every Linear."""
    for module in modules:
        for lin in _linears(module):
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)


@torch.no_grad()
def mle_b_init(encoder: nn.Module, decoder: GLMDecoder, x: torch.Tensor, beta: float = 1.0, *,
               dispersion=None, logvar_weight: str = "zero") -> GLMMLE:
    """Initialise an encoder/decoder pair from the closed-form MLE of L̂ (see module docstring).

    Args:
        encoder: a module with ``loc`` and ``logvar`` ``nn.Linear`` heads and a ``body`` (e.g.
            :class:`~pyro_cpa.glm.vae.GaussianEncoder`).
        decoder: a :class:`~pyro_cpa.glm.decoder.GLMDecoder` whose last layer is an ``nn.Linear``.
        x: (N, d) training data.  beta: β.
        dispersion: φ for the closed form; default: ``"mle"`` for a Gaussian decoder with learned
            dispersion, else the decoder's φ.
        logvar_weight: ``"zero"`` or ``"keep"``.

    Returns:
        the :class:`~pyro_cpa.glm.analysis.GLMMLE` used.
    """
    if not isinstance(decoder, GLMDecoder):
        raise PyroCPAError(f"decoder must be a GLMDecoder; got {type(decoder).__name__}")
    for attr in ("loc", "logvar"):
        if not isinstance(getattr(encoder, attr, None), nn.Linear):
            raise PyroCPAError(f"encoder needs an nn.Linear attribute '{attr}' (e.g. pyro_cpa.glm.GaussianEncoder)")
    if logvar_weight not in ("zero", "keep"):
        raise PyroCPAError(f"logvar_weight must be 'zero' or 'keep'; got {logvar_weight!r}")
    x = torch.as_tensor(x)
    d, kappa = decoder.data_dim, decoder.latent_dim
    if x.dim() != 2 or x.shape[1] != d:
        raise PyroCPAError(f"x must be (N, d={d}); got {tuple(x.shape)}")
    fam = decoder.family
    if dispersion is None:
        dispersion = "mle" if (decoder.learn_dispersion and isinstance(fam, Gaussian)) else fam.dispersion.detach()
    res = mle(x, fam, kappa, beta, dispersion)
    if isinstance(fam, Gaussian):
        decoder.set_dispersion(res.dispersion)

    last = _linears(decoder.net)[-1]
    if last.out_features != d or last.in_features < kappa:
        raise PyroCPAError(f"the decoder's last Linear is {last.in_features} → {last.out_features}; need ≥ κ={kappa} "
                           f"inputs and d={d} outputs")
    W = torch.zeros_like(last.weight)
    W[:, :kappa] = (res.W / decoder.rho).to(W)
    last.weight.copy_(W)
    if last.bias is None:
        raise PyroCPAError("the decoder's last Linear needs a bias")
    last.bias.copy_((res.b / decoder.rho).to(last.bias))

    loc, logvar = encoder.loc, encoder.logvar
    if loc.out_features != kappa or logvar.out_features != kappa:
        raise PyroCPAError(f"encoder heads must have κ={kappa} outputs")
    if loc.in_features < d:
        raise PyroCPAError(f"the encoder's loc layer has {loc.in_features} inputs < d={d}; MLE-B needs at least d")
    We = torch.zeros_like(loc.weight)
    We[:, :d] = res.encoder_weight.to(We)
    loc.weight.copy_(We)
    loc.bias.copy_(res.encoder_bias.to(loc.bias))
    logvar.bias.copy_(torch.log(torch.diagonal(res.Sigma_z)).to(logvar.bias))
    if logvar_weight == "zero":
        logvar.weight.zero_()
    return res
