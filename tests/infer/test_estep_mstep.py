"""E-step statistics and the closed-form M-step, against independent references.

References: adaptive quadrature of the posterior (S = 1), Fisher's identity ∇Q(θ_old) = ∇ log p(x; θ_old)
(autograd through the exact marginal), the ELBO identity Q + H[p(z|x)] = log p(x), Newton steps with
the autograd Hessian (Q is quadratic in one layer), finite differences.
"""
import math

import numpy as np
import pytest
import torch
from scipy import integrate
from torch import nn

from mstep_reference import layer_neg_q
from pyro_cpa import NotCPAError, PyroCPAError
from pyro_cpa.distributions import CPAMarginal
from pyro_cpa.infer.estep import e_step
from pyro_cpa.infer.mstep import (DEFAULT_RCOND, expected_complete_loglik, frozen_region_maps, m_step,
                                  update_layer, update_variances)
from pyro_cpa.nn import as_cpa_network, mlp


def _net(widths, act=lambda: nn.LeakyReLU(0.1), seed=0):
    return mlp(widths, act, seed=seed)


def _circle(N, seed=0, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(N, generator=g) * 2 * math.pi
    return torch.stack([t.cos(), t.sin()], -1) + noise * torch.randn(N, 2, generator=g)


def _data(S, D, N, seed=1):
    g = torch.Generator().manual_seed(seed)
    if D == 2:
        return _circle(N, seed)
    return torch.randn(N, D, generator=g) * 1.5


def _grads(maps, net, stats, obs_var, prior_var):
    params = [(W.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()) for W, v in maps]
    ov = torch.as_tensor(obs_var).detach().clone().requires_grad_()
    Q = expected_complete_loglik(params, net, stats.patterns, stats, ov, prior_var)
    flat = [p for pv in params for p in pv]
    g = torch.autograd.grad(Q, flat + [ov])
    return Q.detach(), g[:-1], g[-1]


# ------------------------------------------------------------------------------------------ set_affine_maps
def test_set_affine_maps_roundtrip_and_errors():
    dec = nn.Sequential(nn.Linear(2, 4), nn.Identity(), nn.ReLU(), nn.Dropout(0.0), nn.Linear(4, 3)).double()
    dec.eval()
    net = as_cpa_network(dec)
    new = [(torch.randn(4, 2), torch.randn(4)), (torch.randn(3, 4), torch.randn(3))]
    net.set_affine_maps(new)
    for (W, v), (W2, v2) in zip(new, net.affine_maps()):
        assert torch.equal(W, W2) and torch.equal(v, v2)
    assert dec[0].weight.dtype == torch.float64
    # float32 decoder: dtype preserved
    dec32 = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 2)).float()
    n32 = as_cpa_network(dec32)
    n32.set_affine_maps([(torch.ones(3, 1, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)),
                         (torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))])
    assert dec32[0].weight.dtype == torch.float32 and float(dec32[2].weight.detach().sum()) == 6.0
    with pytest.raises(NotCPAError, match="expected 2"):
        net.set_affine_maps(new[:1])
    with pytest.raises(NotCPAError, match="weight"):
        net.set_affine_maps([(torch.randn(4, 3), torch.randn(4)), new[1]])
    bn = nn.Sequential(nn.Linear(1, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)).double().eval()
    with pytest.raises(NotCPAError, match="gradient M-step"):
        as_cpa_network(bn).set_affine_maps([(torch.randn(3, 1), torch.randn(3)), (torch.randn(2, 3), torch.randn(2))])
    nobias = nn.Sequential(nn.Linear(1, 3, bias=False), nn.ReLU(), nn.Linear(3, 2)).double()
    before = [p.detach().clone() for p in nobias.parameters()]
    with pytest.raises(NotCPAError, match="no bias"):
        as_cpa_network(nobias).set_affine_maps([(torch.randn(3, 1), torch.randn(3)),
                                                (torch.randn(2, 3), torch.randn(2))])
    assert all(torch.equal(a, b) for a, b in zip(before, nobias.parameters()))  # nothing written
    implicit = nn.Sequential(nn.ReLU(), nn.Linear(1, 2)).double()  # T_0 = identity, no Linear
    with pytest.raises(NotCPAError, match="not exactly one nn.Linear"):
        as_cpa_network(implicit).set_affine_maps([(torch.eye(1), torch.zeros(1)), (torch.randn(2, 1), torch.randn(2))])


# ------------------------------------------------------------------------------------------ E-step
def test_estep_statistics_match_quadrature_s1():
    dec = _net([1, 5, 4, 2], seed=3)
    sx, sz = 0.4, 1.3
    x = _circle(6, seed=2)
    mg = CPAMarginal(dec, sx, sz)
    st = e_step(mg, x, chunk_size=4)  # two chunks
    regions = mg.regions
    H, c = (t.detach() for t in regions.polytopes())
    R = len(regions)
    lo = torch.where(H[:, :, 0] < 0, c / H[:, :, 0], torch.full_like(c, -math.inf)).max(-1).values
    hi = torch.where(H[:, :, 0] > 0, c / H[:, :, 0], torch.full_like(c, math.inf)).min(-1).values
    Zref = np.zeros((R, 2, 2))
    Xref = np.zeros((R, 2, 2))
    qref = np.zeros((R, 2))
    llref = []
    for n in range(x.shape[0]):
        xn = x[n].numpy()

        def logjoint(z):
            with torch.no_grad():
                gz = dec(torch.tensor([[z]]))[0].numpy()
            return (-0.5 * np.sum((xn - gz) ** 2) / sx ** 2 - 2 * math.log(sx * math.sqrt(2 * math.pi))
                    - 0.5 * z ** 2 / sz ** 2 - math.log(sz * math.sqrt(2 * math.pi)))
        grid = np.linspace(-10 * sz, 10 * sz, 2001)
        M = max(logjoint(z) for z in grid)
        mom = np.zeros((R, 3))
        for r in range(R):
            a, b = max(float(lo[r]), -12 * sz), min(float(hi[r]), 12 * sz)
            if b <= a:
                continue
            for k in range(3):
                mom[r, k] = integrate.quad(lambda z: z ** k * math.exp(logjoint(z) - M), a, b,
                                           epsabs=0, epsrel=1e-12, limit=200)[0]
        p = mom[:, 0].sum()
        llref.append(M + math.log(p))
        mom /= p
        Zref[:, 0, 0] += mom[:, 2]
        Zref[:, 0, 1] += mom[:, 1]
        Zref[:, 1, 0] += mom[:, 1]
        Zref[:, 1, 1] += mom[:, 0]
        Xref[:, :, 0] += xn[None, :] * mom[:, 1:2]
        Xref[:, :, 1] += xn[None, :] * mom[:, 0:1]
        qref += mom[:, 0:1] * xn[None, :] ** 2
    np.testing.assert_allclose(st.loglik.numpy(), llref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(st.Z.numpy(), Zref, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(st.X.numpy(), Xref, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(st.q.numpy(), qref, rtol=1e-7, atol=1e-10)
    assert st.num_data == 6 and abs(float(st.region_weights.sum()) - 6) < 1e-12


@pytest.mark.parametrize("S,widths,noise", [(1, [1, 6, 5, 2], "isotropic"), (1, [1, 6, 3], "diagonal"),
                                            (2, [2, 5, 3], "diagonal")])
def test_fisher_identity_grad_q_equals_grad_loglik(S, widths, noise):
    """∇_θ Q(θ)|θ_old = ∇_θ Σ log p(x; θ)|θ_old for every W, v, σx, σz: against central finite differences
    of the exact log-likelihood in random directions (all S) and against autograd through it (S = 1)."""
    dec = _net(widths, seed=5)
    D = widths[-1]
    x = _data(S, D, 40)
    sx = torch.full((D,), 0.6) if noise == "isotropic" else torch.linspace(0.4, 0.8, D)
    sz = torch.full((S,), 1.2)
    params = list(dec.parameters())
    net = as_cpa_network(dec)
    st = e_step(CPAMarginal(dec, sx, sz), x)
    sx_q = sx.clone().requires_grad_()
    sz_q = sz.clone().requires_grad_()
    Q = expected_complete_loglik(net.affine_maps(), net, st.patterns, st, sx_q ** 2, sz_q ** 2)
    g_q = torch.autograd.grad(Q, params + [sx_q, sz_q])
    base = [p.detach().clone() for p in params] + [sx, sz]

    def ll(vals):
        with torch.no_grad():
            for p, v in zip(params, vals):
                p.copy_(v)
            out = float(CPAMarginal(dec, vals[-2], vals[-1]).log_prob(x).sum())
            for p, v in zip(params, base):
                p.copy_(v)
        return out
    gen = torch.Generator().manual_seed(11)
    h = 1e-5
    for _ in range(4):
        d = [torch.randn(b.shape, generator=gen) for b in base]
        nrm = math.sqrt(sum(float((t ** 2).sum()) for t in d))
        d = [t / nrm for t in d]
        fd = (ll([b + h * t for b, t in zip(base, d)]) - ll([b - h * t for b, t in zip(base, d)])) / (2 * h)
        ad = sum(float((g * t).sum()) for g, t in zip(g_q, d))
        assert abs(fd - ad) < 1e-6 * (1 + abs(fd)), (fd, ad)
    if S == 1:
        sx_p = sx.clone().requires_grad_()
        sz_p = sz.clone().requires_grad_()
        g_ll = torch.autograd.grad(CPAMarginal(dec, sx_p, sz_p).log_prob(x).sum(), params + [sx_p, sz_p])
        for a, b in zip(g_ll, g_q):
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-7, atol=1e-8 * (1 + float(a.abs().max())))


@pytest.mark.parametrize("S,widths", [(1, [1, 5, 4, 2]), (2, [2, 4, 3])])
def test_elbo_identity_q_plus_entropy_is_loglik(S, widths):
    dec = _net(widths, seed=2)
    x = _data(S, widths[-1], 25)
    mg = CPAMarginal(dec, 0.5, 0.9)
    st = e_step(mg, x)
    net = as_cpa_network(dec)
    Q = expected_complete_loglik(net.affine_maps(), net, st.patterns, st, 0.25, 0.81)
    ent = mg.posterior(x).entropy().sum()
    assert abs(float((Q + ent).detach()) - float(st.loglik.sum())) < 1e-8 * (1 + abs(float(st.loglik.sum())))


# ------------------------------------------------------------------------------------------ M-step
def _setup(S=1, widths=(1, 6, 5, 2), seed=4, N=60, sx=0.5):
    dec = _net(list(widths), seed=seed)
    x = _data(S, widths[-1], N)
    st = e_step(CPAMarginal(dec, sx, 1.0), x)
    return dec, as_cpa_network(dec), x, st


def test_frozen_region_maps_equal_region_maps_at_current_weights():
    from pyro_cpa.geometry.maps import region_maps
    dec, net, x, st = _setup()
    a = frozen_region_maps(net.affine_maps(), net.negative_slopes, st.patterns)
    b = region_maps(net, st.patterns)
    assert torch.allclose(a.A, b.A, atol=1e-14) and torch.allclose(a.b, b.b, atol=1e-14)


@pytest.mark.parametrize("S,widths,noise", [(1, (1, 6, 5, 2), "isotropic"), (1, (1, 4, 4, 3), "diagonal"),
                                            (2, (2, 4, 3), "diagonal")])
def test_layer_update_is_the_exact_block_maximiser(S, widths, noise):
    """Per layer: ∂Q/∂(W_l, v_l) = 0 after the update, equal to a Newton step with the autograd Hessian
    (Q is an exact quadratic in one layer), for the dense and the low-rank factored solvers."""
    dec, net, x, st = _setup(S, widths)
    D = widths[-1]
    obs_var = torch.full((D,), 0.3) if noise == "isotropic" else torch.linspace(0.2, 0.5, D)
    maps = [(W.detach().clone(), v.detach().clone()) for W, v in net.affine_maps()]
    for l in range(len(maps)):
        negQ, w0 = layer_neg_q(maps, l, net, st, obs_var)
        g = torch.autograd.functional.jacobian(negQ, w0)
        Hs = torch.autograd.functional.hessian(negQ, w0)
        # Q is quadratic in one layer: a (minimum-norm) Newton step reaches its maximum. In the hidden
        # layers the Hessian is typically singular (per region the layer input spans only S+1 dims).
        evals, evecs = torch.linalg.eigh(Hs)
        inv = torch.where(evals > 1e-11 * evals.max(), 1.0 / evals, torch.zeros_like(evals))
        w_newton = w0.clone()
        for _ in range(3):  # pseudo-inverse Newton steps with refinement
            gn = torch.autograd.functional.jacobian(negQ, w_newton)
            w_newton = w_newton - evecs @ (inv * (evecs.T @ gn))
        W1, v1 = update_layer(maps, l, net, st, obs_var)
        w1 = torch.cat([W1.reshape(-1), v1])
        # The documented damped step, computed from the autograd Hessian: Jacobi scaling s = (d + ε·mean d)^-1/2,
        # filter f(e) = e(e + 3λ)/(e + λ)³ on the scaled eigenvalues, λ = DEFAULT_RCOND.
        d = torch.diagonal(Hs)
        sc = (d + torch.finfo(d.dtype).eps * d.mean()).rsqrt()
        e_s, V_s = torch.linalg.eigh(sc[:, None] * Hs * sc[None, :])
        lam, e_c = DEFAULT_RCOND, e_s.clamp_min(0.0)
        w_damped = w0 + sc * (V_s @ (e_c * (e_c + 3 * lam) / (e_c + lam) ** 3 * (V_s.T @ (sc * -g))))
        q0, q1, qn, qd = (float(negQ(w).detach()) for w in (w0, w1, w_newton, w_damped))
        assert q1 < q0
        assert q1 >= qn - 1e-11 * abs(q0)  # no higher than the maximum (rounding aside)
        assert abs(q1 - qd) < 1e-10 * abs(q0)  # the documented damped maximiser
        assert q1 - qn < 1e-6 * abs(q0)  # which gives away little of the maximum
        # Stationary in every direction the data determine: in Jacobi-scaled units (s = diag(H)^-1/2) the
        # gradient left along eigen-directions of curvature e is a fraction (3eλ² + λ³)/(e + λ)³ ≈ 3(λ/e)²
        # of the initial one (λ = DEFAULT_RCOND); check it is below 1e-7 where e ≥ 1e4·λ.
        g1 = torch.autograd.functional.jacobian(negQ, w1)
        strong = e_s >= 1e4 * DEFAULT_RCOND
        g0_s, g1_s = V_s.T @ (sc * g), V_s.T @ (sc * g1)
        assert float(g1_s[strong].abs().max()) < 1e-7 * float(g0_s.abs().max())
        if l == len(maps) - 1:  # last layer: Σ M_ω has full rank here, the damped maximiser is unique
            np.testing.assert_allclose(w1.numpy(), w_damped.numpy(), rtol=1e-7, atol=1e-9)
        if l < len(maps) - 1:  # the low-rank (QR of the factor of K) solver reaches the same maximum
            W2, v2 = update_layer(maps, l, net, st, obs_var, solver="factored")
            w2 = torch.cat([W2.reshape(-1), v2])
            assert abs(float(negQ(w2).detach()) - q1) < 1e-10 * abs(q0)
        maps[l] = (W1, v1)  # continue the sweep from the updated layer


@pytest.mark.parametrize("noise", ["isotropic", "diagonal"])
def test_variance_update_is_stationary(noise):
    dec, net, x, st = _setup(widths=(1, 5, 3))
    maps = [(W.detach(), v.detach()) for W, v in net.affine_maps()]
    ov, pv = update_variances(maps, net, st, torch.full((3,), 0.3), torch.ones(1), obs_noise=noise,
                              update_prior_scale=True)
    if noise == "isotropic":
        assert torch.all(ov == ov[0])
        sx2 = ov[:1].clone().requires_grad_()
    else:
        sx2 = ov.clone().requires_grad_()
    sz2 = pv.clone().requires_grad_()
    Q = expected_complete_loglik(maps, net, st.patterns, st, sx2, sz2)
    g = torch.autograd.grad(Q, [sx2, sz2])
    assert float(g[0].abs().max()) < 1e-8 * st.num_data / float(ov.min())
    assert float(g[1].abs().max()) < 1e-8 * st.num_data


@pytest.mark.parametrize("S,widths,noise", [(1, (1, 4, 3, 2), "isotropic"), (1, (1, 4, 2), "diagonal"),
                                            (2, (2, 3, 2), "isotropic")])
def test_m_step_converged_sweeps_are_a_stationary_point(S, widths, noise):
    """Block coordinate ascent to convergence: ∇Q ≈ 0 for every W, v and σx (autograd and central
    finite differences in random directions), and Q never decreases over the sweeps."""
    dec, net, x, st = _setup(S, widths, N=40)
    D = widths[-1]
    res = m_step(net, st.patterns, st, torch.tensor(0.3), 1.0, obs_noise=noise, sweeps=300, tol=1e-15)
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(res.q_trace, res.q_trace[1:]))
    maps0 = net.affine_maps()
    _, g0, _ = _grads(maps0, net, st, torch.full((D,), 0.3), 1.0)
    ov = res.obs_var if noise == "diagonal" else res.obs_var[:1]
    Q, g, gs = _grads(res.maps, net, st, ov, res.prior_var)
    scale0 = max(float(t.abs().max()) for t in g0)
    for t in g:
        assert float(t.abs().max()) < 1e-5 * scale0
    assert float(gs.abs().max()) < 1e-7 * st.num_data / float(ov.min())
    # finite differences along random directions of all weights
    flat = torch.cat([torch.cat([W.reshape(-1), v]) for W, v in res.maps])
    shapes = [(W.shape, v.shape) for W, v in res.maps]

    def unflat(w):
        out, i = [], 0
        for sW, sv in shapes:
            nW, nv = sW.numel(), sv.numel()
            out.append((w[i:i + nW].reshape(sW), w[i + nW:i + nW + nv]))
            i += nW + nv
        return out
    qf = lambda w: float(expected_complete_loglik(unflat(w), net, st.patterns, st, ov, res.prior_var).detach())  # noqa
    flat0 = torch.cat([torch.cat([W.detach().reshape(-1), v.detach()]) for W, v in maps0])
    h = 1e-5
    for _ in range(3):
        d = torch.randn_like(flat)
        d /= d.norm()
        fd = (qf(flat + h * d) - qf(flat - h * d)) / (2 * h)
        fd0 = (qf(flat0 + h * d) - qf(flat0 - h * d)) / (2 * h)
        ad = float(sum((t.reshape(-1) * dd).sum() for t, dd in zip(g, _split(d, shapes))))
        assert abs(fd - ad) < 1e-5 * (1 + abs(fd0))
        assert abs(fd) < 1e-4 * scale0 + 1e-6 * abs(Q)


def _split(d, shapes):
    out, i = [], 0
    for sW, sv in shapes:
        out += [d[i:i + sW.numel()], d[i + sW.numel():i + sW.numel() + sv.numel()]]
        i += sW.numel() + sv.numel()
    return out


def test_m_step_one_sweep_increases_q_and_orders_agree_on_monotonicity():
    dec, net, x, st = _setup()
    for order in ("forward", "backward"):
        res = m_step(net, st.patterns, st, 0.25, 1.0, sweeps=3, order=order)
        assert len(res.q_trace) == 4
        assert all(b >= a for a, b in zip(res.q_trace, res.q_trace[1:]))
        assert res.obs_var.shape == (2,) and res.prior_var.shape == (1,)
    with pytest.raises(PyroCPAError):
        m_step(net, st.patterns, st, 0.25, 1.0, order="sideways")
    with pytest.raises(PyroCPAError):
        m_step(net, st.patterns, st, torch.tensor([0.2, 0.3]), 1.0, obs_noise="isotropic")


def test_m_step_robust_to_dead_units_and_empty_regions():
    """A ReLU unit dead on the whole latent space (zero gradient, singular K) keeps its incoming weights
    exactly (proximal ridge), everything stays finite and Q increases."""
    dec = _net([1, 5, 4, 2], act=nn.ReLU, seed=6)
    with torch.no_grad():
        dec[0].weight[2] = 0.0
        dec[0].bias[2] = -1.0  # unit 2 of layer 0: pre-activation −1 everywhere
    net = as_cpa_network(dec)
    x = _circle(50)
    st = e_step(CPAMarginal(dec, 0.5, 1.0), x)
    res = m_step(net, st.patterns, st, 0.25, 1.0, sweeps=5)
    assert all(torch.isfinite(W).all() and torch.isfinite(v).all() for W, v in res.maps)
    assert torch.equal(res.maps[0][0][2], dec[0].weight[2].detach())
    assert abs(float(res.maps[0][1][2]) + 1.0) < 1e-13
    assert res.q_trace[-1] > res.q_trace[0]
    # an extra region with no data at all (weights zero) changes nothing
    Z = torch.cat([st.Z, torch.zeros(1, 2, 2)])
    X = torch.cat([st.X, torch.zeros(1, 2, 2)])
    q = torch.cat([st.q, torch.zeros(1, 2)])
    pats = [torch.cat([p, p[:1]]) for p in st.patterns]
    st2 = type(st)(Z, X, q, st.loglik, pats, st.num_data)
    res2 = m_step(net, pats, st2, 0.25, 1.0, sweeps=5)
    # (it changes the summation order of K, hence its rounding: the result moves within the conditioning
    # bound of the damped solve, never by the 3e-4 that a near-singular plain solve produced)
    assert _max_rel_change(res.maps, res2.maps) < SWEEPS_ROUNDING_BOUND


EPS = torch.finfo(torch.float64).eps
#: Conditioning bound of one layer solve (mstep._damped_prox_solve): a relative perturbation δ of the
#: E-step statistics moves the weights by ≲ δ/rcond (relative to 1 + |w|); with a 10× margin.
SOLVE_ROUNDING_BOUND = 10 * (4 * EPS) / DEFAULT_RCOND
#: The same after 5 sweeps of block coordinate ascent (each solve feeds the next).
SWEEPS_ROUNDING_BOUND = 1e3 * EPS / DEFAULT_RCOND


def _max_rel_change(maps_a, maps_b):
    return max(float(((a - b).abs() / (1 + a.abs())).max())
               for pa, pb in zip(maps_a, maps_b) for a, b in zip(pa, pb))


def test_m_step_rounding_response_is_bounded_by_rcond():
    """Another CPU rounds the E-step sums differently (a few ulps): the M-step's answer moves by at most the
    stated conditioning bound, whatever the condition number of K (dead units: K exactly singular)."""
    dec = _net([1, 5, 4, 2], act=nn.ReLU, seed=6)
    with torch.no_grad():
        dec[0].weight[2] = 0.0
        dec[0].bias[2] = -1.0
    net = as_cpa_network(dec)
    st = e_step(CPAMarginal(dec, 0.5, 1.0), _circle(50))
    maps = [(W.detach().clone(), v.detach().clone()) for W, v in net.affine_maps()]
    obs_var = torch.full((2,), 0.25)
    g = torch.Generator().manual_seed(1)

    def nudged():
        f = lambda a: a * (1 + 4 * EPS * (2 * torch.rand(a.shape, generator=g) - 1))  # noqa: E731
        return type(st)(f(st.Z), f(st.X), f(st.q), st.loglik, st.patterns, st.num_data)
    base = [update_layer(maps, l, net, st, obs_var) for l in range(len(maps))]
    full = m_step(net, st.patterns, st, 0.25, 1.0, sweeps=5)
    for _ in range(5):
        st2 = nudged()
        other = [update_layer(maps, l, net, st2, obs_var) for l in range(len(maps))]
        assert _max_rel_change(base, other) < SOLVE_ROUNDING_BOUND
        assert _max_rel_change(full.maps, m_step(net, st.patterns, st2, 0.25, 1.0, sweeps=5).maps) \
            < SWEEPS_ROUNDING_BOUND
