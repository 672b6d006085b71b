r"""Exact E-step of the CPA latent-variable model, aggregated into per-region sufficient statistics.

Model: z ~ N(0, diag σz²), x | z ~ N(g(z), diag σx²), g continuous piecewise affine with linear regions
ω (g(z) = A_ω z + b_ω on ω). For every datum x_n and region ω the exact posterior gives (see
:meth:`pyro_cpa.distributions.CPAMarginal._pairs`)

    e0_nω = p(z ∈ ω | x_n) = softmax_ω(log κ_ω(x_n) + log P_ω(x_n)),
    m_nω  = E[z | z ∈ ω, x_n],      C_nω = Cov[z | z ∈ ω, x_n].

With the augmented latent z̃ = [z; 1] the M-step only needs the data-aggregated statistics

    Z_ω = Σ_n E[1_ω z̃ z̃ᵀ | x_n] = Σ_n e0_nω [[C_nω + m_nω m_nωᵀ, m_nω], [m_nωᵀ, 1]]     (R, S+1, S+1)
    X_ω = Σ_n x_n E[1_ω z̃ | x_n]ᵀ = Σ_n e0_nω x_n [m_nω; 1]ᵀ                          (R, D, S+1)
    q_ω = Σ_n e0_nω x_n ⊙ x_n                                                          (R, D)

so that, for any per-region affine map Ã_ω = [A_ω b_ω] (D, S+1), the expected squared residual of
coordinate d is Σ_n Σ_ω E[1_ω (x_nd − ã_ωdᵀ z̃)² | x_n] = Σ_ω q_ωd − 2 ã_ωdᵀ X_ω[d] + ã_ωdᵀ Z_ω ã_ωd.
The exact log-likelihood log p(x_n) = logsumexp_ω(log κ + log P) comes for free.

Everything is computed in log space up to the final weights e0, batched over (datum, region) pairs,
chunked over the data, and without gradient (the statistics are constants of the M-step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PyroCPAError


@dataclass
class EStepStats:
    """Per-region sufficient statistics of the exact E-step (see module docstring).

    Attributes:
        Z: (R, S+1, S+1) Σ_n E[1_ω z̃ z̃ᵀ | x_n].
        X: (R, D, S+1) Σ_n x_n E[1_ω z̃ | x_n]ᵀ.
        q: (R, D) Σ_n e0_nω x_n².
        loglik: (N,) exact log p(x_n) under the parameters of the E-step.
        patterns: the activation patterns (one (R, n_l) bool tensor per activation layer) of the regions.
        num_data: N.
    """

    Z: torch.Tensor
    X: torch.Tensor
    q: torch.Tensor
    loglik: torch.Tensor
    patterns: list
    num_data: int

    @property
    def region_weights(self) -> torch.Tensor:
        """(R,) Σ_n e0_nω, the expected number of data generated from each region."""
        return self.Z[:, -1, -1]

    @property
    def num_regions(self) -> int:
        return int(self.Z.shape[0])


def e_step(marginal, x: torch.Tensor, chunk_size: int | None = None) -> EStepStats:
    """Exact E-step statistics of the data ``x`` (N, D) (or (..., D), flattened) under ``marginal``.

    Args:
        marginal: a :class:`~pyro_cpa.distributions.CPAMarginal` (its decoder, σx, σz and partition).
        x: fully observed data; NaN (missing) entries are not supported by the EM engine.
        chunk_size: data per batch (memory ∝ chunk_size · R · S²); the marginal's ``chunk_size`` by default.
    """
    x = marginal._check_x(x)
    flat = x.reshape(-1, x.shape[-1])
    if bool(torch.isnan(flat).any()):
        raise PyroCPAError("e_step: x contains NaN (missing) entries; the EM engine needs fully observed data. "
                           "Drop or impute (CPAMarginal.impute) the incomplete rows first.")
    if flat.shape[0] == 0:
        raise PyroCPAError("e_step: x is empty")
    chunk = int(chunk_size or marginal.chunk_size)
    patterns = [p.clone() for p in marginal.regions.patterns]
    Z = X = q = None
    logliks = []
    with torch.no_grad():
        for start in range(0, flat.shape[0], chunk):
            xc = flat[start:start + chunk]
            terms, _, mom, _, _ = marginal._pairs(xc, need_moments=True)
            lp = terms.logsumexp(-1)
            e0 = (terms - lp.unsqueeze(-1)).exp()  # pruned pairs: exp(-inf) = 0
            live = e0 > 0
            m = torch.where(live.unsqueeze(-1), mom.mean, torch.zeros_like(mom.mean))
            C = torch.where(live[..., None, None], mom.covariance, torch.zeros_like(mom.covariance))
            R, S = m.shape[1], m.shape[2]
            Zc = xc.new_zeros(R, S + 1, S + 1)
            Zc[:, :S, :S] = torch.einsum("nr,nrs,nrt->rst", e0, m, m) + torch.einsum("nr,nrst->rst", e0, C)
            Zc[:, :S, S] = torch.einsum("nr,nrs->rs", e0, m)
            Zc[:, S, :S] = Zc[:, :S, S]
            Zc[:, S, S] = e0.sum(0)
            Xc = xc.new_zeros(R, xc.shape[1], S + 1)
            Xc[:, :, :S] = torch.einsum("nr,nd,nrs->rds", e0, xc, m)
            Xc[:, :, S] = e0.T @ xc
            qc = e0.T @ xc.square()
            Z, X, q = (Zc, Xc, qc) if Z is None else (Z + Zc, X + Xc, q + qc)
            logliks.append(lp)
    return EStepStats(Z=Z, X=X, q=q, loglik=torch.cat(logliks), patterns=patterns, num_data=int(flat.shape[0]))
