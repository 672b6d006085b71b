"""Exact ELBO and KL(q || p(z|x)) of guides on CPA models (pyro_cpa.infer.evaluation)."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal
from pyro.nn import PyroParam
from scipy import integrate
from torch import nn
from torch.distributions import constraints

from pyro_cpa import PyroCPAError
from pyro_cpa.distributions import CPALikelihood, CPAMarginal
from pyro_cpa.guides import AmortizedMixture, AmortizedNormal, AutoMixture, ExactPosterior
from pyro_cpa.infer import ExactMetrics, evaluate_guide, exact_elbo, gaussian_mixture_entropy, posterior_kl


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _decoder(S, D=2, width=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(S, width), nn.LeakyReLU(0.1), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, D)).double()


def make_model(decoder, S, subsample_size=None, obs_scale=0.5):
    def model(x):
        pyro.module("decoder", decoder)
        scale = pyro.param("obs_scale", torch.tensor(obs_scale), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as ind:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([S]).to_event(1))
            pyro.sample("x", CPALikelihood(decoder, z, scale), obs=x[ind])
    return model


def _data(n, D=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 2 * math.pi
    x = torch.stack([t.cos(), t.sin()], -1) + 0.1 * torch.randn(n, 2, generator=g)
    return x if D == 2 else torch.cat([x, torch.randn(n, D - 2, generator=g)], -1)


@pytest.mark.parametrize("S", [1, 2])
def test_exact_posterior_has_zero_kl(S):
    pyro.clear_param_store()
    decoder, x = _decoder(S, seed=S), _data(12, seed=S)
    model = make_model(decoder, S)
    ev = evaluate_guide(model, ExactPosterior(model), x)
    assert ev.method == "exact"
    assert ev.kl.per_datum.shape == (12,)
    assert ev.kl.per_datum.abs().max() <= 1e-10
    assert abs(float(ev.kl.total)) <= 1e-9
    torch.testing.assert_close(ev.log_evidence, CPAMarginal(decoder, 0.5).log_prob(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(ev.elbo.per_datum, ev.log_evidence, atol=1e-10, rtol=0)


def _ppca_posterior(decoder, x, obs_scale):
    W, b = decoder[0].weight.detach(), decoder[0].bias.detach()
    S = W.shape[1]
    prec = torch.eye(S) + W.T @ W / obs_scale ** 2
    cov = torch.linalg.inv(prec)
    mean = (x - b) @ W @ cov.T / obs_scale ** 2
    return mean, torch.linalg.cholesky(cov)


def test_linear_decoder_with_the_ppca_posterior_has_zero_kl():
    pyro.clear_param_store()
    S, D, N = 2, 3, 10
    torch.manual_seed(3)
    decoder = nn.Sequential(nn.Linear(S, D)).double()
    x = torch.randn(N, D)
    model = make_model(decoder, S)
    mean, L = _ppca_posterior(decoder, x, 0.5)

    def hand_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean, scale_tril=L))

    kl = posterior_kl(model, hand_guide, x)
    assert kl.method == "exact"
    assert kl.per_datum.abs().max() <= 1e-10

    guide = AutoMultivariateNormal(model)
    guide(x)
    guide.loc.data.copy_(mean.reshape(-1))
    big = torch.block_diag(*[L] * N)  # AutoMultivariateNormal: scale_tril = scale[:, None] * unit_lower
    diag = torch.diagonal(big)
    guide.scale = PyroParam(diag, dist.constraints.softplus_positive)
    guide.scale_tril = PyroParam(big / diag[:, None], dist.constraints.unit_lower_cholesky)
    torch.testing.assert_close(guide.get_posterior().scale_tril, torch.block_diag(*[L] * N))
    kl = posterior_kl(model, guide, x)
    assert kl.per_datum.abs().max() <= 1e-10
    assert abs(float(kl.total)) <= 1e-9


def _generic_guide(x):  # not Gaussian: evaluated by Monte Carlo
    loc = pyro.param("t_loc", torch.zeros(x.shape[0], 2))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.StudentT(5.0, loc, 0.7).to_event(1))


@pytest.mark.parametrize("S", [1, 2])
def test_kl_is_nonnegative_for_every_guide(S):
    pyro.clear_param_store()
    decoder, x = _decoder(S, seed=10 + S), _data(8, seed=S)
    model = make_model(decoder, S)
    guides = [AutoNormal(model), AutoMultivariateNormal(model), AutoDiagonalNormal(model), AmortizedNormal(model),
              AmortizedNormal(model, full_covariance=True), AutoMixture(model, 3), AmortizedMixture(model, 2),
              ExactPosterior(model)]
    if S == 2:
        guides.append(_generic_guide)
    for guide in guides:
        ev = evaluate_guide(model, guide, x, num_samples=4000, entropy_samples=2000)
        name = getattr(guide, "__name__", type(guide).__name__)
        assert torch.isfinite(ev.kl.per_datum).all(), name
        assert (ev.kl.per_datum >= -4 * ev.kl.stderr - 1e-10).all(), name
        assert float(ev.kl.total) >= -4 * float(ev.kl.total_stderr) - 1e-9, name
        if guide is _generic_guide:
            assert ev.method == "monte-carlo"
    ev = evaluate_guide(model, AutoDelta(model), x)
    assert ev.method == "degenerate" and torch.isinf(ev.kl.per_datum).all() and (ev.kl.per_datum > 0).all()


def _train(model, guide, x, steps, lr=0.03):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    for _ in range(steps):
        svi.step(x)


@pytest.mark.parametrize("S", [1, 2])
def test_gaussian_exact_elbo_matches_a_million_sample_monte_carlo(S):
    pyro.clear_param_store()
    decoder, x = _decoder(S, seed=20 + S), _data(3, seed=S)
    model = make_model(decoder, S)
    for guide in (AutoNormal(model, init_scale=0.5), AmortizedNormal(model, full_covariance=True)):
        guide(x)
        ex = exact_elbo(model, guide, x)
        mc = exact_elbo(model, guide, x, method="monte-carlo", num_samples=10 ** 6)
        assert ex.method == "exact" and mc.method == "monte-carlo"
        assert (ex.stderr == 0).all()
        assert ((ex.per_datum - mc.per_datum).abs() <= 4 * mc.stderr).all(), (ex.per_datum, mc.per_datum, mc.stderr)
        assert (mc.stderr < 5e-3).all()


@pytest.mark.parametrize("S", [1, 2])
def test_mixture_exact_elbo_matches_a_million_sample_monte_carlo(S):
    pyro.clear_param_store()
    decoder, x = _decoder(S, seed=30 + S), _data(3, seed=S)
    model = make_model(decoder, S)
    guide = AutoMixture(model, 3, init_scale=0.4)
    guide(x)
    ex = exact_elbo(model, guide, x, entropy_samples=200_000)
    mc = exact_elbo(model, guide, x, method="monte-carlo", num_samples=10 ** 6)
    assert ex.method == ("quadrature" if S == 1 else "monte-carlo")
    err = (ex.stderr.square() + mc.stderr.square()).sqrt()
    assert ((ex.per_datum - mc.per_datum).abs() <= 4 * err).all(), (ex.per_datum, mc.per_datum, err)


def test_mixture_entropy_quadrature_matches_adaptive_quadrature():
    logits = torch.tensor([[0.3, -1.0, 0.5], [2.0, 0.0, -3.0]])
    loc = torch.tensor([[-2.0, 0.1, 3.0], [0.0, 0.01, 40.0]])
    scale = torch.tensor([[0.5, 0.01, 1.5], [1.0, 0.003, 2.0]])
    H, err, method = gaussian_mixture_entropy(logits, loc[..., None], scale[..., None, None])
    assert method == "quadrature" and (err == 0).all()
    for i in range(2):
        w = torch.softmax(logits[i], -1).numpy()
        m, s = loc[i].numpy(), scale[i].numpy()

        def q(z):
            return float((w * torch.distributions.Normal(torch.tensor(m), torch.tensor(s)).log_prob(
                torch.tensor(z)).exp().numpy()).sum())

        pts = sorted(m.tolist())
        ref = sum(integrate.quad(lambda z: -q(z) * math.log(q(z)) if q(z) > 0 else 0.0, a, b, epsabs=1e-14,
                                 epsrel=1e-13, limit=500, points=[p for p in pts if a < p < b] or None)[0]
                  for a, b in [(-60.0, -1.0), (-1.0, 1.0), (1.0, 70.0)])
        assert abs(float(H[i]) - ref) < 1e-9, (float(H[i]), ref)


def test_subsampled_plate_is_evaluated_over_all_data():
    pyro.clear_param_store()
    decoder, x = _decoder(1, seed=5), _data(10, seed=5)
    full, sub = make_model(decoder, 1), make_model(decoder, 1, subsample_size=4)
    guide_sub = AutoNormal(sub, init_scale=0.3)
    _train(sub, guide_sub, x, 20)
    guide_full = AutoNormal(full, init_scale=0.3)  # same parameter names: reads the trained per-datum params
    a, b = evaluate_guide(sub, guide_sub, x), evaluate_guide(full, guide_full, x)
    assert a.kl.per_datum.shape == (10,)
    torch.testing.assert_close(a.kl.per_datum, b.kl.per_datum, atol=1e-12, rtol=0)
    amortized = AmortizedNormal(sub)
    _train(sub, amortized, x, 5)
    ev = evaluate_guide(sub, amortized, x)
    assert ev.kl.per_datum.shape == (10,) and (ev.kl.per_datum >= 0).all()


def test_differentiable_exact_elbo_and_bad_inputs():
    pyro.clear_param_store()
    decoder, x = _decoder(1, seed=6), _data(5, seed=6)
    model = make_model(decoder, 1)
    guide = AutoNormal(model)
    guide(x)
    ev = exact_elbo(model, guide, x, differentiable=True)
    loc = pyro.param("AutoNormal.locs.z").unconstrained()
    (grad,) = torch.autograd.grad(ev.total, [loc])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert not exact_elbo(model, guide, x).total.requires_grad
    with pytest.raises(PyroCPAError, match="method"):
        exact_elbo(model, guide, x, method="magic")


def test_exact_metrics_callback_records_curves():
    pyro.clear_param_store()
    decoder, x = _decoder(1, seed=7), _data(20, seed=7)
    model = make_model(decoder, 1)
    guide = AmortizedNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    metrics = ExactMetrics(model, guide, every=5)
    for step in range(12):
        loss = svi.step(x)
        metrics.update(step, x, loss=loss)
    h = metrics.history
    assert h["step"] == [0, 5, 10]
    for a, b, c in zip(h["nll"], h["elbo"], h["kl"]):
        assert abs(-a - b - c) < 1e-8 and c >= 0
    assert h["method"] == ["exact"] * 3 and len(h["loss"]) == 3
