r"""One verified, monotone step of exact EM for a CPA decoder (the engine under the Pyro ``EM`` trainer).

The frozen-pattern surrogate Q (:mod:`pyro_cpa.infer.mstep`) is an EM lower bound of the likelihood only
while the partition does not move, so every candidate is checked against the exact NLL (the partition
is re-enumerated for the new weights) and backtracked: θ = θ_old + 2^{-k}(θ_new − θ_old) for
k = 0 … ``max_backtracks`` (decoder parameters and σx, σz alike), the first k with
NLL ≤ NLL(θ_old) + tol being kept, θ_old restored exactly if none is; tol = ``monotone_tol`` ·
max(1, Σ_n |log p(x_n; θ_old)|), ``MONOTONE_TOL`` = 1e-12. The scale Σ_n |ℓ_n| bounds the rounding of
the NLL's evaluation (relative errors of each term and of their sum, even when the terms cancel), which is
~1e-15 of it: the accept decision is not decided by that rounding unless a step's true change lies within
~1e-15·Σ|ℓ_n| of tol. Hence the exact NLL never increases by more than tol.

Schedules of :func:`em_step`:

* ``"layerwise"`` (default; expectation–conditional maximisation, Meng & Rubin 1993): one block at a
  time — optionally the parameter-expanded prior block (``px``), each layer, then the variances — each preceded by
  an exact E-step at the current parameters and verified on its own. Since ∇Q = ∇ log p at the E-step's
  parameters (Fisher's identity) and Q is a concave quadratic in one block, every block direction is an
  ascent direction of the exact likelihood: a short enough step is always accepted. Costs one E-step
  per block.
* ``"joint"``: one E-step, ``sweeps`` block-coordinate sweeps of all layers and the variances on the
  frozen surrogate, one line search along θ_old → θ_new. Cheaper, but the coupled blocks make that
  line a *descent* direction of the likelihood surprisingly often (measured on the paper's circle: every
  step after the 6th rejected, stuck at 2.15 nats/sample) — kept for comparison and for the
  generalised (gradient) M-step.
* ``m_step_method="gradient"`` (generalised EM, any CPA decoder, e.g. with BatchNorm): one E-step, L-BFGS
  on −Q over all decoder parameters and log σ (statistics detached), one line search.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from ..errors import PyroCPAError, RegionBudgetExceeded
from ..geometry.regions import DEFAULT_MAX_REGIONS
from ..nn.network import as_cpa_network
from .estep import EStepStats, e_step, weighted_log_prob
from .mstep import DEFAULT_RCOND, expected_complete_loglik, m_step, prior_expansion, update_layer, update_variances

MONOTONE_TOL = 1e-12
#: EM reduces its E-step statistics over consecutive blocks of this many data, one block at a time in data
#: order, whatever the marginal's ``chunk_size`` or the thread count: the same per-datum batches and the
#: same summation order, hence bit-identical statistics. (The EM map is expanding early in training —
#: measured ×10–50 per block update on the circle — so a 1e-16 difference in a sum grew to 1e-3 in the
#: NLL within 10 steps when the summation order followed ``chunk_size``.)
STATS_BLOCK = 256
#: Default floor of σx (``min_obs_scale``). The likelihood is unbounded as σx → 0 when the decoder can pass
#: through every datum (N = 1, N = 2, identical points, N ≤ the decoder's capacity): EM then drives σx down
#: to this floor, and warns (:class:`ObsScaleFloorWarning`).
DEFAULT_MIN_OBS_SCALE = 1e-6


class ObsScaleFloorWarning(UserWarning):
    """EM's σx update reached its floor ``min_obs_scale``: the maximum-likelihood σx is 0 (the decoder fits
    the data exactly, e.g. too few or identical data), so the likelihood is unbounded and the fit degenerate."""


@dataclass
class EMStepResult:
    """Outcome of :func:`em_step`.

    Attributes:
        nll_before: exact −Σ_n log p(x_n) at θ_old.
        nll_after: exact −Σ_n log p(x_n) at the parameters kept (= nll_before if rejected).
        backtracks: number of halvings used (0: the full M-step was accepted).
        accepted: False if every candidate raised the NLL and θ_old was restored.
        step_size: 2^{-backtracks} if accepted, else 0.
        obs_scale, prior_scale: the kept σx (0-dim for isotropic noise, else (D,)) and σz ((S,)).
        num_regions: number of regions of the E-step's partition.
        q_gain: increase of the frozen-pattern surrogate Q achieved by the (full) M-step.
        nll_trials: exact NLL of every candidate tried (full step first).
    """

    nll_before: float
    nll_after: float
    backtracks: int
    accepted: bool
    step_size: float
    obs_scale: torch.Tensor
    prior_scale: torch.Tensor
    num_regions: int
    q_gain: float
    nll_trials: list = field(default_factory=list)


def _gradient_m_step(decoder, net, stats: EStepStats, obs_scale, prior_scale, *, obs_noise, update_prior_scale,
                     update_obs_scale: bool, steps: int, lr: float):
    """Generalised M-step: L-BFGS (strong Wolfe) on −Q/N over the decoder's parameters and log σ."""
    params = [p for p in decoder.parameters() if p.requires_grad]
    log_sx = obs_scale.detach().log().clone().requires_grad_(update_obs_scale)
    log_sz = prior_scale.detach().log().clone().requires_grad_(update_prior_scale)
    opt_params = params + ([log_sx] if update_obs_scale else []) + ([log_sz] if update_prior_scale else [])
    opt = torch.optim.LBFGS(opt_params, lr=lr, max_iter=steps, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15, history_size=20)
    N = stats.num_data

    def closure():
        opt.zero_grad()
        loss = -expected_complete_loglik(net.affine_maps(stats.Z.dtype), net, stats.patterns, stats,
                                         (2 * log_sx).exp(), (2 * log_sz).exp()) / N
        loss.backward()
        return loss

    opt.step(closure)
    sx = log_sx.detach().exp()
    if obs_noise == "isotropic":
        sx = sx.reshape(-1)[0]
    return sx, log_sz.detach().exp()


def _snapshot(decoder) -> list[torch.Tensor]:
    return [p.detach().clone() for p in decoder.parameters()]


def _load(decoder, values) -> None:
    with torch.no_grad():
        for p, v in zip(decoder.parameters(), values):
            p.copy_(v)


#: Expected failures of evaluating a candidate step (the candidate is then rejected).
_CANDIDATE_FAILURES = (RegionBudgetExceeded, torch.linalg.LinAlgError)


def _block_e_step(marginal, x: torch.Tensor, weights=None, comm=None) -> EStepStats:
    """:func:`~pyro_cpa.infer.estep.e_step` of x (N, D) reduced over fixed blocks of ``STATS_BLOCK`` data in order.

    Each block's statistics are one term of an exact, order-independent sum
    (:class:`~pyro_cpa.infer.distributed.ExactSum`), as are the per-datum L_n and |L_n|: the result does not
    depend on chunking, threads or — with ``comm`` (a :class:`~pyro_cpa.infer.distributed.Comm`, x the rank's
    block-aligned data, :func:`~pyro_cpa.infer.distributed.align_to_blocks`) — on the number of ranks. The
    returned statistics are those of all data of all ranks; ``loglik`` is this process's data only.
    """
    from .distributed import ExactSum, agreed_failures, reduce_sums, state_signature
    from .structure import DataWeights

    N, D = x.shape[0], marginal.event_shape[0]
    with agreed_failures(comm, _CANDIDATE_FAILURES):
        regions = marginal.regions
        R, K = len(regions), marginal.latent_dim + 1
        sizes = [R * K * K, R * D * K, R * D]
        E = sum(sizes)
        acc = ExactSum(E + 4, x.device)  # Z, X, q, then N = Σ s_x, Σ L_n, Σ |L_n|, the count of contributing data
        loglik = x.new_zeros(N)
        contributing = ~torch.isnan(x).all(-1)
        if weights is not None:
            contributing &= weights.active.to(x.device)
        for start in range(0, N, STATS_BLOCK):
            sl = slice(start, start + STATS_BLOCK)
            count = int(contributing[sl].sum())
            if count == 0:  # nothing in this block carries weight: it adds 0 to every statistic
                continue
            w = None if weights is None else DataWeights(weights.obs[sl], weights.latent[sl])
            st = e_step(marginal, x[sl], chunk_size=STATS_BLOCK, weights=w)
            acc.add(torch.cat([st.Z.reshape(-1), st.X.reshape(-1), st.q.reshape(-1),
                               st.Z.new_tensor([st.num_data])]).unsqueeze(0))
            acc.add(torch.stack([st.loglik, st.loglik.abs()], -1), start=E + 1)
            acc.add(st.Z.new_tensor([[float(count)]]), start=E + 3)
            loglik[sl] = st.loglik
    sig = 0 if comm is None else state_signature(marginal.decoder, marginal.obs_scale, marginal.prior_scale,
                                                 patterns=regions.patterns)
    tot = reduce_sums(comm, acc, sig)
    if int(tot[E + 3]) == 0:
        raise PyroCPAError("e_step: no datum carries weight (every observation is masked, zero-scaled or entirely "
                           "missing)")
    Z, X, q = (t.to(x.dtype) for t in tot[:E].split(sizes))
    return EStepStats(Z=Z.reshape(R, K, K), X=X.reshape(R, D, K), q=q.reshape(R, D), loglik=loglik,
                      patterns=[p.clone() for p in regions.patterns], num_data=float(tot[E]),
                      loglik_sum=float(tot[E + 1]), loglik_abs_sum=float(tot[E + 2]))


def _total_nll(marginal, x: torch.Tensor, weights=None, comm=None) -> float:
    """−Σ_n L_n over all data (all ranks with ``comm``), summed exactly."""
    from .distributed import ExactSum, agreed_failures, exact_sum, reduce_sums, state_signature

    with torch.no_grad(), agreed_failures(comm, _CANDIDATE_FAILURES):
        patterns = marginal.regions.patterns
        lp = weighted_log_prob(marginal, x, weights) if x.shape[0] else x.new_zeros(0)
    if comm is None:
        return float(-exact_sum(lp))
    sig = state_signature(marginal.decoder, marginal.obs_scale, marginal.prior_scale, patterns=patterns)
    return float(-reduce_sums(comm, ExactSum(1, x.device).add(lp.reshape(-1, 1)), sig)[0])


class _Verifier:
    """Exact NLL (and, on demand, the next E-step) of candidate parameters along a backtracking line."""

    def __init__(self, decoder, x, mkw, max_backtracks, monotone_tol, want_stats, weights=None, comm=None):
        self.decoder, self.x, self.mkw, self.weights, self.comm = decoder, x, mkw, weights, comm
        self.max_backtracks, self.monotone_tol, self.want_stats = max_backtracks, monotone_tol, want_stats
        self.trials: list[float] = []

    def evaluate(self, sx, sz):
        from ..distributions import CPAMarginal

        if not (bool((sx > 0).all()) and bool((sz > 0).all())):
            return math.inf, None
        from .distributed import SoftFailure

        try:
            mg = CPAMarginal(self.decoder, sx, sz, **self.mkw)
            if self.want_stats:
                stats = _block_e_step(mg, self.x, self.weights, self.comm)
                nll = -stats.total_loglik
            else:
                stats = None
                nll = _total_nll(mg, self.x, self.weights, self.comm)
        except _CANDIDATE_FAILURES + (SoftFailure,):  # agreed by every rank (distributed.agreed_failures)
            return math.inf, None
        return (nll, stats) if math.isfinite(nll) else (math.inf, None)

    def line_search(self, nll_ref, abs_ref, old, new, sx_old, sx_new, sz_old, sz_new):
        """First t = 1, 1/2, … with NLL(θ_old + t(θ_new − θ_old)) <= nll_ref + tol; restores θ_old if none.

        tol = monotone_tol · max(1, abs_ref), abs_ref = Σ_n |ℓ_n| at θ_old (module docstring)."""
        tol = self.monotone_tol * max(1.0, abs_ref)
        for k in range(self.max_backtracks + 1):
            t = 0.5 ** k
            _load(self.decoder, new if k == 0 else [a + t * (b - a) for a, b in zip(old, new)])
            sx = sx_new if k == 0 else sx_old + t * (sx_new - sx_old)
            sz = sz_new if k == 0 else sz_old + t * (sz_new - sz_old)
            nll, stats = self.evaluate(sx, sz)
            self.trials.append(nll)
            if nll <= nll_ref + tol:
                return True, k, nll, stats, sx, sz
        _load(self.decoder, old)
        return False, self.max_backtracks, nll_ref, None, sx_old, sz_old


def em_step(decoder, obs_scale, prior_scale, x: torch.Tensor, *, obs_noise: str = "isotropic",
            update_prior_scale: bool = False, update_obs_scale: bool = True, m_step_method: str = "closed_form",
            schedule: str = "layerwise", px: bool = False, sweeps: int = 1, order: str = "forward",
            rcond: float = DEFAULT_RCOND, gradient_steps: int = 50, gradient_lr: float = 1.0, max_backtracks: int = 10,
            monotone_tol: float = MONOTONE_TOL, max_regions: int = DEFAULT_MAX_REGIONS,
            marginal_kwargs: dict | None = None, weights=None,
            min_obs_scale: float = DEFAULT_MIN_OBS_SCALE, process_group=None) -> EMStepResult:
    """One exact EM step on ``decoder`` (modified in place) with guaranteed non-increasing exact NLL.

    Args:
        decoder: CPA ``nn.Module`` (see :mod:`pyro_cpa.nn`), latent dim S, output dim D.
        obs_scale: σx, scalar or (D,) tensor; prior_scale: σz, scalar or (S,).
        x: (N, D) data (NaN entries missing).
        obs_noise: ``"isotropic"`` or ``"diagonal"`` σx.
        update_prior_scale: also update σz (closed form / jointly in the gradient M-step).
        update_obs_scale: update σx (default); if False σx is held fixed in every block and in the
            verification, so the returned ``obs_scale`` is the input one.
        m_step_method: ``"closed_form"`` or ``"gradient"`` (generalised EM; any CPA decoder).
        schedule: closed form only. ``"layerwise"`` (default; expectation–conditional maximisation):
            one block at a time — each layer in ``order``, then the variances — each preceded by an
            exact E-step at the current parameters and verified (with backtracking) on its own. Every
            block direction is then an ascent direction of the exact likelihood (∇Q = ∇ log p at the
            E-step's parameters and Q is a concave quadratic in one block), so a short enough step is
            always accepted. ``"joint"``: one E-step, ``sweeps`` sweeps of all blocks on the frozen
            surrogate, then backtracking along the straight line θ_old → θ_new; cheaper, but that line
            need not be an ascent direction (the blocks are coupled), and the step is then rejected.
        px: layerwise schedule only: start the sweep with the parameter-expanded block
            (:func:`~pyro_cpa.infer.mstep.prior_expansion`), which re-centres and re-scales the latent
            space through the first layer (an exact EM step that never lowers the likelihood). It removes
            plain EM's slow modes (e.g. for a linear decoder the mean converges at rate 1 − σx²/λ_max
            without it: 100s of steps when the data are far from isotropic), but on the paper's circle it
            made the optimum reached more seed-dependent (0.15–0.34 vs 0.17–0.19 nats/sample after 200
            steps over 3 seeds), hence off by default.
        sweeps, order, rcond: options of the closed-form :func:`~pyro_cpa.infer.mstep.m_step`
            (``sweeps`` is ignored by ``"layerwise"``, which does one sweep per call).
        gradient_steps, gradient_lr: L-BFGS iterations and learning rate of the gradient M-step.
        max_backtracks: halvings tried before a step is rejected; monotone_tol: relative tolerance
            of the monotonicity check (module docstring).
        max_regions, marginal_kwargs: passed to :class:`~pyro_cpa.distributions.CPAMarginal`.
        weights: optional per-datum :class:`~pyro_cpa.infer.structure.DataWeights` (Pyro's scale × mask of the
            observed and latent sites); the NLL is then −Σ_n L_n, the weighted / tempered objective of
            :mod:`pyro_cpa.infer.estep`. NaN entries of ``x`` are missing coordinates (exact incomplete-data EM).
        min_obs_scale: floor of the updated σx (default ``DEFAULT_MIN_OBS_SCALE`` = 1e-6, in the data's
            units); an :class:`ObsScaleFloorWarning` is issued when the kept σx is at the floor.
        process_group: None (one process), or a ``torch.distributed`` process group whose ranks each pass their
            contiguous shard of the data (in rank order; any sizes, 0 included) and the same decoder, σx, σz and
            options: the statistics and NLLs are summed exactly over the ranks and every rank takes the same step
            (:mod:`pyro_cpa.infer.distributed`); the trajectory is that of one process with all the data.

    Returns:
        :class:`EMStepResult` (the new σx, σz are in ``obs_scale``, ``prior_scale``). With
        ``"layerwise"``, ``backtracks`` is the total over blocks and ``accepted`` is True if at least one
        block moved.
    """
    from .distributed import comm_for, guard, state_signature

    comm = comm_for(process_group)
    with guard(comm):   # an exception on this rank stops every rank (distributed.guard)
        result = _em_step(decoder, obs_scale, prior_scale, x, obs_noise=obs_noise,
                          update_prior_scale=update_prior_scale, update_obs_scale=update_obs_scale,
                          m_step_method=m_step_method, schedule=schedule, px=px, sweeps=sweeps, order=order,
                          rcond=rcond, gradient_steps=gradient_steps, gradient_lr=gradient_lr,
                          max_backtracks=max_backtracks, monotone_tol=monotone_tol, max_regions=max_regions,
                          marginal_kwargs=marginal_kwargs, weights=weights, min_obs_scale=min_obs_scale, comm=comm)
        if comm is not None:  # every rank finished the step and holds the same decoder, σx, σz
            comm.status(signature=state_signature(decoder, result.obs_scale, result.prior_scale))
    return result


def _em_step(decoder, obs_scale, prior_scale, x, *, obs_noise, update_prior_scale, update_obs_scale, m_step_method,
             schedule, px, sweeps, order, rcond, gradient_steps, gradient_lr, max_backtracks, monotone_tol,
             max_regions, marginal_kwargs, weights, min_obs_scale, comm) -> EMStepResult:
    from ..distributions import CPAMarginal
    from .distributed import SoftFailure, align_to_blocks, state_signature

    if m_step_method not in ("closed_form", "gradient"):
        raise PyroCPAError(f"m_step_method must be 'closed_form' or 'gradient', got {m_step_method!r}")
    if schedule not in ("layerwise", "joint"):
        raise PyroCPAError(f"schedule must be 'layerwise' or 'joint', got {schedule!r}")
    if obs_noise not in ("isotropic", "diagonal"):
        raise PyroCPAError(f"obs_noise must be 'isotropic' or 'diagonal', got {obs_noise!r}")
    if order not in ("forward", "backward"):
        raise PyroCPAError(f"order must be 'forward' or 'backward', got {order!r}")
    if max_backtracks < 0:
        raise PyroCPAError(f"max_backtracks must be >= 0, got {max_backtracks}")
    if not (math.isfinite(min_obs_scale) and min_obs_scale > 0):
        raise PyroCPAError(f"min_obs_scale must be a positive finite number, got {min_obs_scale}")
    min_obs_var = min_obs_scale ** 2
    net = as_cpa_network(decoder)
    if m_step_method == "closed_form" and net.needs_gradient_m_step is not None:
        m_step_method = "gradient"   # convolutions, pools, PReLU: no closed-form update (issue 14)
    mkw = dict(marginal_kwargs or {})
    mkw.setdefault("max_regions", max_regions)
    marginal = CPAMarginal(decoder, obs_scale, prior_scale, **mkw)
    D, S = net.out_features, net.in_features
    dtype = marginal.dtype
    sx_old = marginal.obs_scale.detach().to(dtype)
    sz_old = marginal.prior_scale.detach().to(dtype).expand(S).clone()
    if obs_noise == "isotropic" and sx_old.dim() == 1 and sx_old.numel() > 1:
        if not bool((sx_old == sx_old[0]).all()):
            raise PyroCPAError("obs_noise='isotropic' but obs_scale differs between coordinates; "
                               "use obs_noise='diagonal'")
    sx_old = sx_old.reshape(-1)[0].clone() if obs_noise == "isotropic" else sx_old.expand(D).clone()

    if update_prior_scale and weights is not None and weights.is_tempered:
        raise PyroCPAError("update_prior_scale=True is not supported with a tempered likelihood (a scale or mask on "
                           "only one of the latent and observed sites); scale both sites alike or keep σz fixed")
    x = marginal._check_x(x).reshape(-1, D)
    num_data = x.shape[0]
    if comm is not None:  # every rank gets whole global blocks of STATS_BLOCK data
        x, weights, num_data = align_to_blocks(comm, x, weights, STATS_BLOCK,
                                               state_signature(decoder, sx_old, sz_old))
    if num_data == 0:
        raise PyroCPAError("em_step: x holds no data (shape (0, D)); EM needs at least one datum")
    try:
        stats = _block_e_step(marginal, x, weights, comm)
    except SoftFailure as e:
        raise PyroCPAError(f"em_step: the exact E-step failed at the current parameters ({e})") from e
    except torch.linalg.LinAlgError as e:
        scale = max(float(p.detach().abs().max()) for p in decoder.parameters())
        raise PyroCPAError(
            f"em_step: the exact E-step failed at the current parameters ({e.__class__.__name__}: the per-region "
            f"posterior covariances are not positive definite in float64). The decoder's largest weight is "
            f"{scale:.3g} and σx is {float(sx_old.min()):.3g}: products of that size overflow or lose all precision. "
            "Rescale the data and the decoder (e.g. standardise x, re-initialise the weights).") from e
    nll_before = -stats.total_loglik
    old_params = _snapshot(decoder)
    num_regions = stats.num_regions

    def Q(st, sx, sz) -> float:
        with torch.no_grad():
            return float(expected_complete_loglik(net.affine_maps(dtype), net, st.patterns, st,
                                                  (sx ** 2).expand(D), sz ** 2))

    def to_scale(var):
        s = var.sqrt().clamp_min(min_obs_scale) if update_obs_scale else var.sqrt()
        return s[0].clone() if obs_noise == "isotropic" else s

    def finish(result: EMStepResult) -> EMStepResult:
        if update_obs_scale and bool((result.obs_scale <= min_obs_scale).any()):
            warnings.warn(f"EM: σx reached its floor min_obs_scale={min_obs_scale:g} with N={num_data} data: the "
                          "decoder fits the data exactly, so the likelihood is unbounded as σx → 0 and this fit is "
                          "degenerate (too few or identical data?). Use more data, keep σx fixed "
                          "(update_obs_scale=False) or set min_obs_scale to the data's known noise level.",
                          ObsScaleFloorWarning, stacklevel=4)
        return result

    if m_step_method == "closed_form" and schedule == "layerwise":
        ver = _Verifier(decoder, x, mkw, max_backtracks, monotone_tol, want_stats=True, weights=weights, comm=comm)
        layers = list(range(net.num_layers))
        if order == "backward":
            layers.reverse()
        nll, sx, sz = nll_before, sx_old, sz_old
        total_bt, moved, q_gain = 0, False, 0.0
        var_block = ["variances"] if (update_obs_scale or update_prior_scale) else []
        for block in (["px"] if px else []) + layers + var_block:
            q0 = Q(stats, sx, sz)
            old = _snapshot(decoder)
            obs_var, prior_var = (sx ** 2).expand(D), sz ** 2
            if block == "variances":
                maps = [(W.detach(), v.detach()) for W, v in net.affine_maps(dtype)]
                new_ov, new_pv = update_variances(maps, net, stats, obs_var, prior_var, obs_noise=obs_noise,
                                                  update_prior_scale=update_prior_scale,
                                                  update_obs_scale=update_obs_scale, min_obs_var=min_obs_var)
                sx_c, sz_c = to_scale(new_ov), new_pv.sqrt()
            elif block == "px":
                maps = [(W.detach().clone(), v.detach().clone()) for W, v in net.affine_maps(dtype)]
                net.set_affine_maps(prior_expansion(maps, stats, prior_var))
                sx_c, sz_c = sx, sz
            else:
                maps = [(W.detach().clone(), v.detach().clone()) for W, v in net.affine_maps(dtype)]
                maps[block] = update_layer(maps, block, net, stats, obs_var, rcond=rcond)
                net.set_affine_maps(maps)
                sx_c, sz_c = sx, sz
            if block != "px":  # the reduction re-labels z: the frozen-E-step Q is not comparable
                q_gain += Q(stats, sx_c, sz_c) - q0
            new = _snapshot(decoder)
            ok, k, nll_c, stats_c, sx_k, sz_k = ver.line_search(nll, stats.total_abs_loglik, old, new,
                                                                sx, sx_c, sz, sz_c)
            total_bt += k
            if ok:
                moved = True
                nll, sx, sz, stats = nll_c, sx_k, sz_k, stats_c
        return finish(EMStepResult(nll_before, nll, total_bt, moved, 1.0 if moved else 0.0, sx.clone(), sz.clone(),
                                   num_regions, q_gain, ver.trials))

    obs_var_old = (sx_old ** 2).expand(D)
    prior_var_old = sz_old ** 2
    q_old = Q(stats, sx_old, sz_old)
    if m_step_method == "closed_form":
        res = m_step(net, stats.patterns, stats, obs_var_old, prior_var_old, obs_noise=obs_noise,
                     update_prior_scale=update_prior_scale, update_obs_scale=update_obs_scale, sweeps=sweeps,
                     order=order, rcond=rcond, min_obs_var=min_obs_var)
        net.set_affine_maps(res.maps)  # validates every step before writing anything
        sx_new, sz_new = to_scale(res.obs_var), res.prior_var.sqrt()
    else:
        sx_new, sz_new = _gradient_m_step(decoder, net, stats, sx_old, sz_old, obs_noise=obs_noise,
                                          update_prior_scale=update_prior_scale,
                                          update_obs_scale=update_obs_scale, steps=gradient_steps,
                                          lr=gradient_lr)
        sx_new = sx_new.clamp_min(min_obs_scale) if update_obs_scale else sx_new
    q_new = Q(stats, sx_new, sz_new)
    new_params = _snapshot(decoder)
    ver = _Verifier(decoder, x, mkw, max_backtracks, monotone_tol, want_stats=False, weights=weights, comm=comm)
    ok, k, nll, _, sx, sz = ver.line_search(nll_before, stats.total_abs_loglik, old_params, new_params,
                                            sx_old, sx_new, sz_old, sz_new)
    return finish(EMStepResult(nll_before, nll, k, ok, 0.5 ** k if ok else 0.0, sx.clone(), sz.clone(), num_regions,
                               q_new - q_old, ver.trials))


def run_em(decoder, obs_scale, prior_scale, x: torch.Tensor, num_steps: int, *, callback=None,
           **kwargs) -> tuple[torch.Tensor, torch.Tensor, list[EMStepResult]]:
    """Run :func:`em_step` ``num_steps`` times, threading σx, σz; returns (obs_scale, prior_scale, history).

    ``callback(step, result)`` is called after every step; returning True stops early.
    """
    history = []
    for i in range(num_steps):
        res = em_step(decoder, obs_scale, prior_scale, x, **kwargs)
        obs_scale, prior_scale = res.obs_scale, res.prior_scale
        history.append(res)
        if callback is not None and callback(i, res):
            break
    return obs_scale, prior_scale, history
