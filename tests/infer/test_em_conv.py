"""Issue 14: exact EM through the Pyro API on a convolutional decoder with ReLU6 units and a max pool.

Such a decoder has no closed-form M-step (its weights are shared across positions and the max pool selects
entries), so ``EM`` must switch to the generalised (gradient) M-step by itself and keep its monotone
guarantee. The NLL is read independently of EM's own bookkeeping (``log_evidence`` on the model after each
step), and at the end checked against a fine midpoint rule on the joint density evaluated with the decoder's
forward pass (S = 1; scipy's quad reports round-off trouble at the kinks, which a split at the kinks would need
the region machinery to find).
"""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_cpa.distributions import CPALikelihood
from pyro_cpa.guides import ExactPosterior
from pyro_cpa.infer import EM, em_engine, log_evidence
from pyro_cpa.nn import as_cpa_network

#: Allowed increase of the exact NLL over one EM step, relative to Σ_n |log p(x_n)|: EM's own acceptance
#: tolerance (``em_engine.MONOTONE_TOL`` = 1e-12) plus the rounding of two evaluations of the NLL (~1e-15).
MONOTONE_RTOL = 1e-11
#: Required overall decrease of the exact NLL per datum (nats) after the steps: measured ≈ 1.5 nats here.
MIN_DECREASE_PER_DATUM = 0.3
#: Midpoint rule on [-GRID_HALF_WIDTH, GRID_HALF_WIDTH] with GRID_POINTS nodes (h = 2.4e-4): its error is
#: O(h²) (the integrand has kinks, so no higher order); measured 1.5e-8 nats here (2.3e-7 with 20,000 nodes).
GRID_POINTS = 100_000
GRID_HALF_WIDTH = 12.0
#: Agreement of log p(x_n) with that midpoint rule (absolute, nats).
GRID_TOL = 1e-6
STEPS = 10


def _decoder(seed: int = 0) -> nn.Sequential:
    """Linear(1, 32) → Unflatten(8, 4) → ConvTranspose1d(8, 4, 4, 2, 1) → ReLU6 → MaxPool1d(2) → Flatten →
    Linear(16, 3)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8 * 4), nn.Unflatten(1, (8, 4)),
                         nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1), nn.ReLU6(), nn.MaxPool1d(2),
                         nn.Flatten(), nn.Linear(4 * 4, 3)).double()


def _data(n: int = 60) -> torch.Tensor:
    """A noisy 3-D curve: (cos t, sin 1.5t, t/2) + N(0, 0.1²), t on a grid in [-2.5, 2.5]."""
    t = torch.linspace(-2.5, 2.5, n, dtype=torch.float64)
    noise = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return torch.stack([torch.cos(t), torch.sin(1.5 * t), 0.5 * t], -1) + 0.1 * noise


def _model(decoder):
    def model(x):
        pyro.module("decoder", decoder)
        obs_scale = pyro.param("obs_scale", torch.tensor(0.5), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
            pyro.sample("x", CPALikelihood(decoder, z, obs_scale), obs=x)
    return model


def _grid_log_px(decoder, x: torch.Tensor, sx: float) -> torch.Tensor:
    """log ∫ N(x_n; g(z), sx² I) N(z; 0, 1) dz for every row of x by the midpoint rule (the decoder's forward
    pass; no region machinery)."""
    h = 2 * GRID_HALF_WIDTH / GRID_POINTS
    z = -GRID_HALF_WIDTH + h * (torch.arange(GRID_POINTS, dtype=torch.float64) + 0.5)
    with torch.no_grad():
        g = decoder(z.unsqueeze(-1))                                                   # (G, D)
    D = x.shape[-1]
    log_joint = (-0.5 * ((x.unsqueeze(1) - g) ** 2).sum(-1) / sx ** 2 - D * math.log(sx * math.sqrt(2 * math.pi))
                 - 0.5 * z ** 2 - 0.5 * math.log(2 * math.pi))                        # (N, G)
    return torch.logsumexp(log_joint, -1) + math.log(h)


def test_em_on_conv_decoder_uses_gradient_m_step_and_is_monotone(monkeypatch):
    pyro.clear_param_store()
    decoder = _decoder()
    assert as_cpa_network(decoder).needs_gradient_m_step is not None
    calls = []
    gradient_m_step = em_engine._gradient_m_step

    def spy(*args, **kwargs):
        calls.append(1)
        return gradient_m_step(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the closed-form M-step was called on a convolutional decoder")

    monkeypatch.setattr(em_engine, "_gradient_m_step", spy)
    monkeypatch.setattr(em_engine, "update_layer", refuse)
    monkeypatch.setattr(em_engine, "m_step", refuse)

    x = _data()
    N = x.shape[0]
    model = _model(decoder)
    em = EM(model, ExactPosterior(model), gradient_steps=20)   # default m_step="closed_form": switched automatically
    log_px = log_evidence(model, x)
    nlls = [float(-log_px.sum())]
    scales = [float(log_px.abs().sum())]
    for _ in range(STEPS):
        reported = em.step(x)
        log_px = log_evidence(model, x)
        nlls.append(float(-log_px.sum()))
        scales.append(float(log_px.abs().sum()))
        assert reported == pytest.approx(nlls[-1], rel=MONOTONE_RTOL)
    assert len(calls) == STEPS
    for k in range(STEPS):
        assert nlls[k + 1] <= nlls[k] + MONOTONE_RTOL * max(1.0, scales[k]), (k, nlls[k], nlls[k + 1])
    assert (nlls[0] - nlls[-1]) / N > MIN_DECREASE_PER_DATUM, nlls
    assert any(r.num_regions > 1 for r in em.history)      # the partition is non-trivial

    # the monitored NLL is the exact one: log p(x_n) of the final model against the midpoint rule
    ref = _grid_log_px(decoder, x, float(pyro.param("obs_scale").detach()))
    assert float((log_px.detach() - ref).abs().max()) < GRID_TOL
