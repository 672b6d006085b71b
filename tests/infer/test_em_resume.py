"""Issue 11 item 5: the param store holds EM's whole state, as the EM docstring promises.

A Pyro user saves the store with ``pyro.get_param_store().save(path)``, and later — a new process: an empty
store, a *new* decoder object with other random weights, ``pyro.module("decoder", decoder)`` without
``update_module_params`` — loads it and continues. EM must continue from the stored weights and keep writing
them to the store (the store is what gets saved next).
"""
import math

import pyro
import pytest
import torch

from pyro_cpa.datasets import noisy_circle
from pyro_cpa.demo.circle import make_decoder, make_model
from pyro_cpa.infer import EM, log_evidence

REL_TOL = 1e-10


def test_item5_resume_from_saved_param_store_with_a_fresh_decoder(tmp_path):
    x = noisy_circle(150, seed=3)
    pyro.clear_param_store()
    em = EM(make_model(make_decoder(0)))
    straight = [em.step(x) for _ in range(10)]

    pyro.clear_param_store()
    em = EM(make_model(make_decoder(0)))
    first = [em.step(x) for _ in range(5)]
    path = tmp_path / "params.pt"
    pyro.get_param_store().save(path)

    pyro.clear_param_store()  # "a new process"
    fresh = make_decoder(123)  # other random weights, overwritten only through the store
    model = make_model(fresh)
    pyro.get_param_store().load(path)
    em2 = EM(model)
    assert em2.evaluate_loss(x) == pytest.approx(first[-1], rel=REL_TOL)
    rest = [em2.step(x) for _ in range(5)]
    assert first + rest == pytest.approx(straight, rel=REL_TOL, abs=0.0)
    # the store (what the user saves next) holds the new weights, and so does the decoder object
    store = pyro.get_param_store()
    assert torch.equal(store["decoder$$$0.weight"], fresh[0].weight)
    assert not math.isclose(float(store["decoder$$$4.bias"][0].detach()), float(make_decoder(123)[4].bias[0].detach()))
    assert -log_evidence(model, x).sum().item() == pytest.approx(rest[-1], rel=REL_TOL)
