import math

import numpy as np
import pytest
import torch
from scipy import optimize
from sklearn.decomposition import FactorAnalysis
from torch import nn

from pyro_cpa import PyroCPAError
from pyro_cpa.distributions import CPAMarginal
from pyro_cpa.glm import (Bernoulli, Binomial, Gamma, Gaussian, GLMDecoder, Poisson, approximate_objective,
                          approximate_objective_cpa, analytic_activity, measured_activity, mle, optimal_variational,
                          predicted_active_units, pseudo_observations, pseudo_variance)

#: exactness of closed forms in float64
EXACT = 1e-10
#: a generic optimiser must not beat the closed-form maximiser by more than this (objective units)
OPT_SLACK = 1e-6


def _gaussian_data(N=200, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, 2, generator=g) * torch.tensor([2.0, 0.8])
    return torch.randn(N, 2, generator=g) @ W.T + 0.4 * torch.randn(N, d, generator=g) + 1.0


def _bernoulli_data(N=300, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, 2, generator=g) * 1.5
    return torch.bernoulli(torch.sigmoid(torch.randn(N, 2, generator=g) @ W.T), generator=g)


def _poisson_data(N=300, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, 2, generator=g) * 0.5
    return torch.poisson(torch.exp(torch.randn(N, 2, generator=g) @ W.T + 0.5), generator=g)


@pytest.mark.parametrize("sigma", [0.3, 1.7])
def test_gaussian_affine_objective_is_exact_ppca_likelihood(sigma):
    S, D = 2, 5
    lin = nn.Linear(S, D)
    x = torch.randn(40, D) * 2
    lhat = approximate_objective(x, lin.weight.detach(), lin.bias.detach(), Gaussian(sigma ** 2), per_datum=True)
    exact = CPAMarginal(nn.Sequential(lin), sigma).log_prob(x).detach()
    assert (lhat - exact).abs().max() < EXACT
    fa = FactorAnalysis(n_components=S)
    fa.components_ = lin.weight.detach().T.numpy()
    fa.noise_variance_ = np.full(D, sigma ** 2)
    fa.mean_ = lin.bias.detach().numpy()
    fa.n_features_in_ = D
    np.testing.assert_allclose(lhat.numpy(), fa.score_samples(x.numpy()), rtol=0, atol=EXACT)


def _expanded_beta_elbo(x, W, b, fam, beta, mu, Sigma):
    """E_q[second-order expansion at ϑ = 0 of Σ_j log p(x_j|ϑ_j)] − β KL(q‖N(0,I)), computed directly."""
    F0, F1, F2 = fam.taylor_at_zero()
    phi = float(fam.dispersion)
    m = mu @ W.T + b
    v = torch.diagonal(W @ Sigma @ W.T)
    e2 = m ** 2 + v
    K = fam.base_measure(x).sum(-1)
    rec = ((x * m - F0 - F1 * m - 0.5 * F2 * e2) / phi).sum(-1) + K
    k = mu.shape[1]
    kl = 0.5 * (torch.trace(Sigma) + (mu ** 2).sum(-1) - k - torch.logdet(Sigma))
    return rec - beta * kl


@pytest.mark.parametrize("fam", [Gaussian(0.5), Bernoulli(), Binomial(3), Poisson()], ids=lambda f: f.name)
@pytest.mark.parametrize("beta", [0.5, 1.0, 3.0])
def test_objective_equals_expanded_elbo_at_optimal_q(fam, beta):
    d, k = 6, 3
    x = {"gaussian": _gaussian_data(50, d), "bernoulli": _bernoulli_data(50, d), "binomial": None,
         "poisson": _poisson_data(50, d)}[fam.name]
    if x is None:
        x = torch.distributions.Binomial(3, logits=torch.randn(50, d)).sample()
    W, b = torch.randn(d, k), torch.randn(d) * 0.3
    mu, Sigma = optimal_variational(x, W, b, fam, beta)
    direct = _expanded_beta_elbo(x, W, b, fam, beta, mu, Sigma)
    lhat = approximate_objective(x, W, b, fam, beta, per_datum=True)
    assert (direct - lhat).abs().max() < 1e-9
    # and q is optimal: perturbing μ or Σ can only lower the expanded objective
    for eps in (1e-3, -1e-3):
        assert (_expanded_beta_elbo(x, W, b, fam, beta, mu + eps, Sigma) <= direct + 1e-12).all()
        assert (_expanded_beta_elbo(x, W, b, fam, beta, mu, Sigma * (1 + eps)) <= direct + 1e-12).all()


def _optimise(x, fam, kappa, beta, learn_sigma, seed):
    """Maximise L̂ over (W, b[, log σ²]) with scipy L-BFGS from a random start."""
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    n_w = d * kappa
    theta0 = np.concatenate([rng.normal(size=n_w) * 0.5, rng.normal(size=d) * 0.5]
                            + ([np.array([0.0])] if learn_sigma else []))

    def f(theta):
        t = torch.tensor(theta, requires_grad=True)
        W, b = t[:n_w].view(d, kappa), t[n_w:n_w + d]
        disp = torch.exp(t[-1]) if learn_sigma else None
        val = -approximate_objective(x, W, b, fam, beta, dispersion=disp)
        (g,) = torch.autograd.grad(val, t)
        return float(val.detach()), g.numpy()

    res = optimize.minimize(f, theta0, jac=True, method="L-BFGS-B",
                            options={"maxiter": 20000, "maxfun": 40000, "ftol": 1e-15, "gtol": 1e-10})
    return -res.fun


@pytest.mark.parametrize("case", [
    ("gaussian-fixed", 0.5), ("gaussian-fixed", 1.0), ("gaussian-fixed", 6.0),
    ("gaussian-mle", 0.5), ("gaussian-mle", 1.0), ("gaussian-mle", 2.5),
    ("bernoulli", 1.0), ("bernoulli", 4.0), ("bernoulli", 40.0),
    ("poisson", 1.0), ("poisson", 20.0)])
def test_closed_form_mle_is_not_beaten_by_lbfgs(case):
    name, beta = case
    kappa = 3
    if name.startswith("gaussian"):
        x, fam = _gaussian_data(), Gaussian(0.3)
    elif name == "bernoulli":
        x, fam = _bernoulli_data(), Bernoulli()
    else:
        x, fam = _poisson_data(), Poisson()
    learn = name == "gaussian-mle"
    res = mle(x, fam, kappa, beta, dispersion="mle" if learn else None)
    closed = float(res.objective)
    assert closed == pytest.approx(float(approximate_objective(x, res.W, res.b, fam, beta,
                                                                dispersion=res.dispersion)), abs=1e-12)
    best = max(_optimise(x, fam, kappa, beta, learn, seed) for seed in (0, 1))
    assert best <= closed + OPT_SLACK
    assert best >= closed - 1e-4  # the optimiser did find the optimum: the check is not vacuous
    if beta >= 6.0:
        assert res.n_active < kappa  # β large enough to prune
    if learn:
        d = x.shape[1]
        kp = int((res.eigenvalues[:kappa] > res.cutoff).sum())
        assert float(res.dispersion) == pytest.approx(float(res.eigenvalues[kp:].sum()) / (d - beta * kp), rel=1e-12)


def test_mle_quantities_are_consistent():
    x, fam, beta, kappa = _bernoulli_data(), Bernoulli(), 2.0, 4
    res = mle(x, fam, kappa, beta)
    s2 = pseudo_variance(fam)
    assert float(res.cutoff) == pytest.approx(beta * 4.0)
    assert float(s2) == pytest.approx(4.0)
    y = pseudo_observations(x, fam)
    assert torch.allclose(res.b, y.mean(0), atol=EXACT)
    mu, Sigma = optimal_variational(x, res.W, res.b, fam, beta)
    assert torch.allclose(Sigma, res.Sigma_z, atol=EXACT)
    assert torch.allclose(mu, res.encode(x), atol=1e-9)
    # eq. (21) is exactly the sample variance of the optimal encoder means (eq. 20)
    assert torch.allclose(measured_activity(res.encode(x)), res.activity, atol=1e-10)
    # columns of Ŵ are orthogonal (R = I), pruned columns are zero
    G = res.W.T @ res.W
    assert torch.allclose(G - torch.diag(torch.diagonal(G)), torch.zeros_like(G), atol=1e-9)
    assert torch.all(res.W[:, ~(res.eigenvalues[:kappa] > res.cutoff)] == 0)


def test_active_units_decrease_with_beta_and_collapse():
    x = _gaussian_data(d=8)
    counts = [predicted_active_units(x, Gaussian(0.3), 5, beta) for beta in (0.1, 1.0, 10.0, 100.0, 1e4)]
    assert counts == sorted(counts, reverse=True) and counts[0] >= 2 and counts[-1] == 0
    res = mle(x, Gaussian(0.3), 5, 1e4)
    assert torch.all(res.W == 0) and torch.allclose(res.Sigma_z, torch.eye(5))  # posterior collapse
    act = analytic_activity(x, Gaussian(0.3), 5, 1.0)
    assert act.shape == (5,) and bool(((act >= 0) & (act < 1)).all())


def test_cpa_objective_uses_the_local_affine_piece():
    torch.manual_seed(3)
    d = 5
    x = _bernoulli_data(20, d)
    lin = nn.Linear(2, d)
    dec = GLMDecoder(nn.Sequential(lin), Bernoulli(), activation="tanh")
    z0 = torch.randn(20, 2)
    a = approximate_objective_cpa(x, dec, z0, per_datum=True)
    b = approximate_objective(x, 2 * lin.weight.detach(), 2 * lin.bias.detach(), Bernoulli(), per_datum=True)
    assert (a - b).abs().max() < EXACT
    net = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, d))
    dec = GLMDecoder(net, Poisson())
    val = approximate_objective_cpa(x, dec, z0, beta=2.0, per_datum=True)
    for i in (0, 7):
        zi = z0[i:i + 1].clone().requires_grad_(True)
        J = torch.autograd.functional.jacobian(lambda z: dec.natural_parameter(z)[0], zi)[:, 0, :]
        off = dec.natural_parameter(z0[i:i + 1])[0].detach() - J @ z0[i]
        ref = approximate_objective(x[i:i + 1], J, off, Poisson(), beta=2.0)
        assert float(val[i].detach()) == pytest.approx(float(ref.detach()), abs=EXACT)


def test_bad_input_raises():
    x = _bernoulli_data(20, 4)
    with pytest.raises(PyroCPAError, match="does not contain 0"):
        mle(torch.rand(10, 3) + 0.1, Gamma(2.0), 1)
    with pytest.raises(PyroCPAError, match="kappa"):
        mle(x, Bernoulli(), 5)
    with pytest.raises(PyroCPAError, match="kappa"):
        mle(x, Bernoulli(), 0)
    with pytest.raises(PyroCPAError, match="beta"):
        mle(x, Bernoulli(), 2, beta=0.0)
    with pytest.raises(PyroCPAError, match="Gaussian"):
        mle(x, Bernoulli(), 2, dispersion="mle")
    with pytest.raises(PyroCPAError, match="unbounded"):
        mle(torch.randn(3, 4), Gaussian(), 2, beta=1.0, dispersion="mle")
    with pytest.raises(PyroCPAError, match="W must be"):
        approximate_objective(x, torch.randn(3, 2), torch.zeros(4), Bernoulli())
    with pytest.raises(PyroCPAError, match="matrix"):
        approximate_objective(x[0], torch.randn(4, 2), torch.zeros(4), Bernoulli())
    with pytest.raises(PyroCPAError, match="dispersion"):
        approximate_objective(x, torch.randn(4, 2), torch.zeros(4), Bernoulli(), dispersion=-1.0)
    assert math.isfinite(float(approximate_objective(x, torch.randn(4, 2), torch.zeros(4), Bernoulli())))
