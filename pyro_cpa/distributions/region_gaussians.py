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


class RegionGaussians(NamedTuple):
    """Outputs of :func:`region_gaussians` (N data, R regions, S latent dims).

    Attributes:
        log_kappa: (N, R) log κ_ω(x).
        loc: (N, R, S) μ_ω(x).
        scale_tril: (R, S, S) — or (N, R, S, S) with missing data — Cholesky factor of Σ_ω = Λ_ω⁻¹.
    """

    log_kappa: torch.Tensor
    loc: torch.Tensor
    scale_tril: torch.Tensor


def region_gaussians(A: torch.Tensor, b: torch.Tensor, x: torch.Tensor, obs_var: torch.Tensor,
                     prior_var: torch.Tensor, observed: torch.Tensor | None = None) -> RegionGaussians:
    """Compute κ_ω(x), μ_ω(x) and chol(Σ_ω) for all pairs (see module docstring).

    Args:
        A: (R, D, S), b: (R, D): per-region affine maps.
        x: (N, D) data; entries where ``observed`` is False are ignored (may be NaN).
        obs_var: (D,) observation variances σx²; prior_var: (S,) prior variances σz².
        observed: optional (N, D) bool mask of observed coordinates.
    """
    R, D, S = A.shape
    w = obs_var.reciprocal().expand(D)
    prior_prec = prior_var.reciprocal().expand(S)
    eye_prec = torch.diag_embed(prior_prec)
    if observed is None:
        wn = w.expand(x.shape[0], D)
        x0 = x
        prec = eye_prec + torch.einsum("rds,d,rdt->rst", A, w, A)  # (R, S, S)
        n_obs = torch.full((x.shape[0],), float(D), dtype=x.dtype, device=x.device)
        logdet_x = obs_var.log().expand(D).sum().expand(x.shape[0])
    else:
        wn = observed.to(x.dtype) * w
        x0 = torch.where(observed, x, torch.zeros_like(x))
        prec = eye_prec + torch.einsum("rds,nd,rdt->nrst", A, wn, A)  # (N, R, S, S)
        n_obs = observed.to(x.dtype).sum(-1)
        logdet_x = (observed.to(x.dtype) * obs_var.log().expand(D)).sum(-1)
    L_prec = torch.linalg.cholesky(prec)
    r = x0.unsqueeze(-2) - b  # (N, R, D)
    y = torch.einsum("rds,nrd->nrs", A, wn.unsqueeze(-2) * r)
    L_b = L_prec if observed is not None else L_prec.expand(x.shape[0], R, S, S)
    mu = torch.cholesky_solve(y.unsqueeze(-1), L_b).squeeze(-1)  # (N, R, S)
    resid = r - torch.einsum("rds,nrs->nrd", A, mu)
    quad = (wn.unsqueeze(-2) * resid.square()).sum(-1) + (mu.square() * prior_prec).sum(-1)
    logdet_prec = 2.0 * torch.diagonal(L_prec, dim1=-2, dim2=-1).log().sum(-1)
    log_kappa = -0.5 * ((n_obs * math.log(2 * math.pi) + logdet_x + prior_var.log().expand(S).sum()).unsqueeze(-1)
                        + logdet_prec + quad)
    cov = torch.cholesky_inverse(L_prec)
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    scale_tril = torch.linalg.cholesky(cov)
    return RegionGaussians(log_kappa, mu, scale_tril)
