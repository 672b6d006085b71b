"""Command line of the demo: ``python -m pyro_cpa demo [--quick] [--seed N] [--threads T] [--json FILE] ...``."""
from __future__ import annotations

import argparse
import importlib.util
import dataclasses
import json
import os
import time

import torch

from .circle import DemoConfig, format_table, headline, run_circle_experiment

PLOT_HINT = "figures skipped: matplotlib is not installed (pip install 'pyro-cpa[plot]' for the figures)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pyro-cpa", description="pyro-cpa: exact inference for CPA generative models")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the circle experiment of the paper: EM vs exact MLE vs VAEs vs mixture guide")
    c = DemoConfig()
    d.add_argument("--quick", action="store_true", help="tiny sizes (seconds; used by the smoke test)")
    d.add_argument("--out", default="pyro_cpa_demo", help="folder for the figures (default: ./pyro_cpa_demo)")
    d.add_argument("--seed", type=int, default=c.seed,
                   help="seed of the data, the initial weights and every method's random stream")
    d.add_argument("--threads", type=int, default=c.threads,
                   help=f"torch threads for the run (default {c.threads}; the table does not depend on the machine)")
    d.add_argument("--json", default=None, help="also write every number of the table to this JSON file")
    d.add_argument("--em-steps", type=int, default=None, help=f"EM steps (default {c.em_steps})")
    d.add_argument("--mle-steps", type=int, default=None, help=f"exact-MLE Adam steps (default {c.mle_steps})")
    d.add_argument("--svi-steps", type=int, default=None,
                   help=f"steps of each VAE and of the mixture-encoder SVI run (default {c.svi_steps})")
    d.add_argument("--guide-steps", type=int, default=None,
                   help=f"steps of each encoder trained on EM's fixed decoder (default {c.guide_steps})")
    d.add_argument("--no-figures", action="store_true", help="skip the figures")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def config_from_args(args) -> DemoConfig:
    cfg = DemoConfig(seed=args.seed, threads=args.threads, progress=not args.no_progress)
    if args.quick:
        cfg.n, cfg.em_steps, cfg.mle_steps, cfg.svi_steps, cfg.guide_steps, cfg.eval_every = 60, 3, 10, 10, 10, 5
    for name in ("em_steps", "mle_steps", "svi_steps", "guide_steps"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    for name in ("threads", "em_steps", "mle_steps", "svi_steps", "guide_steps"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"pyro-cpa demo: --{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    return cfg


def _have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_default_dtype(torch.float64)
    cfg = config_from_args(args)
    t0 = time.perf_counter()
    experiment = run_circle_experiment(cfg)
    results = experiment["results"]
    claims = headline(results)
    print()
    print(format_table(results))
    print(f"EM's exact NLL below every SVI-with-guide row: {'yes' if claims['em_below_variational'] else 'NO'}; "
          f"mixture KL below Gaussian KL on EM's decoder: {'yes' if claims['mixture_kl_below_gaussian'] else 'NO'}")
    figures = []
    if not args.no_figures:
        if _have_matplotlib():
            from .figures import write_figures

            figures = write_figures(experiment, args.out)
            print(f"figures: {', '.join(figures)}")
        else:
            print(PLOT_HINT)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"config": dataclasses.asdict(cfg), "total_seconds": time.perf_counter() - t0,
                       "headline": claims, "methods": [r.row() for r in results], "figures": figures}, fh, indent=1)
        print(f"numbers: {args.json}")
    return experiment


def console() -> int:
    """Entry point of the ``pyro-cpa`` console script (exit status 0 on success)."""
    main()
    return 0
