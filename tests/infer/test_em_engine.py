"""The verified EM step: convergence to probabilistic PCA, monotonicity, backtracking, gradient M-step."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from pyro_cpa import NotCPAError, PyroCPAError
from pyro_cpa.distributions import CPAMarginal
from pyro_cpa.infer import em_engine
from pyro_cpa.infer.em_engine import em_step, run_em


def _nll(dec, sx, sz, x):
    with torch.no_grad():
        return float(-CPAMarginal(dec, sx, sz).log_prob(x).sum())


def _circle(N, seed=0, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(N, generator=g) * 2 * math.pi
    return torch.stack([t.cos(), t.sin()], -1) + noise * torch.randn(N, 2, generator=g)


def _circle_decoder(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.LeakyReLU(0.1), nn.Linear(8, 8), nn.LeakyReLU(0.1),
                         nn.Linear(8, 2)).double()


def _ppca_mle(x, S):
    """Tipping & Bishop (1999): μ = mean, σ² = mean of the D − S smallest eigenvalues of the (1/N) sample
    covariance, W Wᵀ = U_S (Λ_S − σ² I) U_Sᵀ; log-likelihood of N(μ, W Wᵀ + σ² I)."""
    N, D = x.shape
    mu = x.mean(0)
    C = (x - mu).T @ (x - mu) / N
    lam, U = torch.linalg.eigh(C)
    lam, U = lam.flip(0), U.flip(1)
    s2 = lam[S:].mean()
    WWt = U[:, :S] @ torch.diag(lam[:S] - s2) @ U[:, :S].T
    cov = WWt + s2 * torch.eye(D)
    ll = torch.distributions.MultivariateNormal(mu, cov).log_prob(x).sum()
    return mu, WWt, s2, ll


@pytest.mark.parametrize("S,D,w_scale,noise,px", [(1, 3, 1.0, 0.7, False), (2, 4, 2.0, 0.4, True)])
def test_linear_decoder_converges_to_ppca_mle(S, D, w_scale, noise, px):
    """Plain EM (well-conditioned data) and PX-EM (eigenvalues 12.6, 3.0 vs σ² = 0.15, where plain EM's
    mean converges at rate ≈ 0.99) reach the closed-form PPCA maximum-likelihood solution."""
    g = torch.Generator().manual_seed(3)
    N = 400
    W_true = torch.randn(D, S, generator=g) * w_scale
    x = torch.randn(N, S, generator=g) @ W_true.T + torch.tensor([1.0, -2.0, 0.5, 3.0][:D]) \
        + noise * torch.randn(N, D, generator=g)
    mu, WWt, s2, ll_ref = _ppca_mle(x, S)
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(S, D)).double()
    sx, sz = torch.tensor(1.0), torch.tensor(1.0)
    prev = math.inf
    for _ in range(60):
        r = em_step(dec, sx, sz, x, px=px)
        assert r.accepted and r.nll_after <= r.nll_before + 1e-9 and r.nll_before <= prev + 1e-9
        prev = r.nll_after
        sx, sz = r.obs_scale, r.prior_scale
        if r.nll_before - r.nll_after < 1e-13 * abs(r.nll_before):
            break
    W, v = dec[0].weight.detach(), dec[0].bias.detach()
    np.testing.assert_allclose((W @ W.T).numpy(), WWt.numpy(), atol=1e-6)
    np.testing.assert_allclose(v.numpy(), mu.numpy(), atol=1e-6)
    assert abs(float(sx) ** 2 - float(s2)) < 1e-6
    assert abs(-r.nll_after - float(ll_ref)) < 1e-6 * abs(float(ll_ref))
    assert torch.all(sz == 1.0)  # not updated by default


def test_circle_exact_nll_never_increases_and_decreases_substantially():
    """The paper's circle setting (N=200 here): the exact NLL is non-increasing over 25 steps."""
    x = _circle(200)
    dec = _circle_decoder()
    sx, sz = torch.tensor(0.5), torch.tensor(1.0)
    nlls = [_nll(dec, sx, sz, x)]
    for _ in range(25):
        r = em_step(dec, sx, sz, x)
        assert abs(r.nll_before - nlls[-1]) <= 1e-9 * max(1.0, abs(nlls[-1]))  # E-step NLL = previous result
        assert r.nll_after <= r.nll_before + 1e-9
        sx, sz = r.obs_scale, r.prior_scale
        nlls.append(r.nll_after)
    # the returned NLL is the decoder's actual exact NLL
    assert abs(_nll(dec, sx, sz, x) - nlls[-1]) < 1e-9 * abs(nlls[-1])
    assert all(b <= a + 1e-9 for a, b in zip(nlls, nlls[1:]))
    assert nlls[-1] / 200 < 0.5 < nlls[0] / 200  # from ≈2.4 nats/sample to well below 0.5
    assert sx.dim() == 0 and float(sx) < 0.1


def test_prior_expansion_block_never_lowers_the_exact_likelihood():
    """The PX block is an exact EM step of the expanded model followed by an exact reparametrisation."""
    from pyro_cpa.infer.estep import e_step
    from pyro_cpa.infer.mstep import prior_expansion
    from pyro_cpa.nn import as_cpa_network
    x = _circle(100, seed=6)
    for seed in range(3):
        dec = _circle_decoder(seed=seed)
        net = as_cpa_network(dec)
        st = e_step(CPAMarginal(dec, 0.3, 1.5), x)
        before = -float(st.loglik.sum())
        maps = prior_expansion([(W.detach(), v.detach()) for W, v in net.affine_maps()], st, 1.5 ** 2)
        net.set_affine_maps(maps)
        assert _nll(dec, 0.3, 1.5, x) <= before + 1e-9
    r = em_step(dec, 0.3, 1.5, x, px=True)
    assert r.accepted and r.nll_after <= r.nll_before + 1e-9


def test_joint_schedule_is_monotone_and_restores_rejected_steps_exactly():
    x = _circle(120, seed=1)
    dec = _circle_decoder(seed=1)
    sx, sz = torch.tensor(0.5), torch.tensor(1.0)
    for _ in range(6):
        before = [p.detach().clone() for p in dec.parameters()]
        r = em_step(dec, sx, sz, x, schedule="joint", sweeps=2, max_backtracks=4)
        assert r.nll_after <= r.nll_before + 1e-9
        if not r.accepted:
            assert all(torch.equal(a, b) for a, b in zip(before, dec.parameters()))
            assert torch.equal(r.obs_scale, sx) and r.step_size == 0.0
        else:
            assert r.step_size == 0.5 ** r.backtracks
        assert len(r.nll_trials) == r.backtracks + 1
        sx, sz = r.obs_scale, r.prior_scale


def test_backtracking_halves_a_bad_step_and_rejects_a_hopeless_one(monkeypatch):
    x = _circle(100, seed=2)
    dec = _circle_decoder(seed=2)
    sx, sz = torch.tensor(0.3), torch.tensor(1.0)
    real = em_engine.update_layer

    def overshoot(maps, l, *a, **k):  # 64 × the exact block step: halving 6 times recovers it
        W, v = real(maps, l, *a, **k)
        return maps[l][0] + 64 * (W - maps[l][0]), maps[l][1] + 64 * (v - maps[l][1])
    monkeypatch.setattr(em_engine, "update_layer", overshoot)
    r = em_step(dec, sx, sz, x)
    assert r.accepted and r.backtracks >= 3 and r.nll_after < r.nll_before
    # a step that is pure noise, with no backtracking allowed, is rejected and θ_old restored bitwise
    monkeypatch.setattr(em_engine, "update_layer",
                        lambda maps, l, *a, **k: (maps[l][0] + 50 * torch.randn_like(maps[l][0]), maps[l][1]))
    monkeypatch.setattr(em_engine, "update_variances",
                        lambda maps, net, st, ov, pv, **k: (ov * 100, pv))
    before = [p.detach().clone() for p in dec.parameters()]
    sx = r.obs_scale
    r2 = em_step(dec, sx, sz, x, max_backtracks=0, px=False)
    assert not r2.accepted and r2.nll_after == r2.nll_before and r2.backtracks == 0
    assert all(torch.equal(a, b) for a, b in zip(before, dec.parameters()))
    assert torch.equal(r2.obs_scale, sx)


def test_diagonal_noise_and_prior_scale_update():
    x = _circle(150, seed=3) * torch.tensor([1.0, 0.5])
    dec = _circle_decoder(seed=3)
    sx, sz = torch.tensor([0.5, 0.5]), torch.tensor([1.0])
    sx, sz, hist = run_em(dec, sx, sz, x, 8, obs_noise="diagonal", update_prior_scale=True)
    assert sx.shape == (2,) and sz.shape == (1,) and float(sz) != 1.0
    assert all(h.nll_after <= h.nll_before + 1e-9 for h in hist)
    assert hist[-1].nll_after < hist[0].nll_before
    stop = []
    run_em(dec, sx, sz, x, 5, obs_noise="diagonal", callback=lambda i, r: stop.append(i) or True)
    assert stop == [0]


@pytest.mark.parametrize("kw", [{}, {"schedule": "joint"}, {"m_step_method": "gradient", "gradient_steps": 5}])
def test_fixed_obs_scale_is_kept_and_steps_stay_monotone(kw):
    x = _circle(80, seed=5)
    dec = _circle_decoder(seed=5)
    sx = torch.tensor(0.2)
    for _ in range(3):
        r = em_step(dec, sx, 1.0, x, update_obs_scale=False, **kw)
        assert torch.equal(r.obs_scale, sx)
        assert r.nll_after <= r.nll_before + 1e-9
        assert abs(_nll(dec, sx, 1.0, x) - r.nll_after) < 1e-9 * abs(r.nll_after)


def test_gradient_m_step_is_monotone_and_handles_batchnorm():
    x = _circle(100, seed=4)
    torch.manual_seed(4)
    dec = nn.Sequential(nn.Linear(1, 6), nn.BatchNorm1d(6), nn.LeakyReLU(0.1), nn.Linear(6, 2)).double()
    with torch.no_grad():
        dec[1].running_mean.uniform_(-0.5, 0.5)
        dec[1].running_var.uniform_(0.5, 2.0)
    dec.eval()
    with pytest.raises(NotCPAError, match="gradient"):
        em_step(dec, 0.5, 1.0, x)
    sx, sz = torch.tensor(0.5), torch.tensor(1.0)
    first = None
    for _ in range(4):
        r = em_step(dec, sx, sz, x, m_step_method="gradient", gradient_steps=20)
        first = first if first is not None else r.nll_before
        assert r.nll_after <= r.nll_before + 1e-9 and r.q_gain >= 0
        sx, sz = r.obs_scale, r.prior_scale
    assert r.nll_after < first - 10


def test_invalid_options():
    x = _circle(10)
    dec = _circle_decoder()
    for kw in ({"m_step_method": "newton"}, {"schedule": "random"}, {"obs_noise": "full"},
               {"max_backtracks": -1}, {"order": "up"}):
        with pytest.raises(PyroCPAError):
            em_step(dec, 0.5, 1.0, x, **kw)
    with pytest.raises(PyroCPAError, match="isotropic"):
        em_step(dec, torch.tensor([0.5, 0.4]), 1.0, x)
