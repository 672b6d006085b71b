"""Issue 12, "EM step cost": a step evaluates only what it must.

* the certified blocks (output layer, variances) rest on the EM bound NLL(θ) <= NLL(θ_e) − [Q(θ) − Q(θ_e)],
  checked here against likelihoods integrated by scipy quadrature (independent of the library's integrators);
* a layerwise step of an L-layer decoder runs L exact E-steps once the previous step's E-step is reused;
* the reused E-step gives bit-for-bit the trajectory of recomputing it, and is never reused after a change.
"""
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import integrate
from torch import nn
from torch.distributions import constraints

from pyro_cpa.datasets import noisy_circle
from pyro_cpa.demo.circle import make_decoder
from pyro_cpa.distributions import CPALikelihood, CPAMarginal
from pyro_cpa.infer import EM
from pyro_cpa.infer.em_engine import EStepCache, em_step, run_em
from pyro_cpa.infer.estep import e_step
from pyro_cpa.infer.mstep import expected_complete_loglik, update_layer, update_variances
from pyro_cpa.nn import as_cpa_network, mlp

QUAD_RTOL = 1e-11  # requested relative accuracy of each scipy quadrature (S = 1 integrands are smooth per piece)
NLL_RTOL = 1e-10   # agreement of the returned NLL with a fresh exact evaluation (rounding of N terms)


def _nll(dec, sx, sz, x) -> float:
    with torch.no_grad():
        return float(-CPAMarginal(dec, sx, sz).log_prob(x).sum())


def _nll_quad(dec, sx: float, x: torch.Tensor) -> float:
    """−Σ_n log ∫ N(z; 0, 1) N(x_n; g(z), sx² I) dz by adaptive quadrature, split at the decoder's kinks."""
    net = as_cpa_network(dec)
    with torch.no_grad():
        pre, _ = net.preactivations(torch.linspace(-12, 12, 200001, dtype=torch.float64).unsqueeze(-1))
    zs = np.linspace(-12, 12, 200001)
    kinks = sorted({float(zs[i]) for p in pre for u in range(p.shape[-1])
                    for i in np.nonzero(np.diff(np.sign(p[:, u].numpy())))[0]})
    D = x.shape[1]
    total = 0.0
    for xn in x.numpy():
        def dens(z, xn=xn):
            with torch.no_grad():
                g = dec(torch.tensor([[z]], dtype=torch.float64))[0].numpy()
            return math.exp(-0.5 * z * z - 0.5 * float(((xn - g) ** 2).sum()) / sx ** 2) \
                / (math.sqrt(2 * math.pi) * (2 * math.pi * sx ** 2) ** (D / 2))
        edges = [-12.0] + kinks + [12.0]
        p = sum(integrate.quad(dens, a, b, epsabs=0.0, epsrel=QUAD_RTOL, limit=200)[0]
                for a, b in zip(edges, edges[1:]))
        total -= math.log(p)
    return total


def test_em_bound_of_the_partition_preserving_blocks_against_quadrature():
    """Updating the output layer and σx keeps the partition: the frozen-pattern Q is then the EM lower bound,
    NLL(θ) <= NLL(θ_e) − [Q(θ) − Q(θ_e)], the certificate em_step accepts them on without evaluating them."""
    x = noisy_circle(25, seed=4)
    dec = make_decoder(1)
    sx0, sz = torch.tensor(0.4), torch.tensor(1.0)
    net = as_cpa_network(dec)
    st = e_step(CPAMarginal(dec, sx0, sz), x)
    maps = [(W.detach().clone(), v.detach().clone()) for W, v in net.affine_maps()]
    q0 = float(expected_complete_loglik(maps, net, st.patterns, st, sx0 ** 2, sz ** 2))
    L = len(maps) - 1
    maps[L] = update_layer(maps, L, net, st, (sx0 ** 2).expand(2))
    ov, _ = update_variances(maps, net, st, (sx0 ** 2).expand(2), sz ** 2)
    q1 = float(expected_complete_loglik(maps, net, st.patterns, st, ov, sz ** 2))
    nll_e = _nll_quad(dec, float(sx0), x)
    net.set_affine_maps(maps)
    nll_new = _nll_quad(dec, float(ov[0].sqrt()), x)
    gain = q1 - q0
    assert gain > 1.0                                    # a real step, not a trivial bound
    assert nll_new <= nll_e - gain + 1e-8 * abs(nll_e)   # the EM bound, up to the quadrature's accuracy
    assert abs(nll_e + float(st.loglik.sum())) < 1e-9 * abs(nll_e)   # the E-step's NLL is the quadrature's


def _s2_case():
    """(40 data drawn from the seed-0 [2, 8, 8, 3] decoder with σx = 0.3, a fresh seed-1 decoder to fit)."""
    gen = mlp([2, 8, 8, 3], lambda: nn.LeakyReLU(0.1), seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        x = CPAMarginal(gen, 0.3).sample((40,))
    return x, mlp([2, 8, 8, 3], lambda: nn.LeakyReLU(0.1), seed=1)


@pytest.mark.parametrize("merge", [False, True])
def test_s2_step_runs_one_e_step_per_layer_and_stays_monotone_and_exact(merge):
    """S = 2, [2, 8, 8, 3]: after the first step, 3 E-steps per step (2 verified hidden blocks, 1 end point)
    instead of 5; the output layer and σx are accepted on the certificate. Merged (the S = 2 default), the
    certified run is verified with the first hidden block: 2 E-steps per step."""
    x, dec = _s2_case()
    sx, sz, hist = run_em(dec, torch.tensor(0.5), torch.tensor(1.0), x, 3, merge_certified=merge)
    assert not hist[0].e_step_reused and all(h.e_step_reused for h in hist[1:])
    for h in hist:
        assert h.nll_after <= h.nll_before + 1e-9 * abs(h.nll_before)
        assert h.certified_blocks == 2 and h.log_prob_evals == 0
        # one E-step per verified trial (backtracks included), one for the end point unless merged, one unless
        # reused
        assert h.e_steps == len(h.nll_trials) + (0 if h.e_step_reused else 1)
    if merge:
        assert all(h.merged_blocks == 1 for h in hist if h.backtracks == 0)
        assert any(h.e_steps == 2 and h.backtracks == 0 for h in hist[1:])
    else:
        assert all(h.merged_blocks == 0 for h in hist)
        assert any(h.e_steps == 3 and h.backtracks == 0 for h in hist[1:])
    assert all(b.nll_before == a.nll_after for a, b in zip(hist, hist[1:]))
    assert abs(_nll(dec, sx, sz, x) - hist[-1].nll_after) < NLL_RTOL * abs(hist[-1].nll_after)


@pytest.mark.parametrize("px, order", [(True, "forward"), (False, "backward")])
def test_s2_merged_step_with_px_or_backward_order_stays_monotone_and_exact(px, order):
    """The merged run before the parameter-expanded block (px) or, in backward order, before the last hidden layer
    (only σx is certifiable there): monotone, the NLL reported exact."""
    x, dec = _s2_case()
    sx, sz, hist = run_em(dec, torch.tensor(0.5), torch.tensor(1.0), x, 3, merge_certified=True, px=px,
                          order=order)
    for h in hist:
        assert h.nll_after <= h.nll_before + 1e-9 * abs(h.nll_before)
        assert h.certified_blocks == (2 if order == "forward" else 1)
    assert any(h.merged_blocks == 1 for h in hist)               # the merged trial ran (and was accepted)
    assert all(b.nll_before == a.nll_after for a, b in zip(hist, hist[1:]))
    assert hist[-1].nll_after < hist[0].nll_before - 1.0
    assert abs(_nll(dec, sx, sz, x) - hist[-1].nll_after) < NLL_RTOL * abs(hist[-1].nll_after)


def test_s2_merged_trial_rejected_falls_back_to_the_certified_end_point(monkeypatch):
    """A merged trial (certified run + first hidden block, one E-step) that fails the monotonicity check: the step
    evaluates the run's end point (accepted by its certificate), then the block on fresh statistics — still
    monotone, the NLL reported exact, the wasted E-step counted as a backtrack."""
    import pyro_cpa.infer.em_engine as engine

    original = engine._Verifier.line_search

    def reject_merged(self, nll_ref, *args, max_backtracks=None, **kwargs):
        if max_backtracks == 0:   # only the merged trial asks for no halving: make it fail after evaluating it
            nll_ref = -math.inf
        return original(self, nll_ref, *args, max_backtracks=max_backtracks, **kwargs)

    monkeypatch.setattr(engine._Verifier, "line_search", reject_merged)
    x, dec = _s2_case()
    sx, sz, hist = run_em(dec, torch.tensor(0.5), torch.tensor(1.0), x, 3, merge_certified=True)
    for h in hist:
        assert h.nll_after <= h.nll_before + 1e-9 * abs(h.nll_before)
        assert h.merged_blocks == 0 and h.backtracks >= 1 and h.certified_blocks == 2
        # every trial an E-step: the rejected merged one, the run's end point, the two hidden blocks (+ backtracks)
        assert h.e_steps == len(h.nll_trials) + (0 if h.e_step_reused else 1) and len(h.nll_trials) >= 4
    assert hist[-1].nll_after < hist[0].nll_before - 1.0                               # it still makes progress
    assert abs(_nll(dec, sx, sz, x) - hist[-1].nll_after) < NLL_RTOL * abs(hist[-1].nll_after)


def _with_and_without_cache(x, steps, **kwargs):
    """em_step ``steps`` times from make_decoder(2), σx = 0.5, once with an EStepCache and once without:
    [(results, final decoder parameters, final σx, decoder)] in that order."""
    runs = []
    for cache in (EStepCache(), None):
        dec = make_decoder(2)
        sx, sz, out = torch.tensor(0.5), torch.tensor(1.0), []
        for _ in range(steps):
            r = em_step(dec, sx, sz, x, cache=cache, **kwargs)
            sx, sz = r.obs_scale, r.prior_scale
            out.append(r)
        runs.append((out, [p.detach().clone() for p in dec.parameters()], sx, dec))
    return runs


def test_reused_e_step_gives_the_recomputed_trajectory_bit_for_bit():
    (a, pa, sa, _), (b, pb, sb, _) = _with_and_without_cache(noisy_circle(90, seed=2), 4)
    assert [(r.nll_before, r.nll_after) for r in a] == [(r.nll_before, r.nll_after) for r in b]
    assert all(torch.equal(u, v) for u, v in zip(pa, pb)) and torch.equal(sa, sb)
    assert [r.e_step_reused for r in a] == [False, True, True, True] and not any(r.e_step_reused for r in b)


def _check_joint_evaluations(a, b, every_trial: bool):
    """Runs with (a) and without (b) a cache: the same trajectory bit for bit; with the cache, the accepted E-step
    trial is the next step's E-step. ``every_trial``: every trial is an E-step (S = 1); else only the first trial,
    when the previous step accepted its first trial."""
    assert [(r.nll_before, r.nll_after, r.backtracks) for r in a] == [(r.nll_before, r.nll_after, r.backtracks)
                                                                       for r in b]
    kept = []   # whether the step kept an E-step trial
    for prev, r in zip([None] + a[:-1], a):
        due = prev is None or every_trial or (prev.accepted and prev.backtracks == 0)
        trials = len(r.nll_trials) if every_trial else (1 if due else 0)
        assert r.e_steps == (0 if r.e_step_reused else 1) + trials
        assert r.log_prob_evals == len(r.nll_trials) - trials
        kept.append(r.accepted and (every_trial or (due and r.backtracks == 0)))
    # reused after an accepted E-step trial, and after a rejected step (θ_old restored: its own E-step)
    assert [r.e_step_reused for r in a] == [False] + [f or not r.accepted for f, r in zip(kept[:-1], a[:-1])]
    assert not any(r.e_step_reused for r in b) and all(r.e_steps == 1 for r in b)


def test_joint_step_evaluates_its_trials_by_e_steps_the_next_step_reuses():
    """schedule="joint" with a cache, S = 1: every trial is an E-step (the fused S = 1 kernel gives the moments with
    the likelihood), so every accepted step leaves the next step's E-step. The trajectory is bit for bit that of
    evaluating every trial by a likelihood (no cache), and the returned NLLs are fresh exact evaluations."""
    x = noisy_circle(90, seed=2)
    (a, pa, sa, dec), (b, pb, sb, _) = _with_and_without_cache(x, 5, schedule="joint")
    assert all(torch.equal(u, v) for u, v in zip(pa, pb)) and torch.equal(sa, sb)
    assert any(r.backtracks > 0 for r in a) and any(r.accepted and r.backtracks == 0 for r in a[:-1])
    _check_joint_evaluations(a, b, every_trial=True)
    assert all(r.e_step_reused for r in a[1:])
    assert abs(_nll(dec, sa, torch.tensor(1.0), x) - a[-1].nll_after) < NLL_RTOL * abs(a[-1].nll_after)


def test_joint_step_s2_evaluates_its_first_trial_by_an_e_step_after_a_first_trial_acceptance():
    """S = 2 (moments cost more than the likelihood): the first trial is an E-step when the last step accepted its
    first trial, later trials are likelihoods."""
    gen = mlp([2, 6, 3], lambda: nn.LeakyReLU(0.1), seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        x = CPAMarginal(gen, 0.3).sample((40,))
    runs = []
    for cache in (EStepCache(), None):
        dec = mlp([2, 6, 3], lambda: nn.LeakyReLU(0.1), seed=1)
        sx, sz, out = torch.tensor(0.5), torch.tensor(1.0), []
        for _ in range(4):
            r = em_step(dec, sx, sz, x, cache=cache, schedule="joint", sweeps=3)
            sx, sz = r.obs_scale, r.prior_scale
            out.append(r)
        runs.append(out)
    a, b = runs
    assert any(r.accepted and r.backtracks == 0 for r in a[:-1]) and any(r.backtracks > 0 for r in a[:-1])
    _check_joint_evaluations(a, b, every_trial=False)


def test_the_e_step_is_not_reused_after_any_change():
    x = noisy_circle(60, seed=3)
    dec = make_decoder(3)
    cache = EStepCache()
    sz = torch.tensor(1.0)
    r = em_step(dec, torch.tensor(0.5), sz, x, cache=cache)
    sx = r.obs_scale

    def step(sx_in, x_in, reused):
        before = _nll(dec, sx_in, sz, x_in)
        res = em_step(dec, sx_in, sz, x_in, cache=cache)
        assert res.e_step_reused is reused
        assert abs(res.nll_before - before) <= NLL_RTOL * abs(before)   # the E-step of the state passed in
        return res.obs_scale

    sx = step(sx.clone(), x, True)              # σx rebuilt with the same bits (as a Pyro trace does): reused
    with torch.no_grad():
        dec[4].bias.add_(0.05)                  # a parameter changed in place
    sx = step(sx, x, False)
    dec.load_state_dict({k: v.clone() for k, v in dec.state_dict().items()})   # same values, new versions
    sx = step(sx, x, False)
    with torch.no_grad():
        x[:5] += 0.1                            # the data changed in place
    sx = step(sx, x, False)
    sx = step(sx * (1 + 1e-12), x, False)       # another σx
    step(sx, x.clone(), False)                  # other data tensor (same values): identity, not values
    assert cache.hits == 1


def _model(decoder, sx_dtype):
    def model(x):
        pyro.module("decoder", decoder)
        sx = pyro.param("obs_scale", torch.tensor(0.5, dtype=sx_dtype), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(1, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", CPALikelihood(decoder, z, sx), obs=x)
    return model


@pytest.mark.parametrize("sx_dtype", [torch.float64, torch.float32])
def test_em_trainer_reuses_its_e_step_through_the_param_store(sx_dtype):
    """σx goes through the store (the param's dtype, its constraint transform exp ∘ log, which may change the last
    bits): EM keeps σx as the store gives it back, so its next step receives the same bits and reuses the E-step."""
    pyro.clear_param_store()
    x = noisy_circle(80, seed=5)
    em = EM(_model(make_decoder(4), sx_dtype))
    kept = []
    for _ in range(6):
        em.step(x)
        kept.append(pyro.param("obs_scale").detach().clone())
    hist = em.history
    for prev, h, stored in zip(hist, hist[1:], kept):
        assert h.e_step_reused == torch.equal(stored.to(prev.obs_scale), prev.obs_scale)
    assert sum(h.e_step_reused for h in hist[1:]) >= 1
    assert all(h.nll_after <= h.nll_before + 1e-9 * abs(h.nll_before) for h in hist)


def test_s3_blocks_are_all_verified():
    """S = 3 statistics carry quadrature error: nothing is certified (linear decoder: one region, cheap)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(50, 3, generator=g) @ torch.randn(3, 4, generator=g) + 0.3 * torch.randn(50, 4, generator=g)
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(3, 4)).double()
    _, _, hist = run_em(dec, torch.tensor(1.0), torch.tensor(1.0), x, 2)
    assert all(h.certified_blocks == 0 for h in hist)
    assert all(h.nll_after <= h.nll_before + 1e-9 * abs(h.nll_before) for h in hist)
    assert hist[1].e_step_reused and hist[1].e_steps == len(hist[1].nll_trials) == 2
