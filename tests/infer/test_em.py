import copy
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
from pyro_cpa.distributions import CPALikelihood
from pyro_cpa.guides import ExactPosterior
from pyro_cpa.infer import EM, collapse, empty_guide, log_evidence


def _circle(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 2 * math.pi
    return torch.stack([t.cos(), t.sin()], -1) + 0.05 * torch.randn(n, 2, generator=g)


def _decoder(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.LeakyReLU(0.1), nn.Linear(8, 8), nn.LeakyReLU(0.1),
                         nn.Linear(8, 2)).double()


def make_model(decoder):
    def model(x):
        pyro.module("decoder", decoder)
        obs_scale = pyro.param("obs_scale", torch.tensor(0.5), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
            pyro.sample("x", CPALikelihood(decoder, z, obs_scale), obs=x)
    return model


def test_em_svi_and_exact_mle_on_one_model_by_swapping_the_trainer():
    x = _circle(100)
    results = {}
    for name in ("svi", "mle", "em"):
        pyro.clear_param_store()
        decoder = _decoder()
        model = make_model(decoder)
        if name == "svi":
            trainer = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        elif name == "mle":
            trainer = SVI(collapse(model), empty_guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        else:
            trainer = EM(model, ExactPosterior(model))
        losses = [trainer.step(x) for _ in range(5)]
        assert all(isinstance(v, float) and math.isfinite(v) for v in losses)
        results[name] = -log_evidence(model, x).sum().item()
    # EM's 5 exact steps beat 5 gradient steps of either kind on the exact NLL
    assert results["em"] < results["mle"] and results["em"] < results["svi"]


def test_em_is_monotone_and_reports_the_exact_nll():
    pyro.clear_param_store()
    x = _circle(120, seed=1)
    decoder = _decoder(1)
    model = make_model(decoder)
    em = EM(model, ExactPosterior(model))
    prev = em.evaluate_loss(x)
    for _ in range(10):
        nll = em.step(x)
        assert nll <= prev + 1e-9 * max(1.0, abs(prev))
        assert abs(nll - em.evaluate_loss(x)) <= 1e-9 * max(1.0, abs(nll))
        prev = nll
    assert abs(prev + log_evidence(model, x).sum().item()) < 1e-8 * abs(prev)
    assert pyro.param("obs_scale").item() < 0.5  # sigma_x was updated in the param store


def test_em_resumes_from_param_store_and_state_dict():
    x = _circle(80, seed=2)
    pyro.clear_param_store()
    decoder = _decoder(2)
    model = make_model(decoder)
    em = EM(model, ExactPosterior(model))
    straight = [em.step(x) for _ in range(6)]

    pyro.clear_param_store()
    decoder = _decoder(2)
    model = make_model(decoder)
    em = EM(model)
    first = [em.step(x) for _ in range(3)]
    saved_params = copy.deepcopy(pyro.get_param_store().get_state())
    saved_decoder = copy.deepcopy(decoder.state_dict())

    pyro.clear_param_store()
    decoder2 = _decoder(99)  # different initial weights, overwritten by the saved state
    decoder2.load_state_dict(saved_decoder)
    model2 = make_model(decoder2)
    pyro.get_param_store().set_state(saved_params)
    em2 = EM(model2, ExactPosterior(model2))
    rest = [em2.step(x) for _ in range(3)]
    assert first + rest == pytest.approx(straight, rel=1e-10, abs=1e-10)


def test_em_rejects_other_guides_and_bad_options():
    pyro.clear_param_store()
    model = make_model(_decoder())
    with pytest.raises(PyroCPAError, match="ExactPosterior"):
        EM(model, AutoNormal(model))
    em = EM(model, obs_noise="diagonal")
    with pytest.raises(PyroCPAError, match="diagonal"):
        em.step(_circle(10))
