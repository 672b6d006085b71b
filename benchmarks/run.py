"""pyro-cpa performance table: one run, every row beside a baseline measured in the same process.

Usage: python benchmarks/run.py [--quick] [--json FILE] [--threads N] [--device DEV] [--keep-going]

Baselines are the best plain implementation of the alternative: importance sampling from the prior (one decoder
pass shared by all data, matmul distances) and from a trained amortised Gaussian encoder (batched decoder passes),
each at the smallest K (on a doubling grid) whose error stays below 1e-3 nats in repeated runs; SciPy and
per-pair loops for the integrals; a plain vectorised NumPy E-step. The last line gives the wall-clock time of
each section and the torch thread count (the full run takes a few minutes on a 2-core machine).

``--device cuda`` runs the decoders, data and exact computations of the integrals, log p (with both IS baselines),
E-step, EM and threads sections on that device (``torch.set_default_device``; timings synchronise the device), and
adds beside each exact integral / log p / E-step row one whose baseline is the same call on CPU copies of the same
tensors in the same process. Sections that are CPU-only by nature are skipped with a printed reason: region
enumeration (it always runs on a CPU copy of the decoder) and the memory section (peak host RSS of fresh processes,
plus a NumPy E-step baseline). ``--device cpu`` (the default) gives the same table as no flag.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn

from pyro_cpa import linear_regions
from pyro_cpa.distributions import CPAMarginal
from pyro_cpa.integrate import gaussian_polytope_moments

DEVICE = torch.device("cpu")
"""Device of the run (``--device``); set by :func:`main`."""

CPU = torch.device("cpu")


def sync(device: torch.device | None = None) -> None:
    """Wait for the work queued on ``device`` (default: the run's device); a no-op on the CPU."""
    device = DEVICE if device is None else device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def plain_default_device():
    """Lift ``torch.set_default_device`` for the enclosed code (restored after; a no-op when none is set).

    A default device is a TorchFunctionMode that every Python-level torch call goes through: measured here,
    +16 % on the circle E-step (3.85 → 4.59 ms). The library takes its tensors' devices from its inputs, so its
    entry points are timed without the mode; code that relies on the default device (Pyro models building
    their own tensors: the EM and SVI steps) is timed with it (``_timeit(..., keep_default_device=True)``).
    """
    dev = torch.get_default_device()
    if dev.type == "cpu":
        yield
        return
    torch.set_default_device(None)
    try:
        yield
    finally:
        torch.set_default_device(dev)


def _timeit(fn, min_time: float = 0.3, max_reps: int = 50, device: torch.device | None = None,
            keep_default_device: bool = False) -> float:
    """Median wall-clock seconds of fn() (repeated until min_time has elapsed), the device's queue drained before
    and after each call (``device``: default the run's device); see :func:`plain_default_device`."""
    times = []
    start = time.perf_counter()
    with (nullcontext() if keep_default_device else plain_default_device()):
        while len(times) < max_reps and (time.perf_counter() - start < min_time or len(times) < 2):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _timeit_interleaved(fn_a, fn_b, rounds: int = 300) -> tuple[float, float]:
    """Median wall-clock seconds of fn_a() and of fn_b(), called alternately (A B B A ...) for ``rounds`` calls each,
    so that both see the same machine state (for two fast calls whose ratio is the claim: a slow spell of the
    machine during one of two back-to-back timing loops would otherwise decide it)."""
    ta, tb = [], []
    with plain_default_device():
        for i in range(rounds):
            for fn, out in ((fn_a, ta), (fn_b, tb)) if i % 2 == 0 else ((fn_b, tb), (fn_a, ta)):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                out.append(time.perf_counter() - t0)
    return float(np.median(ta)), float(np.median(tb))


def _on_device() -> bool:
    return DEVICE.type != "cpu"


def _cpu_row(rows, row, cpu_fn, min_time=0.3, max_reps=5, check=None):
    """On a device run, append a copy of ``row`` whose baseline is the same call on CPU copies of the same tensors
    (``cpu_fn``, timed on the CPU with the process's torch threads): the issue's device-vs-CPU column.

    ``check = (device_result, cpu_result_fn)``: two tensors of the same quantity; the row also reports the largest
    relative difference max|a − b| / max|b| (issue 15 asks for 1e-10 in float64)."""
    if not _on_device():
        return
    note = ""
    with plain_default_device():  # the library puts its tensors on its inputs' device (here the CPU)
        cpu_fn()  # warm-up (caches, lazy initialisation)
        t_cpu = _timeit(cpu_fn, min_time=min_time, max_reps=max_reps, device=CPU)
        if check is not None:
            mine, ref = check[0].detach().cpu(), check[1]().detach()
            note = f"; max rel diff to CPU {((mine - ref).abs().max() / ref.abs().max()).item():.1e}"
    rows.append(dict(row, baseline=f"same on CPU, {torch.get_num_threads()} torch thread(s) ({t_cpu:.4f}s){note}",
                     speedup=t_cpu / row["seconds"]))


def _cpu_marginal(dist):
    """A CPAMarginal with a CPU copy of ``dist``'s decoder and the same σx (the same model for the CPU row)."""
    import copy

    with plain_default_device():
        return CPAMarginal(copy.deepcopy(dist.decoder).to(CPU), dist.obs_scale.detach().to(CPU))


def random_net(widths, seed=0, act=nn.LeakyReLU, slope=0.1):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(act(slope) if act is nn.LeakyReLU else act())
    return nn.Sequential(*layers).double()


def bench_enumeration(rows, quick):
    cases = [[1, 32, 32, 32], [2, 16, 16], [2, 32, 32, 32], [3, 8, 8] if quick else [3, 16, 16]]
    for widths in cases:
        net = random_net(widths)
        t = _timeit(lambda: linear_regions(net), min_time=0.2, max_reps=3 if widths[0] >= 2 else 20)
        R = len(linear_regions(net))
        rows.append(dict(group="enumeration", case=f"{widths}", n=R, seconds=t, rate=R / t, unit="regions/s",
                         baseline=None, speedup=None))


def _polytope_batch(S, n_pairs, seed=0, device=None):
    """Pairs (Gaussian, region) taken from a random decoder's partition, with random means; built on the CPU (the
    same numbers on every device), returned on ``device`` (default: the run's device)."""
    with torch.device(CPU):
        batch = _polytope_batch_cpu(S, n_pairs, seed)
    return tuple(t.to(DEVICE if device is None else device) for t in batch)


def have_cdd() -> bool:
    """Whether pycddlib is importable (the S >= 3 enumeration needs it; the library imports it lazily)."""
    import importlib.util

    return importlib.util.find_spec("cdd") is not None


def _polytope_batch_cpu(S, n_pairs, seed):
    widths = {1: [1, 32, 32], 2: [2, 16, 16], 3: [3, 8, 8], 4: [4, 6, 6]}[S]
    net = random_net(widths, seed=seed)
    if S <= 3:
        regions = linear_regions(net)
        H, c = (t.detach() for t in regions.polytopes())
    else:  # S=4: cells of a single random layer's arrangement through the data, via sign patterns
        torch.manual_seed(seed)
        W = torch.randn(6, 4)
        v = torch.randn(6) * 0.3
        signs = torch.tensor([[1 - 2 * ((k >> j) & 1) for j in range(6)] for k in range(64)], dtype=torch.float64)
        H = signs.unsqueeze(-1) * W
        c = -signs * v
    R = H.shape[0]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(R, (n_pairs,), generator=g)
    loc = torch.randn(n_pairs, S, generator=g) * 0.7
    L = torch.linalg.cholesky(torch.eye(S) * 0.5 + 0.1)
    return loc, L.expand(n_pairs, S, S), H[idx], c[idx]


def _scipy_mass(loc, L, H, c):
    """Baseline: SciPy's multivariate_normal.cdf of H z (an F-dim Gaussian) below c, one call per pair."""
    from scipy.stats import multivariate_normal
    out = []
    for m, l, h, cc in zip(*(t.cpu().numpy() for t in (loc, L, H, c))):
        keep = np.isfinite(cc)
        h, cc = h[keep], cc[keep]
        if len(cc) == 0:
            out.append(0.0)
            continue
        cov = h @ l @ l.T @ h.T
        out.append(np.log(max(multivariate_normal(mean=h @ m, cov=cov, allow_singular=True).cdf(cc), 1e-300)))
    return out


def bench_integrals(rows, quick):
    sizes = {1: 200000, 2: 20000, 3: 200 if quick else 1000, 4: 500 if quick else 2000}
    for S, n in sizes.items():
        if S == 3 and not have_cdd():
            print("integrals: S=3 rows skipped: pycddlib (cdd) is not installed, and the S=3 partition needs it")
            continue
        loc, L, H, c = _polytope_batch(S, n)
        # warm-up (the rules' tables and node sets are built on first use, and glibc's malloc adapts its mmap
        # threshold to the first large blocks freed): without it the median of the two timed calls of a 0.2 s row
        # included the cold first call. S = 4 (seconds per call): on a slice.
        w = n if S <= 3 else 16
        gaussian_polytope_moments(loc[:w], L[:w], H[:w], c[:w])
        t = _timeit(lambda: gaussian_polytope_moments(loc, L, H, c), min_time=0.3, max_reps=5)
        k = 10 if S >= 3 else 30
        t_loop = _timeit(lambda: [gaussian_polytope_moments(loc[i], L[i], H[i], c[i]) for i in range(k)],
                         min_time=0.1, max_reps=2) / k
        t_scipy = _timeit(lambda: _scipy_mass(loc[:k], L[:k], H[:k], c[:k]), min_time=0.1, max_reps=2) / k
        rate = n / t
        rows.append(dict(group="integrals", case=f"S={S} mass+moments", n=n, seconds=t, rate=rate, unit="pairs/s",
                         baseline="per-pair Python loop", speedup=rate * t_loop))
        rows.append(dict(group="integrals", case=f"S={S} mass+moments", n=n, seconds=t, rate=rate, unit="pairs/s",
                         baseline="scipy mvn.cdf (mass only)", speedup=rate * t_scipy))
        cpu_args = tuple(v.cpu() for v in (loc, L, H, c))
        _cpu_row(rows, rows[-1], lambda: gaussian_polytope_moments(*cpu_args))


IS_TOL, IS_REPEATS = 1e-3, 3
"""Target of the importance-sampling baselines: the mean absolute error of log p against the exact value (nats)
is below IS_TOL in each of IS_REPEATS independent estimates (the error is heavy-tailed: one lucky draw at a small
K would report a K that a user could not rely on)."""


def _log_normal_sq(sq, scale_log_sum, D):
    """log N from a squared whitened distance: −½ sq − D/2 log 2π − Σ log σ."""
    return -0.5 * sq - 0.5 * D * math.log(2 * math.pi) - scale_log_sum


def _importance_sampling(dist, x, n_samples, generator=None, max_elements=4_000_000):
    """Baseline: log p(x) ≈ log mean_k p(x | z_k), z_k ~ prior (plain Monte-Carlo importance sampling).

    The best plain implementation: one decoder pass for the K draws, shared by all data, and the squared
    distances by a matmul, ‖x − g‖² = ‖x‖² − 2 x·g + ‖g‖² (no (N, K, D) temporary), for chunks of data whose
    (chunk, K) log-weights hold at most ``max_elements``.
    """
    S = dist.latent_dim
    z = torch.randn(n_samples, S, dtype=torch.float64, generator=generator,
                    device=dist.prior_scale.device) * dist.prior_scale
    with torch.no_grad():
        g = dist.decoder(z) / dist.obs_scale
    gg = (g * g).sum(-1)
    D = x.shape[-1]
    const = torch.log(dist.obs_scale).expand(D).sum()
    out = []
    for xs in (x / dist.obs_scale).split(max(1, max_elements // n_samples)):
        sq = (xs * xs).sum(-1, keepdim=True) - 2.0 * xs @ g.T + gg
        out.append(_log_normal_sq(sq, const, D).logsumexp(-1))
    return torch.cat(out) - math.log(n_samples)


def _encoder_is(dist, loc, scale, x, K, max_points=2 ** 20):
    """Baseline: log p(x) ≈ log mean_k p(x | z_k) p(z_k) / q(z_k | x), z_k ~ q(z | x) = N(loc(x), diag scale(x)²)
    from a trained encoder (the amortised proposal of a VAE).

    The best plain implementation: the N·K draws z = loc + scale·ε go through the decoder in batches of
    ``max_points`` (one matmul per layer), the log-weights are elementwise, and the K log-weights of a datum are
    reduced by logsumexp batch by batch (a running log-sum-exp over the batches of draws).
    """
    N, S = loc.shape
    D = x.shape[-1]
    sx, sz = dist.obs_scale.expand(D), dist.prior_scale.expand(S)
    per = max(1, max_points // N)  # draws per datum in one batch
    parts = []
    for k0 in range(0, K, per):
        k = min(per, K - k0)
        eps = torch.randn(k, N, S, dtype=loc.dtype, device=loc.device)
        z = loc + scale * eps
        with torch.no_grad():
            g = dist.decoder(z.reshape(-1, S)).reshape(k, N, D)
        log_lik = _log_normal_sq((((x - g) / sx) ** 2).sum(-1), sx.log().sum(), D)
        log_prior = _log_normal_sq(((z / sz) ** 2).sum(-1), sz.log().sum(), S)
        log_q = _log_normal_sq((eps * eps).sum(-1), scale.log().sum(-1), S)
        parts.append((log_lik + log_prior - log_q).logsumexp(0))
    return torch.stack(parts).logsumexp(0) - math.log(K)


def _is_until(estimate, exact, K0, K_max):
    """Smallest K on the grid K0·2^j (<= K_max) whose IS_REPEATS estimates each have a mean absolute error below
    IS_TOL nats against the exact log p; returns K, the largest of those errors, and the median seconds of one
    estimate at that K."""
    K = K0
    while True:
        err = 0.0
        for _ in range(IS_REPEATS):
            err = max(err, (estimate(K) - exact).abs().mean().item())
            if err >= IS_TOL:
                break
        if err < IS_TOL or 2 * K > K_max:
            return K, err, _timeit(lambda: estimate(K), min_time=0.2, max_reps=3)
        K *= 2


def _cpa_model(decoder, obs_scale=None, train_decoder=None):
    """z ~ N(0, I_S), x ~ N(g(z), σx²) as a Pyro model; σx is a Pyro param when ``obs_scale`` is None (EM
    updates it), else a constant. The decoder is registered (trained) in the first case, or when
    ``train_decoder`` says so."""
    import pyro
    import pyro.distributions as pdist
    from torch.distributions import constraints

    from pyro_cpa.distributions.likelihood import CPALikelihood

    S = decoder[0].in_features

    def model(x):
        if (obs_scale is None) if train_decoder is None else train_decoder:
            pyro.module("decoder", decoder)
        if obs_scale is None:
            sx = pyro.param("obs_scale", torch.tensor(0.5), constraint=constraints.positive)
        else:
            sx = torch.as_tensor(obs_scale, dtype=x.dtype)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pdist.Normal(torch.zeros(S, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", CPALikelihood(decoder, z, sx), obs=x)
    return model


def _train_encoder(net, obs_scale, x, steps, seed=0, train_decoder=False):
    """An amortised Gaussian guide (pyro_cpa.guides.AmortizedNormal, MLP encoder) trained by SVI (Adam) on the
    data x against the fixed decoder: the encoder a VAE user would have for this decoder — or, with
    ``train_decoder``, together with the decoder (a VAE with σx fixed at ``obs_scale``)."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    from pyro_cpa.guides import AmortizedNormal

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = _cpa_model(net, obs_scale, train_decoder)
    guide = AmortizedNormal(model, hidden=(64, 64))
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 3e-3, "lrd": 0.1 ** (1 / steps)}), Trace_ELBO())
    with torch.enable_grad():
        for _ in range(steps):
            svi.step(x)
    with torch.no_grad():
        q = guide.encode(x)
    return q.mean.detach(), q.stddev.detach()


def _cap_note(err):
    return "" if err < IS_TOL else " > 1e-3 at the K cap: ratio is a lower bound"


def bench_log_prob(rows, quick):
    """Exact log p against importance sampling at IS_TOL nats. Random decoders (σx = 0.3; their posteriors are
    close to the prior, the case most favourable to sampling from the prior), and a [2, 16, 16, 2] decoder trained
    as a VAE (pyro_cpa.guides.AmortizedNormal encoder, Trace_ELBO, σx fixed at 0.05) on the noisy circle — the
    peaked posteriors of a fitted model, where the encoder is the VAE's own."""
    from pyro_cpa.datasets import noisy_circle

    N = 200 if quick else 1000
    K_max = 2 ** 14 if quick else 2 ** 18
    k_encoder_max = 2 ** 12 if quick else 2 ** 14   # an encoder draw costs a decoder pass per datum (N·K points)
    cases = [([1, 32, 32, 2], None), ([1, 32, 32, 64], None), ([2, 16, 16, 2], None), ([2, 16, 16, 2], "vae")]
    for widths, trained in cases:
        net = random_net(widths)
        if trained:
            x = noisy_circle(N, noise=0.05, seed=0)
            steps = 300 if quick else 2000
            t0 = time.perf_counter()
            vae_loc, vae_scale = _train_encoder(net, 0.05, x, steps, train_decoder=True)
            t_vae = time.perf_counter() - t0
            dist = CPAMarginal(net, 0.05)
        else:
            dist = CPAMarginal(net, 0.3)
            x = dist.sample((N,))
        label = f"{widths} N={N}" + (" VAE-trained" if trained else "")
        dist.regions  # enumerate once (cached by parameter state)
        # scoring data needs no gradient, as for the IS baselines (their decoder passes run under no_grad too)
        with torch.no_grad():
            t = _timeit(lambda: dist.log_prob(x), min_time=0.3, max_reps=5)
            exact = dist.log_prob(x)
        torch.manual_seed(1)
        K, err, t_is = _is_until(lambda K: _importance_sampling(dist, x, K), exact, 1024, K_max)
        rows.append(dict(group="log_prob", case=label, n=N, seconds=t, rate=N / t, unit="points/s",
                         baseline=f"prior IS K={K} (err {err:.1e} nats{_cap_note(err)}, {t_is:.3f}s)",
                         speedup=t_is / t))
        if _on_device():
            cpu_dist, cpu_x = _cpu_marginal(dist), x.cpu()
            _cpu_row(rows, rows[-1], lambda: cpu_dist.log_prob(cpu_x), check=(exact, lambda: cpu_dist.log_prob(cpu_x)))
        if widths[0] == 2:
            steps = 300 if quick else 2000
            if trained:   # the VAE's own encoder
                loc, scale, t_train, what = vae_loc, vae_scale, t_vae, "VAE"
            else:
                t0 = time.perf_counter()
                loc, scale = _train_encoder(net, 0.3, x, steps)
                t_train, what = time.perf_counter() - t0, "SVI"
            K, err, t_is = _is_until(lambda K: _encoder_is(dist, loc, scale, x, K), exact, 64, k_encoder_max)
            rows.append(dict(group="log_prob", case=label, n=N, seconds=t, rate=N / t, unit="points/s",
                             baseline=f"encoder IS K={K} (err {err:.1e} nats{_cap_note(err)}, {t_is:.3f}s; "
                                      f"{what} {steps} steps {t_train:.0f}s not counted)", speedup=t_is / t))


def _circle_model(seed=0):
    from pyro_cpa.demo.circle import make_decoder, make_model

    decoder = make_decoder(seed)
    return decoder, make_model(decoder)


def bench_em(rows, quick):
    """E-step throughput, one EM step vs one SVI step, and time to reach a target exact NLL."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    from pyro_cpa.datasets import noisy_circle
    from pyro_cpa.guides import AmortizedNormal, ExactPosterior
    from pyro_cpa.infer import EM, collapse, empty_guide
    from pyro_cpa.infer.estep import e_step

    N = 200 if quick else 1000
    for widths in ([1, 8, 8, 2], [2, 16, 16, 2]):
        net = random_net(widths)
        dist = CPAMarginal(net, 0.3)
        x = dist.sample((N,))
        R = len(dist.regions)
        t = _timeit(lambda: e_step(dist, x), min_time=0.3, max_reps=5)
        rows.append(dict(group="E-step", case=f"{widths} N={N}", n=N * R, seconds=t, rate=N * R / t,
                         unit="pairs/s", baseline=None, speedup=None))
        if _on_device():
            cpu_dist, cpu_x = _cpu_marginal(dist), x.cpu()
            _cpu_row(rows, rows[-1], lambda: e_step(cpu_dist, cpu_x),
                     check=(e_step(dist, x).loglik, lambda: e_step(cpu_dist, cpu_x).loglik))
    with torch.device(CPU):  # the same data on every device
        x = noisy_circle(N if not quick else 200)
    x = x.to(DEVICE)
    pyro.clear_param_store()
    decoder, model = _circle_model()
    em = EM(model, ExactPosterior(model))
    em.step(x)
    t_em = _timeit(lambda: em.step(x), min_time=0.5, max_reps=5, keep_default_device=True)
    pyro.clear_param_store()
    decoder, model = _circle_model()
    svi = SVI(model, AmortizedNormal(model, hidden=(32, 32)), pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    svi.step(x)
    t_svi = _timeit(lambda: svi.step(x), min_time=0.3, max_reps=50, keep_default_device=True)
    rows.append(dict(group="EM vs SVI", case=f"one step, circle N={len(x)}", n=1, seconds=t_em, rate=1 / t_em,
                     unit="steps/s", baseline="VAE SVI step", speedup=t_svi / t_em))
    # time to reach a target exact NLL per sample: EM vs exact-MLE SVI (Adam 1e-2) on the same model
    # budgets are steps, not seconds, so the same command gives the same steps column on any machine
    target, max_steps = (2.0, (40, 400)) if quick else (0.6, (200, 3000))

    def time_to_target(step_fn, budget_steps):
        t0 = time.perf_counter()
        for steps in range(1, budget_steps + 1):
            if step_fn() / len(x) <= target:
                return time.perf_counter() - t0, steps
        return float("inf"), budget_steps
    pyro.clear_param_store()
    decoder, model = _circle_model()
    em = EM(model, ExactPosterior(model))
    t_em_target, s_em = time_to_target(lambda: em.step(x), max_steps[0])
    pyro.clear_param_store()
    decoder, model = _circle_model()
    mle = SVI(collapse(model), empty_guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    t_mle_target, s_mle = time_to_target(lambda: mle.step(x), max_steps[1])
    rows.append(dict(group="EM vs SVI", case=f"time to NLL<={target} ({s_em} EM steps)", n=s_em,
                     seconds=t_em_target, rate=float("nan"), unit="s",
                     baseline=f"exact-MLE SVI ({s_mle} steps, {t_mle_target:.1f}s)", speedup=t_mle_target / t_em_target))


def bench_em_cost(rows, quick):
    """Seconds per EM step beside one E-step at the same parameters (the issue's EM-cost and wide-layer rows): the
    median over the states the timed steps reach (the partition grows during the first steps: R 181 -> ~270 on
    [1,64,64,64,10], so an E-step at the start understates the E-step of the states the steps work at). The case
    label's ``R=a-b``: regions at the start - the largest partition of the states reached.

    Decoders: pyro_cpa.nn.mlp, LeakyReLU(0.1). Data: N draws of the seed-0 decoder with σx = 0.3; the model starts
    from the seed-1 decoder (S=2: 119 regions, the issue's case) and σx = 0.5. S=2 [2,8,8,3]: one warm-up step,
    then the median of timed steps, with the E-step and log p evaluations per step. Every decoder: both
    closed-form schedules from the same start (an E-step at the initial parameters first, which also enumerates
    the partition), the median seconds of the first ``steps`` steps and the NLL per datum after them: ``layerwise``
    (one verified E-step per hidden layer, plus its backtracks; for S = 2 the certified output layer and σx ride
    with the first hidden layer's verification, em_step's ``merge_certified``) makes more progress per step,
    ``joint`` (one E-step, one line search on log p) costs less per step — the table shows both sides."""
    import pyro

    from pyro_cpa.guides import ExactPosterior
    from pyro_cpa.infer import EM
    from pyro_cpa.infer.estep import e_step
    from pyro_cpa.nn import mlp

    both = ("layerwise", "joint")
    cases = ([([2, 8, 8, 3], 100, 1, 2, both), ([1, 64, 64, 64, 10], 200, 0, 2, both),
              ([1, 128, 128, 2], 200, 0, 2, both)] if quick
             else [([2, 8, 8, 3], 300, 1, 3, both), ([1, 64, 64, 64, 10], 1000, 0, 5, both),
                   ([1, 128, 128, 2], 1000, 0, 5, ("layerwise", "joint"))])
    for widths, N, warm, steps, schedules in cases:
        torch.manual_seed(0)
        with torch.no_grad():
            x = CPAMarginal(mlp(widths, lambda: nn.LeakyReLU(0.1), seed=0), 0.3).sample((N,))
        for schedule in schedules:
            pyro.clear_param_store()
            dec = mlp(widths, lambda: nn.LeakyReLU(0.1), seed=1)
            model = _cpa_model(dec)
            em = EM(model, ExactPosterior(model), schedule=schedule)
            for _ in range(warm):
                em.step(x)
            def e_step_here():
                """(regions, seconds of one E-step) at the current parameters (the partition enumerated first)."""
                with torch.no_grad():
                    pyro.poutine.trace(model).get_trace(x)  # creates σx's param before the first step
                    dist = CPAMarginal(dec, pyro.param("obs_scale").detach())
                    R = len(dist.regions)
                    return R, _timeit(lambda: e_step(dist, x), min_time=0.0, max_reps=3)

            R, t_e0 = e_step_here()
            times, t_es, Rs = [], [], []
            for _ in range(steps):
                t0 = time.perf_counter()
                em.step(x)
                times.append(time.perf_counter() - t0)
                R_k, t_k = e_step_here()   # the E-step of the state this step reached (the partition grows)
                t_es.append(t_k)
                Rs.append(R_k)
            t = float(np.median(times))
            t_e = float(np.median(t_es))
            hist = em.history[-steps:]
            counts = (f"; per step {np.mean([h.e_steps for h in hist]):.1f} E-steps, "
                      f"{np.mean([h.log_prob_evals for h in hist]):.1f} log p, "
                      f"{np.mean([h.backtracks for h in hist]):.1f} backtracks")
            label = "" if len(schedules) == 1 else f" {schedule}"
            rows.append(dict(group="EM step", case=f"{widths} N={N} R={R}-{max(Rs)}{label}", n=N, seconds=t,
                             rate=1 / t, unit="steps/s", speedup=t_e / t,
                             baseline=f"one E-step {t_e:.3f}s at the states reached (median; {t_e0:.3f}s at the "
                                      f"start) (step = {t / t_e:.1f} E-steps){counts}; NLL/datum "
                                      f"{hist[0].nll_before / N:.4f} -> {hist[-1].nll_after / N:.4f} after {steps} "
                                      f"steps"))


def _numpy_estep_s1(x, a, b, lo, hi, obs_var, prior_var):
    """Baseline: the exact S=1 E-step in plain vectorised NumPy/SciPy, given the regions.

    a, b (R, D): g(z) = a z + b on the interval (lo, hi) of region ω. Same maths as pyro_cpa's e_step (posterior
    N(μ, v) per pair, κ, log P = log(Φ(β) − Φ(α)) from the tail away from the mass, truncated-normal moments),
    all (N, R) pairs at once, no pruning. Returns Z (R, 2, 2), X (R, D, 2), q (R, D), log p (N,).
    """
    from scipy.special import log_ndtr, logsumexp

    log2pi = math.log(2 * math.pi)
    D = x.shape[1]
    w = 1.0 / obs_var
    lam = 1.0 / prior_var + (a * a * w).sum(-1)
    v = 1.0 / lam
    r = x[:, None, :] - b
    mu = v * (r * (a * w)).sum(-1)
    res = r - a * mu[..., None]
    quad = (res * res * w).sum(-1) + mu * mu / prior_var
    log_kappa = -0.5 * (D * log2pi + np.log(obs_var).sum() + math.log(prior_var) + np.log(lam) + quad)
    s = np.sqrt(v)
    al, be = (lo - mu) / s, (hi - mu) / s
    flip = al > 0
    la, lb = log_ndtr(np.where(flip, -be, al)), log_ndtr(np.where(flip, -al, be))
    with np.errstate(divide="ignore", invalid="ignore"):
        log_mass = lb + np.log1p(-np.exp(la - lb))
        terms = log_kappa + log_mass
        lp = logsumexp(terms, axis=-1)
        e0 = np.exp(terms - lp[:, None])
        pa = np.where(np.isfinite(al), np.exp(-0.5 * al * al - 0.5 * log2pi - log_mass), 0.0)
        pb = np.where(np.isfinite(be), np.exp(-0.5 * be * be - 0.5 * log2pi - log_mass), 0.0)
        mean_u = pa - pb
        var_u = 1.0 + np.where(np.isfinite(al), al * pa, 0.0) - np.where(np.isfinite(be), be * pb, 0.0) - mean_u ** 2
    m = np.where(e0 > 0, mu + s * mean_u, 0.0)
    C = np.where(e0 > 0, v * var_u, 0.0)
    Z = np.empty((a.shape[0], 2, 2))
    Z[:, 0, 0] = (e0 * (C + m * m)).sum(0)
    Z[:, 0, 1] = Z[:, 1, 0] = (e0 * m).sum(0)
    Z[:, 1, 1] = e0.sum(0)
    X = np.stack([x.T @ (e0 * m), x.T @ e0], -1).transpose(1, 0, 2)
    return Z, X, e0.T @ (x * x), lp


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))


def _peak_rss_child(case, widths, N, conn):
    """In a fresh process: peak RSS increase of one log p evaluation (bytes), and its seconds."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    from pyro_cpa.distributions import chunked

    net = random_net(widths)
    sx = torch.tensor(0.3, requires_grad=True)
    dist = CPAMarginal(net, sx)
    R = len(dist.regions)
    with torch.no_grad():
        x = dist.sample((N,))
    before = _rss_bytes()
    _reset_peak_rss()
    t0 = time.perf_counter()
    if case == "grad":  # exact-MLE path: log p under autograd, then backward
        dist.log_prob(x).sum().backward()
    elif case == "grad_full_graph":  # previous log_prob: one autograd graph over every (datum, region) pair
        res = chunked.evaluate_chunk(dist._params(), x, None, 0, prune_tol=dist.prune_tol, need_moments=False,
                                     mc_kwargs={})
        res.terms.logsumexp(-1).sum().backward()
    elif case == "nograd":
        with torch.no_grad():
            dist.log_prob(x)
    else:  # previous no-grad log_prob: dense (N, R) terms and stderr kept over chunks of 1024 data
        with torch.no_grad():
            p = dist._params()
            kept = [chunked.evaluate_chunk(p, x[i:i + 1024], None, i, prune_tol=dist.prune_tol, need_moments=False,
                                           mc_kwargs={}) for i in range(0, N, 1024)]
            terms = torch.cat([k.terms for k in kept])
            err = torch.cat([k.mom.log_mass_stderr for k in kept])
            terms.logsumexp(-1), err.sum()
    seconds = time.perf_counter() - t0
    conn.send((max(0, _peak_rss_bytes() - before), seconds, R))
    conn.close()


def _peak_rss(case, widths, N):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_peak_rss_child, args=(case, widths, N, send))
    proc.start()
    out = recv.recv()
    proc.join()
    return out


def bench_memory(rows, quick):
    """log_prob memory per (datum, region) pair with and without autograd (each in a fresh process, peak RSS),
    against the previous dense evaluation; and the per-call cost of the circle E-step against plain NumPy."""
    from pyro_cpa.datasets import noisy_circle
    from pyro_cpa.demo.circle import make_decoder
    from pyro_cpa.infer.estep import e_step

    for case, base, widths, N in (("grad", "grad_full_graph", [2, 32, 32, 2], 16 if quick else 40),
                                  ("nograd", "nograd_dense", [1, 64, 64, 64, 2], 10_000 if quick else 100_000)):
        peak, sec, R = _peak_rss(case, widths, N)
        peak0, sec0, _ = _peak_rss(base, widths, N)
        label = "log p + backward" if case == "grad" else "log p, no grad"
        rows.append(dict(group="memory", case=f"{label} {widths} N={N}", n=N * R, seconds=sec, rate=peak / (N * R),
                         unit="B/pair", baseline=f"{'one graph over all pairs' if case == 'grad' else 'dense (N, R) terms'}"
                                                 f": {peak0 / (N * R):.0f} B/pair ({peak0 / 1e6:.0f} MB vs "
                                                 f"{peak / 1e6:.0f} MB)", speedup=peak0 / peak))
    # circle E-step (N=500, R=16): pyro_cpa vs the same maths in plain vectorised NumPy, same run
    dist = CPAMarginal(make_decoder(0), 0.5)
    x = noisy_circle(500)
    with torch.no_grad():
        A, b, H, c = dist._region_params()
        stats = e_step(dist, x)
        h, real = H[..., 0], torch.isfinite(c)
        ratio = torch.where(real, c / torch.where(real, h, torch.ones_like(h)), torch.zeros_like(c))
        hi = torch.where(real & (h > 0), ratio, torch.full_like(c, math.inf)).amin(-1).numpy()
        lo = torch.where(real & (h < 0), ratio, torch.full_like(c, -math.inf)).amax(-1).numpy()
        args = (x.numpy(), A[..., 0].numpy(), b.numpy(), lo, hi, dist._variances()[0].numpy(), 1.0)
        ref = _numpy_estep_s1(*args)
        for mine, theirs in zip((stats.Z, stats.X, stats.q, stats.loglik), ref):  # the baseline computes the same
            assert np.abs(mine.numpy() - theirs).max() <= 1e-10 * np.abs(theirs).max()
        t, t_np = _timeit_interleaved(lambda: e_step(dist, x), lambda: _numpy_estep_s1(*args), rounds=400)
    rows.append(dict(group="E-step", case="circle N=500 (R=16)", n=500 * len(dist.regions), seconds=t,
                     rate=500 * len(dist.regions) / t, unit="pairs/s",
                     baseline=f"plain NumPy E-step ({t_np * 1e3:.2f} ms; medians of 400 interleaved calls each)",
                     speedup=t_np / t))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_line():
    line = (f"{_cpu_model()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, python {platform.python_version()}")
    if DEVICE.type == "cuda":
        line += f"; device {DEVICE}: {torch.cuda.get_device_name(DEVICE)}, CUDA {torch.version.cuda}"
    elif _on_device():
        line += f"; device {DEVICE}"
    return line


CPU_ONLY_SECTIONS = {
    "enumeration": "region enumeration always runs on a CPU copy of the decoder (see the --device cpu table)",
    "memory": "peak host RSS of fresh CPU processes and a NumPy E-step baseline (see the --device cpu table)",
}
"""Sections skipped on a device run, with the reason printed."""


def print_table(rows):
    print(f"{'group':<12} {'case':<28} {'n':>8} {'seconds':>10} {'rate':>12} {'unit':<10} {'vs baseline':>12}  baseline")
    for r in rows:
        sp = f"{r['speedup']:.1f}x" if r["speedup"] is not None else "-"
        print(f"{r['group']:<12} {r['case']:<28} {r['n']:>8} {r['seconds']:>10.4f} {r['rate']:>12.4g} {r['unit']:<10} "
              f"{sp:>12}  {r['baseline'] or ''}")


def _set_device(name: str) -> None:
    """Make ``name`` the run's device: the default device of every tensor and module created from here on."""
    global DEVICE
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    torch.empty(0, device=dev)  # an unusable device fails here, with torch's message
    DEVICE = dev
    if _on_device():
        torch.set_default_device(dev)


def main(args):
    torch.set_default_dtype(torch.float64)
    if args.threads:
        torch.set_num_threads(args.threads)
    _set_device(args.device)
    rows, sections, failed, interrupted = [], [], [], []
    print("hardware:", hardware_line(), flush=True)
    t_start = time.perf_counter()

    def section(name, run):
        t0 = time.perf_counter()
        if interrupted:
            sections.append(f"{name} not run")
            return
        if _on_device() and name in CPU_ONLY_SECTIONS:
            print(f"{name}: skipped on {DEVICE}: {CPU_ONLY_SECTIONS[name]}", flush=True)
            sections.append(f"{name} skipped")
            return
        try:
            run()
        except KeyboardInterrupt:  # SIGINT (e.g. `timeout -s INT`): print the rows so far
            if not args.keep_going:
                raise
            interrupted.append(name)
            failed.append(name)
            print(f"{name}: INTERRUPTED; --keep-going: the table so far", flush=True)
        except Exception:
            if not args.keep_going:
                raise
            import traceback

            traceback.print_exc()
            failed.append(name)
            print(f"{name}: FAILED (traceback above); --keep-going: next section", flush=True)
        status = " INTERRUPTED" if name in interrupted else " FAILED" if name in failed else ""
        sections.append(f"{name} {time.perf_counter() - t0:.0f}s{status}")

    for bench, grad in ((bench_enumeration, False), (bench_integrals, False), (bench_log_prob, False),
                        (bench_em, True), (bench_em_cost, True), (bench_memory, True)):
        def run(bench=bench, grad=grad):
            with torch.set_grad_enabled(grad):
                bench(rows, args.quick)
        section(bench.__name__[6:], run)
    if args.thread_counts:
        from threads_row import threads_rows   # benchmarks/threads_row.py: the same work at 1, 2, ... threads
        section("threads", lambda: rows.extend(threads_rows(tuple(args.thread_counts), quick=args.quick,
                                                            device=DEVICE)))
    print_table(rows)
    print(f"wall-clock {time.perf_counter() - t_start:.0f}s ({', '.join(sections)}); torch threads "
          f"{torch.get_num_threads()}")
    if failed:
        print(f"FAILED sections: {', '.join(failed)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(hardware=hardware_line(), device=str(DEVICE), failed_sections=failed, rows=rows), fh,
                      indent=2)
    if failed:
        raise SystemExit(1)
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    p.add_argument("--json", default=None, help="also write the table as JSON")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the batches here are small; 0 = torch's default)")
    p.add_argument("--thread-counts", type=int, nargs="*", default=[1, 2],
                   help="thread counts of the 'threads' rows (first = reference; e.g. 1 2 16 on a 16-core machine; "
                        "none: skip them)")
    p.add_argument("--device", default="cpu",
                   help="torch device of the decoders, data and timed computations (default cpu; e.g. cuda). "
                        "CPU-only sections are skipped with a printed reason; timings synchronise the device")
    p.add_argument("--keep-going", action="store_true",
                   help="a section that raises prints its traceback and the run goes on (exit status 1 at the end)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
