"""What a compiled kernel would buy the S = 2 edge integrals: a measurement for a design decision, not library code.

Issue 12 asked for exact log p of a random [2, 16, 16, 2] decoder (σx = 0.3, N = 1000: posteriors close to the
prior) to beat importance sampling. In torch the flux formula's edge integrals (``log_edge_flux``) are ~2/3 of
that log p. This script builds ``edge_flux_kernel.cpp`` — the same rules, tables and order of operations as one
C++ loop over the edges — with ``torch.utils.cpp_extension.load_inline`` and prints, in one process on one torch
thread, interleaved medians of: the edge integrals of that log p by torch and by the kernel, and the whole log p
with and without the kernel patched in; plus the largest differences (edge values and log p). Needs a C++
compiler and ``pip install ninja``; the first build takes ~20 s (cached in ``--build-dir`` afterwards).

    python benchmarks/edge_kernel_probe/probe.py [--reps 7] [--build-dir DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = ["-O3", "-ffp-contract=off"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions (medians are printed)")
    p.add_argument("--n", type=int, default=1000, help="data points of the log p")
    p.add_argument("--build-dir", default=os.path.join(HERE, "build"), help="where load_inline builds the kernel")
    return p.parse_args(argv)


def build(build_dir: str):
    """The compiled module and the build's seconds (a cached build loads in milliseconds)."""
    from torch.utils.cpp_extension import load_inline

    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(HERE, "edge_flux_kernel.cpp")) as fh:
        source = fh.read()
    t0 = time.perf_counter()
    mod = load_inline(name="pyro_cpa_edge_flux_probe", cpp_sources=[source], functions=["log_edge_flux_fused"],
                      build_directory=build_dir, extra_cflags=FLAGS, verbose=False)
    return mod, time.perf_counter() - t0


def kernel_log_edge_flux(mod):
    """A drop-in for ``edge_flux.log_edge_flux`` at its default options, through the compiled kernel."""
    import pyro_cpa.integrate.edge_flux as ef

    cache = {}

    def log_edge_flux(h, p, q, _count=None, **options):
        if options:
            raise ValueError(f"the probe's kernel runs log_edge_flux's defaults only, not {sorted(options)}")
        key = (h.dtype, str(h.device))
        if key not in cache:
            cuts = ef._gl_cuts(ef.DEFAULT_LAG_T2, ef.DEFAULT_LAG_MIN_DZ)
            gl_levels, sub_levels, lag_levels = (sorted(v) for v in (ef.DEFAULT_GL_LEVELS, ef.DEFAULT_SUB_LEVELS,
                                                                       ef.DEFAULT_LAG_LEVELS))
            tables = ef._need_tables(cuts, ef.DEFAULT_EDGE_FLUX_TOL, ef.DEFAULT_EDGE_SUB_R2, h.dtype, h.device)
            thr = ef._thresholds(cuts, ef.DEFAULT_EDGE_FLUX_TOL, gl_levels[0], h.dtype, h.device)
            empty = torch.empty(0, dtype=h.dtype)
            gx, gw, lx, lw = ([empty] * 41 for _ in range(4))
            for n in set(gl_levels) | set(sub_levels):
                gx[n], gw[n] = ef._rule("gl", n, h.dtype, h.device)
            for n in lag_levels:
                lx[n], lw[n] = ef._rule("lag", n, h.dtype, h.device)
            cache[key] = (*tables, thr, gx, gw, lx, lw, list(cuts), ef.DEFAULT_EDGE_FLUX_TOL, ef.DEFAULT_LAG_T2,
                          ef.DEFAULT_LAG_MIN_DZ, ef.DEFAULT_EDGE_Z_MAX, ef.DEFAULT_EDGE_SUB_R2, gl_levels, sub_levels,
                          lag_levels, list(ef.LAG_T2_GRID), list(ef.LAG_LOG_TOL))
        out, nodes = mod.log_edge_flux_fused(h, p, q, *cache[key])
        if _count is not None:
            _count["nodes"] = _count.get("nodes", 0) + int(nodes.sum())
            _count["edges"] = _count.get("edges", 0) + h.shape[0]
        return out
    return log_edge_flux


def main(args):
    import pyro_cpa.integrate.bivariate as bivariate
    from pyro_cpa.distributions import CPAMarginal

    sys.path.insert(0, os.path.dirname(HERE))
    from run import random_net

    if shutil.which("ninja") is None and shutil.which("ninja", path=os.path.dirname(sys.executable)) is None:
        sys.exit("probe: torch's load_inline needs ninja (pip install ninja) and a C++ compiler")
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    mod, t_build = build(args.build_dir)
    fused = kernel_log_edge_flux(mod)
    torch_edges = bivariate.log_edge_flux

    dist = CPAMarginal(random_net([2, 16, 16, 2]), 0.3)
    x = dist.sample((args.n,))
    dist.regions
    calls = []

    def capture(h, p, q, **kw):
        calls.append((h.clone(), p.clone(), q.clone()))
        return torch_edges(h, p, q, **kw)

    def log_p(edge_fn):
        bivariate.log_edge_flux = edge_fn
        try:
            with torch.no_grad():
                return dist.log_prob(x)
        finally:
            bivariate.log_edge_flux = torch_edges

    lp_torch = log_p(capture)
    lp_fused = log_p(fused)
    count_t, count_f = {}, {}
    vt = torch.cat([torch_edges(*c, _count=count_t) for c in calls])
    vf = torch.cat([fused(*c, _count=count_f) for c in calls])
    edges, nodes = count_t["edges"], count_t["nodes"]
    assert count_f["nodes"] == nodes, (count_f, count_t)   # the same rules: the same node evaluations
    timings = {"edges torch": [], "edges C++": [], "log p torch": [], "log p C++": []}
    work = {"edges torch": lambda: [torch_edges(*c) for c in calls], "edges C++": lambda: [fused(*c) for c in calls],
            "log p torch": lambda: log_p(torch_edges), "log p C++": lambda: log_p(fused)}
    for rep in range(args.reps):
        for name in (list(work) if rep % 2 == 0 else list(work)[::-1]):
            t0 = time.perf_counter()
            work[name]()
            timings[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in timings.items()}
    print(f"exact log p, random [2, 16, 16, 2], sigma_x = 0.3, N = {args.n}: {len(calls)} edge calls, "
          f"{edges} half-edges, {nodes} nodes ({nodes / edges:.2f} per half-edge); 1 torch thread, medians of "
          f"{args.reps} interleaved runs")
    print(f"kernel build {t_build:.1f} s ({'cached' if t_build < 2 else 'compiled'}), flags {' '.join(FLAGS)}")
    for name in ("edges torch", "edges C++"):
        print(f"  {name:12s} {med[name] * 1e3:8.1f} ms  {med[name] / edges * 1e9:6.1f} ns/half-edge  "
              f"{med[name] / nodes * 1e9:5.2f} ns/node")
    for name in ("log p torch", "log p C++"):
        print(f"  {name:12s} {med[name]:8.3f} s")
    print(f"  edge integrals {med['edges torch'] / med['edges C++']:.2f}x, "
          f"log p {med['log p torch'] / med['log p C++']:.2f}x; outside the edges "
          f"{med['log p C++'] - med['edges C++']:.3f} s")
    print(f"  max |Δ log I| {float((vt - vf).abs().max()):.1e}, bitwise equal {float((vt == vf).double().mean()):.3f}; "
          f"max |Δ log p| {float((lp_torch - lp_fused).abs().max()):.1e} nats")


if __name__ == "__main__":
    main(parse_args())
