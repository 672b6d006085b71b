"""Tests of Botev's minimax tilting (pyro_cpa.integrate.tilting) against references that share no code:
exact products of 1-D log_ndtr differences (rotated boxes), plain Monte Carlo, tilings that must sum to
one, scipy.stats.truncnorm moments and a Kolmogorov–Smirnov test."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from pyro_cpa.errors import PyroCPAError
from pyro_cpa.integrate.tilting import (log_mass_upper_bound_tilting, sample_truncated_std,
                                        std_moments_tilting)


def _rotation(S, seed):
    return torch.tensor(stats.ortho_group.rvs(S, random_state=seed), dtype=torch.float64)


def _log_box_mass(lo, hi):
    """Exact log P of the box [lo, hi] under N(0, I), from scipy (no shared code)."""
    out = 0.0
    for a, b in zip(lo.tolist(), hi.tolist()):
        if a > 0:  # upper tail: Φ(−a) − Φ(−b)
            la, lb = stats.norm.logsf(a), stats.norm.logsf(b)
        else:
            la, lb = stats.norm.logcdf(b), stats.norm.logcdf(a)
        out += la + math.log1p(-math.exp(lb - la))
    return out


def _rotated_box(lo, hi, R):
    """{u : lo <= Rᵀu <= hi} as G u <= d with unit rows."""
    S = lo.shape[0]
    E = torch.eye(S)
    G = torch.cat([E, -E]) @ R.T
    d = torch.cat([hi, -lo])
    return G, d


def _cell(W, b, point):
    """The cell of the arrangement {W u = b} that contains ``point``, as G u <= d."""
    sgn = torch.sign(W @ point - b)
    return -sgn[:, None] * W, -sgn * b


def _mc_log_mass(G, d, n, seed):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(n, G.shape[-1], generator=g)
    p = ((U @ G.T) <= d).all(-1).double().mean().item()
    return math.log(p), math.sqrt((1 - p) / (p * n))


# ---------------------------------------------------------------------------------------------- (a)
@pytest.mark.parametrize("S,lo,hi", [
    (4, [-1.0, -0.5, 0.0, 0.3], [1.0, 2.0, 1.5, 2.0]),
    (5, [-2.0, 0.5, -1.0, -3.0, 1.0], [0.0, 3.0, 1.0, -1.0, 1.5]),
    (4, [20.0, -1.0, -1.0, -1.0], [21.0, 1.0, 1.0, 1.0]),
    (5, [11.0, 11.0, 11.0, 11.0, 11.0], [12.0, 12.0, 12.0, 12.0, 12.0]),   # log P ≈ −314
])
def test_rotated_box_exact(S, lo, hi):
    lo, hi = torch.tensor(lo), torch.tensor(hi)
    G, d = _rotated_box(lo, hi, _rotation(S, S))
    exact = _log_box_mass(lo, hi)
    r = std_moments_tilting(G, d, generator=torch.Generator().manual_seed(1))
    assert abs(r.log_mass.item() - exact) <= 4 * r.log_mass_stderr.item() + 1e-9 * abs(exact)
    assert r.log_mass_stderr.item() < 1e-3
    bound = log_mass_upper_bound_tilting(G, d)
    assert bound.item() >= exact - 1e-9 * abs(exact)


def test_rotated_box_with_redundant_facets_far_tail():
    """A far-tail box (log P ≈ −300) plus extra facets that do not cut it: F > S, P still exact."""
    S = 4
    lo, hi = torch.full((S,), 12.0), torch.full((S,), 12.5)
    R = _rotation(S, 7)
    G, d = _rotated_box(lo, hi, R)
    g = torch.Generator().manual_seed(3)
    extra = torch.randn(4, S, generator=g)
    extra = extra / extra.norm(dim=-1, keepdim=True)
    # offset = max over the box's vertices of gᵀu, plus a margin: redundant
    corners = torch.cartesian_prod(*[torch.stack([lo[i], hi[i]]) for i in range(S)]) @ R.T
    d_extra = (corners @ extra.T).amax(0) + 0.05
    G, d = torch.cat([G, extra]), torch.cat([d, d_extra])
    exact = _log_box_mass(lo, hi)
    assert exact < -290
    r = std_moments_tilting(G, d, generator=torch.Generator().manual_seed(2))
    assert abs(r.log_mass.item() - exact) <= 4 * r.log_mass_stderr.item() + 1e-9 * abs(exact)
    assert r.log_mass_stderr.item() < 2e-3
    # conditional mean of the box: R times the 1-D truncated means
    m = torch.tensor([stats.truncnorm.mean(a, b) for a, b in zip(lo.tolist(), hi.tolist())])
    assert torch.allclose(r.mean, R @ m, atol=1e-2)


# ---------------------------------------------------------------------------------------------- (b)
@pytest.mark.parametrize("kind", ["simplex", "relu_cell"])
def test_polytope_more_facets_than_dims_vs_monte_carlo(kind):
    S = 4
    g = torch.Generator().manual_seed(11)
    if kind == "simplex":  # a regular simplex around a point off the origin: S + 1 facets, bounded
        V = torch.randn(S + 1, S, generator=g)
        G = V - V.mean(0)
        G = G / G.norm(dim=-1, keepdim=True)
        c = torch.tensor([0.3, -0.2, 0.1, 0.4])
        d = G @ c + 1.2
    else:  # a cell of 8 random ReLU-like hyperplanes
        W = torch.randn(8, S, generator=g)
        W = W / W.norm(dim=-1, keepdim=True)
        b = 0.5 * torch.randn(8, generator=g)
        G, d = _cell(W, b, torch.tensor([0.2, 0.1, -0.3, 0.4]))
    r = std_moments_tilting(G, d, generator=torch.Generator().manual_seed(5))
    ref, ref_se = _mc_log_mass(G, d, 1_000_000, seed=6)
    comb = math.hypot(r.log_mass_stderr.item(), ref_se)
    assert abs(r.log_mass.item() - ref) <= 4.5 * comb
    assert r.log_mass_stderr.item() < 5e-3
    assert log_mass_upper_bound_tilting(G, d).item() >= r.log_mass.item() - 4 * r.log_mass_stderr.item()
    # conditional mean against the same Monte Carlo draws
    gg = torch.Generator().manual_seed(6)
    U = torch.randn(1_000_000, S, generator=gg)
    inside = U[((U @ G.T) <= d).all(-1)]
    se = inside.std(0) / math.sqrt(inside.shape[0])
    assert ((r.mean - inside.mean(0)).abs() <= 5 * se + 5e-3).all()
    cov = r.second_moment - r.mean[:, None] * r.mean[None, :]
    assert torch.allclose(cov, torch.cov(inside.T), atol=2e-2)


# ---------------------------------------------------------------------------------------------- (c)
@pytest.mark.slow
def test_tiling_masses_sum_to_one():
    """All 2^5 sign patterns of 5 random hyperplanes near the origin in S = 4: the non-empty ones tile R^4."""
    S, H = 4, 5
    g = torch.Generator().manual_seed(21)
    W = torch.randn(H, S, generator=g)
    W = W / W.norm(dim=-1, keepdim=True)
    b = 0.3 * torch.randn(H, generator=g)
    signs = torch.tensor(list(np.ndindex(*(2,) * H)), dtype=torch.float64) * 2 - 1   # (32, H)
    G = -signs[:, :, None] * W                       # s (w·u − b) >= 0  <=>  −s w·u <= −s b
    d = -signs * b
    r = std_moments_tilting(G, d, generator=torch.Generator().manual_seed(4))
    assert not torch.isnan(r.log_mass).any() and not torch.isnan(r.mean).any()
    P = r.log_mass.exp()
    se = P * r.log_mass_stderr
    total = P.sum().item()
    assert abs(total - 1.0) <= 4 * se.pow(2).sum().sqrt().item() + 1e-12
    # 5 hyperplanes in general position cut R^4 into Σ_{i<=4} C(5, i) = 31 cells: one pattern is empty
    assert int(torch.isneginf(r.log_mass).sum()) == 1
    assert (r.log_mass_stderr[torch.isneginf(r.log_mass)] == 0).all()


def test_empty_polytope_gives_minus_inf():
    G = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    d = torch.tensor([-1.0, -1.0, 0.0])      # u1 <= −1 and u1 >= 1
    r = std_moments_tilting(G, d)
    assert torch.isneginf(r.log_mass) and r.log_mass_stderr == 0
    assert torch.isfinite(r.mean).all() and torch.isfinite(r.second_moment).all()
    assert torch.isneginf(log_mass_upper_bound_tilting(G, d))
    with pytest.raises(PyroCPAError):
        sample_truncated_std(G, d, (3,))


# ---------------------------------------------------------------------------------------------- (d)
@pytest.mark.parametrize("lo,hi", [
    ([-1.0, -0.5, 0.0, 0.3], [1.0, 2.0, 1.5, 2.0]),
    ([15.0, -1.0, -2.0, 0.0], [15.5, 1.0, 0.0, 3.0]),   # tail, log P ≈ −116
])
def test_sampler_box_moments_and_ks(lo, hi):
    S = 4
    lo, hi = torch.tensor(lo), torch.tensor(hi)
    R = _rotation(S, 3)
    G, d = _rotated_box(lo, hi, R)
    n = 20000
    u = sample_truncated_std(G, d, (n,), generator=torch.Generator().manual_seed(8))
    assert u.shape == (n, S)
    assert ((u @ G.T) <= d + 1e-9).all()
    z = u @ R                                           # box coordinates, independent truncated normals
    a, b = lo.numpy(), hi.numpy()
    m = torch.tensor(stats.truncnorm.mean(a, b))
    v = torch.tensor(stats.truncnorm.var(a, b))
    assert ((z.mean(0) - m).abs() <= 4.5 * (v / n).sqrt()).all()
    assert ((z.var(0) - v).abs() <= 6 * v * math.sqrt(2.0 / n) + 1e-12).all()
    for i in range(S):
        assert stats.kstest(z[:, i].numpy(), stats.truncnorm(a[i], b[i]).cdf).pvalue > 1e-3


@pytest.mark.parametrize("S", [1, 2, 3, 5])
def test_sampler_low_and_high_dims(S):
    g = torch.Generator().manual_seed(S)
    W = torch.randn(S + 3, S, generator=g)
    W = W / W.norm(dim=-1, keepdim=True)
    b = 0.5 * torch.randn(S + 3, generator=g)
    G, d = _cell(W, b, torch.full((S,), 0.3))
    u = sample_truncated_std(G, d, (4000,), generator=g)
    assert u.shape == (4000, S)
    assert ((u @ G.T) <= d + 1e-9).all()
    r = std_moments_tilting(G, d, generator=g)
    sd = u.std(0) / math.sqrt(4000)
    assert ((u.mean(0) - r.mean).abs() <= 5 * sd + 1e-3).all()


@pytest.mark.slow
def test_sampler_far_tail_cell_with_extra_facets():
    """A cell at distance ≈ 20 (log P ≈ −200) with F = 8 > S = 4: exact draws, decent acceptance."""
    S = 4
    g = torch.Generator().manual_seed(5)
    c = torch.tensor([20.0, 0.0, 0.0, 0.0])
    W = torch.randn(8, S, generator=g)
    W = W / W.norm(dim=-1, keepdim=True)
    b = W @ c + 0.4 * torch.randn(8, generator=g)
    G, d = _cell(W, b, c + 0.1)
    r = std_moments_tilting(G, d, generator=g)
    assert r.log_mass < -150 and r.log_mass_stderr < 1e-2
    bound = log_mass_upper_bound_tilting(G, d)
    assert bound >= r.log_mass - 4 * r.log_mass_stderr
    assert (r.log_mass - bound).exp() > 0.01        # acceptance rate of the sampler (4.6% here)
    u = sample_truncated_std(G, d, (3000,), generator=g)
    assert ((u @ G.T) <= d + 1e-9).all()
    sd = u.std(0) / math.sqrt(3000)
    assert ((u.mean(0) - r.mean).abs() <= 5 * sd + 1e-3).all()


def test_sampler_raises_instead_of_hanging():
    G, d = _rotated_box(torch.zeros(4), torch.ones(4), torch.eye(4))
    with pytest.raises(PyroCPAError, match="max_tries"):
        sample_truncated_std(G, d, (10000,), max_tries=2, chunk_elems=64)


# ---------------------------------------------------------------------------------------------- (e)
def test_padding_rows_are_ignored_and_batching():
    S = 4
    g = torch.Generator().manual_seed(9)
    W = torch.randn(3, 6, S, generator=g)
    W = W / W.norm(dim=-1, keepdim=True)
    b = 0.4 * torch.randn(3, 6, generator=g)
    cells = [_cell(W[i], b[i], torch.full((S,), 0.1 * i)) for i in range(3)]
    G = torch.stack([c[0] for c in cells])
    d = torch.stack([c[1] for c in cells])
    # polytope 1 keeps only 4 facets: the other two become padding (G = 0, d = +inf)
    G[1, 4:] = 0.0
    d[1, 4:] = math.inf
    Gb = G.expand(2, 3, 6, S)
    db = d.expand(2, 3, 6)
    r = std_moments_tilting(Gb, db, generator=torch.Generator().manual_seed(1))
    assert r.log_mass.shape == (2, 3) and r.mean.shape == (2, 3, S) and r.second_moment.shape == (2, 3, S, S)
    assert r.log_mass_stderr.shape == (2, 3)
    assert torch.isfinite(r.log_mass).all() and torch.isfinite(r.second_moment).all()
    # the padded polytope against the unpadded one, and the two identical batch rows against each other
    alone = std_moments_tilting(G[1, :4], d[1, :4], generator=torch.Generator().manual_seed(2))
    for lm, se in ((r.log_mass[0, 1], r.log_mass_stderr[0, 1]), (r.log_mass[1, 1], r.log_mass_stderr[1, 1])):
        assert abs(lm - alone.log_mass) <= 4 * math.hypot(se, alone.log_mass_stderr) + 1e-12
    assert (r.log_mass[0] - r.log_mass[1]).abs().max() <= 4 * math.sqrt(2) * r.log_mass_stderr.max() + 1e-12
    u = sample_truncated_std(Gb, db, (5, 7), generator=g)
    assert u.shape == (5, 7, 2, 3, S)
    Gf = torch.where(torch.isinf(db)[..., None], torch.zeros_like(Gb), Gb)
    slack = torch.einsum("bcfs,ijbcs->ijbcf", Gf, u) - torch.where(torch.isinf(db), 0.0, db)
    assert (slack <= 1e-9).all()


def test_box_moments_and_second_moment_symmetric():
    S = 5
    lo = torch.tensor([-1.0, 0.0, -2.0, 0.5, -0.3])
    hi = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.3])
    R = _rotation(S, 12)
    G, d = _rotated_box(lo, hi, R)
    r = std_moments_tilting(G, d)
    m = torch.tensor(stats.truncnorm.mean(lo.numpy(), hi.numpy()))
    v = torch.tensor(stats.truncnorm.var(lo.numpy(), hi.numpy()))
    E2 = R @ (torch.diag(v) + m[:, None] * m[None, :]) @ R.T
    assert r.log_mass_stderr == 0       # zero-variance weights for a box: μ* = 0, constant ψ
    assert abs(r.log_mass.item() - _log_box_mass(lo, hi)) < 1e-12
    assert torch.allclose(r.mean, R @ m, atol=2e-3)     # QMC averages of the exact truncated draws
    assert torch.allclose(r.second_moment, E2, atol=5e-3)
    assert torch.equal(r.second_moment, r.second_moment.T)
