import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import nn

from pyro_cpa import NotCPAError, PyroCPAError
from pyro_cpa.distributions import CPALikelihood, CPAMarginal
from pyro_cpa.glm import (ACTIVITY_THRESHOLD, Bernoulli, BetaVAE, Gaussian, GaussianEncoder, GLMDecoder, Poisson,
                          beta_scaled_guide, he_init, measured_activity, mle, mle_b_init, train_svi)
from pyro_cpa.glm.families import EDFDistribution
from pyro_cpa.guides import AmortizedNormal

EXACT = 1e-10


def test_decoder_basics_and_errors():
    net = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 4))
    dec = GLMDecoder(net, "bernoulli", activation="tanh")
    z = torch.randn(7, 2)
    assert dec.rho == 2.0 and dec.latent_dim == 2 and dec.data_dim == 4
    assert torch.allclose(dec(z), 0.5 * torch.tanh(net(z)) + 0.5, atol=1e-14)
    lik = dec.likelihood(z)
    assert isinstance(lik.base_dist, EDFDistribution) and lik.event_shape == (4,)
    assert isinstance(GLMDecoder(net, Gaussian(0.5)).likelihood(z), CPALikelihood)
    with pytest.raises(NotCPAError):
        GLMDecoder(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 4)), Bernoulli())
    with pytest.raises(PyroCPAError, match="ρ = 1"):
        GLMDecoder(net, Gaussian(), activation=2.0)
    with pytest.raises(PyroCPAError, match="learn_dispersion"):
        GLMDecoder(net, Poisson(), learn_dispersion=True)
    with pytest.raises(PyroCPAError, match="beta"):
        dec.model(torch.zeros(3, 4), beta=-1.0)
    with pytest.raises(PyroCPAError):
        dec.natural_parameter(torch.randn(3, 3))


def test_gaussian_decoder_is_a_cpa_model():
    net = nn.Sequential(nn.Linear(2, 5), nn.LeakyReLU(0.2), nn.Linear(5, 3))
    dec = GLMDecoder(net, Gaussian(0.3 ** 2))
    x = torch.randn(6, 3)
    ref = CPAMarginal(net, 0.3).log_prob(x)
    assert torch.allclose(dec.exact_log_prob(x), ref, atol=EXACT)
    # AmortizedNormal reads the model's CPA structure and trains with the GaussianEncoder
    pyro.clear_param_store()
    guide = AmortizedNormal(dec.model, encoder=GaussianEncoder(3, 2))
    svi = SVI(dec.model, guide, Adam({"lr": 1e-2}), Trace_ELBO())
    assert torch.isfinite(torch.tensor(svi.step(x)))


@pytest.mark.parametrize("beta", [0.25, 1.0, 3.0])
def test_beta_scaling_of_the_pyro_objective(beta):
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 5))
    dec = GLMDecoder(net, Bernoulli())
    enc = GaussianEncoder(5, 2)
    vae = BetaVAE(dec, enc)
    x = torch.bernoulli(torch.full((8, 5), 0.4))
    guide_tr = poutine.trace(vae.guide).get_trace(x, beta)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x, beta)
    weight = model_tr.log_prob_sum() - guide_tr.log_prob_sum()
    z = guide_tr.nodes["z"]["value"]
    loc, scale = enc(x)
    q = torch.distributions.Normal(loc, scale).log_prob(z).sum()
    p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
    ref = dec.log_likelihood(x, z).sum() + beta * (p - q)
    assert torch.allclose(weight, ref, atol=1e-10)
    # any guide, wrapped: same weight; beta_mode="likelihood" gives the objective divided by β
    g2 = poutine.trace(beta_scaled_guide(vae.guide, beta)).get_trace(x, 1.0)
    assert torch.allclose(g2.log_prob_sum(), beta * torch.distributions.Normal(
        *enc(x)).log_prob(g2.nodes["z"]["value"]).sum(), atol=1e-10)
    g3 = poutine.trace(vae.guide).get_trace(x, 1.0)
    m3 = poutine.trace(poutine.replay(dec.model, trace=g3)).get_trace(x, beta, None, "likelihood")
    z3 = g3.nodes["z"]["value"]
    ref3 = dec.log_likelihood(x, z3).sum() / beta + torch.distributions.Normal(0.0, 1.0).log_prob(z3).sum()
    assert torch.allclose(m3.log_prob_sum(), ref3, atol=1e-10)


def _gaussian_beta_elbo(dec, enc, x, beta):
    """Exact β-ELBO of an affine Gaussian decoder with a Gaussian encoder (no sampling)."""
    W, b = dec.net[0].weight, dec.net[0].bias
    s2 = dec.dispersion
    loc, scale = enc(x)
    m = loc @ W.T + b
    rec = (-0.5 * ((x - m) ** 2).sum(-1) / s2 - 0.5 * ((scale ** 2) @ (W ** 2).sum(0)) / s2
           - 0.5 * x.shape[1] * torch.log(2 * torch.pi * s2))
    kl = 0.5 * (loc ** 2 + scale ** 2 - 1 - 2 * torch.log(scale)).sum(-1)
    return (rec - beta * kl).mean()


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_mle_b_init_gaussian_reaches_the_closed_form_objective(beta):
    torch.manual_seed(0)
    d, k = 8, 3
    x = torch.randn(300, 2) @ torch.randn(2, d) * 2 + 0.5 * torch.randn(300, d)
    dec = GLMDecoder(nn.Sequential(nn.Linear(k, d)), Gaussian(1.0), learn_dispersion=True)
    enc = GaussianEncoder(d, k)
    he_init(dec.net, enc)
    res = mle_b_init(enc, dec, x, beta)
    assert float(dec.dispersion.detach()) == pytest.approx(float(res.dispersion), rel=1e-12)
    with torch.no_grad():
        val = _gaussian_beta_elbo(dec, enc, x, beta)
        loc, scale = enc(x)
    assert torch.allclose(loc, res.encode(x), atol=1e-9)
    assert torch.allclose(scale ** 2, torch.diagonal(res.Sigma_z).expand_as(scale), atol=1e-12)
    # Gaussian: L̂ is the exact β-ELBO at the optimal q, and the diagonal q of R = I is optimal
    assert float(val) == pytest.approx(float(res.objective), abs=1e-9)


def test_mle_b_init_bernoulli_tanh_and_hidden_layers():
    torch.manual_seed(1)
    d, k = 10, 2
    x = torch.bernoulli(torch.sigmoid(torch.randn(200, 2) @ torch.randn(2, d) * 2))
    dec = GLMDecoder(nn.Sequential(nn.Linear(k, d)), Bernoulli(), activation="tanh")
    enc = GaussianEncoder(d, k)
    res = mle_b_init(enc, dec, x)
    assert torch.allclose(dec.net[0].weight, res.W / 2) and torch.allclose(dec.net[0].bias, res.b / 2)
    assert torch.all(enc.logvar.weight == 0)
    ref = mle(x, Bernoulli(), k)
    assert torch.allclose(ref.W, res.W)
    # over-parametrised nets (paper's rule): the extra inputs of the last layers get zero weights
    dec2 = GLMDecoder(nn.Sequential(nn.Linear(k, 6), nn.ReLU(), nn.Linear(6, d)), Bernoulli())
    enc2 = GaussianEncoder(d, k, hidden=(12,))
    mle_b_init(enc2, dec2, x, logvar_weight="keep")
    assert torch.all(dec2.net[2].weight[:, k:] == 0) and torch.all(enc2.loc.weight[:, d:] == 0)
    assert torch.any(enc2.logvar.weight != 0)
    with pytest.raises(PyroCPAError, match="GLMDecoder"):
        mle_b_init(enc, dec.net, x)
    with pytest.raises(PyroCPAError, match="loc"):
        mle_b_init(nn.Linear(d, k), dec, x)
    with pytest.raises(PyroCPAError, match="x must be"):
        mle_b_init(enc, dec, x[:, :3])


def test_training_improves_elbo_both_engines():
    torch.manual_seed(2)
    d, k = 6, 2
    x = torch.bernoulli(torch.sigmoid(torch.randn(100, 2) @ torch.randn(2, d) * 2))
    for engine in ("svi", "torch"):
        torch.manual_seed(0)
        vae = BetaVAE(GLMDecoder(nn.Sequential(nn.Linear(k, d)), Bernoulli()), GaussianEncoder(d, k))
        torch.manual_seed(5)
        before = float(vae.elbo(x, num_samples=64))
        hist = train_svi(vae, x, beta=1.0, num_steps=150, batch_size=50, lr=2e-2, log_every=50, engine=engine)
        torch.manual_seed(5)
        after = float(vae.elbo(x, num_samples=64))
        assert after > before + 0.5, engine
        assert [h["step"] for h in hist] == [0, 50, 100, 150]
    with pytest.raises(PyroCPAError, match="engine"):
        train_svi(vae, x, engine="jax")


def _affine_gaussian_vae(d, k, learn=True, hidden=(), seed=0):
    torch.manual_seed(seed)
    dec = GLMDecoder(nn.Sequential(nn.Linear(k, d)), Gaussian(0.3), learn_dispersion=learn)
    enc = GaussianEncoder(d, k, hidden=hidden)
    he_init(dec.net, enc)
    return BetaVAE(dec, enc)


@pytest.mark.parametrize("beta,hidden", [(1.0, ()), (2.5, (7,))])
def test_analytic_elbo_equals_monte_carlo(beta, hidden):
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(3)
        d, k = 6, 3
        x = torch.randn(40, 2) @ torch.randn(2, d) + 0.4 * torch.randn(40, d)
        vae = _affine_gaussian_vae(d, k, hidden=hidden, seed=4)
        with torch.no_grad():
            vae.encoder.logvar.bias.fill_(-0.7)  # non-trivial posterior variances
            exact = vae.analytic_elbo(x, beta, per_datum=True)
            # the exact formula, written out independently
            assert torch.allclose(exact.mean(), _gaussian_beta_elbo(vae.decoder, vae.encoder, x, beta), atol=1e-12)
            # many-sample Monte-Carlo estimate: each sample s gives a per-dataset-mean estimate e_s
            torch.manual_seed(5)
            loc, scale = vae.encoder(x)
            S = 20000
            z = loc + scale * torch.randn((S,) + loc.shape)
            kl = 0.5 * (loc ** 2 + scale ** 2 - 1 - 2 * torch.log(scale)).sum(-1)
            e = (vae.decoder.log_likelihood(x, z) - beta * kl).mean(-1)
        se = float(e.std() / S ** 0.5)
        assert abs(float(e.mean()) - float(exact.mean())) < 4 * se, (float(e.mean()), float(exact.mean()), se)
        # differentiable
        vae.zero_grad()
        vae.analytic_elbo(x, beta).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vae.parameters())
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("beta,learn", [(1.0, True), (4.0, True), (2.0, False)])
def test_analytic_engine_reaches_the_closed_form_optimum(beta, learn):
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        d, k = 8, 4
        x = (torch.randn(300, 3) * torch.tensor([3.0, 2.0, 1.0])) @ torch.linalg.qr(torch.randn(d, 3))[0].T \
            + 0.3 * torch.randn(300, d) + 1.0
        vae = _affine_gaussian_vae(d, k, learn=learn, seed=1)
        ref = mle(x, Gaussian(), k, beta, dispersion="mle" if learn else float(vae.decoder.dispersion))
        hist = train_svi(vae, x, beta=beta, num_steps=200, batch_size=None, lr=1e-2, log_every=100,
                         engine="analytic", lbfgs_steps=1500)
        assert hist[-1]["phase"] == "lbfgs" and hist[-1]["grad_norm"] < 1e-4
        with torch.no_grad():
            val = float(vae.analytic_elbo(x, beta))
            loc, _ = vae.encoder(x)
        # L̂ at the MLE is the global maximum of the exact β-ELBO: reached, not exceeded
        assert val == pytest.approx(float(ref.objective), abs=1e-4)
        assert val <= float(ref.objective) + 1e-9
        assert float(vae.decoder.dispersion.detach()) == pytest.approx(float(ref.dispersion), rel=1e-4)
        act = measured_activity(loc).sort(descending=True).values
        assert torch.allclose(act, ref.activity, atol=1e-4)
        assert int((act > ACTIVITY_THRESHOLD).sum()) == ref.n_active
    finally:
        torch.set_default_dtype(torch.float32)


def test_analytic_engine_rejects_other_families_and_decoders():
    x = torch.bernoulli(torch.full((20, 5), 0.4))
    vae = BetaVAE(GLMDecoder(nn.Sequential(nn.Linear(2, 5)), Bernoulli()), GaussianEncoder(5, 2))
    with pytest.raises(PyroCPAError, match="Gaussian"):
        train_svi(vae, x, num_steps=1, engine="analytic")
    with pytest.raises(PyroCPAError, match="Gaussian"):
        vae.analytic_elbo(x)
    deep = BetaVAE(GLMDecoder(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 5)), Gaussian(0.5)),
                   GaussianEncoder(5, 2))
    with pytest.raises(PyroCPAError, match="affine"):
        train_svi(deep, x, num_steps=1, engine="analytic")
    with pytest.raises(PyroCPAError, match="lbfgs_steps"):
        train_svi(deep, x, num_steps=1, engine="torch", lbfgs_steps=10)
