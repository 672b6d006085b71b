"""Perturbation audit of region enumeration (shared by tests/geometry/test_perturbation.py and
benchmarks/audit_enumeration.py).

A random small CPA network, optionally with degeneracies that make decisions hang on exact zeros
(duplicated units, zero rows, hyperplanes exactly through the origin, through a vertex of the
first layer's arrangement, or a second-layer bent hyperplane through such a vertex) or a thin but
resolvable strip (two parallel hyperplanes 1e-9 apart), is checked
against references that do not use the enumerator's own decisions:

* tiling: many points (grid + Gaussian + the constructed degenerate points) get their activation
  pattern from a plain forward pass; each must match exactly one enumerated pattern, or (points on
  a boundary or inside a merged sliver) lie within ``BOUNDARY_TOL`` of a region; no point may lie
  strictly inside two regions' facet H-representations;
* mass (S <= 2): the standard-normal masses of the regions sum to 1 within ``MASS_TOL``;
* invariance: nudging every weight by a few ulps (relative, p ← p (1 + k ε), |k| <= 3) gives the
  same number of regions, the same set of patterns and the same A, b within ``MAP_RTOL``;
* rotation (S >= 2): replacing the first layer's weights W₀ by W₀ Q for a random orthogonal Q gives
  the same number of regions.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pyro_cpa import Abs
from pyro_cpa.nn import Clamp
from pyro_cpa.geometry import linear_regions
from pyro_cpa.integrate import gaussian_polytope_moments

#: A point outside every region by at most this much (relative to 1 + |z|, per normalised facet)
#: counts as on a boundary; for the LP method (S >= 3) the band is cddlib's 1e-7 zero tolerance.
BOUNDARY_TOL = {1: 1e-11, 2: 1e-11, 3: 1e-6}
#: Sum of the standard-normal masses of all regions: |sum - 1| <= MASS_TOL (S <= 2, exact integrals).
MASS_TOL = 1e-12
#: Relative tolerance of the per-region maps A, b after a few-ulp nudge of the weights.
MAP_RTOL = 1e-8
ACTIVATIONS = ("relu", "leaky", "leakyneg", "abs")
#: Layers whose units have more than two states (two kinks, per-channel slopes) or whose pattern is an
#: argmax (max pools: overlapping windows of 3 with padding, and windows of 2).
MULTI_ACTIVATIONS = ("hardtanh", "relu6", "clamp", "prelu", "maxpool3", "maxpool2")
DEGENERACIES = ("duplicate", "zero_row", "origin", "vertex", "vertex2", "thin")
#: Width (relative to the weights) of the strip the "thin" degeneracy puts between two parallel
#: first-layer hyperplanes: resolvable in float64, so the enumeration must keep it.
THIN_GAP = 1e-9


def _act(name, rng=None, width=None):
    """The activation module(s) ``name`` after a Linear layer of ``width`` units, and the width after them."""
    if name == "prelu":
        m = nn.PReLU(width).double()
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(rng.uniform(-1.0, 1.0, width)))
        return [m], width
    if name.startswith("maxpool"):
        k = int(name[-1])
        pool = nn.MaxPool1d(3, stride=2, padding=1) if k == 3 else nn.MaxPool1d(2, stride=1)
        out = (width - 1) // 2 + 1 if k == 3 else width - 1
        return [nn.Unflatten(1, (1, width)), pool, nn.Flatten()], out
    make = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.2), "leakyneg": lambda: nn.LeakyReLU(-0.5),
            "abs": Abs, "hardtanh": lambda: nn.Hardtanh(-0.5, 1.0), "relu6": nn.ReLU6,
            "clamp": lambda: Clamp(-1.0, 0.5)}[name]
    return [make()], width


def _vertex(W: torch.Tensor, v: torch.Tensor, rows) -> torch.Tensor | None:
    """Common point of the first-layer hyperplanes ``rows`` (S of them); None if they have none
    (parallel, duplicated or zero rows: condition number above 1e8)."""
    if float(torch.linalg.cond(W[rows])) > 1e8:
        return None
    return torch.linalg.solve(W[rows], -v[rows])


def random_network(rng: np.random.Generator, S: int, widths, act: str, degeneracies=(), D: int = 2):
    """A float64 ``nn.Sequential`` S -> widths -> D with the requested degeneracies.

    Returns the network and a (k, S) tensor of points where the degeneracies meet (for sampling)."""
    layers = []
    a = S
    for b in widths:
        lin = nn.Linear(a, b).double()
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(rng.standard_normal((b, a))))
            lin.bias.copy_(torch.from_numpy(rng.standard_normal(b)))
        mods, a = _act(act, rng, b)
        layers += [lin] + mods
    out = nn.Linear(a, D).double()
    with torch.no_grad():
        out.weight.copy_(torch.from_numpy(rng.standard_normal((D, a))))
        out.bias.copy_(torch.from_numpy(rng.standard_normal(D)))
    layers.append(out)
    lins = [m for m in layers if isinstance(m, nn.Linear)][:-1]
    special = [torch.zeros(1, S, dtype=torch.float64)]
    W0, v0 = lins[0].weight.data, lins[0].bias.data
    n0 = W0.shape[0]
    with torch.no_grad():
        for kind in degeneracies:
            if kind == "duplicate":          # an exact copy (or exact ×2 / ×-1 copy) of another unit
                lin = lins[int(rng.integers(len(lins)))]
                n = lin.weight.shape[0]
                if n < 2:
                    continue
                i, k = rng.choice(n, 2, replace=False)
                f = float(rng.choice([1.0, 2.0, -1.0]))
                lin.weight[k] = f * lin.weight[i]
                lin.bias[k] = f * lin.bias[i]
            elif kind == "zero_row":
                lin = lins[int(rng.integers(len(lins)))]
                lin.weight[int(rng.integers(lin.weight.shape[0]))] = 0.0
            elif kind == "thin" and n0 >= 2:    # a strip THIN_GAP wide between two parallel hyperplanes
                i, k = rng.choice(n0, 2, replace=False)
                if float(W0[i].norm()) == 0.0:
                    continue
                W0[k] = W0[i]
                v0[k] = v0[i] + THIN_GAP * float(W0[i].norm()) * (1.0 + abs(float(v0[i])))
                z = -(v0[i] + v0[k]) / 2 * W0[i] / W0[i].norm() ** 2          # the middle of the strip
                special.append(z[None])
            elif kind == "origin":           # a first-layer hyperplane exactly through the origin
                v0[int(rng.integers(n0))] = 0.0
            elif kind == "vertex" and n0 > S:   # a first-layer hyperplane through a vertex of S others
                rows = rng.choice(n0, S + 1, replace=False)
                z = _vertex(W0, v0, rows[:S])
                if z is None:
                    continue
                v0[rows[S]] = -(W0[rows[S]] @ z)
                special.append(z[None])
            elif kind == "vertex2" and len(lins) > 1 and n0 >= S:   # a layer-2 unit through a vertex
                rows = rng.choice(n0, S, replace=False)
                z = _vertex(W0, v0, rows)
                if z is None:
                    continue
                net = nn.Sequential(*layers[:next(i for i, m in enumerate(layers) if m is lins[1])])
                h = net(z[None])[0]
                lin = lins[1]
                k = int(rng.integers(lin.weight.shape[0]))
                lin.bias[k] = -(lin.weight[k] @ h)
                special.append(z[None])
    return nn.Sequential(*layers), torch.cat(special)


def nudged(dec: nn.Module, rng: np.random.Generator, ulps: int = 3) -> nn.Module:
    """A copy with every parameter multiplied by (1 + k ε), k uniform in [-ulps, ulps]."""
    import copy

    new = copy.deepcopy(dec)
    eps = np.finfo(np.float64).eps
    with torch.no_grad():
        for p in new.parameters():
            k = torch.from_numpy(rng.integers(-ulps, ulps + 1, size=tuple(p.shape)).astype(np.float64))
            p.mul_(1.0 + k * eps)
    return new


def rotated(dec: nn.Module, rng: np.random.Generator) -> nn.Module:
    """A copy whose first Linear's weights are W₀ Q for a random orthogonal Q."""
    import copy

    new = copy.deepcopy(dec)
    first = next(m for m in new.modules() if isinstance(m, nn.Linear))
    S = first.weight.shape[1]
    Q, _ = np.linalg.qr(rng.standard_normal((S, S)))
    with torch.no_grad():
        first.weight.copy_(first.weight @ torch.from_numpy(Q))
    return new


def _codes(regions, z):
    return torch.cat(regions.network.activation_pattern(z), -1)


def sample_points(regions, special: torch.Tensor, rng: np.random.Generator, n_random: int = 2000,
                  n_grid: int | None = None) -> torch.Tensor:
    S = regions.latent_dim
    n_grid = n_grid or {1: 2001, 2: 61, 3: 13}[S]
    x = regions.interior_points
    lim = float(x.abs().max()) + 1.0 if len(x) else 3.0
    axes = [torch.linspace(-lim, lim, n_grid, dtype=torch.float64)] * S
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, S)
    rand = torch.from_numpy(rng.standard_normal((n_random, S))) * float(rng.choice([1.0, 3.0, 10.0]))
    near = special.repeat(8, 1) + 1e-6 * torch.from_numpy(rng.standard_normal((8 * len(special), S)))
    near_thin = special.repeat(8, 1) + 1e-12 * torch.from_numpy(rng.standard_normal((8 * len(special), S)))
    return torch.cat([grid, rand, special, near, near_thin, x])


def check_tiling(regions, z: torch.Tensor) -> dict:
    """Every point in exactly one region up to boundary tolerance (see the module docstring)."""
    S = regions.latent_dim
    btol = BOUNDARY_TOL[min(S, 3)]
    codes = regions._codes
    U = codes.shape[1]
    if U == 0:
        return dict(points=len(z), unmatched=0)
    q = _codes(regions, z)
    score = (2.0 * q.double() - 1.0) @ (2.0 * codes.double() - 1.0).T       # = U iff equal
    nmatch = (score == U).sum(-1)
    assert int(nmatch.max()) <= 1, "two enumerated regions have the same pattern"
    H, c = (t.detach() for t in regions.polytopes(torch.float64))
    if H.shape[1] == 0:          # no form changes sign anywhere: one region, the whole space
        assert len(regions) == 1 and bool((q == codes[0]).all()), "one region without facets, other patterns"
        return dict(points=len(z), unmatched=0)
    nrm = H.norm(dim=-1).clamp(min=1e-300)
    slack = (c[None] - torch.einsum("rfs,ns->nrf", H, z)) / nrm[None]         # (N, R, F), +inf on padding
    scale = 1.0 + z.abs().max(-1).values[:, None]
    worst = slack.min(-1).values / scale                                        # (N, R)
    strict = (worst > btol).sum(-1)
    assert int(strict.max()) <= 1, f"a point lies strictly inside {int(strict.max())} regions (overlap)"
    # points strictly inside a region have that region's pattern
    inside = worst > btol
    has = inside.any(-1)
    r_in = inside.float().argmax(-1)
    ok = (q[has] == codes[r_in[has]]).all(-1)
    assert bool(ok.all()), f"{int((~ok).sum())} points strictly inside a region have another pattern"
    # every point is in some region up to the boundary tolerance
    unmatched = nmatch == 0
    covered = worst.max(-1).values >= -btol
    assert bool(covered.all()), f"{int((~covered).sum())} points lie in no region (a hole in the tiling)"
    return dict(points=len(z), unmatched=int(unmatched.sum()))


def total_mass(regions) -> float:
    """Sum over regions of the N(0, I) mass (exact integrators for S <= 2)."""
    S = regions.latent_dim
    H, c = (t.detach() for t in regions.polytopes(torch.float64))
    R = len(regions)
    if H.shape[1] == 0:
        return 1.0
    mom = gaussian_polytope_moments(torch.zeros(R, S, dtype=torch.float64),
                                    torch.eye(S, dtype=torch.float64).expand(R, S, S), H, c)
    return float(mom.log_mass.logsumexp(0).exp())


def _by_pattern(regions):
    A, b = (t.detach() for t in regions.affine(torch.float64))
    return {tuple(k.tolist()): (A[i], b[i]) for i, k in enumerate(regions._codes)}


def check_invariance(r0, r1) -> None:
    assert len(r0) == len(r1), f"{len(r0)} regions before the nudge, {len(r1)} after"
    m0, m1 = _by_pattern(r0), _by_pattern(r1)
    assert m0.keys() == m1.keys(), "the set of activation patterns changed under a few-ulp nudge"
    for k, (A, b) in m0.items():
        A1, b1 = m1[k]
        sa = float(A.abs().max()) + 1.0
        torch.testing.assert_close(A1, A, rtol=MAP_RTOL, atol=MAP_RTOL * sa)
        torch.testing.assert_close(b1, b, rtol=MAP_RTOL, atol=MAP_RTOL * (float(b.abs().max()) + sa))


def audit_network(dec, special, rng, *, nudges: int = 2, rotate: bool = True) -> dict:
    """All checks of the module docstring on one network; returns a summary (raises AssertionError)."""
    regions = linear_regions(dec, progress=False)
    S = regions.latent_dim
    out = dict(S=S, regions=len(regions))
    out.update(check_tiling(regions, sample_points(regions, special, rng)))
    if S <= 2:
        m = total_mass(regions)
        assert abs(m - 1.0) <= MASS_TOL, f"region masses sum to {m!r}"
        out["mass_err"] = abs(m - 1.0)
    for _ in range(nudges):
        check_invariance(regions, linear_regions(nudged(dec, rng), progress=False))
    if rotate and S >= 2:
        rr = linear_regions(rotated(dec, rng), progress=False)
        assert len(rr) == len(regions), f"{len(regions)} regions, {len(rr)} after an orthogonal rotation"
    return out


def random_case(rng: np.random.Generator, S: int, max_width: int = 16, max_layers: int = 2,
                activations=ACTIVATIONS):
    """Random architecture, activation (one of ``activations``) and degeneracies."""
    L = int(rng.integers(1, max_layers + 1))
    widths = [int(rng.integers(2, max_width + 1)) for _ in range(L)]
    act = str(rng.choice(activations))
    k = int(rng.integers(0, 4))
    degs = tuple(str(d) for d in rng.choice(DEGENERACIES, size=k, replace=True))
    return widths, act, degs
