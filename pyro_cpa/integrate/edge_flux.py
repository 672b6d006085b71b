r"""Edge integrals of the S = 2 flux formula with per-piece node counts (issue 12, "S=2 kernel").

    I(h, p, q) = ∫_p^q e^{−(t² − p²)/2} h/(h² + t²) dt   (h > 0, 0 <= p < q <= inf),

the relative edge integral of :mod:`pyro_cpa.integrate.bivariate` (D = e^{−(h² + p²)/2} I / 2π). With
z = (t² − p²)/2 it is I = ∫_0^{z_q} e^{−z} g(z) dz, g(z) = h / ((h² + p² + 2z) sqrt(p² + 2z)), z_q = (q² − p²)/2.
g is decreasing, so the part of I beyond z_k is at most min(1, 1/(e^{z_k} − 1)) of I (I >= ∫_0^{z_k}); every rule
below is sized to a truncation error of at most ``tol`` (default 1e-17) relative to I, i.e. a part starting
at z_k gets the relative tolerance τ(z_k) = tol max(1, e^{z_k} − 1) of its own.

**Gauss–Laguerre tail.** From z_0 = max(0, (T² − p²)/2) (T² = ``lag_t2``: the tail starts where
t0² = p² + 2 z_0 >= T²) to infinity,

    ∫_{z_0}^∞ e^{−z} g(z) dz = e^{−z_0} Σ_i w_i g(z_0 + s_i)   (Gauss–Laguerre nodes s_i, weights w_i),

where g's only singularities (z = −p²/2, a branch point; z = −(h² + p²)/2, a pole) lie at distance >= t0²/2
to the left of z_0: a few nodes suffice far out. A finite edge (z_q < ``z_max`` = 45) subtracts the tail beyond
q, e^{−z_q} Σ_i w_i g_q(s_i); this is used only where z_q − z_0 >= ``lag_min_dz`` = 2 (the difference cancels by
at most 1/(1 − e^{−2}) = 1.16, so both tails get τ/1.16); beyond z_max the tail is a relative e^{−45} and is
dropped. The node count is read from ``LAG_NODES`` (measured against mpmath, worst case over h, see there).

**Gauss–Legendre pieces** in t cover [p, t(z_0)] (or the whole edge where no Laguerre tail is used, which
then ends before z = T²/2 + 2): piece k is [sqrt(p² + k²), sqrt(p² + (k + 1)²)] ∩ [p, top], i.e. z in
[k²/2, (k + 1)²/2] (the Gaussian factor falls by a bounded amount per piece; the last class ends at T²/2 + 2),
computed as offsets from p (a − p = k²/(sqrt(p² + k²) + p), bitwise shared by adjacent pieces, so that t − p
keeps full relative precision far out). Piece k, [a, b] (half-length ℓ, centre c), needs the smallest n that
the Bernstein-ellipse bound certifies (Trefethen, ATAP Thm 19.3; the n-point rule on [−1, 1] errs by at
most (64/15) M ρ^{2−2n}/(ρ² − 1) for |f| <= M on the ellipse E_ρ, as |a_k| <= 2Mρ^{−k} and only even
k >= 2n count):

    relative error of the piece <= (32/15) e^{G(ρ)} (2α_L/(α_L − α))² ρ^{2−2n}/(ρ² − 1) <= τ(z_k),

α = (ρ + 1/ρ)/2 < α_L = (sqrt(h² + a²) + sqrt(h² + b²))/(2ℓ) (the ellipse through the Lorentzian's poles ±ih;
|t ∓ ih| >= ℓ(α_L − α) on E_ρ), G(ρ) = (b² − min_{E_ρ} Re t²)/2 the Gaussian factor's growth relative to its
value at b, the piece at least 2ℓ f(b). :func:`_gl_table` evaluates the bound once per (piece class k, bin of
p, bin of α_L): G is maximised over the p bin, α_L taken at its bin's lower end, the bound minimised over ρ.
A piece cut short (at q or at z_0) lies inside its class's ellipse, so the class's G bounds it too.
Every piece is integrated with ``gl_levels[0]`` = 10 nodes in one dense batch; the few whose α_L is below the
threshold where 10 suffice (:func:`_thresholds`) are redone with their certified count rounded up to the next
level.

**Singularity subtraction** of the first piece [p, b], b = min(q, sqrt(p² + 1)), where h² + p² <= ``sub_r2`` = 2
(the poles are close): with w = (t² + h²)/2 and E(w) = (1 − e^{−w})/w (entire, |E| <= max(1, e^{−Re w})),

    e^{−(h² + p²)/2} ∫_p^b e^{−(t² − p²)/2} h/(h² + t²) dt = atan((b − p) h/(h² + bp)) − (h/2) ∫_p^b E(w) dt;

the remainder's relative error is at most (16/15) 3 e^{1.5} e^{ℓ²β²/2} ρ^{2−2n}/(ρ² − 1) (β = (ρ − 1/ρ)/2, since
Re t² >= −ℓ²β² on E_ρ; with the default first cut z = 0.5), tabulated by the half-length ℓ (:func:`_sub_table`;
7 nodes for all, 10 or 12 where the table asks); the subtraction cancels by at most e^{1.5}.

Counts are rounded up to a few levels (``*_levels``): a Python loop over levels, never over edges. Every
operation is elementwise in a fixed order (sqrt, exp, expm1, log, atan, table look-ups; no pow, no reductions
across edges except the final per-edge sum in piece order), so each value depends on its own (h, p, q) only.
Truncation errors are certified by the bounds (Legendre) or measured (Laguerre); rounding adds ~1e-16. Audited
against mpmath: tests/integrate/test_edge_flux.py. No gradient is needed (the mass's gradient is analytic).
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["log_edge_flux", "DEFAULT_EDGE_FLUX_TOL", "DEFAULT_LAG_T2",
           "DEFAULT_LAG_MIN_DZ", "DEFAULT_EDGE_Z_MAX", "DEFAULT_EDGE_SUB_R2", "LAG_NODES", "LAG_T2_GRID",
           "LAG_LOG_TOL"]

DEFAULT_EDGE_FLUX_TOL = 1e-17    # truncation error of every rule, relative to I (rounding is ~1e-16)
DEFAULT_LAG_T2 = 24.0            # Laguerre tails start where t² = p² + 2z >= this
DEFAULT_LAG_MIN_DZ = 2.0         # a finite tail [z0, zq] by a Laguerre difference only if zq − z0 >= this
DEFAULT_EDGE_Z_MAX = 45.0        # the tail beyond z = 45 (relative e^-45) is dropped
DEFAULT_EDGE_SUB_R2 = 2.0        # first piece singularity-subtracted where h² + p² <= this
DEFAULT_GL_LEVELS = (10, 13, 16, 40)   # every item at the first level, then again at the next for those needing more
DEFAULT_SUB_LEVELS = (7, 10, 12)
DEFAULT_LAG_LEVELS = (10, 17, 22)
_MAX_NODES = 40
_ALPHA_BINS_PER_E = 8            # Legendre table: bins of log α_L of width 1/8 ...
_ALPHA_BINS = 64                 # ... up to α_L = e^8 (beyond, the Gaussian factor alone sets the count)
_P_BIN = 0.25                    # Legendre table: bins of p of width 1/4 ...
_P_BINS = 33                     # ... the last one p >= 8 (to p = 1e4, beyond which G no longer grows)
_ELL_BINS_PER_E = 4              # subtraction table: bins of −log ℓ of width 1/4
_ELL_BINS = 48
_DIV_TINY = 1e-300

# Gauss–Laguerre node counts: LAG_NODES[i][j] nodes give relative error < exp(LAG_LOG_TOL[j]) for any
# t0² >= LAG_T2_GRID[i] = 16·2^{i/2}, worst case over h in {0} ∪ {10^{k/4}: k = −12..12} (30-digit mpmath
# Gauss–Laguerre against mpmath.quad; every larger n up to 40 met the tolerance too). The error falls with
# t0² (the singularities move away), so a row bounds its whole bin. Rechecked by tests/integrate/test_edge_flux.py.
LAG_T2_GRID = tuple(16.0 * 2.0 ** (i / 2) for i in range(17))
LAG_LOG_TOL = (-40.0, -36.0, -32.0, -28.0, -24.0, -20.0, -16.0, -12.0, -8.0)
LAG_NODES = (
    (22, 19, 16, 13, 10, 8, 6, 4, 3),
    (17, 15, 12, 10, 8, 7, 5, 4, 2),
    (14, 12, 10, 8, 7, 6, 4, 3, 2),
    (11, 10, 8, 7, 6, 5, 4, 3, 2),
    (10, 8, 7, 6, 5, 4, 3, 3, 2),
    (8, 7, 6, 5, 5, 4, 3, 2, 2),
    (7, 6, 6, 5, 4, 3, 3, 2, 2),
    (6, 6, 5, 4, 4, 3, 3, 2, 1),
    (6, 5, 5, 4, 3, 3, 2, 2, 1),
    (5, 5, 4, 4, 3, 3, 2, 2, 1),
    (5, 4, 4, 3, 3, 3, 2, 2, 1),
    (5, 4, 4, 3, 3, 2, 2, 2, 1),
    (4, 4, 3, 3, 3, 2, 2, 2, 1),
    (4, 4, 3, 3, 2, 2, 2, 1, 1),
    (4, 3, 3, 3, 2, 2, 2, 1, 1),
    (4, 3, 3, 3, 2, 2, 2, 1, 1),
    (3, 3, 3, 2, 2, 2, 2, 1, 1),
)

_RULES: dict = {}
_TABLES: dict = {}


def _laguerre_rule(n: int):
    """Gauss–Laguerre nodes and weights, Newton-refined in 30-digit mpmath (numpy's laggauss weights are off by
    up to ~1e-14 for n >= 10). mpmath is a dependency of torch (through sympy) and of the tests."""
    import mpmath as mp
    with mp.workdps(30):
        xs, ws = [], []
        for x0 in np.polynomial.laguerre.laggauss(n)[0]:
            x = mp.mpf(float(x0))
            for _ in range(6):
                p0, p1 = mp.mpf(1), 1 - x
                for k in range(1, n):
                    p0, p1 = p1, ((2 * k + 1 - x) * p1 - k * p0) / (k + 1)
                dp = n * (p1 - p0) / x
                x = x - p1 / dp
            xs.append(float(x))
            ws.append(float(1 / (x * dp * dp)))
    return np.array(xs), np.array(ws)


def _rule(kind: str, n: int, dtype, device):
    key = (kind, n, dtype, str(device))
    if key not in _RULES:
        x, w = np.polynomial.legendre.leggauss(n) if kind == "gl" else _laguerre_rule(n)
        _RULES[key] = (torch.tensor(x, dtype=dtype, device=device), torch.tensor(w, dtype=dtype, device=device))
    return _RULES[key]


def _gl_cuts(lag_t2, lag_min_dz):
    """Ends z_1 < ... < z_K of the Legendre piece classes: z_k = k²/2 (t_k = sqrt(p² + k²)) below the largest z
    a Legendre piece reaches, zg = lag_t2/2 + lag_min_dz, then zg."""
    zg = 0.5 * lag_t2 + lag_min_dz
    K = math.ceil(math.sqrt(2.0 * zg))
    return tuple(0.5 * k * k for k in range(1, K)) + (zg,)


def _rho_grid():
    rho = 1.0 + np.logspace(-2.0, 3.0, 600)
    return rho, 0.5 * (rho + 1.0 / rho), 0.5 * (rho - 1.0 / rho)


def _n_from_bound(log_pref, rho):
    """Smallest n with log_pref − 2(n − 1) log ρ <= 0, minimised over the ρ axis (last)."""
    n = 1.0 + np.ceil(np.maximum(log_pref, 0.0) / (2.0 * np.log(rho)))
    return np.minimum(np.where(np.isfinite(n), n, np.inf).min(axis=-1), _MAX_NODES)


def _gl_table(cuts, tol):
    r"""Node counts (K, _P_BINS, _ALPHA_BINS) of the plain Legendre pieces from the Bernstein bound (module
    doc): [k, i, j] for the piece [z_k, z_{k+1}] (z_0 = 0) of an edge with p in [i/4, (i + 1)/4) (the last bin
    to p = 1e4; G maximised over a grid of the bin, both ends included) and α_L >= e^{j/8}."""
    key = ("gl", tuple(cuts), tol)
    if key in _TABLES:
        return _TABLES[key]
    rho, al, be = _rho_grid()
    zs = (0.0,) + tuple(cuts)
    aL = np.exp(np.arange(_ALPHA_BINS) / _ALPHA_BINS_PER_E)[:, None]
    gap = aL - al                                                                      # (J, ρ)
    lor = np.where(gap > 0, 2.0 * np.log(2.0 * aL / np.where(gap > 0, gap, 1.0)), np.inf)
    out = np.zeros((len(cuts), _P_BINS, _ALPHA_BINS), dtype=np.int64)
    for i in range(_P_BINS):
        lo = i * _P_BIN
        ps = (np.linspace(lo, lo + _P_BIN, 26) if i < _P_BINS - 1 else np.geomspace(lo, 1e4, 301))[:, None]
        for k in range(len(cuts)):
            a, b = np.sqrt(ps * ps + 2.0 * zs[k]), np.sqrt(ps * ps + 2.0 * zs[k + 1])
            ell = (zs[k + 1] - zs[k]) / (a + b)          # (b − a)/2 without cancellation
            c = a + ell
            A = ell * ell * (al * al + be * be)
            B = 2.0 * c * ell * al
            u = np.clip(-B / (2.0 * A), -1.0, 1.0)
            # G = (b² − min_u Re t²)/2, Re t² = A u² + B u + c² − ℓ²β² (u = cos θ); b² − c² = ℓ(b + c)
            G = (0.5 * (ell * (b + c) + ell * ell * be * be - B * u - A * u * u)).max(axis=0)
            log_tau = math.log(tol) + max(0.0, math.log(math.expm1(zs[k])) if k else 0.0)
            pref = math.log(32.0 / 15.0) + G + lor - np.log(rho * rho - 1.0) - log_tau
            out[k, i] = _n_from_bound(pref, rho)
    _TABLES[key] = out
    return out


def _sub_table(tol, sub_r2, z1):
    r"""Node counts (_ELL_BINS,) of the subtracted first piece's remainder: entry j covers ℓ <= e^{−j/4}.

    The remainder's error relative to the piece is (16/15) e^{(r² + b² − p²)/2} (h² + b²) max_{E_ρ}|E|
    ρ^{2−2n}/(ρ² − 1) with r² = h² + p² <= sub_r2 and b² − p² <= 2 z1 (the first cut)."""
    key = ("sub", tol, sub_r2, z1)
    if key not in _TABLES:
        rho, al, be = _rho_grid()
        ell = np.exp(-np.arange(_ELL_BINS) / _ELL_BINS_PER_E)[:, None]
        big = sub_r2 + 2.0 * z1
        pref = (math.log(16.0 / 15.0 * big) + 0.5 * big + 0.5 * (ell * be) ** 2 - np.log(rho * rho - 1.0)
                - math.log(tol))
        _TABLES[key] = _n_from_bound(pref, rho).astype(np.int64)
    return _TABLES[key]


def _need_tables(cuts, tol, sub_r2, dtype, device):
    """Flat int64 tensors of the certified node counts of the three look-ups (cached)."""
    key = ("need", tuple(cuts), tol, sub_r2, dtype, str(device))
    if key not in _TABLES:
        mk = lambda t: torch.as_tensor(np.asarray(t, dtype=np.int64).reshape(-1), device=device)   # noqa: E731
        _TABLES[key] = (mk(_gl_table(cuts, tol)), mk(_sub_table(tol, sub_r2, cuts[0])), mk(LAG_NODES))
    return _TABLES[key]


def _thresholds(cuts, tol, base, dtype, device):
    """Flat [k, p bin]: the α_L from which on (all larger α_L bins) ``base`` nodes suffice (inf: never)."""
    key = ("thr", tuple(cuts), tol, base, dtype, str(device))
    if key not in _TABLES:
        ok = _gl_table(cuts, tol) <= base                                    # (K, P bins, J)
        last_bad = np.where(ok.all(axis=-1), -1, _ALPHA_BINS - 1 - np.argmax(~ok[..., ::-1], axis=-1))
        thr = np.where(last_bad + 1 >= _ALPHA_BINS, np.inf, np.exp((last_bad + 1) / _ALPHA_BINS_PER_E))
        _TABLES[key] = torch.tensor(np.where(last_bad < 0, 0.0, thr).reshape(-1), dtype=dtype, device=device)
    return _TABLES[key]


def _tiered(need: torch.Tensor, levels, evaluate, first=True):
    """Values of ``evaluate(idx, n)`` (idx = None: all items) with at least ``need`` nodes per item, n from
    ``levels``. With ``first``, every item is evaluated at the lowest level in one dense batch and the items
    needing more are redone at the next sufficient level (few: small batches); otherwise each item is
    evaluated once, at its level. Returns the values and the number of node evaluations."""
    lv = sorted(levels)
    nodes = 0
    if first:
        val = evaluate(None, lv[0])
        nodes += lv[0] * need.numel()
        rest, lv = (need > lv[0]).nonzero().squeeze(-1), lv[1:]
    else:
        val = None
        rest = torch.arange(need.numel(), device=need.device)
    for n in lv:
        if rest.numel() == 0:
            break
        ok = need.index_select(0, rest) <= n
        idx = rest[ok]
        if idx.numel():
            v = evaluate(idx, n)
            if val is None:
                val = v.new_empty(need.shape)
            val.index_copy_(0, idx, v)
            nodes += n * idx.numel()
        rest = rest[~ok]
    if rest.numel():
        raise ValueError(f"edge_flux: a rule needs more nodes than the largest level {lv[-1] if lv else ''}")
    return val, nodes


NODE_BLOCK = 2 ** 15
"""Node evaluations per block of the rules' (items, nodes) temporaries: the items are evaluated in row blocks of
NODE_BLOCK // nodes, so that the few temporaries of a block stay in a core's L2 cache (measured: _gl_eval of
32,000 pieces × 10 nodes 3.9 ms at once, 1.8 ms in blocks of 4,000). Each item's value depends on its own row
alone, so the blocking changes no bit."""


def _blocked(kernel):
    """``kernel(*items, x, w)`` (items: (n,) tensors, x, w: the rule) evaluated in row blocks (:data:`NODE_BLOCK`)."""
    def run(*args):
        *items, x, w = args
        n, rows = items[0].shape[0], max(1, NODE_BLOCK // max(1, x.shape[0]))
        if n <= rows:
            return kernel(*items, x, w)
        out = items[0].new_empty(n)
        for i in range(0, n, rows):
            out[i:i + rows] = kernel(*(t[i:i + rows] for t in items), x, w)
        return out
    run.__doc__ = kernel.__doc__
    return run


@_blocked
def _gl_eval(da, half, hh, pp, x, w):
    """Σ_i w_i f(t_i) half, t_i = p + da + u_i, u_i = half (1 + x_i), f(t) = e^{−(t − p)(t + p)/2} h/(h² + t²),
    batched; the offset da = a − p keeps t − p = da + u at full relative precision on short pieces far out."""
    hg, hw = half.unsqueeze(-1), hh.unsqueeze(-1)
    u = hg * (1.0 + x)
    f = u + da.unsqueeze(-1)
    f.mul_(-0.5).mul_(u + (2.0 * pp + da).unsqueeze(-1)).exp_().mul_(hw)
    t = u.add_((pp + da).unsqueeze(-1))
    f.div_(t.mul_(t).add_(hw * hw)).mul_(w)
    return f.sum(-1) * half


@_blocked
def _sub_eval(ell, ps, hs, x, w):
    """Σ_i w_i (−E(w(t_i))), t_i = p + ℓ(1 + x_i), w = (t² + h²)/2, E(w) = (1 − e^{−w})/w (batched)."""
    ts = ell.unsqueeze(-1) * x
    ts += (ps + ell).unsqueeze(-1)
    hg = hs.unsqueeze(-1)
    wv = ts.mul_(ts).add_(hg * hg).mul_(0.5).clamp_(min=_DIV_TINY)   # w = (t² + h²)/2 > 0
    return torch.expm1(-wv).div_(wv).mul_(w).sum(-1)


@_blocked
def _lag_eval(s0, hl, x, w):
    """Σ_i w_i / ((h² + t0² + 2 s_i) sqrt(t0² + 2 s_i)) (Gauss–Laguerre; times h e^{−z0} by the caller)."""
    v = s0.unsqueeze(-1) + 2.0 * x
    hg = hl.unsqueeze(-1)
    return (w / (hg * hg + v).mul_(torch.sqrt(v))).sum(-1)


def log_edge_flux(h: torch.Tensor, p: torch.Tensor, q: torch.Tensor, *, tol: float = DEFAULT_EDGE_FLUX_TOL,
                  lag_t2: float = DEFAULT_LAG_T2, lag_min_dz: float = DEFAULT_LAG_MIN_DZ,
                  z_max: float = DEFAULT_EDGE_Z_MAX, sub_r2: float = DEFAULT_EDGE_SUB_R2,
                  gl_levels=DEFAULT_GL_LEVELS, sub_levels=DEFAULT_SUB_LEVELS,
                  lag_levels=DEFAULT_LAG_LEVELS, _count=None) -> torch.Tensor:
    r"""log I, I = ∫_p^q e^{−(t² − p²)/2} h/(h² + t²) dt, for flat (n,) h > 0, 0 <= p < q <= inf (module doc).

    Truncation error <= ``tol`` relative to I per rule (Bernstein bound for the Legendre pieces, an
    mpmath-measured table for the Laguerre tails), plus rounding (~1e-16); the tail beyond z = ``z_max`` is
    dropped. Every piece (tail) is first integrated with ``*_levels[0]`` nodes; those whose certified count is
    larger are redone at the next sufficient level. ``_count`` (a dict) receives the number of node evaluations
    and of edges (benchmarks).
    """
    if not LAG_T2_GRID[0] <= lag_t2:
        raise ValueError(f"lag_t2 = {lag_t2} is below LAG_T2_GRID[0] = {LAG_T2_GRID[0]}: no Laguerre table there")
    if not lag_min_dz > 0:
        raise ValueError(f"lag_min_dz = {lag_min_dz} must be positive (it bounds the tail subtraction's cancellation)")
    dtype, device = h.dtype, h.device
    cuts = _gl_cuts(lag_t2, lag_min_dz)
    K = len(cuts)
    gl_levels = sorted(gl_levels)
    gl_need, sub_need, lag_need = _need_tables(cuts, tol, sub_r2, dtype, device)
    thr = _thresholds(cuts, tol, gl_levels[0], dtype, device)
    p2 = p * p
    zq = 0.5 * (q - p) * (q + p)
    z0 = torch.clamp(0.5 * (lag_t2 - p2), min=0.0)
    lag = zq >= z0 + lag_min_dz                       # q = inf included
    t0 = torch.clamp(p, min=math.sqrt(lag_t2))        # t(z0)
    top = torch.where(lag, t0, q)                      # Legendre pieces cover [p, top], z in [0, ztop]
    ztop = torch.where(lag, z0, zq)
    m = torch.clamp(torch.ceil(torch.sqrt(2.0 * ztop)), max=K).long()   # pieces: #{k >= 0 : k²/2 < ztop}
    owners, vals = [], []
    nodes = 0
    sel = lambda arrays, idx: arrays if idx is None else [x.index_select(0, idx) for x in arrays]   # noqa: E731
    # ---- Legendre pieces [a, b], a = p + k²/(sqrt(p² + k²) + p) (= sqrt(p² + k²); exactly p for k = 0), b the
    # same expression at k + 1 (bitwise the next piece's a), cut at top
    near = (h * h + p2 <= sub_r2) & (m > 0)           # first piece by singularity subtraction
    nearl = near.long()
    mpl = m - nearl
    owner = torch.repeat_interleave(mpl)
    if owner.numel():
        # piece k of its edge: its index minus the edge's first piece's, plus 1 after a subtracted first piece
        kk = torch.arange(owner.numel(), device=device) - (mpl.cumsum(0) - m).index_select(0, owner)
        pp, hh = p.index_select(0, owner), h.index_select(0, owner)
        pp2 = pp * pp
        kf = kk.to(dtype)
        k2a, k2b = kf * kf, (kf + 1.0) * (kf + 1.0)      # k², (k + 1)²: exact (small integers)
        # offsets from p, so that adjacent pieces share their end bitwise and t − p keeps full relative precision
        da = k2a / torch.clamp(torch.sqrt(pp2 + k2a) + pp, min=_DIV_TINY)       # a − p (0 for k = 0)
        db = torch.minimum(k2b / (torch.sqrt(pp2 + k2b) + pp), (top - p).index_select(0, owner))
        db = torch.maximum(db, da)                                                 # b − p
        half = 0.5 * (db - da)
        a, b = pp + da, pp + db
        hh2 = hh * hh
        alpha_l = (torch.sqrt(hh2 + a * a) + torch.sqrt(hh2 + b * b)) / (db - da)   # +inf on empty pieces
        val = _gl_eval(da, half, hh, pp, *_rule("gl", gl_levels[0], dtype, device))
        nodes += gl_levels[0] * owner.numel()
        cls = kk * _P_BINS + torch.clamp(pp * (1.0 / _P_BIN), 0, _P_BINS - 1).long()   # (class, p bin)
        hard = (alpha_l < thr.index_select(0, cls)).nonzero().squeeze(-1)   # the base level does not suffice
        if hard.numel():
            j = torch.clamp(torch.log(alpha_l.index_select(0, hard)) * _ALPHA_BINS_PER_E, 0, _ALPHA_BINS - 1).long()
            need = gl_need.index_select(0, cls.index_select(0, hard) * _ALPHA_BINS + j)
            arr = [x.index_select(0, hard) for x in (da, half, hh, pp)]
            v, nn = _tiered(need, gl_levels[1:],
                            lambda ix, n: _gl_eval(*sel(arr, ix), *_rule("gl", n, dtype, device)))
            nodes += nn
            val.index_copy_(0, hard, v)
        owners.append(owner)
        vals.append(val)
    # ---- subtracted first pieces [p, b], b − p = min(1/(sqrt(p² + 1) + p), top − p) (bitwise piece 1's a − p)
    si = near.nonzero().squeeze(-1)
    if si.numel():
        ps, hs = p.index_select(0, si), h.index_select(0, si)
        db = torch.minimum(1.0 / (torch.sqrt(ps * ps + 1.0) + ps), (top - p).index_select(0, si))
        ell = 0.5 * db
        bs = ps + db
        js = torch.clamp(-torch.log(ell) * _ELL_BINS_PER_E, 0, _ELL_BINS - 1).long()
        rem, nn = _tiered(sub_need.index_select(0, js), sub_levels,
                          lambda ix, n: _sub_eval(*sel((ell, ps, hs), ix), *_rule("gl", n, dtype, device)))
        nodes += nn
        br = torch.atan(db * hs / (hs * hs + bs * ps)) + 0.5 * hs * ell * rem
        owners.append(si)
        vals.append(br * torch.exp(0.5 * (hs * hs + ps * ps)))
    # ---- Laguerre tails: from t0 (+) and, for finite edges, beyond q (−)
    li = lag.nonzero().squeeze(-1)
    if li.numel():
        qi = (lag & (zq < z_max)).nonzero().squeeze(-1)
        own = torch.cat([li, qi])
        t0l, ql = t0.index_select(0, li), q.index_select(0, qi)
        s0 = torch.cat([t0l * t0l, ql * ql])
        pl = p.index_select(0, li)
        # z of the tail's start from the same t0 as the Legendre pieces' end (consistent to rounding)
        zs = torch.cat([0.5 * (t0l - pl) * (t0l + pl), zq.index_select(0, qi)])
        amp = 1.0 / -math.expm1(-lag_min_dz)
        log_tau = math.log(tol / amp) + torch.log(torch.clamp(torch.expm1(zs), min=1.0))
        jt = torch.clamp((log_tau - LAG_LOG_TOL[0]) * (1.0 / 4.0), 0, len(LAG_LOG_TOL) - 1).long()
        it = torch.clamp(torch.log(s0 * (1.0 / LAG_T2_GRID[0])) * (2.0 / math.log(2.0)), 0,
                         len(LAG_T2_GRID) - 1).long()
        hl = h.index_select(0, own)
        lsum, nn = _tiered(lag_need.index_select(0, it * len(LAG_LOG_TOL) + jt), lag_levels,
                           lambda ix, n: _lag_eval(*sel((s0, hl), ix), *_rule("lag", n, dtype, device)), first=False)
        nodes += nn
        scale = torch.exp(-zs)
        scale[li.numel():] *= -1.0
        owners.append(own)
        vals.append(lsum * hl * scale)
    if _count is not None:
        _count["nodes"] = _count.get("nodes", 0) + nodes
        _count["edges"] = _count.get("edges", 0) + h.shape[0]
    integral = torch.zeros_like(p)
    for owner, val in zip(owners, vals):    # per edge: its pieces in order, the subtracted piece, the tails (+, −)
        integral.index_add_(0, owner, val)
    # (an integral that underflows to 0 only occurs for h <~ 1e-300, where the result is not trusted anyway)
    return torch.log(torch.clamp(integral, min=_DIV_TINY))
