r"""Exact E-step of the CPA latent-variable model, aggregated into per-region sufficient statistics.

Model: z ~ N(0, diag σz²), x | z ~ N(g(z), diag σx²), g continuous piecewise affine with linear regions
ω (g(z) = A_ω z + b_ω on ω). For every datum x_n and region ω the exact posterior gives (see
:meth:`pyro_cpa.distributions.CPAMarginal._pairs`)

    e0_nω = p(z ∈ ω | x_n) = softmax_ω(log κ_ω(x_n) + log P_ω(x_n)),
    m_nω  = E[z | z ∈ ω, x_n],      C_nω = Cov[z | z ∈ ω, x_n].

With the augmented latent z̃ = [z; 1] the M-step only needs the data-aggregated statistics

    Z_ω = Σ_n E[1_ω z̃ z̃ᵀ | x_n] = Σ_n e0_nω [[C_nω + m_nω m_nωᵀ, m_nω], [m_nωᵀ, 1]]     (R, S+1, S+1)
    X_ω = Σ_n x_n E[1_ω z̃ | x_n]ᵀ = Σ_n e0_nω x_n [m_nω; 1]ᵀ                          (R, D, S+1)
    q_ω = Σ_n e0_nω x_n ⊙ x_n                                                          (R, D)

so that, for any per-region affine map Ã_ω = [A_ω b_ω] (D, S+1), the expected squared residual of
coordinate d is Σ_n Σ_ω E[1_ω (x_nd − ã_ωdᵀ z̃)² | x_n] = Σ_ω q_ωd − 2 ã_ωdᵀ X_ω[d] + ã_ωdᵀ Z_ω ã_ωd.
The exact log-likelihood log p(x_n) = logsumexp_ω(log κ + log P) comes for free.

Everything is computed in log space up to the final weights e0, batched over (datum, region) pairs,
chunked over the data, and without gradient (the statistics are constants of the M-step).

**Weights** (:class:`~pyro_cpa.infer.structure.DataWeights`: scale × mask of the observed site s_x,n and of
the latent site s_z,n). The objective is Σ_n L_n with L_n = s_z,n log ∫ p(z) p(x_n | z)^{t_n} dz,
t_n = s_x,n/s_z,n (see :mod:`pyro_cpa.infer.structure`). Jensen's bound L_n ≥ s_z,n E_q[log p(z) +
t_n log p(x_n | z; θ) − log q] is tight at q = the tempered posterior ∝ p(z) p(x_n | z)^{t_n}, which is the
exact posterior of the model with σx/√t_n. So the E-step runs under σx/√t_n and every statistic above is
multiplied by s_x,n (the likelihood part of the bound); data with s_x,n = 0 are left out. ``num_data`` is
then Σ_n s_x,n (the weighted count the σx update divides by).

**Missing coordinates** (NaN in x; EM for incomplete data, Dempster, Laird & Rubin 1977). The complete data
are (z, x_mis, x_obs): the E-step takes the expectation over z | x_obs (exact: the missing rows of A_ω, b_ω
are marginalised) and over x_mis | z, which on region ω is N(A_ω,mis z + b_ω,mis, σx,mis²) under the
*old* parameters (untempered: the tempering multiplies log p(x_obs | z), whose own EM bound is tight at
p(x_mis | z)). Hence, for a missing coordinate d of datum n,

    E[1_ω x_nd z̃ᵀ | x_obs] = ã_ωdᵀ E[1_ω z̃ z̃ᵀ | x_obs],
    E[1_ω x_nd² | x_obs]   = e0_nω σx_d² + ã_ωdᵀ E[1_ω z̃ z̃ᵀ | x_obs] ã_ωd,     ã_ωd = [A_ω b_ω]_d,

which enter X_ω and q_ω; the M-step is unchanged. Data with no observed coordinate are left out (their
log-likelihood is 0 for every θ).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._threads import with_library_threads
from ..errors import PyroCPAError
from ..integrate import PolytopeMoments
from ..integrate.univariate import _const


@dataclass
class EStepStats:
    """Per-region sufficient statistics of the exact E-step (see module docstring).

    Attributes:
        Z: (R, S+1, S+1) Σ_n s_x,n E[1_ω z̃ z̃ᵀ | x_n].
        X: (R, D, S+1) Σ_n s_x,n E[1_ω x_n z̃ᵀ | x_n] (missing coordinates by their conditional moments).
        q: (R, D) Σ_n s_x,n E[1_ω x_n² | x_n].
        loglik: (N,) the exact evidence terms L_n under the parameters of the E-step (log p(x_n) when
            unweighted; 0 for data left out).
        patterns: the activation patterns (one (R, n_l) bool tensor per activation layer) of the regions.
        num_data: Σ_n s_x,n over the data used (N when unweighted and fully observed).
        loglik_sum, loglik_abs_sum: Σ_n L_n and Σ_n |L_n| over *all* data (every rank's, when the E-step is
            distributed, :mod:`pyro_cpa.infer.distributed`), summed exactly; None: use ``loglik`` (this
            process's data only).
        log_bound: local partition only (:func:`local_e_step_stats`): (N,) log of the certified upper bound of the
            fraction of each datum's evidence that the statistics leave out (−inf for data left out); None for
            the global partition.
    """

    Z: torch.Tensor
    X: torch.Tensor
    q: torch.Tensor
    loglik: torch.Tensor
    patterns: list
    num_data: float
    loglik_sum: float | None = None
    loglik_abs_sum: float | None = None
    log_bound: torch.Tensor | None = None

    @property
    def total_loglik(self) -> float:
        """Σ_n L_n over all data (``loglik_sum`` when set, else the sum of ``loglik``)."""
        return float(self.loglik.sum()) if self.loglik_sum is None else self.loglik_sum

    @property
    def total_abs_loglik(self) -> float:
        """Σ_n |L_n| over all data (the rounding scale of the NLL, :mod:`pyro_cpa.infer.em_engine`)."""
        return float(self.loglik.abs().sum()) if self.loglik_abs_sum is None else self.loglik_abs_sum

    @property
    def region_weights(self) -> torch.Tensor:
        """(R,) Σ_n s_x,n e0_nω, the expected (weighted) number of data generated from each region."""
        return self.Z[:, -1, -1]

    @property
    def num_regions(self) -> int:
        return int(self.Z.shape[0])


def tempered_marginal(marginal, t: float):
    """The CPA marginal with σx/√t (same decoder, σz, options and partition): p(x; σx/√t)."""
    from ..distributions import CPAMarginal

    local = marginal.partition == "local"
    return CPAMarginal(marginal.decoder, marginal.obs_scale / math.sqrt(t), marginal.prior_scale,
                       max_regions=marginal.max_regions, prune_tol=marginal.prune_tol, chunk_size=marginal.chunk_size,
                       dtype=marginal.dtype, mc_kwargs=marginal.mc_kwargs, regions=None if local else marginal.regions,
                       partition=marginal.partition, local_tol=marginal.local_tol)


def _log_temper_constant(marginal, x: torch.Tensor, t: float) -> torch.Tensor:
    """log C(t) = Σ_{d observed} [½(1 − t) log(2π σx_d²) − ½ log t] per datum of x (n, D)."""
    obs_var = marginal._variances()[0]
    per = 0.5 * (1.0 - t) * (math.log(2 * math.pi) + obs_var.log()) - 0.5 * math.log(t)
    return (per * (~torch.isnan(x)).to(per.dtype)).sum(-1)


def _groups(weights, n: int, device):
    """[(t, indices)] of the active data grouped by their temper t_n ([(1, None)], all data, when unweighted)."""
    if weights is None:
        return [(1.0, None)]
    if weights.obs.shape[0] != n:
        raise PyroCPAError(f"weights are given for {weights.obs.shape[0]} data but x has {n}")
    active = weights.active.to(device)
    temper = weights.temper.to(device)
    # Grouping by the exact value of t only decides which data share one tempered marginal; each group's
    # result is exact whatever the grouping.
    return [(float(t), torch.nonzero(active & (temper == t)).squeeze(-1))
            for t in torch.unique(temper[active]).tolist()]


@with_library_threads
def weighted_log_prob(marginal, x: torch.Tensor, weights=None, return_stderr: bool = False):
    r"""Exact evidence terms L_n = s_z,n [log C(t_n) + log p(x_n; σx/√t_n)] (0 where s_x,n = 0), shape (N,).

    ``x`` is flattened to (N, D); NaN entries are missing (marginalised exactly). Without ``weights`` this is
    ``marginal.log_prob(x)``. Differentiable in the marginal's parameters. Exactness as
    :class:`~pyro_cpa.distributions.CPAMarginal` (machine precision for S <= 2); with ``return_stderr`` the
    Monte-Carlo standard errors (S >= 4; 0 otherwise) are returned too: ``(L, stderr)``.
    """
    x = marginal._check_x(x)
    flat = x.reshape(-1, x.shape[-1])
    if weights is None:
        lp = marginal.log_prob(flat)
        return (lp, marginal.log_prob_stderr.reshape(-1)) if return_stderr else lp
    out = flat.new_zeros(flat.shape[0])
    err = flat.new_zeros(flat.shape[0])
    for t, idx in _groups(weights, flat.shape[0], flat.device):
        xg = flat[idx]
        mg = tempered_marginal(marginal, t)
        lp = mg.log_prob(xg) + _log_temper_constant(marginal, xg, t)
        s_z = weights.latent.to(out)[idx]
        out = out.index_put((idx,), s_z * lp)
        err = err.index_put((idx,), s_z * mg.log_prob_stderr.reshape(-1).to(err))
    return (out, err) if return_stderr else out


def _s1_chunk_stats(regions, xc, wc):
    """(Z (R, 2, 2), X (R, D, 2), q (R, D), log p (n,)) of fully observed S = 1 data (see :func:`e_step`);
    ``wc`` (n,) the weights s_x,n, or None for weights 1. The pairs by the fused kernel
    (:func:`~pyro_cpa.distributions.s1_kernel.s1_pairs`: every pair, no pruning).

    e0_nω = exp(t_nω − max_ω t)/Σ_ω exp(t_nω − max_ω t) with t = log κ + log P, and log p = max + log Σ (terms more
    than 700 nats below the largest are 0: e^-700 relative, :func:`~pyro_cpa.distributions.s1_kernel.s1_logsumexp`,
    the reduction of ``CPAMarginal.log_prob`` for S = 1 too).
    With e = s_x,n e0_nω the sums Σ_n e (m² + C), Σ_n e m, Σ_n e (Z), Σ_n x_n e m, Σ_n x_n e (X) and Σ_n x_n² e (q)
    are one product [x, x², 1]ᵀ [e (m² + C), e m, e] of (2D + 1, n) and (n, 3R) matrices.

    The per-pair work runs under ``torch.inference_mode`` (no autograd bookkeeping per operation: the statistics
    are constants of the M-step; measured ~12 % of the kernel's time on the circle); the returned tensors are formed
    outside it (the product, and a copy of log p), so they are ordinary tensors (in-place updates, autograd)."""
    xx, E, lp = _s1_pair_weights(regions, xc, wc)
    return (*_s1_sums(xx, E, xc.shape[1]), lp.clone())


def _s1_pair_weights(regions, xc, wc):
    """[x; x²; 1] (2D + 1, n), E = [e (m² + C), e m, e] (n, 3R) and log p (n,) of :func:`_s1_chunk_stats`
    (inference tensors: per pair, elementwise, and per datum; no sum over data)."""
    from ..distributions.s1_kernel import s1_logsumexp, s1_pairs

    n, D = xc.shape
    with torch.inference_mode():
        xT = xc.T
        xx = torch.cat([xT, xT.square(), _const(1.0, xc).expand(1, n)])      # [x; x²; 1] (2D + 1, n)
        terms, m, C = s1_pairs(regions, xx[:D])
        lp, ew, total = s1_logsumexp(terms)
        ew = ew / total                                            # e0_nω
        if wc is not None:
            ew = ew * wc.unsqueeze(-1)                             # s_x,n e0_nω
        ewm = ew * m
        E = torch.cat([torch.addcmul(ewm * m, ew, C), ewm, ew], 1)
    return xx, E, lp


def _s1_sums(xx, E, D: int):
    """(Z, X, q) of :func:`_s1_chunk_stats` from its :func:`_s1_pair_weights` (the one product over data)."""
    R = E.shape[1] // 3
    sums = xx @ E      # (2D + 1, 3R): rows x_d, x_d², 1; columns Σ e (m² + C), Σ e m, Σ e of each region
    s0, s1 = sums.stride()
    # views by their strides (one operation each): Z_ω = [[S2, S1], [S1, S0]] of the last row (S1 read twice, so
    # copied), X_ω = Σ x e [m, 1] and q_ω = Σ x² e
    Zc = sums.as_strided((R, 2, 2), (s1, R * s1, R * s1), 2 * D * s0).contiguous()
    Xc = sums.as_strided((R, D, 2), (s1, s0, R * s1), R * s1)
    qc = sums.as_strided((R, D), (s1, s0), D * s0 + 2 * R * s1)
    return Zc, Xc, qc


GROUP_PAIRS = 2 ** 15
"""Pairs per call of the S = 1 pair kernel in :func:`s1_block_stats`: blocks are grouped up to this many pairs
(at least one block per group). Grouping pays where a block's pairs are few (per-operation cost); beyond, larger
temporaries fall out of cache. Measured (block E-step of the EM engine, blocks of 256, grouped vs one call per
block): circle R = 16 1.34×, R = 20 1.1–1.27×, R = 33–58 1.2–1.3× at this cap; a cap of 2^16 was 0.85–0.89× for
R = 33–75, and grouping 2 blocks of R = 181 or 265 0.6–0.67× (no cap)."""


def s1_block_stats(marginal, x: torch.Tensor, block: int):
    """The E-step statistics of the consecutive blocks x[k·block:(k + 1)·block] of fully observed, unweighted
    S = 1 data, one block after the other as (Z, X, q, log p, number of data): bitwise those of
    ``e_step(marginal, block_data, chunk_size=block)`` for each block, with the per-pair kernel run on several
    blocks at once (its per-call cost paid once per group of blocks). Each pair's values depend on that pair alone
    and each datum's e0 on its own row (:func:`_s1_pair_weights`), and each block's sums are the same product of
    the same contiguous (2D + 1, n_b) and (n_b, 3R) matrices as in its own call. Groups hold whole blocks, at most
    :data:`GROUP_PAIRS` pairs and :func:`~pyro_cpa.distributions.s1_kernel.s1_rows` data (the kernel's memory
    bound).

    Returns None (the caller loops over :func:`e_step`) where this path does not apply: S ≠ 1, missing data, or a
    block larger than one kernel chunk (e_step would split it, and sum the parts)."""
    from ..distributions.s1_kernel import s1_rows, s1_setup

    if not _use_s1_kernel(marginal):
        return None
    x = marginal._check_x(x)
    flat = x.reshape(-1, x.shape[-1])
    N, D = flat.shape
    if N == 0 or bool(torch.isnan(flat).any()):
        return None
    s1_regions, R = s1_setup(marginal, marginal.regions)
    if s1_rows(R, D, block) < block:
        return None
    group = max(1, min(s1_rows(R, D, max(N, block)), GROUP_PAIRS // R) // block) * block

    def blocks():
        for g0 in range(0, N, group):
            yield from _s1_group_blocks(s1_regions, flat[g0:g0 + group], block)
    return blocks()


@with_library_threads
def _s1_group_blocks(s1_regions, xg: torch.Tensor, block: int) -> list:
    """The per-block results of :func:`s1_block_stats` for one group of data ``xg`` (one intra-op thread, as
    :func:`e_step`: the products' rounding must not depend on the caller's thread count)."""
    D = xg.shape[1]
    out = []
    with torch.no_grad():
        xx, E, lp = _s1_pair_weights(s1_regions, xg, None)
        for b0 in range(0, xx.shape[1], block):
            sl = slice(b0, b0 + block)
            Zc, Xc, qc = _s1_sums(xx[:, sl].contiguous(), E[sl], D)
            out.append((Zc, Xc, qc, lp[sl].clone(), float(E[sl].shape[0])))
    return out


def _use_s1_kernel(marginal) -> bool:
    """Whether :func:`e_step` takes the S = 1 kernel (:func:`_s1_chunk_stats`) for fully observed chunks."""
    return marginal.latent_dim == 1


def _chunk_stats(mg, xc, oc, wc, obs_var):
    """(Z, X, q, log p) of one chunk by the generic pair machinery (:meth:`CPAMarginal._pairs`, any S,
    missing coordinates); ``wc`` the weights s_x,n (None: 1)."""
    from ..distributions.chunked import chunk_rows, evaluate_chunk

    params = mg._params()
    A, b = params.A, params.b
    observed = None if bool(oc.all()) else oc
    rows = chunk_rows(A.shape[0], A.shape[1], params.H.shape[1], A.shape[2], mg.chunk_size)
    # the statistics sum E[z̃z̃ᵀ] = C + m mᵀ: the centred covariance quadrature buys nothing here
    res = [evaluate_chunk(params, xc[i:i + rows], None if observed is None else observed[i:i + rows], i,
                          prune_tol=mg.prune_tol, need_moments=True, mc_kwargs=mg.mc_kwargs, centred_covariance=False)
           for i in range(0, xc.shape[0], rows)]
    # (the pairs of CPAMarginal._pairs, without its copies: one pruning chunk is used as it is)
    cat = (lambda parts: parts[0]) if len(res) == 1 else torch.cat      # noqa: E731
    terms = cat([r.terms for r in res])
    mom = PolytopeMoments(None, cat([r.mom.mean for r in res]), cat([r.mom.covariance for r in res]), None)
    lp = terms.logsumexp(-1)
    e0 = (terms - lp.unsqueeze(-1)).exp()  # pruned pairs: exp(-inf) = 0
    live = torch.isfinite(terms)  # pruned pairs (log mass -inf by construction) carry no moments
    n, R, S = mom.mean.shape
    D, K = xc.shape[-1], S + 1
    # E[z̃ z̃ᵀ | x_n, ω] = m̃ m̃ᵀ + [[C, 0], [0, 0]], m̃ = (m, 1), as its S² + S + 1 distinct (n, R) planes P (one
    # stack: m_k m_l + C_kl row-major, then m̃); broadcast products and masks over trailing dims of size S, K, and the
    # (n, R, K, K) tensor itself, were several times slower. Zn_kl = P_idx[k,l] (the values of the (n, R, K, K)
    # version: the sum over n is one batched product either way)
    zero = torch.zeros((), dtype=terms.dtype, device=terms.device)
    m = [torch.where(live, mom.mean[..., k], zero) for k in range(S)]
    C = mom.covariance
    P = torch.stack([m[k] * m[l] + torch.where(live, C[..., k, l], zero) for k in range(S) for l in range(S)]
                    + m + [torch.ones_like(m[0])], -1)
    idx = torch.tensor([k * S + l if k < S and l < S else S * S + min(k, l) for k in range(K) for l in range(K)],
                       device=terms.device)
    mt = P[..., S * S:]  # (n, R, S+1): m̃
    ew = e0 if wc is None else e0 * wc.unsqueeze(-1)  # s_x,n e0_nω
    Zc = torch.einsum("nr,nrk->rk", ew, P).index_select(-1, idx).reshape(R, K, K)
    x0 = torch.where(oc, xc, torch.zeros_like(xc))
    Xc = (x0.T @ (ew.unsqueeze(-1) * mt).reshape(n, R * K)).reshape(D, R, K).transpose(0, 1)
    qc = ew.T @ x0.square()
    if not bool(oc.all()):
        mis = (~oc).to(xc.dtype)
        At = torch.cat([A, b.unsqueeze(-1)], -1)  # (R, D, S+1), the old parameters
        Zn = P.index_select(-1, idx).reshape(n, R, K, K)
        Y = (mis.T @ (ew[..., None, None] * Zn).reshape(n, R * K * K)).reshape(D, R, K, K)
        Y = Y.transpose(0, 1)  # (R, D, K, K): Σ_n s_x e0 mis_nd E[z̃ z̃ᵀ | x_n, ω]
        Xc = Xc + torch.einsum("rdk,rdkl->rdl", At, Y)
        qc = qc + (ew.T @ mis) * obs_var + torch.einsum("rdk,rdkl,rdl->rd", At, Y, At)
    return Zc, Xc, qc, lp


@with_library_threads
def e_step(marginal, x: torch.Tensor, chunk_size: int | None = None, weights=None) -> EStepStats:
    """Exact E-step statistics of the data ``x`` (N, D) (or (..., D), flattened) under ``marginal``.

    Args:
        marginal: a :class:`~pyro_cpa.distributions.CPAMarginal` (its decoder, σx, σz and partition).
        x: the data; NaN entries are missing coordinates (module docstring).
        chunk_size: data per batch (memory ∝ chunk_size · R · S²); the marginal's ``chunk_size`` by default.
        weights: optional :class:`~pyro_cpa.infer.structure.DataWeights` (module docstring).
    """
    from ..distributions.s1_kernel import s1_rows, s1_setup

    x = marginal._check_x(x)
    flat = x.reshape(-1, x.shape[-1])
    N, D = flat.shape
    if N == 0:
        raise PyroCPAError("e_step: x is empty")
    chunk = int(chunk_size or marginal.chunk_size)
    regions = marginal.regions
    patterns = [p.clone() for p in regions.patterns]
    nan = torch.isnan(flat)
    complete = not bool(nan.any())
    observed = None if complete else ~nan
    w_obs = None if weights is None else weights.obs.to(flat)
    Z = X = q = None
    parts = []          # log p of consecutive slices (unweighted, complete data)
    loglik = None
    num_data = 0.0
    with torch.no_grad():
        for t, idx in _groups(weights, N, flat.device):
            if idx is None and not complete:   # data with no observed coordinate have L_n = 0 for every θ: left out
                idx = torch.nonzero(observed.any(-1)).squeeze(-1)
            elif idx is not None and not complete:
                idx = idx[observed[idx].any(-1)]
            mg = tempered_marginal(marginal, t) if weights is not None else marginal
            s1 = _use_s1_kernel(mg)
            if s1:  # S = 1: every pair at once, a fixed number of tensor operations (s1_kernel.s1_pairs)
                s1_regions, R = s1_setup(mg, regions)
                rows = s1_rows(R, D, chunk)
            else:
                rows = chunk
            sliced = idx is None  # idx = 0..N−1: slices instead of gathers
            for start in range(0, N if sliced else idx.shape[0], rows):
                ic = slice(start, start + rows) if sliced else idx[start:start + rows]
                xc = flat if sliced and rows >= N else flat[ic]
                oc = None if complete else observed[ic]
                wc = None if w_obs is None else w_obs[ic]
                if s1 and (oc is None or bool(oc.all())):
                    Zc, Xc, qc, lp = _s1_chunk_stats(s1_regions, xc, wc)
                else:
                    oc = torch.ones_like(xc, dtype=torch.bool) if oc is None else oc
                    Zc, Xc, qc, lp = _chunk_stats(mg, xc, oc, wc, marginal._variances()[0])
                Z, X, q = (Zc, Xc, qc) if Z is None else (Z + Zc, X + Xc, q + qc)
                if weights is not None:
                    lp = weights.latent.to(flat)[ic] * (lp + _log_temper_constant(marginal, xc, t))
                if sliced:
                    parts.append(lp)
                else:
                    loglik = (flat.new_zeros(N) if loglik is None else loglik).index_put((ic,), lp)
                num_data += float(xc.shape[0]) if wc is None else float(wc.sum())
    if parts:
        loglik = parts[0] if len(parts) == 1 else torch.cat(parts)
    if Z is None:
        raise PyroCPAError("e_step: no datum carries weight (every observation is masked, zero-scaled or entirely "
                           "missing)")
    return EStepStats(Z=Z, X=X, q=q, loglik=loglik, patterns=patterns, num_data=num_data)


def _weight_groups(weights, n: int, device):
    """[(s_x, s_z, indices)] of the active data grouped by their weight pair (one group when unweighted)."""
    if weights is None:
        return [(1.0, 1.0, torch.arange(n, device=device))]
    if weights.obs.shape[0] != n:
        raise PyroCPAError(f"weights are given for {weights.obs.shape[0]} data but x has {n}")
    active = weights.active.to(device)
    pairs = torch.stack([weights.obs, weights.latent], -1).to(device=device, dtype=torch.float64)
    # Grouping by the exact weight values only decides which data share one local partition: each group's
    # statistics are exact whatever the grouping.
    keys, inv = torch.unique(pairs[active], dim=0, return_inverse=True)
    idx = torch.nonzero(active).squeeze(-1)
    return [(float(k[0]), float(k[1]), idx[inv == g]) for g, k in enumerate(keys)]


@with_library_threads
def local_e_step_stats(marginal, x: torch.Tensor, weights=None) -> EStepStats:
    r"""Exact E-step statistics of x (N, D) on the *local* partition of ``marginal`` (``partition="local"``).

    The statistics of :func:`e_step` (module docstring), summed over the regions that
    :func:`~pyro_cpa.geometry.local.local_e_step` finds near each datum's posterior mass (one call over all the
    data of a weight group: the region set is that of the call). Each datum's posterior is the exact posterior
    restricted to its integrated regions: the statistics and L_n differ from the global E-step's by at most the
    certified fraction exp(``log_bound``) <= exp(−``local_tol``) of the datum's mass (``stats.log_bound``), and
    L_n = s_z,n [log C(t_n) + log p_local(x_n; σx/√t_n)] is a lower bound of the exact L_n (for s_z,n > 0)
    within s_z,n log1p(exp(log_bound)).

    Weights: data are grouped by their pair (s_x,n, s_z,n); each group is one local E-step under σx/√t
    (t = s_x/s_z, the tempered posterior, module docstring) whose statistics are multiplied by s_x. Masks,
    plate-level scales and a one-site temper give one or two groups; per-datum scales that all differ cost one
    local partition per datum. The groups' regions are merged by activation pattern (sums of exact terms).
    Missing coordinates (NaN) are not supported by the local partition (clear error).
    """
    from ..geometry.local import local_e_step
    from .distributed import exact_sum

    x = marginal._check_x(x)
    flat = x.reshape(-1, x.shape[-1])
    N, D = flat.shape
    if N == 0:
        raise PyroCPAError("e_step: x is empty")
    if bool(torch.isnan(flat).any()):
        raise PyroCPAError("partition='local' does not support missing data (NaN entries of x) yet; use the global "
                           "partition (partition='global') for data with missing coordinates")
    obs_var, prior_var = marginal._variances()
    loglik = flat.new_zeros(N)
    log_bound = flat.new_full((N,), float("-inf"))
    parts, num_data = [], 0.0
    with torch.no_grad():
        for s_x, s_z, idx in _weight_groups(weights, N, flat.device):
            xg = flat[idx]
            t = s_x / s_z
            res = local_e_step(marginal.network, xg, obs_var / t, prior_var, marginal.local_tol,
                               prune_tol=marginal.prune_tol, dtype=marginal.dtype)
            st = res.stats
            lp = st.loglik if weights is None else s_z * (st.loglik + _log_temper_constant(marginal, xg, t))
            loglik = loglik.index_put((idx,), lp)
            log_bound = log_bound.index_put((idx,), res.log_bound)
            parts.append((s_x * st.Z, s_x * st.X, s_x * st.q, torch.cat(st.patterns, -1)))
            num_data += s_x * float(idx.numel())
    if not parts:
        raise PyroCPAError("e_step: no datum carries weight (every observation is masked or zero-scaled)")
    if len(parts) == 1:
        Z, X, q, codes = parts[0]
    else:   # one region per activation pattern: the groups' sums of the same region are added
        codes_all = torch.cat([p[3] for p in parts])
        codes, inv = torch.unique(codes_all.to(torch.uint8), dim=0, return_inverse=True)
        codes = codes.bool()
        R = codes.shape[0]
        Z, X, q = (torch.cat([p[i] for p in parts]).new_zeros((R,) + parts[0][i].shape[1:]).index_add_(
            0, inv, torch.cat([p[i] for p in parts])) for i in range(3))
    sizes = [p.shape[-1] for p in res.stats.patterns]
    patterns = list(codes.split(sizes, -1))
    return EStepStats(Z=Z, X=X, q=q, loglik=loglik, patterns=[p.clone() for p in patterns], num_data=num_data,
                      loglik_sum=float(exact_sum(loglik)), loglik_abs_sum=float(exact_sum(loglik.abs())),
                      log_bound=log_bound)
