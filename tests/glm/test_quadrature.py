import math

import numpy as np
import pytest
import torch
from scipy import integrate
from torch import nn

from pyro_cpa import PyroCPAError
from pyro_cpa.distributions import CPAMarginal
from pyro_cpa.geometry.regions import cached_linear_regions
from pyro_cpa.glm import (Bernoulli, Gamma, Gaussian, GLMDecoder, Poisson, approximate_objective,
                          quadrature_log_prob)

#: agreement with scipy's adaptive quadrature (S = 1) required by the issue
QUAD_TOL = 1e-8
#: agreement with the exact Gaussian likelihood (CPAMarginal)
EXACT = 1e-10


def _net(widths, seed):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.LeakyReLU(0.2) if i % 2 else nn.ReLU())
    return nn.Sequential(*layers)


def _scipy_log_evidence(dec, x):
    """Brute force: scipy.integrate.quad between all region breakpoints and the mode, on [−15, 15]."""
    fam = dec.family

    def f(z):
        with torch.no_grad():
            th = dec.natural_parameter(torch.tensor([[z]]))[0]
            return float(fam.log_prob(x, th).sum()) - 0.5 * z * z - 0.5 * math.log(2 * math.pi)

    grid = np.linspace(-15, 15, 1501)
    v = np.array([f(z) for z in grid])
    M = v.max()
    reg = cached_linear_regions(dec.net)
    H, c = reg.polytopes()
    bps = [(c[r, k] / H[r, k, 0]).item() for r in range(len(reg)) for k in range(H.shape[1])
           if math.isfinite(c[r, k].item())]
    pts = sorted(set([-15.0, 15.0, float(grid[v.argmax()])] + [p for p in bps if -15 < p < 15]))
    total = 0.0
    for lo, hi in zip(pts[:-1], pts[1:]):
        total += integrate.quad(lambda z: math.exp(f(z) - M), lo, hi, epsabs=0, epsrel=1e-12, limit=200)[0]
    return M + math.log(total)


@pytest.mark.parametrize("family", [Bernoulli(), Poisson()], ids=lambda f: f.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_s1_matches_adaptive_quadrature(family, seed):
    dec = GLMDecoder(_net([1, 8, 8, 6], seed), family)
    with torch.no_grad():
        th = dec.natural_parameter(torch.randn(4, 1) * 1.5).clamp(-4, 3)
    torch.manual_seed(seed)
    x = family.sample(th)
    res = quadrature_log_prob(dec, x)
    for i in range(x.shape[0]):
        assert float(res.log_prob[i]) == pytest.approx(_scipy_log_evidence(dec, x[i]), abs=QUAD_TOL)
    assert bool((res.error < 1e-9).all())
    assert torch.allclose(dec.exact_log_prob(x), res.log_prob)


@pytest.mark.parametrize("S", [1, 2])
def test_gaussian_family_matches_exact_cpa_marginal(S):
    net = _net([S, 5, 4], 3)
    sig = 0.4
    x = net(torch.randn(3, S)).detach() + sig * torch.randn(3, 4)
    res = quadrature_log_prob(net, x, family=Gaussian(sig ** 2))
    ref = CPAMarginal(net, sig).log_prob(x).detach()
    assert (res.log_prob - ref).abs().max() < EXACT
    assert bool((res.error < 1e-6).all())  # |rule n − rule 2n|: conservative for the returned 2n value


def test_s2_reduces_to_s1_and_is_rotation_invariant():
    net1 = _net([1, 4, 3], 5)
    W1 = net1[0].weight.detach()
    net2 = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        net2[0].weight.copy_(torch.cat([W1, torch.zeros(4, 1)], 1))
        net2[0].bias.copy_(net1[0].bias)
        net2[2].load_state_dict(net1[2].state_dict())
    x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    r1 = quadrature_log_prob(net1, x, family=Bernoulli()).log_prob
    r2 = quadrature_log_prob(net2, x, family=Bernoulli()).log_prob
    assert (r1 - r2).abs().max() < 1e-9
    a = 0.7
    R = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    net3 = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        net3[0].weight.copy_(net2[0].weight @ R)
        net3[0].bias.copy_(net2[0].bias)
        net3[2].load_state_dict(net2[2].state_dict())
    r3 = quadrature_log_prob(net3, x, family=Bernoulli())
    assert (r3.log_prob - r2).abs().max() < 1e-9
    assert bool((r3.error < 1e-6).all())  # |rule n − rule 2n|: conservative for the returned 2n value


@pytest.mark.parametrize("S", [1, 2])
def test_bernoulli_objective_is_a_lower_bound(S):
    torch.manual_seed(S)
    d = 5
    lin = nn.Linear(S, d)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    dec = GLMDecoder(nn.Sequential(lin), Bernoulli())
    x = torch.bernoulli(torch.full((4 if S == 2 else 20, d), 0.5))
    exact = quadrature_log_prob(dec, x).log_prob
    lhat = approximate_objective(x, lin.weight.detach(), lin.bias.detach(), Bernoulli(), per_datum=True)
    assert bool((lhat <= exact).all())


def test_bad_input_raises():
    with pytest.raises(PyroCPAError, match="S <= 2"):
        quadrature_log_prob(_net([3, 4, 2], 0), torch.zeros(1, 2), family=Bernoulli())
    with pytest.raises(PyroCPAError, match="Gamma|gamma"):
        quadrature_log_prob(_net([1, 4, 2], 0), torch.ones(1, 2), family=Gamma(2.0))
    with pytest.raises(PyroCPAError, match="support"):
        quadrature_log_prob(_net([1, 4, 2], 0), torch.full((1, 2), 0.5), family=Bernoulli())
    with pytest.raises(PyroCPAError, match="family"):
        quadrature_log_prob(_net([1, 4, 2], 0), torch.ones(1, 2))
    with pytest.raises(PyroCPAError, match="x must be"):
        quadrature_log_prob(_net([1, 4, 2], 0), torch.ones(1, 3), family=Poisson())
