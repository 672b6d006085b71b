"""Thread-count rows for the performance table: the same work at 1, 2 (and more) torch intra-op threads, one process.

Usage: python benchmarks/threads_row.py [--quick] [--threads 1 2 16]

``threads_rows(...)`` returns rows in the format of ``benchmarks/run.py`` (group "threads"); ``print_threads(rows)``
prints them. Every case is timed at every thread count in the same process (wall clock, median of repetitions,
the thread counts interleaved), and the row's "vs baseline" column is t(1 thread) / t(k threads): above 1 means
faster with more threads. The thread setting is restored afterwards.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import _polytope_batch, random_net  # noqa: E402  (benchmarks/run.py, same folder)


def _cases(quick: bool):
    """[(name, n, unit, fn)]: S=2 pair integrals, S=2 E-step and log p, the circle E-step (S=1)."""
    from pyro_cpa.datasets import noisy_circle
    from pyro_cpa.demo.circle import make_decoder
    from pyro_cpa.distributions import CPAMarginal
    from pyro_cpa.infer.estep import e_step
    from pyro_cpa.integrate import gaussian_polytope_moments

    n_pairs = 4000 if quick else 20000
    loc, L, H, c = _polytope_batch(2, n_pairs)
    N = 200 if quick else 1000
    dist2 = CPAMarginal(random_net([2, 16, 16, 2]), 0.3)
    x2 = dist2.sample((N,))
    R2 = len(dist2.regions)
    circle = CPAMarginal(make_decoder(0), 0.5)
    xc = noisy_circle(500)
    Rc = len(circle.regions)
    return [
        ("S=2 mass+moments", n_pairs, "pairs/s", lambda: gaussian_polytope_moments(loc, L, H, c)),
        (f"E-step [2,16,16,2] N={N}", N * R2, "pairs/s", lambda: e_step(dist2, x2)),
        (f"log p [2,16,16,2] N={N}", N, "points/s", lambda: dist2.log_prob(x2)),
        ("E-step circle N=500", 500 * Rc, "pairs/s", lambda: e_step(circle, xc)),
    ]


def threads_rows(threads=(1, 2), quick: bool = False, min_time: float = 0.3, max_reps: int = 30) -> list[dict]:
    """Rows (``benchmarks/run.py`` format) of every case at every thread count in ``threads`` (first = reference)."""
    before = torch.get_num_threads()
    rows = []
    try:
        with torch.no_grad():
            for name, n, unit, fn in _cases(quick):
                times = {k: [] for k in threads}
                for k in threads:  # warm-up (partition enumeration, caches) at every setting
                    torch.set_num_threads(k)
                    fn()
                start = time.perf_counter()
                while (time.perf_counter() - start < min_time * len(threads) or len(times[threads[0]]) < 3) \
                        and len(times[threads[0]]) < max_reps:
                    for k in threads:
                        torch.set_num_threads(k)
                        t0 = time.perf_counter()
                        fn()
                        times[k].append(time.perf_counter() - t0)
                ref = float(np.median(times[threads[0]]))
                for k in threads:
                    t = float(np.median(times[k]))
                    rows.append(dict(group="threads", case=f"{name}, {k} thr", n=n, seconds=t, rate=n / t, unit=unit,
                                     baseline=f"same, {threads[0]} thread(s)", speedup=ref / t))
    finally:
        torch.set_num_threads(before)
    return rows


def print_threads(rows) -> None:
    for r in rows:
        print(f"{r['group']:<12} {r['case']:<40} {r['n']:>8} {r['seconds']:>10.4f} {r['rate']:>12.4g} {r['unit']:<10} "
              f"{r['speedup']:>6.2f}x  vs {r['baseline']}")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (first = reference)")
    args = p.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    print(f"threads row: torch {torch.__version__}, {os.cpu_count()} logical cores, counts {args.threads}")
    rows = threads_rows(tuple(args.threads), quick=args.quick)
    print_threads(rows)
    return rows


if __name__ == "__main__":
    main()
