"""Enumeration under perturbation (issue 10) and thin cells (D7).

Independent references: a plain forward pass for the patterns, exact Gaussian masses for the
tiling (S <= 2), and scipy quadrature for the end-to-end log-density of a decoder with a thin cell.
See :mod:`enumeration_audit` for what is checked on each random network.
"""
import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.stats import norm
from torch import nn

from enumeration_audit import MULTI_ACTIVATIONS, audit_network, random_case, random_network
from pyro_cpa.distributions import CPAMarginal
from pyro_cpa.geometry import linear_regions


def thin_cell_decoder(S, w, shift=0.0):
    """g(z) = relu((z_1 - shift)/w) - relu((z_1 - shift)/w - 1): a ramp of width w (slope 1/w)."""
    lin = nn.Linear(S, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[:, 0] = 1.0 / w
        lin.bias.copy_(torch.tensor([-shift / w, -shift / w - 1.0]))
    out = nn.Linear(2, 1)
    with torch.no_grad():
        out.weight.copy_(torch.tensor([[1.0, -1.0]]))
        out.bias.zero_()
    return nn.Sequential(lin, nn.ReLU(), out)


def quad_log_prob(x, sx, w, shift):
    """log ∫ φ(z) N(x; g(z), sx²) dz: closed forms on the two flat pieces, scipy quadrature on the ramp
    (in its own coordinate u = (z - shift)/w ∈ [0, 1])."""
    a, b = shift, shift + w
    f_lo = norm.pdf(x, 0.0, sx) * norm.cdf(a)
    f_hi = norm.pdf(x, 1.0, sx) * norm.sf(b)
    f_mid = w * quad(lambda u: norm.pdf(a + w * u) * norm.pdf(x, u, sx), 0.0, 1.0, points=[x], epsabs=0,
                     epsrel=1e-12, limit=200)[0]
    return np.log(f_lo + f_mid + f_hi)


@pytest.mark.parametrize("S", [1, 2])
@pytest.mark.parametrize("w,shift", [(1e-9, 0.0), (1e-9, 0.3), (1e-12, -0.7)])
def test_thin_cell_kept_end_to_end(S, w, shift):
    """D7: a cell of width w carrying slope 1/w is a linear region like any other; log p matches quad.

    (Before: cells thinner than 1e-9 were merged; w = 1e-9, x = 0.5, σx = 0.01 gave −1246.31 vs −21.64.)
    """
    dec = thin_cell_decoder(S, w, shift)
    assert len(linear_regions(dec, progress=False)) == 3
    x, sx = 0.5, 0.01
    with torch.no_grad():
        lp = CPAMarginal(dec, sx).log_prob(torch.tensor([[x]]))
    assert float(lp) == pytest.approx(quad_log_prob(x, sx, w, shift), abs=1e-8)


def test_unresolvable_roots_merged_documented_scale():
    """Roots closer than their rounding scale (tol · cond) are one breakpoint; resolvable ones are kept."""
    for gap, expected in [(1e-15, 2), (1e-13, 3), (1e-10, 3)]:
        lin = nn.Linear(1, 2)
        with torch.no_grad():
            lin.weight.fill_(1.0)
            lin.bias.copy_(torch.tensor([0.5, 0.5 + gap]))
        dec = nn.Sequential(lin, nn.ReLU(), nn.Linear(2, 1))
        assert len(linear_regions(dec, progress=False)) == expected


@pytest.mark.parametrize("S,count,max_width", [(1, 40, 16), (2, 25, 12), (3, 6, 5)])
def test_enumeration_perturbation_audit(S, count, max_width):
    """Random small networks (widths 2–16, ReLU / LeakyReLU ±slope / Abs, with duplicated units, zero
    rows, hyperplanes through the origin or a vertex): tiling, unit mass (S <= 2), invariance under
    few-ulp nudges and (S >= 2) under rotation of the first layer."""
    rng = np.random.default_rng(100 + S)
    for i in range(count):
        widths, act, degs = random_case(rng, S, max_width=max_width)
        dec, special = random_network(rng, S, widths, act, degs)
        try:
            audit_network(dec, special, rng, nudges=1, rotate=True)
        except AssertionError as e:
            raise AssertionError(f"network {i}: S={S} widths={widths} act={act} degeneracies={degs}: {e}") from e


@pytest.mark.parametrize("S,count,max_width", [(1, 30, 12), (2, 18, 8), (3, 4, 4)])
def test_enumeration_audit_multi_state_units_and_max_pools(S, count, max_width):
    """Issue 14: the same audit for units with more than two states (Hardtanh(-0.5, 1), ReLU6, Clamp(-1,
    0.5), per-channel PReLU) and max pools (windows of 3 with padding, overlapping windows of 2, whose
    regions are bounded by ties of two entries), with the same degeneracies (duplicated units make
    exact ties inside a pooling window)."""
    rng = np.random.default_rng(200 + S)
    seen = set()
    for i in range(count):
        widths, act, degs = random_case(rng, S, max_width=max_width, activations=MULTI_ACTIVATIONS)
        seen.add(act)
        dec, special = random_network(rng, S, widths, act, degs)
        try:
            audit_network(dec, special, rng, nudges=1, rotate=True)
        except AssertionError as e:
            raise AssertionError(f"network {i}: S={S} widths={widths} act={act} degeneracies={degs}: {e}") from e
    assert len(seen) >= 3
