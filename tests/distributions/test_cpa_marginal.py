import math
import pickle

import numpy as np
import pytest
import torch
from scipy import integrate
from sklearn.decomposition import FactorAnalysis
from torch import nn

from pyro_cpa import Abs, NotCPAError, PyroCPAError
from pyro_cpa.distributions import CPAMarginal, TruncatedGaussianMixture
from pyro_cpa.nn import mlp


def _net(widths, act, seed=0):
    return mlp(widths, act, seed=seed)


def _log_joint_1d(decoder, x, sx, sz):
    """log p(x|z) + log p(z) as a numpy function of scalar z (reference integrand)."""
    def f(z):
        with torch.no_grad():
            g = decoder(torch.tensor([[z]], dtype=torch.float64))[0].numpy()
        return (-0.5 * np.sum((x - g) ** 2) / sx ** 2 - len(x) * math.log(sx * math.sqrt(2 * math.pi))
                - 0.5 * z ** 2 / sz ** 2 - math.log(sz * math.sqrt(2 * math.pi)))
    return f


def _quad_log_evidence(decoder, x, sx, sz, breakpoints):
    f = _log_joint_1d(decoder, x, sx, sz)
    grid = np.linspace(-12 * sz, 12 * sz, 4001)
    vals = np.array([f(z) for z in grid])
    zmax = grid[vals.argmax()]
    M = vals.max()
    pts = sorted(set([p for p in breakpoints if -12 * sz < p < 12 * sz] + [zmax]))
    total = 0.0
    edges = [-12 * sz] + pts + [12 * sz]
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi > lo:
            total += integrate.quad(lambda z: math.exp(f(z) - M), lo, hi, epsabs=0, epsrel=1e-13, limit=200)[0]
    return M + math.log(total)


def test_linear_decoder_equals_factor_analysis():
    S, D = 2, 5
    dec = _net([S, D], nn.ReLU)
    sx = torch.rand(D) + 0.3
    sz = torch.tensor([0.7, 1.6])
    x = torch.randn(40, D) * 2
    lp = CPAMarginal(dec, sx, sz).log_prob(x)
    fa = FactorAnalysis(n_components=S)
    fa.components_ = (dec[0].weight.detach() * sz).T.numpy()
    fa.noise_variance_ = (sx ** 2).numpy()
    fa.mean_ = dec[0].bias.detach().numpy()
    fa.n_features_in_ = D
    ref = fa.score_samples(x.numpy())
    np.testing.assert_allclose(lp.detach().numpy(), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("act,widths", [(nn.ReLU, [1, 6, 3]), (lambda: nn.LeakyReLU(-0.4), [1, 5, 5, 2]),
                                        (Abs, [1, 4, 4, 4, 2])])
def test_s1_log_prob_matches_adaptive_quadrature(act, widths):
    dec = _net(widths, act, seed=3)
    sx, sz = 0.3, 1.2
    dist = CPAMarginal(dec, sx, sz)
    bps = []
    regions = dist.regions
    H, c = regions.polytopes()
    for r in range(len(regions)):
        for f in range(H.shape[1]):
            if math.isfinite(c[r, f].item()):
                bps.append((c[r, f] / H[r, f, 0]).item())
    D = widths[-1]
    xs = [torch.randn(D) * 0.5, torch.randn(D), torch.full((D,), 40.0)]  # last: far off the manifold
    for x in xs:
        lp = dist.log_prob(x).item()
        ref = _quad_log_evidence(dec, x.numpy(), sx, sz, bps)
        assert math.isfinite(lp)
        assert abs(lp - ref) <= 1e-9 * max(1.0, abs(ref)), (lp, ref)
    assert dist.log_prob(xs[-1]).item() < -1e3


def test_marginal_integrates_to_one_d1_and_d2():
    dec = _net([1, 5, 1], nn.ReLU, seed=1)
    dist = CPAMarginal(dec, 0.4)
    xs = torch.linspace(-15, 15, 6001).unsqueeze(-1)
    p = dist.log_prob(xs).exp()
    assert abs(torch.trapezoid(p, xs[:, 0]).item() - 1) < 1e-8
    dec2 = _net([1, 4, 2], lambda: nn.LeakyReLU(0.2), seed=2)
    dist2 = CPAMarginal(dec2, 0.5)
    g = torch.linspace(-10, 10, 401)
    X, Y = torch.meshgrid(g, g, indexing="ij")
    p2 = dist2.log_prob(torch.stack([X, Y], -1)).exp()
    total = torch.trapezoid(torch.trapezoid(p2, g, dim=-1), g).item()
    assert abs(total - 1) < 1e-6


def test_gradients_match_finite_differences():
    dec = _net([1, 4, 2], lambda: nn.LeakyReLU(0.1), seed=4)
    x = torch.randn(6, 2)
    sx = torch.tensor(0.3, requires_grad=True)
    sz = torch.tensor(0.9, requires_grad=True)
    lp = CPAMarginal(dec, sx, sz).log_prob(x).sum()
    params = [dec[0].weight, dec[0].bias, dec[2].weight, sx, sz]
    grads = torch.autograd.grad(lp, params)
    eps = 1e-6
    for p, g in zip(params, grads):
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            up = CPAMarginal(dec, sx.detach(), sz.detach()).log_prob(x).sum().item()
            flat[i] = old - eps
            down = CPAMarginal(dec, sx.detach(), sz.detach()).log_prob(x).sum().item()
            flat[i] = old
            fd = (up - down) / (2 * eps)
            assert abs(fd - g.view(-1)[i].item()) < 1e-5 * max(1, abs(fd)), (p.shape, i, fd, g.view(-1)[i])


def test_regions_cache_refreshes_after_optimizer_step():
    dec = _net([1, 4, 2], nn.ReLU, seed=5)
    dist = CPAMarginal(dec, 0.3)
    r1 = dist.regions
    assert dist.regions is r1
    opt = torch.optim.SGD(dec.parameters(), lr=0.5)
    loss = -dist.log_prob(torch.randn(10, 2)).sum()
    loss.backward()
    opt.step()
    assert r1.is_stale()
    r2 = dist.regions
    assert r2 is not r1 and not r2.is_stale()
    assert CPAMarginal(dec, 0.3).regions is r2  # shared cache for the same parameter state


def test_posterior_moments_and_sampling_s1():
    dec = _net([1, 6, 2], Abs, seed=6)
    dist = CPAMarginal(dec, 0.2)
    x = torch.tensor([[0.3, -0.2], [1.0, 0.5]])
    with torch.no_grad():
        post = dist.posterior(x)
    assert isinstance(post, TruncatedGaussianMixture)
    assert post.batch_shape == (2,) and post.event_shape == (1,)
    # posterior density integrates to 1 and its moments match quadrature
    z = torch.linspace(-8, 8, 20001)
    dens = post.log_prob(z.view(-1, 1, 1).expand(-1, 2, 1)).exp()
    np.testing.assert_allclose(torch.trapezoid(dens, z, dim=0).numpy(), 1.0, atol=1e-6)
    m = torch.trapezoid(dens * z[:, None], z, dim=0)
    np.testing.assert_allclose(post.mean[:, 0].numpy(), m.numpy(), atol=1e-6)
    s = post.sample((40000,))
    assert s.shape == (40000, 2, 1)
    se = post.variance.sqrt()[:, 0] / math.sqrt(40000)
    assert ((s.mean(0)[:, 0] - post.mean[:, 0]).abs() < 5 * se).all()
    # cdf agrees with the integrated density
    cdf_q = torch.cumulative_trapezoid(dens, z, dim=0)[9999]  # integral up to z[10000] = 0
    np.testing.assert_allclose(post.cdf(torch.zeros(2, 1)).numpy(), cdf_q.numpy(), atol=1e-6)


def test_posterior_entropy_exact_s1():
    dec = _net([1, 5, 2], nn.ReLU, seed=7)
    with torch.no_grad():
        post = CPAMarginal(dec, 0.3).posterior(torch.tensor([0.2, 0.1]))
    z = torch.linspace(-8, 8, 40001).unsqueeze(-1)
    lp = post.log_prob(z)
    ref = -torch.trapezoid(lp.exp() * torch.nan_to_num(lp, neginf=0.0), z[:, 0])
    assert abs(post.entropy().item() - ref.item()) < 1e-6


def test_mean_and_covariance_match_monte_carlo():
    dec = _net([1, 5, 2], lambda: nn.LeakyReLU(0.1), seed=8)
    dist = CPAMarginal(dec, 0.25, 1.3)
    xs = dist.sample((200000,))
    se = dist.variance.sqrt() / math.sqrt(200000)
    assert ((xs.mean(0) - dist.mean).abs() < 5 * se).all()
    torch.testing.assert_close(torch.cov(xs.T), dist.covariance_matrix, atol=0.02, rtol=0.02)


def test_missing_data_linear_equals_gaussian_conditioning():
    S, D = 1, 4
    dec = _net([S, D], nn.ReLU, seed=9)
    sx = torch.tensor([0.3, 0.5, 0.4, 0.6])
    dist = CPAMarginal(dec, sx)
    W, b = dec[0].weight.detach(), dec[0].bias.detach()
    C = W @ W.T + torch.diag(sx ** 2)
    x = torch.tensor([0.5, float("nan"), -0.2, float("nan")])
    o, m = ~torch.isnan(x), torch.isnan(x)
    mu, cov = dist.impute(x)
    Coo, Cmo, Cmm = C[o][:, o], C[m][:, o], C[m][:, m]
    ref_mean = b[m] + Cmo @ torch.linalg.solve(Coo, x[o] - b[o])
    ref_cov = Cmm - Cmo @ torch.linalg.solve(Coo, Cmo.T)
    torch.testing.assert_close(mu[m], ref_mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(cov[m][:, m], ref_cov, atol=1e-12, rtol=0)
    assert torch.equal(mu[o], x[o])
    # marginal likelihood of the observed part
    ref_lp = torch.distributions.MultivariateNormal(b[o], Coo).log_prob(x[o])
    torch.testing.assert_close(dist.log_prob(x), ref_lp, atol=1e-12, rtol=0)


def test_missing_data_nonlinear_matches_monte_carlo():
    dec = _net([1, 6, 3], nn.ReLU, seed=10)
    dist = CPAMarginal(dec, 0.3)
    x = torch.tensor([0.4, float("nan"), 0.1])
    mu, cov = dist.impute(x)
    # reference: self-normalised importance sampling from the prior
    z = torch.randn(400000, 1)
    g = dec(z).detach()
    logw = -0.5 * (((g[:, [0, 2]] - x[[0, 2]]) / 0.3) ** 2).sum(-1)
    w = torch.softmax(logw, 0)
    ref = (w * g[:, 1]).sum()
    ref_var = (w * (g[:, 1] - ref) ** 2).sum() + 0.09
    assert abs(mu[1] - ref) < 0.01 and abs(cov[1, 1] - ref_var) < 0.01
    # log p(x_o) agrees with the marginal of the observed coordinates
    lp = dist.log_prob(x)
    ref_lp = torch.logsumexp(logw, 0) - math.log(400000) - 2 * math.log(0.3 * math.sqrt(2 * math.pi))
    assert abs(lp - ref_lp) < 0.01


def test_invalid_arguments():
    dec = _net([1, 4, 2], nn.ReLU)
    with pytest.raises(PyroCPAError, match="obs_scale"):
        CPAMarginal(dec, 0.0)
    with pytest.raises(PyroCPAError, match="obs_scale"):
        CPAMarginal(dec, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(PyroCPAError, match="prior_scale"):
        CPAMarginal(dec, 0.1, -1.0)
    with pytest.raises(NotCPAError):
        CPAMarginal(nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 2)), 0.1)
    d = CPAMarginal(dec, 0.1)
    with pytest.raises(PyroCPAError, match="shape"):
        d.log_prob(torch.zeros(3, 5))
    with pytest.raises(PyroCPAError, match="infinite"):
        d.log_prob(torch.tensor([float("inf"), 0.0]))


def test_pyro_contract_expand_pickle_shapes():
    dec = _net([1, 4, 2], nn.ReLU)
    d = CPAMarginal(dec, 0.3)
    e = d.expand((3,))
    assert e.batch_shape == (3,)
    assert e.log_prob(torch.zeros(5, 3, 2)).shape == (5, 3)
    assert e.sample((4,)).shape == (4, 3, 2)
    d2 = pickle.loads(pickle.dumps(d))
    x = torch.randn(4, 2)
    torch.testing.assert_close(d2.log_prob(x), d.log_prob(x))
    post = d.posterior(x)
    post2 = pickle.loads(pickle.dumps(post))
    z = post.sample()
    torch.testing.assert_close(post2.log_prob(z), post.log_prob(z))


def _grid_reference_2d(decoder, x, sx, half_width=7.0, n=1201):
    """log p(x), posterior mean and covariance by a fine tensor-product Simpson rule over z in R^2."""
    g = torch.linspace(-half_width, half_width, n)
    w1 = torch.ones(n)
    w1[1:-1:2], w1[2:-1:2] = 4.0, 2.0
    w1 *= (g[1] - g[0]) / 3
    Z1, Z2 = torch.meshgrid(g, g, indexing="ij")
    z = torch.stack([Z1, Z2], -1).reshape(-1, 2)
    W = (w1[:, None] * w1[None, :]).reshape(-1)
    with torch.no_grad():
        out = decoder(z)
    D = out.shape[-1]
    log_joint = (-0.5 * ((x - out) ** 2).sum(-1) / sx ** 2 - D * math.log(sx * math.sqrt(2 * math.pi))
                 - 0.5 * (z ** 2).sum(-1) - math.log(2 * math.pi))
    lw = log_joint + W.log()
    lp = lw.logsumexp(0)
    p = (lw - lp).exp()
    mean = (p[:, None] * z).sum(0)
    cov = (p[:, None, None] * (z - mean)[:, :, None] * (z - mean)[:, None, :]).sum(0)
    return lp, mean, cov


@pytest.mark.parametrize("act", [nn.ReLU, Abs])
def test_s2_log_prob_and_posterior_moments_match_grid_quadrature(act):
    dec = _net([2, 6, 3], act, seed=11)
    sx = 0.4
    dist = CPAMarginal(dec, sx)
    for x in [torch.tensor([0.2, -0.1, 0.3]), torch.tensor([1.0, 0.5, -0.5])]:
        lp_ref, mean_ref, cov_ref = _grid_reference_2d(dec, x, sx)
        with torch.no_grad():
            lp = dist.log_prob(x)
            post = dist.posterior(x)
        assert abs(lp - lp_ref) < 1e-7
        torch.testing.assert_close(post.mean, mean_ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(post.covariance_matrix, cov_ref, atol=1e-6, rtol=0)


def test_s2_posterior_samples_region_frequencies_and_moments():
    from scipy.stats import chisquare

    dec = _net([2, 5, 5, 2], Abs, seed=12)
    dist = CPAMarginal(dec, 0.3)
    n = 20000
    with torch.no_grad():
        post = dist.posterior(torch.tensor([0.4, -0.3]))
        s = post.sample((n,))
    # which region each draw falls in must follow the mixture weights (chi-square test)
    counts = torch.bincount(dist.regions.locate(s), minlength=len(dist.regions)).double()
    w = post.mixture_log_weights.exp()
    keep = w * n > 5
    expected = torch.cat([w[keep] * n, (w[~keep].sum() * n).reshape(1)])
    observed = torch.cat([counts[keep], counts[~keep].sum().reshape(1)])
    expected = expected * observed.sum() / expected.sum()
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
    se = post.variance.sqrt() / math.sqrt(n)
    assert ((s.mean(0) - post.mean).abs() < 5 * se).all()
    torch.testing.assert_close(torch.cov(s.T), post.covariance_matrix, atol=0.05, rtol=0.05)


def _qmc_log_evidence(decoder, x, sx, S, n=2 ** 18, seed=0):
    """Reference: scrambled-Sobol' estimate of log ∫ p(x|z) p(z) dz (z from the prior) with a standard error."""
    from scipy.stats import norm, qmc

    reps = []
    for r in range(8):
        u = qmc.Sobol(S, scramble=True, seed=seed + r).random(n // 8)
        z = torch.as_tensor(norm.ppf(u))
        with torch.no_grad():
            g = decoder(z)
        D = g.shape[-1]
        lw = -0.5 * ((x - g) ** 2).sum(-1) / sx ** 2 - D * math.log(sx * math.sqrt(2 * math.pi))
        reps.append((lw.logsumexp(0) - math.log(len(lw))).item())
    reps = torch.tensor(reps)
    p = reps.exp()
    return math.log(p.mean().item()), (p.std() / math.sqrt(len(p)) / p.mean()).item()


@pytest.mark.slow
def test_s3_log_prob_matches_qmc():
    dec = _net([3, 4, 2], nn.ReLU, seed=13)
    dist = CPAMarginal(dec, 0.8)
    x = torch.tensor([0.3, -0.2])
    lp = dist.log_prob(x).item()
    ref, rel_se = _qmc_log_evidence(dec, x, 0.8, 3)
    assert abs(lp - ref) < 4 * rel_se + 1e-6


def test_s4_log_prob_within_reported_error_of_qmc():
    dec = _net([4, 3, 2], nn.ReLU, seed=14)
    dist = CPAMarginal(dec, 0.8)
    x = torch.tensor([0.3, -0.2])
    lp = dist.log_prob(x).item()
    se = dist.log_prob_stderr.item()
    assert 0 < se < 0.05
    ref, rel_se = _qmc_log_evidence(dec, x, 0.8, 4)
    assert abs(lp - ref) < 4 * math.hypot(se, rel_se)


def test_s2_gradients_are_finite_and_match_finite_differences():
    dec = _net([2, 6, 6, 3], nn.ReLU, seed=15)
    x = torch.randn(8, 3)
    sx = torch.tensor(0.4, requires_grad=True)
    lp = CPAMarginal(dec, sx).log_prob(x).sum()
    params = [dec[0].weight, dec[2].bias, dec[4].weight, sx]
    grads = torch.autograd.grad(lp, params)
    assert all(torch.isfinite(g).all() for g in grads)
    eps = 1e-6
    for p, g in zip(params, grads):
        flat = p.data.view(-1)
        for i in range(min(4, flat.numel())):
            old = flat[i].item()
            flat[i] = old + eps
            up = CPAMarginal(dec, sx.detach()).log_prob(x).sum().item()
            flat[i] = old - eps
            down = CPAMarginal(dec, sx.detach()).log_prob(x).sum().item()
            flat[i] = old
            fd = (up - down) / (2 * eps)
            assert abs(fd - g.view(-1)[i].item()) < 1e-5 * max(1, abs(fd))


@pytest.mark.parametrize("factor", [1e100, math.inf])
def test_unrepresentable_decoder_raises_a_clear_error_not_nan(factor):
    """Weights x1e100 overflow the posterior precision AᵀΣx⁻¹A: log_prob, the E-step and the posterior must say
    so (and how to fix it), never return NaN or fail inside a Cholesky."""
    from pyro_cpa.datasets import noisy_circle
    from pyro_cpa.demo.circle import make_decoder
    from pyro_cpa.infer.estep import e_step
    decoder = make_decoder(0)
    with torch.no_grad():
        for p in decoder.parameters():
            p.mul_(factor)
    dist = CPAMarginal(decoder, 0.5)
    x = noisy_circle(20)
    fix = "Rescale the data and the decoder" if math.isfinite(factor) else "NaN or infinite weights"
    for call in (lambda: dist.log_prob(x), lambda: e_step(dist, x), lambda: dist.posterior(x[0])):
        with pytest.raises(PyroCPAError, match=fix):
            call()
