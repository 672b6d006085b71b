"""Geometry of the partition of latent space into linear regions of a CPA decoder."""
from .cost import BYTES_PER_PAIR, BYTES_PER_PAIR_AUTOGRAD, CostEstimate, estimate_cost, estimate_regions
from .local import LOCAL_TOL, LocalLogProb, LocalPartition, local_log_prob, local_partition
from .maps import RegionMaps, region_hyperplanes, region_maps
from .regions import LinearRegions, RegionEnumeration, cached_linear_regions, linear_regions

__all__ = ["BYTES_PER_PAIR", "BYTES_PER_PAIR_AUTOGRAD", "CostEstimate", "estimate_cost", "estimate_regions",
           "LOCAL_TOL", "LocalLogProb", "LocalPartition", "local_log_prob", "local_partition",
           "LinearRegions", "RegionEnumeration", "RegionMaps", "linear_regions", "cached_linear_regions", "region_maps", "region_hyperplanes"]
