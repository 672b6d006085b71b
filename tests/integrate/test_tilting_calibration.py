"""Calibration of the S >= 4 minimax-tilting ``log_mass_stderr`` (issue 10, D8).

Polytopes whose exact mass is known but which are not boxes (boxes are integrated exactly by the
sequential proposal and say nothing about the error): products of random 2-D triangles / wedges (and a
1-D interval for S = 5), randomly rotated. Exact log P = sum of the factors' log masses, each from the
closed-form S = 2 / S = 1 integrators (checked against mpmath quadrature of Φ₂ to 1e-16 for such
wedges). The standardised errors z = (log P̂ − log P) / stderr must look like N(0, 1).
"""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from pyro_cpa.integrate.bivariate import std_moments_2d
from pyro_cpa.integrate.tilting import std_moments_tilting
from pyro_cpa.integrate.univariate import log_ndtr_diff

SD_RANGE = (0.7, 1.3)
"""Accepted sample sd of the standardised errors."""
MAX_ABS_Z = 5.0
"""No standardised error may exceed this."""


def _factor2(rng):
    ang = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2]) + rng.normal(size=3) * 0.3
    G = np.stack([np.cos(ang), np.sin(ang)], -1)
    shift = rng.normal(size=2) * [0.7, 2.5][rng.integers(2)]
    d = np.exp(rng.uniform(np.log(0.5), np.log(3))) + G @ shift
    if rng.integers(2):  # a wedge: the third row is padding
        G[2] = 0.0
        d[2] = np.inf
    return G, d


def _cases(S, n, seed):
    rng = np.random.default_rng(seed)
    parts = {4: [2, 2], 5: [2, 2, 1], 6: [2, 2, 2]}[S]
    Gs, ds, exact = [], [], []
    for _ in range(n):
        blocks = []
        for p in parts:
            if p == 2:
                blocks.append(_factor2(rng))
            else:
                c, w = rng.normal() * 2, np.exp(rng.uniform(np.log(0.3), np.log(3)))
                blocks.append((np.array([[1.0], [-1.0]]), np.array([c + w, w - c])))
        F = sum(len(b[1]) for b in blocks)
        G, d = np.zeros((F, S)), np.zeros(F)
        r = c0 = 0
        for Gb, db in blocks:
            G[r:r + len(db), c0:c0 + Gb.shape[1]] = Gb
            d[r:r + len(db)] = db
            r += len(db)
            c0 += Gb.shape[1]
        R = stats.ortho_group.rvs(S, random_state=int(rng.integers(1 << 30)))
        Gs.append(G @ R.T)
        ds.append(d)
        lp = 0.0
        for Gb, db in blocks:
            if Gb.shape[1] == 2:
                lp += std_moments_2d(torch.tensor(Gb), torch.tensor(db), need_moments=False).log_mass.item()
            else:
                lp += log_ndtr_diff(torch.tensor(-db[1]), torch.tensor(db[0])).item()
        exact.append(lp)
    G, d = torch.tensor(np.array(Gs)), torch.tensor(np.array(ds))
    return torch.where(torch.isinf(d).unsqueeze(-1), torch.zeros_like(G), G), d, torch.tensor(exact)


@pytest.mark.slow
def test_log_mass_stderr_is_calibrated():
    zs = []
    for S, n, seed in [(4, 60, 1), (5, 60, 2), (6, 60, 3), (4, 60, 4), (5, 30, 5)]:
        G, d, exact = _cases(S, n, seed)
        r = std_moments_tilting(G, d, generator=torch.Generator().manual_seed(seed))
        assert (r.log_mass_stderr > 0).all()
        zs.append((r.log_mass - exact) / r.log_mass_stderr)
    z = torch.cat(zs)
    assert len(z) >= 100 and torch.isfinite(z).all()
    assert SD_RANGE[0] <= z.std().item() <= SD_RANGE[1], z.std().item()
    assert z.abs().max().item() <= MAX_ABS_Z, z.abs().max().item()
    assert abs(z.mean().item()) <= 3 * math.sqrt(SD_RANGE[1] ** 2 / len(z)) + 0.1
