"""Digit 4 (Fig. 7 of Balestriero et al.): a 1-D latent model of 8×8 digit images, exact EM vs a VAE.

Data: the images of the digit 4 in scikit-learn's ``load_digits`` (181 images, 8×8, D = 64, scaled to
[0, 1]), split at random into training and held-out images. Model: z ~ N(0, 1) (S = 1),
x | z ~ N(g(z), σx² I) with a 3-layer leaky-ReLU(0.1) decoder g = [1, 16, 16, 64]. From the same initial
weights it is fitted by exact EM and by a VAE (``AmortizedNormal`` encoder, SVI for ``--vae-steps``
steps), and both are scored by the exact negative log-likelihood of training and held-out images.
Figure: generated images g(z) along the latent line, z at the quantiles 2.5 %, …, 97.5 % of the prior,
for each method, next to training images.

    python examples/digits.py --out digits_out           # full size (about 30 s)
    python examples/digits.py --quick --out /tmp/dg      # seconds
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (base_parser, fit_em, fit_vae, make_decoder, plt, print_table, setup, summary_rows,  # noqa: E402
                     write_json)



def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--digit", type=int, default=4)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--hidden", type=int, default=16, help="width of the decoder's two hidden layers")
    p.add_argument("--em-steps", type=int, default=60)
    p.add_argument("--vae-steps", type=int, default=3000, help="VAE steps (a step budget: the same table on any machine)")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--num-images", type=int, default=12, help="images along the latent line in the figure")
    p.add_argument("--limit", type=int, default=0, help="use only the first LIMIT images (0: all)")
    p.add_argument("--match-time", action="store_true",
                   help="also train the VAE for at least EM's wall-clock (machine-dependent: the table then varies)")
    args = p.parse_args(argv)
    if args.quick:
        args.match_time = False   # deterministic step counts in the smoke test
        args.limit, args.hidden, args.em_steps, args.vae_steps, args.num_images = 50, 6, 3, 30, 8
    return args


def load(digit: int, limit: int = 0) -> torch.Tensor:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.data[d.target == digit], dtype=torch.float64) / 16.0
    return x[:limit] if limit else x


def figure(x, fits, num, path):
    pyplot = plt()
    q = torch.linspace(0.025, 0.975, num)
    z = torch.distributions.Normal(0.0, 1.0).icdf(q).unsqueeze(-1)
    rows = [("training images", x[:num])]
    for f in fits:
        with torch.no_grad():
            rows.append((f"{f.name}\n(NLL test {f.test_nll:.1f})", f.decoder(z).clamp(0, 1)))
    fig, axes = pyplot.subplots(len(rows), num, figsize=(1.15 * num + 1.5, 1.35 * len(rows) + 0.6),
                                squeeze=False)
    for i, (label, imgs) in enumerate(rows):
        for j in range(num):
            ax = axes[i, j]
            if j < imgs.shape[0]:
                ax.imshow(imgs[j].reshape(8, 8).numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == len(rows) - 1 and i > 0:
                ax.set_xlabel(f"z={z[j, 0]:.2f}", fontsize=8)
        axes[i, 0].set_ylabel(label, fontsize=8)
    fig.suptitle("Digit 4: generated images g(z) along the 1-D latent line (z at prior quantiles 2.5 %…97.5 %)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def main(args) -> dict:
    setup(args)
    x_all = load(args.digit, args.limit)
    perm = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(args.seed))
    n_test = max(1, int(round(args.test_fraction * x_all.shape[0])))
    x, x_test = x_all[perm[n_test:]], x_all[perm[:n_test]]
    D = x.shape[1]
    init = make_decoder([1, args.hidden, args.hidden, D], 0.1, seed=args.seed)

    em = fit_em(x, init, 1, args.em_steps, progress=not args.quick)
    vae = fit_vae(x, init, 1, args.vae_steps, lr=args.vae_lr, hidden=(64, 64),
                  min_seconds=em.seconds if args.match_time else 0.0,
                  progress=not args.quick)
    rows = summary_rows((em, vae), x, x_test)
    print_table(rows, [("method", "method", ""), ("train_nll", "NLL train", "{:.3f}"),
                       ("test_nll", "NLL test", "{:.3f}"), ("elbo", "ELBO train", "{:.3f}"),
                       ("kl", "KL(q||p)", "{:.3f}"), ("obs_scale", "sigma_x", "{:.4f}"),
                       ("regions", "regions", "{:d}"), ("seconds", "seconds", "{:.1f}"), ("steps", "steps", "{:d}")],
                title=f"digit {args.digit}: {x.shape[0]} training / {x_test.shape[0]} held-out 8x8 images, "
                      f"decoder [1, {args.hidden}, {args.hidden}, {D}]; per-image nats, exact")
    result = {"em": rows[0], "vae": rows[1], "n_train": int(x.shape[0]), "n_test": int(x_test.shape[0]), "D": D}
    if args.out:
        path = os.path.join(args.out, "digits_latent_line.png")
        figure(x, (em, vae), args.num_images, path)
        result["figures"] = [path]
        write_json(args, "digits.json", result)
    return result


if __name__ == "__main__":
    main(parse_args())
