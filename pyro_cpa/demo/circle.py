"""The paper's circle experiment (§4.3, Figs. 3–6) as one Pyro model trained five ways.

One model, ``z ~ N(0, 1)``, ``x | z ~ N(g(z), σx²)`` with g = [1, 8, 8, 2] leaky-ReLU(0.1), is fitted
from the same initial weights by

- exact EM (``EM(model, ExactPosterior(model))``),
- exact maximum likelihood (``SVI(collapse(model), empty_guide, Adam)``),
- SVI with an amortised Gaussian encoder (a VAE) at learning rates 5e-3, 1e-3, 1e-4,
- SVI with an amortised mixture-of-Gaussians encoder,

and every method is judged by the *exact* negative log-likelihood, its exact ELBO and the exact
KL(q ‖ p(z | x)). Then both encoder families are trained on EM's decoder, held fixed, to compare the
guides on a posterior that really is multimodal.

**Reproducibility.** Every method has a budget in *steps* (its wall-clock is reported beside them, never
used to decide anything); every method starts from ``pyro.set_rng_seed(seed)`` (Python, NumPy and
torch generators), so its result does not depend on which methods ran before it; the exact evaluations
during training run on a saved-and-restored RNG state, so they do not perturb the training draws; and
the run uses a fixed number of torch threads (``DemoConfig.threads``). The same command therefore prints
the same table on any machine, up to floating-point rounding.
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.util import get_rng_state, set_rng_state
from torch import nn
from torch.distributions import constraints
from tqdm.auto import tqdm

from ..datasets import noisy_circle
from ..distributions import CPALikelihood
from ..geometry.regions import cached_linear_regions
from ..guides import AmortizedMixture, AmortizedNormal, ExactPosterior
from ..infer import EM, collapse, empty_guide, evaluate_guide, log_evidence

#: roles of the rows of the table (MethodResult.role)
EXACT, VARIATIONAL, GUIDE_ONLY = "exact", "variational", "guide on EM decoder"


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
    role: str = EXACT                                 # EXACT, VARIATIONAL or GUIDE_ONLY
    decoder: nn.Module | None = None

    def row(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "role", "final_nll", "final_elbo", "final_kl", "num_regions",
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
    """Sizes and budgets of the demo. Every budget is a number of optimiser steps."""

    n: int = 500
    noise: float = 0.05
    seed: int = 0
    threads: int = 1                  # torch intra-op threads during the run
    em_steps: int = 100
    mle_steps: int = 1000
    mle_lr: float = 1e-2
    svi_steps: int = 1000             # each VAE and the mixture-encoder SVI run
    vae_lrs: tuple = (5e-3, 1e-3, 1e-4)
    mixture_lr: float = 5e-3
    mixture_components: int = 3
    encoder_hidden: tuple = (32, 32)
    guide_steps: int = 1000           # each encoder trained on EM's (fixed) decoder
    guide_lr: float = 1e-2            # ... its initial Adam learning rate,
    guide_lr_decay: float = 0.1       # ... decayed geometrically to guide_lr · guide_lr_decay at the last step,
    guide_particles: int = 8          # ... with this many (vectorised) ELBO particles per step
    eval_every: int = 100
    progress: bool = True


@contextmanager
def _rng_preserved():
    """Run exact evaluations without consuming the training RNG (Python, NumPy, torch)."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def _start(cfg, init, init_obs_scale: float = 0.5):
    """Fresh param store, the method's RNG stream and a fresh copy of the initial decoder."""
    pyro.clear_param_store()
    pyro.set_rng_seed(cfg.seed)
    decoder = copy.deepcopy(init)
    return decoder, make_model(decoder, init_obs_scale)


def _run_em(x, init, cfg) -> MethodResult:
    decoder, model = _start(cfg, init)
    em = EM(model, ExactPosterior(model))
    N = x.shape[0]
    with _rng_preserved():
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
                        obs_scale=pyro.param("obs_scale").item(), role=EXACT, decoder=decoder)


def _run_mle(x, init, cfg) -> MethodResult:
    decoder, model = _start(cfg, init)
    svi = SVI(collapse(model), empty_guide, pyro.optim.Adam({"lr": cfg.mle_lr}), Trace_ELBO())
    N = x.shape[0]
    with _rng_preserved():
        hist = [(0, 0.0, svi.evaluate_loss(x) / N)]
    clock = 0.0
    for step in tqdm(range(1, cfg.mle_steps + 1), desc="exact MLE", disable=not cfg.progress):
        t0 = time.perf_counter()
        loss = svi.step(x)   # the exact NLL before this step's update
        clock += time.perf_counter() - t0
        if step % 10 == 0:
            hist.append((step - 1, clock, loss / N))
    with _rng_preserved():
        final = -log_evidence(model, x).sum().item() / N
    hist.append((cfg.mle_steps, clock, final))
    R = len(cached_linear_regions(decoder))
    return MethodResult("exact MLE (SVI, collapsed)", final, -final, 0.0, R, clock, cfg.mle_steps, hist,
                        note="exact marginal likelihood by Adam; no guide",
                        obs_scale=pyro.param("obs_scale").item(), role=EXACT, decoder=decoder)


def _frozen(model):
    """The model with its decoder and σx hidden from the optimiser (only the guide learns)."""
    return poutine.block(model, hide_fn=lambda msg: msg["type"] == "param"
                         and (msg["name"].startswith("decoder") or msg["name"] == "obs_scale"))


def _run_svi(x, init, cfg, name, guide_factory, steps: int, optim, particles: int = 1,
             freeze_decoder: bool = False, init_obs_scale: float = 0.5, note: str = "") -> MethodResult:
    decoder, model = _start(cfg, init, init_obs_scale)
    if freeze_decoder:
        model = _frozen(model)
    guide = guide_factory(model)
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1)
    svi = SVI(model, guide, optim, elbo)
    N = x.shape[0]
    nll_hist, kl_hist = [], []

    def record(step, clock):
        with _rng_preserved():
            ev = evaluate_guide(model, guide, x)
        nll_hist.append((step, clock, ev.nll / N))
        kl_hist.append((step, clock, float(ev.kl.total) / N))
        return ev

    clock = 0.0
    for step in tqdm(range(1, steps + 1), desc=name, disable=not cfg.progress):
        t0 = time.perf_counter()
        svi.step(x)
        clock += time.perf_counter() - t0
        if step == 1 or step % cfg.eval_every == 0:   # step 1: the guide's parameters exist from here
            ev = record(step, clock)
    if steps % cfg.eval_every and steps > 1:
        ev = record(steps, clock)
    R = len(cached_linear_regions(decoder))
    return MethodResult(name, ev.nll / N, float(ev.elbo.total) / N, float(ev.kl.total) / N, R, clock, steps,
                        nll_hist, kl_hist, note=f"{note}ELBO/KL method: {ev.method}",
                        obs_scale=pyro.param("obs_scale").item(),
                        role=GUIDE_ONLY if freeze_decoder else VARIATIONAL, decoder=decoder)


def run_circle_experiment(cfg: DemoConfig) -> dict:
    """Fit the circle model by every method; returns {'data', 'config', 'results': [MethodResult]}.

    Runs on ``cfg.threads`` torch threads (restored afterwards) and in float64 (the default dtype is set).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _experiment(cfg)
    finally:
        torch.set_num_threads(threads)


def _experiment(cfg: DemoConfig) -> dict:
    torch.set_default_dtype(torch.float64)
    x = noisy_circle(cfg.n, cfg.noise, seed=cfg.seed)
    init = make_decoder(cfg.seed)
    results = [_run_em(x, init, cfg), _run_mle(x, init, cfg)]
    hidden, K = cfg.encoder_hidden, cfg.mixture_components
    for lr in cfg.vae_lrs:
        results.append(_run_svi(x, init, cfg, f"VAE (Gaussian encoder) lr={lr:g}",
                                lambda m: AmortizedNormal(m, hidden=hidden), cfg.svi_steps,
                                pyro.optim.Adam({"lr": lr}), note=f"Adam lr={lr:g}; "))
    results.append(_run_svi(x, init, cfg, f"SVI mixture encoder K={K}",
                            lambda m: AmortizedMixture(m, K, hidden=hidden), cfg.svi_steps,
                            pyro.optim.Adam({"lr": cfg.mixture_lr}), note=f"Adam lr={cfg.mixture_lr:g}; "))
    # The VAEs above collapse (posterior ≈ prior, so their KL is trivially small). To compare guide
    # families where the posterior is genuinely multimodal, fit both on EM's decoder, held fixed, with
    # the same low-noise optimiser (several particles, a decaying learning rate) so that the final KL
    # measures the family, not the last step's gradient noise.
    em = results[0]
    lrd = cfg.guide_lr_decay ** (1.0 / max(cfg.guide_steps, 1))
    for label, factory in (("Gaussian", lambda m: AmortizedNormal(m, hidden=hidden)),
                           (f"mixture K={K}", lambda m: AmortizedMixture(m, K, hidden=hidden))):
        optim = pyro.optim.ClippedAdam({"lr": cfg.guide_lr, "lrd": lrd})
        results.append(_run_svi(
            x, em.decoder, cfg, f"{label} encoder on EM decoder", factory, cfg.guide_steps, optim,
            particles=cfg.guide_particles, freeze_decoder=True, init_obs_scale=em.obs_scale,
            note=(f"decoder and σx fixed at the EM fit; only the encoder is trained (ClippedAdam lr "
                  f"{cfg.guide_lr:g} → {cfg.guide_lr * cfg.guide_lr_decay:g}, {cfg.guide_particles} particles). ")))
    return {"data": x, "config": cfg, "results": results}


def headline(results: list[MethodResult]) -> dict[str, bool]:
    """The demo's two claims, checked on its own numbers.

    - ``em_below_variational``: EM's exact NLL is below that of every decoder trained by SVI with a guide.
    - ``mixture_kl_below_gaussian``: on EM's decoder, the mixture encoder's exact KL(q ‖ p(z|x)) is below
      the Gaussian encoder's.
    """
    em = next(r for r in results if r.role == EXACT)
    variational = [r for r in results if r.role == VARIATIONAL]
    guides = {("mixture" if "mixture" in r.name else "gaussian"): r for r in results if r.role == GUIDE_ONLY}
    return {"em_below_variational": all(em.final_nll < r.final_nll for r in variational),
            "mixture_kl_below_gaussian": guides["mixture"].final_kl < guides["gaussian"].final_kl}


def format_table(results: list[MethodResult]) -> str:
    def f(v, fmt="{:.4f}"):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    head = f"{'method':<34} {'exact NLL':>10} {'ELBO':>10} {'KL(q||p)':>10} {'regions':>8} {'steps':>7} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.name:<34} {f(r.final_nll):>10} {f(r.final_elbo):>10} {f(r.final_kl):>10} "
                     f"{r.num_regions:>8d} {r.steps:>7d} {r.wall_clock_s:>8.1f}")
    lines.append("(per-sample nats; budgets are steps; seconds = training wall-clock on this machine, "
                 "exact evaluations excluded)")
    return "\n".join(lines)
