"""Missing-data imputation: exact conditional means of a CPA model vs a VAE's iterative imputation.

Data: a closed 1-D curve in R⁴, x = (cos t, sin t, cos 2t, sin 2t) + N(0, σ²) noise, t ~ U(0, 2π).
Model: z ~ N(0, 1), x | z ~ N(g(z), σx² I) with g = [1, 16, 16, 4] leaky-ReLU(0.1), fitted on complete
training data by exact EM and, from the same initial weights, as a VAE (``AmortizedNormal``, ``--vae-steps``
steps). In held-out data every entry is hidden independently with probability ``--missing``
(at least one entry of a row stays observed). Imputations of the hidden entries:

- EM model, exact: E[x_mis | x_obs] from ``CPAMarginal(decoder, σx).impute(x)`` (NaN = missing) — the
  exact conditional mean, a posterior mixture over all linear regions (multimodality included);
- VAE, iterative: fill with the training means, then repeat ``--vae-iters`` times: encode, decode the
  encoder's mean, overwrite the missing entries;
- VAE decoder, exact: the exact conditional mean under the VAE's own decoder (same model class, other
  parameters) — separates the quality of the model from that of the inference;
- column means of the training data (baseline).

Scored by the RMSE over the hidden entries (overall and by the number of hidden entries per row).

    python examples/imputation.py --out impute_out          # full size (about 1 minute)
    python examples/imputation.py --quick --out /tmp/imp    # seconds
"""
from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import base_parser, fit_em, fit_vae, make_decoder, plt, print_table, setup, write_json  # noqa: E402

from pyro_cpa.distributions import CPAMarginal  # noqa: E402


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--n", type=int, default=500, help="training points (complete)")
    p.add_argument("--n-test", type=int, default=500, help="held-out points (entries masked at random)")
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--missing", type=float, default=0.4, help="probability that an entry is hidden")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--em-steps", type=int, default=200)
    p.add_argument("--vae-steps", type=int, default=3000, help="VAE steps (a step budget: the same table on any machine)")
    p.add_argument("--vae-lr", type=float, default=5e-3)
    p.add_argument("--vae-iters", type=int, default=10, help="encode/decode rounds of the VAE imputation")
    p.add_argument("--match-time", action="store_true",
                   help="also train the VAE for at least EM's wall-clock (machine-dependent: the table then varies)")
    args = p.parse_args(argv)
    if args.quick:
        args.match_time = False   # deterministic step counts in the smoke test
        args.n, args.n_test, args.hidden, args.em_steps, args.vae_steps = 80, 80, 6, 3, 30
    return args


def curve_r4(n: int, noise: float, seed: int) -> torch.Tensor:
    """(cos t, sin t, cos 2t, sin 2t) + noise, t ~ U(0, 2π): a closed curve in R⁴."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 2 * math.pi
    x = torch.stack([t.cos(), t.sin(), (2 * t).cos(), (2 * t).sin()], -1)
    return x + noise * torch.randn(n, 4, generator=g)


def random_mask(n: int, D: int, p: float, seed: int) -> torch.Tensor:
    """(n, D) bool, True = hidden; each entry hidden with probability p, at least one entry of a row observed."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, D, generator=g) < p
    full = mask.all(-1)
    keep = torch.randint(D, (n,), generator=g)
    mask[full, keep[full]] = False
    return mask


def vae_impute(fit, x_nan, fill, iters):
    """Fill NaNs with ``fill``, then ``iters`` times: z = encoder mean, x_mis ← decoder(z)."""
    fit.activate()
    missing = torch.isnan(x_nan)
    x = torch.where(missing, fill.expand_as(x_nan), x_nan)
    with torch.no_grad():
        for _ in range(iters):
            z = fit.guide.encode(x).mean
            x = torch.where(missing, fit.decoder(z), x_nan)
    return x


def exact_impute(fit, x_nan):
    """Exact E[x | x_obs] under the fitted model (observed entries returned as given)."""
    with torch.no_grad():
        mean, _ = CPAMarginal(fit.decoder, fit.obs_scale).impute(x_nan)
    return mean


def figure(x_true, mask, imputations, path):
    pyplot = plt()
    names = list(imputations)
    fig, axes = pyplot.subplots(1, len(names), figsize=(4.2 * len(names), 4.9), squeeze=False)
    t, lim = x_true[mask], 1.35
    for ax, name in zip(axes[0], names):
        v = imputations[name][mask]
        rmse = float((v - t).square().mean().sqrt())
        ax.scatter(t.numpy(), v.numpy(), s=5, alpha=0.5, label="hidden entries")
        ax.plot([-lim, lim], [-lim, lim], "k:", lw=0.8, label="perfect imputation")
        ax.set(xlabel="true value", ylabel="imputed value", title=f"{name}\nRMSE {rmse:.3f}",
               xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Imputation of randomly hidden entries of a curve in R⁴ (held-out data)")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    pyplot.close(fig)


def main(args) -> dict:
    setup(args)
    x = curve_r4(args.n, args.noise, args.seed)
    x_test = curve_r4(args.n_test, args.noise, args.seed + 1000)
    D = x.shape[1]
    mask = random_mask(args.n_test, D, args.missing, args.seed + 2000)
    x_nan = x_test.masked_fill(mask, float("nan"))
    init = make_decoder([1, args.hidden, args.hidden, D], 0.1, seed=args.seed)
    em = fit_em(x, init, 1, args.em_steps, progress=not args.quick)
    vae = fit_vae(x, init, 1, args.vae_steps, lr=args.vae_lr, hidden=(32, 32),
                  min_seconds=em.seconds if args.match_time else 0.0,
                  progress=not args.quick)
    fill = x.mean(0)
    imputations = {
        "EM model: exact E[x_mis | x_obs]": exact_impute(em, x_nan),
        "VAE: iterative encode/decode": vae_impute(vae, x_nan, fill, args.vae_iters),
        "VAE decoder: exact E[x_mis | x_obs]": exact_impute(vae, x_nan),
        "training column means": torch.where(mask, fill.expand_as(x_nan), x_nan),
    }
    keys = ["em_exact", "vae_iterative", "vae_decoder_exact", "column_mean"]
    k_missing = mask.sum(-1)
    counts = sorted(int(k) for k in k_missing.unique() if k > 0)
    rows = []
    for (name, xhat), key in zip(imputations.items(), keys):
        err = (xhat - x_test).square()
        assert bool(torch.isfinite(xhat).all()), name
        row = {"method": name, "key": key, "rmse": float(err[mask].mean().sqrt())}
        for k in counts:
            sel = mask & (k_missing == k).unsqueeze(-1)
            row[f"rmse_{k}"] = float(err[sel].mean().sqrt())
        rows.append(row)
    print_table(rows, [("method", "imputation", ""), ("rmse", "RMSE all", "{:.4f}")] +
                [(f"rmse_{k}", f"{k} hidden/row", "{:.4f}") for k in counts],
                title=f"curve in R^4: {args.n} training points, {args.n_test} held-out with {int(mask.sum())} hidden "
                      f"entries (p={args.missing}); RMSE over hidden entries")
    print(f"exact NLL per point (held-out, complete data): EM {em.nll(x_test):.4f}, VAE {vae.nll(x_test):.4f}; "
          f"EM {em.seconds:.1f}s, VAE {vae.seconds:.1f}s ({vae.steps} steps)")
    result = {r["key"]: {k: v for k, v in r.items() if k not in ("method", "key")} for r in rows}
    result.update({"em_test_nll": em.nll(x_test), "vae_test_nll": vae.nll(x_test), "num_hidden": int(mask.sum())})
    if args.out:
        path = os.path.join(args.out, "imputation.png")
        figure(x_test, mask, imputations, path)
        result["figures"] = [path]
        write_json(args, "imputation.json", result)
    return result


if __name__ == "__main__":
    main(parse_args())
