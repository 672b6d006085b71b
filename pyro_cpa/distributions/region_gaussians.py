r"""Per-region Gaussian algebra of the model z ~ N(0, Σz), x | z ~ N(A_ω z + b_ω, Σx) on region ω.

With diagonal Σx = diag(σx²), Σz = diag(σz²) and the observation precision w = 1/σx² (set to 0 for
missing coordinates), for every (datum n, region ω):

    Λ_ω   = Σz⁻¹ + A_ωᵀ diag(w) A_ω                       (posterior precision, S×S)
    μ_ω   = Λ_ω⁻¹ A_ωᵀ diag(w) (x − b_ω)                  (posterior mean of the untruncated Gaussian)
    log κ_ω(x) = log N(x_o; b_ω,o, Σx,o + A_ω,o Σz A_ω,oᵀ)
              = −½ [ n_o log 2π + Σ_o log σx² + Σ log σz² + log det Λ_ω
                     + ‖√w ⊙ (x − b_ω − A_ω μ_ω)‖² + ‖μ_ω / σz‖² ]

(matrix-determinant lemma and Woodbury, so only S×S Cholesky factors are formed; the quadratic form
is written as a sum of two non-negative terms, with no cancellation far from the data).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._shapes import broadcast_shapes


class RegionGaussians(NamedTuple):
    """Outputs of :func:`region_gaussians` (N data, R regions, S latent dims).

    Attributes:
        log_kappa: (N, R) log κ_ω(x).
        loc: (N, R, S) μ_ω(x).
        scale_tril: (R, S, S) — or (N, R, S, S) with missing data — Cholesky factor of Σ_ω = Λ_ω⁻¹.
        (:func:`affine_gaussians`: the broadcast batch shape instead of (N, R).)
    """

    log_kappa: torch.Tensor
    loc: torch.Tensor
    scale_tril: torch.Tensor


SUBSTITUTION_MAX_S = 4
"""Up to this S, :func:`cholesky_solve_small` solves by elementwise substitution over the batch (LAPACK's batched
solve pays a per-matrix call, ~20x the arithmetic of an S <= 4 system); above it, ``torch.cholesky_solve``."""


SEQUENTIAL_SUM_MAX = 4
"""Sums over a last dimension of at most this size are taken left to right by elementwise additions
(:func:`sum_last`): torch's reduction kernel pays a per-output cost on such short rows (measured: (223, 586, 2)
summed over the last dimension in 1.75 ms by ``sum(-1)``, 0.10 ms as x₀ + x₁; the same values)."""


def sum_last(x: torch.Tensor) -> torch.Tensor:
    """Σ_i x[..., i]: left to right, (x₀ + x₁) + x₂ + ..., by elementwise additions for a last dimension of at most
    :data:`SEQUENTIAL_SUM_MAX` (each value independent of the batch's shape), ``x.sum(-1)`` above."""
    k = x.shape[-1]
    if k == 0 or k > SEQUENTIAL_SUM_MAX:
        return x.sum(-1)
    acc = x[..., 0]
    for i in range(1, k):
        acc = acc + x[..., i]
    return acc if k > 1 else acc.clone()


def cholesky_solve_small(y: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """x with L Lᵀ x = y for lower-triangular L (..., S, S) and y (..., S), broadcasting their batch shapes.

    Forward then back substitution, z_i = (y_i − Σ_{j<i} L_ij z_j) / L_ii and x_i = (z_i − Σ_{j>i} L_ji x_j) / L_ii,
    each step elementwise over the batch: the operations of LAPACK's triangular solves, hence as backward stable,
    and each value independent of the batch's shape. Differentiable.
    """
    S = y.shape[-1]
    if S > SUBSTITUTION_MAX_S:
        batch = broadcast_shapes(y.shape[:-1], L.shape[:-2])
        return torch.cholesky_solve(y.expand(batch + (S,)).unsqueeze(-1), L.expand(batch + (S, S))).squeeze(-1)
    z = []
    for i in range(S):
        acc = y[..., i]
        for j in range(i):
            acc = acc - L[..., i, j] * z[j]
        z.append(acc / L[..., i, i])
    out = [None] * S
    for i in reversed(range(S)):
        acc = z[i]
        for j in range(i + 1, S):
            acc = acc - L[..., j, i] * out[j]
        out[i] = acc / L[..., i, i]
    return torch.stack(out, -1)


def region_gaussians(A: torch.Tensor, b: torch.Tensor, x: torch.Tensor, obs_var: torch.Tensor,
                     prior_var: torch.Tensor, observed: torch.Tensor | None = None) -> RegionGaussians:
    """Compute κ_ω(x), μ_ω(x) and chol(Σ_ω) for all (datum, region) pairs (see module docstring).

    Args:
        A: (R, D, S), b: (R, D): per-region affine maps.
        x: (N, D) data; entries where ``observed`` is False are ignored (may be NaN).
        obs_var: (D,) observation variances σx²; prior_var: (S,) prior variances σz².
        observed: optional (N, D) bool mask of observed coordinates.
    """
    return affine_gaussians(A, b, x.unsqueeze(-2), obs_var, prior_var,
                            None if observed is None else observed.unsqueeze(-2))


def affine_gaussians(A: torch.Tensor, b: torch.Tensor, x: torch.Tensor, obs_var: torch.Tensor,
                     prior_var: torch.Tensor, observed: torch.Tensor | None = None) -> RegionGaussians:
    """:func:`region_gaussians` with broadcasting batch dimensions: A (..., D, S), b (..., D), x (..., D).

    The batch shape of the result is the broadcast of those of ``A``, ``b``, ``x`` (and ``observed``).
    Every matrix that depends only on A (the precision Λ_ω and its Cholesky factor, Σ_ω) is formed at
    the batch shape of ``A`` (and ``observed``), so ``A`` (R, D, S) with ``x`` (N, 1, D) computes R
    factorisations, not N·R; ``A`` (P, D, S) with ``x`` (P, D) evaluates P arbitrary (datum, region) pairs.
    """
    D, S = A.shape[-2:]
    w = obs_var.reciprocal().expand(D)
    prior_prec = prior_var.reciprocal().expand(S)
    if observed is None:
        wn = w
        x0 = x
        n_obs = x.new_full(x.shape[:-1], float(D))
        logdet_x = obs_var.log().expand(D).sum().expand(x.shape[:-1])
    else:
        obs = observed.to(x.dtype)
        wn = obs * w
        x0 = torch.where(observed, x, torch.zeros_like(x))
        n_obs = obs.sum(-1)
        logdet_x = (obs * obs_var.log().expand(D)).sum(-1)
    prec = torch.diag_embed(prior_prec) + torch.einsum("...ds,...dt->...st", A * wn.unsqueeze(-1), A)
    L_prec = torch.linalg.cholesky(prec)
    cov = torch.cholesky_inverse(L_prec)
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    r = x0 - b  # (..., D)
    y = torch.einsum("...ds,...d->...s", A, wn * r)
    # a backward-stable solve, not Σ_ω·y: with steep regions (|A| ~ 1e12) the product with the inverse loses
    # the digits that the residual r − A μ below depends on (thin-cell test of issue 10 D7)
    mu = cholesky_solve_small(y, L_prec)
    resid = r - torch.einsum("...ds,...s->...d", A, mu)
    quad = sum_last(wn * resid.square()) + sum_last(mu.square() * prior_prec)
    logdet_prec = 2.0 * torch.diagonal(L_prec, dim1=-2, dim2=-1).log().sum(-1)
    log_kappa = -0.5 * (n_obs * math.log(2 * math.pi) + logdet_x + prior_var.log().expand(S).sum()
                        + logdet_prec + quad)
    scale_tril = torch.linalg.cholesky(cov)
    return RegionGaussians(log_kappa, mu, scale_tril)
