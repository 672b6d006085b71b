"""The fused S = 1 exact log p (distributions.s1_kernel.s1_log_prob, CPAMarginal.log_prob without autograd):
against an mpmath reference (closed form at 50 digits), against the pruned generic path, its dispatch (autograd
and missing data stay on the generic path), and invariance to batch shape, chunking and threads (issue 12)."""
import math

import mpmath
import pytest
import torch
from torch import nn

from pyro_cpa import Abs
from pyro_cpa.distributions import CPAMarginal, chunked, cpa_marginal, s1_kernel
from pyro_cpa.nn import mlp

MPMATH_RTOL = 1e-14
"""Fused kernel vs the 50-digit reference, relative to max(1, |log p|) (log κ's quadratic form carries an absolute
rounding ~eps·|log κ|; log P is ~1e-15 relative, tests/integrate/test_univariate_tails.py)."""
GENERIC_RTOL = 1e-14
"""Fused kernel vs the generic pruned path (same maths, other operations; the generic path drops pairs below
e^-40 of the datum's mass, R·e^-40 ≈ 1e-16 relative here), relative to max(1, |log p|)."""


def _spy(monkeypatch):
    calls = []
    fused = cpa_marginal.s1_log_prob
    monkeypatch.setattr(cpa_marginal, "s1_log_prob", lambda *a: calls.append(1) or fused(*a))
    return calls


def _generic(dist, x):
    with torch.no_grad():
        return chunked.chunked_log_prob(dist._params(), x.to(dist.dtype), prune_tol=dist.prune_tol,
                                        chunk_size=dist.chunk_size, mc_kwargs=dist.mc_kwargs)[0]


def _intervals(dist):
    """(a (R, D), b (R, D), lo (R,), hi (R,)) of the regions, from the decoder's maps and constraints."""
    A, b, H, c = dist._region_params()
    h = H[..., 0]
    real = torch.isfinite(c)
    ratio = torch.where(real, c / torch.where(real, h, torch.ones_like(h)), torch.zeros_like(c))
    hi = torch.where(real & (h > 0), ratio, torch.full_like(c, math.inf)).amin(-1)
    lo = torch.where(real & (h < 0), ratio, torch.full_like(c, -math.inf)).amax(-1)
    return A[..., 0], b, lo, hi


def _mpmath_log_prob(dist, x):
    """log p(x) = log Σ_ω ∫_{lo_ω}^{hi_ω} N(z; 0, σz²) Π_d N(x_d; a_ωd z + b_ωd, σx²) dz at 50 digits (√(2π) s from
    the Gaussian integral cancels the prior's 1/√(2π)): the
    exponent completed to a square in mpmath (no cancellation at that precision) and the Gaussian interval mass
    by mpmath's erfc."""
    a, b, lo, hi = (t.tolist() for t in _intervals(dist))
    sx2 = float(dist.obs_scale) ** 2
    sz2 = float(dist.prior_scale) ** 2
    with mpmath.workdps(50):
        total = mpmath.mpf(0)
        logs = []
        for r in range(len(lo)):
            if not lo[r] < hi[r]:
                continue
            res = [mpmath.mpf(xd) - mpmath.mpf(bd) for xd, bd in zip(x.tolist(), b[r])]
            a2 = 1 / mpmath.mpf(sz2) + sum(mpmath.mpf(ad) ** 2 for ad in a[r]) / sx2
            a1 = sum(mpmath.mpf(ad) * rd for ad, rd in zip(a[r], res)) / sx2
            a0 = sum(rd * rd for rd in res) / sx2
            mu, s = a1 / a2, 1 / mpmath.sqrt(a2)
            al = (mpmath.mpf(lo[r]) - mu) / s if math.isfinite(lo[r]) else -mpmath.inf
            be = (mpmath.mpf(hi[r]) - mu) / s if math.isfinite(hi[r]) else mpmath.inf
            if al > 0:    # both in the upper tail: the difference of upper tails
                mass = (mpmath.erfc(al / mpmath.sqrt(2)) - mpmath.erfc(be / mpmath.sqrt(2))) / 2
            else:
                mass = (mpmath.erfc(-be / mpmath.sqrt(2)) - mpmath.erfc(-al / mpmath.sqrt(2))) / 2
            D = len(res)
            logs.append(-(a0 - a1 * a1 / a2) / 2 + mpmath.log(s) - mpmath.log(sz2) / 2
                        - D * mpmath.log(2 * mpmath.pi * sx2) / 2 + mpmath.log(mass))
        top = max(logs)
        total = sum(mpmath.exp(t - top) for t in logs)
        return float(top + mpmath.log(total))


def _cases():
    relu = mlp([1, 8, 8, 3], nn.ReLU, seed=1)
    leaky = mlp([1, 6, 6, 2], lambda: nn.LeakyReLU(-0.4), seed=2)
    absn = mlp([1, 5, 5, 4], Abs, seed=3)
    out = []
    for dec, sx in ((relu, 0.3), (leaky, 0.05), (absn, 0.2)):
        dist = CPAMarginal(dec, sx, 1.3)
        with torch.no_grad():
            near = dist.sample((4,)).to(torch.float64)
        D = near.shape[1]
        far = torch.stack([torch.full((D,), 30.0), torch.linspace(-25.0, 20.0, D)])   # log p ~ -1e4 and beyond
        out.append((dist, torch.cat([near, far])))
    return out


@pytest.mark.parametrize("case", [0, 1, 2])
def test_fused_log_prob_against_mpmath_and_generic_path(monkeypatch, case):
    dist, x = _cases()[case]
    calls = _spy(monkeypatch)
    with torch.no_grad():
        lp = dist.log_prob(x)
    assert calls, "the fused S = 1 kernel was not used"
    assert float(lp.min()) < -1e3   # the far-out data are in the test
    ref = torch.tensor([_mpmath_log_prob(dist, xn) for xn in x], dtype=torch.float64)
    scale = ref.abs().clamp(min=1.0)
    assert float(((lp - ref).abs() / scale).max()) <= MPMATH_RTOL
    assert float(((lp - _generic(dist, x)).abs() / scale).max()) <= GENERIC_RTOL


def test_autograd_and_missing_data_take_the_generic_path(monkeypatch):
    dist, x = _cases()[0]
    calls = _spy(monkeypatch)
    lp = dist.log_prob(x)                       # grad mode, the decoder's weights require grad
    assert lp.requires_grad and not calls
    lp.sum().backward()
    assert all(p.grad is not None for p in dist.decoder.parameters())
    with torch.no_grad():
        fused = dist.log_prob(x)
    assert len(calls) == 1
    assert float(((fused - lp.detach()).abs() / lp.detach().abs().clamp(min=1.0)).max()) <= GENERIC_RTOL
    xm = x.clone()
    xm[1, 0] = float("nan")
    with torch.no_grad():
        lpm = dist.log_prob(xm)
    assert len(calls) == 1, "data with missing entries must take the generic path"
    assert torch.equal(lpm, _generic(dist, xm))
    x_grad = x.clone().requires_grad_(True)
    for p in dist.decoder.parameters():
        p.requires_grad_(False)
    dist.log_prob(x_grad).sum().backward()      # the data require grad: generic path, gradient in x
    assert len(calls) == 1 and x_grad.grad is not None
    dist.log_prob(x)                            # nothing requires grad: the fused kernel, even in grad mode
    assert len(calls) == 2


def test_fused_log_prob_invariant_to_batch_shape_chunking_and_threads():
    dist, _ = _cases()[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64) * 3
    with torch.no_grad():
        flat = dist.log_prob(x)
        assert torch.equal(dist.log_prob(x.reshape(5, 12, 3)), flat.reshape(5, 12))
        assert torch.equal(torch.cat([dist.log_prob(x[:7]), dist.log_prob(x[7:])]), flat)
        small = CPAMarginal(dist.decoder, dist.obs_scale, dist.prior_scale, chunk_size=7)
        assert torch.equal(small.log_prob(x), flat)
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            two = dist.log_prob(x)
        finally:
            torch.set_num_threads(before)
        assert torch.equal(two, flat)


def test_fused_log_prob_float32_model(monkeypatch):
    dec = mlp([1, 8, 8, 3], nn.ReLU, seed=1, dtype=torch.float32)
    dist = CPAMarginal(dec, 0.3)
    x = torch.randn(20, 3, dtype=torch.float32) * 2
    calls = _spy(monkeypatch)
    with torch.no_grad():
        lp = dist.log_prob(x)
    assert calls and lp.dtype == torch.float32
    ref = _generic(dist, x)                     # float64 computation, as the fused path
    assert torch.equal(lp, ref.to(torch.float32)) or float((lp.double() - ref).abs().max()) <= \
        GENERIC_RTOL * float(ref.abs().max()) + float(torch.finfo(torch.float32).eps) * float(ref.abs().max())


def test_fused_log_prob_agrees_with_the_e_step_loglik():
    from pyro_cpa.infer.estep import e_step

    dist, x = _cases()[1]
    with torch.no_grad():
        lp = dist.log_prob(x)
    st = e_step(dist, x)
    assert float(((lp - st.loglik).abs() / lp.abs().clamp(min=1.0)).max()) <= GENERIC_RTOL


def test_fused_kernels_run_in_inference_mode_and_return_ordinary_tensors(monkeypatch):
    """The per-pair work of the fused kernels runs under torch.inference_mode (no autograd bookkeeping per
    operation), yet what they return, and the tables and constants they cache on the way, are ordinary tensors:
    in-place updates, and autograd through interval_stats afterwards, work."""
    from pyro_cpa.infer.estep import e_step
    from pyro_cpa.integrate import univariate

    for name in ("_CONST_CACHE", "_TAIL_CACHE", "_GL_CACHE", "_ARANGE"):   # rebuilt inside the kernels below
        monkeypatch.setattr(univariate, name, {})
    modes = []
    for name in ("interval_stats", "interval_log_mass"):
        fn = getattr(s1_kernel, name)
        monkeypatch.setattr(s1_kernel, name, lambda *a, _fn=fn: modes.append(torch.is_inference_mode_enabled())
                            or _fn(*a))
    dist, x = _cases()[1]
    st = e_step(dist, x)
    with torch.no_grad():
        lp = dist.log_prob(x)
    assert modes == [True, True]
    for t in (st.Z, st.X, st.q, st.loglik, lp):
        assert not t.is_inference()
    st.Z.add_(1.0)
    lp.mul_(2.0)
    cached = [t for cache in (univariate._CONST_CACHE, univariate._TAIL_CACHE, univariate._GL_CACHE,
                              univariate._ARANGE) for v in cache.values()
              for t in (v if isinstance(v, tuple) else (v,))]
    assert cached and not any(t.is_inference() for t in cached)
    a = torch.tensor([-40.0, 0.3, 2.0, 50.0], requires_grad=True)
    b = torch.tensor([-39.0, 0.5, float("inf"), 50.5], requires_grad=True)
    lp_, m_, v_ = univariate.interval_stats(a, b)           # the cached tables, saved for the backward
    (lp_.sum() + m_.sum() + v_.sum()).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
