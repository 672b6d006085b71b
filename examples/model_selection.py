"""Model selection by the exact likelihood: held-out log-likelihood, AIC and BIC across decoder sizes.

Data: ``noisy_circle`` (training and held-out draws). Models: z ~ N(0, 1), x | z ~ N(g(z), σx²) with a
leaky-ReLU(0.1) decoder of depth 1 ([1, w, 2]) or 2 ([1, w, w, 2]) hidden layers, widths w ∈ {2, 4, 8, 16},
each fitted by exact EM from its own seeded initialisation. Because log p(x) is exact, AIC = 2k − 2 log L
and BIC = k log N − 2 log L (``information_criteria``) and the held-out log-likelihood (``log_evidence``)
are true values, not bounds. The table shows all three per model and which model each criterion picks;
the figure plots them against the number of free parameters k.

    python examples/model_selection.py --out msel_out          # full size (about 1 minute)
    python examples/model_selection.py --quick --out /tmp/ms   # seconds
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import base_parser, fit_em, make_decoder, plt, print_table, setup, write_json  # noqa: E402

from pyro_cpa.datasets import noisy_circle  # noqa: E402
from pyro_cpa.geometry import cached_linear_regions  # noqa: E402
from pyro_cpa.infer import information_criteria  # noqa: E402


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--n", type=int, default=300, help="training points")
    p.add_argument("--n-test", type=int, default=1000, help="held-out points")
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--widths", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2])
    p.add_argument("--em-steps", type=int, default=150)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.n_test, args.widths, args.em_steps = 60, 60, [2, 4], 3
    return args


def figure(rows, path):
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(15, 4.4))
    for ax, key, label in zip(axes, ("aic", "bic", "test_nll_total"),
                              ("AIC = 2k − 2 log L (train)", "BIC = k log N − 2 log L (train)",
                               "held-out −Σ log p(x) (exact)")):
        for depth, marker in zip(sorted({r["depth"] for r in rows}), "os^v"):
            rr = [r for r in rows if r["depth"] == depth]
            ax.plot([r["k"] for r in rr], [r[key] for r in rr], "-" + marker, label=f"depth {depth}")
            for r in rr:
                ax.annotate(f"w={r['width']}", (r["k"], r[key]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
        best = min(rows, key=lambda r: r[key])
        ax.plot([best["k"]], [best[key]], "*", color="red", ms=14, label=f"picked: {best['model']}")
        ax.set(xscale="log", xlabel="free parameters k (log scale)", ylabel=label, title=label.split(" (")[0])
        ax.legend(fontsize=8)
    fig.suptitle("Model selection on the noisy circle with exact likelihoods (lower is better)")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def main(args) -> dict:
    setup(args)
    x = noisy_circle(args.n, args.noise, seed=args.seed)
    x_test = noisy_circle(args.n_test, args.noise, seed=args.seed + 1000)
    rows = []
    for depth in args.depths:
        for width in args.widths:
            widths = [1] + [width] * depth + [2]
            fit = fit_em(x, make_decoder(widths, 0.1, seed=args.seed), 1, args.em_steps,
                         name=f"{widths}", progress=False)
            fit.activate()
            ic = information_criteria(fit.model, x)
            test_lp = fit.log_px(x_test)
            rows.append({"model": str(widths), "depth": depth, "width": width, "k": ic.num_params,
                         "train_ll": ic.log_likelihood, "aic": ic.aic, "bic": ic.bic,
                         "test_ll": float(test_lp.mean()), "test_nll_total": float(-test_lp.sum()),
                         "regions": len(cached_linear_regions(fit.decoder)), "seconds": fit.seconds})
            if not args.quick:
                print(f"  fitted {widths}: train log L {ic.log_likelihood:.1f}, {fit.seconds:.1f}s", file=sys.stderr)
    print_table(rows, [("model", "decoder", ""), ("k", "k", "{:d}"), ("train_ll", "log L train", "{:.2f}"),
                       ("aic", "AIC", "{:.2f}"), ("bic", "BIC", "{:.2f}"), ("test_ll", "test ll/pt", "{:.4f}"),
                       ("regions", "regions", "{:d}"), ("seconds", "EM s", "{:.1f}")],
                title=f"noisy circle: N={args.n} training, {args.n_test} held-out points, {args.em_steps} EM steps "
                      "each; exact log-likelihoods")
    picks = {"aic": min(rows, key=lambda r: r["aic"])["model"],
             "bic": min(rows, key=lambda r: r["bic"])["model"],
             "held_out": max(rows, key=lambda r: r["test_ll"])["model"],
             "train_ll": max(rows, key=lambda r: r["train_ll"])["model"]}
    for key, label in (("aic", "AIC"), ("bic", "BIC"), ("held_out", "held-out log-likelihood"),
                       ("train_ll", "training log-likelihood (no penalty)")):
        print(f"picked by {label:<38} {picks[key]}")
    result = {"models": rows, "picks": picks, "n": args.n, "n_test": args.n_test}
    if args.out:
        path = os.path.join(args.out, "model_selection.png")
        figure(rows, path)
        result["figures"] = [path]
        write_json(args, "model_selection.json", result)
    return result


if __name__ == "__main__":
    main(parse_args())
