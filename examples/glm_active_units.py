"""Predicted vs measured active latent units of a Gaussian β-VAE (Section 4.2 of Sicks, Korn & Schwaar).

Data: scikit-learn's ``load_digits`` (1797 × 64), scaled to [0, 1]. Model: affine decoder
Linear(κ, 64) with Gaussian observations and a *learned* variance σ², affine Gaussian encoder
(mean and log-variance heads, diagonal covariance), κ = 20, He initialisation.

Prediction (no training): the closed-form MLE of L̂ (eqs. 15–18, σ̂² self-consistent) gives the
analytic activities A_zj = max(λ_j − βσ̂², 0)/λ_j (eq. 21); a unit is active if A_zj > 0.01.
Measurement (Burda et al.): after training, A_zj = Var_x(E_q[z_j]) over the data, same threshold.

    python examples/glm_active_units.py           # full run
    python examples/glm_active_units.py --quick   # seconds
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from pyro_cpa.glm import (ACTIVITY_THRESHOLD, BetaVAE, Gaussian, GaussianEncoder, GLMDecoder, he_init,
                          measured_activity, mle, train_svi)


def load_data() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().data, dtype=torch.float64) / 16.0


def run_beta(x, beta, args):
    kappa, d = args.kappa, x.shape[1]
    pred = mle(x, Gaussian(), kappa, beta, dispersion="mle")
    torch.manual_seed(args.seed)
    decoder = GLMDecoder(nn.Sequential(nn.Linear(kappa, d)), Gaussian(args.init_variance), learn_dispersion=True)
    encoder = GaussianEncoder(d, kappa)
    he_init(decoder.net, encoder)
    vae = BetaVAE(decoder, encoder)
    train_svi(vae, x, beta=beta, num_steps=args.steps, batch_size=args.batch_size or None, lr=args.lr,
              log_every=max(args.steps, 1), engine=args.engine)
    with torch.no_grad():
        loc, _ = encoder(x)
    act = measured_activity(loc)
    n_meas = int((act > ACTIVITY_THRESHOLD).sum())
    return {"beta": beta, "predicted": pred.n_active, "measured": n_meas,
            "sigma2_mle": float(pred.dispersion), "sigma2_trained": float(decoder.dispersion.detach()),
            "objective_mle": float(pred.objective),
            "elbo_trained": float(vae.elbo(x, beta=beta, num_samples=8)),
            "pred_activity": pred.activity, "meas_activity": act.sort(descending=True).values}


def main(args) -> list[dict]:
    torch.set_default_dtype(torch.float64)
    if args.threads:
        torch.set_num_threads(args.threads)
    x = load_data()
    if args.n:
        x = x[:args.n]
    rows = []
    print(f"load_digits N={x.shape[0]} d={x.shape[1]}, κ={args.kappa}, threshold A_zj > {ACTIVITY_THRESHOLD}")
    print(f"{'β':>5} {'predicted':>9} {'measured':>8} {'|diff|':>6} {'σ̂² MLE':>9} {'σ² trained':>10} "
          f"{'L̂ at MLE':>10} {'β-ELBO trained':>14} {'time':>6}")
    for beta in args.betas:
        t0 = time.time()
        r = run_beta(x, beta, args)
        rows.append(r)
        print(f"{beta:>5g} {r['predicted']:>9d} {r['measured']:>8d} {abs(r['predicted'] - r['measured']):>6d} "
              f"{r['sigma2_mle']:>9.5f} {r['sigma2_trained']:>10.5f} {r['objective_mle']:>10.3f} "
              f"{r['elbo_trained']:>14.3f} {time.time() - t0:>5.0f}s")
    ok = all(abs(r["predicted"] - r["measured"]) <= 2 for r in rows)
    print(f"all within ±2: {ok}")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kappa", type=int, default=20)
    p.add_argument("--betas", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=0, help="0: full batch")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--init-variance", type=float, default=0.1)
    p.add_argument("--engine", default="torch", choices=["torch", "svi"])
    p.add_argument("--n", type=int, default=0, help="use only the first n images (0: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.kappa, args.betas, args.steps, args.n = 5, [1.0, 4.0], 30, 200
    return args


if __name__ == "__main__":
    main(parse_args())
