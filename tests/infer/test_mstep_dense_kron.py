"""The dense Kronecker solve of a hidden layer (mstep._damped_prox_solve_dense_kron, issue 12): K̃ + λI assembled
once from the factors K = Σ_ω G_ω ⊗ M_ω, Cholesky, products with K through the factors. Checked against an
independent reference: K summed term by term with einsum, its Jacobi-scaled eigendecomposition (torch.linalg.eigh)
and the documented filter f(e) = e (e + 3λ)/(e + λ)³ applied to the eigenvalues."""
import pytest
import torch

from pyro_cpa.errors import PyroCPAError
from pyro_cpa.infer import mstep

EPS = torch.finfo(torch.float64).eps
LAM = mstep.DEFAULT_RCOND
#: Directions of scaled curvature e >= STRONG·λ: both algorithms give r̃_e f(e) with f's relative slope <= 1/e there,
#: so rounding of K̃ (~n·ε, |K̃_ij| <= 1) moves these components by <~ n·ε/(STRONG·λ) relative: 64·ε/1e-2 ≈ 1.4e-12;
#: STRONG_RTOL leaves a 1e3 margin.
STRONG = 1e4
STRONG_RTOL = 1e-9
#: Q gains agree to Q's evaluation rounding plus the weakly determined directions' rounding response (their
#: curvature times the ~ε/λ moves of the conditioning bound): far below 1e-10 relative.
Q_RTOL = 1e-10


def _factors(R, a, b, rank_g, rank_m, seed=0, dead_row=None, dead_col=None, factored=False):
    """G_ω = F_ω Λ F_ωᵀ (as (R, a, a), or as mstep.FactoredG(Fᵀ, ΛFᵀ) with ``factored``), M_ω = P_ω P_ωᵀ."""
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(R, a, rank_g, generator=g, dtype=torch.float64)
    P = torch.randn(R, b, rank_m, generator=g, dtype=torch.float64)
    lam = torch.rand(rank_g, generator=g, dtype=torch.float64) + 0.5
    if dead_row is not None:
        F[:, dead_row] = 0.0
    if dead_col is not None:
        P[:, dead_col] = 0.0
    G, M = (F * lam) @ F.mT, P @ P.mT
    G_arg = mstep.FactoredG(F.mT, (F * lam).mT) if factored else 0.5 * (G + G.mT)
    return 0.5 * (G + G.mT), 0.5 * (M + M.mT), g, G_arg


def _reference(G, M, B, w_old, lam):
    a, b = G.shape[1], M.shape[1]
    K = torch.einsum("rik,rlj->ijkl", G, M).reshape(a * b, a * b)   # K[(i,j),(k,l)] = Σ_ω G[i,k] M[l,j]
    K = 0.5 * (K + K.T)
    d = K.diagonal()
    s = (d + EPS * d.mean() + torch.finfo(d.dtype).tiny).rsqrt()
    r = s * (B.reshape(-1) - K @ w_old.reshape(-1))
    e, V = torch.linalg.eigh(s[:, None] * K * s[None, :])
    e = e.clamp_min(0.0)
    f = e * (e + 3 * lam) / (e + lam) ** 3
    return (w_old.reshape(-1) + s * (V @ (f * (V.T @ r)))).reshape(a, b), s, V, e


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("R,a,b,rank_g,rank_m", [(7, 6, 5, 3, 2), (4, 9, 4, 2, 2), (12, 5, 8, 4, 3),
                                                 (30, 40, 3, 2, 3)])
def test_dense_kron_solve_matches_the_eigen_reference(R, a, b, rank_g, rank_m, factored):
    G, M, g, G_arg = _factors(R, a, b, rank_g, rank_m, dead_row=1, dead_col=2, factored=factored)
    # as in the M-step, B = Σ_ω G_ω Y M_ω lies in K's range (zero rows / columns at dead units / inputs)
    B = torch.einsum("rik,kl,rlj->ij", G, torch.randn(a, b, generator=g, dtype=torch.float64), M)
    w_old = torch.randn(a, b, generator=g, dtype=torch.float64)
    w = mstep._damped_prox_solve_dense_kron(G_arg, M, B, w_old, LAM)
    ref, s, V, e = _reference(G, M, B, w_old, LAM)
    # well-determined directions: the same maximiser (scaled units, eigenvectors of the reference's K̃)
    strong = e >= STRONG * LAM
    assert int(strong.sum()) > 0
    cw = V[:, strong].T @ ((w - w_old).reshape(-1) / s)
    cr = V[:, strong].T @ ((ref - w_old).reshape(-1) / s)
    assert float(((cw - cr).abs() / (1 + cr.abs())).max()) < STRONG_RTOL
    # dead coordinates keep their old values bit for bit
    assert torch.equal(w[1], w_old[1]) and torch.equal(w[:, 2], w_old[:, 2])
    # Q(w) - Q(w_old) = r^T Δ - ½ Δ^T K Δ (r = B - K w_old): positive and equal to the reference's gain
    K = torch.einsum("rik,rlj->ijkl", G, M).reshape(a * b, a * b)
    r = B.reshape(-1) - K @ w_old.reshape(-1)

    def gain(v):
        dlt = (v - w_old).reshape(-1)
        return float(r @ dlt - 0.5 * dlt @ K @ dlt)

    g_w, g_ref = gain(w), gain(ref)
    assert g_ref > 0 and abs(g_w - g_ref) <= Q_RTOL * g_ref


def test_dense_kron_solve_reports_overflow():
    G, M, g, _ = _factors(5, 4, 3, 2, 2)
    G[2, 1, 1] = float("nan")
    B = torch.randn(4, 3, generator=g, dtype=torch.float64)
    with pytest.raises(PyroCPAError, match="rescale the data or the decoder"):
        mstep._damped_prox_solve_dense_kron(G, M, B, torch.zeros(4, 3, dtype=torch.float64), LAM)
