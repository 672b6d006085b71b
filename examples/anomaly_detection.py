"""Anomaly detection with exact likelihoods: EM's log p(x) vs a VAE's ELBO as the anomaly score.

Data: a contaminated sample — points of ``noisy_circle`` (inliers) mixed with points uniform on the square
[−1.5, 1.5]² (outliers, 10 % by default). The model z ~ N(0, 1), x | z ~ N(g(z), σx²), g = [1, 16, 16, 2]
leaky-ReLU(0.1), is fitted without labels on the contaminated training sample

- by exact EM, scoring each point by its exact log p(x) (``log_evidence``), and
- as a VAE (``AmortizedNormal``, SVI for ``--vae-steps`` steps), scoring each point by its per-datum
  ELBO, computed exactly (``exact_elbo(model, guide, x).per_datum``); for reference also by the exact
  log p(x) of the VAE's own decoder.

A low score flags an anomaly; each score is summarised by its ROC AUC (``sklearn.metrics.roc_auc_score``)
on the training sample and on a fresh contaminated test sample. Figure: the test sample coloured by each
score, and the ROC curves.

    python examples/anomaly_detection.py --out anomaly_out          # full size (about 1 minute)
    python examples/anomaly_detection.py --quick --out /tmp/an      # seconds
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import base_parser, fit_em, fit_vae, make_decoder, plt, print_table, setup, write_json  # noqa: E402

from pyro_cpa.datasets import noisy_circle  # noqa: E402
from pyro_cpa.infer import exact_elbo  # noqa: E402


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--n", type=int, default=500, help="training points (inliers + outliers)")
    p.add_argument("--n-test", type=int, default=500, help="test points (inliers + outliers)")
    p.add_argument("--outlier-fraction", type=float, default=0.1)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--em-steps", type=int, default=150)
    p.add_argument("--vae-steps", type=int, default=6000, help="VAE steps (a step budget: the same table on any machine)")
    p.add_argument("--init-obs-scale", type=float, default=0.2,
                   help="initial σx of both fits (at 0.5 the VAE collapses to a Gaussian blob: NLL 2.2, AUC 0.6)")
    p.add_argument("--vae-lr", type=float, default=5e-3)
    p.add_argument("--match-time", action="store_true",
                   help="also train the VAE for at least EM's wall-clock (machine-dependent: the table then varies)")
    args = p.parse_args(argv)
    if args.quick:
        args.match_time = False   # deterministic step counts in the smoke test
        args.n, args.n_test, args.hidden, args.em_steps, args.vae_steps = 80, 80, 6, 3, 30
    return args


def contaminated(n, fraction, noise, seed):
    """(x, is_outlier): n points, round(fraction·n) of them uniform on [−1.5, 1.5]², shuffled."""
    n_out = int(round(fraction * n))
    g = torch.Generator().manual_seed(seed + 7)
    inliers = noisy_circle(n - n_out, noise, seed=seed)
    outliers = torch.rand(n_out, 2, generator=g) * 3.0 - 1.5
    x = torch.cat([inliers, outliers])
    label = torch.cat([torch.zeros(n - n_out), torch.ones(n_out)]).bool()
    perm = torch.randperm(n, generator=g)
    return x[perm], label[perm]


def auc(scores: torch.Tensor, is_outlier: torch.Tensor) -> float:
    """ROC AUC of −score as the anomaly score (low likelihood / ELBO = anomalous)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(is_outlier.numpy(), (-scores).numpy()))


def figure(x, label, scores, path):
    from sklearn.metrics import roc_curve

    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(16, 4.8))
    x_np, label_np = x.numpy(), label.numpy()
    for ax, (name, s) in zip(axes[:2], list(scores.items())[:2]):
        sc = ax.scatter(x_np[:, 0], x_np[:, 1], c=s.clamp(min=torch.quantile(s, 0.02)).numpy(), cmap="viridis", s=10)
        ax.scatter(x_np[label_np, 0], x_np[label_np, 1], facecolors="none", edgecolors="red", s=40, lw=0.8,
                   label="true outliers")
        fig.colorbar(sc, ax=ax, label="score (clipped at 2 % quantile)")
        ax.set(xlabel="x1", ylabel="x2", title=f"test sample, colour = {name.split(': ')[1]}\n({name.split(':')[0]})",
               aspect="equal")
        ax.legend(loc="upper right", fontsize=8)
    ax = axes[2]
    for (name, s), ls in zip(scores.items(), ("-", "--", ":")):
        fpr, tpr, _ = roc_curve(label.numpy(), (-s).numpy())
        ax.plot(fpr, tpr, ls=ls, lw=1.6, label=f"{name} (AUC {auc(s, label):.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC on the test sample")
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Anomaly detection on a contaminated circle: exact log p(x) (EM) vs ELBO (VAE)")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def main(args) -> dict:
    setup(args)
    x, label = contaminated(args.n, args.outlier_fraction, args.noise, args.seed)
    x_test, label_test = contaminated(args.n_test, args.outlier_fraction, args.noise, args.seed + 1000)
    init = make_decoder([1, args.hidden, args.hidden, 2], 0.1, seed=args.seed)
    em = fit_em(x, init, 1, args.em_steps, init_obs_scale=args.init_obs_scale, progress=not args.quick)
    vae = fit_vae(x, init, 1, args.vae_steps, lr=args.vae_lr, hidden=(32, 32),
                  min_seconds=em.seconds if args.match_time else 0.0,
                  init_obs_scale=args.init_obs_scale, progress=not args.quick)

    def scores(data):
        vae.activate()
        elbo = exact_elbo(vae.model, vae.guide, data).per_datum
        return {"EM: exact log p(x)": em.log_px(data), "VAE: exact per-datum ELBO": elbo,
                "VAE decoder: exact log p(x)": vae.log_px(data)}

    s_train, s_test = scores(x), scores(x_test)
    keys = {"EM: exact log p(x)": "em_log_px", "VAE: exact per-datum ELBO": "vae_elbo",
            "VAE decoder: exact log p(x)": "vae_log_px"}
    rows = [{"score": name, "key": keys[name], "auc_train": auc(s_train[name], label),
             "auc_test": auc(s_test[name], label_test), "mean_in": float(s_test[name][~label_test].mean()),
             "mean_out": float(s_test[name][label_test].mean())} for name in s_train]
    print_table(rows, [("score", "anomaly score (low = anomalous)", ""), ("auc_train", "AUC train", "{:.4f}"),
                       ("auc_test", "AUC test", "{:.4f}"), ("mean_in", "mean inlier", "{:.3f}"),
                       ("mean_out", "mean outlier", "{:.3f}")],
                title=f"contaminated circle: {args.n} training / {args.n_test} test points, "
                      f"{args.outlier_fraction:.0%} uniform outliers; EM {em.seconds:.1f}s, VAE {vae.seconds:.1f}s "
                      f"({vae.steps} steps)")
    result = {r["key"]: {k: r[k] for k in ("auc_train", "auc_test", "mean_in", "mean_out")} for r in rows}
    result.update({"em_nll": em.nll(x), "vae_nll": vae.nll(x), "n_outliers_test": int(label_test.sum())})
    print(f"exact NLL per point on the contaminated training sample: EM {result['em_nll']:.4f}, "
          f"VAE {result['vae_nll']:.4f}")
    if args.out:
        path = os.path.join(args.out, "anomaly_detection.png")
        figure(x_test, label_test, s_test, path)
        result["figures"] = [path]
        write_json(args, "anomaly_detection.json", result)
    return result


if __name__ == "__main__":
    main(parse_args())
