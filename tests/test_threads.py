"""The library's entry points run on one intra-op thread and restore the caller's setting (issue 12, threads)."""
import pytest
import torch

import pyro_cpa.integrate.univariate as univariate
from pyro_cpa._threads import intra_op_threads
from pyro_cpa.datasets import noisy_circle
from pyro_cpa.demo.circle import make_decoder
from pyro_cpa.distributions import CPAMarginal
from pyro_cpa.infer import estep
from pyro_cpa.infer.estep import e_step
from pyro_cpa.integrate import gaussian_polytope_moments


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_intra_op_threads_lowers_and_restores(two_threads):
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
        with intra_op_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError):
        with intra_op_threads(1):
            raise ValueError("restored on the way out")
    assert torch.get_num_threads() == 2
    with intra_op_threads(8):  # never raises the caller's count
        assert torch.get_num_threads() == 2


def test_integrals_and_estep_run_single_threaded(monkeypatch, two_threads):
    seen = []
    for mod, name in ((univariate, "interval_stats"), (estep, "_s1_chunk_stats")):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _fn=fn, **k: seen.append(torch.get_num_threads()) or _fn(*a, **k))
    gaussian_polytope_moments(torch.zeros(3, 1), torch.ones(3, 1, 1), torch.tensor([[[1.0], [-1.0]]] * 3),
                              torch.tensor([[1.0, 2.0]] * 3))
    e_step(CPAMarginal(make_decoder(0), 0.5), noisy_circle(50))
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2


def test_results_bit_identical_for_one_and_two_threads():
    dist = CPAMarginal(make_decoder(0), 0.5)
    x = noisy_circle(200)
    before = torch.get_num_threads()
    out = []
    try:
        for k in (1, 2):
            torch.set_num_threads(k)
            st = e_step(dist, x)
            out.append((st.Z, st.X, st.q, st.loglik))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_log_prob_and_its_backward_run_single_threaded(monkeypatch, two_threads):
    import pyro_cpa.distributions.chunked as chunked
    seen = []
    fn = chunked.std_moments
    monkeypatch.setattr(chunked, "std_moments",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or fn(*a, **k))
    decoder = make_decoder(0)
    lp = CPAMarginal(decoder, 0.5).log_prob(noisy_circle(50))
    lp.sum().backward()                  # the backward recomputes each batch: also on one thread
    assert len(seen) >= 2 and set(seen) == {1}
    assert torch.get_num_threads() == 2


def test_em_block_e_step_runs_single_threaded(monkeypatch, two_threads):
    """The EM engine's S = 1 block E-step (the pair kernel on groups of blocks, estep.s1_block_stats) takes its
    products on one thread too, and gives the bits it gives on one thread."""
    from pyro_cpa.infer import em_engine

    seen = []
    fn = estep._s1_pair_weights
    monkeypatch.setattr(estep, "_s1_pair_weights",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or fn(*a, **k))
    dist, x = CPAMarginal(make_decoder(0), 0.5), noisy_circle(700)
    two = em_engine._block_e_step(dist, x)
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    torch.set_num_threads(1)
    one = em_engine._block_e_step(dist, x)
    for name in ("Z", "X", "q", "loglik"):
        assert torch.equal(getattr(one, name), getattr(two, name)), name
