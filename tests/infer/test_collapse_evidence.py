import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn
from torch.distributions import constraints

from pyro_cpa.distributions import CPALikelihood, CPAMarginal
from pyro_cpa.infer import collapse, count_free_parameters, empty_guide, information_criteria, log_evidence


def _setup(seed=0, subsample_size=None):
    torch.manual_seed(seed)
    decoder = nn.Sequential(nn.Linear(1, 6), nn.LeakyReLU(0.1), nn.Linear(6, 2)).double()
    t = torch.rand(80) * 2 * math.pi
    x = torch.stack([t.cos(), t.sin()], -1) + 0.05 * torch.randn(80, 2)

    def model(x):
        pyro.module("decoder", decoder)
        s = pyro.param("obs_scale", torch.tensor(0.5), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as ind:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
            pyro.sample("x", CPALikelihood(decoder, z, s), obs=x[ind])
    return decoder, x, model


def test_collapsed_model_loss_is_exact_nll_and_training_decreases_it():
    pyro.clear_param_store()
    decoder, x, model = _setup()
    svi = SVI(collapse(model), empty_guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    first = svi.evaluate_loss(x)
    exact = -CPAMarginal(decoder, 0.5).log_prob(x).sum().item()
    assert abs(first - exact) < 1e-9 * abs(exact)
    losses = [svi.step(x) for _ in range(30)]
    assert losses[-1] < losses[0]
    assert abs(svi.evaluate_loss(x) + log_evidence(model, x).sum().item()) < 1e-8 * abs(losses[-1])


def test_log_evidence_uses_all_data_with_a_subsampled_plate():
    pyro.clear_param_store()
    decoder, x, model = _setup(subsample_size=10)
    lp = log_evidence(model, x)
    assert lp.shape == (80,)
    torch.testing.assert_close(lp, CPAMarginal(decoder, 0.5).log_prob(x).detach())


def test_information_criteria_count_parameters():
    pyro.clear_param_store()
    decoder, x, model = _setup()
    k = count_free_parameters(model, x)
    assert k == (1 * 6 + 6) + (6 * 2 + 2) + 1
    ic = information_criteria(model, x)
    assert ic.num_data == 80 and ic.num_params == k
    assert math.isclose(ic.aic, 2 * k - 2 * ic.log_likelihood)
    assert math.isclose(ic.bic, k * math.log(80) - 2 * ic.log_likelihood)
