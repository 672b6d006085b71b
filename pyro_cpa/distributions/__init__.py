"""Pyro distributions of CPA models: the exact marginal and the exact (truncated-mixture) posterior."""
from .cpa_marginal import CPAMarginal
from .likelihood import CPALikelihood
from .region_gaussians import RegionGaussians, region_gaussians
from .truncated_mixture import TruncatedGaussianMixture

__all__ = ["CPAMarginal", "CPALikelihood", "TruncatedGaussianMixture", "RegionGaussians", "region_gaussians"]
