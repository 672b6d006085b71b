"""The truncated-CG layer solve of the last hidden layer multiplies by K through one shared factor
(Φ_ω = diag(slopes_ω) W_Lᵀ Λ^{1/2}); it must solve the same damped system as the explicit Kronecker sum."""
import torch
from torch import nn

from pyro_cpa.distributions import CPAMarginal
from pyro_cpa.infer import mstep
from pyro_cpa.infer.estep import e_step
from pyro_cpa.nn import as_cpa_network, mlp

LAM = 1e-1          # a strong damping: A = K̃ + λI is well conditioned, so CG reaches CG_RTOL in few iterations
SOLVE_RTOL = 1e-8   # CG stops at ‖residual‖ <= CG_RTOL ‖r̃‖ = 1e-12 ‖r̃‖, cond(A) <= a·b/λ = 350 here: error <= ~4e-10


def _layer(widths, l):
    gen = mlp(widths, lambda: nn.LeakyReLU(0.1), seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        x = CPAMarginal(gen, 0.3).sample((60,))
    dec = mlp(widths, lambda: nn.LeakyReLU(0.1), seed=1)
    net = as_cpa_network(dec)
    st = e_step(CPAMarginal(dec, 0.5, 1.0), x)
    maps = [(W.detach().clone(), v.detach().clone()) for W, v in net.affine_maps()]
    obs_var = torch.full((widths[-1],), 0.3, dtype=torch.float64)
    Pt, F, FL, B, Wt_old, lam_x, slopes = mstep._hidden_normal_equations(maps, l, net, st, obs_var)
    Phi, Psi, d = mstep._layer_factors(Pt, F, lam_x, st)
    return maps, Phi, Psi, d, B, Wt_old, lam_x, slopes


def test_shared_factor_cg_solves_the_explicit_damped_system():
    widths = [1, 6, 5, 3]
    l = len(widths) - 3   # the last hidden layer
    maps, Phi, Psi, d, B, Wt_old, lam_x, slopes = _layer(widths, l)
    R, a = Phi.shape[:2]
    shared = (slopes[l].expand(R, a), maps[-1][0].T * lam_x.sqrt())
    assert torch.allclose(shared[0].unsqueeze(-1) * shared[1], Phi, rtol=1e-14, atol=0)   # the factorisation
    # reference: K = Σ_ω (Φ_ωΦ_ωᵀ) ⊗ (Ψ_ωΨ_ωᵀ) assembled densely (row-major vec), Jacobi-scaled, solved by LAPACK
    K = sum(torch.kron(P @ P.T, S @ S.T) for P, S in zip(Phi, Psi))
    s = mstep._jacobi_scale(torch.diagonal(K)).unsqueeze(-1)
    r = s * (B.reshape(-1, 1) - K @ Wt_old.reshape(-1, 1))
    y = torch.linalg.solve(s * K * s.T + LAM * torch.eye(K.shape[0], dtype=K.dtype), r)
    ref = Wt_old + (s * y).reshape(Wt_old.shape)
    for sh in (None, shared):
        w = mstep._cg_prox_solve_kron(Phi, Psi, d, B, Wt_old, LAM, 1000, 0.0, shared=sh)
        assert float((w - ref).abs().max()) <= SOLVE_RTOL * float((ref - Wt_old).abs().max())


def test_update_layer_takes_the_shared_factor_for_the_last_hidden_layer_only(monkeypatch):
    seen = []
    real = mstep._cg_prox_solve_kron

    def spy(*args, shared=None):
        seen.append(shared is not None)
        return real(*args, shared=shared)

    monkeypatch.setattr(mstep, "_cg_prox_solve_kron", spy)
    widths = [1, 6, 5, 3]
    maps, *_ = _layer(widths, 0)
    gen = mlp(widths, lambda: nn.LeakyReLU(0.1), seed=1)
    net = as_cpa_network(gen)
    torch.manual_seed(0)
    with torch.no_grad():
        x = CPAMarginal(mlp(widths, lambda: nn.LeakyReLU(0.1), seed=0), 0.3).sample((60,))
    st = e_step(CPAMarginal(gen, 0.5, 1.0), x)
    for l in range(len(maps) - 1):
        mstep.update_layer(maps, l, net, st, torch.full((3,), 0.3, dtype=torch.float64), solver="cg")
    assert seen == [False, True]
