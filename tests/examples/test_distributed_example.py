"""Smoke test of examples/distributed_em.py: 2 spawned gloo ranks, --quick (issue 13)."""
import math
import pathlib
import sys

import pyro
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "examples"
REL_TOL = 1e-10     # the distributed EM trajectory is one process's (bit for bit; the bound)


def test_distributed_em_quick(tmp_path):
    sys.path.insert(0, str(ROOT))   # spawned ranks import the example by name
    try:
        import distributed_em
        args = distributed_em.parse_args(["--quick", "--nproc", "2", "--out", str(tmp_path)])
        r = distributed_em.main(args)
    finally:
        sys.path.remove(str(ROOT))
    assert r["world_size"] == 2 and r["shard"] == [0, args.n // 2]
    h = r["em_nll_history"]
    assert len(h) == args.em_steps and all(b <= a + 1e-9 * abs(a) for a, b in zip(h, h[1:]))
    # one process holding all the data takes the same steps
    from pyro_cpa.datasets import noisy_circle
    from pyro_cpa.demo.circle import make_decoder, make_model
    from pyro_cpa.infer import EM, information_criteria, log_evidence
    pyro.clear_param_store()
    decoder = make_decoder(args.seed)
    model = make_model(decoder)
    x = noisy_circle(args.n, noise=args.noise, seed=args.seed)
    assert r["initial_nll"] == pytest.approx(float(-log_evidence(model, x).sum()), rel=1e-12)
    em = EM(model)
    ref = [em.step(x) for _ in range(args.em_steps)]
    assert h == pytest.approx(ref, rel=REL_TOL, abs=0.0)
    assert r["log_likelihood"] == pytest.approx(information_criteria(model, x).log_likelihood, rel=1e-12)
    assert r["elbo_exact_posterior"] == pytest.approx(r["log_evidence_sum"], rel=1e-10)   # ELBO(exact q) = log p
    assert r["log_likelihood"] == pytest.approx(-r["em_nll"], rel=1e-12)
    assert math.isfinite(r["svi_nll"]) and r["svi_nll"] < r["initial_nll"] - 50                 # DDP training descends
    assert r["bytes_per_reduction"] == 40 * (r["regions"] * 10 + 4) + 48 * 2
    assert list(tmp_path.glob("*.json"))
