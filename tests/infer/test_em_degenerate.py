"""Issue 11 item 8: degenerate data, seen from a Pyro program (a model + EM)."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.distributions import constraints

from pyro_cpa import PyroCPAError
from pyro_cpa.datasets import noisy_circle
from pyro_cpa.distributions import CPALikelihood
from pyro_cpa.infer import EM, log_evidence
from pyro_cpa.infer.em_engine import DEFAULT_MIN_OBS_SCALE, ObsScaleFloorWarning, em_step


def _decoder(seed=0, scale=1.0):
    torch.manual_seed(seed)
    dec = nn.Sequential(nn.Linear(1, 4), nn.LeakyReLU(0.1), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in dec.parameters():
            p.mul_(scale)
    return dec


def _model(decoder, plate=True):
    def model(x):
        pyro.module("decoder", decoder)
        obs_scale = pyro.param("obs_scale", torch.tensor(0.5), constraint=constraints.positive)
        if plate:
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
                pyro.sample("x", CPALikelihood(decoder, z, obs_scale), obs=x)
        else:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
            pyro.sample("x", CPALikelihood(decoder, z, obs_scale), obs=x)
    return model


def test_item8_empty_data():
    pyro.clear_param_store()
    em = EM(_model(_decoder()))
    with pytest.raises(PyroCPAError, match="at least one datum"):
        em.step(torch.zeros(0, 2))
    with pytest.raises(PyroCPAError, match="at least one datum"):
        em_step(_decoder(), torch.tensor(0.5), torch.tensor(1.0), torch.zeros(0, 2))


@pytest.mark.parametrize("case", ["one", "two", "identical"])
def test_item8_too_few_data_stop_at_the_named_floor_with_a_warning(case):
    """The decoder can pass through 1, 2 or identical points: the ML σx is 0. EM stops at min_obs_scale and
    warns; the floor is an argument of EM."""
    x = {"one": noisy_circle(1), "two": noisy_circle(2), "identical": torch.tensor([[0.3, -0.2]]).expand(6, 2)}[case]
    for floor in (DEFAULT_MIN_OBS_SCALE, 1e-3):
        pyro.clear_param_store()
        em = EM(_model(_decoder()), min_obs_scale=floor)
        with pytest.warns(ObsScaleFloorWarning, match="floor"):
            for _ in range(40):
                em.step(x)
                if float(pyro.param("obs_scale").detach()) <= floor * (1 + 1e-9):
                    break
        assert float(pyro.param("obs_scale").detach()) == pytest.approx(floor, rel=1e-9)
    with pytest.raises(PyroCPAError, match="min_obs_scale"):
        EM(_model(_decoder()), min_obs_scale=0.0).step(x)


def test_item8_vector_x_one_reading():
    """x of shape (D,) is one datum (as for log_evidence). A model without a plate reads it so; a model whose
    plate is sized by x.shape[0] would broadcast it over D latents, and EM refuses that with the fix."""
    x = torch.tensor([0.3, 0.5])
    pyro.clear_param_store()
    model = _model(_decoder(), plate=False)
    em = EM(model)
    nll = em.evaluate_loss(x)
    assert nll == pytest.approx(-log_evidence(model, x).sum().item(), rel=1e-12)
    with pytest.warns(ObsScaleFloorWarning):  # one datum: degenerate, but EM runs it as one datum
        for _ in range(3):
            em.step(x)
    pyro.clear_param_store()
    with pytest.raises(PyroCPAError, match=r"shape \(N, D\)"):
        EM(_model(_decoder())).step(x)


def test_item8_huge_decoder_weights():
    """Weights ×1e8 (reported as a torch INTERNAL ASSERT in the former lstsq fallback of the M-step, which is
    gone): EM steps stay finite and monotone; ×1e100 is refused with an explanation."""
    pyro.clear_param_store()
    x = noisy_circle(40, seed=1)
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(1, 8), nn.LeakyReLU(0.1), nn.Linear(8, 8), nn.LeakyReLU(0.1),
                            nn.Linear(8, 2)).double()
    with torch.no_grad():
        for p in decoder.parameters():
            p.mul_(1e8)
    em = EM(_model(decoder))
    prev = em.evaluate_loss(x)
    for _ in range(3):
        nll = em.step(x)
        assert math.isfinite(nll) and nll <= prev + 1e-12 * abs(prev)
        prev = nll
    assert all(bool(torch.isfinite(p).all()) for p in decoder.parameters())
    assert math.isfinite(float(pyro.param("obs_scale").detach()))
    # weights so large that float64 cannot represent the posterior: a clear error naming the cause and fix
    pyro.clear_param_store()
    with pytest.raises(PyroCPAError, match="Rescale the data and the decoder"):
        EM(_model(_decoder(scale=1e100))).step(x)
