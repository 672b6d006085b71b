r"""Standard-normal mass and moments on an interval (S = 1), in closed form and in log space.

The whitened problem is u ~ N(0, 1) on {u : g_j u <= d_j}. Rows with g_j > 0 give upper bounds
u <= d_j / g_j, rows with g_j < 0 lower bounds u >= d_j / g_j; the polytope is the interval (α, β)
with β = min of the upper bounds, α = max of the lower bounds (±inf when there are none). Padding
rows (g_j = 0, d_j = +inf) are ignored; a zero row with d_j < 0 makes the interval empty.

    P = Φ(β) − Φ(α),   E[u 1_ω] = φ(α) − φ(β),   E[u² 1_ω] = P + α φ(α) − β φ(β).

Everything is computed in log space (:func:`log_ndtr_diff`) so that intervals in either far tail
keep full relative precision; results are exact to machine precision. Everything is torch, batched
over leading dimensions, device-agnostic and differentiable by autograd (no NaN gradients from
padding rows or infinite end points).
"""
from __future__ import annotations

import math

import torch

from .types import StandardMoments

__all__ = ["log_ndtr_diff", "log1mexp", "ndtr", "masked_update", "std_moments_1d", "interval_moments", "interval_stats",
           "LOG_SQRT_2PI"]

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_LN2 = math.log(2.0)
_SQRT1_2 = math.sqrt(0.5)


_NARROW_NODES = 8
_LOG1MEXP_FLOOR = 1e-300
"""log1mexp arguments are clamped to <= −1e-300 (never reached by wide intervals; keeps log(0) out)."""
_GL_CACHE: dict = {}


def _gl_nodes(n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss–Legendre nodes and weights on [-1, 1] (cached per n, dtype, device)."""
    key = (n, dtype, str(device))
    if key not in _GL_CACHE:
        import numpy as np
        x, w = np.polynomial.legendre.leggauss(n)
        _GL_CACHE[key] = (torch.tensor(x, dtype=dtype, device=device), torch.tensor(w, dtype=dtype, device=device))
    return _GL_CACHE[key]


def ndtr(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) = erfc(−x/√2)/2, with full relative precision in the lower tail.

    (``torch.special.ndtr`` in torch 2.13 loses relative precision below x ≈ −5: Φ(−8) is 2 % off.)
    """
    return 0.5 * torch.special.erfc(-x * _SQRT1_2)


def masked_update(out: torch.Tensor, mask: torch.Tensor, fn, *args: torch.Tensor) -> torch.Tensor:
    """``out`` with the entries under ``mask`` replaced by ``fn(*args[mask])`` (differentiable).

    Evaluates ``fn`` only on the selected entries (one ``nonzero``; a device sync on GPU), which is
    much cheaper than computing a rare branch everywhere. ``args`` must have ``out``'s shape.
    """
    idx = mask.reshape(-1).nonzero().squeeze(-1)
    if idx.numel() == 0:
        return out
    vals = fn(*(a.reshape(-1).index_select(0, idx) for a in args))
    return out.reshape(-1).index_put((idx,), vals).reshape(out.shape)


def _narrow_log_mass(mid: torch.Tensor, half: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """log ∫_{mid−half}^{mid+half} φ, by Gauss–Legendre around the midpoint (for half·max(1,|mid|) <= 1/2).

    ``width`` = hi − lo is passed separately (2·half underflows to 0 for a width of one subnormal ulp)."""
    t, w = _gl_nodes(_NARROW_NODES, mid.dtype, mid.device)
    expo = -(mid * half).unsqueeze(-1) * t - 0.5 * (half * half).unsqueeze(-1) * (t * t)
    return (torch.log(width) - 0.5 * mid * mid - LOG_SQRT_2PI
            + torch.logsumexp(expo + torch.log(0.5 * w), dim=-1))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x <= 0, stable everywhere (Mächler 2012); -inf at x = 0."""
    big = x > -_LN2
    x1 = torch.where(big, x, torch.full_like(x, -1.0))
    x2 = torch.where(big, torch.full_like(x, -1.0), x)
    return torch.where(big, torch.log(-torch.expm1(x1)), torch.log1p(-torch.exp(x2)))


def log_ndtr_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""log(Φ(b) − Φ(a)) for a < b, stable for all a < b (and -inf where a >= b).

    The interval is reflected (a, b) -> (−b, −a) when a + b > 0 so that it lies mostly in the lower
    tail. Then, if b <= 0 (both end points in the lower tail), the difference of the tails is taken
    away from the mass in log space,

        log(Φ(b) − Φ(a)) = log Φ(b) + log(1 − exp(log Φ(a) − log Φ(b))),

    which keeps full relative precision down to log Φ ≈ −1e300 (e.g. a = −40, b = −39). Narrow
    intervals, (b − a) max(1, |a + b|/2) <= 1, are integrated by an 8-node Gauss–Legendre rule around the
    midpoint in log space (exact to machine precision there, where the tail difference would cancel).
    Otherwise
    (a < 0 < b) the mass is 1 − Φ(a) − Φ(−b) (``log1p``) when that is > 1/2, and
    (erf(b/√2) − erf(a/√2))/2, a sum of two non-negative terms, when it is not. Infinite end points
    are allowed. Differentiable by autograd with finite gradients wherever the result is finite.
    """
    a, b = torch.broadcast_tensors(a, b)
    valid = a < b
    flip = (a + b) > 0  # NaN (a=-inf, b=+inf) compares False: no flip; either choice is accurate near a + b = 0
    lo = torch.where(flip, -b, a)
    hi = torch.where(flip, -a, b)
    # ---- narrow intervals: width * max(1, |mid|) <= 1, Gauss-Legendre around the midpoint. Decided first,
    # so that the other branches never see them (their difference of tails would round to 0 there: log(0),
    # whose gradient is NaN even behind a torch.where).
    fin = valid & torch.isfinite(lo) & torch.isfinite(hi)
    half = torch.where(fin, 0.5 * (hi - lo), torch.ones_like(hi))
    mid = torch.where(fin, 0.5 * (hi + lo), torch.zeros_like(hi))
    narrow = fin & (2.0 * half * torch.clamp(mid.abs(), min=1.0) <= 1.0)
    wide = valid & ~narrow
    # ---- both in the lower tail: hi <= 0 (there log Φ(lo) − log Φ(hi) <= −1/2 for wide intervals)
    tail = wide & (hi <= 0)
    lo_inf = tail & torch.isneginf(lo)
    hi_t = torch.where(tail, hi, torch.full_like(hi, -1.0))
    lo_t = torch.where(tail & ~lo_inf, lo, hi_t - 1.0)
    lh = torch.special.log_ndtr(hi_t)
    ll = torch.special.log_ndtr(lo_t)
    res_tail = torch.where(lo_inf, lh, lh + log1mexp(torch.clamp(ll - lh, max=-_LOG1MEXP_FLOOR)))
    # ---- straddling 0: lo < 0 < hi (and |lo| >= |hi| after the reflection)
    strad = wide & ~tail
    hi_s = torch.where(strad, hi, torch.ones_like(hi))
    lo_s = torch.where(strad, lo, -torch.ones_like(lo))
    outside = ndtr(lo_s) + ndtr(-hi_s)
    use_log1p = outside < 0.5  # both forms are accurate near the switch
    out1 = torch.where(use_log1p, outside, torch.full_like(outside, 0.25))
    res_1 = torch.log1p(-out1)
    hi_e = torch.where(use_log1p, torch.ones_like(hi_s), hi_s)
    lo_e = torch.where(use_log1p, -torch.ones_like(lo_s), lo_s)
    res_2 = torch.log(0.5 * (torch.erf(hi_e * _SQRT1_2) - torch.erf(lo_e * _SQRT1_2)))
    res_s = torch.where(use_log1p, res_1, res_2)
    res = torch.where(tail, res_tail, res_s)
    res = masked_update(res, narrow, _narrow_log_mass, mid, half, torch.where(fin, hi - lo, torch.ones_like(hi)))
    return torch.where(valid, res, torch.full_like(res, float("-inf")))


_CF_BANDS = ((1.5, 160), (3.0, 64), (6.0, 32))
"""One-sided tail functions use the Laplace continued fraction for x > 1.5 (direct formulas below), with
(lower end of band, number of terms): ≈1e-16 relative at the lower end of each band with the asymptotic start."""
_MOMENT_NODES = 10
"""Gauss–Legendre nodes for the moments of narrow intervals (error < 1e-17 relative in the narrow regime)."""
_MOMENT_NARROW = 1.0
"""Intervals with half-width·max(1, |midpoint|) <= this take the Gauss–Legendre moments (see interval_stats)."""


def _tail_cf(x: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R₁(x), R₂(x))`` of the Laplace continued fraction R_k = k / (x + R_{k+1}), for x > 1.5.

    R₁ = λ(x) − x and R₂ = 1/R₁ − x, where λ(x) = φ(x)/Φ̄(x) (Φ̄ = 1 − Φ) is the inverse Mills ratio.
    Evaluated bottom-up with ``terms`` terms, from the fixed point of R = k/(x + R) (see ``_CF_BANDS``).
    """
    k0 = terms + 1
    R = 2.0 * k0 / (x + torch.hypot(x, torch.full_like(x, 2.0 * math.sqrt(k0))))
    R2 = R
    for k in range(terms, 0, -1):
        R2 = R
        R = k / (x + R)
    return R, R2


def _one_sided(x: torch.Tensor, need: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``(λ, r, V)`` of u ~ N(0, 1) on [x, ∞) for finite x: mean λ = φ(x)/Φ̄(x), r = λ − x and variance V.

    For x <= 1.5: λ = exp(log φ(x) − log Φ(−x)), r = λ − x, V = 1 − λ r (at most ~5 ulp of cancellation).
    For x > 1.5 (where 1 − λ r ≈ 1/x² cancels): r = R₁ and V = R₁ (R₂ − R₁) from the continued fraction
    (:func:`_tail_cf`), which computes the small quantities directly; λ = x + r. Relative accuracy ≈ 1e-15
    for every finite x; gradients finite everywhere (each branch sees a sanitised input). Entries outside
    ``need`` (if given) get the values of x = 1.5 (finite placeholders): callers use it to skip values they
    discard.
    """
    cf = x > _CF_BANDS[0][0]
    xd = torch.where(cf, torch.full_like(x, _CF_BANDS[0][0]), x)
    lam = torch.exp(-0.5 * xd * xd - LOG_SQRT_2PI - torch.special.log_ndtr(-xd))
    r = lam - xd
    V = 1.0 - lam * r
    if need is not None:
        cf = cf & need
    if not bool(cf.any()):
        return lam, r, V
    xf, rf, Vf = x.reshape(-1), r.reshape(-1), V.reshape(-1)
    for i, (lo, terms) in enumerate(_CF_BANDS):
        band = cf & (x > lo)
        if i + 1 < len(_CF_BANDS):
            band = band & (x <= _CF_BANDS[i + 1][0])
        idx = band.reshape(-1).nonzero().squeeze(-1)
        if idx.numel():
            R1, R2 = _tail_cf(xf.index_select(0, idx), terms)
            rf = rf.index_put((idx,), R1)
            Vf = Vf.index_put((idx,), R1 * (R2 - R1))
    r, V = rf.reshape(x.shape), Vf.reshape(x.shape)
    return torch.where(cf, x + r, lam), r, V


def _narrow_moments(mid: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Mean and variance (stacked, (n, 2)) of N(0, 1) on [mid − half, mid + half] by Gauss–Legendre.

    With s = u − mid the density is ∝ exp(−mid·s − s²/2) on [−half, half], smooth at the scale of the
    interval when half·max(1, |mid|) <= 1; the variance is the weighted sum Σ p_i (s_i − s̄)² (no cancellation).
    """
    t, w = _gl_nodes(_MOMENT_NODES, mid.dtype, mid.device)
    s = half.unsqueeze(-1) * t
    logw = torch.log(w) - mid.unsqueeze(-1) * s - 0.5 * s * s
    p = torch.softmax(logw, dim=-1)
    sbar = (p * s).sum(-1)
    var = (p * (s - sbar.unsqueeze(-1)).square()).sum(-1)
    return torch.stack([mid + sbar, var], dim=-1)


def interval_stats(alpha: torch.Tensor, beta: torch.Tensor, log_mass: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``(log P, E[u | α<u<β], Var[u | α<u<β])`` for u ~ N(0, 1), batched, accurate in every regime.

    The interval is reflected (α, β) -> (−β, −α) when |α| > |β|, so that a = the end point nearer 0 and
    b >= |a| (then a >= 0 is a one-sided tail, a < 0 straddles 0). With the one-sided tail functions of
    :func:`_one_sided` at a and b — λ (inverse Mills ratio), r = λ − x, V (variance of N(0,1) on [x, ∞)) —
    and e = Φ̄(b)/Φ̄(a) = exp(−(b − a)(a + b)/2) λ(a)/λ(b), the interval is the signed mixture
    "[a, ∞) minus [b, ∞)", whose moments are

        E[u] − a = (r_a − e (b − a + r_b)) / (1 − e)                (a >= 0; else (λ_a − e λ_b)/(1 − e))
        Var[u]  = (V_a − e V_b)/(1 − e) − e D² / (1 − e)²,          D = λ_b − λ_a.

    Outside the narrow case below e <= Φ̄(1)/Φ̄(0) ≈ 0.32, V_a − e V_b >= (1 − e) V_a (V is decreasing)
    and the last subtraction loses at most a few bits, so no E[u²] − E[u]² and no exp(log φ − log P)
    (which loses α²·eps) remains. Narrow intervals (half-width·max(1, |midpoint|) <= 1) use a 10-node
    Gauss–Legendre rule around the midpoint, with the variance as a sum of squares. Infinite end points
    are allowed; the whole line gives (0, 0, 1). Measured against mpmath: ≤ 1e-13 relative for the
    variance and for E[u] − (nearer end point) on end points in [−1e4, 1e4] and widths 1e-12..∞.
    Empty intervals (α >= β) return log P = -inf, mean 0 and variance 0. Autograd gives finite gradients
    in every branch (each branch is evaluated on sanitised inputs).
    """
    if not alpha.is_floating_point():
        alpha = alpha.to(beta.dtype if beta.is_floating_point() else torch.get_default_dtype())
    beta = beta.to(alpha.dtype)
    if log_mass is None:
        log_mass = log_ndtr_diff(alpha, beta)
    alpha, beta, log_mass = torch.broadcast_tensors(alpha, beta, log_mass)
    empty = torch.isneginf(log_mass) | ~(alpha < beta)
    flip = alpha.abs() > beta.abs()
    a = torch.where(flip, -beta, alpha)
    b = torch.where(flip, -alpha, beta)
    whole = torch.isinf(a) & ~empty                      # a = −∞ only when b = +∞ (|a| <= |b|)
    ok = ~empty & ~whole
    binf = ok & torch.isinf(b)
    a_s = torch.where(ok, a, torch.zeros_like(a))
    fin = ok & ~binf
    b_f = torch.where(fin, b, a_s.abs() + 1.0)
    half = 0.5 * (b_f - a_s)
    mid = 0.5 * (a_s + b_f)
    narrow = fin & (half * torch.clamp(mid, min=1.0) <= _MOMENT_NARROW)
    # ---- signed-mixture formula (b sanitised far away where it is not used: e stays tiny there)
    b_t = torch.where(fin & ~narrow, b, a_s.abs() + 4.0)
    w = b_t - a_s
    lam_a, r_a, V_a = _one_sided(a_s)
    lam_b, r_b, V_b = _one_sided(b_t, fin & ~narrow)
    e = torch.exp(-0.5 * w * (a_s + b_t)) * lam_a / lam_b
    e = torch.where(binf, torch.zeros_like(e), e)
    om = 1.0 - e
    pos = a_s >= 0
    mean_t = torch.where(pos, a_s + (r_a - e * (w + r_b)) / om, (lam_a - e * lam_b) / om)
    D = torch.where(pos, w + r_b - r_a, lam_b - lam_a)
    var_t = (V_a - e * V_b) / om - e * D * D / (om * om)
    # ---- narrow intervals: Gauss–Legendre around the midpoint (evaluated on those entries only)
    stats = torch.stack([mean_t, var_t], dim=-1)
    idx = narrow.reshape(-1).nonzero().squeeze(-1)
    if idx.numel():
        nm = _narrow_moments(mid.reshape(-1).index_select(0, idx), half.reshape(-1).index_select(0, idx))
        stats = stats.reshape(-1, 2).index_put((idx,), nm).reshape(stats.shape)
    mean, var = stats[..., 0], stats[..., 1]
    mean = torch.where(flip, -mean, mean)
    zero = torch.zeros_like(mean)
    mean = torch.where(ok, mean, zero)
    var = torch.where(ok, var, torch.where(whole, torch.ones_like(var), zero))
    return log_mass, mean, var


def interval_moments(alpha: torch.Tensor, beta: torch.Tensor, log_mass: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``(log P, E[u | α<u<β], E[u² | α<u<β])`` for u ~ N(0, 1): :func:`interval_stats` with
    E[u²] = Var + E[u]² (a sum of non-negative terms, so as accurate as its parts). Empty intervals give
    (-inf, 0, 0). Use :func:`interval_stats` when the variance is wanted: E[u²] − E[u]² cancels."""
    log_mass, mean, var = interval_stats(alpha, beta, log_mass)
    return log_mass, mean, var + mean * mean


def interval_from_constraints(G: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """End points ``(α, β)`` of {u : g_j u <= d_j} and a bool ``infeasible`` flag (a zero row with d < 0).

    ``G``: (..., F) or (..., F, 1); ``d``: (..., F). Padding rows are ignored.
    """
    g = G[..., 0] if G.dim() == d.dim() + 1 else G
    g, d = torch.broadcast_tensors(g, d)
    real = (g != 0) & (d < float("inf"))
    pos = real & (g > 0)
    neg = real & (g < 0)
    gs = torch.where(real, g, torch.ones_like(g))
    ds = torch.where(real, d, torch.zeros_like(d))
    bound = ds / gs
    inf = torch.full_like(bound, float("inf"))
    if d.shape[-1] == 0:
        shape = d.shape[:-1]
        return (d.new_full(shape, float("-inf")), d.new_full(shape, float("inf")),
                torch.zeros(shape, dtype=torch.bool, device=d.device))
    beta = torch.where(pos, bound, inf).amin(dim=-1)
    alpha = torch.where(neg, bound, -inf).amax(dim=-1)
    infeasible = ((g == 0) & (d < 0)).any(dim=-1)
    return alpha, beta, infeasible


def std_moments_1d(G: torch.Tensor, d: torch.Tensor, *, need_moments: bool = True) -> StandardMoments:
    r"""Mass and conditional moments of u ~ N(0, 1) on {u : G u <= d} (S = 1), exact in closed form.

    Args:
        G: (..., F, 1) constraint coefficients (±1 for real rows, 0 for padding).
        d: (..., F) right-hand sides (+inf for padding).

    Returns:
        :class:`StandardMoments` with log_mass (...,), mean (..., 1), second_moment (..., 1, 1),
        log_mass_stderr = 0 and covariance (..., 1, 1) (the variance, computed directly — see
        :func:`interval_stats`). Exact to machine precision in both tails (variance ≤ 1e-13 relative).
        An empty polytope returns log_mass = -inf and zero mean, second moment and covariance
        (NaN-free; callers decide what to do with it).
        With ``need_moments=False`` only log_mass is computed (the moments are zeros).
    """
    alpha, beta, infeasible = interval_from_constraints(G, d)
    log_mass = log_ndtr_diff(alpha, beta)
    log_mass = torch.where(infeasible, torch.full_like(log_mass, float("-inf")), log_mass)
    if not need_moments:
        z = log_mass.new_zeros(log_mass.shape + (1, 1))
        return StandardMoments(log_mass, log_mass.new_zeros(log_mass.shape + (1,)), z, torch.zeros_like(log_mass), z)
    log_mass, mean, var = interval_stats(alpha, beta, log_mass)
    return StandardMoments(log_mass, mean.unsqueeze(-1), (var + mean * mean)[..., None, None],
                           torch.zeros_like(log_mass), var[..., None, None])
