"""pyro-cpa: exact inference for Pyro models whose decoder is continuous piecewise affine."""
from .errors import EmptyPolytopeError, NotCPAError, PyroCPAError, RegionBudgetExceeded
from .geometry import LinearRegions, linear_regions
from .nn import Abs, CPANetwork, as_cpa_network

__version__ = "0.1.0"

__all__ = [
    "Abs", "CPANetwork", "as_cpa_network", "LinearRegions", "linear_regions",
    "PyroCPAError", "NotCPAError", "RegionBudgetExceeded", "EmptyPolytopeError",
]
