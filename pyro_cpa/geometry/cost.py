"""What exact inference with a decoder will cost, before doing it.

:func:`estimate_cost` counts (or estimates) the decoder's linear regions and turns the count into
the number of (datum, region) pairs and the memory of ``CPAMarginal.log_prob``.

The a-priori estimate of the region count restricts the network to random lines
``z = z0 + t u`` (z0 ~ N(0, I), u uniform on the sphere), where exact 1-D enumeration is cheap,
takes the mean number ``n`` of breakpoints per line as the effective number of hyperplanes, and
returns the count of an arrangement of ``n`` hyperplanes in general position in R^S,
``sum_{k <= S} C(n, k)`` (Zaslavsky). This is exact for one hidden layer in general position and
an estimate otherwise (within 1% of the true count on random ReLU / LeakyReLU networks
[2,32,32,32], [2,64,64,2], [3,16,16], [4,8,6]); it is not a bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import RegionBudgetExceeded
from ..nn.network import as_cpa_network

#: Bytes held per (datum, region) pair by ``CPAMarginal.log_prob`` without autograd (measured).
BYTES_PER_PAIR = 70
#: Bytes held per (datum, region) pair by ``log_prob`` under autograd (the ``collapse`` path; measured).
BYTES_PER_PAIR_AUTOGRAD = 15_000
#: Regions up to which :func:`estimate_cost` enumerates exactly instead of estimating, per method.
EXACT_BUDGET = {1: 10 ** 7, 2: 20_000}
EXACT_BUDGET_LP = 500


@dataclass(frozen=True)
class CostEstimate:
    """Predicted cost of exact inference (see :func:`estimate_cost`).

    Attributes:
        regions: number of linear regions (exact when ``exact`` is True, else an estimate).
        exact: whether ``regions`` was counted by a complete enumeration.
        num_data: number of data points N.
        pairs: (datum, region) pairs ``N * regions`` that ``log_prob`` considers.
        log_prob_bytes: memory of ``log_prob`` without autograd (``BYTES_PER_PAIR`` per pair).
        autograd_bytes: memory of ``log_prob`` under autograd (``BYTES_PER_PAIR_AUTOGRAD`` per pair).
        lines_breakpoints: mean number of breakpoints on a random line (the estimate's input).
    """

    regions: int
    exact: bool
    num_data: int
    pairs: int
    log_prob_bytes: int
    autograd_bytes: int
    lines_breakpoints: float

    def __str__(self) -> str:
        kind = "exactly" if self.exact else "about (estimate)"
        return (f"{kind} {self.regions:,} linear regions; N={self.num_data:,} data -> {self.pairs:,} "
                f"(datum, region) pairs: log_prob ~{_human(self.log_prob_bytes)}, under autograd "
                f"~{_human(self.autograd_bytes)}")


def _human(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1000 or unit == "TB":
            return f"{b:.3g} {unit}"
        b /= 1000.0
    raise AssertionError("unreachable")


class _Line:
    """The restriction of a network to the line ``z0 + t u`` (duck-types what the 1-D enumerator reads:
    the first affine step becomes ``t -> (W_0 u) t + T_0(z0)``, taken as exact weights)."""

    def __init__(self, net, z0: torch.Tensor, u: torch.Tensor):
        self._net = net
        self._w = net.affine_step(0, u[None], bias=False)            # (1, n_0)
        self._c = net.affine_step(0, z0[None])                       # (1, n_0)
        self.activations = net.activations
        self.in_features = 1

    def affine_step(self, l: int, x: torch.Tensor, bias: bool = True, absolute: bool = False) -> torch.Tensor:
        if l > 0:
            return self._net.affine_step(l, x, bias=bias, absolute=absolute)
        w, c = (self._w.abs(), self._c.abs()) if absolute else (self._w, self._c)
        return x @ w + c if bias else x @ w


def line_breakpoints(decoder, num_lines: int = 32, seed: int = 0) -> torch.Tensor:
    """Number of breakpoints of the decoder on ``num_lines`` random lines ``z0 + t u`` (exact 1-D
    enumeration of each restriction; z0 ~ N(0, I), u uniform on the unit sphere)."""
    from .enumerate_1d import enumerate_breakpoints

    net = as_cpa_network(decoder)
    S = net.in_features
    gen = torch.Generator().manual_seed(seed)
    counts = []
    with torch.no_grad():
        for _ in range(num_lines):
            z0 = torch.randn(S, generator=gen, dtype=torch.float64)
            u = torch.randn(S, generator=gen, dtype=torch.float64)
            u = u / u.norm()
            enum = enumerate_breakpoints(_Line(net, z0, u), max_regions=2 ** 62)
            counts.append(enum.interior_points.shape[0] - 1)
    return torch.tensor(counts, dtype=torch.float64)


def arrangement_count(n: float, S: int) -> float:
    """Regions of ``n`` hyperplanes in general position in R^S: ``sum_{k<=S} C(n, k)`` (real n)."""
    return float(sum(math.prod(n - i for i in range(k)) / math.factorial(k) for k in range(S + 1)))


def estimate_regions(decoder, num_lines: int = 32, seed: int = 0) -> tuple[float, float]:
    """A-priori estimate of the number of linear regions (see the module docstring).

    Returns:
        (estimated regions, mean breakpoints per random line).
    """
    S = as_cpa_network(decoder).in_features
    n = float(line_breakpoints(decoder, num_lines, seed).mean())
    return max(1.0, arrangement_count(n, S)), n


def estimate_cost(decoder, num_data: int, exact_budget: int | None = None, num_lines: int = 32,
                  seed: int = 0) -> CostEstimate:
    """Regions, (datum, region) pairs and memory of exact inference with ``decoder`` on ``num_data`` points.

    The region count is exact when an enumeration within ``exact_budget`` regions finishes (default:
    10^7 for S=1, whose enumeration is cheap; 20,000 for S=2, about a second; 500 for S >= 3);
    otherwise it is the line-count estimate of :func:`estimate_regions` (never below the regions the
    truncated enumeration had already found). Memory: ``BYTES_PER_PAIR`` (70 B) per pair for
    ``log_prob`` without autograd, ``BYTES_PER_PAIR_AUTOGRAD`` (15 KB) under autograd.

    Example::

        >>> print(estimate_cost(decoder, num_data=1000))     # doctest: +SKIP
        about (estimate) 128,771 linear regions; N=1,000 data -> 128,771,000 (datum, region) pairs: ...
    """
    from .regions import linear_regions

    if int(num_data) != num_data or num_data < 0:
        raise ValueError(f"num_data must be a non-negative integer, got {num_data}")
    net = as_cpa_network(decoder)
    S = net.in_features
    budget = exact_budget if exact_budget is not None else EXACT_BUDGET.get(S, EXACT_BUDGET_LP)
    n_line = float("nan")
    try:
        regions = len(linear_regions(net, max_regions=max(1, int(budget)), progress=False))
        exact = True
    except RegionBudgetExceeded as err:
        est, n_line = estimate_regions(net, num_lines, seed)
        regions, exact = max(int(round(est)), err.regions_found), False
    pairs = int(num_data) * regions
    return CostEstimate(regions=regions, exact=exact, num_data=int(num_data), pairs=pairs,
                        log_prob_bytes=pairs * BYTES_PER_PAIR, autograd_bytes=pairs * BYTES_PER_PAIR_AUTOGRAD,
                        lines_breakpoints=n_line)
