"""Marginal quantiles of the guides' distributions by bracketed bisection of a monotone CDF."""
from __future__ import annotations

import torch

from .._shapes import broadcast_shapes
from ..errors import PyroCPAError

#: Relative bisection tolerance: stop when hi − lo <= XTOL · max(1, |t|) (a few float64 ulps above 1e-16).
XTOL = 1e-13
#: At most this many doublings of the initial bracket before giving up.
MAX_BRACKET_DOUBLINGS = 64
#: Bisection steps: halving a bracket of width w ≤ 2^64 · w0 reaches XTOL well within this many steps.
MAX_BISECTION_STEPS = 256


def check_levels(quantiles, dtype, device) -> torch.Tensor:
    """The quantile levels as a 1-D tensor, each strictly inside (0, 1)."""
    q = torch.as_tensor(quantiles, dtype=dtype, device=device).reshape(-1)
    if q.numel() == 0 or not bool(((q > 0) & (q < 1)).all()):
        raise PyroCPAError(f"quantiles must be levels strictly between 0 and 1; got {q.tolist()}")
    return q


def bisect_quantiles(cdf, q: torch.Tensor, center: torch.Tensor, width: torch.Tensor, *,
                     xtol: float = XTOL) -> torch.Tensor:
    r"""Solve F(t) = q elementwise for a nondecreasing marginal CDF F by bisection.

    Args:
        cdf: maps t of shape (Q,) + batch to F(t) of the same shape (batch: any, e.g. data × S).
        q: (Q,) levels in (0, 1).
        center, width: batch-shaped initial bracket [center − width, center + width]; it is doubled
            (per element) until F(lo) <= q <= F(hi), then halved until hi − lo <= xtol · max(1, |t|).

    The result is within the bisection tolerance of a point where F crosses q; its accuracy is also
    limited by F's own error divided by the density there.
    """
    shape = q.shape + center.shape
    qb = q.reshape(q.shape + (1,) * center.dim()).expand(shape)
    width = width.expand(center.shape).clamp_min(torch.finfo(center.dtype).tiny).expand(shape)
    lo = (center - width).expand(shape).clone()
    hi = (center + width).expand(shape).clone()
    step = width.clone()
    for _ in range(MAX_BRACKET_DOUBLINGS):
        low_bad, high_bad = cdf(lo) > qb, cdf(hi) < qb
        if not bool((low_bad | high_bad).any()):
            break
        lo = torch.where(low_bad, lo - step, lo)
        hi = torch.where(high_bad, hi + step, hi)
        step = torch.where(low_bad | high_bad, 2 * step, step)
    else:
        raise PyroCPAError("quantiles: could not bracket the level (the CDF does not reach it); "
                           f"last bracket [{lo.min().item()}, {hi.max().item()}]")
    for _ in range(MAX_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if bool(((hi - lo) <= xtol * mid.abs().clamp_min(1.0)).all()):
            break
        below = cdf(mid) < qb
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def normal_quantiles(loc: torch.Tensor, scale: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """loc + scale · Φ⁻¹(q), shape (Q,) + loc.shape (closed form)."""
    z = torch.special.ndtri(q).reshape(q.shape + (1,) * loc.dim())
    return loc + scale * z


def mixture_marginal_quantiles(log_weights: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor,
                               q: torch.Tensor) -> torch.Tensor:
    r"""Coordinatewise quantiles of q(z) = Σ_k π_k N(loc_k, L_k L_kᵀ): shape (Q,) + batch + (S,).

    The marginal of coordinate d is Σ_k π_k N(loc_kd, s_kd²) with s_kd = ‖row d of L_k‖, so
    F_d(t) = Σ_k π_k Φ((t − loc_kd) / s_kd), solved for F_d(t) = q by :func:`bisect_quantiles`.
    """
    w = log_weights.exp()  # batch + (K,)
    s = scale_tril.norm(dim=-1)  # batch + (K, S)
    batch = broadcast_shapes(w.shape[:-1], loc.shape[:-2], s.shape[:-2])
    w = w.expand(batch + w.shape[-1:]).unsqueeze(-1)  # batch + (K, 1)
    loc, s = loc.expand(batch + loc.shape[-2:]), s.expand(batch + s.shape[-2:])

    def cdf(t):  # t: (Q,) + batch + (S,)
        return (w * torch.special.ndtr((t.unsqueeze(-2) - loc) / s)).sum(-2)

    mean = (w * loc).sum(-2)
    spread = ((w * (s.square() + (loc - mean.unsqueeze(-2)).square())).sum(-2)).sqrt()
    return bisect_quantiles(cdf, q, mean, 10 * spread)


__all__ = ["bisect_quantiles", "check_levels", "mixture_marginal_quantiles", "normal_quantiles"]
