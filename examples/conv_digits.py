"""A convolutional decoder on 8×8 digits with a 2-D latent space: exact EM vs a VAE, and the latent partition.

Data: scikit-learn's ``load_digits`` (8×8 images, D = 64, pixels scaled to [0, 1]); the classes in
``--digits``, split at random (seeded) into ``--train`` training and ``--test`` held-out images.
Model: z ~ N(0, I_2), x | z ~ N(g(z), σx² I_64) with the convolutional decoder

    g = Linear(2, 16) → Unflatten(4, 2, 2) → ConvTranspose2d(4, C, 2) → ReLU → ConvTranspose2d(C, 1, 4, 2)

(hidden feature map C × 3 × 3, output 1 × 8 × 8, flattened). Its C·9 ReLU units are lines in the latent
plane, so the partition is an arrangement of n = 9C lines; in general position it has 1 + n + C(n, 2)
linear regions (172 for C = 2), counted before fitting by ``pyro_cpa.geometry.estimate_cost``. Exact
inference costs N × regions (datum, region) pairs per evaluation, which sets the sizes here. From the
same initial weights the model is fitted by exact EM (``pyro_cpa.infer.EM`` + ``ExactPosterior``; a
convolutional decoder has no closed-form M-step, so EM uses its gradient M-step automatically, still
monotone) and by a VAE (``AmortizedNormal`` encoder, SVI with ``Trace_ELBO``), each for a fixed number of
steps; both are scored by the exact test log-likelihood per image (``pyro_cpa.infer.log_evidence`` on the
held-out images). Wall-clock is reported beside the steps; it is not the budget.

Figure (``--out``, needs matplotlib): for each fit, the latent plane coloured by linear region
(``pyro_cpa.linear_regions(decoder).locate`` on a grid) with the points of a grid marked, and the
decoded digits g(z) at those points.

    python examples/conv_digits.py --out conv_digits_out        # full size (a few minutes on 2 cores)
    python examples/conv_digits.py --quick --out /tmp/cdg       # seconds
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time

import pyro
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import base_parser, fit_em, fit_vae, plt, print_table, setup, summary_rows, write_json  # noqa: E402


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated classes to use")
    p.add_argument("--train", type=int, default=300, help="training images")
    p.add_argument("--test", type=int, default=100, help="held-out images")
    p.add_argument("--channels", type=int, default=2, help="channels C of the hidden 3x3 feature map")
    p.add_argument("--steps", type=int, default=60, help="EM steps")
    p.add_argument("--vae-steps", type=int, default=4000, help="VAE (SVI) steps, full batch")
    p.add_argument("--vae-lr", type=float, default=5e-3)
    p.add_argument("--grid", type=int, default=9, help="decoded digits per side of the figure's latent grid")
    p.add_argument("--resolution", type=int, default=400, help="pixels per side of the region map")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.test, args.channels, args.steps, args.vae_steps, args.grid = 40, 20, 1, 2, 30, 5
        args.resolution = 60
    return args


def load(digits: str, n_train: int, n_test: int, seed: int):
    """Training and held-out images (N, 64) in [0, 1] and their labels, a seeded random split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    classes = torch.tensor([int(c) for c in digits.split(",")])
    y = torch.as_tensor(d.target)
    keep = torch.isin(y, classes)
    x, y = torch.as_tensor(d.data, dtype=torch.float64)[keep] / 16.0, y[keep]
    if n_train + n_test > x.shape[0]:
        raise ValueError(f"--train {n_train} + --test {n_test} exceeds the {x.shape[0]} images of digits {digits}")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:n_train + n_test]
    return x[tr], y[tr], x[te], y[te]


def make_conv_decoder(channels: int, seed: int) -> nn.Sequential:
    """Linear(2, 16) → Unflatten(4, 2, 2) → ConvTranspose2d(4, C, 2) → ReLU → ConvTranspose2d(C, 1, 4, 2),
    flattened; float64, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 4 * 2 * 2), nn.Unflatten(1, (4, 2, 2)),
                         nn.ConvTranspose2d(4, channels, 2),                 # 4×2×2 → C×3×3
                         nn.ReLU(),
                         nn.ConvTranspose2d(channels, 1, 4, stride=2),       # C×3×3 → 1×8×8
                         nn.Flatten()).double()


def figure(fits, grid: int, resolution: int, path: str, half_width: float = 3.0) -> None:
    """Per fit: the latent square [-w, w]² coloured by linear region, and the decoded digits on a grid."""
    from pyro_cpa import linear_regions

    pyplot = plt()
    fig, axes = pyplot.subplots(len(fits), 2, figsize=(10, 5 * len(fits)), squeeze=False)
    t = torch.linspace(-half_width, half_width, resolution, dtype=torch.float64)
    zz = torch.stack(torch.meshgrid(t, t, indexing="xy"), -1)                 # (res, res, 2): rows = z2
    step = 2 * half_width / grid
    g = -half_width + step * (torch.arange(grid, dtype=torch.float64) + 0.5)   # tile centres of the mosaic
    zg = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1)                 # (grid, grid, 2)
    for row, f in enumerate(fits):
        regions = linear_regions(f.decoder, progress=False)
        idx = regions.locate(zz)
        colour = torch.randperm(len(regions), generator=torch.Generator().manual_seed(0))[idx] % 20
        ax = axes[row, 0]
        ax.imshow(colour.numpy(), origin="lower", extent=(-half_width, half_width, -half_width, half_width),
                  cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
        ax.scatter(zg[..., 0].reshape(-1).numpy(), zg[..., 1].reshape(-1).numpy(), s=6, c="k")
        ax.set_title(f"{f.name}: {len(regions)} linear regions\n(colours repeat; dots: the decoded z)", fontsize=10)
        ax.set_xlabel("z1")
        ax.set_ylabel("z2")
        with torch.no_grad():
            imgs = f.decoder(zg.reshape(-1, 2)).clamp(0, 1).reshape(grid, grid, 8, 8)
        mosaic = torch.ones(grid * 9 + 1, grid * 9 + 1)
        for i in range(grid):          # i: z2 index (bottom to top), j: z1 index
            for j in range(grid):
                r0 = (grid - 1 - i) * 9 + 1
                mosaic[r0:r0 + 8, j * 9 + 1:j * 9 + 9] = 1 - imgs[i, j]
        ax = axes[row, 1]
        ax.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=1, extent=(-half_width, half_width, -half_width,
                                                                       half_width))
        ax.set_title(f"{f.name}: g(z) at the dots\n(exact test log-lik {-f.test_nll:.2f} nats / image)", fontsize=10)
        ax.set_xlabel("z1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot.close(fig)


def main(args) -> dict:
    setup(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from pyro_cpa.geometry import estimate_cost

    x, _, x_test, _ = load(args.digits, args.train, args.test, args.seed)
    init = make_conv_decoder(args.channels, args.seed)
    cost = estimate_cost(init, x.shape[0])
    print(f"decoder {[type(m).__name__ for m in init]}, C = {args.channels}: {cost}")

    t0 = time.perf_counter()
    pyro.set_rng_seed(args.seed)      # each fit from the same RNG state: the VAE does not depend on --steps
    em = fit_em(x, init, 2, args.steps, progress=not args.quick)
    pyro.set_rng_seed(args.seed)
    vae = fit_vae(x, init, 2, args.vae_steps, lr=args.vae_lr, hidden=(64, 64), progress=not args.quick)
    rows = summary_rows((em, vae), x, x_test)
    for r in rows:
        r["test_ll"], r["train_ll"] = -r["test_nll"], -r["train_nll"]
    print_table(rows, [("method", "method", ""), ("steps", "steps", "{:d}"), ("seconds", "seconds", "{:.1f}"),
                       ("train_ll", "loglik train", "{:.3f}"), ("test_ll", "loglik test", "{:.3f}"),
                       ("elbo", "ELBO train", "{:.3f}"), ("obs_scale", "sigma_x", "{:.4f}"),
                       ("regions", "regions", "{:d}")],
                title=f"digits {args.digits}: {x.shape[0]} training / {x_test.shape[0]} held-out 8x8 images, "
                      f"conv decoder C={args.channels}, S=2; exact log-likelihood per image (nats); "
                      f"seconds = training wall-clock ({torch.get_num_threads()} threads)")
    result = {"em": rows[0], "vae": rows[1], "n_train": int(x.shape[0]), "n_test": int(x_test.shape[0]),
              "D": int(x.shape[1]), "regions_initial": cost.regions, "regions_exact": cost.exact,
              "pairs_per_step": cost.pairs, "em_nll_history": [h[2] for h in em.history],
              "threads": torch.get_num_threads(), "total_seconds": time.perf_counter() - t0}
    if args.out:
        if importlib.util.find_spec("matplotlib") is None:
            print("no figure: matplotlib is not installed (pip install matplotlib, or pip install 'pyro-cpa[plot]')")
        else:
            path = os.path.join(args.out, "conv_digits_latent.png")
            figure((em, vae), args.grid, args.resolution, path)
            result["figures"] = [path]
        write_json(args, "conv_digits.json", result)
    return result


if __name__ == "__main__":
    main(parse_args())
