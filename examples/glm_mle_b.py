"""MLE-B vs He initialisation of a Bernoulli β-VAE (Appendix B of Sicks, Korn & Schwaar).

Synthetic data of Appendix B.2: N = 10000, d = 200, k = 2 principal components a1 ~ N(0, 0.09),
a2 ~ N(0, 0.25); loadings 1 on features 1–20 (component 1) and 21–40 (component 2); x ~ Bern(σ(A Bᵀ));
6700 / 3300 train / test split. Affine decoder (Linear(κ, d), sigmoid activation) and affine Gaussian
encoder (mean and log-variance heads), trained with Adam on SVI(TraceMeanField_ELBO), batch 100.

For each κ the script prints the train ELBO of both initialisations at every logged step (dense
logging during the first 10% of training), the closed-form lower bound L̂ at the MLE (eq. 14,
Corollary 1: L̂ <= ELBO), and the final test ELBOs.

    python examples/glm_mle_b.py            # full run (a few minutes on 2 cores)
    python examples/glm_mle_b.py --quick    # seconds
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from pyro_cpa.glm import (Bernoulli, BetaVAE, GaussianEncoder, GLMDecoder, approximate_objective, he_init,
                          mle_b_init, train_svi)


def make_data(n: int = 10000, d: int = 200, seed: int = 0) -> torch.Tensor:
    """Appendix B.2 synthetic Bernoulli data (float64)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([0.3, 0.5], dtype=torch.float64)
    B = torch.zeros(d, 2, dtype=torch.float64)
    B[:20, 0] = 1.0
    B[20:40, 1] = 1.0
    return torch.bernoulli(torch.sigmoid(A @ B.T), generator=g)


def build(kappa: int, d: int, init: str, x_train: torch.Tensor, seed: int, activation: str):
    torch.manual_seed(seed)
    decoder = GLMDecoder(nn.Sequential(nn.Linear(kappa, d)), Bernoulli(), activation=activation)
    encoder = GaussianEncoder(d, kappa)
    he_init(decoder.net, encoder)
    mle_res = None
    if init == "mle-b":
        mle_res = mle_b_init(encoder, decoder, x_train, beta=1.0)
    return BetaVAE(decoder, encoder), mle_res


def run_kappa(kappa, x_train, x_test, args):
    d = x_train.shape[1]
    curves = {}
    finals = {}
    bound = None
    first_10 = max(1, args.steps // 10)
    log_dense = max(1, first_10 // 10)
    for init in ("he", "mle-b"):
        vae, res = build(kappa, d, init, x_train, args.seed, args.activation)
        if res is not None:
            bound = float(approximate_objective(x_train, res.W, res.b, Bernoulli()))

        def cb(step, vae=vae):
            if step > first_10 and step % args.log_every != 0 and step != args.steps:
                return {}
            torch.manual_seed(1234)  # common random numbers for both initialisations
            return {"train_elbo": float(vae.elbo(x_train, num_samples=args.eval_samples))}

        hist = train_svi(vae, x_train, beta=1.0, num_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         log_every=log_dense, callback=cb)
        curves[init] = {h["step"]: h["train_elbo"] for h in hist if "train_elbo" in h}
        torch.manual_seed(4321)
        finals[init] = float(vae.elbo(x_test, num_samples=args.eval_samples))
    return curves, finals, bound, first_10


def main(args) -> dict:
    torch.set_default_dtype(torch.float64)
    if args.threads:
        torch.set_num_threads(args.threads)
    x = make_data(args.n, args.d, args.seed)
    n_train = int(round(0.67 * args.n))
    x_train, x_test = x[:n_train], x[n_train:]
    out = {}
    for kappa in args.kappas:
        t0 = time.time()
        curves, finals, bound, first_10 = run_kappa(kappa, x_train, x_test, args)
        steps = sorted(curves["he"])
        early = [s for s in steps if s <= first_10]
        ok_early = all(curves["mle-b"][s] >= curves["he"][s] for s in early)
        print(f"\nκ = {kappa}   (L̂ at the MLE, train: {bound:.3f};  {time.time() - t0:.0f} s)")
        print(f"{'step':>7} {'ELBO He':>11} {'ELBO MLE-B':>11} {'diff':>8}")
        for s in steps:
            mark = "*" if s <= first_10 else " "
            print(f"{s:>6}{mark} {curves['he'][s]:>11.3f} {curves['mle-b'][s]:>11.3f} "
                  f"{curves['mle-b'][s] - curves['he'][s]:>8.3f}")
        print(f"(* = first 10% of training) MLE-B >= He at every early point: {ok_early}")
        print(f"final train ELBO  He {curves['he'][steps[-1]]:.3f}   MLE-B {curves['mle-b'][steps[-1]]:.3f}")
        print(f"final test  ELBO  He {finals['he']:.3f}   MLE-B {finals['mle-b']:.3f}")
        out[kappa] = {"curves": curves, "test": finals, "bound": bound, "mle_b_above_early": ok_early}
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--d", type=int, default=200)
    p.add_argument("--kappas", type=int, nargs="+", default=[2, 5])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--log-every", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--activation", default="sigmoid", choices=["sigmoid", "tanh"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.kappas, args.steps, args.log_every, args.eval_samples = 300, 50, [2], 40, 20, 1
    return args


if __name__ == "__main__":
    main(parse_args())
