"""Device hygiene without a GPU (issue 15): tensors the library creates take the device of their inputs.

A GPU bug of the form ``torch.randn(n, dtype=dt)`` (no ``device=``) is invisible on a CPU-only machine: the
tensor lands on the CPU, like the inputs. Two checks make it visible here:

* :class:`FactoryGuard`, a :class:`~torch.overrides.TorchFunctionMode`, records every tensor factory
  (``torch.zeros``, ``randn``, ``eye``, ``tensor``, …) called *directly from pyro_cpa code* without an
  explicit ``device=`` and fails listing ``file:line``. ``torch.set_default_device("meta")`` was the other
  option; it also trips over factory calls inside Pyro and torch.distributions that are not ours, and it
  reports a device mismatch far from the offending line, so the guard is used instead.
* every tensor the public API returns is on the input's device (the suite's device, see tests/conftest.py) and
  in the documented dtype (float64).

``*_like``/``new_*`` factories and ``torch.as_tensor`` of a tensor inherit their device and are allowed;
``torch.from_numpy`` (the documented SciPy/pycddlib/numpy enumeration steps) is CPU by definition and is
checked through the returned-device assertions instead.
"""
import math
import os
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn
from torch.distributions import constraints
from torch.overrides import TorchFunctionMode

import pyro_cpa
from pyro_cpa import linear_regions
from pyro_cpa.distributions import CPALikelihood, CPAMarginal, TruncatedGaussianMixture
from pyro_cpa.glm import BetaVAE, Bernoulli, GaussianEncoder, GLMDecoder, quadrature_log_prob
from pyro_cpa.guides import AmortizedNormal, AutoMixture, ExactPosterior
from pyro_cpa.infer import EM, collapse, empty_guide, exact_elbo, information_criteria, log_evidence, posterior_kl

PKG_DIR = os.path.dirname(os.path.abspath(pyro_cpa.__file__)) + os.sep

#: tensor factories that take ``device=``; called from pyro_cpa without it they use the default device
FACTORIES = frozenset({
    "zeros", "ones", "empty", "full", "eye", "arange", "range", "linspace", "logspace", "tensor", "as_tensor",
    "rand", "randn", "randint", "randperm", "normal", "bernoulli_", "empty_strided", "scalar_tensor",
    "tril_indices", "triu_indices", "sparse_coo_tensor",
})


class FactoryGuard(TorchFunctionMode):
    """Records ``file:line`` of factory calls made directly from pyro_cpa code without ``device=``."""

    def __init__(self):
        super().__init__()
        self.offenders: dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in FACTORIES and kwargs.get("device") is None:
            if not (name == "as_tensor" and args and isinstance(args[0], torch.Tensor)):
                caller = sys._getframe(1)
                path = caller.f_code.co_filename
                if path.startswith(PKG_DIR):
                    self.offenders[f"{path[len(PKG_DIR):]}:{caller.f_lineno}"] = f"torch.{name}"
        return func(*args, **kwargs)


@pytest.fixture
def guard():
    g = FactoryGuard()
    with g:
        yield g
    assert not g.offenders, "tensor factories without device= in pyro_cpa:\n" + "\n".join(
        f"  {where}: {fn}(...)" for where, fn in sorted(g.offenders.items()))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)
    elif hasattr(obj, "__dataclass_fields__"):
        for f in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, f))


def _on_input_device(obj, dtype=torch.float64, where=""):
    """Every tensor in ``obj`` is on the inputs' device (the suite's device: the tests' inputs are made there)."""
    device = torch.empty(0).device
    ts = list(_tensors(obj))
    assert ts, f"{where}: no tensor returned"
    for t in ts:
        assert t.device == device, f"{where}: returned a tensor on {t.device}, the inputs are on {device}"
        if t.is_floating_point():
            assert t.dtype == dtype, f"{where}: returned {t.dtype}, documented {dtype}"


def _net(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.LeakyReLU(0.2) if i % 2 else nn.ReLU())
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize("S", [1, 2, 3])
def test_linear_regions_and_marginal(S, guard):
    dec = _net([S, 5, 3])
    reg = linear_regions(dec)
    H, c = reg.polytopes()
    _on_input_device((H, c), where="polytopes")
    x = torch.randn(4, 3)
    m = CPAMarginal(dec, 0.4, 1.2)
    _on_input_device(m.log_prob(x), where="log_prob")
    post = m.posterior(x)
    _on_input_device((post.log_prob(torch.randn(4, S)), post.mean, post.covariance_matrix, post.sample((3,))),
                     where="posterior")
    _on_input_device((m.mean, m.covariance_matrix, m.sample((5,))), where="moments/sample")
    x_nan = x.clone()
    x_nan[:, 1] = math.nan
    _on_input_device(m.impute(x_nan), where="impute")


def test_truncated_gaussian_mixture(guard):
    dec = _net([1, 4, 2])
    post = CPAMarginal(dec, 0.3).posterior(torch.randn(3, 2))
    assert isinstance(post, TruncatedGaussianMixture)
    z = torch.randn(3, 1)
    _on_input_device((post.log_prob(z), post.sample((2,)), post.mean, post.variance, post.covariance_matrix,
                      post.cdf(z), post.entropy(num_samples=64)), where="TruncatedGaussianMixture")


def _circle_model(S=1, N=12):
    decoder = _net([S, 6, 2])
    t = torch.rand(N) * 2 * math.pi
    x = torch.stack([t.cos(), t.sin()], -1) + 0.05 * torch.randn(N, 2)

    def model(x):
        pyro.module("decoder", decoder)
        s = pyro.param("obs_scale", torch.tensor(0.5), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([S]).to_event(1))
            pyro.sample("x", CPALikelihood(decoder, z, s), obs=x)
    return model, x


def test_em_collapse_and_evidence(guard):
    pyro.clear_param_store()
    model, x = _circle_model()
    em = EM(model, ExactPosterior(model))
    assert math.isfinite(em.step(x))
    svi = SVI(collapse(model), empty_guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    assert math.isfinite(svi.step(x))
    _on_input_device(log_evidence(model, x), where="log_evidence")
    ic = information_criteria(model, x)
    assert math.isfinite(ic.aic) and math.isfinite(ic.bic)


@pytest.mark.parametrize("guide_cls", [ExactPosterior, AmortizedNormal, lambda m: AutoMixture(m, 2)],
                         ids=["ExactPosterior", "AmortizedNormal", "AutoMixture"])
def test_guides_svi_elbo_and_kl(guide_cls, guard):
    pyro.clear_param_store()
    model, x = _circle_model()
    guide = guide_cls(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    assert math.isfinite(svi.step(x))
    _on_input_device(exact_elbo(model, guide, x, entropy_samples=64), where="exact_elbo")
    _on_input_device(posterior_kl(model, guide, x, entropy_samples=64), where="posterior_kl")


def test_glm_decoder_model_step_and_quadrature(guard):
    pyro.clear_param_store()
    dec = GLMDecoder(_net([1, 5, 3]), Bernoulli())
    x = torch.bernoulli(torch.full((4, 3), 0.4))
    vae = BetaVAE(dec, GaussianEncoder(3, 1).double())
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    assert math.isfinite(svi.step(x))
    _on_input_device(quadrature_log_prob(dec, x), where="quadrature_log_prob S=1")
    dec2 = GLMDecoder(_net([2, 4, 3]), Bernoulli())
    _on_input_device(quadrature_log_prob(dec2, x[:2]), where="quadrature_log_prob S=2")
