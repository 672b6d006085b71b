"""Local exact inference (pyro_cpa.geometry.local): against the global partition, quadrature and grids,
and the certificate against the mass it really leaves out."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from pyro_cpa.distributions import CPAMarginal
from pyro_cpa.errors import PyroCPAError
from pyro_cpa.geometry.local import certify_boxes, local_log_prob, output_bounds
from pyro_cpa.nn import mlp
from pyro_cpa.nn.network import as_cpa_network

#: Agreement of exact log p between the local and the global partitions (both exact to rounding).
EXACT_ATOL = 1e-10


def _decoder(widths, seed=0, slope=0.1):
    return mlp(widths, lambda: nn.LeakyReLU(slope), seed=seed).eval()


def _data(dec, n, S, sx, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = torch.randn(n, S, generator=g, dtype=torch.float64)
        return dec(z) + sx * torch.randn(n, dec[-1].out_features, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("widths,sx", [([1, 32, 32, 2], 0.05), ([2, 16, 16, 2], 0.1), ([2, 8, 8, 3], 0.03)])
def test_matches_global_partition(widths, sx):
    dec = _decoder(widths)
    x = _data(dec, 12, widths[0], sx)
    with torch.no_grad():
        res = local_log_prob(dec, x, sx ** 2, 1.0)
        ref = CPAMarginal(dec, sx).log_prob(x)
    assert torch.allclose(res.log_prob, ref, rtol=0, atol=EXACT_ATOL)
    assert bool((res.log_bound <= -40.0).all())
    assert res.pairs < 12 * len(CPAMarginal(dec, sx).regions)      # the partition is local


@pytest.mark.parametrize("widths,sx,tol", [([1, 16, 16, 2], 0.2, 2.0), ([2, 8, 8, 2], 0.3, 3.0)])
def test_certificate_bounds_the_neglected_mass(widths, sx, tol):
    """With a lax tolerance real mass is left out: neglected / p_local = expm1(log p − log p_local)
    (log p from the global partition) must not exceed exp(log_bound)."""
    dec = _decoder(widths, seed=3)
    x = _data(dec, 20, widths[0], sx, seed=4)
    with torch.no_grad():
        res = local_log_prob(dec, x, sx ** 2, 1.0, tol, margin=0.0, prune_tol=tol)
        ref = CPAMarginal(dec, sx).log_prob(x)
    neglected = torch.expm1(ref - res.log_prob)
    assert bool((neglected >= -1e-13).all())
    assert bool((neglected <= res.log_bound.exp() * (1 + 1e-9) + 1e-13).all())
    assert bool((res.log_bound > -tol - 30).any())    # the lax tolerance is actually used


def test_s1_against_scipy_quad():
    from scipy.integrate import quad

    dec = _decoder([1, 8, 8, 2], seed=5)
    sx = 0.1
    x = _data(dec, 4, 1, sx, seed=6)
    with torch.no_grad():
        res = local_log_prob(dec, x, sx ** 2, 1.0)

    def joint(z, xi):
        with torch.no_grad():
            g = dec(torch.tensor([[z]], dtype=torch.float64))[0].numpy()
        return math.exp(-0.5 * z * z - 0.5 * float(((xi - g) ** 2).sum()) / sx ** 2) / (
            math.sqrt(2 * math.pi) * 2 * math.pi * sx ** 2)

    zs = np.linspace(-9, 9, 91)          # short pieces: few kinks in each, adaptive quadrature copes
    for i, xi in enumerate(x.numpy()):
        val = sum(quad(joint, a, b, args=(xi,), epsabs=0, epsrel=1e-10, limit=200)[0] for a, b in zip(zs, zs[1:]))
        assert math.log(val) == pytest.approx(float(res.log_prob[i]), abs=1e-9)


def test_s2_against_fine_grid():
    dec = _decoder([2, 6, 6, 2], seed=7)
    sx = 0.3
    x = _data(dec, 3, 2, sx, seed=8)
    with torch.no_grad():
        res = local_log_prob(dec, x, sx ** 2, 1.0)
        h = 0.02
        t = torch.arange(-7.0, 7.0 + h / 2, h, dtype=torch.float64)
        Z = torch.cartesian_prod(t, t)
        g = dec(Z)
        log_prior = -0.5 * Z.square().sum(-1) - math.log(2 * math.pi)
        for i in range(len(x)):
            ll = -0.5 * ((x[i] - g).square().sum(-1)) / sx ** 2 - math.log(2 * math.pi * sx ** 2)
            grid = torch.logsumexp(ll + log_prior, 0) + 2 * math.log(h)
            # Riemann sum of a piecewise-smooth, rapidly decaying integrand: error O(h²) at the kinks (5e-8 here)
            assert float(grid) == pytest.approx(float(res.log_prob[i]), abs=1e-6)


def test_output_bounds_enclose_the_decoder():
    dec = _decoder([2, 12, 12, 3], seed=9, slope=0.2)
    net = as_cpa_network(dec)
    maps = [(W.detach(), v.detach()) for W, v in net.affine_maps()]
    g = torch.Generator().manual_seed(0)
    centre = 3 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    half = torch.rand(64, 2, generator=g, dtype=torch.float64) * 0.8 + 1e-3
    lo, hi, _ = output_bounds(maps, net.negative_slopes, centre, half)
    u = torch.rand(500, 64, 2, generator=g, dtype=torch.float64) * 2 - 1
    u[:4] = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]).unsqueeze(1)   # corners
    with torch.no_grad():
        y = dec(centre + half * u)
    rnd = 1e-12 * (1 + y.abs())
    assert bool((y >= lo - rnd).all()) and bool((y <= hi + rnd).all())
    # a box inside one linear region is enclosed exactly: its enclosure is the image's bounding box
    tiny = torch.full_like(half, 1e-9)
    lo, hi, lin = output_bounds(maps, net.negative_slopes, centre, tiny)
    J = torch.func.vmap(torch.func.jacrev(lambda z: dec(z[None])[0]))(centre)
    assert torch.allclose(lin, J, atol=1e-12)


def test_certificate_refuses_what_it_cannot_do():
    dec3 = _decoder([3, 4, 2])
    with pytest.raises(PyroCPAError, match="S <= 2"):
        local_log_prob(dec3, torch.zeros(2, 2), 0.1, 1.0)
    dec = _decoder([2, 4, 2])
    with pytest.raises(PyroCPAError, match="missing"):
        local_log_prob(dec, torch.tensor([[0.0, float("nan")]]), 0.1, 1.0)


def test_result_per_datum_does_not_depend_on_the_batch():
    dec = _decoder([2, 10, 10, 2], seed=11)
    sx = 0.1
    x = _data(dec, 6, 2, sx, seed=12)
    with torch.no_grad():
        together = local_log_prob(dec, x, sx ** 2, 1.0)
        alone = torch.cat([local_log_prob(dec, x[i:i + 1], sx ** 2, 1.0).log_prob for i in range(len(x))])
    assert torch.allclose(together.log_prob, alone, rtol=0, atol=1e-13)


def test_certify_boxes_lower_bound_is_a_lower_bound():
    dec = _decoder([2, 8, 8, 2], seed=13)
    sx = 0.2
    x = _data(dec, 8, 2, sx, seed=14)
    with torch.no_grad():
        cert = certify_boxes(as_cpa_network(dec), x, torch.tensor(sx ** 2), torch.tensor(1.0))
        ref = CPAMarginal(dec, sx).log_prob(x)
    assert bool((cert.log_p_low <= ref).all())
    assert bool((cert.log_neglected <= ref - 40).all())


def test_gradient_matches_global():
    dec = _decoder([2, 6, 6, 2], seed=15)
    sx = 0.2
    x = _data(dec, 5, 2, sx, seed=16)
    res = local_log_prob(dec, x, sx ** 2, 1.0)
    g_local = torch.autograd.grad(res.log_prob.sum(), list(dec.parameters()))
    g_glob = torch.autograd.grad(CPAMarginal(dec, sx).log_prob(x).sum(), list(dec.parameters()))
    for a, b in zip(g_local, g_glob):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def test_cpa_marginal_local_option():
    dec = _decoder([2, 8, 8, 2], seed=17)
    sx = 0.1
    x = _data(dec, 6, 2, sx, seed=18).reshape(2, 3, 2)
    with torch.no_grad():
        local = CPAMarginal(dec, sx, partition="local", local_tol=40.0)
        lp = local.log_prob(x)
        ref = CPAMarginal(dec, sx).log_prob(x)
    assert lp.shape == (2, 3) and local.log_prob_bound.shape == (2, 3)
    assert torch.allclose(lp, ref, rtol=0, atol=EXACT_ATOL)
    assert bool((local.log_prob_bound <= -40.0).all())
    with pytest.raises(PyroCPAError, match="partition"):
        CPAMarginal(dec, sx, partition="nearby")


def test_region_cache_reuses_and_invalidates():
    """A second call on the same leaves searches nothing and gives the same log p; after a weight change the
    cache is rebuilt (log p equals the global partition's under the new weights)."""
    from pyro_cpa.geometry.local import POLYGON_TOL, _RegionCache

    dec = _decoder([2, 10, 10, 2], seed=19)
    sx = 0.1
    x = _data(dec, 8, 2, sx, seed=20)
    net = as_cpa_network(dec)
    with torch.no_grad():
        first = local_log_prob(dec, x[:5], sx ** 2, 1.0)
        entry = _RegionCache.get(net, POLYGON_TOL)
        searched, size = len(entry.leaf), entry.size
        again = local_log_prob(dec, x[:5], sx ** 2, 1.0)
        assert len(entry.leaf) == searched and entry.size == size          # nothing searched again
        assert torch.equal(again.log_prob, first.log_prob)
        fresh = local_log_prob(dec, x, sx ** 2, 1.0, cache_regions=False)
        mixed = local_log_prob(dec, x, sx ** 2, 1.0)                        # part cached, part new
        assert torch.allclose(mixed.log_prob, fresh.log_prob, rtol=0, atol=EXACT_ATOL)
        dec[0].weight.mul_(1.1)
        moved = local_log_prob(dec, x, sx ** 2, 1.0)
        ref = CPAMarginal(dec, sx).log_prob(x)
    assert _RegionCache.get(net, POLYGON_TOL) is not entry
    assert torch.allclose(moved.log_prob, ref, rtol=0, atol=EXACT_ATOL)


def test_local_e_step_matches_global_e_step():
    """The local E-step statistics equal the global E-step's on the regions it found (matched by activation
    pattern), the regions it did not find carry at most the certified fraction, and one closed-form M-step
    from either gives the same new weights."""
    from pyro_cpa.geometry.local import local_e_step
    from pyro_cpa.infer.estep import e_step
    from pyro_cpa.infer.mstep import m_step

    dec = _decoder([2, 8, 8, 3], seed=21)
    sx = 0.1
    x = _data(dec, 30, 2, sx, seed=22)
    with torch.no_grad():
        loc = local_e_step(dec, x, torch.tensor(sx ** 2), torch.tensor(1.0))
        marg = CPAMarginal(dec, sx)
        glob = e_step(marg, x)
    codes_g = {bytes(np.packbits(c.numpy())): i for i, c in enumerate(torch.cat(glob.patterns, 1))}
    match = torch.tensor([codes_g[bytes(np.packbits(c.numpy()))] for c in torch.cat(loc.stats.patterns, 1)])
    scale = float(glob.Z[:, -1, -1].sum())          # = N
    assert torch.allclose(loc.stats.loglik, glob.loglik, rtol=0, atol=EXACT_ATOL)
    for a, b in ((loc.stats.Z, glob.Z), (loc.stats.X, glob.X), (loc.stats.q, glob.q)):
        assert float((a - b[match]).abs().max()) <= EXACT_ATOL * max(1.0, float(b.abs().max()))
    missing = torch.ones(len(glob.Z), dtype=torch.bool)
    missing[match] = False
    assert float(glob.Z[missing, -1, -1].sum()) <= scale * math.exp(-40.0)
    assert bool((loc.log_bound <= -40.0).all())
    net = as_cpa_network(dec)
    new_l = m_step(net, loc.stats.patterns, loc.stats, sx ** 2, 1.0)
    new_g = m_step(net, glob.patterns, glob, sx ** 2, 1.0)
    for (Wl, vl), (Wg, vg) in zip(new_l.maps, new_g.maps):
        assert torch.allclose(Wl, Wg, rtol=1e-8, atol=1e-8) and torch.allclose(vl, vg, rtol=1e-8, atol=1e-8)
    assert torch.allclose(torch.as_tensor(new_l.obs_var), torch.as_tensor(new_g.obs_var), rtol=1e-8, atol=0)
