"""The M-step computes the frozen region maps once per parameter state (mstep.RegionMapsMemo, issue 12, "Wide
layers"): a memo hit returns exactly the maps a recomputation gives, a change of the parameters (also in place) or of
the patterns recomputes them, and the memoised M-step and EM steps are bit-for-bit those of the uncached code (every
map recomputed from scratch: the block updates called without ``rm``, or a memo that never hits)."""
import pytest
import torch
from torch import nn

from pyro_cpa.distributions import CPAMarginal
from pyro_cpa.infer import em_engine, mstep
from pyro_cpa.infer.em_engine import run_em
from pyro_cpa.infer.estep import e_step
from pyro_cpa.infer.mstep import (RegionMapsMemo, expected_complete_loglik, frozen_region_maps, m_step, update_layer,
                                  update_variances)
from pyro_cpa.nn import as_cpa_network, mlp


def _data(widths, N=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(N, generator=g, dtype=torch.float64) * 6.283185307179586
    x = torch.stack([t.cos(), t.sin(), 0.5 * (2 * t).sin()], -1)[:, :widths[-1]]
    return x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)


def _setup(widths, sx=0.3):
    dec = mlp(widths, lambda: nn.LeakyReLU(0.1), seed=1)
    net = as_cpa_network(dec)
    st = e_step(CPAMarginal(dec, sx, 1.0), _data(widths))
    return dec, net, st, torch.full((widths[-1],), sx ** 2)


def _same_maps(a, b):
    assert torch.equal(a.A, b.A) and torch.equal(a.b, b.b)
    for (P, p), (P2, p2) in zip(a.layer_inputs, b.layer_inputs):
        assert torch.equal(P, P2) and torch.equal(p, p2)


def test_memo_hits_only_for_the_same_parameters_and_patterns():
    _, net, st, _ = _setup([1, 6, 5, 2])
    maps = [(W.detach().clone(), v.detach().clone()) for W, v in net.affine_maps()]
    memo = RegionMapsMemo(net.activations)
    rm = memo.get(maps, st.patterns)
    _same_maps(rm, frozen_region_maps(maps, net.activations, st.patterns))
    assert memo.get([(W.clone(), v.clone()) for W, v in maps], st.patterns) is rm   # equal values: a hit
    maps[1][0][0, 0] += 0.25                                                        # in place: must be seen
    rm2 = memo.get(maps, st.patterns)
    assert rm2 is not rm and not torch.equal(rm2.A, rm.A)
    _same_maps(rm2, frozen_region_maps(maps, net.activations, st.patterns))
    assert memo.get(maps, list(st.patterns)) is not rm2                             # other patterns object: recompute


@pytest.mark.parametrize("widths,solver,sweeps", [([1, 6, 5, 2], "auto", 2), ([2, 5, 4, 3], "cg", 1)])
def test_m_step_bitwise_equal_to_uncached_block_updates(widths, solver, sweeps):
    """Reference: the same sweeps written with the public block updates, every region map recomputed."""
    _, net, st, obs_var = _setup(widths)
    prior_var = torch.ones(widths[0], dtype=torch.float64)
    res = m_step(net, st.patterns, st, obs_var, prior_var, sweeps=sweeps, tol=0.0, solver=solver)
    maps = [(W.detach().clone(), v.detach().clone()) for W, v in net.affine_maps()]
    ov, pv = obs_var.clone(), prior_var.clone()
    q = [float(expected_complete_loglik(maps, net, st.patterns, st, ov, pv))]
    with torch.no_grad():
        for _ in range(len(res.q_trace) - 1):
            for l in range(len(maps)):
                maps[l] = update_layer(maps, l, net, st, ov, solver=solver)
            ov, pv = update_variances(maps, net, st, ov, pv)
            q.append(float(expected_complete_loglik(maps, net, st.patterns, st, ov, pv)))
    assert res.q_trace == q
    assert torch.equal(res.obs_var, ov) and torch.equal(res.prior_var, pv)
    for (W, v), (W2, v2) in zip(res.maps, maps):
        assert torch.equal(W, W2) and torch.equal(v, v2)


class _NoMemo(RegionMapsMemo):
    def get(self, maps, patterns):
        return frozen_region_maps(maps, self.activations, patterns)


@pytest.mark.parametrize("schedule", ["layerwise", "joint"])
def test_em_steps_bitwise_equal_without_the_memo(schedule, monkeypatch):
    widths = [1, 6, 5, 2]
    x = _data(widths)

    def run():
        dec = mlp(widths, lambda: nn.LeakyReLU(0.1), seed=1)
        sx, sz, hist = run_em(dec, 0.4, 1.0, x, 3, schedule=schedule)
        return [h.nll_after for h in hist], sx, [p.detach().clone() for p in dec.parameters()]

    nll, sx, params = run()
    monkeypatch.setattr(em_engine, "RegionMapsMemo", _NoMemo)
    monkeypatch.setattr(mstep, "RegionMapsMemo", _NoMemo)
    nll0, sx0, params0 = run()
    assert nll == nll0 and torch.equal(torch.as_tensor(sx), torch.as_tensor(sx0))
    assert all(torch.equal(p, p0) for p, p0 in zip(params, params0))


def test_memo_recomputations_reuse_the_selections_and_skip_the_forms_with_the_same_bits():
    _, net, st, _ = _setup([1, 6, 5, 4, 2])
    maps = [(W.detach().clone(), v.detach().clone()) for W, v in net.affine_maps()]
    memo = RegionMapsMemo(net.activations)
    assert memo._static_selections
    memo.get(maps, st.patterns)
    for layer in (2, 0, 1, 3):   # recomputed from that layer on (from scratch for 0), selections taken from the memo
        maps[layer] = (maps[layer][0] * 1.1, maps[layer][1] - 0.05)
        rm = memo.get(maps, st.patterns)
        ref = frozen_region_maps(maps, net.activations, st.patterns)
        _same_maps(rm, ref)
        for (M, m), (M2, m2) in zip(rm.preactivations, ref.preactivations):
            assert torch.equal(M, M2) and torch.equal(m, m2)
        assert all(torch.equal(a, b) for a, b in zip(rm.slopes, ref.slopes))
        assert all(f is None for f in rm.forms) and all(f is not None for f in ref.forms)
    # a learned slope (PReLU) is read from its parameter: its selections are never reused
    prelu = as_cpa_network(nn.Sequential(nn.Linear(1, 4), nn.PReLU(), nn.Linear(4, 2)).double())
    assert not RegionMapsMemo(prelu.activations)._static_selections
