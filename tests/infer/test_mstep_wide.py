"""The wide-layer M-step solve (issue 12): the Gram matrix of K̃'s Kronecker factor and the damped solve through
it, against independent references — the explicit factor, the autograd Hessian of Q with a dense direct solve
(torch.linalg.solve / lstsq) and the dense path."""
import math

import pytest
import torch
from torch import nn

from pyro_cpa.distributions import CPAMarginal
from pyro_cpa.infer import mstep
from pyro_cpa.infer.estep import e_step
from mstep_reference import layer_gradient_hessian
from pyro_cpa.infer.mstep import DEFAULT_RCOND, expected_complete_loglik, update_layer
from pyro_cpa.nn import as_cpa_network, mlp

EPS = torch.finfo(torch.float64).eps
#: Explicit vs structured Gram: a sum of b·(products of 4 factors) in another order, relative to max |C|.
GRAM_RTOL = 1e3 * EPS
#: Conditioning bound of one damped solve (as in test_estep_mstep): a relative perturbation δ ~ 4ε of the
#: statistics moves the weights by ≲ δ/rcond relative to 1 + |w|; with a 10× margin.
SOLVE_ROUNDING_BOUND = 10 * (4 * EPS) / DEFAULT_RCOND
#: Directions of scaled curvature e ≥ STRONG·λ are solved exactly up to the filter's 3(λ/e)² ≤ 3e-8.
STRONG = 1e4
STRONG_RTOL = 1e-7
#: Dense and factored solves agree on Q to its evaluation rounding (~1e-15 relative) plus the rounding of the
#: filter in the weakly determined directions, which moves Q by ~ε/λ · (their tiny curvature).
Q_RTOL = 1e-10
#: ... and on the weights to this (relative to 1 + |w|): the two algorithms round differently (the factored one
#: works on ŨᵀŨ, whose entries are not ≤ 1), and along directions of scaled curvature e ~ λ the filter's slope
#: is ~1/λ², so their difference there is far above the per-solve ulp response (SOLVE_ROUNDING_BOUND).
WEIGHTS_RTOL = 1e-4


def _circle3(N, seed=0, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(N, generator=g) * 2 * math.pi
    return torch.stack([t.cos(), t.sin(), 0.5 * (2 * t).sin()], -1) + noise * torch.randn(N, 3, generator=g)


def _setup(widths, N=150, seed=0, act=lambda: nn.LeakyReLU(0.1), sx=0.3):
    dec = mlp(widths, act, seed=seed)
    net = as_cpa_network(dec)
    x = _circle3(N, seed)[:, :widths[-1]]
    st = e_step(CPAMarginal(dec, sx, 1.0), x)
    maps = [(W.detach().clone(), v.detach().clone()) for W, v in net.affine_maps()]
    return net, st, maps, torch.full((widths[-1],), sx ** 2)


def _rel(a, b):
    return max(float(((x - y).abs() / (1 + x.abs())).max()) for x, y in zip(a, b))


@pytest.mark.parametrize("shape", [(7, 5, 3, 6, 2), (6, 4, 2, 9, 3)])
def test_kron_gram_equals_the_explicit_gram(shape, monkeypatch):
    """C = ŨᵀŨ with Ũ = [√T ∘ (φ ⊗ ψ)] formed explicitly; any block size of the row loop gives the same C."""
    R, a, D, b, k = shape
    g = torch.Generator().manual_seed(0)
    Phi = torch.randn(R, a, D, generator=g, dtype=torch.float64)
    Psi = torch.randn(R, b, k, generator=g, dtype=torch.float64)
    T = torch.rand(a, b, generator=g, dtype=torch.float64)
    U = torch.einsum("rid,rjt->ijrdt", Phi, Psi).reshape(a * b, R * D * k) * T.reshape(-1, 1).sqrt()
    ref = U.T @ U
    C = mstep._kron_gram(Phi, Psi, T)
    assert torch.equal(C, C.T)
    assert float((C - ref).abs().max()) <= GRAM_RTOL * float(ref.abs().max())
    monkeypatch.setattr(mstep, "KRON_GRAM_BLOCK", 1)  # one region per block of rows
    assert float((mstep._kron_gram(Phi, Psi, T) - ref).abs().max()) <= GRAM_RTOL * float(ref.abs().max())
    # the matvecs through the factors are Ũ's (unscaled: T = 1)
    U1 = torch.einsum("rid,rjt->ijrdt", Phi, Psi).reshape(a * b, R * D * k)
    Y = torch.randn(a, b, generator=g, dtype=torch.float64)
    v = torch.randn(R, D, k, generator=g, dtype=torch.float64)
    assert torch.allclose(mstep._kron_apply_t(Phi, Psi, Y).reshape(-1), U1.T @ Y.reshape(-1), atol=1e-13)
    assert torch.allclose(mstep._kron_apply(Phi, Psi, v).reshape(-1), U1 @ v.reshape(-1), atol=1e-13)


@pytest.mark.parametrize("widths", [(1, 3, 3, 2), (1, 7, 6, 3), (2, 5, 3)])
def test_factored_solve_matches_a_dense_direct_solve(widths):
    """Per hidden layer, from the autograd Hessian H and gradient g of −Q (independent of the M-step's assembly):
    the factored solve gives the documented damped step (dense eigh of the Jacobi-scaled H), agrees with a direct
    solve (torch.linalg.solve where H is nonsingular, else the minimum-norm torch.linalg.lstsq step) in every
    strongly determined direction, and gives away almost nothing of the maximum of Q."""
    net, st, maps, obs_var = _setup(widths)
    lam = DEFAULT_RCOND
    for l in range(len(maps) - 1):
        g, H, x0, neg_q = layer_gradient_hessian(maps, l, net, st, obs_var)   # solver's row order [W_i, v_i]
        Wf, vf = update_layer(maps, l, net, st, obs_var, solver="factored")
        wf = torch.cat([Wf, vf.unsqueeze(-1)], -1).reshape(-1)
        Wd, vd = update_layer(maps, l, net, st, obs_var, solver="dense")
        wd = torch.cat([Wd, vd.unsqueeze(-1)], -1).reshape(-1)
        sc = (torch.diagonal(H) + EPS * torch.diagonal(H).mean()).rsqrt()
        Hs = sc[:, None] * H * sc[None, :]
        e, V = torch.linalg.eigh(Hs)
        e = e.clamp_min(0.0)
        y_damped = V @ (e * (e + 3 * lam) / (e + lam) ** 3 * (V.T @ (sc * -g)))
        yf = (wf - x0) / sc
        scale = float(y_damped.abs().max())
        assert float((yf - y_damped).abs().max()) < 1e-7 * scale + 1e-9
        # direct solve of the scaled Newton system
        if float(e.min()) > STRONG * lam:
            y_direct = torch.linalg.solve(Hs, sc * -g)
        else:
            y_direct = torch.linalg.lstsq(Hs, (sc * -g).unsqueeze(-1), rcond=1e-13, driver="gelsd").solution[:, 0]
        strong = V[:, e >= STRONG * lam]
        pd = strong.T @ (yf - y_direct)
        assert float(pd.abs().max()) <= STRONG_RTOL * float((strong.T @ y_direct).abs().max()) + 1e-10
        q0, qf, qd, qdir = (float(neg_q(w)) for w in (x0, wf, wd, x0 + sc * y_direct))
        assert qf < q0 and qf >= qdir - 1e-11 * abs(q0) and qf - qdir < 1e-6 * abs(q0)
        assert abs(qf - qd) < Q_RTOL * abs(q0)  # the dense path's maximum


def test_factored_solve_rounding_response_dead_units_and_empty_regions():
    """Forced factored solve with a dead ReLU unit (K exactly singular) and an extra empty region: the dead unit's
    weights stay bit-for-bit, the empty region changes nothing beyond rounding, and ulp nudges of the statistics
    move the result by at most the conditioning bound; a layer dead everywhere keeps all its weights."""
    dec = mlp([1, 6, 5, 2], nn.ReLU, seed=6)
    with torch.no_grad():
        dec[2].weight[1] = 0.0
        dec[2].bias[1] = -1.0  # unit 1 of layer 1: dead everywhere
    net = as_cpa_network(dec)
    x = _circle3(60)[:, :2]
    st = e_step(CPAMarginal(dec, 0.5, 1.0), x)
    maps = [(W.detach().clone(), v.detach().clone()) for W, v in net.affine_maps()]
    obs_var = torch.full((2,), 0.25)
    base = [update_layer(maps, l, net, st, obs_var, solver="factored") for l in range(len(maps) - 1)]
    assert torch.equal(base[1][0][1], maps[1][0][1]) and torch.equal(base[1][1][1], maps[1][1][1])
    Z = torch.cat([st.Z, torch.zeros(1, 2, 2, dtype=st.Z.dtype)])
    X = torch.cat([st.X, torch.zeros(1, 2, 2, dtype=st.X.dtype)])
    q = torch.cat([st.q, torch.zeros(1, 2, dtype=st.q.dtype)])
    st_e = type(st)(Z, X, q, st.loglik, [torch.cat([p, p[:1]]) for p in st.patterns], st.num_data)
    for l in range(len(maps) - 1):
        assert _rel(base[l], update_layer(maps, l, net, st_e, obs_var, solver="factored")) < SOLVE_ROUNDING_BOUND
    g = torch.Generator().manual_seed(1)

    def f(a):
        return a * (1 + 4 * EPS * (2 * torch.rand(a.shape, generator=g, dtype=a.dtype) - 1))
    for _ in range(3):
        st2 = type(st)(f(st.Z), f(st.X), f(st.q), st.loglik, st.patterns, st.num_data)
        for l in range(len(maps) - 1):
            assert _rel(base[l], update_layer(maps, l, net, st2, obs_var, solver="factored")) < SOLVE_ROUNDING_BOUND
    dead = [(W.clone(), v.clone()) for W, v in maps]
    dead[2] = (torch.zeros_like(dead[2][0]), dead[2][1])  # nothing downstream of layer 1: F_ω = 0 everywhere
    W1, v1 = update_layer(dead, 1, net, st, obs_var, solver="factored")
    assert torch.equal(W1, dead[1][0]) and torch.equal(v1, dead[1][1])


def test_auto_picks_the_factored_solve_for_a_wide_layer(monkeypatch):
    """A [1, 48, 48, 2] hidden layer (2,352 unknowns, a few hundred factor columns) goes through the Gram of the
    factor, with the dense answer."""
    net, st, maps, obs_var = _setup((1, 48, 48, 2), N=200)
    calls = []
    monkeypatch.setattr(mstep, "_kron_gram", lambda *a: calls.append(1) or _kron_gram(*a))
    Wa, va = update_layer(maps, 1, net, st, obs_var)
    assert calls
    Wd, vd = update_layer(maps, 1, net, st, obs_var, solver="dense")
    assert _rel([Wa, va], [Wd, vd]) < WEIGHTS_RTOL
    q0, qa, qd = (float(expected_complete_loglik(maps[:1] + [w] + maps[2:], net, st.patterns, st, obs_var, 1.0))
                  for w in (maps[1], (Wa, va), (Wd, vd)))
    assert qa > q0 and abs(qa - qd) < Q_RTOL * abs(q0)


_kron_gram = mstep._kron_gram
