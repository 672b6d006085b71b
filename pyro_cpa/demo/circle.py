"""The paper's circle experiment (§4.3, Figs. 3–6) as one Pyro model trained five ways.

One model, ``z ~ N(0, 1)``, ``x | z ~ N(g(z), σx²)`` with g = [1, 8, 8, 2] leaky-ReLU(0.1), is fitted
from the same initial weights by

- exact EM (``EM(model, ExactPosterior(model))``),
- exact maximum likelihood (``SVI(collapse(model), empty_guide, Adam)``),
- SVI with an amortised Gaussian encoder (a VAE) at learning rates 5e-3, 1e-3, 1e-4,
- SVI with an amortised mixture-of-Gaussians encoder,

and every method is judged by the *exact* negative log-likelihood, its exact ELBO and the exact
KL(q ‖ p(z | x)). Each SVI run gets at least the wall-clock time EM used (training time only; the
exact evaluations are not counted).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn
from torch.distributions import constraints
from tqdm.auto import tqdm

from ..datasets import noisy_circle
from ..distributions import CPALikelihood
from ..geometry.regions import cached_linear_regions
from ..guides import AmortizedMixture, AmortizedNormal, ExactPosterior
from ..infer import EM, collapse, empty_guide, evaluate_guide, log_evidence


@dataclass
class MethodResult:
    """Outcome of one training method (per-sample quantities are divided by N)."""

    name: str
    final_nll: float
    final_elbo: float | None
    final_kl: float | None
    num_regions: int
    wall_clock_s: float
    steps: int
    nll_history: list = field(default_factory=list)   # (step, seconds, nll per sample)
    kl_history: list = field(default_factory=list)    # (step, seconds, kl per sample)
    note: str = ""
    obs_scale: float = math.nan                       # learned σx
    decoder: nn.Module | None = None

    def row(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "final_nll", "final_elbo", "final_kl", "num_regions",
                                             "wall_clock_s", "steps", "obs_scale", "nll_history", "kl_history", "note")}


def make_decoder(seed: int, hidden: int = 8, slope: float = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, hidden), nn.LeakyReLU(slope), nn.Linear(hidden, hidden), nn.LeakyReLU(slope),
                         nn.Linear(hidden, 2)).double()


def make_model(decoder: nn.Module, init_obs_scale: float = 0.5):
    """The one Pyro model every method trains (only the guide / trainer changes)."""
    def model(x):
        pyro.module("decoder", decoder)
        obs_scale = pyro.param("obs_scale", torch.tensor(init_obs_scale), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
            pyro.sample("x", CPALikelihood(decoder, z, obs_scale), obs=x)
    return model


@dataclass
class DemoConfig:
    n: int = 500
    noise: float = 0.05
    seed: int = 0
    em_steps: int = 100
    mle_steps: int = 1500
    mle_lr: float = 1e-2
    svi_min_steps: int = 1500
    vae_lrs: tuple = (5e-3, 1e-3, 1e-4)
    mixture_lr: float = 5e-3
    mixture_components: int = 3
    encoder_hidden: tuple = (32, 32)
    eval_every: int = 100
    frozen_guide_steps: int = 800
    match_em_time: bool = True
    progress: bool = True


def _run_em(x, init, cfg) -> MethodResult:
    pyro.clear_param_store()
    decoder = copy.deepcopy(init)
    model = make_model(decoder)
    em = EM(model, ExactPosterior(model))
    N = x.shape[0]
    hist = [(0, 0.0, em.evaluate_loss(x) / N)]
    clock = 0.0
    for step in tqdm(range(1, cfg.em_steps + 1), desc="EM", disable=not cfg.progress):
        t0 = time.perf_counter()
        nll = em.step(x)
        clock += time.perf_counter() - t0
        hist.append((step, clock, nll / N))
    R = len(cached_linear_regions(decoder))
    return MethodResult("EM (exact)", hist[-1][2], -hist[-1][2], 0.0, R, clock, cfg.em_steps, hist,
                        [(s, t, 0.0) for s, t, _ in hist], note="ELBO = -NLL, KL = 0: exact posterior",
                        obs_scale=pyro.param("obs_scale").item(), decoder=decoder)


def _run_mle(x, init, cfg, budget: float) -> MethodResult:
    pyro.clear_param_store()
    decoder = copy.deepcopy(init)
    model = make_model(decoder)
    svi = SVI(collapse(model), empty_guide, pyro.optim.Adam({"lr": cfg.mle_lr}), Trace_ELBO())
    N = x.shape[0]
    hist, clock, step = [(0, 0.0, svi.evaluate_loss(x) / N)], 0.0, 0
    bar = tqdm(desc="exact MLE", disable=not cfg.progress)
    while step < cfg.mle_steps or clock < budget:
        t0 = time.perf_counter()
        loss = svi.step(x)
        clock += time.perf_counter() - t0
        step += 1
        bar.update()
        if step % 10 == 0:
            hist.append((step, clock, loss / N))
    bar.close()
    final = -log_evidence(model, x).sum().item() / N
    hist.append((step, clock, final))
    R = len(cached_linear_regions(decoder))
    return MethodResult("exact MLE (SVI, collapsed)", final, -final, 0.0, R, clock, step, hist,
                        note="exact marginal likelihood by Adam; no guide",
                        obs_scale=pyro.param("obs_scale").item(), decoder=decoder)


def _frozen(model):
    """The model with its decoder and σx hidden from the optimiser (only the guide learns)."""
    return poutine.block(model, hide_fn=lambda msg: msg["type"] == "param"
                         and (msg["name"].startswith("decoder") or msg["name"] == "obs_scale"))


def _run_svi(x, init, cfg, name, guide_factory, lr, budget: float, min_steps: int | None = None,
             freeze_decoder: bool = False, init_obs_scale: float = 0.5) -> MethodResult:
    pyro.clear_param_store()
    decoder = copy.deepcopy(init)
    model = make_model(decoder, init_obs_scale)
    if freeze_decoder:
        model = _frozen(model)
    guide = guide_factory(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    N = x.shape[0]
    nll_hist, kl_hist = [], []

    def record(step, clock):
        ev = evaluate_guide(model, guide, x)
        nll_hist.append((step, clock, ev.nll / N))
        kl_hist.append((step, clock, float(ev.kl.total) / N))
        return ev

    clock, step = 0.0, 0
    svi.step(x)  # create the guide's parameters
    step = 1
    record(step, clock)
    bar = tqdm(desc=name, disable=not cfg.progress)
    min_steps = cfg.svi_min_steps if min_steps is None else min_steps
    while step < min_steps or clock < budget:
        t0 = time.perf_counter()
        svi.step(x)
        clock += time.perf_counter() - t0
        step += 1
        bar.update()
        if step % cfg.eval_every == 0:
            record(step, clock)
    bar.close()
    ev = record(step, clock)
    R = len(cached_linear_regions(decoder))
    return MethodResult(name, ev.nll / N, float(ev.elbo.total) / N, float(ev.kl.total) / N, R, clock, step,
                        nll_hist, kl_hist, note=f"Adam lr={lr:g}; ELBO/KL method: {ev.method}",
                        obs_scale=pyro.param("obs_scale").item(), decoder=decoder)


def run_circle_experiment(cfg: DemoConfig) -> dict:
    """Fit the circle model by every method; returns {'data', 'config', 'results': [MethodResult]}."""
    torch.set_default_dtype(torch.float64)
    x = noisy_circle(cfg.n, cfg.noise, seed=cfg.seed)
    init = make_decoder(cfg.seed)
    results = [_run_em(x, init, cfg)]
    budget = results[0].wall_clock_s if cfg.match_em_time else 0.0
    results.append(_run_mle(x, init, cfg, budget))
    hidden = cfg.encoder_hidden
    for lr in cfg.vae_lrs:
        results.append(_run_svi(x, init, cfg, f"VAE (Gaussian encoder) lr={lr:g}",
                                lambda m: AmortizedNormal(m, hidden=hidden), lr, budget))
    K = cfg.mixture_components
    results.append(_run_svi(x, init, cfg, f"SVI mixture encoder K={K}",
                            lambda m: AmortizedMixture(m, K, hidden=hidden), cfg.mixture_lr, budget))
    # The VAEs above collapse (posterior ≈ prior, so their KL is trivially small). To compare guide
    # families where the posterior is genuinely multimodal, fit both on EM's decoder, held fixed.
    em = results[0]
    for label, factory in (("Gaussian", lambda m: AmortizedNormal(m, hidden=hidden)),
                           (f"mixture K={K}", lambda m: AmortizedMixture(m, K, hidden=hidden))):
        r = _run_svi(x, em.decoder, cfg, f"{label} encoder on EM decoder", factory, cfg.mixture_lr, 0.0,
                     min_steps=cfg.frozen_guide_steps, freeze_decoder=True, init_obs_scale=em.obs_scale)
        r.note = "decoder and σx fixed at the EM fit; only the encoder is trained. " + r.note
        results.append(r)
    return {"data": x, "config": cfg, "results": results}


def format_table(results: list[MethodResult]) -> str:
    def f(v, fmt="{:.4f}"):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    head = f"{'method':<34} {'exact NLL':>10} {'ELBO':>10} {'KL(q||p)':>10} {'regions':>8} {'seconds':>8} {'steps':>7}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.name:<34} {f(r.final_nll):>10} {f(r.final_elbo):>10} {f(r.final_kl):>10} "
                     f"{r.num_regions:>8d} {r.wall_clock_s:>8.1f} {r.steps:>7d}")
    lines.append("(per-sample nats; seconds = training wall-clock, exact evaluations excluded)")
    return "\n".join(lines)
