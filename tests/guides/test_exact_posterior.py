import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn
from torch.distributions import constraints

from pyro_cpa import PyroCPAError
from pyro_cpa.distributions import CPALikelihood, CPAMarginal
from pyro_cpa.guides import ExactPosterior


def _decoder(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.LeakyReLU(0.1), nn.Linear(8, 8), nn.LeakyReLU(0.1),
                         nn.Linear(8, 2)).double()


def _circle(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 2 * torch.pi
    return torch.stack([t.cos(), t.sin()], -1) + 0.05 * torch.randn(n, 2, generator=g)


def make_model(decoder, subsample_size=None):
    def model(x):
        pyro.module("decoder", decoder)
        obs_scale = pyro.param("obs_scale", torch.tensor(0.5), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as ind:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
            pyro.sample("x", CPALikelihood(decoder, z, obs_scale), obs=x[ind])
    return model


def test_trace_elbo_with_exact_posterior_is_exact_nll_on_every_particle():
    pyro.clear_param_store()
    decoder, x = _decoder(), _circle(50)
    model = make_model(decoder)
    guide = ExactPosterior(model)
    exact = -CPAMarginal(decoder, 0.5).log_prob(x).sum().item()
    for _ in range(5):
        loss = Trace_ELBO(num_particles=1).loss(model, guide, x)
        assert abs(loss - exact) <= 1e-8 * max(1.0, abs(exact))


def test_exact_posterior_with_subsampled_plate():
    pyro.clear_param_store()
    decoder, x = _decoder(1), _circle(60, seed=1)
    model = make_model(decoder, subsample_size=10)
    guide = ExactPosterior(model)
    per_datum = CPAMarginal(decoder, 0.5).log_prob(x).detach()
    guide_tr = pyro.poutine.trace(guide).get_trace(x)
    model_tr = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_tr)).get_trace(x)
    model_tr.compute_log_prob()
    guide_tr.compute_log_prob()
    ind = guide_tr.nodes["data"]["value"]
    assert len(ind) == 10
    lp = (model_tr.nodes["x"]["unscaled_log_prob"] + model_tr.nodes["z"]["unscaled_log_prob"]
          - guide_tr.nodes["z"]["unscaled_log_prob"])
    torch.testing.assert_close(lp, per_datum[ind], atol=1e-8, rtol=0)
    loss = Trace_ELBO().loss(model, guide, x)  # = -(N / B) * sum of log p(x_i) over a fresh subsample
    assert isinstance(loss, float) and math.isfinite(loss)


def test_exact_posterior_gradients_do_not_see_the_guide():
    """The surrogate loss gradient w.r.t. the decoder equals the gradient of -log p(x) (Fisher identity)."""
    pyro.clear_param_store()
    decoder, x = _decoder(2), _circle(30, seed=2)
    model = make_model(decoder)
    guide = ExactPosterior(model)
    guide_tr = pyro.poutine.trace(guide).get_trace(x)
    post = guide_tr.nodes["z"]["fn"]
    assert not any(t.requires_grad for t in (post.logits, post.loc, post.scale_tril, post.H, post.c))
    # average the surrogate gradients over particles: E_post[grad log p(x,z)] = grad log p(x) (Fisher)
    elbo = Trace_ELBO(num_particles=200)
    loss = elbo.differentiable_loss(model, guide, x)
    grads = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(decoder.parameters()))])
    exact = -CPAMarginal(decoder, pyro.param("obs_scale")).log_prob(x).sum()
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(exact, list(decoder.parameters()))])
    assert (grads - ref).norm() < 0.2 * ref.norm()


def test_non_cpa_model_is_rejected():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
            pyro.sample("x", dist.Normal(z.expand(-1, 2), 1.0).to_event(1), obs=x)
    with pytest.raises(PyroCPAError, match="CPALikelihood"):
        ExactPosterior(model)(torch.zeros(3, 2))


def test_autonormal_runs_on_the_same_model():
    pyro.clear_param_store()
    decoder, x = _decoder(3), _circle(40, seed=3)
    model = make_model(decoder)
    svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(5)]
    assert all(isinstance(v, float) for v in losses)
