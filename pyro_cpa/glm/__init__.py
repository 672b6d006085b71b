r"""GLM view of β-VAEs with exponential-dispersion-family observations (Sicks, Korn & Schwaar).

* :mod:`~pyro_cpa.glm.families` — EDF families (Gaussian, Bernoulli, Binomial(n), Poisson, Gamma):
  F, F′, F″, K, φ, canonical / linearly canonical activations, Pyro distributions.
* :mod:`~pyro_cpa.glm.decoder` — :class:`GLMDecoder`: a CPA network producing the natural parameter,
  usable as the observation model of a Pyro β-VAE.
* :mod:`~pyro_cpa.glm.analysis` — closed forms: L̂ (eqs. 12/14), MLE b̂, Ŵ, σ̂² (15–18), optimal q (19–20),
  analytic activities (21).
* :mod:`~pyro_cpa.glm.init` — MLE-B initialisation (Appendix B.3) of an encoder/decoder pair.
* :mod:`~pyro_cpa.glm.quadrature` — exact log p(x) for non-Gaussian families, S <= 2.
* :mod:`~pyro_cpa.glm.vae` — Gaussian encoder, :class:`BetaVAE` (model/guide), training loops: SVI, a plain
  torch loop, and ``engine="analytic"`` (the exact β-ELBO of a Gaussian affine VAE, Adam + L-BFGS).
"""
from .analysis import (ACTIVITY_THRESHOLD, GLMMLE, analytic_activity, approximate_objective,
                       approximate_objective_cpa, measured_activity, mle, optimal_variational,
                       predicted_active_units, pseudo_observations, pseudo_variance)
from .decoder import GLMDecoder, beta_scaled_guide
from .families import Bernoulli, Binomial, EDFamily, EDFDistribution, Gamma, Gaussian, Poisson, get_family
from .init import he_init, mle_b_init
from .quadrature import QuadratureResult, quadrature_log_prob
from .vae import BetaVAE, GaussianEncoder, train_svi

__all__ = [
    "EDFamily", "Gaussian", "Bernoulli", "Binomial", "Poisson", "Gamma", "EDFDistribution", "get_family",
    "GLMDecoder", "beta_scaled_guide", "approximate_objective", "approximate_objective_cpa",
    "optimal_variational", "mle", "GLMMLE", "analytic_activity", "predicted_active_units", "measured_activity",
    "pseudo_observations", "pseudo_variance", "ACTIVITY_THRESHOLD", "mle_b_init", "he_init",
    "quadrature_log_prob", "QuadratureResult", "GaussianEncoder", "BetaVAE", "train_svi",
]
