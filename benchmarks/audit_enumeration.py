"""Perturbation audit of region enumeration (issue 10), the larger run of tests/geometry/test_perturbation.py.

For each latent dimension S, many random networks (widths 2..--max-width, ReLU / LeakyReLU with
positive and negative slope / Abs, with duplicated units, zero rows, hyperplanes exactly through the
origin or a vertex) are checked for tiling (forward-pass patterns of grid and random points), unit
Gaussian mass (S <= 2), invariance under few-ulp nudges and under rotation of the first layer (see
tests/geometry/enumeration_audit.py). Optionally (--timing) times the enumeration of three reference
decoders, [2,32,32,32], [3,16,16] and [2,256,256,2] (time to refusal at the default budget).

Usage: python benchmarks/audit_enumeration.py [--count 200] [--dims 1 2 3] [--max-width 16] [--timing]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "geometry"))
from enumeration_audit import audit_network, random_case, random_network  # noqa: E402


def audit(args) -> list[dict]:
    rows = []
    for S in args.dims:
        rng = np.random.default_rng(args.seed + S)
        count = args.count if S <= 2 else max(1, args.count // 5)
        width = args.max_width if S <= 2 else min(args.max_width, 8)
        t0 = time.perf_counter()
        n_reg, unmatched, mass_err, failures = [], 0, 0.0, []
        for i in range(count):
            widths, act, degs = random_case(rng, S, max_width=width, max_layers=args.max_layers)
            dec, special = random_network(rng, S, widths, act, degs)
            try:
                res = audit_network(dec, special, rng, nudges=args.nudges, rotate=True)
            except AssertionError as e:
                failures.append(f"S={S} #{i} widths={widths} act={act} degeneracies={degs}: {e}")
                continue
            n_reg.append(res["regions"])
            unmatched += res["unmatched"]
            mass_err = max(mass_err, res.get("mass_err", 0.0))
        rows.append(dict(S=S, networks=count, failed=len(failures), regions_median=float(np.median(n_reg or [0])),
                         regions_max=max(n_reg or [0]), boundary_points=unmatched, max_mass_err=mass_err,
                         seconds=time.perf_counter() - t0, failures=failures))
    return rows


def timing() -> list[tuple[str, str, float]]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from run import random_net

    from pyro_cpa.errors import RegionBudgetExceeded
    from pyro_cpa.geometry import estimate_cost, linear_regions

    out = []
    for widths in ([2, 32, 32, 32], [3, 16, 16], [2, 256, 256, 2]):
        net = random_net(widths)
        t = time.perf_counter()
        est = estimate_cost(net, num_data=1000)
        t_est = time.perf_counter() - t
        t = time.perf_counter()
        try:
            what = f"{len(linear_regions(net, progress=False))} regions"
        except RegionBudgetExceeded as e:
            what = f"refused at {e.regions_found} (layer {e.layers_done})"
        out.append((str(widths), what, time.perf_counter() - t, est.regions, est.exact, t_est))
    return out


def main(args) -> int:
    torch.set_num_threads(args.threads)
    rows = audit(args)
    print(f"{'S':>2} {'networks':>8} {'failed':>6} {'regions med/max':>16} {'boundary pts':>12} "
          f"{'max |mass-1|':>12} {'seconds':>8}")
    for r in rows:
        print(f"{r['S']:>2} {r['networks']:>8} {r['failed']:>6} {r['regions_median']:>9.0f}/{r['regions_max']:<6} "
              f"{r['boundary_points']:>12} {r['max_mass_err']:>12.2e} {r['seconds']:>8.1f}")
    for r in rows:
        for f in r["failures"]:
            print("FAIL", f)
    if args.timing:
        print(f"\n{'decoder':<18} {'enumeration':<32} {'seconds':>8} {'estimate_cost':>22} {'est. s':>7}")
        for name, what, sec, est, exact, t_est in timing():
            print(f"{name:<18} {what:<32} {sec:>8.2f} {est:>13} {'(exact)' if exact else '(estimate)':>8} "
                  f"{t_est:>7.2f}")
    return int(any(r["failed"] for r in rows))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=200, help="networks per latent dimension (S >= 3: a fifth)")
    p.add_argument("--dims", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--max-width", type=int, default=16)
    p.add_argument("--max-layers", type=int, default=3)
    p.add_argument("--nudges", type=int, default=2, help="nudged copies per network")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timing", action="store_true", help="also time the three reference decoders")
    sys.exit(main(p.parse_args()))
