"""The opt-in truncated conjugate-gradient hidden-layer solve (``solver="cg"`` / ``layer_solver="cg"``, issue 12,
"Wide layers") against independent references: the autograd Hessian and gradient of −Q (converged CG is the
damped Newton step of a dense solve; truncated CG is the minimiser of the damped model over the explicit Krylov
space), Q never lowered, dead units kept bit-for-bit, thread-count independence, and EM with it: monotone, with
NLLs equal to fresh exact evaluations."""
import pytest
import torch
from torch import nn

from mstep_reference import layer_gradient_hessian
from pyro_cpa.datasets import noisy_circle
from pyro_cpa.demo.circle import make_decoder
from pyro_cpa.distributions import CPAMarginal
from pyro_cpa.errors import PyroCPAError
from pyro_cpa.infer.em_engine import em_step, run_em
from pyro_cpa.infer.estep import e_step
from pyro_cpa.infer.mstep import CG_GAIN_RTOL, CG_ITERS, DEFAULT_RCOND, expected_complete_loglik, update_layer
from pyro_cpa.nn import as_cpa_network, mlp

EPS = torch.finfo(torch.float64).eps
#: Converged CG vs a dense solve of the same damped system: CG stops at a relative residual CG_RTOL = 1e-12, so the
#: error is <= κ·1e-12 with κ = (e_max + λ)/λ <= ~1e4 here (λ = CONVERGED_LAMBDA, e_max <= n), plus rounding.
CONVERGED_LAMBDA = 1e-2
CONVERGED_RTOL = 1e-7
#: Truncated CG vs the Krylov-space minimiser computed from an orthonormal basis of [b, Ab, A²b] (QR): both round at
#: ~ε·κ(basis) with κ(basis) <= (e_max/λ_min of the basis)² — small for 3 vectors of these tiny systems.
KRYLOV_RTOL = 1e-6
#: Q of two CG iterates compared at Q's evaluation rounding (~1e-15 relative), with a margin.
Q_RTOL = 1e-12
#: 1 vs 2 vs 4 intra-op threads (as tests/test_invariance.py).
THREAD_RTOL = 1e-12
#: A returned NLL vs a fresh exact evaluation (rounding of N terms).
NLL_RTOL = 1e-10


def _setup(widths, N=120, seed=0, sx=0.3):
    dec = mlp(widths, lambda: nn.LeakyReLU(0.1), seed=seed)
    net = as_cpa_network(dec)
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(N, generator=g, dtype=torch.float64) * 6.283185307179586
    x = torch.stack([t.cos(), t.sin(), 0.5 * (2 * t).sin()], -1)[:, :widths[-1]]
    x = x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    st = e_step(CPAMarginal(dec, sx, 1.0), x)
    maps = [(W.detach().clone(), v.detach().clone()) for W, v in net.affine_maps()]
    return net, st, maps, torch.full((widths[-1],), sx ** 2)


def _hessian_system(maps, l, net, st, obs_var):
    """Jacobi-scaled Hessian Hs of −Q, scaled ascent direction b = s·(−∇(−Q)), scale s and start x0, all in the
    solver's row order [W_i, v_i] (autograd: independent of the M-step's assembly)."""
    g, H, w0, _ = layer_gradient_hessian(maps, l, net, st, obs_var)
    d = torch.diagonal(H)
    s = (d + EPS * d.mean()).rsqrt()
    return s[:, None] * H * s[None, :], s * -g, s, w0


def _flat(Wv):
    W, v = Wv
    return torch.cat([W, v.unsqueeze(-1)], -1).reshape(-1)


def _q(maps, l, Wv, net, st, obs_var):
    m = list(maps)
    m[l] = Wv
    return float(expected_complete_loglik(m, net, st.patterns, st, obs_var, 1.0))


@pytest.mark.parametrize("widths", [(1, 5, 4, 2), (1, 7, 6, 3), (2, 6, 3)])
def test_converged_cg_is_the_damped_newton_step_of_the_autograd_hessian(widths):
    """With enough iterations CG returns w0 + s (Hs + λI)⁻¹ b, the Tikhonov-damped Newton step (dense solve)."""
    net, st, maps, obs_var = _setup(widths)
    for l in range(len(maps) - 1):
        Hs, b, s, x0 = _hessian_system(maps, l, net, st, obs_var)
        y = torch.linalg.solve(Hs + CONVERGED_LAMBDA * torch.eye(len(b), dtype=b.dtype), b)
        w = _flat(update_layer(maps, l, net, st, obs_var, rcond=CONVERGED_LAMBDA, solver="cg", cg_iters=5000,
                               cg_gain_rtol=0.0))
        assert float(((w - x0) / s - y).abs().max()) < CONVERGED_RTOL * float(y.abs().max())


def test_truncated_cg_is_the_krylov_minimiser_and_never_lowers_q():
    """j iterations = argmin of ½yᵀAy − bᵀy over span{b, Ab, …, A^{j−1}b} (A = Hs + λI, λ = rcond); Q increases
    with j from Q(w0), and the default cap gives at least what 3 iterations give."""
    net, st, maps, obs_var = _setup((1, 7, 6, 3))
    for l in range(len(maps) - 1):
        Hs, b, s, x0 = _hessian_system(maps, l, net, st, obs_var)
        A = Hs + DEFAULT_RCOND * torch.eye(len(b), dtype=b.dtype)
        q_prev = _q(maps, l, maps[l], net, st, obs_var)
        for j in (1, 2, 3):
            basis = torch.stack([torch.linalg.matrix_power(A, i) @ b for i in range(j)], -1)
            Qb = torch.linalg.qr(basis).Q
            y_ref = Qb @ torch.linalg.solve(Qb.T @ A @ Qb, Qb.T @ b)
            Wv = update_layer(maps, l, net, st, obs_var, solver="cg", cg_iters=j, cg_gain_rtol=0.0)
            y = (_flat(Wv) - x0) / s
            assert float((y - y_ref).abs().max()) < KRYLOV_RTOL * float(y_ref.abs().max())
            q = _q(maps, l, Wv, net, st, obs_var)
            assert q > q_prev - Q_RTOL * abs(q_prev)
            q_prev = q
        q_cap = _q(maps, l, update_layer(maps, l, net, st, obs_var, solver="cg", cg_iters=CG_ITERS, cg_gain_rtol=0.0),
                   net, st, obs_var)
        assert q_cap >= q_prev - Q_RTOL * abs(q_prev)


def test_the_gain_rule_stops_at_the_first_iteration_that_adds_little():
    """With ``cg_gain_rtol`` = τ the solve returns the Krylov minimiser y_j of the first j whose decrease of
    φ(y) = ½yᵀAy − bᵀy, φ(y_{j−1}) − φ(y_j), is at most τ (φ(0) − φ(y_j)); the references are the explicit Krylov
    minimisers (as above), and τ is placed midway between consecutive ratios so that rounding cannot flip the
    decision. The default rule gives at least the Q of one iteration and at most that of running to the cap."""
    net, st, maps, obs_var = _setup((1, 7, 6, 3))
    for l in range(len(maps) - 1):
        Hs, b, s, x0 = _hessian_system(maps, l, net, st, obs_var)
        A = Hs + DEFAULT_RCOND * torch.eye(len(b), dtype=b.dtype)
        phi = [0.0]
        ys = []
        for j in (1, 2, 3):
            basis = torch.stack([torch.linalg.matrix_power(A, i) @ b for i in range(j)], -1)
            Qb = torch.linalg.qr(basis).Q
            y = Qb @ torch.linalg.solve(Qb.T @ A @ Qb, Qb.T @ b)
            ys.append(y)
            phi.append(float(0.5 * y @ A @ y - b @ y))
        ratio = [(phi[j - 1] - phi[j]) / (phi[0] - phi[j]) for j in (1, 2, 3)]   # ratio[0] = 1
        assert ratio[0] > ratio[1] > ratio[2] > 0
        for j in (2, 3):   # stop exactly at iteration j
            tau = 0.5 * (ratio[j - 1] + ratio[j - 2])
            Wv = update_layer(maps, l, net, st, obs_var, solver="cg", cg_gain_rtol=tau)
            got = (_flat(Wv) - x0) / s
            assert float((got - ys[j - 1]).abs().max()) < KRYLOV_RTOL * float(ys[j - 1].abs().max())
        q1 = _q(maps, l, update_layer(maps, l, net, st, obs_var, solver="cg", cg_iters=1), net, st, obs_var)
        q_rule = _q(maps, l, update_layer(maps, l, net, st, obs_var, solver="cg", cg_gain_rtol=CG_GAIN_RTOL), net, st,
                    obs_var)
        q_cap = _q(maps, l, update_layer(maps, l, net, st, obs_var, solver="cg", cg_gain_rtol=0.0), net, st, obs_var)
        assert q1 - Q_RTOL * abs(q1) <= q_rule <= q_cap + Q_RTOL * abs(q_cap)


def test_cg_keeps_dead_units_and_dead_layers_bit_for_bit():
    """A ReLU unit dead everywhere (zero row of K and B) keeps its weights exactly; so does a layer with nothing
    downstream (F_ω = 0 in every region)."""
    dec = mlp([1, 6, 5, 2], nn.ReLU, seed=6)
    with torch.no_grad():
        dec[2].weight[1] = 0.0
        dec[2].bias[1] = -1.0
    net = as_cpa_network(dec)
    x = noisy_circle(60, seed=0)
    st = e_step(CPAMarginal(dec, 0.5, 1.0), x)
    maps = [(W.detach().clone(), v.detach().clone()) for W, v in net.affine_maps()]
    obs_var = torch.full((2,), 0.25)
    W1, v1 = update_layer(maps, 1, net, st, obs_var, solver="cg")
    assert torch.equal(W1[1], maps[1][0][1]) and torch.equal(v1[1], maps[1][1][1])
    assert not torch.equal(W1, maps[1][0])   # the live units moved
    dead = [(W.clone(), v.clone()) for W, v in maps]
    dead[2] = (torch.zeros_like(dead[2][0]), dead[2][1])
    W1, v1 = update_layer(dead, 1, net, st, obs_var, solver="cg")
    assert torch.equal(W1, dead[1][0]) and torch.equal(v1, dead[1][1])


def test_cg_step_does_not_depend_on_the_thread_count():
    net, st, maps, obs_var = _setup((1, 24, 24, 3), N=200)
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            outs.append(_flat(update_layer(maps, 1, net, st, obs_var, solver="cg")))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        assert float(((o - outs[0]).abs() / (1 + outs[0].abs())).max()) <= THREAD_RTOL


@pytest.mark.parametrize("schedule", ["layerwise", "joint"])
def test_em_with_the_cg_layer_solve_is_monotone_and_its_nll_exact(schedule):
    x = noisy_circle(100, seed=3)
    dec = make_decoder(0)
    sx, sz = torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    with torch.no_grad():
        nll0 = float(-CPAMarginal(dec, sx, sz).log_prob(x).sum())
    sx, sz, hist = run_em(dec, sx, sz, x, 6, schedule=schedule, layer_solver="cg")
    for h in hist:
        assert h.nll_after <= h.nll_before + 1e-12 * max(1.0, abs(h.nll_before))
    assert hist[-1].nll_after < nll0 - 0.05 * abs(nll0)   # a real decrease, not a rejected step
    with torch.no_grad():
        fresh = float(-CPAMarginal(dec, sx, sz).log_prob(x).sum())
    assert abs(fresh - hist[-1].nll_after) <= NLL_RTOL * abs(fresh)


def test_bad_solver_options_raise():
    net, st, maps, obs_var = _setup((1, 4, 3, 2), N=30)
    with pytest.raises(PyroCPAError, match="cg_iters"):
        update_layer(maps, 0, net, st, obs_var, solver="cg", cg_iters=0)
    with pytest.raises(PyroCPAError, match="cg_gain_rtol"):
        update_layer(maps, 0, net, st, obs_var, solver="cg", cg_gain_rtol=-1.0)
    with pytest.raises(PyroCPAError, match="positive damping"):
        update_layer(maps, 0, net, st, obs_var, solver="cg", rcond=0.0)
    with pytest.raises(PyroCPAError, match="layer_solver"):
        em_step(make_decoder(0), 0.5, 1.0, noisy_circle(10, seed=0), layer_solver="lu")


def test_auto_takes_cg_exactly_for_layers_at_or_above_the_threshold(monkeypatch):
    """``solver="auto"`` is the exact solve below ``CG_AUTO_MIN_UNKNOWNS`` (min(n, m)) and the truncated CG at or
    above it — bitwise the same as asking for either explicitly."""
    import pyro_cpa.infer.mstep as mstep

    net, st, maps, obs_var = _setup([2, 6, 5, 3])
    l = 0
    n = maps[l][0].shape[0] * (maps[l][0].shape[1] + 1)
    m = st.Z.shape[0] * 3 * (st.Z.shape[-1])            # R·D·(S+1)
    exact = update_layer(maps, l, net, st, obs_var, solver="auto")
    cg = update_layer(maps, l, net, st, obs_var, solver="cg")
    assert not torch.equal(exact[0], cg[0])             # the two solves differ here, so the choice is visible
    for threshold, want in ((min(n, m) + 1, exact), (min(n, m), cg)):
        monkeypatch.setattr(mstep, "CG_AUTO_MIN_UNKNOWNS", threshold)
        got = update_layer(maps, l, net, st, obs_var, solver="auto")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
