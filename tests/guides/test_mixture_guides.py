"""Mixture guides: exact density, unbiased true-ELBO estimators, and a bimodal posterior."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal
from pyro.nn import PyroParam
from torch import nn
from torch.distributions import constraints

from pyro_cpa.distributions import CPALikelihood, CPAMarginal
from pyro_cpa.guides import AmortizedMixture, AutoMixture, GaussianMixture
from pyro_cpa.infer import evaluate_guide, exact_elbo, posterior_kl
from pyro_cpa.nn import Abs


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mixture(K=3, S=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(K, generator=g)
    loc = torch.randn(K, S, generator=g)
    L = torch.tril(0.3 * torch.randn(K, S, S, generator=g), -1) + torch.diag_embed(0.5 + torch.rand(K, S, generator=g))
    return logits, loc, L


def test_gaussian_mixture_density_and_moments():
    logits, loc, L = _mixture()
    q = GaussianMixture(logits, loc, L)
    z = torch.randn(5, 2)
    ref = torch.stack([dist.MultivariateNormal(loc[k], scale_tril=L[k]).log_prob(z) for k in range(3)], -1)
    torch.testing.assert_close(q.log_prob(z), (ref + torch.log_softmax(logits, -1)).logsumexp(-1))
    s = q.sample((200_000,))
    torch.testing.assert_close(s.mean(0), q.mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(s.T), q.covariance_matrix, atol=0.03, rtol=0)
    assert q.expand((4,)).sample().shape == (4, 2)


def test_implicit_reparameterisation_gradient_is_unbiased():
    """E_q[zᵀMz + aᵀz] is closed form in (π, μ, Σ): compare its gradient with the mean pathwise gradient."""
    logits, loc, L = (t.clone().requires_grad_() for t in _mixture(seed=1))
    M, a = torch.tensor([[1.0, 0.3], [0.3, 2.0]]), torch.tensor([0.5, -1.0])

    def f(z):
        return torch.einsum("...s,st,...t->...", z, M, z) + z @ a

    w = torch.softmax(logits, -1)
    exact = (w * (torch.einsum("st,kts->k", M, L @ L.transpose(-1, -2)) + torch.einsum("ks,st,kt->k", loc, M, loc)
                  + loc @ a)).sum()
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(exact, [logits, loc])])
    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        f(GaussianMixture(logits, loc, L).rsample((10_000,))).mean(), [logits, loc])]) for _ in range(20)])
    z = (grads.mean(0) - ref) / (grads.std(0) / math.sqrt(20))
    assert z.abs().max() < 4.5, z


def _abs_model(x_scale=0.25):
    dec = nn.Sequential(nn.Linear(1, 1), Abs(), nn.Linear(1, 1)).double()
    with torch.no_grad():  # g(z) = |z|
        dec[0].weight.fill_(1.0), dec[0].bias.fill_(0.0), dec[2].weight.fill_(1.0), dec[2].bias.fill_(0.0)
    for p in dec.parameters():
        p.requires_grad_(False)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
            pyro.sample("x", CPALikelihood(dec, z, torch.tensor(x_scale)), obs=x)
    return model, dec


def _set_mixture(guide, logits, locs, scales):
    guide.logits = PyroParam(torch.tensor([logits]), constraints.real, 1)
    guide.locs = PyroParam(torch.tensor([locs])[..., None], constraints.real, 2)
    guide.scale_trils = PyroParam(torch.tensor([scales])[..., None, None], constraints.lower_cholesky, 3)


@pytest.mark.parametrize("estimator", ["score", "implicit"])
def test_trace_elbo_of_a_mixture_guide_is_an_unbiased_true_elbo(estimator):
    pyro.clear_param_store()
    model, dec = _abs_model()
    x = torch.tensor([[2.0], [0.3]])
    guide = AutoMixture(model, 2, estimator=estimator)
    guide(x)
    _set_mixture(guide, [[1.0, -1.0], [0.0, 0.5]], [[-1.9, 1.5], [-0.2, 0.4]], [[0.24, 0.4], [0.3, 0.2]])
    exact = float(exact_elbo(model, guide, x).total)  # S = 1: quadrature entropy, no sampling
    elbo = Trace_ELBO(num_particles=5000, vectorize_particles=True, max_plate_nesting=1)
    draws = torch.tensor([-elbo.loss(model, guide, x) for _ in range(40)])
    se = float(draws.std()) / math.sqrt(len(draws))
    assert abs(float(draws.mean()) - exact) < 4 * se + 1e-12, (float(draws.mean()), exact, se)
    assert exact < float(CPAMarginal(dec, 0.25).log_prob(x).sum())


def test_score_estimator_gradient_is_unbiased_including_the_weights():
    pyro.clear_param_store()
    model, _ = _abs_model()
    x = torch.tensor([[2.0]])
    guide = AutoMixture(model, 2)
    guide(x)
    _set_mixture(guide, [[1.0, -1.0]], [[-1.9, 1.9]], [[0.24, 0.24]])
    guide(x)  # registers the new values in the param store
    names = ["AutoMixture.logits", "AutoMixture.locs"]
    params = [pyro.param(n).unconstrained() for n in names]
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        exact_elbo(model, guide, x, differentiable=True).total, params)])
    elbo = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        -elbo.differentiable_loss(model, guide, x), params)]) for _ in range(20)])
    z = (grads.mean(0) - ref) / (grads.std(0) / math.sqrt(20))
    assert z.abs().max() < 4.5, (grads.mean(0), ref)
    assert abs(float(ref[0])) > 0.1  # the weights do get a gradient


def test_mixture_beats_the_best_gaussian_on_a_bimodal_posterior():
    """g(z) = |z|, x = 2, σx = 0.25: p(z | x) has two equal modes near ±1.88 (report the KLs)."""
    pyro.clear_param_store()
    model, dec = _abs_model()
    x = torch.tensor([[2.0]])
    elbo = Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1)

    torch.manual_seed(0)
    mix = AutoMixture(model, 2)
    svi = SVI(model, mix, pyro.optim.Adam({"lr": 0.05}), elbo)
    for _ in range(400):
        svi.step(x)
    kl_mix = float(posterior_kl(model, mix, x).total)

    torch.manual_seed(0)
    mvn = AutoMultivariateNormal(model)
    svi = SVI(model, mvn, pyro.optim.Adam({"lr": 0.05}), elbo)
    for _ in range(400):
        svi.step(x)
    kl_mvn = float(posterior_kl(model, mvn, x).total)

    # the best Gaussian: maximise the exact (differentiable) ELBO over (m, log s)
    best = math.inf
    for m0 in (-1.8, 0.0, 1.8):
        m, log_s = torch.tensor([m0], requires_grad=True), torch.tensor([math.log(0.3)], requires_grad=True)

        def gauss(x, m=m, log_s=log_s):
            with pyro.plate("data", 1):
                pyro.sample("z", dist.Normal(m, log_s.exp()).to_event(1))

        opt = torch.optim.LBFGS([m, log_s], max_iter=100, line_search_fn="strong_wolfe")

        def closure(gauss=gauss, opt=opt):
            opt.zero_grad()
            loss = -exact_elbo(model, gauss, x, differentiable=True).total
            loss.backward()
            return loss
        opt.step(closure)
        best = min(best, float(posterior_kl(model, gauss, x).total))
    print(f"bimodal KL: AutoMixture(K=2) {kl_mix:.4g}, AutoMultivariateNormal (SVI) {kl_mvn:.4g}, "
          f"best Gaussian {best:.4g}")
    assert best > 0.6  # ≈ log 2: a Gaussian covers one mode
    assert kl_mvn >= best - 1e-6
    assert kl_mix < 0.1 < best - 0.5


def test_amortized_mixture_with_a_subsampled_plate():
    pyro.clear_param_store()
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    x = torch.randn(30, 2)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0], subsample_size=6) as ind:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", CPALikelihood(decoder, z, 0.5), obs=x[ind])

    for estimator in ("score", "implicit"):
        guide = AmortizedMixture(model, 3, hidden=(16,), estimator=estimator)
        tr = pyro.poutine.trace(guide).get_trace(x)
        ind = tr.nodes["data"]["value"]
        q = guide.encode(x[ind])
        assert isinstance(q, GaussianMixture) and q.batch_shape == (6,) and q.loc.shape == (6, 3, 2)
        torch.testing.assert_close(tr.nodes["z"]["fn"].log_prob(tr.nodes["z"]["value"]),
                                   q.log_prob(tr.nodes["z"]["value"]))
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        assert all(math.isfinite(svi.step(x)) for _ in range(5))
        ev = evaluate_guide(model, guide, x, entropy_samples=500)
        assert ev.kl.per_datum.shape == (30,) and ev.method == "monte-carlo"
        assert (ev.kl.per_datum >= -4 * ev.kl.stderr).all()
