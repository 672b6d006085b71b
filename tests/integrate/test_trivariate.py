"""S = 3: slicing quadrature and divergence-theorem moments against rotated boxes (products of
1-D mpmath terms), tilings and autograd."""
import itertools

import mpmath as mp
import pytest
import torch

from pyro_cpa.integrate.trivariate import log_mass_3d, std_moments_3d

INF = float("inf")


def _interval_ref(a, b):
    a, b = mp.mpf(a), mp.mpf(b)
    P = mp.ncdf(-a) - mp.ncdf(-b) if a + b > 0 else mp.ncdf(b) - mp.ncdf(a)
    pa = mp.npdf(a) if mp.isfinite(a) else 0
    pb = mp.npdf(b) if mp.isfinite(b) else 0
    apa = a * pa if mp.isfinite(a) else 0
    bpb = b * pb if mp.isfinite(b) else 0
    return float(mp.log(P)), float((pa - pb) / P), float(1 + (apa - bpb) / P)


def rotated_box(seed, lo, hi):
    g = torch.Generator().manual_seed(seed)
    R, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    G = torch.cat([R.T, -R.T])
    d = torch.cat([torch.tensor(hi), -torch.tensor(lo)])
    keep = torch.isfinite(d)
    refs = [_interval_ref(a, b) for a, b in zip(lo, hi)]
    lp = sum(r[0] for r in refs)
    m = torch.tensor([r[1] for r in refs])
    S = torch.diag(torch.tensor([r[2] for r in refs]) - m * m) + torch.outer(m, m)
    return G[keep], d[keep], lp, R @ m, R @ S @ R.T


@pytest.mark.parametrize("lo,hi", [([-1, -0.5, 0.2], [2, 1.5, 1.0]), ([3, -1, -2], [3.5, 1, 0.5]),
                                   ([29, -1, -2], [29.3, 1, 0.5]), ([-1, -INF, 0.5], [2, INF, INF])])
def test_rotated_boxes(lo, hi):
    G, d, lp, m, S = rotated_box(1, lo, hi)
    r = std_moments_3d(G, d)
    assert r.log_mass.item() == pytest.approx(lp, rel=1e-12, abs=1e-13)
    scale = max(1.0, m.abs().max().item())
    torch.testing.assert_close(r.mean, m, rtol=0, atol=1e-11 * scale)
    torch.testing.assert_close(r.second_moment, S, rtol=0, atol=1e-11 * scale ** 2)


def test_padding_batch_and_empty():
    G, d, lp, m, S = rotated_box(2, [-1, -0.5, 0.2], [2, 1.5, 1.0])
    Gp = torch.cat([G, torch.zeros(1, 3)]).expand(2, 1, 7, 3)
    dp = torch.cat([d, torch.tensor([INF])]).expand(2, 1, 7).clone()
    dp[1, 0, 0] = -dp[1, 0, 3] - 1.0  # contradicts the opposite face: empty
    r = std_moments_3d(Gp, dp)
    assert r.log_mass.shape == (2, 1) and r.mean.shape == (2, 1, 3) and r.second_moment.shape == (2, 1, 3, 3)
    assert r.log_mass[0, 0].item() == pytest.approx(lp, rel=1e-12)
    assert r.log_mass[1, 0].item() == -INF
    assert r.mean[1].abs().max() == 0 and r.second_moment[1].abs().max() == 0
    w = std_moments_3d(torch.zeros(1, 3), torch.tensor([INF]))
    assert w.log_mass.item() == 0 and torch.equal(w.second_moment, torch.eye(3))


@pytest.mark.slow
def test_tiling_of_random_planes_sums_to_one():
    n = 4
    g = torch.Generator().manual_seed(5)
    N0 = torch.randn(n, 3, generator=g)
    N0 = N0 / N0.norm(dim=-1, keepdim=True)
    off = torch.randn(n, generator=g)
    signs = torch.tensor(list(itertools.product([1.0, -1.0], repeat=n)))
    r = std_moments_3d(signs.unsqueeze(-1) * N0, signs * off)
    P = r.log_mass.exp()
    assert P.sum().item() == pytest.approx(1.0, abs=1e-10)
    torch.testing.assert_close((P[:, None] * r.mean).sum(0), torch.zeros(3), rtol=0, atol=1e-10)
    torch.testing.assert_close((P[:, None, None] * r.second_moment).sum(0), torch.eye(3), rtol=0, atol=1e-10)


@pytest.mark.slow
def test_gradcheck_log_mass_wrt_d():
    G, d, *_ = rotated_box(3, [-1, -0.5, 0.2], [2, 1.5, 1.0])
    d = d.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: log_mass_3d(G, x), (d,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("lo,hi", [([0.5, -1, -2], [0.5 + 1e-4, 1, 0.5]), ([6, -1, -0.5], [6 + 1e-5, 2, 3]),
                                   ([-0.2, 3.0, -1], [-0.2 + 1e-3, 3.5, 0.5])])
def test_thin_rotated_boxes(lo, hi):
    G, d, lp, m, S = rotated_box(4, lo, hi)
    r = std_moments_3d(G, d)
    assert r.log_mass.item() == pytest.approx(lp, rel=1e-10, abs=1e-10)
    scale = max(1.0, m.abs().max().item())
    torch.testing.assert_close(r.mean, m, rtol=0, atol=1e-8 * scale)


def test_need_moments_false_gives_the_same_log_mass():
    G, d, *_ = rotated_box(2, [-1, -0.5, 0.2], [2, 1.5, 1.0])
    Gp = torch.cat([G, torch.zeros(1, 3)]).expand(2, 7, 3)
    dp = torch.cat([d, torch.tensor([INF])]).expand(2, 7).clone()
    dp[1] = dp[1] + 3.0
    full = std_moments_3d(Gp, dp)
    fast = std_moments_3d(Gp, dp, need_moments=False)
    assert torch.equal(full.log_mass, fast.log_mass)
    assert fast.mean.shape == (2, 3) and fast.second_moment.shape == (2, 3, 3)
    assert fast.mean.abs().max() == 0 and fast.second_moment.abs().max() == 0
