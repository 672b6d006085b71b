r"""Closed-form M-step of the CPA latent-variable model with frozen activation patterns.

Notation (see :mod:`pyro_cpa.infer.estep` for the statistics Z_ω, X_ω, q_ω). The decoder is
g = T_L ∘ σ_{L-1} ∘ … ∘ σ_0 ∘ T_0 with T_l(h) = W_l h + v_l. On region ω (activation pattern frozen at
the E-step's partition), for layer l:

    h_l(z) = P_ω z + p_ω,              h̃ = P̃_ω z̃,   P̃_ω = [[P_ω, p_ω], [0, 1]]
    t_l(z) = W̃_l h̃ = M^l_ω z + m^l_ω,  W̃_l = [W_l  v_l]
    g(z)   = F_ω t_l(z) + c_ω,         F_ω = W_L D_{L-1} W_{L-1} ⋯ W_{l+1} D_l  (I for l = L),
                                       c_ω = b_ω − F_ω m^l_ω.

**Surrogate** (expected complete log-likelihood, the E-step moments held fixed; Ã_ω = [A_ω b_ω]):

    Q(θ) = −½ Σ_d [ N log(2π σx_d²) + r_d / σx_d² ] − ½ Σ_s [ N log(2π σz_s²) + Σ_ω (Z_ω)_ss / σz_s² ],
    r_d  = Σ_ω q_ωd − 2 ã_ωdᵀ X_ω[d] + ã_ωdᵀ Z_ω ã_ωd.

It equals E_{z|x,θ_old} log p(x, z; θ) only as long as θ keeps the E-step's partition; once the regions
move it is *not* the likelihood's EM lower bound (hence the verified, backtracking step of
:func:`pyro_cpa.infer.em_engine.em_step`).

**Layer update.** With Λ = Σx⁻¹, Q is a concave quadratic in W̃_l; its stationary point solves

    Σ_ω (F_ωᵀ Λ F_ω) W̃ M_ω = Σ_ω F_ωᵀ Λ R_ω,   M_ω = P̃_ω Z_ω P̃_ωᵀ,   R_ω = (X_ω − c_ω s_ωᵀ) P̃_ωᵀ,

(s_ω = Z_ω[:, S] = Σ_n E[1_ω z̃]), i.e. with row-major vec, K vec W̃ = vec B,
K = Σ_ω (F_ωᵀΛF_ω) ⊗ M_ω (size n_out(n_in+1)), assembled by one matrix product over regions. For the
last layer (F = I) the system decouples: W̃ = (Σ_ω R_ω)(Σ_ω M_ω)⁻¹.

K is singular or nearly so as a rule (dead units, empty regions, and in a hidden layer each region's
input spans only S+1 dimensions); a plain solve would turn rounding noise in K and B (a different
summation order: thread count, chunking, an extra empty region) into arbitrarily large weight changes
(measured: 1e-16 → 5e-5 relative with the former 1e-12 ridge, condition ~1e12). The solve therefore
works in Jacobi-scaled units, where every entry of K̃ is ≤ 1 and rounding noise is ~ε, and applies
the damped spectral filter f(e) = e (e + 3λ)/(e + λ)³, λ = ``rcond`` (default 1e-6), around the old
weights (:func:`_damped_prox_solve`): directions of curvature e ≫ λ get the exact maximiser up to a
relative 3(λ/e)², directions the data do not determine keep their old values, and no rounding noise
is amplified by more than 1/(2λ). Cholesky of K̃ + λI assembled once, scaled and shifted, from the Kronecker
factors (:func:`_damped_prox_solve_dense_kron`), or, when K̃'s low-rank factor has fewer columns, Cholesky of the
m × m Gram matrix of that factor (m = R·D·(S+1) columns, assembled through the Kronecker factors,
:func:`_damped_prox_solve_kron`); the first layer of a wide decoder (n_out large, n_in + 1 = S + 1) assembles K̃
from F_ω and ΛF_ω without the R n_out × n_out matrices G_ω (:class:`FactoredG`). Wide hidden layers
(``solver="cg"``): at most ``CG_ITERS`` conjugate-gradient iterations on (K̃ + λI) y = r̃ through the factors
(:func:`_cg_prox_solve_kron`), stopped once an iteration adds at most ``CG_GAIN_RTOL`` of the progress made, an
inexact block maximiser that never lowers Q, O(CG_ITERS·n·R·(S+1)) instead of O(n³) (measured [1,64,64,64,10],
N=1000, one thread: 7× cheaper EM steps, NLL after 10 steps as good or better). ``solver="auto"`` takes it for
layers with min(n, m) >= ``CG_AUTO_MIN_UNKNOWNS`` = 1024, where an exact solve costs O(min(n, m)³); smaller layers
keep the exact solve (on the circle demo CG made 30-step NLLs worse on 2 of 3 seeds).

**Noise update** (after the layers, with the new Ã_ω): σx_d² = r_d / N (``"diagonal"``) or
σx² = Σ_d r_d / (N D) (``"isotropic"``), floored at ``min_obs_var``; optionally σz_s² = Σ_ω (Z_ω)_ss / N.

One *sweep* updates every layer once (in ``order``) and then the variances; every block update is an
exact block maximisation, so Q never decreases. With ``sweeps > 1`` the sweeps are repeated until the
relative gain of Q is below ``tol`` (block coordinate ascent to a stationary point of Q).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from ..errors import PyroCPAError
from ..geometry.maps import RegionMaps, as_activation, form_maps, select_maps
from ..nn.activations import Elementwise
from .estep import EStepStats

DEFAULT_RCOND = 1e-6
#: Relative floor of the PX-EM latent covariance's eigenvalues (:func:`prior_expansion`).
PX_MIN_REL = 1e-10
#: A sweep of :func:`m_step` must raise Q by more than this · (1 + |Q|) (besides ``tol``) to count as a gain:
#: Q's own evaluation rounding is ~1e-15 relative, so a "gain ≤ 0" stop rule would be decided by rounding.
SWEEP_GAIN_FLOOR = 1e-13
DEFAULT_MIN_OBS_VAR = 1e-12
DEFAULT_DENSE_MAX = 6144
#: Iteration cap of the truncated conjugate-gradient layer solve (``solver="cg"``, :func:`_cg_prox_solve_kron`).
CG_ITERS = 100
#: Early stop of that solve: ‖(K̃ + λI) y − r̃‖₂ <= CG_RTOL · ‖r̃‖₂ (the damped system solved to rounding level).
CG_RTOL = 1e-12
#: ``solver="auto"`` takes the truncated-CG solve for a hidden layer when both its unknowns n and its factor
#: columns m are at least this (an exact solve costs O(min(n, m)³) there). Measured (N=1000, one thread):
#: [1,64,64,64,10] (n = 4160, m = 3620), 10 layerwise steps: 3.0 s → 0.40 s per step, 6.7 → 0.4 backtracks per
#: step, NLL/datum after 10 steps 2.2095 (exact) vs 2.2064 (CG); [1,128,128,2] (n = 16512, m ≈ 1060), 8 steps after
#: one: layerwise 0.69 → 0.41 s per step, NLL/datum 0.6123 both; joint 0.59 → 0.37 s, 0.6253 vs 0.6271. Small layers
#: (the circle demo, [2,8,8,3]; n <= ~300) keep the exact solve: on the circle CG made 30-step NLLs worse on 2 of 3
#: seeds.
CG_AUTO_MIN_UNKNOWNS = 1024
#: Stopping rule of the truncated-CG solve: stop after the first iteration whose decrease of the damped model
#: φ(y) = ½yᵀ(K̃ + λI)y − r̃ᵀy (½ α_j ‖res_j‖², the CG identity) is at most this fraction of the decrease made so
#: far — the iterations that follow would add little to Q (plain CG's decreases shrink geometrically once the
#: well-determined directions are resolved), and on the partition-moving surrogate a shorter step is also the
#: safer one. Measured (N=1000, one thread, 8 steps after one, vs running to ``CG_ITERS``): [1,128,128,2] layerwise
#: 0.35 → 0.23 s per step, NLL/datum 0.6124 → 0.6130; joint 0.22 → 0.15 s, 0.6293 → 0.6277; [1,64,64,64,10]
#: layerwise 0.49 → 0.43 s, 2.2057 → 2.2105; joint 0.36 → 0.30 s, 2.2603 → 2.2499.
CG_GAIN_RTOL = 1e-3


class MStepResult(NamedTuple):
    """New parameters from :func:`m_step` (unpacks as ``maps, obs_var, prior_var``).

    Attributes:
        maps: new ``[(W_l, v_l)]`` of every affine step.
        obs_var: (D,) new σx² (all equal for isotropic noise).
        prior_var: (S,) new σz² (the input unchanged unless ``update_prior_scale``).
        q_trace: value of the surrogate Q before the M-step and after each sweep (floats).
    """

    maps: list
    obs_var: torch.Tensor
    prior_var: torch.Tensor
    q_trace: list


# ---------------------------------------------------------------------------------------- region maps
def frozen_region_maps(maps, activations, patterns, *, reuse: RegionMaps | None = None, start: int = 0,
                       forms: bool = True, selections: list | None = None) -> RegionMaps:
    """The frozen-pattern region maps of explicit weights ``[(W_l, v_l)]`` (the maths of
    :func:`~pyro_cpa.geometry.maps.region_maps_from_affine`; differentiable in the weights): on every region
    h_0 = z, t_l = W_l h_l + v_l, h_{l+1} = the selection of t_l under the region's pattern of layer l.

    Each layer's directions are pushed for all regions by one matrix product, W_l [P_ω]_ω (n_out × R·S), instead of
    R matrix-vector products (measured [1,128,128,2], R = 280: 4.4 → 1.7 ms for the whole map).

    ``reuse`` (maps of the same patterns whose weights agree with ``maps`` bit for bit in the layers before ``start``):
    its layer inputs of the layers <= ``start`` and the selections, slopes, forms and pre-activations before
    ``start`` are taken as they are and only the layers from ``start`` on are pushed — the bits a computation from
    scratch gives, since every layer's step is a deterministic function of its input and its weights.

    ``forms=False``: the forms (the regions' inequalities, which the M-step does not use) are not formed (``forms``
    holds None per layer). ``selections``: the (src, scale, offset) of every activation layer under ``patterns`` from
    an earlier computation, taken instead of selecting again — valid where a layer's selection is a function of its
    patterns alone (:class:`RegionMapsMemo`); the same bits."""
    W0 = maps[0][0]
    R = patterns[0].shape[0] if len(patterns) else 1
    S = W0.shape[1]
    L = len(activations)
    if reuse is None or start == 0:
        P = torch.eye(S, dtype=W0.dtype, device=W0.device).expand(R, S, S)
        p = W0.new_zeros(R, S)
        layer_inputs, pre, slopes, form_list, sels = [], [], [], [], []
        start = 0
    else:
        layer_inputs, pre = list(reuse.layer_inputs[:start]), list(reuse.preactivations[:start])
        slopes, form_list, sels = list(reuse.slopes[:start]), list(reuse.forms[:start]), list(reuse.selections[:start])
        P, p = reuse.layer_inputs[start]
    for l in range(start, L + 1):
        layer_inputs.append((P, p))
        W, v = maps[l]
        n_out, n_in = W.shape
        M = (W @ P.transpose(0, 1).reshape(n_in, -1)).reshape(n_out, R, S).transpose(0, 1)
        m = p @ W.T + v
        if l == L:
            return RegionMaps(layer_inputs, pre, slopes, M, m, form_list, sels)
        pre.append((M, m))
        act = as_activation(activations[l], n_out)
        form_list.append(form_maps(act, M, m) if forms else None)
        P, p, sel = select_maps(act, patterns[l].to(M.device), M, m,
                                sel=None if selections is None else selections[l])
        slopes.append(sel[1])
        sels.append(sel)
    raise AssertionError("unreachable")


class RegionMapsMemo:
    """The frozen region maps of the last parameters asked for, reused while the parameters and patterns are the same.

    :meth:`get` returns the stored :class:`~pyro_cpa.geometry.maps.RegionMaps` when ``patterns`` is the same object
    as last time and every ``(W_l, v_l)`` equals the stored copy bit for bit (``torch.equal``, O(parameters));
    otherwise it recomputes them (:func:`frozen_region_maps`) and stores copies of the parameters (so in-place
    updates of the caller's tensors cannot alias the key) — from the first layer whose weights changed, the earlier
    layers' maps taken from the stored ones (``reuse``; the same bits). The maps are a deterministic function of
    exactly those inputs, so a hit returns the bits a recomputation would. One M-step asks for the maps of the same
    parameters several times (Q before the sweep, the first layer's update, the variances after the last layer, Q
    after it; measured 6-7 computations per joint M-step on [1,128,128,2], 2-3 ms each). Use under
    ``torch.no_grad()``: the stored maps carry no graph of the caller's tensors.

    The memo's maps carry no forms (``forms=False``: the M-step does not use them), and while the patterns are the same
    object a recomputation takes the activation layers' selections from the stored maps where they are a function of
    the patterns alone (element-wise layers without a learned slope; ``selections``): the same bits, without the
    forms and selections' per-layer work (measured [1,64,64,64,10], R = 250: ~1 → ~0.6 ms per computation).
    """

    def __init__(self, activations):
        self.activations = activations
        self._key = None
        self._rm = None
        # selections reusable across weights: every layer element-wise with fixed slopes (PReLU reads its weight)
        self._static_selections = all(isinstance(a, (int, float)) or (isinstance(a, Elementwise) and a.prelu is None)
                                      for a in activations)

    def get(self, maps, patterns):
        key = self._key
        start = 0
        if key is not None and key[0] is patterns and len(key[1]) == len(maps):
            for (W, v), (W0, v0) in zip(maps, key[1]):
                if not (torch.equal(W, W0) and torch.equal(v, v0)):
                    break
                start += 1
            if start == len(maps):
                return self._rm
        same = (key is not None and key[0] is patterns and self._static_selections
                and self._rm.A.dtype == maps[0][0].dtype and self._rm.A.device == maps[0][0].device)
        rm = frozen_region_maps(maps, self.activations, patterns, reuse=self._rm if start else None, start=start,
                                forms=False, selections=self._rm.selections if same else None)
        self._key = (patterns, [(W.detach().clone(), v.detach().clone()) for W, v in maps])
        self._rm = rm
        return rm


def _augmented(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[A b] of shape (R, D, S+1)."""
    return torch.cat([A, b.unsqueeze(-1)], dim=-1)


def expected_sq_residual(A: torch.Tensor, b: torch.Tensor, stats: EStepStats) -> torch.Tensor:
    """r_d = Σ_n Σ_ω E[1_ω (x_nd − (A_ω z + b_ω)_d)² | x_n] for every coordinate d, shape (D,)."""
    At = _augmented(A, b)
    # ã Z ã per region by one batched product and a two-operand sum (a three-operand einsum plans its contraction
    # order at every call: ~0.1 ms, as much as the sums)
    return (stats.q.sum(0) - 2.0 * torch.einsum("rdk,rdk->d", At, stats.X)
            + torch.einsum("rdk,rdk->d", At @ stats.Z, At))


def _as_var(value, size: int, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return t.expand(size) if t.dim() == 0 or t.shape[0] == 1 else t


def expected_complete_loglik(params: Sequence[tuple[torch.Tensor, torch.Tensor]], net, patterns,
                             stats: EStepStats, obs_var, prior_var) -> torch.Tensor:
    r"""The frozen-pattern surrogate Q(θ) (module docstring), a scalar differentiable in every argument.

    Args:
        params: ``[(W_l, v_l)]`` of every affine step (e.g. ``net.affine_maps()`` or tensors requiring grad).
        net: the :class:`~pyro_cpa.nn.CPANetwork` (only its activation slopes are used).
        patterns: the frozen activation patterns (normally ``stats.patterns``).
        stats: the E-step statistics.
        obs_var: σx², scalar or (D,); prior_var: σz², scalar or (S,).

    Up to the (θ-independent) entropy of the E-step posterior, Q(θ_old) = Σ_n log p(x_n; θ_old) and
    ∇Q(θ_old) = ∇ Σ_n log p(x_n; θ_old) (Fisher's identity).
    """
    params = list(params)
    rm = frozen_region_maps(params, net.activations, patterns)
    return surrogate_of_region_maps(rm.A, rm.b, stats, obs_var, prior_var)


def surrogate_of_region_maps(A: torch.Tensor, b: torch.Tensor, stats: EStepStats, obs_var, prior_var) -> torch.Tensor:
    """Q of :func:`expected_complete_loglik` given the frozen region maps A (R, D, S), b (R, D) of the parameters."""
    D, S = A.shape[1], A.shape[2]
    sx2 = _as_var(obs_var, D, A)
    sz2 = _as_var(prior_var, S, A)
    N = stats.num_data
    r = expected_sq_residual(A, b, stats)
    zz = torch.diagonal(stats.Z[:, :S, :S], dim1=-2, dim2=-1).sum(0)
    log2pi = math.log(2.0 * math.pi)
    return -0.5 * ((N * (log2pi + sx2.log()) + r / sx2).sum() + (N * (log2pi + sz2.log()) + zz / sz2).sum())


# ---------------------------------------------------------------------------------------- layer solve
def _output_jacobians(maps, slopes: list[torch.Tensor], l: int, R: int, every: bool = False):
    """F_ω (R, D, n_l): linear map from layer l's pre-activation to the output (frozen slopes), by
    F = (…((I W_L) diag s_{L−1}) W_{L−1} …) diag s_l. ``every``: the list [F of layer k for k = l … L − 1], the
    intermediates of that product (the same bits as one call per layer)."""
    W_last = maps[-1][0]
    D = W_last.shape[0]
    F = torch.eye(D, dtype=W_last.dtype, device=W_last.device).expand(R, D, D)
    chain = []
    for k in range(len(maps) - 1, l, -1):
        F = (F @ maps[k][0]) * slopes[k - 1].unsqueeze(-2)
        chain.append(F)
    return chain[::-1] if every else F


def _jacobi_scale(d: torch.Tensor) -> torch.Tensor:
    """s = (d + ε·mean d)^{-1/2} for the diagonal d ≥ 0 of a PSD matrix (finite where d = 0)."""
    d = d.clamp_min(0.0)
    fi = torch.finfo(d.dtype)
    return (d + fi.eps * d.mean() + fi.tiny).rsqrt()


_OVERFLOW = ("m_step: the layer's normal equations overflowed (non-finite entries); the decoder's weights or the data "
             "are too large for float64 — rescale the data or the decoder")


def _filter_shifted(A: torch.Tensor, apply_C, rhs: torch.Tensor, lam: float, *, gram: bool = False) -> torch.Tensor:
    r"""f(C) rhs for symmetric PSD C with f(e) = e (e + 3λ) / (e + λ)³ (see :func:`_damped_prox_solve`), or
    h(C) rhs with h(e) = f(e)/e = (e + 3λ)/(e + λ)³ when ``gram`` (C is then the Gram matrix ŨᵀŨ of a factor of
    K̃ = ŨŨᵀ, and f(K̃) = Ũ h(ŨᵀŨ) Ũᵀ: :func:`_damped_prox_solve_kron`), given A = C + λI (only its lower triangle
    is read; it may be overwritten) and ``apply_C(y)`` = C y (the product f = C h is formed by it, so that no
    cancellation (A − λI) y occurs).

    One Cholesky factor of A: h(C) = A⁻² + 2λ A⁻³, f(C) = C h(C). If rounding made C indefinite by more than λ
    (Cholesky fails), the same f or h is applied to the eigenvalues of A less λ, clamped at 0.
    """
    # A is a sum of products of PSD factors (a Gram matrix, Σ_ω G_ω ⊗ M_ω): |A_ij| <= sqrt(A_ii A_jj) (Cauchy–Schwarz,
    # also for every partial sum), and a NaN or inf in a factor reaches the diagonal; so a finite diagonal certifies
    # every entry finite without an O(n²) pass.
    if not (bool(torch.isfinite(A.diagonal()).all()) and bool(torch.isfinite(rhs).all())):
        raise PyroCPAError(_OVERFLOW)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        def solve(v):   # A⁻¹ v by two triangular solves (LAPACK trsm on L and its transposed view: no copy of L)
            return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, v, upper=False), upper=True)

        y2 = solve(solve(rhs))
        y = y2 + 2.0 * lam * solve(y2)
        return y if gram else apply_C(y)
    e, V = torch.linalg.eigh(A)
    e = (e - lam).clamp_min(0.0)
    h = (e + 3.0 * lam) / (e + lam) ** 3
    return V @ ((h if gram else e * h).unsqueeze(-1) * (V.transpose(-1, -2) @ rhs))


def _filter(C: torch.Tensor, rhs: torch.Tensor, lam: float, *, gram: bool = False) -> torch.Tensor:
    """:func:`_filter_shifted` of an explicit C (left unchanged; every entry is checked for finiteness)."""
    if not bool(torch.isfinite(C).all()):
        raise PyroCPAError(_OVERFLOW)
    A = C.clone()
    A.diagonal().add_(lam)
    return _filter_shifted(A, lambda y: C @ y, rhs, lam, gram=gram)


def _damped_prox_solve(K: torch.Tensor, B: torch.Tensor, w_old: torch.Tensor, rcond: float) -> torch.Tensor:
    r"""Damped proximal solve of K w = B (K symmetric PSD; the columns of B, w_old are right-hand sides).

    In Jacobi-scaled coordinates (s = (diag K + ε·mean diag K)^{-1/2}, K̃ = s K s, r̃ = s (B − K w_old)) it
    returns w = w_old + s f(K̃) r̃ with the spectral filter

        f(e) = e (e + 3λ) / (e + λ)³,   λ = ``rcond``.

    For e ≫ λ, f(e) = (1/e)(1 − 3(λ/e)² + O((λ/e)³)): the exact maximiser in every direction the data
    determine. f(0) = 0 and f ≤ 1/(2λ): directions the data do not determine (dead units, empty regions,
    the null space of a rank-deficient K, e.g. a hidden layer whose input spans S+1 dims per region) keep
    their old values, and rounding noise in K and B — of size ~ε in the scaled units, where every
    |K̃_ij| ≤ 1 (Cauchy–Schwarz) — moves w by at most ~ε/λ in those units: the conditioning bound of the
    result (it no longer depends on the condition number of K). Every eigen-direction gains
    Q ≥ ½ f r̃² ≥ 0, so Q never decreases. Coordinates with a zero row of K and B (dead units) are
    returned bit-for-bit unchanged.
    """
    K = 0.5 * (K + K.transpose(-1, -2))
    s = _jacobi_scale(torch.diagonal(K)).unsqueeze(-1)
    r = s * (B - K @ w_old)
    return w_old + s * _filter(s * K * s.transpose(-1, -2), r, float(rcond))


#: Cost of one flop of :func:`_kron_gram` (batched small products, strided copies) in units of a flop of a large
#: matrix product / Cholesky, for the ``solver="auto"`` choice of :func:`update_layer`: measured ~15-20 on one thread
#: ([1,64,64,64,10], R = 181-208: dense 0.89-0.92 s vs factored 0.95-1.24 s at m ~ n). Speed only: both solvers give
#: the same filtered step to rounding.
KRON_GRAM_FLOP_COST = 16
#: Elements of the largest temporary of :func:`_kron_gram` (one block of rows; 8 bytes each in float64).
KRON_GRAM_BLOCK = 4_000_000


def _kron_gram(Phi: torch.Tensor, Psi: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    r"""Gram matrix C = ŨᵀŨ of the factor Ũ = [√T ∘ (φ_ωd ⊗ ψ_ωt)]_{ω,d,t} without forming Ũ.

    C[(ω,d,t), (ω',d',t')] = Σ_ij T_ij Φ_ω[i,d] Φ_ω'[i,d'] Ψ_ω[j,t] Ψ_ω'[j,t'], columns ordered (ω, d, t);
    Φ (R, a, D), Ψ (R, b, k), T (a, b). Per block of rows: H_i = Ψᵀ diag(T_i) Ψ (one batched matmul over i,
    a·b·(Rk)² flops in all), then the sum over i against Φ (a·m² flops, m = R·D·k) — instead of the
    a·b·m² flops of ŨᵀŨ. Only the blocks ω' ≥ ω are computed; the rest is their transpose.
    """
    R, a, D = Phi.shape
    b, k = Psi.shape[1:]
    m = R * D * k
    Psi2 = Psi.permute(1, 2, 0).reshape(b, k, R)                          # [j, t', ω']
    TPsi = T.unsqueeze(1) * Psi.transpose(-1, -2).reshape(1, R * k, b)   # [i, (ω,t), j]
    PhiT = Phi.permute(1, 2, 0).contiguous()                             # [i, d', ω']
    PhiL = Phi.transpose(-1, -2)                                         # [ω, d, i]
    C = Phi.new_zeros(m, D, k, R)                                        # [(ω,d,t), d', t', ω']
    step = max(1, KRON_GRAM_BLOCK // (a * k * m))
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        Rc, Rs = r1 - r0, R - r0
        H = TPsi[:, r0 * k:r1 * k] @ Psi2[:, :, r0:].reshape(b, k * Rs)        # [i, (ω,t), (t',ω')]
        V = H.reshape(a, Rc * k, 1, k, Rs) * PhiT[:, None, :, None, r0:]       # [i, (ω,t), d', t', ω']
        V = V.reshape(a, Rc, k * D * k * Rs).transpose(0, 1)                  # [ω, i, (t,d',t',ω')]
        C[r0 * D * k:r1 * D * k, :, :, r0:] = (PhiL[r0:r1] @ V).reshape(Rc * D * k, D, k, Rs)
    C = C.permute(0, 3, 1, 2).reshape(m, m).triu()
    return C + C.triu(1).transpose(0, 1)


def _kron_apply_t(Phi: torch.Tensor, Psi: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Σ_ij Φ_ω[i,d] Y_ij Ψ_ω[j,t], i.e. (Φ_ω ⊗ Ψ_ω)ᵀ vec Y, shape (R, D, k)."""
    return Phi.transpose(-1, -2) @ (Y @ Psi)


def _kron_apply(Phi: torch.Tensor, Psi: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_ω Φ_ω g_ω Ψ_ωᵀ, i.e. Σ_ω (Φ_ω ⊗ Ψ_ω) vec g_ω, shape (a, b)."""
    R, a, k = Phi.shape[0], Phi.shape[1], Psi.shape[-1]
    return (Phi @ g).permute(1, 0, 2).reshape(a, R * k) @ Psi.transpose(-1, -2).reshape(R * k, -1)


def _damped_prox_solve_kron(Phi: torch.Tensor, Psi: torch.Tensor, d: torch.Tensor, r: torch.Tensor,
                            w_old: torch.Tensor, rcond: float) -> torch.Tensor:
    r""":func:`_damped_prox_solve` for K = Σ_ω (Φ_ωΦ_ωᵀ) ⊗ (Ψ_ωΨ_ωᵀ), given by its factors Φ (R, a, D),
    Ψ (R, b, k) (row-major vec of (a, b) matrices), d = diag K (a, b), r = B − K w_old (a, b), w_old (a, b).

    With the Jacobi scale s (a, b) and the factor Ũ = [s ∘ (φ_ωd ⊗ ψ_ωt)] of K̃ = ŨŨᵀ (m = R·D·k columns),
    f(K̃) r̃ = Ũ h(ŨᵀŨ) Ũᵀ r̃ with h(e) = f(e)/e (exact for the filter of :func:`_damped_prox_solve`, since
    f(0) = 0). ŨᵀŨ comes from :func:`_kron_gram`; Ũᵀ r̃ and Ũ g are matvecs through the factors. Regions
    whose Φ_ω or Ψ_ω is identically 0 (all of a region's columns of Ũ are then 0, exactly) are left out: that
    changes nothing but the size of the m × m system. Cost O(a·b·(Rk)² + a·m² + m³) instead of O((ab)³).
    """
    live = (Phi != 0).flatten(1).any(1) & (Psi != 0).flatten(1).any(1)
    if not bool(live.all()):
        Phi, Psi = Phi[live], Psi[live]
    s = _jacobi_scale(d)
    T = s * s
    R, a, D = Phi.shape
    k = Psi.shape[-1]
    if R == 0:
        return w_old.clone()
    swap = a * k > Psi.shape[1] * D  # sum the smaller side of the Gram in its second stage
    if swap:
        C = _kron_gram(Psi, Phi, T.T).reshape(R, k, D, R, k, D)
        C = C.permute(0, 2, 1, 3, 5, 4).reshape(R * D * k, -1)
    else:
        C = _kron_gram(Phi, Psi, T)
    C.diagonal().add_(float(rcond))   # A = C + λI in place: the Gram path needs no product with C
    g = _filter_shifted(C, None, _kron_apply_t(Phi, Psi, T * r).reshape(-1, 1), float(rcond), gram=True)
    return w_old + T * _kron_apply(Phi, Psi, g.reshape(R, D, k))


def _kron_matvec(G: torch.Tensor, M: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """K vec Y for K = Σ_ω G_ω ⊗ M_ω (symmetric G (R, a, a), M (R, b, b); row-major vec): Σ_ω G_ω Y M_ω, (a, b)."""
    return (G @ Y @ M).sum(0)


class FactoredG(NamedTuple):
    """The left Kronecker factors G_ω = F_ωᵀ (ΛF)_ω of a hidden layer's K by F and FL = ΛF (R, D, a), for
    :func:`_damped_prox_solve_dense_kron` when the (R, a, a) G_ω would be the largest array of the solve (the first
    layer of a wide decoder: a = n_out wide, b = S + 1)."""

    F: torch.Tensor
    FL: torch.Tensor


def _dense_kron_terms(G, M: torch.Tensor):
    """(diag K (a, b), Y ↦ K vec Y (a, b), K4 [i, k, l, j] = Σ_ω G_ω[i,k] M_ω[l,j]) for G (R, a, a) or
    :class:`FactoredG`. With factors: diag G_ω = Σ_d F ∘ FL, K vec Y = Σ_{ω,d} F_ωdᵀ (FL_ω Y M_ω)_d (one product
    over (ω, d)), K4 = Σ_{ω,d} (M_ω[l,j] F_ωd[i]) FL_ωd[k] (b² products of (a, R·D) and (R·D, a)): O(R·D·a·b²)
    memory instead of the R·a² of the G_ω."""
    R, b = M.shape[0], M.shape[-1]
    diag_m = torch.diagonal(M, dim1=-2, dim2=-1)
    if not isinstance(G, FactoredG):
        a = G.shape[-1]
        K4 = (G.reshape(R, a * a).T @ M.reshape(R, b * b)).reshape(a, a, b, b)
        return torch.diagonal(G, dim1=-2, dim2=-1).T @ diag_m, (lambda Y: _kron_matvec(G, M, Y)), K4
    F, FL = G
    D, a = F.shape[1:]
    F_flat = F.reshape(R * D, a)

    def matvec(Y):
        return F_flat.T @ ((FL @ Y) @ M).reshape(R * D, b)

    U = (M.reshape(R, 1, b * b, 1) * F.unsqueeze(-2)).permute(2, 3, 0, 1).reshape(b * b, a, R * D)
    K4 = (U @ FL.reshape(R * D, a)).permute(1, 2, 0).reshape(a, a, b, b)
    return (F * FL).sum(1).T @ diag_m, matvec, K4


def _damped_prox_solve_dense_kron(G, M: torch.Tensor, B: torch.Tensor, w_old: torch.Tensor,
                                  rcond: float) -> torch.Tensor:
    r""":func:`_damped_prox_solve` for K = Σ_ω G_ω ⊗ M_ω given by its symmetric Kronecker factors G (R, a, a) (or
    :class:`FactoredG`), M (R, b, b) (row-major vec of (a, b) matrices), B and w_old (a, b): the same filtered step,
    with K̃ assembled once, already scaled and shifted.

    A = K̃ + λI = s K s + λI is written by one matrix product over regions (K[(i,j),(k,l)] = Σ_ω G_ω[i,k] M_ω[l,j])
    and one scaled copy into the (ij, kl) layout; only its lower triangle is used (Cholesky), so K is not
    symmetrised. diag K = Σ_ω diag G_ω diag M_ωᵀ, K w_old and the final K̃ y are products through the factors
    (:func:`_dense_kron_terms`, O(R·ab(a+b)) each), so no n × n matrix besides A (and its Cholesky factor) is formed:
    the cost is one n × n product plus one Cholesky (n = ab), instead of four further n × n passes (symmetrising,
    scaling, copying) of :func:`_damped_prox_solve` on an assembled K. Dead coordinates (zero rows of every G_ω or
    columns of every M_ω) have zero rows in K and B exactly and keep their old values bit-for-bit.
    """
    d, matvec, K4 = _dense_kron_terms(G, M)
    a, b = d.shape
    s = _jacobi_scale(d)
    r = s * (B - matvec(w_old))
    A = torch.empty(a, b, a, b, dtype=M.dtype, device=M.device)
    torch.mul(K4.permute(0, 3, 1, 2), s.reshape(a, b, 1, 1) * s.reshape(1, 1, a, b), out=A)
    del K4
    A = A.reshape(a * b, a * b)
    lam = float(rcond)
    A.diagonal().add_(lam)

    def apply_C(y):
        return (s * matvec(s * y.reshape(a, b))).reshape(-1, 1)

    return w_old + s * _filter_shifted(A, apply_C, r.reshape(-1, 1), lam).reshape(a, b)


def update_layer(maps: list, l: int, net, stats: EStepStats, obs_var: torch.Tensor, *,
                 rcond: float = DEFAULT_RCOND, dense_max: int = DEFAULT_DENSE_MAX,
                 solver: str = "auto", cg_iters: int | None = None,
                 cg_gain_rtol: float | None = None, rm=None, F=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximiser of Q over layer l's (W_l, v_l), the other layers and σx² fixed (module docstring): exact in
    every direction whose Jacobi-scaled curvature exceeds ``rcond`` (:func:`_damped_prox_solve`).

    The system K vec W̃ = vec B is solved densely (n = n_out·(n_in+1) unknowns, O(n³)) or through the
    factors K = Σ_ω (Φ_ωΦ_ωᵀ) ⊗ (Ψ_ωΨ_ωᵀ), Φ_ω = F_ωᵀΛ^{1/2}, Ψ_ω Ψ_ωᵀ = M_ω (m = R·D·(S+1) columns; the
    m × m Gram matrix of the scaled factor, O(n·(R(S+1))² + n_out·m² + m³), :func:`_damped_prox_solve_kron`),
    whichever is cheaper (``solver="auto"``; ``"dense"`` / ``"factored"`` force one); a
    :class:`PyroCPAError` is raised when min(n, m) exceeds ``dense_max``. Both give the same filtered step
    (to rounding). ``"auto"`` takes ``"cg"`` (below) instead when min(n, m) >= :data:`CG_AUTO_MIN_UNKNOWNS`.

    ``solver="cg"`` (hidden layers; the output layer is always solved exactly) instead takes at most ``cg_iters``
    conjugate-gradient iterations through the factors (:func:`_cg_prox_solve_kron`), stopping early once an
    iteration adds at most ``cg_gain_rtol`` of the progress made (:data:`CG_GAIN_RTOL`): an inexact block maximiser
    that never lowers Q, O(cg_iters · n·R·(S+1)) instead of O(n³) and no n × n or m × m matrix (``dense_max`` does
    not apply).

    ``rm``: the frozen region maps of ``maps`` and ``stats.patterns`` when the caller has them
    (:class:`RegionMapsMemo`); computed otherwise. ``F``: the output Jacobians F_ω of layer l under ``maps``
    (:func:`_output_jacobians`) when the caller has them; computed otherwise.
    """
    if solver not in ("auto", "dense", "factored", "cg"):
        raise PyroCPAError(f"solver must be 'auto', 'dense', 'factored' or 'cg', got {solver!r}")
    if l == len(maps) - 1:
        return _update_output_layer(maps, net, stats, rcond, rm)
    R, S, (n_out, n_in) = stats.Z.shape[0], stats.Z.shape[-1] - 1, maps[l][0].shape
    a, bdim, D = n_out, n_in + 1, maps[-1][0].shape[0]
    n, m = a * bdim, R * D * (S + 1)
    cg = solver == "cg" or (solver == "auto" and min(n, m) >= CG_AUTO_MIN_UNKNOWNS)
    # the CG path forms B from its per-region factors Y_ω after grouping the regions (_layer_rhs)
    Pt, F, FL, B_or_Y, Wt_old, lam_x, slopes = _hidden_normal_equations(maps, l, net, stats, obs_var, rm, rhs=not cg,
                                                                         F=F)
    if cg:
        # regions sharing layer l's input map (equal patterns before l) share one P̃ in the CG products
        groups = _input_groups(stats.patterns, l, R, Pt.device)
        Phi, Psi, d = _layer_factors(Pt, F, lam_x, stats, groups if groups[0].numel() < R else None)
        B = _layer_rhs(Pt, FL, B_or_Y, Psi)
        # the last hidden layer: F_ω = W_L diag(slopes_ω), so Φ_ω = diag(slopes_ω) W_Lᵀ Λ^{1/2} (one shared factor)
        shared = (slopes[l].expand(R, a), maps[-1][0].T * lam_x.sqrt()) if l == len(maps) - 2 else None
        Wt = _cg_prox_solve_kron(Phi, Psi, d, B, Wt_old, rcond, CG_ITERS if cg_iters is None else cg_iters,
                                 CG_GAIN_RTOL if cg_gain_rtol is None else cg_gain_rtol, shared=shared)
        return Wt[:, :n_in].contiguous(), Wt[:, n_in].contiguous()
    if min(n, m) > dense_max:
        raise PyroCPAError(
            f"m_step: layer {l} has {n} unknowns and its system {m} factor columns, both above "
            f"dense_max={dense_max}; "
            f"raise dense_max (memory ~ 8·min(n, m)² bytes) or use m_step_method='gradient'")
    k = S + 1
    dense = (n ** 3 / 3 + a * a * bdim * bdim * R <= KRON_GRAM_FLOP_COST * (n * (R * k) ** 2 + a * m * m) + m ** 3 / 3
             if solver == "auto" else solver == "dense")
    if dense:
        M = Pt @ stats.Z @ Pt.transpose(-1, -2)  # (R, n_in+1, n_in+1)
        M = 0.5 * (M + M.transpose(-1, -2))
        if bdim * bdim * D < a:   # the first layer of a wide decoder: the (R, n_out, n_out) G_ω would dominate
            G = FactoredG(F, FL)
        else:
            G = F.transpose(-1, -2) @ FL  # (R, n_out, n_out)
            G = 0.5 * (G + G.transpose(-1, -2))
        # K[(i,j),(k,l)] = Σ_ω G[i,k] M[l,j]  (row-major vec of W̃), one matmul over regions.
        w = _damped_prox_solve_dense_kron(G, M, B_or_Y, Wt_old, rcond)
    else:
        Phi, Psi, d = _layer_factors(Pt, F, lam_x, stats)
        Kw = _kron_apply(Phi, Psi, _kron_apply_t(Phi, Psi, Wt_old))
        w = _damped_prox_solve_kron(Phi, Psi, d, B_or_Y - Kw, Wt_old, rcond)
    Wt = w.reshape(a, bdim)
    return Wt[:, :n_in].contiguous(), Wt[:, n_in].contiguous()


def _layer_inputs(maps: list, l: int, net, stats: EStepStats, rm=None):
    """Layer l's augmented inputs per region, P̃_ω = [[P_ω, p_ω], [0, 1]] (R, n_in+1, S+1) (the layer's input is
    P_ω z + p_ω on region ω, the other layers frozen), W̃_old = [W_l, v_l] (n_out, n_in+1), and the frozen maps
    (``rm``, those of ``maps`` and ``stats.patterns``, when given; else computed)."""
    if rm is None:
        rm = frozen_region_maps(maps, net.activations, stats.patterns)
    W, v = maps[l]
    n_in = W.shape[1]
    R = stats.Z.shape[0]
    S = stats.Z.shape[-1] - 1
    P, p = rm.layer_inputs[l]
    Pt = W.new_zeros(R, n_in + 1, S + 1)
    Pt[:, :n_in, :S] = P.expand(R, n_in, S)
    Pt[:, :n_in, S] = p.expand(R, n_in)
    Pt[:, n_in, S] = 1.0
    return Pt, torch.cat([W, v.unsqueeze(-1)], dim=-1), rm


def _update_output_layer(maps: list, net, stats: EStepStats, rcond: float,
                         rm=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`update_layer` of the last layer (F = I, c = 0: W̃ ΣM = ΣR, Λ cancels; all rows at once)."""
    l = len(maps) - 1
    W = maps[l][0]
    n_out, n_in = W.shape
    R = stats.Z.shape[0]
    S = stats.Z.shape[-1] - 1
    Pt, Wt_old, _ = _layer_inputs(maps, l, net, stats, rm)  # (R, n_in+1, S+1), (n_out, n_in+1)
    # ΣM = Σ_ω P̃_ω Z_ω P̃_ωᵀ as one product.
    PZ = (Pt @ stats.Z).transpose(0, 1).reshape(n_in + 1, R * (S + 1))
    Msum = PZ @ Pt.transpose(0, 1).reshape(n_in + 1, R * (S + 1)).T
    Rsum = stats.X.transpose(0, 1).reshape(-1, R * (S + 1)) @ Pt.transpose(-1, -2).reshape(R * (S + 1), -1)
    Wt = _damped_prox_solve(0.5 * (Msum + Msum.T), Rsum.T, Wt_old.T, rcond).T
    return Wt[:, :n_in].contiguous(), Wt[:, n_in].contiguous()


def _hidden_normal_equations(maps: list, l: int, net, stats: EStepStats, obs_var: torch.Tensor, rm=None,
                             rhs: bool = True, F=None):
    """Hidden layer l's normal equations K vec W̃ = vec B (module docstring) by their pieces:
    (P̃ (R, n_in+1, S+1), F (R, D, n_out), ΛF, B (n_out, n_in+1), W̃_old, Λ's diagonal (D,), the frozen slopes of
    every hidden layer [(R, n_k)]). ``rhs=False``: instead of B, its per-region factors Y_ω = X_ω − c_ω s_ωᵀ
    (R, D, S+1), B = Σ_ω F_ωᵀΛ Y_ω P̃_ωᵀ (for a grouped sum, :func:`_grouped_ops`). ``F``: the output Jacobians when
    the caller has them (:func:`_output_jacobians`)."""
    W = maps[l][0]
    n_out, n_in = W.shape
    R = stats.Z.shape[0]
    S = stats.Z.shape[-1] - 1
    Pt, Wt_old, rm = _layer_inputs(maps, l, net, stats, rm)  # (R, n_in+1, S+1), (n_out, n_in+1)
    s = stats.Z[:, :, S]  # (R, S+1)
    lam_x = obs_var.reciprocal()  # (D,)
    if F is None:
        F = _output_jacobians(maps, rm.slopes, l, R)  # (R, D, n_out)
    m_l = rm.preactivations[l][1].expand(R, n_out)
    c = rm.b - torch.einsum("rdk,rk->rd", F, m_l)  # (R, D)
    Y = stats.X - c.unsqueeze(-1) * s.unsqueeze(-2)  # (R, D, S+1)
    FL = F * lam_x.unsqueeze(-1)  # Λ F, (R, D, n_out)
    return Pt, F, FL, _layer_rhs(Pt, FL, Y) if rhs else Y, Wt_old, lam_x, rm.slopes


def _layer_rhs(Pt: torch.Tensor, FL: torch.Tensor, Y: torch.Tensor, Psi=None) -> torch.Tensor:
    """B = Σ_ω F_ωᵀΛ Y_ω P̃_ωᵀ (n_out, n_in+1) from ΛF (R, D, n_out), Y_ω = X_ω − c_ω s_ωᵀ (R, D, S+1) and P̃ (R, n_in+1,
    S+1) (:func:`_hidden_normal_equations`). With :class:`GroupedInputs` ``Psi``, B = Σ_g (Σ_{ω ∈ g} F_ωᵀΛ Y_ω) P̃_gᵀ: the
    small (n_out, S+1) terms summed over each group's regions, then one product (:func:`_grouped_ops`), instead of one
    (D, n_in+1) product per region (measured, one thread: [1,128,128,2] 0.58 -> 0.19 ms, [1,64,64,64,10] 0.7-0.8 ->
    0.08-0.1 ms per layer)."""
    if isinstance(Psi, GroupedInputs):
        return _grouped_ops(Psi)[1](Y.transpose(-1, -2) @ FL)
    return torch.einsum("rdk,rdj->kj", FL, Y @ Pt.transpose(-1, -2))


class GroupedInputs(NamedTuple):
    r"""The input side of a hidden layer's K = Σ_ω (Φ_ωΦ_ωᵀ) ⊗ (Ψ_ωΨ_ωᵀ) by groups of regions that share the layer's
    input map: Ψ_ωΨ_ωᵀ = P̃_{g(ω)} Z̃_ω P̃_{g(ω)}ᵀ with ``P`` (G, b, k) the distinct augmented input maps P̃_g,
    ``index`` (R,) the group g(ω) of every region and ``Z`` (R, k, k) the moments Z̃_ω = Z_ω^{1/2} Z_ω^{1/2 T} (Z_ω's
    eigenvalues clamped at 0, as in Ψ_ω = P̃_ω Z_ω^{1/2}; symmetrised). Layer l's input map depends only on the activation
    patterns of the layers before l, so regions with equal patterns there share it (:func:`_input_groups`)."""

    P: torch.Tensor
    index: torch.Tensor
    Z: torch.Tensor


def _input_groups(patterns, l: int, R: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(first region of every group (G,), group of every region (R,)) for the regions' equal patterns of the
    activation layers before l (layer l's input map is a function of those patterns alone; one group for l = 0).
    Groups are numbered in the order of their patterns (``torch.unique``): a deterministic function of the
    patterns, whatever the thread count."""
    if l == 0:
        return torch.zeros(1, dtype=torch.long, device=device), torch.zeros(R, dtype=torch.long, device=device)
    key = torch.cat([q.reshape(R, -1).to(device=device, dtype=torch.uint8) for q in patterns[:l]], dim=1)
    _, index = torch.unique(key, dim=0, return_inverse=True)
    first = torch.full((int(index.max()) + 1,), R, dtype=torch.long, device=device)
    first.scatter_reduce_(0, index, torch.arange(R, device=device), reduce="amin")
    return first, index


def _layer_factors(Pt: torch.Tensor, F: torch.Tensor, lam_x: torch.Tensor, stats: EStepStats, groups=None):
    """Factors of K = Σ_ω (Φ_ωΦ_ωᵀ) ⊗ (Ψ_ωΨ_ωᵀ): Φ_ω = F_ωᵀ Λ^{1/2} (R, n_out, D), Ψ_ω = P̃_ω Z_ω^{1/2}
    (R, n_in+1, S+1) with Z^{1/2} from eigh, and d = diag K = Σ_ω diag G_ω diag M_ωᵀ (n_out, n_in+1).

    ``groups`` = (first, index) of :func:`_input_groups`: the input side is returned instead as
    :class:`GroupedInputs` (the same Ψ_ωΨ_ωᵀ through P̃ of each group's first region, Z̃_ω = Z_ω^{1/2}Z_ω^{1/2 T})."""
    ez, Vz = torch.linalg.eigh(stats.Z)
    half = Vz * ez.clamp_min(0.0).sqrt().unsqueeze(-2)
    Psi = Pt @ half
    Phi = (F * lam_x.sqrt().unsqueeze(-1)).transpose(-1, -2)
    d = (Phi * Phi).sum(-1).T @ (Psi * Psi).sum(-1)
    if groups is None:
        return Phi, Psi, d
    first, index = groups
    Zt = half @ half.transpose(-1, -2)
    return Phi, GroupedInputs(Pt[first], index, 0.5 * (Zt + Zt.transpose(-1, -2))), d


def _cg_prox_solve_kron(Phi: torch.Tensor, Psi, d: torch.Tensor, B: torch.Tensor, w_old: torch.Tensor,
                        rcond: float, iters: int, gain_rtol: float, shared=None) -> torch.Tensor:
    r"""Truncated conjugate gradients for the damped layer step, K = Σ_ω (Φ_ωΦ_ωᵀ) ⊗ (Ψ_ωΨ_ωᵀ) given by its factors
    Φ (R, a, D), Ψ (R, b, k) or :class:`GroupedInputs`, d = diag K (a, b), B and w_old (a, b).

    In the Jacobi-scaled units of :func:`_damped_prox_solve` (s, K̃ = sKs, r̃ = s(B − K w_old), A = K̃ + λI,
    λ = ``rcond``) it returns w_old + s y_j, y_j the j-th CG iterate from y_0 = 0 for A y = r̃, j the first index
    with ‖r̃ − A y_j‖₂ <= ``CG_RTOL`` ‖r̃‖₂, or whose step decreased φ by at most ``gain_rtol`` times φ(0) − φ(y_j)
    (:data:`CG_GAIN_RTOL`; 0 disables the rule), or ``iters``. y_j minimises φ(y) = ½ yᵀAy − r̃ᵀy over the Krylov space
    span{r̃, A r̃, …, A^{j−1} r̃}, and φ(y_j) <= φ(0) = 0; the gain of Q is r̃ᵀy − ½ yᵀK̃y = −φ(y) + ½λ‖y‖² >= 0,
    so this block never lowers Q (an inexact, generalised-EM block maximiser). CG resolves the well-determined
    directions (the top of K̃'s spectrum) first: the iteration cap acts as the damping (CG as a regularising
    iteration), and for well-conditioned A (e_max/λ small) the early stop makes it the exact damped solve
    (A⁻¹ r̃, Tikhonov, not the filter f of :func:`_damped_prox_solve`). Products with K̃ go through the factors,
    K vec Y = Σ_ω Φ_ω (Φ_ωᵀ Y Ψ_ω) Ψ_ωᵀ (two plain and two batched matrix products): O(R·a·b·k) per iteration,
    K̃ is never formed. λ must be positive: pᵀAp >= λ‖p‖² then keeps every CG step finite (the rounding of pᵀK̃p,
    ~ε‖K̃‖‖p‖² with ‖K̃‖ <= a·b in the scaled units, is far below it for λ >= ``DEFAULT_RCOND``-sized dampings). The
    iteration count depends only on those products' results, so equal statistics give equal steps. Dead coordinates
    (zero rows of K and B) have r̃ = 0 and a zero row of K̃ exactly and keep their old values bit-for-bit.

    With :class:`GroupedInputs` (G groups of regions sharing P̃_g) the product is
    K vec Y = Σ_g [Σ_{ω ∈ g} Φ_ω (Φ_ωᵀ (Y P̃_g) Z̃_ω)] P̃_gᵀ: the two (a, b)-sized products run over G·k instead of
    R·k columns (the per-region work, O(R·a·D·k), is small beside them), the same maths as the per-region product.
    Measured (one thread, one product): [1,128,128,2], R = 269 regions in G = 129 groups, 0.64 → 0.41 ms;
    [1,64,64,64,10], R = 206, its middle layer (G = 65) 0.25 → 0.145 ms, its last hidden layer (G = 133) 0.17 → 0.16 ms.

    ``shared = (σ (R, a), C (a, D))`` states Φ_ω = diag(σ_ω) C (the last hidden layer: C = W_Lᵀ Λ^{1/2}, σ_ω its frozen
    slopes); with per-region Ψ_ω the products then take two plain products with C instead of the two batched ones,
    Φ_ωᵀ U_ω = Cᵀ (σ_ω ∘ U_ω) (the same maths; measured [1,128,128,2], R = 300: 0.77 → 0.3 ms per product). With
    :class:`GroupedInputs` it is not used (the batched products through Φ_ω cost less there, :func:`_kron_product`).
    """
    if iters < 1:
        raise PyroCPAError(f"cg_iters must be >= 1, got {iters}")
    if not gain_rtol >= 0.0:
        raise PyroCPAError(f"cg_gain_rtol must be >= 0, got {gain_rtol}")
    if not float(rcond) > 0.0:
        raise PyroCPAError(f"the CG layer solve needs a positive damping rcond, got {rcond}")
    grouped = isinstance(Psi, GroupedInputs)
    live = (Phi != 0).flatten(1).any(1) & ((Psi.Z if grouped else Psi) != 0).flatten(1).any(1)   # a nonzero term
    if not bool(live.all()):
        Phi = Phi[live]
        Psi = GroupedInputs(Psi.P, Psi.index[live], Psi.Z[live]) if grouped else Psi[live]
        shared = None if shared is None else (shared[0][live], shared[1])
    if Phi.shape[0] == 0:   # K = 0 and B = 0 exactly: no region carries a term, nothing moves
        return w_old.clone()
    s = _jacobi_scale(d)
    lam = float(rcond)
    R, a, D = Phi.shape
    K = _kron_product(Phi, Psi, shared)

    r = s * (B - K(w_old))
    if not (bool(torch.isfinite(d).all()) and bool(torch.isfinite(r).all())):
        raise PyroCPAError(_OVERFLOW)
    # the iteration's vectors are updated in place (y, res, p are this loop's own tensors; a·b elements each, a few
    # passes per iteration instead of a fresh temporary per operation)
    y = torch.zeros_like(r)
    res = r.clone()
    p = r.clone()
    rr = _sq(res)
    stop = CG_RTOL ** 2 * rr
    decrease = 0.0   # φ(0) − φ(y_j) = Σ_i ½ α_i ‖res_i‖² (the CG identity)
    for _ in range(iters):
        if rr <= stop:   # also r̃ = 0 (stop = 0): nothing to solve
            break
        Ap = K(s * p).mul_(s).add_(p, alpha=lam)                           # (K̃ + λI) p
        alpha = rr / float(torch.dot(p.reshape(-1), Ap.reshape(-1)))   # pᵀAp >= λ‖p‖² > 0 while rr > 0
        y.add_(p, alpha=alpha)
        res.sub_(Ap, alpha=alpha)
        step_decrease = 0.5 * alpha * rr
        decrease += step_decrease
        if step_decrease <= gain_rtol * decrease:
            break
        rr, rr_old = _sq(res), rr
        p.mul_(rr / rr_old).add_(res)
    return w_old + s * y


def _sq(t: torch.Tensor) -> float:
    """‖t‖₂² by one dot product (no temporary)."""
    v = t.reshape(-1)
    return float(torch.dot(v, v))


def _grouped_ops(Psi: GroupedInputs):
    """(inputs, adjoint) of grouped input maps in the layout [ω, t, i] (units i innermost): inputs(Y) = (Y P̃_{g(ω)})ᵀ
    per region (R, k, a) for Y (a, b), computed once per group (one product, G·a·b·k flops) and gathered; adjoint(H) =
    Σ_ω H_ωᵀ P̃_{g(ω)}ᵀ = Σ_g (Σ_{ω ∈ g} H_ω)ᵀ P̃_gᵀ (a, b) for H (R, k, a), the transpose of ``inputs`` (a sum over each
    group's regions, then one product)."""
    P, index, _ = Psi
    G, b, k = P.shape
    P_rows = P.transpose(-1, -2).reshape(G * k, b)      # [(g,t), j]

    def inputs(Y):
        return (P_rows @ Y.T).reshape(G, k, -1).index_select(0, index)

    def adjoint(H):
        a = H.shape[-1]
        return H.new_zeros(G, k, a).index_add_(0, index, H).reshape(G * k, a).T @ P_rows
    return inputs, adjoint


def _kron_product(Phi: torch.Tensor, Psi, shared=None):
    """Y ↦ K vec Y = Σ_ω Φ_ω (Φ_ωᵀ Y Ψ_ω) Ψ_ωᵀ (a, b) for :func:`_cg_prox_solve_kron` (its factors, same meaning)."""
    R, a, D = Phi.shape
    PhiT = Phi.transpose(-1, -2)
    if not isinstance(Psi, GroupedInputs):
        if shared is not None:
            sig = shared[0].T.unsqueeze(-1)                 # [i, ω, 1]
            C, CT = shared[1], shared[1].T.contiguous()     # (a, D), (D, a)
        b, k = Psi.shape[1:]
        P_cols = Psi.permute(1, 0, 2).reshape(b, R * k)     # [j, (ω,t)]
        P_rows = Psi.transpose(-1, -2).reshape(R * k, b)    # [(ω,t), j]
        if shared is None:
            def K(Y):   # two plain products and two batched (R, ·, ·) ones
                g = PhiT @ (Y @ P_cols).reshape(a, R, k).transpose(0, 1)                 # (R, D, k)
                return (Phi @ g).transpose(0, 1).reshape(a, R * k) @ P_rows
        else:
            def K(Y):   # the same with Φ_ω = diag(σ_ω) C: four plain products
                g = CT @ ((Y @ P_cols).reshape(a, R, k) * sig).reshape(a, R * k)        # [d, (ω,t)]
                return ((C @ g).reshape(a, R, k) * sig).reshape(a, R * k) @ P_rows
        return K

    # Grouped inputs: the per-region middle by three batched products through Φ_ω, whose rows Φ_ωᵀ are copied once
    # (contiguous) — with or without ``shared``: measured one thread, per product, [1,128,128,2] (last hidden layer,
    # R = 280-308) 0.43-0.46 ms through the shared factor's four plain products and two scalings vs 0.33-0.39 ms;
    # [1,64,64,64,10] 0.15-0.21 ms either way.
    inputs, adjoint = _grouped_ops(Psi)
    Zt = Psi.Z
    Phi_rows = Phi.transpose(-1, -2).contiguous()           # [ω, d, i]

    def K(Y):   # Y P̃_g once per group; Φ_ωᵀ (·) Z̃_ω and Φ_ω (·) per region; Σ over regions through P̃_gᵀ
        return adjoint((Zt @ (inputs(Y) @ Phi)) @ Phi_rows)                            # [ω, t, i] in the middle
    return K


def update_variances(maps, net, stats: EStepStats, obs_var: torch.Tensor, prior_var: torch.Tensor, *,
                     obs_noise: str = "isotropic", update_prior_scale: bool = False, update_obs_scale: bool = True,
                     min_obs_var: float = DEFAULT_MIN_OBS_VAR, rm=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form σx² (isotropic or diagonal; kept if not ``update_obs_scale``) and, optionally, σz².
    ``rm``: the frozen region maps of ``maps`` and ``stats.patterns`` when the caller has them; computed otherwise."""
    if rm is None:
        rm = frozen_region_maps(maps, net.activations, stats.patterns)
    r = expected_sq_residual(rm.A, rm.b, stats)
    N = stats.num_data
    D, S = r.shape[0], stats.Z.shape[-1] - 1
    if obs_noise == "isotropic":
        new_obs = (r.sum() / (N * D)).expand(D).clone()
    elif obs_noise == "diagonal":
        new_obs = r / N
    else:
        raise PyroCPAError(f"obs_noise must be 'isotropic' or 'diagonal', got {obs_noise!r}")
    new_obs = new_obs.clamp_min(min_obs_var) if update_obs_scale else obs_var.clone()
    if update_prior_scale:
        new_prior = torch.diagonal(stats.Z[:, :S, :S], dim1=-2, dim2=-1).sum(0) / N
    else:
        new_prior = prior_var.clone()
    return new_obs, new_prior


def prior_expansion(maps, stats: EStepStats, prior_var) -> list:
    r"""Parameter-expanded (PX-EM) update of the latent's location and shape, folded into the first layer.

    Expand the prior to z ~ N(α, Σ) (θ fixed). Its EM update only involves the prior term of Q, which does
    not depend on the partition, so it is an exact EM step of the expanded model:
    α = (1/N) Σ_n E[z | x_n], Σ = (1/N) Σ_n E[z zᵀ | x_n] − α αᵀ. The expanded model is reduced to the
    original one exactly by z = α + L diag(σz)⁻¹ u, u ~ N(0, diag σz²), L = chol(Σ) (Σ's eigenvalues floored
    at ``PX_MIN_REL`` · max σz², so that L always exists and depends continuously on Σ):

        W_0 ← W_0 L diag(σz)⁻¹,   v_0 ← v_0 + W_0 α,

    which leaves the marginal p(x) unchanged. Hence this block never decreases the exact likelihood, and it
    removes EM's slow convergence along the (α, Σ) directions (Liu, Rubin & Wu 1998): e.g. the output
    bias of plain EM approaches the data mean at rate 1 − σx²/λ_max only.
    """
    S = stats.Z.shape[-1] - 1
    N = stats.num_data
    W0, v0 = maps[0]
    sz = _as_var(prior_var, S, W0).sqrt()
    alpha = stats.Z[:, :S, S].sum(0) / N
    Sigma = stats.Z[:, :S, :S].sum(0) / N - torch.outer(alpha, alpha)
    Sigma = 0.5 * (Sigma + Sigma.T)
    # Eigenvalues floored at PX_MIN_REL·max σz² (a continuous map, no fail/succeed branch on a computed
    # matrix): a collapsed posterior spread shrinks the first layer by at most √PX_MIN_REL per step.
    e, V = torch.linalg.eigh(Sigma)
    e = e.clamp_min(PX_MIN_REL * float(sz.square().max()))
    L = torch.linalg.cholesky((V * e) @ V.T)
    out = list(maps)
    out[0] = (W0 @ L / sz, v0 + W0 @ alpha)
    return out


def m_step(net, patterns, stats: EStepStats, obs_var, prior_var, *, obs_noise: str = "isotropic",
           update_prior_scale: bool = False, update_obs_scale: bool = True, sweeps: int = 1, tol: float = 0.0,
           order: str = "forward", rcond: float = DEFAULT_RCOND, min_obs_var: float = DEFAULT_MIN_OBS_VAR,
           dense_max: int = DEFAULT_DENSE_MAX, solver: str = "auto") -> MStepResult:
    """Closed-form (block coordinate ascent) maximisation of the frozen-pattern surrogate Q.

    Args:
        net: the decoder's :class:`~pyro_cpa.nn.CPANetwork`; its current maps are the starting point.
        patterns: frozen activation patterns of the E-step's regions (``stats.patterns``).
        stats: :class:`~pyro_cpa.infer.estep.EStepStats`.
        obs_var: current σx² (scalar or (D,)); prior_var: current σz² (scalar or (S,)).
        obs_noise: ``"isotropic"`` (one σx) or ``"diagonal"`` (one σx per output coordinate).
        update_obs_scale: update σx² (else it is kept fixed).
        update_prior_scale: also update σz² (note the scale of W_0 and σz are not separately identified).
        sweeps: maximum number of sweeps (layers in ``order``, then variances).
        tol: stop early when a sweep raises Q by less than ``max(tol, SWEEP_GAIN_FLOOR) · (1 + |Q|)``.
        order: ``"forward"`` (T_0 … T_L) or ``"backward"`` (T_L … T_0).
        rcond: damping λ of the layer solves in Jacobi-scaled units (:func:`_damped_prox_solve`): directions
            of curvature ≫ λ are solved exactly, those ≪ λ keep their old values; min_obs_var: floor of σx².
        dense_max: largest min(unknowns, factor columns) of a layer system (:func:`update_layer`).
        solver: the hidden layers' solve (:func:`update_layer`): ``"auto"`` (exact), ``"dense"``, ``"factored"``,
            or ``"cg"`` (truncated conjugate gradients, an inexact maximiser that never lowers Q).

    Returns:
        :class:`MStepResult` ``(maps, obs_var, prior_var, q_trace)``; the network is not modified.
    """
    if order not in ("forward", "backward"):
        raise PyroCPAError(f"order must be 'forward' or 'backward', got {order!r}")
    if sweeps < 1:
        raise PyroCPAError(f"sweeps must be >= 1, got {sweeps}")
    patterns = list(patterns)
    if stats.patterns is not patterns and len(patterns) != len(stats.patterns):
        raise PyroCPAError("m_step: patterns do not match the E-step statistics")
    stats = EStepStats(stats.Z, stats.X, stats.q, stats.loglik, patterns, stats.num_data)
    dtype = stats.Z.dtype
    with torch.no_grad():
        maps = [(W.detach().to(dtype).clone(), v.detach().to(dtype).clone()) for W, v in net.affine_maps(dtype)]
        D, S = maps[-1][0].shape[0], maps[0][0].shape[1]
        obs_var = _as_var(obs_var, D, stats.Z).clone()
        prior_var = _as_var(prior_var, S, stats.Z).clone()
        if obs_noise == "isotropic" and not bool((obs_var == obs_var[0]).all()):
            raise PyroCPAError("obs_noise='isotropic' but obs_var differs between coordinates")
        layers = list(range(len(maps)))
        if order == "backward":
            layers.reverse()
        memo = RegionMapsMemo(net.activations)   # the region maps once per parameter state

        def Q():
            rm = memo.get(maps, patterns)
            return float(surrogate_of_region_maps(rm.A, rm.b, stats, obs_var, prior_var))

        q_trace = [Q()]
        for _ in range(sweeps):
            # forward order: layer l's output Jacobians involve the layers after l only, which the sweep has not
            # changed yet when it reaches l: all of them from one product chain at the start of the sweep
            jac = (_output_jacobians(maps, memo.get(maps, patterns).slopes, 0, stats.Z.shape[0], every=True)
                   if order == "forward" else None)
            for l in layers:
                maps[l] = update_layer(maps, l, net, stats, obs_var, rcond=rcond, dense_max=dense_max, solver=solver,
                                       rm=memo.get(maps, patterns), F=None if jac is None or l == len(maps) - 1
                                       else jac[l])
            obs_var, prior_var = update_variances(maps, net, stats, obs_var, prior_var, obs_noise=obs_noise,
                                                  update_prior_scale=update_prior_scale,
                                                  update_obs_scale=update_obs_scale, min_obs_var=min_obs_var,
                                                  rm=memo.get(maps, patterns))
            q_trace.append(Q())
            if q_trace[-1] - q_trace[-2] <= max(tol, SWEEP_GAIN_FLOOR) * (1.0 + abs(q_trace[-1])):
                break
    return MStepResult(maps, obs_var, prior_var, q_trace)
