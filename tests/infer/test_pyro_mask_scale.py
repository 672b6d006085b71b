"""Issue 11 item 1 (and the ``max_regions`` part of item 7): Pyro's ``poutine.mask``, ``poutine.scale`` and
``obs_mask`` are honoured by the exact tools, written as a Pyro user would.

Semantics under test (pyro_cpa.infer.structure): per datum, with s_z / s_x the latent / observed site's
scale × mask, the evidence term is L_n = s_z log ∫ p(z) p(x_n|z)^{s_x/s_z} dz (0 for a masked observation).
References are independent: scipy quadrature over z (S = 1), and EM on the kept / duplicated data.
"""
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from scipy import integrate
from torch import nn
from torch.distributions import constraints

from pyro_cpa.distributions import CPALikelihood
from pyro_cpa.errors import RegionBudgetExceeded
from pyro_cpa.infer import EM, collapse, empty_guide, exact_elbo, information_criteria, log_evidence, posterior_kl

#: quadrature of a smooth 1-D integrand with breakpoints at the kinks: far below this
QUAD_RTOL = 1e-8
#: two runs of EM on the same data written two ways differ by round-off only
EM_RTOL = 1e-8

SIGMA = 0.3


def _decoder(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 5), nn.ReLU(), nn.Linear(5, 2)).double()


def _data(n=100, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 2 * math.pi
    return torch.stack([t.cos(), t.sin()], -1) + 0.05 * torch.randn(n, 2, generator=g)


def _model(decoder, *, obs_mask_rows=None, mask=None, obs_scale=1.0, latent_scale=1.0, plate_scale=None,
           use_obs_mask=False, latent_mask=True):
    def model(x):
        pyro.module("decoder", decoder)
        s = pyro.param("obs_scale", torch.tensor(SIGMA), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=plate_scale if plate_scale is not None else 1.0):
                with poutine.scale(scale=latent_scale), poutine.mask(mask=latent_mask):
                    z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
                with poutine.scale(scale=obs_scale):
                    if use_obs_mask:
                        pyro.sample("x", CPALikelihood(decoder, z, s), obs=x, obs_mask=obs_mask_rows)
                    else:
                        with poutine.mask(mask=mask if mask is not None else True):
                            pyro.sample("x", CPALikelihood(decoder, z, s), obs=x)
    return model


def _kinks(decoder):
    W, v = decoder[0].weight.detach().reshape(-1), decoder[0].bias.detach()
    return sorted((-v / W).tolist())


def _numpy_decoder(decoder):
    W1, b1 = decoder[0].weight.detach().numpy()[:, 0], decoder[0].bias.detach().numpy()
    W2, b2 = decoder[2].weight.detach().numpy(), decoder[2].bias.detach().numpy()
    return lambda z: W2 @ np.maximum(W1 * z + b1, 0.0) + b2


def _quad_log_evidence(decoder, x, t=1.0, sigma=SIGMA):
    """log ∫ N(z; 0, 1) Π_{d observed} N(x_d; g_d(z), σ²)^t dz by adaptive quadrature, split at the kinks."""
    g = _numpy_decoder(decoder)
    edges = [-12.0] + [p for p in _kinks(decoder) if abs(p) < 12] + [12.0]
    out = []
    for xn in x.numpy():
        obs = ~np.isnan(xn)

        def log_f(z):
            r = (xn - g(z))[obs] / sigma
            lp = -0.5 * float(r @ r) - obs.sum() * math.log(sigma * math.sqrt(2 * math.pi))
            return -0.5 * z * z - 0.5 * math.log(2 * math.pi) + t * lp
        peak = max(log_f(z) for z in np.linspace(-12, 12, 481))
        total = sum(integrate.quad(lambda z: math.exp(log_f(z) - peak), a, b, epsabs=0, epsrel=1e-11, limit=200)[0]
                    for a, b in zip(edges[:-1], edges[1:]))
        out.append(peak + math.log(total))
    return torch.tensor(out)


def test_item1_mask_log_evidence():
    pyro.clear_param_store()
    dec, x = _decoder(), _data()
    keep = torch.arange(100) < 50
    lp = log_evidence(_model(dec, mask=keep), x)
    assert lp.shape == (100,)
    assert bool((lp[50:] == 0).all())  # masked data contribute exactly nothing
    ref = _quad_log_evidence(dec, x[:50])
    torch.testing.assert_close(lp[:50], ref, rtol=QUAD_RTOL, atol=0)


def test_item1_obs_mask_log_evidence():
    pyro.clear_param_store()
    dec, x = _decoder(), _data()
    keep = torch.arange(100) % 3 != 0
    x_garbage = x.clone()
    x_garbage[~keep] = 1e3  # values at unobserved positions must not matter
    lp = log_evidence(_model(dec, obs_mask_rows=keep, use_obs_mask=True), x_garbage)
    masked = log_evidence(_model(dec, mask=keep), x)
    torch.testing.assert_close(lp, masked, rtol=1e-12, atol=0)
    assert bool((lp[~keep] == 0).all())


@pytest.mark.parametrize("how", ["mask", "obs_mask"])
def test_item1_mask_em_fits_only_the_kept_rows(how):
    x = _data()
    keep = torch.arange(100) < 50
    dec_a, dec_b = _decoder(), _decoder()
    pyro.clear_param_store()
    masked = _model(dec_a, mask=keep) if how == "mask" else _model(dec_a, obs_mask_rows=keep, use_obs_mask=True)
    em_a = EM(masked)
    nll_a = [em_a.step(x) for _ in range(4)]
    sx_a = float(pyro.param("obs_scale").detach())
    pyro.clear_param_store()
    em_b = EM(_model(dec_b))
    nll_b = [em_b.step(x[:50]) for _ in range(4)]
    sx_b = float(pyro.param("obs_scale").detach())
    np.testing.assert_allclose(nll_a, nll_b, rtol=EM_RTOL)
    assert math.isclose(sx_a, sx_b, rel_tol=EM_RTOL)
    for pa, pb in zip(dec_a.parameters(), dec_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=EM_RTOL, atol=EM_RTOL)
    assert math.isclose(em_a.evaluate_loss(x), nll_a[-1], rel_tol=1e-10)


def test_item1_plate_scale_is_a_data_weight():
    """poutine.scale(w_n) on both sites ≡ repeating datum n w_n times (w_n ∈ {1, 2}): evidence and EM."""
    x = _data(40)
    w = (torch.arange(40) % 2 + 1).double()
    dup = torch.cat([x, x[w == 2]])
    dec_a, dec_b = _decoder(), _decoder()
    pyro.clear_param_store()
    weighted = _model(dec_a, plate_scale=w)
    lp = log_evidence(weighted, x)
    torch.testing.assert_close(lp, w * _quad_log_evidence(dec_a, x), rtol=QUAD_RTOL, atol=0)
    nll_a = [EM(weighted).step(x) for _ in range(3)]
    pyro.clear_param_store()
    nll_b = [EM(_model(dec_b)).step(dup) for _ in range(3)]
    np.testing.assert_allclose(nll_a, nll_b, rtol=EM_RTOL)


@pytest.mark.parametrize("mode", ["likelihood", "latent"])
def test_item1_beta_scale_is_a_tempered_likelihood(mode):
    """Scale 1/β on the observation (or β on the latent): L = s_z log ∫ p(z) p(x|z)^t dz, t = s_x/s_z."""
    beta = 4.0
    dec, x = _decoder(), _data(30)
    pyro.clear_param_store()
    model = _model(dec, obs_scale=1 / beta) if mode == "likelihood" else _model(dec, latent_scale=beta)
    s_z = 1.0 if mode == "likelihood" else beta
    lp = log_evidence(model, x)
    torch.testing.assert_close(lp, s_z * _quad_log_evidence(dec, x, t=1 / beta), rtol=QUAD_RTOL, atol=0)
    # the collapsed model (exact MLE by SVI) has the same loss
    loss = SVI(collapse(model), empty_guide, pyro.optim.Adam({"lr": 0.0}), Trace_ELBO()).evaluate_loss(x)
    assert math.isclose(loss, -float(lp.sum()), rel_tol=1e-10)
    # EM fits the tempered objective: monotone, and not the β = 1 fit
    em = EM(model)
    nll = [em.step(x) for _ in range(5)]
    assert all(b <= a + 1e-10 * abs(a) for a, b in zip(nll, nll[1:]))
    assert math.isclose(nll[-1], -float(log_evidence(model, x).sum()), rel_tol=1e-10)
    sx_beta = float(pyro.param("obs_scale").detach())
    pyro.clear_param_store()
    dec1 = _decoder()
    em1 = EM(_model(dec1))
    for _ in range(5):
        em1.step(x)
    assert abs(float(pyro.param("obs_scale").detach()) - sx_beta) > 1e-3


def test_item1_exact_elbo_is_the_expectation_of_pyros_elbo_under_a_mask():
    """exact_elbo of AutoNormal on a masked model = E[−Trace_ELBO loss] (Monte Carlo, 5 standard errors);
    the KL of a masked datum is KL(q_n ‖ N(0, 1)) in closed form."""
    pyro.clear_param_store()
    dec, x = _decoder(), _data(20)
    keep = torch.arange(20) < 12
    model = _model(dec, mask=keep)
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(20):
        svi.step(x)
    exact = exact_elbo(model, guide, x)
    elbo = Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    draws = torch.tensor([-elbo.loss(model, guide, x) for _ in range(10)])
    mc, se = float(draws.mean()), float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(exact.total) - mc) < 5 * se + 1e-9
    kl = posterior_kl(model, guide, x)
    assert bool((kl.per_datum > -1e-9).all())
    loc, scale = pyro.param("AutoNormal.locs.z").detach()[~keep, 0], pyro.param("AutoNormal.scales.z").detach()[~keep, 0]
    kl_prior = 0.5 * (loc.square() + scale.square() - 1) - scale.log()
    torch.testing.assert_close(kl.per_datum[~keep], kl_prior, rtol=1e-10, atol=1e-12)


def test_item1_masked_latent_with_kept_observation_is_refused():
    pyro.clear_param_store()
    dec, x = _decoder(), _data(10)
    model = _model(dec, latent_mask=torch.arange(10) < 5)
    with pytest.raises(Exception, match="improper"):
        log_evidence(model, x)


def test_item7_log_evidence_and_information_criteria_take_max_regions():
    pyro.clear_param_store()
    dec, x = _decoder(), _data(10)
    model = _model(dec)
    with pytest.raises(RegionBudgetExceeded):
        log_evidence(model, x, max_regions=2)
    with pytest.raises(RegionBudgetExceeded):
        information_criteria(model, x, max_regions=2)
    ic = information_criteria(model, x, max_regions=1000)
    assert math.isclose(ic.log_likelihood, float(log_evidence(model, x).sum()), rel_tol=1e-12)


def test_item1_subsampled_plate_with_mask_and_scale_uses_all_data_unscaled_by_the_subsampling():
    """The plate's subsampling factor N/B is not a user weight: a subsampled masked, tempered model has the
    evidence of the full-plate one."""
    dec, x = _decoder(), _data(30)
    keep = torch.arange(30) % 4 != 0

    def model(x, subsample_size=None):
        pyro.module("decoder", dec)
        s = pyro.param("obs_scale", torch.tensor(SIGMA), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
            with poutine.scale(scale=0.5), poutine.mask(mask=keep[idx]):
                pyro.sample("x", CPALikelihood(dec, z, s), obs=x[idx])
    pyro.clear_param_store()
    full = log_evidence(model, x)
    sub = log_evidence(model, x, subsample_size=7)
    torch.testing.assert_close(sub, full, rtol=1e-12, atol=0)
    torch.testing.assert_close(full, keep * _quad_log_evidence(dec, x, t=0.5), rtol=QUAD_RTOL, atol=0)
