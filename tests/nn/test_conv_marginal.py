"""Issue 14: the exact marginal of a convolutional decoder with a max pool and ReLU6 units.

References independent of the region machinery: scipy's adaptive quadrature of the joint density,
evaluated with the decoder's own forward pass (S = 1), and a fine midpoint grid (S = 2).
"""
import math

import pytest
import torch
from scipy.integrate import quad
from torch import nn

from pyro_cpa.distributions import CPAMarginal
from pyro_cpa.geometry import linear_regions

#: Agreement with scipy quad (absolute, in log p): quad's epsrel is 1e-11.
QUAD_TOL = 1e-8
#: Agreement with the midpoint grid (absolute, in log p): the rule's O(h²) error at h = 12 σz / 1200.
GRID_TOL = 2e-4


def _decoder(S: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    if S == 1:
        dec = nn.Sequential(nn.Linear(1, 8), nn.Unflatten(1, (2, 4)), nn.ConvTranspose1d(2, 2, 3), nn.ReLU6(),
                            nn.MaxPool1d(2), nn.Flatten(), nn.Linear(6, 2))
    else:
        dec = nn.Sequential(nn.Linear(2, 18), nn.Unflatten(1, (2, 3, 3)), nn.ConvTranspose2d(2, 2, 2), nn.ReLU6(),
                            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))
    dec = dec.double().eval()
    with torch.no_grad():
        dec[0].weight.mul_(4.0)     # pre-activations of a few units: both kinks of ReLU6 are crossed
        dec[0].bias.mul_(3.0)
    return dec


def _log_joint(dec, z: torch.Tensor, x: torch.Tensor, sx: float, sz: float) -> torch.Tensor:
    """log N(x; g(z), sx² I) + log N(z; 0, sz² I) for z (n, S), x (D,)."""
    with torch.no_grad():
        g = dec(z)
    D, S = x.shape[-1], z.shape[-1]
    return (-0.5 * ((x - g) ** 2).sum(-1) / sx ** 2 - D * math.log(sx * math.sqrt(2 * math.pi))
            - 0.5 * (z ** 2).sum(-1) / sz ** 2 - S * math.log(sz * math.sqrt(2 * math.pi)))


def test_conv_maxpool_relu6_marginal_s1_matches_quad():
    dec = _decoder(1, 0)
    sx, sz = 0.4, 1.3
    regions = linear_regions(dec, progress=False)
    assert len(regions) > 8
    # both ReLU6 kinks and the max pool's ties bound regions
    H, _ = regions.polytopes(torch.float64)
    facets = set(regions.facets[regions.facet_mask].tolist())
    w0 = regions.network.widths[0]
    assert any(f % 2 == 1 and f < w0 for f in facets) and any(f >= w0 for f in facets)
    mg = CPAMarginal(dec, sx, sz)
    z0 = torch.tensor([[-1.1], [0.2], [0.9]], dtype=torch.float64)
    with torch.no_grad():
        x = dec(z0) + 0.3 * torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        lp = mg.log_prob(x)
    # the breakpoints (facets) as quad's split points; the integrand itself is the decoder's forward pass
    c = regions.polytopes(torch.float64)[1].detach()
    bps = sorted({float(b) for b in (c / H.detach()[..., 0])[regions.facet_mask]})
    lo, hi = -12 * sz, 12 * sz
    for i in range(3):
        shift = float(_log_joint(dec, z0[i:i + 1], x[i], sx, sz))
        def f(t):
            return math.exp(float(_log_joint(dec, torch.tensor([[t]], dtype=torch.float64), x[i], sx, sz)) - shift)
        pts = [p for p in bps if lo < p < hi]
        val, err = quad(f, lo, hi, points=pts, limit=2000, epsabs=0.0, epsrel=1e-11)
        ref = shift + math.log(val)
        assert abs(float(lp[i]) - ref) < QUAD_TOL, (float(lp[i]), ref)


@pytest.mark.slow
def test_conv_maxpool_relu6_marginal_s2_matches_grid():
    dec = _decoder(2, 3)
    sx, sz = 0.5, 1.0
    regions = linear_regions(dec, progress=False)
    assert len(regions) > 20
    mg = CPAMarginal(dec, sx, sz)
    z0 = torch.tensor([[0.3, -0.8], [-1.0, 0.5]], dtype=torch.float64)
    with torch.no_grad():
        x = dec(z0) + 0.2
        lp = mg.log_prob(x)
    n, L = 1200, 6.0 * sz
    h = 2 * L / n
    t = -L + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    zz = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    for i in range(2):
        vals = torch.cat([_log_joint(dec, zz[a:a + 200_000], x[i], sx, sz) for a in range(0, len(zz), 200_000)])
        ref = float(torch.logsumexp(vals, 0)) + 2 * math.log(h)
        assert abs(float(lp[i]) - ref) < GRID_TOL, (float(lp[i]), ref)
