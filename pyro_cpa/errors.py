"""Exceptions raised by pyro-cpa. Each names the problem and the fix."""


class PyroCPAError(ValueError):
    """Base class of every error raised by pyro-cpa for bad input."""


class NotCPAError(PyroCPAError, TypeError):
    """The decoder contains a layer pyro-cpa cannot read as continuous piecewise affine.

    The message says which case applies: the layer is CPA but not supported yet (e.g. ReLU6, Conv1d),
    it is not piecewise affine (e.g. Tanh), not continuous (e.g. Hardshrink), or unknown to pyro-cpa.
    """


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


class NotTraceableError(PyroCPAError, RuntimeError):
    """An exact computation was called while ``torch.jit.trace`` records a graph (e.g. under ``JitTrace_ELBO``).

    The exact computations make Python decisions from tensor values — the linear regions are enumerated
    (their number and activation patterns depend on the weights), the polytope integrals select their
    active (datum, region) pairs and branch on ``.any()`` / ``nonzero()`` — and a traced graph freezes
    every such decision at the values seen while tracing. Replaying it after the parameters move mixes
    stale patterns with new weights (measured: NaN gradients on the first replayed step, which an
    optimiser writes into the parameters even at lr = 0). So these computations refuse to be traced.
    """


_EXACT_REASON = ("the exact computation makes data-dependent Python decisions (the decoder's linear regions, the "
                 "active (datum, region) pairs) that a traced graph would freeze at the first step's values and "
                 "replay wrongly afterwards")


def check_not_tracing(what: str, because: str = _EXACT_REASON) -> None:
    """Raise :class:`NotTraceableError` if called while ``torch.jit`` is tracing (see its docstring)."""
    import torch

    if torch.jit.is_tracing():
        raise NotTraceableError(f"{what} is not traceable by torch.jit (JitTrace_ELBO, JitTraceGraph_ELBO, "
                                f"pyro.ops.jit): {because}. Use the non-JIT ELBO (Trace_ELBO, "
                                "TraceMeanField_ELBO) instead.")
