r"""Owen's T function in torch: batched, device-agnostic, differentiable (analytic gradients).

    T(h, a) = (1/2π) ∫_0^a exp(−h²(1 + x²)/2) / (1 + x²) dx.

Symmetries used: T is even in h and odd in a. For 0 <= a <= 1 the integral is evaluated with an
n-point Gauss–Legendre rule (``num_nodes``, default 20): the integrand is entire in x apart from the
poles at ±i and its Gaussian factor has width >= 1/h, so the rule is exact to machine precision
(<= 1e-16 absolute and ~1e-14 relative, checked against SciPy and mpmath) for every h (for h > 8.5
the value is below 1e-17 anyway). For |a| > 1 the identity (h >= 0)

    T(h, a) = ½ [Φ(h) Q(ah) + Φ(ah) Q(h)] − T(ah, 1/a),   Q = 1 − Φ,

reduces to |a| <= 1 without cancellation (T(h, ±inf) = ±Q(|h|)/2). Gradients are analytic:

    ∂T/∂h = −φ(h) erf(a h/√2) / 2,   ∂T/∂a = exp(−h²(1 + a²)/2) / (2π (1 + a²)),

and are themselves differentiable (double backward works).
"""
from __future__ import annotations

import math

import torch

from .univariate import _gl_nodes, ndtr

__all__ = ["owens_t", "DEFAULT_OWENS_T_NODES"]

DEFAULT_OWENS_T_NODES = 20
_INV_2PI = 1.0 / (2.0 * math.pi)
_SQRT1_2 = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _owens_t_forward(h: torch.Tensor, a: torch.Tensor, num_nodes: int) -> torch.Tensor:
    h = h.abs()
    sgn = torch.sign(a)
    aa = a.abs()
    big = aa > 1.0
    ah = torch.where(h == 0, torch.zeros_like(h), h * aa)
    # arguments of the |a| <= 1 integral
    hh = torch.where(big, ah, h)
    ar = torch.where(big, 1.0 / aa, aa)  # 1/inf = 0
    t, w = _gl_nodes(num_nodes, h.dtype, h.device)
    x = (0.5 * ar).unsqueeze(-1) * (1.0 + t)  # (..., n)
    q = 1.0 + x * x
    f = torch.exp(-0.5 * (hh * hh).unsqueeze(-1) * q) / q
    core = (0.5 * ar * _INV_2PI) * (f * w).sum(dim=-1)
    ph, qh = ndtr(h), ndtr(-h)
    pah, qah = ndtr(ah), ndtr(-ah)
    upper = 0.5 * (ph * qah + pah * qh) - core
    return sgn * torch.where(big, upper, core)


class _OwensT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, a, num_nodes):
        ctx.save_for_backward(h, a)
        return _owens_t_forward(h, a, num_nodes)

    @staticmethod
    def backward(ctx, grad):
        h, a = ctx.saved_tensors
        gh = ga = None
        if ctx.needs_input_grad[0]:
            ah = torch.where(h == 0, torch.zeros_like(h), a * h)
            phi = torch.exp(-0.5 * h * h) * _INV_SQRT_2PI
            gh = grad * (-0.5 * phi * torch.erf(ah * _SQRT1_2))
        if ctx.needs_input_grad[1]:
            q = 1.0 + a * a
            expo = torch.where(h == 0, torch.zeros_like(h), -0.5 * h * h * q)
            ga = grad * torch.exp(expo) / q * _INV_2PI
        return gh, ga, None


def owens_t(h: torch.Tensor, a: torch.Tensor, num_nodes: int = DEFAULT_OWENS_T_NODES) -> torch.Tensor:
    r"""Owen's T function T(h, a), broadcast over ``h`` and ``a`` (any real values, a = ±inf allowed).

    Exact to machine precision in float64 (absolute error <= ~2e-16, see module doc); differentiable
    with analytic gradients. ``num_nodes`` is the Gauss–Legendre rule used on [0, min(|a|, 1/|a|)].
    """
    h, a = torch.broadcast_tensors(torch.as_tensor(h), torch.as_tensor(a))
    return _OwensT.apply(h, a, num_nodes)
