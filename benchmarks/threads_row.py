"""Thread-count rows for the performance table: the same work at 1, 2 (and more) torch intra-op threads, one process.

Usage: python benchmarks/threads_row.py [--quick] [--threads 1 2 16] [--device cuda]

``threads_rows(...)`` returns rows in the format of ``benchmarks/run.py`` (group "threads"); ``print_threads(rows)``
prints them. Every case is timed at every thread count in the same process (wall clock, median of repetitions,
the thread counts interleaved), and the row's "vs baseline" column is t(1 thread) / t(k threads): above 1 means
faster with more threads. The thread setting is restored afterwards. The cases run without a default device
(``torch.set_default_device``), whose per-call overhead would tax every row alike. With a ``device`` other than the CPU, each case
also runs on CPU-built copies moved to that device (same decoders, same data), timed with the device synchronised,
in a row labelled by the device whose ratio is against the same 1-thread CPU reference.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import CPU, _polytope_batch, plain_default_device, random_net, sync  # noqa: E402  (benchmarks/run.py, same folder)


def _cases(quick: bool, device: torch.device = CPU):
    """[(name, n, unit, fn)]: S=2 pair integrals, S=2 E-step and log p, the circle E-step (S=1). Decoders and data
    are built on the CPU (the same numbers whatever the device), then moved to ``device``."""
    from pyro_cpa.datasets import noisy_circle
    from pyro_cpa.demo.circle import make_decoder
    from pyro_cpa.distributions import CPAMarginal
    from pyro_cpa.infer.estep import e_step
    from pyro_cpa.integrate import gaussian_polytope_moments

    n_pairs = 4000 if quick else 20000
    N = 200 if quick else 1000
    loc, L, H, c = _polytope_batch(2, n_pairs, device=device)
    with torch.device(CPU):
        net2 = random_net([2, 16, 16, 2])
        x2 = CPAMarginal(net2, 0.3).sample((N,))
        net_c = make_decoder(0)
        xc = noisy_circle(500)
    dist2 = CPAMarginal(copy.deepcopy(net2).to(device), 0.3)
    circle = CPAMarginal(copy.deepcopy(net_c).to(device), 0.5)
    x2, xc = x2.to(device), xc.to(device)
    R2 = len(dist2.regions)
    Rc = len(circle.regions)
    return [
        ("S=2 mass+moments", n_pairs, "pairs/s", lambda: gaussian_polytope_moments(loc, L, H, c)),
        (f"E-step [2,16,16,2] N={N}", N * R2, "pairs/s", lambda: e_step(dist2, x2)),
        (f"log p [2,16,16,2] N={N}", N, "points/s", lambda: dist2.log_prob(x2)),
        ("E-step circle N=500", 500 * Rc, "pairs/s", lambda: e_step(circle, xc)),
    ]


def threads_rows(threads=(1, 2), quick: bool = False, min_time: float = 0.3, max_reps: int = 30,
                 device: torch.device | str | None = None) -> list[dict]:
    """Rows (``benchmarks/run.py`` format) of every case at every thread count in ``threads`` (first = reference),
    plus, when ``device`` is not the CPU, one row per case on that device (at the reference thread count)."""
    device = CPU if device is None else torch.device(device)
    before = torch.get_num_threads()
    rows = []
    try:
        # library calls only: timed without a default-device mode (benchmarks/run.py: plain_default_device)
        with torch.no_grad(), plain_default_device():
            cases = _cases(quick)
            dev_cases = _cases(quick, device) if device.type != "cpu" else [None] * len(cases)
            for (name, n, unit, fn), dev_case in zip(cases, dev_cases):
                # settings: (label, threads, device, fn); the first is the reference
                settings = [(f"{k} thr", k, CPU, fn) for k in threads]
                if dev_case is not None:
                    settings.append((str(device), threads[0], device, dev_case[3]))
                times = {s[0]: [] for s in settings}
                for _, k, dev, f in settings:  # warm-up (partition enumeration, caches) at every setting
                    torch.set_num_threads(k)
                    f()
                    sync(dev)
                ref_times = times[settings[0][0]]
                start = time.perf_counter()
                while (time.perf_counter() - start < min_time * len(settings) or len(ref_times) < 3) \
                        and len(ref_times) < max_reps:
                    for label, k, dev, f in settings:
                        torch.set_num_threads(k)
                        sync(dev)
                        t0 = time.perf_counter()
                        f()
                        sync(dev)
                        times[label].append(time.perf_counter() - t0)
                ref = float(np.median(ref_times))
                for label, _, _, _ in settings:
                    t = float(np.median(times[label]))
                    rows.append(dict(group="threads", case=f"{name}, {label}", n=n, seconds=t, rate=n / t, unit=unit,
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
    p.add_argument("--device", default="cpu", help="also time each case on this device (e.g. cuda)")
    args = p.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    print(f"threads row: torch {torch.__version__}, {os.cpu_count()} logical cores, counts {args.threads}, "
          f"device {args.device}")
    rows = threads_rows(tuple(args.threads), quick=args.quick, device=args.device)
    print_threads(rows)
    return rows


if __name__ == "__main__":
    main()
