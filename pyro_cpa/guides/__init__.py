"""Guides for CPA models: the exact posterior, amortised Gaussian and (amortised) mixture guides."""
from .amortized import AmortizedNormal
from .exact import ExactPosterior, ExactPosteriorSite
from .mixture import AmortizedMixture, AutoMixture, GaussianMixture

__all__ = ["ExactPosterior", "ExactPosteriorSite", "AmortizedNormal", "AutoMixture", "AmortizedMixture",
           "GaussianMixture"]
