"""The wide-layer M-step's cheaper forms (issue 12, "Wide layers"): the CG products through groups of regions that
share a layer's input map (mstep.GroupedInputs) against an independent dense Σ_ω (Φ_ωΦ_ωᵀ) ⊗ (M_ω) built from the
E-step moments, the frozen region maps pushed by one product per layer (and reused from the first changed layer)
against the geometry module's maps, and joint EM with them on a wide decoder: monotone, NLLs exact."""
import torch
from torch import nn

from pyro_cpa.distributions import CPAMarginal
from pyro_cpa.geometry.maps import region_maps_from_affine
from pyro_cpa.infer import mstep
from pyro_cpa.infer.em_engine import run_em
from pyro_cpa.infer.estep import e_step
from pyro_cpa.nn import as_cpa_network, mlp

#: One product K vec Y vs the dense Kronecker sum: both round at ~ε·Σ_ω |terms|; the factors here are O(1).
PRODUCT_RTOL = 1e-12
#: A strong damping: A = K̃ + λI is well conditioned (cond <= a·b/λ ~ 10³ here), so CG reaches CG_RTOL = 1e-12 in
#: few iterations and the solve error is <= ~1e-9 relative.
LAM = 1e-1
SOLVE_RTOL = 1e-8
#: frozen maps (one product per layer) vs the geometry module's per-region products: rounding of a few layers.
MAPS_RTOL = 1e-12
#: A returned NLL vs a fresh exact evaluation (rounding of N terms).
NLL_RTOL = 1e-10


def _setup(widths, N=80, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        x = CPAMarginal(mlp(widths, lambda: nn.LeakyReLU(0.1), seed=0), 0.3).sample((N,))
    dec = mlp(widths, lambda: nn.LeakyReLU(0.1), seed=1)
    net = as_cpa_network(dec)
    st = e_step(CPAMarginal(dec, 0.5, 1.0), x)
    maps = [(W.detach().clone(), v.detach().clone()) for W, v in net.affine_maps()]
    obs_var = torch.linspace(0.2, 0.4, widths[-1], dtype=torch.float64)
    return net, st, maps, obs_var


def _dense_K(maps, l, net, st, obs_var):
    """K[(i,j),(k,m)] = Σ_ω (F_ωᵀΛF_ω)[i,k] (P̃_ω Z_ω P̃_ωᵀ)[j,m] from the E-step moments Z_ω and the region maps of
    the geometry module (F_ω by explicit products of the frozen slopes, P̃_ω = [[P_ω, p_ω], [0, 1]])."""
    rm = region_maps_from_affine(maps, net.activations, st.patterns)
    R = st.Z.shape[0]
    P, p = rm.layer_inputs[l]
    n_in, S = P.shape[1], P.shape[2]
    Pt = torch.zeros(R, n_in + 1, S + 1, dtype=torch.float64)
    Pt[:, :n_in, :S] = P
    Pt[:, :n_in, S] = p
    Pt[:, n_in, S] = 1.0
    K = 0.0
    for w in range(R):
        F = torch.eye(maps[-1][0].shape[0], dtype=torch.float64)
        for k in range(len(maps) - 1, l, -1):
            F = F @ maps[k][0] @ torch.diag(rm.slopes[k - 1][w])
        G = F.T @ torch.diag(obs_var.reciprocal()) @ F
        M = Pt[w] @ st.Z[w] @ Pt[w].T
        K = K + torch.kron(G, M)
    return K


def _factors(maps, l, net, st, obs_var, grouped=True):
    Pt, F, FL, B, Wt_old, lam_x, slopes = mstep._hidden_normal_equations(maps, l, net, st, obs_var)
    R, a = F.shape[0], F.shape[-1]
    groups = mstep._input_groups(st.patterns, l, R, Pt.device)
    Phi, Psi, d = mstep._layer_factors(Pt, F, lam_x, st, groups if grouped else None)
    shared = (slopes[l].expand(R, a), maps[-1][0].T * lam_x.sqrt()) if l == len(maps) - 2 else None
    return Phi, Psi, d, B, Wt_old, shared, groups


def test_grouped_product_equals_the_dense_kronecker_sum():
    net, st, maps, obs_var = _setup([1, 6, 7, 5, 3])
    R = st.Z.shape[0]
    gen = torch.Generator().manual_seed(1)
    for l in (1, 2):   # a middle hidden layer (Φ_ω per region) and the last one (the shared factor)
        Phi, Psi, d, B, Wt_old, shared, groups = _factors(maps, l, net, st, obs_var)
        assert isinstance(Psi, mstep.GroupedInputs) and Psi.P.shape[0] < R   # regions do share input maps
        K = _dense_K(maps, l, net, st, obs_var)
        assert torch.allclose(torch.diagonal(K).reshape(d.shape), d, rtol=PRODUCT_RTOL, atol=0)
        for sh in (None, shared) if shared is not None else (None,):
            prod = mstep._kron_product(Phi, Psi, sh)
            for _ in range(3):
                Y = torch.randn(Wt_old.shape, generator=gen, dtype=torch.float64)
                ref = (K @ Y.reshape(-1)).reshape(Y.shape)
                assert float((prod(Y) - ref).abs().max()) <= PRODUCT_RTOL * float(ref.abs().max())


def test_grouped_cg_solves_the_explicit_damped_system():
    net, st, maps, obs_var = _setup([1, 6, 7, 5, 3])
    for l in (1, 2):
        Phi, Psi, d, B, Wt_old, shared, _ = _factors(maps, l, net, st, obs_var)
        K = _dense_K(maps, l, net, st, obs_var)
        s = mstep._jacobi_scale(torch.diagonal(K)).unsqueeze(-1)
        r = s * (B.reshape(-1, 1) - K @ Wt_old.reshape(-1, 1))
        y = torch.linalg.solve(s * K * s.T + LAM * torch.eye(K.shape[0], dtype=K.dtype), r)
        ref = Wt_old + (s * y).reshape(Wt_old.shape)
        w = mstep._cg_prox_solve_kron(Phi, Psi, d, B, Wt_old, LAM, 1000, 0.0, shared=shared)
        assert float((w - ref).abs().max()) <= SOLVE_RTOL * float((ref - Wt_old).abs().max())


def test_update_layer_groups_the_regions_by_their_patterns_before_the_layer(monkeypatch):
    seen = []
    real = mstep._cg_prox_solve_kron

    def spy(Phi, Psi, *args, **kwargs):
        seen.append(Psi.P.shape[0] if isinstance(Psi, mstep.GroupedInputs) else None)
        return real(Phi, Psi, *args, **kwargs)

    monkeypatch.setattr(mstep, "_cg_prox_solve_kron", spy)
    net, st, maps, obs_var = _setup([1, 6, 7, 5, 3])
    R = st.Z.shape[0]
    for l in range(len(maps) - 1):
        mstep.update_layer(maps, l, net, st, obs_var, solver="cg")
    # layer 0: one input map (h_0 = z) for all regions; layer l: one per distinct pattern of the layers before l
    distinct = [len({tuple(torch.cat([q[w].flatten() for q in st.patterns[:l]]).tolist()) for w in range(R)})
                for l in (1, 2)]
    assert seen == [1] + distinct and distinct[0] < R


def test_frozen_maps_equal_the_geometry_maps_and_reuse_gives_the_same_bits():
    net, st, maps, _ = _setup([2, 5, 4, 3], N=60)
    a = mstep.frozen_region_maps(maps, net.activations, st.patterns)
    b = region_maps_from_affine(maps, net.activations, st.patterns)
    for x, y in [(a.A, b.A), (a.b, b.b)] + list(zip(a.slopes, b.slopes)) + [
            t for (P, p), (P2, p2) in zip(a.layer_inputs, b.layer_inputs) for t in ((P, P2), (p, p2))]:
        assert torch.allclose(x, y, rtol=MAPS_RTOL, atol=MAPS_RTOL * float(y.abs().max()))
    for start in range(1, len(maps)):   # change the layers from `start` on: reuse the earlier ones
        new = [(W + 0.1 * (k >= start), v - 0.05 * (k >= start)) for k, (W, v) in enumerate(maps)]
        part = mstep.frozen_region_maps(new, net.activations, st.patterns, reuse=a, start=start)
        full = mstep.frozen_region_maps(new, net.activations, st.patterns)
        assert torch.equal(part.A, full.A) and torch.equal(part.b, full.b)
        for (P, p), (P2, p2) in zip(part.layer_inputs, full.layer_inputs):
            assert torch.equal(P, P2) and torch.equal(p, p2)


def test_joint_em_on_a_wide_decoder_is_monotone_and_its_nll_exact():
    widths = [1, 40, 40, 2]   # the CG layer solve (forced: ``auto`` takes it from R >= 256 regions) on grouped inputs
    torch.manual_seed(0)
    with torch.no_grad():
        x = CPAMarginal(mlp(widths, lambda: nn.LeakyReLU(0.1), seed=0), 0.3).sample((150,))
    dec = mlp(widths, lambda: nn.LeakyReLU(0.1), seed=1)
    sx, sz = torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    with torch.no_grad():
        nll0 = float(-CPAMarginal(dec, sx, sz).log_prob(x).sum())
    sx, sz, hist = run_em(dec, sx, sz, x, 4, schedule="joint", layer_solver="cg")
    for h in hist:
        assert h.nll_after <= h.nll_before + 1e-12 * max(1.0, abs(h.nll_before))
    assert hist[-1].nll_after < nll0 - 0.05 * abs(nll0)   # a real decrease, not rejected steps
    with torch.no_grad():
        fresh = float(-CPAMarginal(dec, sx, sz).log_prob(x).sum())
    assert abs(fresh - hist[-1].nll_after) <= NLL_RTOL * abs(fresh)
