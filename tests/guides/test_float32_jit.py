"""Issue 11 items 2 (float32 models) and 3 (JIT), from the Pyro user's side.

Item 2: under Pyro's default dtype (float32) every guide works with SVI, Predictive and Importance, and what the
exact tools hand to the program has the model's dtype while the exact computation stays float64.
Item 3: JitTrace_ELBO cannot trace the exact computations; it must refuse at the first step with
NotTraceableError and leave the parameters untouched (it used to write NaN into them, even at lr = 0).
"""
import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Importance, JitTrace_ELBO, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn
from torch.distributions import constraints

from pyro_cpa.distributions import CPALikelihood, CPAMarginal
from pyro_cpa.errors import NotTraceableError
from pyro_cpa.guides import AmortizedMixture, AmortizedNormal, AutoMixture, ExactPosterior
from pyro_cpa.infer import collapse, empty_guide

#: float32 rounding of a sum of ~20 log-densities of size ~5 (relative), with margin.
FLOAT32_RTOL = 1e-5

GUIDES = {
    "exact": lambda m: ExactPosterior(m),
    "amortized_normal": lambda m: AmortizedNormal(m, hidden=(8,)),
    "amortized_normal_full": lambda m: AmortizedNormal(m, hidden=(8,), full_covariance=True),
    "auto_mixture": lambda m: AutoMixture(m, 2),
    "amortized_mixture": lambda m: AmortizedMixture(m, 2, hidden=(8,)),
}


@pytest.fixture
def pyro_default_dtype():
    """A Pyro user's session: float32 tensors by default (the test fixture restores float64 afterwards)."""
    torch.set_default_dtype(torch.float32)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def _decoder(S=1, D=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(S, 8), nn.ReLU(), nn.Linear(8, D))


def _model_for(decoder):
    def model(x):
        pyro.module("decoder", decoder)
        s = pyro.param("obs_scale", torch.tensor(0.5), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([decoder[0].in_features]).to_event(1))
            pyro.sample("x", CPALikelihood(decoder, z, s), obs=x)
    return model


def _exact_nll64(decoder, x, obs_scale=0.5):
    """−log p(x) in float64 on a float64 copy of the decoder (the reference)."""
    with torch.no_grad():
        return -float(CPAMarginal(copy.deepcopy(decoder).double(), obs_scale).log_prob(x.double()).sum())


@pytest.mark.parametrize("name", list(GUIDES))
def test_item2_float32_svi_predictive_importance(pyro_default_dtype, name):
    decoder = _decoder()
    x = torch.randn(20, 2)
    assert decoder[0].weight.dtype == x.dtype == torch.float32
    model = _model_for(decoder)
    guide = GUIDES[name](model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.0}), Trace_ELBO())
    loss = svi.step(x)
    if name == "exact":  # every particle is −log p(x): equal to the float64 reference up to float32 rounding
        ref = _exact_nll64(decoder, x)
        assert abs(loss - ref) <= FLOAT32_RTOL * abs(ref)
    pred = Predictive(model, guide=guide, num_samples=3)(x)
    assert pred["z"].dtype == torch.float32 and pred["z"].shape == (3, 20, 1)
    post = Importance(model, guide, num_samples=3).run(x)
    log_z = post.get_log_normalizer()
    assert log_z.dtype == torch.float32 and bool(torch.isfinite(log_z))
    if name == "exact":  # exact posterior proposal: every weight is p(x)
        assert abs(float(log_z) + ref) <= FLOAT32_RTOL * abs(ref)


def test_item2_float32_guide_site_is_exact_inside(pyro_default_dtype):
    """The guide's site hands float32 values to the model but keeps its exact float64 computation."""
    decoder = _decoder(S=2, D=3, seed=1)
    x = torch.randn(5, 3)
    model = _model_for(decoder)
    tr = pyro.poutine.trace(ExactPosterior(model)).get_trace(x)
    fn, z = tr.nodes["z"]["fn"], tr.nodes["z"]["value"]
    assert z.dtype == torch.float32 and fn.loc.dtype == torch.float64
    assert fn.log_prob(z).dtype == fn.mean.dtype == fn.variance.dtype == torch.float32
    exact = fn.mean.double()
    torch.testing.assert_close(fn.mean, exact.float())  # the cast of the float64 mean, nothing recomputed
    assert fn.sample((4,)).dtype == torch.float32


def test_item2_float32_cpa_marginal_and_collapsed_model(pyro_default_dtype):
    decoder = _decoder()
    x = torch.randn(10, 2)
    d = CPAMarginal(decoder, torch.tensor(0.5))
    assert d.model_dtype == torch.float32 and d.dtype == torch.float64
    for t in (d.sample((3,)), d.mean, d.variance, d.covariance_matrix, d.log_prob(x)):
        assert t.dtype == torch.float32
    x_nan = x.clone()
    x_nan[0, 1] = float("nan")
    mean, cov = d.impute(x_nan)
    assert mean.dtype == cov.dtype == torch.float32
    ref = _exact_nll64(decoder, x)
    assert abs(-float(d.log_prob(x).sum().detach()) - ref) <= FLOAT32_RTOL * abs(ref)
    svi = SVI(collapse(_model_for(decoder)), empty_guide, pyro.optim.Adam({"lr": 0.0}), Trace_ELBO())
    assert abs(svi.step(x) - ref) <= FLOAT32_RTOL * abs(ref)


# ---------------------------------------------------------------------------------------------- item 3: JIT
def _jit_setup(collapsed: bool, guide_name: str | None):
    pyro.clear_param_store()
    decoder = _decoder().double()
    x = torch.randn(20, 2)
    model = _model_for(decoder)
    if collapsed:
        model, guide = collapse(model), empty_guide
    elif guide_name is None:
        model, guide = _handwritten_collapsed(decoder), empty_guide
    else:
        guide = GUIDES[guide_name](model)
    return decoder, x, model, guide


def _handwritten_collapsed(decoder):
    def model(x):
        pyro.module("decoder", decoder)
        s = pyro.param("obs_scale", torch.tensor(0.5), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", CPAMarginal(decoder, s), obs=x)
    return model


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # Pyro's own plate code warns under tracing
@pytest.mark.parametrize("case", ["exact_posterior", "collapse", "handwritten_cpa_marginal"])
def test_item3_jit_trace_elbo_refuses_exact_paths_and_leaves_params_intact(case):
    decoder, x, model, guide = _jit_setup(case == "collapse", "exact" if case == "exact_posterior" else None)
    before = {k: v.detach().clone() for k, v in decoder.state_dict().items()}
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.0}), JitTrace_ELBO())
    with pytest.raises(NotTraceableError, match="not traceable.*Trace_ELBO"):
        svi.step(x)
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert float(pyro.param("obs_scale").detach()) == pytest.approx(0.5, rel=1e-15)
    # the same program with Trace_ELBO still gives the exact NLL afterwards
    loss = SVI(model, guide, pyro.optim.Adam({"lr": 0.0}), Trace_ELBO()).step(x)
    with torch.no_grad():
        ref = -float(CPAMarginal(decoder, 0.5).log_prob(x).sum())
    assert loss == pytest.approx(ref, rel=1e-10)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # Pyro's own plate code warns under tracing
def test_item3_jit_refuses_the_implicit_mixture_estimator():
    _, x, model, _ = _jit_setup(False, "exact")
    guide = AutoMixture(model, 2, estimator="implicit")
    with pytest.raises(NotTraceableError, match="autograd.grad"):
        SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), JitTrace_ELBO()).step(x)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", ["auto_normal", "amortized_normal", "auto_mixture"])
def test_item3_jit_trace_elbo_works_with_variational_guides(name):
    """Guides without exact computation trace: losses stay finite and parameters move (lr > 0)."""
    decoder, x, model, _ = _jit_setup(False, "exact")
    guide = AutoNormal(model) if name == "auto_normal" else GUIDES[name](model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), JitTrace_ELBO())
    w0 = decoder[0].weight.detach().clone()
    losses = [svi.step(x) for _ in range(4)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert bool(torch.isfinite(decoder[0].weight).all()) and not torch.equal(decoder[0].weight.detach(), w0)
    assert bool(torch.isfinite(pyro.param("obs_scale")))
