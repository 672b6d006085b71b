"""Exact i.i.d. sampling of u ~ N(0, I_S) restricted to a polytope {u : G u <= d}.

S = 1: inverse CDF in log space (both tails, down to log P ≈ −1e4). S >= 2: Botev's accept–reject
with the minimax-tilting proposal (exact, not MCMC), see :mod:`pyro_cpa.integrate.tilting`.
"""
from __future__ import annotations

import math

import torch

from .univariate import interval_from_constraints, log_ndtr_diff

_LOG_HALF = math.log(0.5)


def log_ndtri(log_p: torch.Tensor, newton_steps: int = 4) -> torch.Tensor:
    """Inverse of ``log Φ`` for ``log_p <= log(1/2)``: the u with log Φ(u) = log_p (any depth of tail).

    Start from ``ndtri(exp(log_p))`` (or the asymptotic expansion below 1e-300) and polish with
    Newton steps on log Φ(u) − log_p, whose derivative is exp(log φ(u) − log Φ(u)).
    """
    deep = log_p < -690.0
    p = torch.where(deep, torch.full_like(log_p, 0.25), log_p.exp())
    t = -2.0 * log_p.clamp(max=-690.0)  # the asymptotic branch is used below −690 only (t > 1380: no NaN)
    asym = -torch.sqrt(t - torch.log(t) - math.log(2 * math.pi))
    u = torch.where(deep, asym, torch.special.ndtri(p))
    for _ in range(newton_steps):
        lf = torch.special.log_ndtr(u)
        log_pdf = -0.5 * u * u - 0.5 * math.log(2 * math.pi)
        u = u - (lf - log_p) * torch.exp(lf - log_pdf)
    return u


def sample_interval_std(lower: torch.Tensor, upper: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of N(0, 1) restricted to [lower, upper] from a uniform draw, in log space.

    The target quantile q = Φ(lower) + U (Φ(upper) − Φ(lower)) is formed both as log q and
    log(1 − q), and inverted from the smaller of the two tails, so draws stay accurate in both tails.
    """
    log_mass = log_ndtr_diff(lower, upper)
    log_q = torch.logaddexp(torch.log(uniform) + log_mass, torch.special.log_ndtr(lower))
    log_1mq = torch.logaddexp(torch.log1p(-uniform) + log_mass, torch.special.log_ndtr(-upper))
    left = log_q <= log_1mq
    u = torch.where(left, log_ndtri(torch.where(left, log_q, torch.full_like(log_q, _LOG_HALF))),
                    -log_ndtri(torch.where(left, torch.full_like(log_q, _LOG_HALF), log_1mq)))
    return torch.minimum(torch.maximum(u, lower), upper)


def sample_std_polytope(G: torch.Tensor, d: torch.Tensor, generator: torch.Generator | None = None,
                        **kwargs) -> torch.Tensor:
    """One exact draw of u ~ N(0, I) | G u <= d for every polytope of the batch; returns (..., S)."""
    S = G.shape[-1]
    if S == 1:
        lower, upper, _ = interval_from_constraints(G, d)
        U = torch.rand(lower.shape, dtype=d.dtype, device=d.device, generator=generator)
        U = U.clamp(min=torch.finfo(d.dtype).tiny)
        return sample_interval_std(lower, upper, U).unsqueeze(-1)
    from .tilting import sample_truncated_std
    return sample_truncated_std(G, d, (), generator=generator, **kwargs)
