r"""A β-VAE with a GLM decoder: Gaussian encoder (mean and log-variance layers, Appendix B.1), Pyro
model/guide pair, a low-variance ELBO estimate and an SVI training loop.

    q(z | x) = N(μ(x), diag exp(v(x))),    μ = loc(body(x)),  v = logvar(body(x)),

where ``body`` is an MLP with ReLU layers (empty: an *affine* encoder, the setting of Proposition 1).

Exact objective (Gaussian family, affine decoder ϑ(z) = W z + b): with q = N(μ, diag s²),

    E_q[log N(x; Wz + b, σ² I)] = log N(x; Wμ + b, σ² I) − tr(W diag(s²) Wᵀ) / (2σ²),
    KL(q ‖ N(0, I)) = ½ Σ_j (μ_j² + s_j² − 1 − log s_j²),

so the β-ELBO needs no sampling (:meth:`BetaVAE.analytic_elbo`); ``train_svi(engine="analytic")``
maximises it deterministically (Adam, then full-batch L-BFGS) to a converged optimum.
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
from .families import Gaussian

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

    # ------------------------------------------------------------------ exact β-ELBO (Gaussian, affine)
    def _check_analytic(self):
        if not isinstance(self.decoder.family, Gaussian):
            raise PyroCPAError(f"the analytic β-ELBO needs the Gaussian family; the decoder's is "
                               f"{self.decoder.family.name} (use engine='svi' or 'torch')")
        if self.decoder.network.num_layers != 1:
            raise PyroCPAError("the analytic β-ELBO needs an affine decoder (no activation layers, e.g. "
                               "nn.Sequential(nn.Linear(κ, d))); this decoder has "
                               f"{len(self.decoder.network.negative_slopes)} activation layer(s) "
                               "(use engine='svi' or 'torch')")

    def decoder_affine_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (d, κ), b (d,)) of an affine Gaussian decoder, differentiable in its parameters."""
        self._check_analytic()
        ((W, b),) = self.decoder.network.affine_maps()
        return W, b

    def analytic_elbo(self, x: torch.Tensor, beta: float = 1.0, per_datum: bool = False) -> torch.Tensor:
        r"""The exact β-ELBO E_q[log p(x|z)] − β KL(q ‖ N(0, I)) of a Gaussian decoder with an affine
        network (see the module docstring), with gradients; no Monte-Carlo error.

        Raises:
            PyroCPAError: the decoder's family is not Gaussian or its network is not affine.
        """
        W, b = self.decoder_affine_map()
        s2 = self.decoder.dispersion.to(W)
        loc, scale = self.encoder(x)
        var = scale ** 2
        r = x - loc @ W.T - b
        rec = (-0.5 * (r ** 2).sum(-1) / s2 - 0.5 * (var @ (W ** 2).sum(0)) / s2
               - 0.5 * x.shape[-1] * torch.log(2 * math.pi * s2))
        kl = 0.5 * (loc ** 2 + var - 1.0 - torch.log(var)).sum(-1)
        val = rec - float(beta) * kl
        return val if per_datum else val.mean()


def train_svi(vae: BetaVAE, x: torch.Tensor, beta: float = 1.0, num_steps: int = 1000, batch_size: int | None = 100,
              lr: float = 1e-3, log_every: int = 100, callback: Callable[[int], dict] | None = None,
              engine: str = "svi", lbfgs_steps: int | None = None, tol: float = 1e-12) -> list[dict]:
    """Train with Adam on the β-ELBO; returns the logged history.

    ``engine="svi"``: Pyro ``SVI(vae.model, vae.guide, TraceMeanField_ELBO())`` (analytic KL);
    ``engine="torch"``: the same objective and estimator (:meth:`BetaVAE.differentiable_elbo`, one
    reparameterised sample, analytic KL) with ``torch.optim.Adam`` — without Pyro's per-step overhead;
    ``engine="analytic"`` (Gaussian family, affine decoder only): the *exact* β-ELBO
    (:meth:`BetaVAE.analytic_elbo`, no sampling) — ``num_steps`` Adam steps (minibatches of
    ``batch_size``, or full batch if None) with a learning rate decaying from ``lr`` to ``lr``/100
    (cosine), then up to ``lbfgs_steps`` (default 2000) full-batch L-BFGS iterations (strong-Wolfe line
    search), stopped once an iteration changes the per-datum objective (or the parameters) by less than
    ``tol`` or every gradient entry is below 1e-9.

    At steps 0, ``log_every``, 2·``log_every``, … (and the last) the history gets ``{"step": s, "loss": …}``
    updated with ``callback(s)`` (e.g. train / test ELBO); the analytic engine's L-BFGS phase appends
    ``{"step": num_steps + i, "phase": "lbfgs", "loss": …, "grad_norm": …}`` every ``log_every``
    iterations and at the end. ``loss`` is the per-datum negative β-ELBO (an estimate, exact for
    ``"analytic"``). Clears Pyro's param store first.

    Raises:
        PyroCPAError: bad arguments, ``engine="analytic"`` with a non-Gaussian or non-affine decoder,
            ``lbfgs_steps`` with another engine, or a non-finite loss.
    """
    if num_steps < 0 or log_every < 1:
        raise PyroCPAError("num_steps must be >= 0 and log_every >= 1")
    if engine not in ("svi", "torch", "analytic"):
        raise PyroCPAError(f"engine must be 'svi', 'torch' or 'analytic'; got {engine!r}")
    if engine != "analytic" and lbfgs_steps:
        raise PyroCPAError(f"lbfgs_steps is only used by engine='analytic' (got engine={engine!r})")
    if lbfgs_steps is not None and lbfgs_steps < 0:
        raise PyroCPAError(f"lbfgs_steps must be >= 0; got {lbfgs_steps}")
    if engine == "analytic":
        vae._check_analytic()
    pyro.clear_param_store()
    N = x.shape[0]
    if engine == "svi":
        svi = SVI(vae.model, vae.guide, Adam({"lr": lr}), loss=TraceMeanField_ELBO())
    else:
        opt = torch.optim.Adam(vae.parameters(), lr=lr)
        sched = None
        if engine == "analytic" and num_steps > 0:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=num_steps, eta_min=lr / 100)

        class _TorchStep:
            @staticmethod
            def step(xx, bb, bs):
                idx = torch.randperm(N)[:bs] if bs else torch.arange(N)
                opt.zero_grad()
                if engine == "analytic":
                    loss = -vae.analytic_elbo(xx[idx], bb, per_datum=True).sum()
                else:
                    loss = -vae.differentiable_elbo(xx[idx], bb, 1, per_datum=True).sum()
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
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
    if engine == "analytic":
        history += _lbfgs(vae, x, beta, 2000 if lbfgs_steps is None else int(lbfgs_steps), num_steps, log_every,
                          callback, tol)
    return history


def _input_layers(encoder: nn.Module) -> list[str]:
    """Names (within the encoder) of the Linear layers that read x directly (GaussianEncoder only)."""
    if not isinstance(encoder, GaussianEncoder):
        return []
    if encoder.is_affine:
        return ["loc", "logvar"]
    first = encoder.body[0]
    return ["body.0"] if isinstance(first, nn.Linear) else []


class _Objective(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, beta):
        return -self.vae.analytic_elbo(x, beta)


def _lbfgs(vae: BetaVAE, x, beta, max_iter, offset, log_every, callback, tol) -> list[dict]:
    r"""Full-batch L-BFGS on the exact β-ELBO (see :func:`train_svi`).

    The encoder's input layers are optimised in whitened coordinates, A = A′P, c = c′ − A′P x̄ with
    P = Ĉ_x^{-1/2} (eigenvalues floored at 1e-8·λ_max) — a change of variables of the optimiser only
    (the model and its optimum are unchanged) that removes the ill-conditioning the pixel covariance
    (eigenvalues spanning ~6 orders of magnitude) puts on the encoder weights.
    """
    from torch.func import functional_call

    if max_iter == 0:
        return []
    obj = _Objective(vae)
    named = {n: p for n, p in obj.named_parameters() if p.requires_grad}
    if not named:
        return []
    xs = x.detach()
    xbar = xs.mean(0)
    lam, U = torch.linalg.eigh((xs - xbar).T @ (xs - xbar) / xs.shape[0])
    lam = lam.clamp(min=1e-8 * float(lam.max().clamp(min=1e-300)))
    P, Pinv = (U * lam.rsqrt()) @ U.T, (U * lam.sqrt()) @ U.T
    pre = {f"vae.encoder.{n}" for n in _input_layers(vae.encoder)}
    pre = {n for n in pre if f"{n}.weight" in named and f"{n}.bias" in named}
    free = {}
    with torch.no_grad():
        for n, p in named.items():
            layer, _, kind = n.rpartition(".")
            if layer in pre and kind == "weight":
                free[n] = p @ Pinv.to(p)
            elif layer in pre and kind == "bias":
                free[n] = p + named[f"{layer}.weight"] @ xbar.to(p)
            else:
                free[n] = p.detach().clone()
    for t in free.values():
        t.requires_grad_(True)

    def materialise():
        out = dict(free)
        for layer in pre:
            A = free[f"{layer}.weight"] @ P.to(free[f"{layer}.weight"])
            out[f"{layer}.weight"] = A
            out[f"{layer}.bias"] = free[f"{layer}.bias"] - A @ xbar.to(A)
        return out

    def write_back():
        with torch.no_grad():
            for n, v in materialise().items():
                named[n].copy_(v)

    opt = torch.optim.LBFGS(list(free.values()), lr=1.0, max_iter=max_iter, max_eval=None, tolerance_grad=1e-9,
                            tolerance_change=tol, history_size=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = functional_call(obj, materialise(), (x, beta))
        loss.backward()
        return loss

    def record(it):
        write_back()
        params = list(named.values())
        for p in params:
            p.grad = None
        loss = -vae.analytic_elbo(x, beta)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        gnorm = float(torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None)))
        rec = {"step": offset + it, "phase": "lbfgs", "loss": float(loss.detach()), "grad_norm": gnorm}
        if callback is not None:
            rec.update(callback(offset + it))
        return rec

    out, done = [], 0
    first = next(iter(free.values()))
    while done < max_iter:
        chunk = min(log_every, max_iter - done)
        opt.param_groups[0]["max_iter"], opt.param_groups[0]["max_eval"] = chunk, 25 * chunk
        before = opt.state[first].get("n_iter", 0)
        opt.step(closure)
        used = opt.state[first].get("n_iter", 0) - before
        done += used
        rec = record(done)
        out.append(rec)
        if not math.isfinite(rec["loss"]):
            raise PyroCPAError(f"L-BFGS diverged (loss {rec['loss']}); run more Adam steps first or lower lr")
        if used < chunk:  # stopped by its tolerances: converged
            break
    return out
