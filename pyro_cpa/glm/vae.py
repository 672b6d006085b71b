r"""A β-VAE with a GLM decoder: Gaussian encoder (mean and log-variance layers, Appendix B.1), Pyro
model/guide pair, a low-variance ELBO estimate and an SVI training loop.

    q(z | x) = N(μ(x), diag exp(v(x))),    μ = loc(body(x)),  v = logvar(body(x)),

where ``body`` is an MLP with ReLU layers (empty: an *affine* encoder, the setting of Proposition 1).
"""
from __future__ import annotations

import math
from typing import Callable

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import Adam
from torch import nn

from ..errors import PyroCPAError
from .decoder import GLMDecoder

__all__ = ["GaussianEncoder", "BetaVAE", "train_svi"]


class GaussianEncoder(nn.Module):
    """x (…, d) ↦ (μ (…, κ), σ (…, κ)) with ``loc`` and ``logvar`` linear heads on an MLP ``body``.

    Returning ``(loc, scale)`` makes it usable as the encoder of
    :class:`pyro_cpa.guides.AmortizedNormal` (Gaussian-family models) as well.
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden=()):
        super().__init__()
        layers, width = [], int(data_dim)
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        self.body = nn.Sequential(*layers)
        self.loc = nn.Linear(width, int(latent_dim))
        self.logvar = nn.Linear(width, int(latent_dim))
        self.data_dim, self.latent_dim = int(data_dim), int(latent_dim)

    @property
    def is_affine(self) -> bool:
        return len(self.body) == 0

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        return self.loc(h), torch.exp(0.5 * self.logvar(h))


class BetaVAE(nn.Module):
    """β-VAE = :class:`~pyro_cpa.glm.decoder.GLMDecoder` + :class:`GaussianEncoder` (Pyro ``model``/``guide``)."""

    def __init__(self, decoder: GLMDecoder, encoder: GaussianEncoder):
        super().__init__()
        if not isinstance(decoder, GLMDecoder):
            raise PyroCPAError(f"decoder must be a GLMDecoder; got {type(decoder).__name__}")
        if encoder.latent_dim != decoder.latent_dim or encoder.data_dim != decoder.data_dim:
            raise PyroCPAError(f"encoder ({encoder.data_dim} → {encoder.latent_dim}) does not match the decoder "
                               f"({decoder.latent_dim} → {decoder.data_dim})")
        self.decoder, self.encoder = decoder, encoder

    def model(self, x, beta: float = 1.0, batch_size: int | None = None):
        return self.decoder.model(x, beta=beta, batch_size=batch_size)

    def guide(self, x, beta: float = 1.0, batch_size: int | None = None):
        pyro.module("glm_encoder", self.encoder)
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            loc, scale = self.encoder(x[idx])
            with poutine.scale(scale=float(beta)):
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def elbo(self, x: torch.Tensor, beta: float = 1.0, num_samples: int = 16, per_datum: bool = False):
        r"""E_q[log p(x|z)] − β KL(q ‖ N(0, I)): analytic KL, Monte-Carlo reconstruction term (``num_samples``)."""
        return self.differentiable_elbo(x, beta, num_samples, per_datum)

    def differentiable_elbo(self, x: torch.Tensor, beta: float = 1.0, num_samples: int = 1, per_datum: bool = False):
        """Reparameterised estimate of the β-ELBO (the objective of SVI with TraceMeanField_ELBO), with gradients."""
        loc, scale = self.encoder(x)
        kl = 0.5 * (loc ** 2 + scale ** 2 - 1.0 - 2 * torch.log(scale)).sum(-1)
        eps = torch.randn((num_samples,) + loc.shape, dtype=loc.dtype, device=loc.device)
        rec = self.decoder.log_likelihood(x, loc + scale * eps).mean(0)
        val = rec - float(beta) * kl
        return val if per_datum else val.mean()


def train_svi(vae: BetaVAE, x: torch.Tensor, beta: float = 1.0, num_steps: int = 1000, batch_size: int | None = 100,
              lr: float = 1e-3, log_every: int = 100, callback: Callable[[int], dict] | None = None,
              engine: str = "svi") -> list[dict]:
    """Train with Adam on the β-ELBO; returns the logged history.

    ``engine="svi"``: Pyro ``SVI(vae.model, vae.guide, TraceMeanField_ELBO())`` (analytic KL);
    ``engine="torch"``: the same objective and estimator (:meth:`BetaVAE.differentiable_elbo`, one
    reparameterised sample, analytic KL) with ``torch.optim.Adam`` — without Pyro's per-step overhead.
    At steps 0, ``log_every``, 2·``log_every``, … (and the last) the history gets ``{"step": s, "loss": …}``
    updated with ``callback(s)`` (e.g. train / test ELBO). Clears Pyro's param store first.
    """
    if num_steps < 0 or log_every < 1:
        raise PyroCPAError("num_steps must be >= 0 and log_every >= 1")
    if engine not in ("svi", "torch"):
        raise PyroCPAError(f"engine must be 'svi' or 'torch'; got {engine!r}")
    pyro.clear_param_store()
    if engine == "svi":
        svi = SVI(vae.model, vae.guide, Adam({"lr": lr}), loss=TraceMeanField_ELBO())
    else:
        opt = torch.optim.Adam(vae.parameters(), lr=lr)
        N = x.shape[0]

        class _TorchStep:
            @staticmethod
            def step(xx, bb, bs):
                idx = torch.randperm(N)[:bs] if bs else torch.arange(N)
                opt.zero_grad()
                loss = -vae.differentiable_elbo(xx[idx], bb, 1, per_datum=True).sum()
                loss.backward()
                opt.step()
                return float(loss.detach()) * N / len(idx)

        svi = _TorchStep()
    history = []
    loss = float("nan")
    for step in range(num_steps + 1):
        if step % log_every == 0 or step == num_steps:
            rec = {"step": step, "loss": loss}
            if callback is not None:
                rec.update(callback(step))
            history.append(rec)
        if step < num_steps:
            loss = svi.step(x, beta, batch_size) / x.shape[0]  # per-datum negative β-ELBO estimate
            if not math.isfinite(loss):
                raise PyroCPAError(f"training diverged at step {step} (loss {loss}); lower the learning rate")
    return history
