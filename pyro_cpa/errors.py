"""Exceptions raised by pyro-cpa. Each names the problem and the fix."""


class PyroCPAError(ValueError):
    """Base class of every error raised by pyro-cpa for bad input."""


class NotCPAError(PyroCPAError, TypeError):
    """The decoder contains a layer that is not continuous piecewise affine."""


class RegionBudgetExceeded(PyroCPAError, RuntimeError):
    """Enumerating the linear regions found more regions than ``max_regions`` allows.

    Attributes ``regions_found`` and ``layers_done`` report how far enumeration got.
    """

    def __init__(self, message: str, regions_found: int, layers_done: int):
        super().__init__(message)
        self.regions_found = regions_found
        self.layers_done = layers_done


class EmptyPolytopeError(PyroCPAError):
    """A polytope {z : H z <= c} passed to an integral has no interior."""
