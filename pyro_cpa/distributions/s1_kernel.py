r"""The fused S = 1 kernel: every (datum, region) pair of fully observed data at once, a fixed number of tensor
operations per chunk, no pruning (issue 12).

For S = 1 each region ω is an interval (lo_ω, hi_ω) and, for a datum x (D,), the exact pair quantities are
(:meth:`~pyro_cpa.distributions.CPAMarginal._pairs`, written out for S = 1)

    λ_ω = 1/σz² + Σ_d a_ωd² w_d  (w = 1/σx²),   v_ω = 1/λ_ω,   s_ω = √v_ω,
    μ_nω = (Σ_d w_d a_ωd (x_nd − b_ωd)) / λ_ω,
    log κ_nω = const_ω − ½ [Σ_d w_d (x_nd − b_ωd − a_ωd μ_nω)² + μ_nω²/σz²],
    const_ω = −½ (D log 2π + Σ_d log σx_d² + log σz² + log λ_ω),
    log P_nω = log(Φ(β) − Φ(α)),   (α, β) = (lo_ω/s_ω − μ_nω/s_ω, hi_ω/s_ω − μ_nω/s_ω),

and log p(x_n) = logsumexp_ω (log κ + log P). The quadratic form is a sum of non-negative terms (as in
:func:`~pyro_cpa.distributions.region_gaussians.affine_gaussians`: no cancellation however far x is from the
curve); log P and the moments come from :func:`~pyro_cpa.integrate.univariate.interval_stats` /
:func:`~pyro_cpa.integrate.univariate.interval_log_mass` (machine precision in every regime). The per-region
constants are formed once per partition and parameter state (:func:`s1_setup`).

**Steep regions.** Where |a_ω| is huge (a cell of width 1e-12 carrying slope 1e12), the residual r − a μ of a
datum on that piece is ~0 while r and a μ are ~1e12, so the rounding of μ (relative 1e-16) moves a μ by more than
the residual. μ is therefore a division by λ (correctly rounded given the sum, as the backward-stable solve of
:func:`~pyro_cpa.distributions.region_gaussians.affine_gaussians`), and a μ is rounded *before* it is subtracted
from r (no fused multiply-add): the true a μ lies within half an ulp of r, so its rounding lands on r's grid and
the residual comes out 0 instead of a μ's rounding error (tests/geometry/test_perturbation.py's thin cells:
|Δ log p| 7e-5 → 0 against quadrature).

Used by the S = 1 E-step (:func:`pyro_cpa.infer.estep.e_step`: mass and moments, :func:`s1_pairs`) and by the
no-autograd exact log p (:meth:`~pyro_cpa.distributions.CPAMarginal.log_prob`: mass only, :func:`s1_log_prob`).
Both reduce the terms by :func:`s1_logsumexp`, so the E-step's log-likelihood and ``log_prob`` are the same
computation.

**Exactness.** Every pair is integrated: the generic path (:mod:`~pyro_cpa.distributions.chunked`) skips pairs
whose upper bound is more than ``prune_tol`` (40) nats below the datum's mass (a relative error below
R·e^-40); here only terms more than 700 nats below the datum's largest term are dropped (e^-700 relative,
:func:`~pyro_cpa.integrate.univariate.exp_floored`), far below double rounding. So this kernel is the more
exact of the two; they agree to ~1e-15 relative (tests/distributions/test_s1_kernel.py). Each pair's term
depends on that pair alone and each datum's reduction on its own row, so log p does not depend on the
chunking or the batch shape.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._threads import with_library_threads
from ..integrate.univariate import exp_floored, interval_from_constraints, interval_log_mass, interval_stats
from .chunked import DENSE_ELEMENTS, RegionParams


class S1Regions(NamedTuple):
    """Per-region S = 1 quantities of :func:`s1_pairs` (see :func:`s1_regions`); the (D, 1, R) fields are laid
    out so that the sums over the D coordinates run over the leading dimension of (D, n, R) products."""

    a: torch.Tensor       # (D, 1, R) slopes a_ωd
    b: torch.Tensor       # (D, 1, R) offsets b_ωd
    aw: torch.Tensor      # (D, 1, R) a_ωd w_d
    lam: torch.Tensor     # (R,) posterior precision λ_ω
    w: torch.Tensor       # (D, 1, 1) w_d = 1/σx_d²
    lo_s: torch.Tensor    # (R,) lo_ω/s_ω (lo = +inf for an empty region)
    hi_s: torch.Tensor    # (R,) hi_ω/s_ω
    neg_inv_s: torch.Tensor   # (R,) −1/s_ω
    v: torch.Tensor       # (R,) posterior variance 1/λ_ω
    s: torch.Tensor       # (R,) √v
    const: torch.Tensor   # (R,) the part of log κ without the quadratic form
    prior_prec: float     # 1/σz²


def s1_regions(params: RegionParams) -> S1Regions:
    """Per-region S = 1 quantities of :func:`s1_pairs` from ``params`` (A, b, H, c, σx², σz²) (module docstring).

    The region ω = {z : h_j z <= c_j} is the interval (lo_ω, hi_ω) (:func:`interval_from_constraints`; an
    empty region gets lo = +inf, hence log P = −inf).
    """
    A, b, H, c, obs_var, prior_var = params
    a = A[..., 0]
    lo, hi, infeasible = interval_from_constraints(H[..., 0], c)
    lo = torch.where(infeasible, torch.full_like(lo, math.inf), lo)
    w = obs_var.reciprocal()
    aw = a * w
    lam = prior_var.reciprocal() + (a * aw).sum(-1)
    v = lam.reciprocal()
    s = v.sqrt()
    const = -0.5 * (a.shape[-1] * math.log(2 * math.pi) + obs_var.log().sum() + prior_var.log().sum() + lam.log())
    lay = (lambda t: t.T.unsqueeze(1).contiguous())   # (R, D) -> (D, 1, R)
    return S1Regions(lay(a), lay(b), lay(aw), lam, w.reshape(-1, 1, 1), lo / s, hi / s, -s.reciprocal(),
                     v, s, const, float(prior_var.reciprocal()))


_MEMO: list = [None, None]
"""[key, value] of the last :func:`s1_setup`: the key holds the partition object itself (so that its id cannot
be reused while it lives), the dtype and copies of σx, σz."""


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))


def s1_setup(mg, regions) -> tuple[S1Regions, int]:
    """(:func:`s1_regions`, R) of the marginal ``mg`` under its current parameters, without gradient;
    ``regions`` = ``mg.regions`` (current: its staleness was just checked).

    Reused while the partition is the same object (a partition is replaced as soon as the decoder's parameters
    change, :attr:`~pyro_cpa.distributions.CPAMarginal.regions`, so its maps A, b, H, c are those it was built
    with, as in the marginal's own memo) and the dtype, σx and σz are bit-identical: the per-region constants
    are then the same, so is the check that they are representable
    (:meth:`~pyro_cpa.distributions.CPAMarginal._params`).
    """
    scales = (mg.obs_scale, mg.prior_scale)
    key, value = _MEMO
    if key is not None and key[0] is regions and key[1] == mg.dtype and all(map(_same_values, scales, key[2])):
        return value
    from .cpa_marginal import _check_representable

    with torch.no_grad():
        A, b, H, c = mg._region_params()
        obs_var, prior_var = mg._variances()
        _check_representable(A, b, obs_var, prior_var)
        value = (s1_regions(RegionParams(A, b, H, c, obs_var, prior_var)), A.shape[0])
    _MEMO[:] = [(regions, mg.dtype, tuple(t.detach().clone() for t in scales)), value]
    return value


def s1_rows(R: int, D: int, chunk_size: int) -> int:
    """Data per chunk of the kernel: at most ``chunk_size``, and rows · R · (D + 3) <= ``DENSE_ELEMENTS`` (the
    (D, n, R) residuals and a few (n, R) temporaries; at least 1)."""
    return max(1, min(int(chunk_size), DENSE_ELEMENTS // max(1, R * (D + 3))))


def _s1_mu_quad(g: S1Regions, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ (n, R), the quadratic form (n, R)) of the module docstring for the data xt (D, n) (transposed,
    contiguous); the sums over d run over the leading dimension of (D, n, R) products (a reduction over a short
    trailing dimension is several times slower)."""
    r = xt.unsqueeze(-1) - g.b                                       # (D, n, R)
    mu = (r * g.aw).sum(0) / g.lam   # a division by λ, not a product with v = 1/λ (see the module docstring)
    quad = torch.addcmul(((r - g.a * mu).square() * g.w).sum(0), mu, mu, value=g.prior_prec)   # a μ rounded first
    return mu, quad


def s1_pairs(regions: S1Regions, xt: torch.Tensor):
    r"""Exact S = 1 pair quantities for fully observed data given transposed, xt (D, n) contiguous:
    (terms (n, R), m (n, R), C (n, R)).

    terms = log κ + log P, m = E[z | z ∈ ω, x] = μ + s E[u], C = Var[z | z ∈ ω, x] = v Var[u], with log P,
    E[u], Var[u] of the whitened interval by :func:`~pyro_cpa.integrate.univariate.interval_stats` (module
    docstring; every pair, no pruning).
    """
    g = regions
    mu, quad = _s1_mu_quad(g, xt)
    log_mass, mean_u, var_u = interval_stats(torch.addcmul(g.lo_s, mu, g.neg_inv_s),
                                             torch.addcmul(g.hi_s, mu, g.neg_inv_s))
    return torch.add(g.const, quad, alpha=-0.5) + log_mass, torch.addcmul(mu, g.s, mean_u), g.v * var_u


def s1_terms(regions: S1Regions, xc: torch.Tensor) -> torch.Tensor:
    """The terms log κ + log P (n, R) of :func:`s1_pairs` alone (the mass: no mean or variance work), the same
    values (:func:`~pyro_cpa.integrate.univariate.interval_log_mass`)."""
    g = regions
    mu, quad = _s1_mu_quad(g, xc.T.contiguous())
    log_mass = interval_log_mass(torch.addcmul(g.lo_s, mu, g.neg_inv_s), torch.addcmul(g.hi_s, mu, g.neg_inv_s))
    return torch.add(g.const, quad, alpha=-0.5) + log_mass


def s1_logsumexp(terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p (n,), e (n, R), Σ e (n, 1)) with e = exp(t − max_ω t) (exactly 0 below e^-700 relative:
    :func:`~pyro_cpa.integrate.univariate.exp_floored`, no slow underflow path) and log p = max + log Σ e.
    Every datum has a finite term (the regions cover the line), so the maximum is finite."""
    top = terms.amax(-1, keepdim=True)
    ew = exp_floored(terms - top)
    total = ew.sum(-1, keepdim=True)
    return (top + total.log()).squeeze(-1), ew, total


@with_library_threads
def s1_log_prob(mg, x: torch.Tensor) -> torch.Tensor:
    """Exact log p(x_n) (N,) of fully observed flat data x (N, D) under the S = 1 marginal ``mg`` (global
    partition), without autograd: :func:`s1_terms` and :func:`s1_logsumexp` chunk by chunk (:func:`s1_rows`
    data at a time, memory O(chunk)), under ``torch.inference_mode`` (the returned tensor is an ordinary one).
    Exactness: module docstring."""
    if x.shape[0] == 0:
        return x.new_zeros(0)
    regions = mg.regions
    g, R = s1_setup(mg, regions)
    rows = s1_rows(R, x.shape[-1], mg.chunk_size)
    with torch.inference_mode():   # no autograd bookkeeping per operation; the result is formed outside it
        parts = [s1_logsumexp(s1_terms(g, x[i:i + rows]))[0] for i in range(0, x.shape[0], rows)]
    with torch.no_grad():
        return parts[0].clone() if len(parts) == 1 else torch.cat(parts)
