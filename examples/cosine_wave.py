"""The cosine-wave manifold (Fig. 6 of Balestriero et al.): exact EM vs a VAE, judged by the exact NLL.

Data: ``pyro_cpa.datasets.cosine_wave`` (x = (t, cos(1.5πt)) + noise, t ~ U(−1, 1)). Model: z ~ N(0, 1),
x | z ~ N(g(z), σx²) with a leaky-ReLU(0.1) decoder g = [1, 8, 8, 2] (S = 1). From the same initial
weights the model is fitted by

- exact EM (``EM(model, ExactPosterior(model))``) from ``--restarts`` seeded initialisations, keeping the
  one with the best exact training likelihood (possible because the likelihood is exact; EM's local
  optima on this data range from 0.2 to 2.6 nats/point), and
- a VAE (``SVI(model, AmortizedNormal(model), Adam, Trace_ELBO())``) from the first of those
  initialisations, trained for ``--vae-steps`` steps (15000: more than the 400 EM steps cost here),

and both are scored by the exact negative log-likelihood −log p(x) (``log_evidence``), the VAE also by its
exact ELBO and KL(q ‖ p(z | x)) (``evaluate_guide``). Figures: the learned manifolds g(z) over the data
(coloured by linear region) and the exact NLL against training time.

    python examples/cosine_wave.py --out cosine_out           # full size (about 2 minutes)
    python examples/cosine_wave.py --quick --out /tmp/cw      # seconds
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (base_parser, fit_em, fit_vae, make_decoder, plt, print_table, setup, summary_rows,  # noqa: E402
                     write_json)

from pyro_cpa.datasets import cosine_wave  # noqa: E402
from pyro_cpa.geometry import cached_linear_regions  # noqa: E402


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--n", type=int, default=500, help="training points")
    p.add_argument("--n-test", type=int, default=500, help="held-out points")
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=8, help="width of the decoder's two hidden layers")
    p.add_argument("--em-steps", type=int, default=100)
    p.add_argument("--restarts", type=int, default=4, help="EM restarts (seeds seed, seed+1, ...)")
    p.add_argument("--vae-steps", type=int, default=15000, help="VAE steps (a step budget: the same table on any machine)")
    p.add_argument("--vae-lr", type=float, default=5e-3)
    p.add_argument("--init-obs-scale", type=float, default=0.2, help="initial σx of both fits")
    p.add_argument("--match-time", action="store_true",
                   help="also train the VAE for at least EM's wall-clock (machine-dependent: the table then varies)")
    args = p.parse_args(argv)
    if args.quick:
        args.match_time = False   # deterministic step counts in the smoke test
        args.n, args.n_test, args.hidden, args.em_steps, args.vae_steps, args.restarts = 60, 60, 6, 3, 30, 2
    return args


def _manifold(decoder, num=2000):
    """g(z) at ``num`` prior quantiles of z (dense where p(z) has mass: sparse dots = improbable jumps)."""
    u = (torch.arange(num) + 0.5) / num
    z = torch.distributions.Normal(0.0, 1.0).icdf(u).unsqueeze(-1)
    with torch.no_grad():
        g = decoder(z)
    return z, g, cached_linear_regions(decoder).locate(z)


def figure(x, fits, path):
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(16, 4.8))
    x = x.numpy()
    for ax, f in zip(axes[:2], fits):
        z, g, idx = (t.numpy() for t in _manifold(f.decoder))
        R = len(cached_linear_regions(f.decoder))
        ax.scatter(x[:, 0], x[:, 1], s=5, color="0.65", label="training data")
        ax.scatter(g[:, 0], g[:, 1], c=idx, cmap="tab20", s=3, label=f"g(z) at 2000 prior quantiles of z ({R} regions)")
        lo, hi = x.min(0) - 0.3, x.max(0) + 0.3     # the tails of g(z) may leave the window
        ax.set(xlabel="x1", ylabel="x2", title=f"{f.name}: exact NLL {f.test_nll:.3f} nats (held out)",
               xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]))
        ax.legend(loc="best", fontsize=8)
    ax = axes[2]
    for f, style in zip(fits, ("-o", "-s")):
        h = torch.tensor(f.nll_history).numpy()
        ax.plot(h[:, 1], h[:, 2], style, ms=3, label=f.name)
    ax.set(xlabel="training wall-clock (s)", ylabel="exact NLL per point (train, nats)",
           title="Exact NLL during training", ylim=(None, min(3.0, ax.get_ylim()[1])))
    ax.legend()
    fig.suptitle("Cosine wave (Fig. 6): learned 1-D manifolds of a [1, H, H, 2] leaky-ReLU decoder")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def main(args) -> dict:
    setup(args)
    x = cosine_wave(args.n, args.noise, seed=args.seed)
    x_test = cosine_wave(args.n_test, args.noise, seed=args.seed + 1000)
    inits = [make_decoder([1, args.hidden, args.hidden, 2], 0.1, seed=args.seed + r) for r in range(args.restarts)]
    restarts = [fit_em(x, init, 1, args.em_steps, name=f"EM restart {r}", init_obs_scale=args.init_obs_scale,
                       progress=not args.quick) for r, init in enumerate(inits)]
    em = min(restarts, key=lambda f: f.nll_history[-1][2])
    em.name = "EM (exact, best restart)"
    em_seconds = sum(f.seconds for f in restarts)
    init = inits[0]
    vae = fit_vae(x, init, 1, args.vae_steps, lr=args.vae_lr, hidden=(32, 32),
                  min_seconds=em_seconds if args.match_time else 0.0,
                  nll_every=max(1, args.vae_steps // 20), init_obs_scale=args.init_obs_scale,
                  progress=not args.quick)
    rows = summary_rows((em, vae), x, x_test)
    rows[0]["seconds"] = em_seconds   # all restarts
    rows[0]["steps"] = args.em_steps * args.restarts
    print_table(rows, [("method", "method", ""), ("train_nll", "NLL train", "{:.4f}"),
                       ("test_nll", "NLL test", "{:.4f}"), ("elbo", "ELBO train", "{:.4f}"),
                       ("kl", "KL(q||p)", "{:.4f}"), ("obs_scale", "sigma_x", "{:.4f}"),
                       ("regions", "regions", "{:d}"), ("seconds", "seconds", "{:.1f}"), ("steps", "steps", "{:d}")],
                title=f"cosine wave, N={args.n} (test {args.n_test}), decoder [1, {args.hidden}, {args.hidden}, 2]; "
                      "per-point nats, exact")
    print("EM restarts, final training NLL per point: " +
          ", ".join(f"seed {args.seed + r}: {f.nll_history[-1][2]:.4f}" for r, f in enumerate(restarts)))
    result = {"em": rows[0], "vae": rows[1], "n": args.n, "hidden": args.hidden,
              "em_restart_nll": [f.nll_history[-1][2] for f in restarts],
              "em_nll_history": [h[2] for h in em.nll_history], "vae_nll_history": [h[2] for h in vae.nll_history]}
    if args.out:
        path = os.path.join(args.out, "cosine_wave_manifolds.png")
        figure(x, (em, vae), path)
        result["figures"] = [path]
        write_json(args, "cosine_wave.json", result)
    return result


if __name__ == "__main__":
    main(parse_args())
