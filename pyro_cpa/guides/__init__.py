"""Guides for CPA models: the exact posterior (and, later, Gaussian and mixture guides)."""
from .exact import ExactPosterior

__all__ = ["ExactPosterior"]
