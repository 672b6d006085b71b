"""Local exact inference for decoders whose global partition is too large to enumerate.

Two decoders are trained a little as VAEs (plain torch, Adam, learned σx) so that their posteriors are
peaked: [2, 256, 256, 2] on ``noisy_circle`` and [2, 128, 128, 10] on scikit-learn's ``load_digits``
projected on its first 10 principal components (standardised); a small [2, 16, 16, 2] circle decoder, whose
global partition also runs, checks the agreement of the two. Then the exact log p(x) of the data is
computed with ``CPAMarginal(..., partition="local")`` in one call (the library blocks the (datum, region)
pairs itself and shares the region search between all data): per datum, only the regions meeting a
certified neighbourhood of the posterior mass are integrated, and ``log_prob_bound`` is the log of a
certified upper bound of the neglected fraction of p(x). Printed per decoder: N, seconds, points/s, the
largest and the median certified bound (nats), regions, pairs integrated, and the largest difference with
the global partition where it runs.

    python examples/local_exact.py --out local_out          # full size (1,000 points per decoder)
    python examples/local_exact.py --quick --out /tmp/lx    # seconds
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import base_parser, make_decoder, print_table, setup, write_json  # noqa: E402

from pyro_cpa.datasets import noisy_circle  # noqa: E402
from pyro_cpa.distributions import CPAMarginal  # noqa: E402


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--num-points", type=int, default=1000, help="data points whose log p is computed")
    p.add_argument("--steps", type=int, default=400, help="VAE training steps (Adam)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--tol", type=float, default=40.0, help="certified neglected log-fraction target")
    p.add_argument("--chunk", type=int, default=0, help="data per call of log_prob (0: all in one call)")
    p.add_argument("--eval-points", type=int, default=0, help="compute log p of the first EVAL_POINTS only (0: all)")
    args = p.parse_args(argv)
    # (data, decoder widths, σx held fixed in training or None to learn it): the circle's σx is its true
    # noise 0.05 (a VAE's learned σx collapses to ~0.3 there, and the posterior is then broad)
    # (data, decoder widths, σx or None, compare with the global partition)
    args.cases = [("circle", [2, 16, 16, 2], 0.05, True), ("circle", [2, 256, 256, 2], 0.05, False),
                  ("digits", [2, 128, 128, 10], None, False)]
    if args.quick:
        args.num_points, args.steps = 40, 150
        args.cases = [("circle", [2, 16, 16, 2], 0.05, True), ("digits", [2, 8, 8, 10], None, True)]
    return args


def load(name: str, n: int, seed: int) -> torch.Tensor:
    if name == "circle":
        return noisy_circle(n, noise=0.05, seed=seed)
    from sklearn.datasets import load_digits

    x = torch.as_tensor(load_digits().data, dtype=torch.float64)
    x = x - x.mean(0)
    _, _, V = torch.linalg.svd(x, full_matrices=False)
    y = x @ V[:10].T
    y = y / y.std(0)
    g = torch.Generator().manual_seed(seed)
    return y[torch.randperm(len(y), generator=g)[:n]]


def train_vae(x: torch.Tensor, widths, steps: int, lr: float, seed: int, obs_scale: float | None = None):
    """A Gaussian-encoder VAE (isotropic σx, learned unless ``obs_scale`` is given), a few hundred Adam steps
    on the full batch."""
    S, D = widths[0], widths[-1]
    decoder = make_decoder(widths, slope=0.1, seed=seed)
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(D, 64), nn.LeakyReLU(0.1), nn.Linear(64, 64), nn.LeakyReLU(0.1),
                            nn.Linear(64, 2 * S))
    log_sx = torch.tensor(math.log(0.5 if obs_scale is None else obs_scale), requires_grad=obs_scale is None)
    params = list(decoder.parameters()) + list(encoder.parameters()) + ([log_sx] if obs_scale is None else [])
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        out = encoder(x)
        mu, log_sd = out[:, :S], out[:, S:].clamp(-8, 3)
        z = mu + log_sd.exp() * torch.randn_like(mu)
        rec = torch.distributions.Normal(decoder(z), log_sx.exp()).log_prob(x).sum(-1)
        kl = 0.5 * (mu.square() + (2 * log_sd).exp() - 2 * log_sd - 1).sum(-1)
        loss = -(rec - kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return decoder.eval(), float(log_sx.detach().exp())


def run_case(name, widths, obs_scale, compare, args):
    x = load(name, args.num_points, args.seed)
    t0 = time.perf_counter()
    decoder, sx = train_vae(x, widths, args.steps, args.lr, args.seed, obs_scale)
    train_s = time.perf_counter() - t0
    x = x[:args.eval_points] if args.eval_points else x
    local = CPAMarginal(decoder, sx, partition="local", local_tol=args.tol)
    chunk = args.chunk or len(x)
    lps, bounds, pairs, integrated, regions = [], [], 0, 0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            lps.append(local.log_prob(x[i:i + chunk]))
            bounds.append(local.log_prob_bound)
            pairs += local.local_stats["pairs"]
            integrated += local.local_stats["pairs_integrated"]
            regions = max(regions, local.local_stats["regions"])
    seconds = time.perf_counter() - t0
    lp, bound = torch.cat(lps), torch.cat(bounds)
    row = {"data": name, "decoder": str(widths), "N": len(x), "obs_scale": sx, "train_s": train_s,
           "seconds": seconds, "points_per_s": len(x) / seconds, "mean_log_p": float(lp.mean()),
           "max_log_bound": float(bound.max()), "median_log_bound": float(bound.median()), "pairs": pairs,
           "pairs_integrated": integrated, "regions_found": regions, "log_bound": bound.tolist(),
           "threads": torch.get_num_threads(), "max_abs_diff_global": None}
    if compare:     # small decoder: the global partition runs too
        glob = CPAMarginal(decoder, sx)
        with torch.no_grad():
            row["max_abs_diff_global"] = float((glob.log_prob(x) - lp).abs().max())
            row["global_regions"] = len(glob.regions)
    return row


def main(args):
    setup(args)
    rows = [run_case(name, widths, sx, compare, args) for name, widths, sx, compare in args.cases]
    cols = [("data", "data", ""), ("decoder", "decoder", ""), ("N", "N", ""), ("obs_scale", "σx", "{:.3f}"),
            ("seconds", "seconds", "{:.1f}"), ("points_per_s", "points/s", "{:.1f}"),
            ("max_log_bound", "max bound", "{:.1f}"), ("median_log_bound", "median bound", "{:.1f}"),
            ("mean_log_p", "mean log p", "{:.4f}"), ("regions_found", "regions", ""),
            ("pairs_integrated", "pairs integrated", ""), ("max_abs_diff_global", "|local - global|", "{:.1e}")]
    print_table(rows, cols, title=f"Local exact log p, {torch.get_num_threads()} thread(s) "
                "(bound: log of the certified neglected fraction of p(x), nats)")
    result = {"cases": rows}
    write_json(args, "local_exact.json", result)
    return result


if __name__ == "__main__":
    main(parse_args())
