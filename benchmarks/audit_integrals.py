"""Audit of the exact S = 2 / S = 3 integrals (issue 10): the perturbation checks of
tests/integrate/test_perturbation_2d3d.py at a larger size, with a summary table.

Usage: python benchmarks/audit_integrals.py [--arrangements 2000] [--boxes 3000] [--boxes3d 40]
       [--mpmath 20] [--mle-steps 0] [--seed 0]

Checks (each against a value that is exact by construction or an independent reference):
  tiling      Σ_cells P = 1 over the cells of random line arrangements (all kinds of degeneracy)
  unbatched   one cell as (F, 2) vs the same cell in the batch
  nudge       every input moved by <= 4 ulps (log P; looser for nearly parallel lines and slivers)
  rotation    G -> G Qᵀ, Q random orthogonal (log P)
  box2d/3d    rotated boxes vs products of 1-D mpmath terms (log P)
  mpmath      random cells vs mpmath quadrature (log P, mean)
  mle         exact MLE (collapse + SVI, Adam 1e-2) on a [2, 16, 16, 2] decoder, noisy_circle(200): NaN-free
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import pathlib
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_checks():
    spec = importlib.util.spec_from_file_location("perturbation_checks",
                                                  ROOT / "tests" / "integrate" / "test_perturbation_2d3d.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _excess(err, tol):
    """(max error, number of failures) of |err| <= tol elementwise."""
    err, tol = torch.as_tensor(err, dtype=torch.float64), torch.as_tensor(tol, dtype=torch.float64)
    if err.numel() == 0:
        return 0.0, 0
    return float(err.max()), int((err > tol).sum())


def main(args) -> list[dict]:
    torch.set_default_dtype(torch.float64)
    T = _load_checks()
    from pyro_cpa.integrate.bivariate import log_mass_2d, std_moments_2d
    from pyro_cpa.integrate.trivariate import std_moments_3d

    rows = []

    def add(name, n, err, tol, fails, t0):
        rows.append(dict(check=name, cases=n, max_err=err, tol=tol, failures=fails, seconds=time.perf_counter() - t0))

    g = torch.Generator().manual_seed(args.seed)
    # ---- arrangements: tiling, unbatched, nudges, rotations
    t0 = time.perf_counter()
    acc = {k: [0, 0.0, 0] for k in ("tiling", "unbatched", "nudge", "rotation")}
    for kind, G, d in T.cases_2d(args.arrangements, seed=args.seed):
        r = std_moments_2d(G, d)
        near = r.log_mass > T.FAR_LOGP
        e = abs(r.log_mass[near].exp().sum().item() - 1.0)
        acc["tiling"] = [acc["tiling"][0] + len(d), max(acc["tiling"][1], e),
                         acc["tiling"][2] + int(e > T.TILING_ATOL * len(d))]
        i = int(torch.randint(0, len(d), (1,), generator=g))
        one = log_mass_2d(G[i], d[i])
        if torch.isfinite(r.log_mass[i]):
            e = abs(one.item() - r.log_mass[i].item()) / max(1.0, abs(r.log_mass[i].item()))
            acc["unbatched"] = [acc["unbatched"][0] + 1, max(acc["unbatched"][1], e),
                                acc["unbatched"][2] + int(e > T.BATCH_RTOL)]
        ill = kind in ("near_parallel", "sliver")
        for name, other, tol in [("nudge", log_mass_2d(T.nudge(G, g), T.nudge(d, g)),
                                  T.NUDGE_ATOL_NEAR_PAR if ill else T.NUDGE_ATOL),
                                 ("rotation", log_mass_2d(G @ T.random_rotation(g).T, d),
                                  T.NUDGE_ATOL_NEAR_PAR if ill else T.ROT_ATOL)]:
            a, b = r.log_mass, other
            both = (a > T.FAR_LOGP) & (b > T.FAR_LOGP)
            flips = int(((a > T.FAR_LOGP) != (b > T.FAR_LOGP)).sum())
            rel = (a[both] - b[both]).abs() / (1.0 + a[both].abs())
            err, fails = _excess(rel, tol)
            acc[name] = [acc[name][0] + len(d), max(acc[name][1], err), acc[name][2] + fails + flips]
    for name, tol in [("tiling", "%.0e·cells" % T.TILING_ATOL), ("unbatched", T.BATCH_RTOL),
                      ("nudge", f"{T.NUDGE_ATOL:.0e} ({T.NUDGE_ATOL_NEAR_PAR:.0e} ill-cond.)"),
                      ("rotation", f"{T.ROT_ATOL:.0e} ({T.NUDGE_ATOL_NEAR_PAR:.0e} ill-cond.)")]:
        add(name, acc[name][0], acc[name][1], tol, acc[name][2], t0)
    # ---- boxes
    t0 = time.perf_counter()
    boxes = T.random_boxes(args.boxes, g)
    F = max(b[0].shape[0] for b in boxes)
    G = torch.stack([torch.cat([b[0], torch.zeros(F - b[0].shape[0], 2)]) for b in boxes])
    d = torch.stack([torch.cat([b[1], torch.full((F - b[1].shape[0],), math.inf)]) for b in boxes])
    lp = torch.tensor([b[2] for b in boxes])
    cond = torch.tensor([16 * T.EPS * (1 + b[1].abs().max().item()) / b[5] for b in boxes])
    err = (log_mass_2d(G, d) - lp).abs()
    tol = 1e-12 + T.BOX_RTOL * lp.abs() + cond
    add("box2d", len(boxes), float((err / (1 + lp.abs())).max()), "1e-11 rel + eps·|d|/width", int((err > tol).sum()), t0)
    t0 = time.perf_counter()
    boxes = T.random_boxes(args.boxes3d, g, S=3)
    F = max(b[0].shape[0] for b in boxes)
    G = torch.stack([torch.cat([b[0], torch.zeros(F - b[0].shape[0], 3)]) for b in boxes])
    d = torch.stack([torch.cat([b[1], torch.full((F - b[1].shape[0],), math.inf)]) for b in boxes])
    lp = torch.tensor([b[2] for b in boxes])
    cond = torch.tensor([16 * T.EPS * (1 + b[1].abs().max().item()) / b[5] for b in boxes])
    err = (std_moments_3d(G, d, need_moments=False).log_mass - lp).abs()
    tol = 1e-10 + 1e-10 * lp.abs() + cond
    add("box3d", len(boxes), float((err / (1 + lp.abs())).max()), "1e-10 rel + eps·|d|/width", int((err > tol).sum()), t0)
    # ---- mpmath quadrature on random cells (finite mass, not far out)
    t0 = time.perf_counter()
    n = fails = 0
    worst = 0.0
    for kind, G, d in T.cases_2d(4 * args.mpmath, seed=args.seed + 1)[: args.mpmath * 4: 4]:
        lpv = log_mass_2d(G, d)
        ok = ((lpv > -200) & (lpv < -1e-3)).nonzero().squeeze(-1)
        if not ok.numel():
            continue
        i = int(ok[torch.randint(0, ok.numel(), (1,), generator=g)])
        keep = torch.isfinite(d[i])
        ref_lp, ref_m, _ = T.mp_polygon(G[i][keep], d[i][keep], dps=25, nsub=8)
        r = std_moments_2d(G[i], d[i])
        e = max(abs(r.log_mass.item() - ref_lp) / max(1.0, abs(ref_lp)),
                (r.mean - ref_m).abs().max().item() / max(1.0, ref_m.abs().max().item()))
        worst = max(worst, e)
        n += 1
        fails += int(e > (T.NUDGE_ATOL_NEAR_PAR if kind in ("near_parallel", "sliver") else 1e-9))
    add("mpmath", n, worst, "1e-9 (1e-6 ill-cond.)", fails, t0)
    # ---- exact MLE
    if args.mle_steps:
        t0 = time.perf_counter()
        nan_steps = T.exact_mle_nonfinite_steps(args.mle_steps)
        add("mle", args.mle_steps, float(nan_steps), "0 NaN steps", nan_steps, t0)
    print(f"{'check':10s} {'cases':>8s} {'max error':>11s} {'tolerance':>34s} {'failures':>8s} {'seconds':>8s}")
    for r in rows:
        print(f"{r['check']:10s} {r['cases']:8d} {r['max_err']:11.2e} {str(r['tol']):>34s} {r['failures']:8d} "
              f"{r['seconds']:8.1f}")
    return rows


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arrangements", type=int, default=2000, help="random line arrangements (~50 cells each)")
    p.add_argument("--boxes", type=int, default=3000, help="random rotated boxes, S = 2")
    p.add_argument("--boxes3d", type=int, default=40, help="random rotated boxes, S = 3")
    p.add_argument("--mpmath", type=int, default=20, help="random cells checked by mpmath quadrature")
    p.add_argument("--mle-steps", type=int, default=0, help="exact-MLE steps (200 reproduces the issue's run)")
    p.add_argument("--seed", type=int, default=0)
    return p


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(_parser().parse_args())
