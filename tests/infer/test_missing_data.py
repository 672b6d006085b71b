"""Issue 11 item 4: missing data (NaN coordinates) end to end — EM, log_evidence, exact_elbo / posterior_kl
and SVI with any guide — written as a Pyro user would, checked against independent references:
the closed-form observed-data Gaussian likelihood of PPCA and its direct maximisation by scipy, and
scipy quadrature for a ReLU decoder.
"""
import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from scipy import integrate, optimize
from torch import nn
from torch.distributions import constraints

from pyro_cpa.distributions import CPALikelihood, CPAMarginal
from pyro_cpa.guides import ExactPosterior
from pyro_cpa.infer import EM, exact_elbo, log_evidence, posterior_kl
from pyro_cpa.infer.estep import e_step
from pyro_cpa.infer.mstep import expected_complete_loglik
from pyro_cpa.nn.network import as_cpa_network

#: the closed-form Gaussian and our exact marginal agree to round-off
CLOSED_FORM_RTOL = 1e-10
#: adaptive quadrature with breakpoints at the kinks
QUAD_RTOL = 1e-8
#: EM (with the parameter-expanded block) after the steps below vs scipy's optimum, in nats per datum
EM_OPTIMUM_TOL = 1e-5


def _model(decoder, S, sigma0=0.5):
    def model(x):
        pyro.module("decoder", decoder)
        s = pyro.param("obs_scale", torch.tensor(sigma0), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([S]).to_event(1))
            pyro.sample("x", CPALikelihood(decoder, z, s), obs=x)
    return model


def _knock_out(x, frac, seed):
    """NaN a fraction of the entries, keeping at least one observed coordinate per row (and some full rows)."""
    g = torch.Generator().manual_seed(seed)
    miss = torch.rand(x.shape, generator=g) < frac
    miss[miss.all(-1), 0] = False
    x = x.clone()
    x[miss] = float("nan")
    return x


# ------------------------------------------------------------------------------------------ PPCA reference
def _ppca_nll(theta, x, S):
    """−Σ_n log N(x_n,o; b_o, σ² I + W_o W_oᵀ), by missingness pattern (numpy, closed form)."""
    D = x.shape[1]
    W = theta[:D * S].reshape(D, S)
    b = theta[D * S:D * S + D]
    var = math.exp(2 * theta[-1])
    obs = ~np.isnan(x)
    total = 0.0
    for pattern in np.unique(obs, axis=0):
        rows = (obs == pattern).all(1)
        xo = x[rows][:, pattern] - b[pattern]
        C = var * np.eye(pattern.sum()) + W[pattern] @ W[pattern].T
        L = np.linalg.cholesky(C)
        sol = np.linalg.solve(L, xo.T)
        total += 0.5 * (sol * sol).sum() + rows.sum() * (np.log(np.diag(L)).sum() + 0.5 * pattern.sum() * math.log(2 * math.pi))
    return total


def _ppca_data(N=80, seed=3):
    g = torch.Generator().manual_seed(seed)
    W = torch.tensor([[1.0], [0.5], [-0.8]])
    z = torch.randn(N, 1, generator=g)
    x = z @ W.T + torch.tensor([0.3, -0.2, 0.1]) + 0.3 * torch.randn(N, 3, generator=g)
    return _knock_out(x, 0.25, seed)


def _theta(decoder, sigma):
    lin = decoder[0]
    return np.concatenate([lin.weight.detach().numpy().reshape(-1), lin.bias.detach().numpy(), [math.log(sigma)]])


def test_item4_ppca_log_evidence_with_nan_is_the_closed_form():
    pyro.clear_param_store()
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(1, 3)).double()
    x = _ppca_data()
    lp = log_evidence(_model(dec, 1), x)
    ref = -_ppca_nll(_theta(dec, 0.5), x.numpy(), 1)
    assert math.isclose(float(lp.sum()), ref, rel_tol=CLOSED_FORM_RTOL)


def test_item4_ppca_em_with_missing_data_reaches_the_observed_data_mle():
    """EM for incomplete data converges to the maximiser of the observed-data likelihood (scipy, closed form)."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(1, 3)).double()
    x = _ppca_data()
    model = _model(dec, 1)
    em = EM(model, px=True)
    nll = [em.step(x) for _ in range(150)]
    assert all(b <= a + 1e-12 * abs(a) for a, b in zip(nll, nll[1:]))  # (b) never increases
    sigma = float(pyro.param("obs_scale").detach())
    theta_em = _theta(dec, sigma)
    assert math.isclose(nll[-1], _ppca_nll(theta_em, x.numpy(), 1), rel_tol=CLOSED_FORM_RTOL)
    best = optimize.minimize(_ppca_nll, theta_em + 0.05, args=(x.numpy(), 1), method="BFGS",
                             options={"gtol": 1e-9, "maxiter": 2000})
    N = x.shape[0]
    assert nll[-1] <= best.fun + EM_OPTIMUM_TOL * N  # EM reaches scipy's optimum of the observed-data likelihood
    assert best.fun <= nll[-1] + EM_OPTIMUM_TOL * N
    # and it is a fixed point: the predictive covariance W Wᵀ + σ² I matches scipy's (W up to sign)
    def cov(th):
        W = th[:3].reshape(3, 1)
        return W @ W.T + math.exp(2 * th[-1]) * np.eye(3)
    np.testing.assert_allclose(cov(theta_em), cov(best.x), atol=1e-3)
    np.testing.assert_allclose(theta_em[3:6], best.x[3:6], atol=1e-3)


# ------------------------------------------------------------------------------------------ ReLU decoder
def _relu(seed=0, D=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 6), nn.ReLU(), nn.Linear(6, D)).double()


def _curve(N, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(N, generator=g) * 2 * math.pi
    return torch.stack([t.cos(), t.sin(), 0.5 * (2 * t).cos()], -1) + 0.05 * torch.randn(N, 3, generator=g)


def _quad_log_evidence(decoder, x, sigma):
    W1, b1 = decoder[0].weight.detach().numpy()[:, 0], decoder[0].bias.detach().numpy()
    W2, b2 = decoder[2].weight.detach().numpy(), decoder[2].bias.detach().numpy()
    kinks = sorted(p for p in (-b1 / W1).tolist() if abs(p) < 12)
    edges = [-12.0] + kinks + [12.0]
    out = []
    for xn in x.numpy():
        obs = ~np.isnan(xn)

        def log_f(z):
            r = (xn - (W2 @ np.maximum(W1 * z + b1, 0) + b2))[obs] / sigma
            return -0.5 * z * z - 0.5 * math.log(2 * math.pi) - 0.5 * float(r @ r) \
                - obs.sum() * math.log(sigma * math.sqrt(2 * math.pi))
        peak = max(log_f(z) for z in np.linspace(-12, 12, 481))
        total = sum(integrate.quad(lambda z: math.exp(log_f(z) - peak), a, b, epsabs=0, epsrel=1e-11, limit=200)[0]
                    for a, b in zip(edges[:-1], edges[1:]))
        out.append(peak + math.log(total))
    return torch.tensor(out)


def test_item4_relu_log_evidence_with_nan_matches_quadrature():
    pyro.clear_param_store()
    dec = _relu()
    x = _knock_out(_curve(25), 0.4, 2)
    lp = log_evidence(_model(dec, 1, 0.3), x)
    torch.testing.assert_close(lp, _quad_log_evidence(dec, x, 0.3), rtol=QUAD_RTOL, atol=0)


def test_item4_em_with_missing_data_is_monotone_and_reports_the_observed_data_nll():
    pyro.clear_param_store()
    dec = _relu(seed=1)
    x = _knock_out(_curve(60), 0.3, 4)
    model = _model(dec, 1, 0.5)
    em = EM(model)
    nll = [em.evaluate_loss(x)] + [em.step(x) for _ in range(8)]
    assert all(b <= a + 1e-12 * abs(a) for a, b in zip(nll, nll[1:]))
    assert nll[-1] < nll[0] - 1.0
    sigma = float(pyro.param("obs_scale").detach())
    ref = -float(_quad_log_evidence(dec, x, sigma).sum())
    assert math.isclose(nll[-1], ref, rel_tol=QUAD_RTOL)


def test_item4_estep_with_missing_coordinates_satisfies_the_elbo_identity():
    """Q(θ_old) + H(z | x_obs) + H(x_mis | z) = Σ log p(x_obs) at the E-step's parameters (exact EM bound)."""
    dec = _relu(seed=2)
    x = _knock_out(_curve(30), 0.3, 5)
    mg = CPAMarginal(dec, 0.4, 1.0)
    st = e_step(mg, x)
    net = as_cpa_network(dec)
    with torch.no_grad():
        Q = expected_complete_loglik(net.affine_maps(), net, st.patterns, st, 0.16, 1.0)
        H_z = mg.posterior(x).entropy().sum()
    H_mis = float(torch.isnan(x).sum()) * 0.5 * math.log(2 * math.pi * math.e * 0.16)
    total = float(st.loglik.sum())
    assert abs(float(Q) + float(H_z) + H_mis - total) < 1e-9 * abs(total)
    torch.testing.assert_close(st.loglik, _quad_log_evidence(dec, x, 0.4), rtol=QUAD_RTOL, atol=0)


# ------------------------------------------------------------------------------------------ SVI and guides
def test_item4_svi_with_exact_posterior_gives_the_exact_observed_data_nll():
    pyro.clear_param_store()
    dec = _relu(seed=3)
    x = _knock_out(_curve(30), 0.3, 6)
    model = _model(dec, 1, 0.4)
    svi = SVI(model, ExactPosterior(model), pyro.optim.Adam({"lr": 0.0}), Trace_ELBO())
    losses = [svi.evaluate_loss(x) for _ in range(3)]
    ref = -float(_quad_log_evidence(dec, x, 0.4).sum())
    for loss in losses:  # zero variance: every particle is −log p(x_obs)
        assert math.isclose(loss, ref, rel_tol=QUAD_RTOL)


def test_item4_autonormal_svi_exact_elbo_and_kl_accept_nan():
    pyro.clear_param_store()
    dec = _relu(seed=4)
    x = _knock_out(_curve(20), 0.3, 7)
    model = _model(dec, 1, 0.4)
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(20):
        loss = svi.step(x)
    assert math.isfinite(loss)
    assert all(bool(torch.isfinite(p).all()) for p in dec.parameters())
    exact = exact_elbo(model, guide, x)
    elbo = Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    draws = torch.tensor([-elbo.loss(model, guide, x) for _ in range(10)])
    mc, se = float(draws.mean()), float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(exact.total) - mc) < 5 * se + 1e-9
    kl = posterior_kl(model, guide, x)
    assert bool((kl.per_datum > -1e-9).all())
    sigma = float(pyro.param("obs_scale").detach())  # trained by SVI
    assert math.isclose(float(kl.total), float(_quad_log_evidence(dec, x, sigma).sum()) - float(exact.total),
                        rel_tol=QUAD_RTOL)


def test_item4_exact_posterior_kl_is_zero_with_nan():
    pyro.clear_param_store()
    dec = _relu(seed=5)
    x = _knock_out(_curve(15), 0.3, 8)
    model = _model(dec, 1, 0.4)
    kl = posterior_kl(model, ExactPosterior(model), x)
    assert float(kl.per_datum.abs().max()) < 1e-9
