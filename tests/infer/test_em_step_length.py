"""Issue 12, "Wide layers": the joint schedule's line search starts from the last step's length
(``initial_step`` / ``EMStepResult.next_step_size``), and the block E-step adds its blocks to the exact sum in
batches without changing a bit."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.distributions import constraints

from pyro_cpa.datasets import noisy_circle
from pyro_cpa.demo.circle import make_decoder
from pyro_cpa.distributions import CPALikelihood, CPAMarginal
from pyro_cpa.errors import PyroCPAError
from pyro_cpa.infer import EM, em_engine
from pyro_cpa.infer.em_engine import STEP_GROWTH, EStepCache, _block_e_step, em_step, run_em
from pyro_cpa.infer.estep import e_step
from pyro_cpa.infer.mstep import m_step
from pyro_cpa.infer.structure import DataWeights
from pyro_cpa.nn import as_cpa_network, mlp

NLL_RTOL = 1e-10   # agreement of a returned NLL with a fresh exact evaluation (rounding of N terms)


def _nll(dec, sx, sz, x) -> float:
    with torch.no_grad():
        return float(-CPAMarginal(dec, sx, sz).log_prob(x).sum())


def _expected_next(r, t0: float) -> float:
    """The documented rule: the accepted length after a backtrack, STEP_GROWTH times it (<= 1) after a first-trial
    acceptance, 1 after a rejection."""
    t = t0 * 0.5 ** r.backtracks
    return 1.0 if not r.accepted else (t if r.backtracks else min(1.0, STEP_GROWTH * t))


def _wide_data():
    gen = mlp([1, 24, 24, 24, 6], lambda: nn.LeakyReLU(0.1), seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        return CPAMarginal(gen, 0.3).sample((200,))


def test_run_em_threads_the_joint_step_length_and_stays_monotone_and_exact():
    x = _wide_data()
    dec = mlp([1, 24, 24, 24, 6], lambda: nn.LeakyReLU(0.1), seed=1)
    sx, sz, hist = run_em(dec, torch.tensor(0.5), torch.tensor(1.0), x, 8, schedule="joint", layer_solver="cg")
    t0 = 1.0
    for r in hist:
        assert r.nll_after <= r.nll_before + 1e-9 * abs(r.nll_before)
        assert r.step_size == (t0 * 0.5 ** r.backtracks if r.accepted else 0.0)
        assert r.next_step_size == _expected_next(r, t0)
        t0 = r.next_step_size
    assert any(0.0 < r.step_size < 1.0 and r.backtracks == 0 for r in hist)   # a first trial below t = 1 was taken
    assert all(b.nll_before == a.nll_after for a, b in zip(hist, hist[1:]))
    assert abs(_nll(dec, sx, sz, x) - hist[-1].nll_after) < NLL_RTOL * abs(hist[-1].nll_after)


def test_starting_from_the_last_length_spends_fewer_trials_than_halving_from_one():
    """The partition-moving joint M-step overshoots by a similar factor from step to step: starting each line search
    at the last accepted length avoids most of the trials (each an exact evaluation) that halving from t = 1 spends."""
    x = _wide_data()
    counts = []
    for thread in (True, False):
        dec = mlp([1, 24, 24, 24, 6], lambda: nn.LeakyReLU(0.1), seed=1)
        sx, sz, cache, t0, trials = torch.tensor(0.5), torch.tensor(1.0), EStepCache(), 1.0, 0
        for _ in range(8):
            r = em_step(dec, sx, sz, x, schedule="joint", layer_solver="cg", cache=cache, initial_step=t0)
            assert r.nll_after <= r.nll_before + 1e-9 * abs(r.nll_before)
            sx, sz, trials = r.obs_scale, r.prior_scale, trials + len(r.nll_trials)
            t0 = r.next_step_size if thread else 1.0
        counts.append(trials)
    assert counts[0] < counts[1]


def test_the_first_trial_is_the_m_step_scaled_by_initial_step():
    """θ_old + t0 (θ_new − θ_old), θ_new the closed-form M-step of the same statistics (mstep.m_step)."""
    x = noisy_circle(80, seed=5)
    dec = make_decoder(2)
    net = as_cpa_network(dec)
    sx, sz = torch.tensor(0.5), torch.tensor(1.0)
    old = [p.detach().clone() for p in dec.parameters()]
    st = e_step(CPAMarginal(dec, sx, sz), x)
    res = m_step(net, st.patterns, st, (sx ** 2).expand(2), sz ** 2)
    probe = make_decoder(2)
    as_cpa_network(probe).set_affine_maps(res.maps)
    new = [p.detach().clone() for p in probe.parameters()]
    t0 = 0.375
    r = em_step(dec, sx, sz, x, schedule="joint", initial_step=t0)
    assert r.accepted and r.backtracks == 0 and r.step_size == t0   # a short first step: accepted
    assert all(torch.equal(p, a + t0 * (b - a)) for p, a, b in zip(dec.parameters(), old, new))
    assert r.next_step_size == min(1.0, STEP_GROWTH * t0)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, math.nan])
def test_initial_step_outside_0_1_is_refused(bad):
    x = noisy_circle(20, seed=0)
    with pytest.raises(PyroCPAError, match="initial_step"):
        em_step(make_decoder(0), torch.tensor(0.5), torch.tensor(1.0), x, schedule="joint", initial_step=bad)


def test_em_trainer_threads_the_step_length():
    pyro.clear_param_store()
    x = _wide_data()
    dec = mlp([1, 24, 24, 24, 6], lambda: nn.LeakyReLU(0.1), seed=1)

    def model(x):
        pyro.module("decoder", dec)
        sx = pyro.param("obs_scale", torch.tensor(0.5, dtype=x.dtype), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(1, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", CPALikelihood(dec, z, sx), obs=x)

    em = EM(model, schedule="joint", layer_solver="cg")
    for _ in range(5):
        em.step(x)
    t0 = 1.0
    for r in em.history:
        assert r.next_step_size == _expected_next(r, t0)
        t0 = r.next_step_size
    assert any(r.step_size not in (0.0, 1.0) and r.backtracks == 0 for r in em.history)


def test_block_e_step_batches_its_exact_sum_without_changing_a_bit(monkeypatch):
    """ADD_BLOCKS blocks are added to the order-independent exact sum at once: 1, 2 or 16 at a time give the same
    statistics bit for bit (weights, a datum and a whole block without weight included)."""
    x = noisy_circle(5 * em_engine.STATS_BLOCK + 17, seed=1)
    obs = torch.ones(x.shape[0], dtype=x.dtype)
    obs[3] = 0.0
    obs[2 * em_engine.STATS_BLOCK:3 * em_engine.STATS_BLOCK] = 0.0   # a whole block without weight: skipped
    obs[300:310] = 2.0
    w = DataWeights(obs, torch.ones_like(obs))
    mg = CPAMarginal(make_decoder(1), torch.tensor(0.4), torch.tensor(1.0))
    out = []
    for n in (1, 2, 16):
        monkeypatch.setattr(em_engine, "ADD_BLOCKS", n)
        out.append(_block_e_step(mg, x, w))
    for st in out[1:]:
        assert all(torch.equal(a, b) for a, b in [(st.Z, out[0].Z), (st.X, out[0].X), (st.q, out[0].q),
                                                  (st.loglik, out[0].loglik)])
        assert (st.num_data, st.loglik_sum, st.loglik_abs_sum) == (out[0].num_data, out[0].loglik_sum,
                                                                    out[0].loglik_abs_sum)
