"""Guides for CPA models: the exact posterior (and, later, Gaussian and mixture guides)."""
from .amortized import AmortizedNormal
from .exact import ExactPosterior
from .mixture import AmortizedMixture, AutoMixture, GaussianMixture

__all__ = ["ExactPosterior", "AmortizedNormal", "AutoMixture", "AmortizedMixture", "GaussianMixture"]
