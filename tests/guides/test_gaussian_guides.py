"""Gaussian guides on CPA models: Pyro's autoguides unchanged, and the amortised AmortizedNormal."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoMultivariateNormal, AutoNormal
from torch import nn
from torch.distributions import constraints

from pyro_cpa import PyroCPAError
from pyro_cpa.distributions import CPALikelihood
from pyro_cpa.guides import AmortizedNormal
from pyro_cpa.infer import posterior_kl


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _decoder(S, D=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(S, 8), nn.LeakyReLU(0.1), nn.Linear(8, D)).double()


def make_model(decoder, S, subsample_size=None):
    def model(x):
        pyro.module("decoder", decoder)
        obs_scale = pyro.param("obs_scale", torch.tensor(0.5), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as ind:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([S]).to_event(1))
            pyro.sample("x", CPALikelihood(decoder, z, obs_scale), obs=x[ind])
    return model


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 2 * math.pi
    return torch.stack([t.cos(), t.sin()], -1) + 0.05 * torch.randn(n, 2, generator=g)


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoMultivariateNormal, AutoDelta])
@pytest.mark.parametrize("S", [1, 2])
def test_pyro_autoguides_work_unchanged(guide_cls, S):
    pyro.clear_param_store()
    decoder, x = _decoder(S, seed=S), _data(16, seed=S)
    model = make_model(decoder, S)
    guide = guide_cls(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    assert any(k.startswith("decoder$$$") for k in pyro.get_param_store().keys())


@pytest.mark.parametrize("full_covariance", [False, True])
@pytest.mark.parametrize("S", [1, 2])
def test_amortized_normal_default_encoder_and_training(S, full_covariance):
    pyro.clear_param_store()
    decoder, x = _decoder(S, seed=10 + S), _data(32, seed=S)
    model = make_model(decoder, S)
    guide = AmortizedNormal(model, hidden=(16,), full_covariance=full_covariance)
    guide(x)
    assert guide.latent_dim == S and guide.data_dim == 2
    assert guide.encoder[0].in_features == 2
    assert guide.encoder[-1].out_features == (S + S * (S + 1) // 2 if full_covariance else 2 * S)
    fn = pyro.poutine.trace(guide).get_trace(x).nodes["z"]["fn"]
    assert isinstance(fn, dist.MultivariateNormal if full_covariance else dist.Independent)
    assert fn.batch_shape == (32,) and fn.event_shape == (S,)
    kl0 = float(posterior_kl(model, guide, x).total)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(60):
        svi.step(x)
    assert any(k.startswith("AmortizedNormal.encoder$$$") for k in pyro.get_param_store().keys())
    kl1 = float(posterior_kl(model, guide, x).total)
    assert kl1 < kl0


def test_amortized_normal_reads_the_subsampled_observations():
    pyro.clear_param_store()
    decoder, x = _decoder(1, seed=3), _data(40, seed=3)
    model = make_model(decoder, 1, subsample_size=8)
    guide = AmortizedNormal(model, hidden=(8,))
    for _ in range(3):
        tr = pyro.poutine.trace(guide).get_trace(x)
        ind = tr.nodes["data"]["value"]
        assert len(ind) == 8
        expected = guide.encode(x[ind])
        torch.testing.assert_close(tr.nodes["z"]["fn"].base_dist.loc, expected.base_dist.loc)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    assert all(math.isfinite(svi.step(x)) for _ in range(5))
    assert posterior_kl(model, guide, x).per_datum.shape == (40,)


def test_amortized_normal_custom_encoder_returning_a_tuple():
    pyro.clear_param_store()
    decoder, x = _decoder(2, seed=4), _data(10, seed=4)
    model = make_model(decoder, 2)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2).double()

        def forward(self, x):
            return self.lin(x), torch.full_like(x, 0.3)

    guide = AmortizedNormal(model, encoder=Encoder())
    fn = pyro.poutine.trace(guide).get_trace(x).nodes["z"]["fn"]
    torch.testing.assert_close(fn.base_dist.scale, torch.full((10, 2), 0.3))
    assert guide.median(x)["z"].shape == (10, 2)
    with pytest.raises(PyroCPAError, match="nn.Module"):
        AmortizedNormal(model, encoder=lambda x: x)


def test_item10_lower_triangular_is_pyros_softplus_cholesky_with_the_documented_layout():
    """The raw vector fills the lower triangle row by row ((0,0), (1,0), (1,1), (2,0), ...), the diagonal goes through
    softplus (+ min_scale): written out entry by entry here, and equal to Pyro's transform on vec_to_tril_matrix."""
    from pyro.distributions.transforms import SoftplusLowerCholeskyTransform
    from torch.distributions.utils import vec_to_tril_matrix

    from pyro_cpa.guides.amortized import _lower_triangular

    S, min_scale = 3, 1e-6
    raw = torch.randn(4, 2, S * (S + 1) // 2) * 3
    L = _lower_triangular(raw, S, min_scale)
    expected = torch.zeros(4, 2, S, S)
    k = 0
    for i in range(S):
        for j in range(i + 1):
            expected[..., i, j] = torch.nn.functional.softplus(raw[..., k]) + min_scale if i == j else raw[..., k]
            k += 1
    torch.testing.assert_close(L, expected, rtol=0, atol=0)
    pyro_L = SoftplusLowerCholeskyTransform()(vec_to_tril_matrix(raw)) + min_scale * torch.eye(S)
    torch.testing.assert_close(L, pyro_L, rtol=0, atol=0)
    with pytest.raises(PyroCPAError, match="lower-triangular entries"):
        _lower_triangular(raw[..., :4], S, min_scale)
