"""Shared helpers of the runnable examples: the model pattern, EM / VAE training loops, tables, figures.

Every example builds the same kind of Pyro model as :mod:`pyro_cpa.demo.circle`::

    z ~ N(0, I_S),    x | z ~ N(g(z), σx² I_D),    g = Linear + LeakyReLU + ... + Linear

and trains it either by exact EM (``EM(model, ExactPosterior(model))``) or as a VAE
(``SVI(model, AmortizedNormal(model), Adam, Trace_ELBO())``). Everything is then judged by the exact
marginal likelihood (:func:`pyro_cpa.infer.log_evidence`).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn
from torch.distributions import constraints

from pyro_cpa.distributions import CPALikelihood
from pyro_cpa.guides import AmortizedNormal, ExactPosterior
from pyro_cpa.infer import EM, log_evidence
from pyro_cpa.nn import mlp


# ---------------------------------------------------------------------- set-up
def base_parser(doc: str) -> argparse.ArgumentParser:
    """The options every example has: ``--quick``, ``--out``, ``--seed``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a few seconds; used by the smoke test)")
    p.add_argument("--out", default=None, help="folder for the figures and the JSON of the numbers")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the initial weights and the SVI noise")
    return p


def setup(args) -> None:
    """float64 everywhere, seeded, a fresh Pyro parameter store; makes ``args.out`` if given."""
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    if getattr(args, "out", None):
        os.makedirs(args.out, exist_ok=True)


# ---------------------------------------------------------------------- the model
def make_decoder(widths, slope: float = 0.1, seed: int = 0) -> nn.Sequential:
    """Linear(w0, w1) → LeakyReLU(slope) → … → Linear(w_{L-1}, w_L), float64, seeded (:func:`pyro_cpa.nn.mlp`)."""
    return mlp(widths, lambda: nn.LeakyReLU(slope), seed=seed)


def make_model(decoder: nn.Module, latent_dim: int, init_obs_scale: float = 0.5):
    """The Pyro model ``z ~ N(0, I_S)``, ``x | z ~ N(decoder(z), σx²)`` with σx a learned Pyro param.

    The same pattern as :func:`pyro_cpa.demo.circle.make_model`, for any latent dimension.
    """
    def model(x):
        pyro.module("decoder", decoder)
        obs_scale = pyro.param("obs_scale", torch.tensor(float(init_obs_scale)), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([latent_dim]).to_event(1))
            pyro.sample("x", CPALikelihood(decoder, z, obs_scale), obs=x)
    return model


class Fit:
    """A trained model: its decoder, σx, the Pyro model (bound to its own parameter store) and its guide."""

    def __init__(self, name, decoder, model, guide, store_state, seconds, steps, history):
        self.name, self.decoder, self.model, self.guide = name, decoder, model, guide
        self.store_state, self.seconds, self.steps, self.history = store_state, seconds, steps, history

    def activate(self) -> None:
        """Load this fit's Pyro parameters (σx, encoder) into the global parameter store."""
        pyro.clear_param_store()
        pyro.get_param_store().set_state(self.store_state)   # the same tensors: the decoder stays in sync

    @property
    def obs_scale(self) -> float:
        """The learned σx."""
        self.activate()
        return float(pyro.param("obs_scale").detach())

    def log_px(self, x) -> torch.Tensor:
        """Exact log p(x_n) of every datum under this fit."""
        self.activate()
        return log_evidence(self.model, x)

    def nll(self, x) -> float:
        """Exact NLL per datum (nats)."""
        return float(-self.log_px(x).mean())


def fit_em(x, init_decoder, latent_dim: int, steps: int, name: str = "EM (exact)", init_obs_scale: float = 0.5,
           progress: bool = False, **em_kwargs) -> Fit:
    """Exact EM from a copy of ``init_decoder``; history = [(step, seconds, NLL per datum)]."""
    pyro.clear_param_store()
    decoder = copy.deepcopy(init_decoder)
    model = make_model(decoder, latent_dim, init_obs_scale)
    em = EM(model, ExactPosterior(model), **em_kwargs)
    N = x.shape[0]
    hist = [(0, 0.0, em.evaluate_loss(x) / N)]
    clock = 0.0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        nll = em.step(x)
        clock += time.perf_counter() - t0
        hist.append((step, clock, nll / N))
        if progress and (step % 10 == 0 or step == steps):
            print(f"  {name} step {step:4d}  NLL/N {nll / N:.4f}  ({clock:.1f}s)", file=sys.stderr)
    fit = Fit(name, decoder, model, None, pyro.get_param_store().get_state(), clock, steps, hist)
    fit.nll_history = hist
    return fit


def fit_vae(x, init_decoder, latent_dim: int, steps: int, lr: float = 5e-3, hidden=(64, 64),
            min_seconds: float = 0.0, name: str = "VAE (AmortizedNormal)", init_obs_scale: float = 0.5,
            batch_size: int | None = None, nll_every: int = 0, progress: bool = False) -> Fit:
    """A VAE: SVI with Trace_ELBO and an amortised Gaussian encoder, from a copy of ``init_decoder``.

    Runs ``steps`` steps and at least ``min_seconds`` of training wall-clock (to match EM's budget).
    ``batch_size``: mini-batches drawn at random (full batch if None). History = [(step, seconds, loss/N)];
    with ``nll_every`` > 0 also ``nll_history`` = [(step, seconds, exact NLL per datum)] every that many
    steps (evaluation time not counted).
    """
    pyro.clear_param_store()
    decoder = copy.deepcopy(init_decoder)
    model = make_model(decoder, latent_dim, init_obs_scale)
    guide = AmortizedNormal(model, hidden=hidden)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    N = x.shape[0]
    hist, nll_hist, clock, step = [], [], 0.0, 0

    def record():
        with torch.no_grad():
            nll_hist.append((step, clock, float(-log_evidence(model, x).mean())))

    if nll_every:
        record()
    while step < steps or clock < min_seconds:
        xb = x if batch_size is None or batch_size >= N else x[torch.randint(N, (batch_size,))]
        t0 = time.perf_counter()
        loss = svi.step(xb)
        clock += time.perf_counter() - t0
        step += 1
        if step % 10 == 0 or step == 1:
            hist.append((step, clock, loss / xb.shape[0]))
        if nll_every and step % nll_every == 0:
            record()
        if progress and step % 500 == 0:
            print(f"  {name} step {step:5d}  loss/N {loss / xb.shape[0]:.4f}  ({clock:.1f}s)", file=sys.stderr)
    if nll_every and nll_hist[-1][0] != step:
        record()
    fit = Fit(name, decoder, model, guide, pyro.get_param_store().get_state(), clock, step, hist)
    fit.nll_history = nll_hist
    return fit


# ---------------------------------------------------------------------- output
def print_table(rows: list[dict], columns: list[tuple[str, str, str]], title: str | None = None) -> str:
    """Print rows as a fixed-width table; columns = [(key, header, format)]."""
    widths = [max(len(h), 10) for _, h, _ in columns]
    widths[0] = max(widths[0], *(len(str(r[columns[0][0]])) for r in rows)) if rows else widths[0]

    def cell(r, key, fmt):
        v = r.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return fmt.format(v) if fmt else str(v)

    head = "  ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, ((_, h, _), w) in enumerate(zip(columns, widths)))
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for r in rows:
        lines.append("  ".join(f"{cell(r, k, f):<{w}}" if i == 0 else f"{cell(r, k, f):>{w}}"
                               for i, ((k, _, f), w) in enumerate(zip(columns, widths))))
    text = "\n".join(lines)
    print(text)
    return text


def write_json(args, name: str, result: dict) -> str | None:
    """Write ``result`` (plain numbers, strings, lists) to ``args.out/name`` if ``--out`` was given."""
    if not getattr(args, "out", None):
        return None
    path = os.path.join(args.out, name)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1, default=float)
    return path


def plt():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def summary_rows(fits, x, x_test) -> list[dict]:
    """One table row per fit: exact train/test NLL per point, exact ELBO and KL(q||p) on the training data
    (ELBO = log p(x) and KL = 0 for EM, whose posterior is exact), σx, regions, seconds, steps.

    Also stores ``train_nll`` and ``test_nll`` on each fit.
    """
    from pyro_cpa.geometry.regions import cached_linear_regions
    from pyro_cpa.infer import evaluate_guide

    rows = []
    for f in fits:
        f.train_nll, f.test_nll = f.nll(x), f.nll(x_test)
        row = {"method": f.name, "train_nll": f.train_nll, "test_nll": f.test_nll, "obs_scale": f.obs_scale,
               "regions": len(cached_linear_regions(f.decoder)), "seconds": f.seconds, "steps": f.steps}
        if f.guide is not None:
            f.activate()
            ev = evaluate_guide(f.model, f.guide, x)
            row["elbo"], row["kl"] = float(ev.elbo.total) / x.shape[0], float(ev.kl.total) / x.shape[0]
        else:   # the exact posterior: ELBO = log p(x), KL = 0
            row["elbo"], row["kl"] = -f.train_nll, 0.0
        rows.append(row)
    return rows
