"""Exact EM and exact evaluation on data sharded over torch.distributed ranks (issue 13).

Multi-process tests spawn gloo processes on this machine (``torch.multiprocessing``, a ``file://`` rendezvous in a
temporary folder), each with one thread, and compare with one process holding all the data — the same code
without a process group. The reduction is exact and every block of ``STATS_BLOCK`` data is computed on the same
rows in every layout, so the trajectories agree bit for bit; the tests allow the issue's 1e-10 relative per step.
"""
import math
import os
import sys
import time
from datetime import timedelta
from fractions import Fraction

import pyro
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_cpa.datasets import noisy_circle
from pyro_cpa.demo.circle import make_decoder, make_model
from pyro_cpa.guides import ExactPosterior
from pyro_cpa.infer import EM, all_reduce_sum, exact_elbo, evaluate_guide, information_criteria, log_evidence
from pyro_cpa.infer.distributed import (MAX_TERMS, Comm, ExactSum, SoftFailure, agreed_failures, exact_sum,
                                        load_checkpoint, save_checkpoint, shard_range)
from pyro_cpa.infer.em_engine import STATS_BLOCK

REL_TOL = 1e-10           # the bound on the per-step relative NLL difference
EVAL_RTOL = 1e-12         # evaluation totals: one process sums in float, the ranks exactly (a few ulp apart)
GROUP_TIMEOUT_S = 60      # process-group timeout of the spawned ranks
SPAWN_DEADLINE_S = 600    # a spawned run that takes longer is a hang


# ---------------------------------------------------------------------------------------------- ExactSum
def _exact(values) -> Fraction:
    return sum((Fraction(float(v)) for v in values), Fraction(0))


def test_exact_sum_against_rational_arithmetic():
    """Error ≤ N · 2^-64 · max|v| + 3 ulp against exact rational sums, over 60 decades and with cancellation."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3000, 6, generator=g, dtype=torch.float64) * torch.logspace(-30, 30, 6, dtype=torch.float64)
    v[:, 5] = torch.cat([torch.full((1500,), 1e16), torch.full((1500,), -1e16)]) + torch.randn(3000, generator=g)
    s = exact_sum(v, 0)
    for j in range(6):
        ref = _exact(v[:, j])
        bound = v.shape[0] * 2.0 ** -64 * float(v[:, j].abs().max()) + 3 * math.ulp(abs(float(ref)))
        assert abs(Fraction(float(s[j])) - ref) <= Fraction(bound), j
    # the cancelling column: a float sum loses digits the exact one keeps
    assert abs(float(s[5]) - float(_exact(v[:, 5]))) < 1e-6


def test_exact_sum_is_independent_of_order_grouping_and_merging():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(1000, 4, generator=g, dtype=torch.float64) * torch.tensor([1e-300, 1.0, 1e200, 1e-5])
    v[::7, 1] = 0.0
    ref = exact_sum(v, 0)
    perm = torch.randperm(1000, generator=g)
    acc = ExactSum(4)
    for chunk in v[perm].split(37):
        acc.add(chunk)
    assert torch.equal(acc.value(), ref)
    a, b = ExactSum(4).add(v[600:]), ExactSum(4).add(v[:600])
    assert torch.equal(a.merge(b).value(), ref)
    assert torch.equal(exact_sum(v.flip(0), 0), ref)


def test_exact_sum_special_values():
    inf, nan = math.inf, math.nan
    v = torch.tensor([[1.0, inf, nan, -inf, 1.0, 0.0],
                      [2.0, -inf, 1.0, -inf, inf, 0.0]])
    out = exact_sum(v, 0)
    assert out[0] == 3.0 and math.isnan(out[1]) and math.isnan(out[2]) and out[3] == -inf and out[4] == inf
    assert out[5] == 0.0
    sub = torch.tensor([5e-324, 5e-324, 1e-310])   # subnormals are summed exactly too
    assert Fraction(float(exact_sum(sub))) == _exact(sub)
    with pytest.raises(ValueError, match="terms"):
        acc = ExactSum(1)
        acc.terms = MAX_TERMS
        acc.add(torch.ones(1, 1))


def test_shard_range_covers_the_data():
    for n, p in [(1000, 3), (7, 4), (0, 2)]:
        ranges = [shard_range(n, r, p) for r in range(p)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


# ---------------------------------------------------------------------------------------------- spawned ranks
def _fresh(seed=0):
    pyro.clear_param_store()
    decoder = make_decoder(seed)
    return decoder, make_model(decoder)


def _reference(n, steps):
    """One process, all data, no process group: NLLs, final decoder state, σx."""
    torch.set_default_dtype(torch.float64)
    decoder, model = _fresh()
    x = noisy_circle(n, seed=0)
    em = EM(model)
    nlls = [em.step(x) for _ in range(steps)]
    return {"nlls": nlls, "state": {k: v.clone() for k, v in decoder.state_dict().items()},
            "obs_scale": float(pyro.param("obs_scale").detach()), "model": model, "x": x}


def _shard(x, sizes, rank):
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


def _scenario_trajectory(rank, world, sizes, steps, out):
    decoder, model = _fresh()
    xs = _shard(noisy_circle(sum(sizes), seed=0), sizes, rank)
    em = EM(model, distributed=True)
    nlls = [em.step(xs) for _ in range(steps)]
    return {"nlls": nlls, "state": decoder.state_dict(), "obs_scale": float(pyro.param("obs_scale").detach()),
            "ic": information_criteria(model, xs, distributed=True),
            "elbo_total": float(exact_elbo(model, ExactPosterior(model), xs, distributed=True).total)}


def _scenario_fast(rank, world, sizes, steps, out):
    x = noisy_circle(sum(sizes), seed=0)
    xs = _shard(x, sizes, rank)
    decoder, model = _fresh()
    em = EM(model, distributed=True)
    nlls, ckpt = [], os.path.join(out, "ckpt.pt")
    for i in range(steps):
        nlls.append(em.step(xs))
        if i + 1 == steps // 2:
            save_checkpoint(ckpt, decoder, i + 1)
    res = {"nlls": nlls, "state": decoder.state_dict(), "obs_scale": float(pyro.param("obs_scale").detach())}
    # exact evaluation of all ranks' data at the final parameters
    res["ic"] = information_criteria(model, xs, distributed=True)
    res["elbo_total"] = float(exact_elbo(model, ExactPosterior(model), xs, distributed=True).total)
    res["kl_total"] = float(evaluate_guide(model, ExactPosterior(model), xs, distributed=True).kl.total)
    res["loglik"] = float(all_reduce_sum(log_evidence(model, xs)))
    res["loss"] = em.evaluate_loss(xs)
    # resume from the checkpoint on a differently initialised decoder: the same trajectory
    decoder2, model2 = _fresh(seed=1)
    step0 = load_checkpoint(ckpt, decoder2)["step"]
    em2 = EM(model2, distributed=True)
    res["resumed"] = [em2.step(xs) for _ in range(steps - step0)]
    res["resumed_state"] = decoder2.state_dict()
    # one rank raises inside EM.step (bad input): every rank stops with an error naming it
    bad = xs[:, :1] if rank == world - 1 else xs
    t0 = time.time()
    try:
        em2.step(bad)
        res["failure"] = None
    except Exception as e:   # noqa: BLE001 - the test inspects what each rank raised
        res["failure"] = (type(e).__name__, str(e))
    res["failure_s"] = time.time() - t0
    # an expected failure on one rank (agreed_failures) is raised as SoftFailure on every rank
    try:
        with agreed_failures(Comm(dist.group.WORLD), (ZeroDivisionError,)):
            if rank == 0:
                raise ZeroDivisionError("a candidate failed here")
        all_reduce_sum(torch.ones(3))      # the others' next collective
        res["soft"] = None
    except SoftFailure as e:
        res["soft"] = str(e)
    res["after_failure"] = float(all_reduce_sum(torch.tensor([1.0])))   # the group still works
    return res


def _scenario_death(rank, world, sizes, steps, out):
    decoder, model = _fresh()
    xs = _shard(noisy_circle(sum(sizes), seed=0), sizes, rank)
    em = EM(model, distributed=True)
    em.step(xs)
    if rank == 1:
        os._exit(3)                      # dies between two collectives
    t0 = time.time()
    try:
        em.step(xs)
        return {"failure": None}
    except Exception as e:   # noqa: BLE001
        return {"failure": (type(e).__name__, str(e)), "failure_s": time.time() - t0}


_SCENARIOS = {"trajectory": _scenario_trajectory, "fast": _scenario_fast, "death": _scenario_death}


def _worker(rank, world, init_file, out, scenario, sizes, steps):
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    result = _SCENARIOS[scenario](rank, world, sizes, steps, out)
    torch.save(result, os.path.join(out, f"{scenario}_{rank}.pt"))
    if scenario != "death":              # (in "death" the group is broken: do not wait on it)
        dist.barrier()                   # no rank closes its connections while a peer still uses them
    # Leave without tearing gloo down: its shutdown can race the peer's closing sockets and abort the process
    # ("terminate called without an active exception", exit code -6; seen once in CI on a 2-core machine after
    # every collective had completed). That is torch's teardown, not the computation under test; the results
    # are saved and every collective is done, so the test skips it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(tmp_path, scenario, sizes, steps, allow_exit=False):
    """Run ``scenario`` on len(sizes) spawned gloo ranks; their results (None for a rank that left no result)."""
    world = len(sizes)
    init = tmp_path / f"init_{scenario}_{world}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(init), str(tmp_path), scenario, tuple(sizes), steps))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + SPAWN_DEADLINE_S
    try:
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.time()))
        assert not any(p.is_alive() for p in procs), f"the {world} ranks of '{scenario}' hung"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    if not allow_exit:
        assert [p.exitcode for p in procs] == [0] * world, "a rank failed (its traceback is in the captured stderr)"
    files = [tmp_path / f"{scenario}_{r}.pt" for r in range(world)]
    return [torch.load(f, weights_only=False) if f.exists() else None for f in files]


def _assert_same_run(ranks, ref, steps):
    for r, res in enumerate(ranks):
        assert len(res["nlls"]) == steps
        assert res["nlls"] == pytest.approx(ref["nlls"][:steps], rel=REL_TOL, abs=0.0), r
        assert res["obs_scale"] == pytest.approx(ref["obs_scale"], rel=REL_TOL, abs=0.0)
        for k, v in ref["state"].items():
            torch.testing.assert_close(res["state"][k], v, rtol=REL_TOL, atol=0.0)
        for k, v in ranks[0]["state"].items():   # the decoder is identical on every rank
            assert torch.equal(res["state"][k], v), (r, k)


def test_two_ranks_match_one_process_and_resume_and_fail_together(tmp_path):
    """2 gloo ranks, 300 data split 137/163 (block 0 = data 0…255 straddles both ranks): EM, exact evaluation,
    checkpoint + resume and a rank raising, in one spawn."""
    sizes, steps = (137, 163), 6
    assert sizes[0] < STATS_BLOCK < sum(sizes)
    ref = _reference(sum(sizes), steps)
    assert ref["nlls"][-1] < ref["nlls"][0] - 10   # the run moves: agreement is not trivial
    ranks = _spawn(tmp_path, "fast", sizes, steps)
    _assert_same_run(ranks, ref, steps)
    ic = information_criteria(ref["model"], ref["x"])
    elbo = float(exact_elbo(ref["model"], ExactPosterior(ref["model"]), ref["x"]).total)
    lp = float(log_evidence(ref["model"], ref["x"]).sum())
    for res in ranks:
        assert res["ic"].num_data == ic.num_data and res["ic"].num_params == ic.num_params
        for field in ("log_likelihood", "aic", "bic"):
            assert getattr(res["ic"], field) == pytest.approx(getattr(ic, field), rel=EVAL_RTOL)
        assert res["elbo_total"] == pytest.approx(elbo, rel=EVAL_RTOL)
        assert res["loglik"] == pytest.approx(lp, rel=EVAL_RTOL)
        assert res["loss"] == pytest.approx(ref["nlls"][-1], rel=EVAL_RTOL)
        assert abs(res["kl_total"]) < 1e-8 * abs(lp)          # the exact posterior: KL = 0
        assert res["resumed"] == ranks[0]["nlls"][steps // 2:]  # bit for bit
        for k, v in res["state"].items():
            assert torch.equal(res["resumed_state"][k], v)
    # the rank that raised names its error; the other stops with PeerFailure naming rank 1
    own, other = ranks[1]["failure"], ranks[0]["failure"]
    assert own is not None and own[0] == "PyroCPAError"
    assert other is not None and other[0] == "PeerFailure" and "rank 1" in other[1]
    assert all(res["failure_s"] < GROUP_TIMEOUT_S / 2 for res in ranks)   # no wait for the timeout
    assert all(res["soft"] is not None and "rank 0: ZeroDivisionError" in res["soft"] for res in ranks)
    assert all(res["after_failure"] == 2.0 for res in ranks)


def test_a_dying_rank_stops_the_others(tmp_path):
    ranks = _spawn(tmp_path, "death", (40, 40), 1, allow_exit=True)
    assert ranks[1] is None
    name, message = ranks[0]["failure"]
    assert name == "PeerFailure" and "collective" in message
    assert ranks[0]["failure_s"] < GROUP_TIMEOUT_S


def test_distributed_needs_a_process_group():
    _, model = _fresh()
    with pytest.raises(ValueError, match="init_distributed"):
        EM(model, distributed=True).step(noisy_circle(10, seed=0))


_SLOW_STEPS = 50


@pytest.fixture(scope="module")
def reference_1000():
    return _reference(1000, _SLOW_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [(1000,), (333, 667), (333, 333, 334, 0)], ids=["1", "2", "4-with-empty"])
def test_uneven_shards_give_the_one_process_trajectory(tmp_path, reference_1000, sizes):
    """The issue's check: 1, 2 and 4 gloo processes (1000 points as 333/667 and 333/333/334/0), 50 EM steps."""
    ranks = _spawn(tmp_path, "trajectory", sizes, _SLOW_STEPS)
    _assert_same_run(ranks, reference_1000, _SLOW_STEPS)
    assert reference_1000["nlls"][-1] < 0.5 * reference_1000["nlls"][0]
    model, x = reference_1000["model"], reference_1000["x"]
    ic = information_criteria(model, x)
    elbo = float(exact_elbo(model, ExactPosterior(model), x).total)
    for res in ranks:   # every rank, the empty one included, gets the totals of all data
        assert res["ic"].num_data == 1000 and res["ic"].num_params == ic.num_params
        assert res["ic"].log_likelihood == pytest.approx(ic.log_likelihood, rel=EVAL_RTOL)
        assert res["elbo_total"] == pytest.approx(elbo, rel=EVAL_RTOL)

