"""Command line of the demo: ``python -m pyro_cpa demo [--quick] [--out DIR] [--seed N] [--json FILE]``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import pyro
import torch

from .circle import DemoConfig, format_table, run_circle_experiment


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pyro-cpa", description="pyro-cpa: exact inference for CPA generative models")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the circle experiment of the paper: EM vs exact MLE vs VAEs vs mixture guide")
    d.add_argument("--quick", action="store_true", help="tiny sizes (seconds; used by the smoke test)")
    d.add_argument("--out", default="pyro_cpa_demo", help="folder for the figures (default: ./pyro_cpa_demo)")
    d.add_argument("--seed", type=int, default=0, help="seed of the data and of the initial weights")
    d.add_argument("--json", default=None, help="also write every number of the table to this JSON file")
    d.add_argument("--em-steps", type=int, default=None, help="EM steps (default 100)")
    d.add_argument("--svi-steps", type=int, default=None,
                   help="minimum SVI steps per run (default 1500; each run also gets at least EM's wall-clock)")
    d.add_argument("--no-figures", action="store_true", help="skip the figures")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def config_from_args(args) -> DemoConfig:
    cfg = DemoConfig(seed=args.seed, progress=not args.no_progress)
    if args.quick:
        cfg.n, cfg.em_steps, cfg.mle_steps, cfg.svi_min_steps, cfg.eval_every = 60, 3, 10, 10, 5
        cfg.frozen_guide_steps = 10
        cfg.match_em_time = False
    if args.em_steps is not None:
        cfg.em_steps = args.em_steps
    if args.svi_steps is not None:
        cfg.svi_min_steps = cfg.mle_steps = args.svi_steps
    return cfg


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(args.seed)
    cfg = config_from_args(args)
    t0 = time.perf_counter()
    experiment = run_circle_experiment(cfg)
    results = experiment["results"]
    print()
    print(format_table(results))
    figures = []
    if not args.no_figures:
        from .figures import write_figures

        figures = write_figures(experiment, args.out)
        print(f"figures: {', '.join(figures)}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"config": dataclasses.asdict(cfg), "total_seconds": time.perf_counter() - t0,
                       "methods": [r.row() for r in results], "figures": figures}, fh, indent=1)
        print(f"numbers: {args.json}")
    return experiment


def console() -> int:
    """Entry point of the ``pyro-cpa`` console script (exit status 0 on success)."""
    main()
    return 0
