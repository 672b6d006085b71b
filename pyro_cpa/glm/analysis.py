r"""Closed-form analysis of β-VAEs with EDF observations (Proposition 1, eqs. 12–21 of Sicks et al.).

Expanding the EDF log-density to second order in the natural parameter at ϑ = 0 (assumption
0 ∈ Θ; Table 2 gives F(0), F′(0), F″(0)) turns it into a Gaussian in ϑ,

    Σ_j log p(x_j | ϑ_j) ≈ log N(y; ϑ, s² I) + c(x),    y = (x − F′(0)) / F″(0),    s² = φ / F″(0),

    c(x) = ‖y‖² / (2 s²) − d F(0) / φ + Σ_j K(x_j, φ) + (d/2) log(2π s²).

For an affine natural parameter ϑ(z) = W z + b (W ∈ ℝ^{d×κ}) the β-VAE objective
E_q[log p(x|z)] − β KL(q ‖ N(0, I)) with this expansion is maximised over q = N(μ, Σ) by

    Σ̂ = (I + WᵀW / (β s²))⁻¹ = β s² M⁻¹,   μ̂ = M⁻¹ Wᵀ (y − b),   M := β s² I_κ + WᵀW      (eqs. 5–6, 19–20)

and its value is, with C := s² I_d + β⁻¹ W Wᵀ (eq. 14, the pPCA form of eq. 12),

    L̂_i = −½ (y_i − b)ᵀ C⁻¹ (y_i − b) − (β/2) log|C| + (βd/2) log s² + ‖y_i‖²/(2 s²) − d F(0)/φ + Σ_j K(x_ij, φ)
        = β log N(y_i; b, β C) + (βd/2) log(2πβ s²) − (d/2) log(2π s²) + c(x_i).

Evaluated through the κ×κ matrix M (Woodbury): (y−b)ᵀC⁻¹(y−b) = (‖r‖² − rᵀW M⁻¹ Wᵀ r)/s² and
log|C| = d log s² + log|M| − κ log(β s²).

Exactness (Corollary 1): Gaussian family — L̂ *is* the β-VAE objective at the optimal full-covariance
q; at β = 1 it is the exact pPCA log-likelihood log N(x; b, WWᵀ + σ² I). Bernoulli / Binomial —
F(ϑ) ≤ F(0) + F′(0)ϑ + ½F″(0)ϑ² for all ϑ (F″ is maximal at 0), so L̂ ≤ ELBO ≤ log p(x) for *every*
W, b. Poisson — an approximation with no sign.

Maximum likelihood (eqs. 15–18; Tipping & Bishop): with Ŝ the (1/N) sample covariance of y,
eigenvalues λ_1 ≥ … ≥ λ_d and eigenvectors U, and the *cut-off* τ = β s² = β F″(0)⁻¹ φ:

    b̂ = ȳ,   Ŵ = U_κ (K_κ − τ I)^{1/2} R,   k_j = max(λ_j, τ)  (dimensions with λ_j ≤ τ are pruned),

and for the Gaussian family with learned σ², σ̂² = Σ_{j > κ′} λ_j / (d − β κ′) where κ′ is the number
of unpruned dimensions (eq. 18 is the case κ′ = κ; κ′ is found self-consistently here). The analytic
activity of latent unit j (Burda et al.'s A_zj = Cov_x(E_q[z_j]), eq. 21) is
(k_j − τ) λ_j / k_j² = max(λ_j − τ, 0) / λ_j.

All computations are float64 torch and batched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import PyroCPAError
from .families import EDFamily, Gaussian, get_family

__all__ = [
    "ACTIVITY_THRESHOLD", "pseudo_observations", "pseudo_variance", "approximate_objective",
    "approximate_objective_cpa", "optimal_variational", "GLMMLE", "mle", "analytic_activity",
    "predicted_active_units", "measured_activity",
]

#: Burda et al.'s threshold: latent unit j is active if A_zj = Cov_x(E_q[z_j]) > 0.01.
ACTIVITY_THRESHOLD = 0.01

_DT = torch.float64


def _check_family(family) -> EDFamily:
    fam = get_family(family)
    fam.taylor_at_zero()  # raises for families without an expansion at 0
    return fam


def _as_data(x, name="x") -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise PyroCPAError(f"{name} must be a (N, d) matrix of observations; got shape {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise PyroCPAError(f"{name} is empty")
    if not bool(torch.isfinite(x).all()):
        raise PyroCPAError(f"{name} contains NaN or infinite entries")
    return x.to(_DT)


def _dispersion(family: EDFamily, dispersion) -> torch.Tensor:
    phi = family.dispersion if dispersion is None else torch.as_tensor(dispersion)
    phi = phi.to(_DT)
    if phi.dim() != 0 or not bool(phi > 0) or not bool(torch.isfinite(phi)):
        raise PyroCPAError(f"dispersion φ must be a positive finite scalar; got {phi}")
    return phi


def _check_beta(beta) -> float:
    b = float(beta)
    if not math.isfinite(b) or b <= 0:
        raise PyroCPAError(f"beta must be finite and > 0; got {beta}")
    return b


def pseudo_observations(x: torch.Tensor, family) -> torch.Tensor:
    """y = F″(0)⁻¹ (x − F′(0)): the observations on the natural-parameter scale (eq. 15)."""
    fam = _check_family(family)
    _, F1, F2 = fam.taylor_at_zero()
    return (torch.as_tensor(x).to(_DT) - F1) / F2


def pseudo_variance(family, dispersion=None) -> torch.Tensor:
    """s² = φ / F″(0), the noise variance of the Gaussian the expansion produces (β s² is the cut-off)."""
    fam = _check_family(family)
    return _dispersion(fam, dispersion) / fam.taylor_at_zero()[2]


def _objective_terms(y, Wm, bm, s2, beta):
    """Per-datum −½ qf − (β/2) log|M| + (βκ/2) log(β s²), with W, b batched or shared."""
    kappa = Wm.shape[-1]
    r = y - bm
    M = beta * s2 * torch.eye(kappa, dtype=_DT) + Wm.transpose(-1, -2) @ Wm
    L = torch.linalg.cholesky(M)
    Wr = (r.unsqueeze(-2) @ Wm).squeeze(-2)  # (N, κ)
    u = torch.linalg.solve_triangular(L, Wr.unsqueeze(-1), upper=False).squeeze(-1)
    qf = ((r ** 2).sum(-1) - (u ** 2).sum(-1)) / s2
    logdetM = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * qf - 0.5 * beta * logdetM + 0.5 * beta * kappa * torch.log(beta * s2)


def _data_constant(x, y, fam: EDFamily, phi, s2):
    F0, _, _ = fam.taylor_at_zero()
    d = x.shape[-1]
    K = fam.with_dispersion(phi).base_measure(x).to(_DT).sum(-1)
    return (y ** 2).sum(-1) / (2 * s2) - d * F0 / phi + K


def approximate_objective(x, W, b, family, beta: float = 1.0, dispersion=None,
                          per_datum: bool = False) -> torch.Tensor:
    r"""L̂(W, b) of eq. (14): the β-VAE objective with the EDF expanded at ϑ = 0, maximised over q.

    Args:
        x: (N, d) observations.
        W: (d, κ) and b: (d,) — the natural parameter ϑ(z) = W z + b (for a linearly canonical
            activation F′(ρη) pass ρ·W, ρ·b).
        family: an :class:`~pyro_cpa.glm.families.EDFamily` with 0 ∈ Θ (not Gamma).
        beta: β > 0.
        dispersion: φ overriding the family's (may be a tensor requiring grad).
        per_datum: return the (N,) per-datum values instead of their mean.

    Differentiable in W, b and ``dispersion``. See the module docstring for the formula.
    """
    fam = _check_family(family)
    beta = _check_beta(beta)
    x = _as_data(x)
    W = torch.as_tensor(W).to(_DT)
    b = torch.as_tensor(b).to(_DT)
    d = x.shape[1]
    if W.dim() != 2 or W.shape[0] != d or b.shape != (d,):
        raise PyroCPAError(f"W must be (d={d}, κ) and b (d,); got {tuple(W.shape)} and {tuple(b.shape)}")
    phi = _dispersion(fam, dispersion)
    s2 = phi / fam.taylor_at_zero()[2]
    y = pseudo_observations(x, fam)
    val = _objective_terms(y, W, b, s2, beta) + _data_constant(x, y, fam, phi, s2)
    return val if per_datum else val.mean()


def _local_affine(decoder, z0: torch.Tensor):
    """Per-point Jacobian A_i = ∂ϑ/∂z(z0_i) and offset b_i = ϑ(z0_i) − A_i z0_i of a CPA natural parameter."""
    from torch.func import jacrev, vmap

    fn = decoder.natural_parameter if hasattr(decoder, "natural_parameter") else decoder

    def single(z):
        return fn(z.unsqueeze(0)).squeeze(0)

    A = vmap(jacrev(single))(z0)
    with torch.no_grad():
        th = fn(z0)
    return A, th - (A @ z0.unsqueeze(-1)).squeeze(-1)


def approximate_objective_cpa(x, decoder, z0, family=None, beta: float = 1.0, dispersion=None,
                              per_datum: bool = False) -> torch.Tensor:
    r"""L̂ of eq. (12) for a CPA natural parameter ϑ(z): per datum i the expansion uses the affine piece
    ϑ(z) = A_i z + b_i of the linear region containing the expansion point z0_i (J_ϑ(z0_i) = A_i and,
    for z0_i ∈ ker ϑ, J_ϑ z0_i = −b_i, which is how the term F″(0)⁻¹(x − F′(0)) + J_ϑ z0 of eq. 12 reads).

    Args:
        decoder: a :class:`~pyro_cpa.glm.decoder.GLMDecoder` (its family and ρ are used) or a CPA net.
        z0: (N, S) expansion points, one per datum.
    """
    fam = getattr(decoder, "family", None) if family is None else family
    if fam is None:
        raise PyroCPAError("pass family= when decoder is a plain network")
    fam = _check_family(fam)
    beta = _check_beta(beta)
    x = _as_data(x)
    z0 = torch.as_tensor(z0).to(_DT)
    if z0.dim() != 2 or z0.shape[0] != x.shape[0]:
        raise PyroCPAError(f"z0 must be (N={x.shape[0]}, S); got {tuple(z0.shape)}")
    A, bb = _local_affine(decoder, z0)
    A, bb = A.to(_DT), bb.to(_DT)
    phi = _dispersion(fam, dispersion)
    s2 = phi / fam.taylor_at_zero()[2]
    y = pseudo_observations(x, fam)
    val = _objective_terms(y, A, bb, s2, beta) + _data_constant(x, y, fam, phi, s2)
    return val if per_datum else val.mean()


def optimal_variational(x, W, b, family, beta: float = 1.0, dispersion=None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The maximisers of L̂ over q = N(μ_i, Σ) for given W, b (eqs. 5–6 in affine form):

        Σ̂ = β s² (β s² I + WᵀW)⁻¹,    μ̂_i = (β s² I + WᵀW)⁻¹ Wᵀ (y_i − b).

    Returns (μ̂ (N, κ), Σ̂ (κ, κ)).
    """
    fam = _check_family(family)
    beta = _check_beta(beta)
    x = _as_data(x)
    W, b = torch.as_tensor(W).to(_DT), torch.as_tensor(b).to(_DT)
    s2 = pseudo_variance(fam, dispersion)
    y = pseudo_observations(x, fam)
    M = beta * s2 * torch.eye(W.shape[1], dtype=_DT) + W.T @ W
    mu = torch.linalg.solve(M, W.T @ (y - b).T).T
    return mu, beta * s2 * torch.linalg.inv(M)


@dataclass
class GLMMLE:
    r"""The closed-form maximiser of L̂ (eqs. 15–21), with R = I (diagonal Σ̂z).

    Attributes:
        b: b̂ (d,), the sample mean of y (eq. 15).
        W: Ŵ = U_κ L (d, κ), natural-parameter scale (eq. 16).
        eigenvalues: all d eigenvalues λ of Ŝ, descending; eigenvectors: U_κ (d, κ).
        k: k_j = max(λ_j, τ) (κ,) (eq. 17); cutoff: τ = β F″(0)⁻¹ φ.
        dispersion: φ used (σ̂² for a Gaussian with ``dispersion="mle"``, eq. 18).
        Sigma_z: Σ̂z = τ K⁻¹ (κ, κ) diagonal (eq. 19).
        encoder_weight, encoder_bias: μ̂z(x) = encoder_weight @ x + encoder_bias (eq. 20, Appendix B.3):
            encoder_weight = K⁻¹ L U_κᵀ / F″(0) = Σ̂z Ŵᵀ / (β φ), encoder_bias = −encoder_weight x̄.
        activity: analytic A_zj (κ,) (eq. 21); active: A_zj > threshold; n_active.
        objective: L̂ at the maximiser (eq. 14).
        beta, family.
    """

    b: torch.Tensor
    W: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    k: torch.Tensor
    cutoff: torch.Tensor
    dispersion: torch.Tensor
    Sigma_z: torch.Tensor
    encoder_weight: torch.Tensor
    encoder_bias: torch.Tensor
    activity: torch.Tensor
    active: torch.Tensor
    n_active: int
    objective: torch.Tensor
    beta: float
    family: EDFamily

    def encode(self, x) -> torch.Tensor:
        """μ̂z(x) (eq. 20) for observations x (N, d)."""
        return torch.as_tensor(x).to(_DT) @ self.encoder_weight.T + self.encoder_bias


def _eig_desc(S):
    lam, U = torch.linalg.eigh(S)
    lam, U = lam.flip(0), U.flip(1)
    return lam.clamp(min=0.0), U


def _gaussian_sigma2(lam, d, kappa, beta):
    """Candidate σ² of eq. (18) for every number κ′ of unpruned dimensions (self-consistency is checked later)."""
    out = []
    for kp in range(kappa + 1):
        denom = d - beta * kp
        tail = lam[kp:].sum()
        if denom > 0 and tail > 0:
            out.append(tail / denom)
    return out


def mle(x, family, kappa: int, beta: float = 1.0, dispersion=None, threshold: float = ACTIVITY_THRESHOLD) -> GLMMLE:
    r"""Closed-form b̂, Ŵ, (σ̂²), Σ̂z, μ̂z and analytic activities maximising L̂ (eqs. 15–21).

    Args:
        x: (N, d) data; family: an EDF with 0 ∈ Θ; kappa: latent dimension κ <= d; beta: β > 0.
        dispersion: ``None`` (the family's φ), a positive number, or ``"mle"`` (Gaussian family only:
            σ̂², eq. 18, with the number of unpruned dimensions determined self-consistently — the
            candidate with the largest L̂ is returned).
        threshold: activity threshold for ``active`` (Burda et al.: 0.01).

    Raises:
        PyroCPAError: bad κ or β, a family without an expansion at 0, ``"mle"`` for a non-Gaussian family,
            or a Gaussian σ̂² that does not exist (β ≥ d/κ with rank(Ŝ) <= κ, or data of rank <= κ).
    """
    fam = _check_family(family)
    beta = _check_beta(beta)
    x = _as_data(x)
    N, d = x.shape
    if isinstance(kappa, bool) or int(kappa) != kappa or not 1 <= int(kappa) <= d:
        raise PyroCPAError(f"kappa must be an integer in [1, d={d}]; got {kappa!r}")
    kappa = int(kappa)
    _, _, F2 = fam.taylor_at_zero()
    y = pseudo_observations(x, fam)
    ybar = y.mean(0)
    yc = y - ybar
    lam, U = _eig_desc(yc.T @ yc / N)
    if isinstance(dispersion, str):
        if dispersion != "mle":
            raise PyroCPAError(f"dispersion must be None, a number or 'mle'; got {dispersion!r}")
        if not isinstance(fam, Gaussian):
            raise PyroCPAError(f"dispersion='mle' is only defined for the Gaussian family (eq. 18); the {fam.name} "
                               "family has a fixed dispersion")
        rank = int((lam > 1e-12 * lam[0].clamp(min=1e-300)).sum())
        if rank <= kappa and beta * rank < d:
            raise PyroCPAError(f"L̂ is unbounded in σ²: the data have rank {rank} <= κ={kappa} and β·rank < d={d}, so "
                               "σ² → 0 drives L̂ to +∞ (no σ̂² exists); reduce κ or add noise")
        candidates = _gaussian_sigma2(lam, d, kappa, beta)
        if not candidates:
            raise PyroCPAError(f"no positive σ̂² exists for β={beta}, κ={kappa}, d={d}: need d − βκ′ > 0 and "
                               "positive residual variance (eq. 18)")
        best = None
        for s2c in candidates:
            res = mle(x, fam.with_dispersion(s2c), kappa, beta, None, threshold)
            if best is None or res.objective > best.objective:
                best = res
        return best
    phi = _dispersion(fam, dispersion)
    fam = fam.with_dispersion(phi) if isinstance(fam, Gaussian) else fam
    tau = beta * phi / F2
    lam_k, U_k = lam[:kappa], U[:, :kappa]
    k = torch.maximum(lam_k, tau)
    Lw = torch.sqrt((k - tau).clamp(min=0.0))
    W = U_k * Lw
    Sigma_z = torch.diag(tau / k)
    enc_W = (Lw / k).unsqueeze(1) * U_k.T / F2
    xbar = x.mean(0)
    enc_b = -enc_W @ xbar
    act = torch.where(lam_k > tau, (lam_k - tau) / torch.where(lam_k > 0, lam_k, torch.ones_like(lam_k)),
                      torch.zeros_like(lam_k))
    active = act > threshold
    obj = approximate_objective(x, W, ybar, fam, beta, phi)
    return GLMMLE(b=ybar, W=W, eigenvalues=lam, eigenvectors=U_k, k=k, cutoff=tau, dispersion=phi,
                  Sigma_z=Sigma_z, encoder_weight=enc_W, encoder_bias=enc_b, activity=act, active=active,
                  n_active=int(active.sum()), objective=obj, beta=beta, family=fam)


def analytic_activity(x, family, kappa: int, beta: float = 1.0, dispersion=None) -> torch.Tensor:
    r"""A_zj ≈ max(λ_j − τ, 0)/λ_j, τ = β F″(0)⁻¹ φ (eq. 21), for the κ leading eigen-directions."""
    return mle(x, family, kappa, beta, dispersion).activity


def predicted_active_units(x, family, kappa: int, beta: float = 1.0, dispersion=None,
                           threshold: float = ACTIVITY_THRESHOLD) -> int:
    """Number of latent units with analytic activity A_zj > ``threshold`` (eq. 21)."""
    return int((analytic_activity(x, family, kappa, beta, dispersion) > threshold).sum())


def measured_activity(means: torch.Tensor) -> torch.Tensor:
    """Burda et al.'s A_zj = Cov_x(E_q[z_j]): the (1/N) variance over data of the encoder means (N, κ)."""
    means = torch.as_tensor(means).to(_DT)
    if means.dim() != 2:
        raise PyroCPAError(f"means must be (N, κ); got {tuple(means.shape)}")
    return means.var(0, unbiased=False)
