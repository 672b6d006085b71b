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

**Cost: what a step evaluates.** Every exact E-step (moments of all kept (datum, region) pairs) costs about
as much as the rest of the step together, so a step evaluates only what it must:

* *Certified blocks* (layerwise, S <= 2). The output layer T_L and the variances σx, σz do not move the
  partition (it depends on the hidden layers only), so on them the frozen-pattern Q *is* the expected
  complete log-likelihood E_{z|x,θ_e} log p(x, z; θ) of the last E-step's parameters θ_e, and Jensen's
  inequality gives the EM bound  NLL(θ) <= NLL(θ_e) − [Q(θ) − Q(θ_e)]  exactly (up to the E-step's stated
  pruning error, relative R·e^{−prune_tol}). The trailing blocks of the sweep that keep the partition (the
  output layer, when it is the last layer updated, and the variances) are therefore maximised one after
  the other on the same statistics (expectation–conditional maximisation) and accepted *without their own
  evaluation* while their summed Q gain, less Q's rounding allowance (``Q_ROUNDING_RTOL`` · the sum of the
  absolute values of Q's terms), is >= −tol (the line search's tolerance below): the bound then proves the
  same monotonicity the line search checks. Only their end point is evaluated, once: that
  E-step is the one the next step starts from and gives the exact ``nll_after`` (as a safety net it is
  tested like a line-search trial, and backtracked if it ever failed). S >= 3 statistics carry quadrature
  or Monte-Carlo error, so there every block is verified.
* *Merged certified run* (``"layerwise"``, ``merge_certified``; default for S = 2). The certified blocks need no
  evaluation of their own, but their end point's E-step was the one the next block needed. Merged, a step starts
  with them (on its first E-step, the statistics of θ_e) and proposes the first hidden layer's block from the same
  statistics at the run's end point (an ECM step on Q(·|θ_e): it raises the frozen surrogate further, but moves
  the partition); ONE exact E-step verifies the run and that block together against NLL(θ_e) — the same
  monotonicity check, without backtracking. If it fails, the run's end point is evaluated (accepted by its
  certificate) and the block proposed again from fresh statistics, as unmerged (one wasted E-step, counted as a
  backtrack). The step still ends at an exact E-step (its last hidden block's), so ``nll_after`` stays exact;
  the output layer and variances fitted on it are taken at the start of the next step. A layerwise step of an
  L-layer decoder then runs L − 1 exact E-steps instead of L. Measured (N as said, 1 thread, 3 model seeds each,
  NLL/datum at the same wall-clock): S = 2 [2,8,8,3] N=300 per step 0.65 → 0.26 s (3 → 2 E-steps, and the
  trajectory kept smaller partitions: R ≈ 140–180 vs 240–280), after 10 steps 0.5153 / 0.5116 / 0.5144 in
  2.7–2.9 s vs unmerged 0.5173 / 0.5142 / 0.5163 at the same time, every merged trial accepted; [2,16,16,2]
  N=300, 6 steps: 0.4075 / 0.4016 / 0.3985 in 7.2–9.7 s vs unmerged 0.4061 / 0.4083 / 0.4089 at the same time; S = 1
  [1,8,8,2] N=500: at equal time worse in 2 of 3 seeds (0.5183 vs 0.5177, 0.5181 vs 0.5162 after ~1 s) —
  the stale first block loses more progress than the saved (cheap) S = 1 E-step buys — hence off for S = 1.
* *Reused E-step* (``cache``, :class:`EStepCache`; :class:`~pyro_cpa.infer.em.EM` and :func:`run_em` pass
  one). A step ends with the exact E-step of the parameters it keeps; the next step reuses it instead of
  recomputing it when nothing changed in between (:meth:`EStepCache.lookup`). A joint step evaluates its trials
  by E-steps rather than by the likelihood alone — every trial for S = 1 (global partition), where the fused kernel
  gives a pair's moments with its likelihood (measured [1,128,128,2], N=1000: 39 ms vs 38 ms), else the first
  trial when the previous joint step accepted its first trial (``EStepCache.first_trial_accepted``): the accepted
  one is the next step's E-step.
* *Adaptive step length* (``"joint"`` and the gradient M-step). The line search tries t = t0, t0/2, … along
  θ_old → θ_new, with t0 = ``initial_step``; :attr:`EMStepResult.next_step_size` proposes the next step's t0: the
  length accepted after a backtrack, ``STEP_GROWTH`` (√2) times it (at most 1) after a first-trial acceptance, 1
  after a rejection. A joint M-step moves the partition, so its full step is often too long by a similar factor
  from step to step: starting from the last length saves the trials that halving from 1 would spend (measured
  [1,64,64,64,10], N=1000, 20 steps: 2.4 → 1.3 exact evaluations per step, NLL/datum after 20 steps 2.2303 →
  2.2383; [1,128,128,2]: 1.35 → 1.15, 0.6116 → 0.6123). :func:`run_em` and
  :class:`~pyro_cpa.infer.em.EM` thread it; every accepted trial passes the same exact monotonicity check.
* *Pairs that carry mass*: every evaluation integrates only the (datum, region) pairs that the certified
  upper bound log κ + min_j log Φ(d_j) keeps within ``prune_tol`` nats of the datum's log p(x)
  (:mod:`pyro_cpa.distributions.chunked`); the partition is enumerated once per parameter state
  (:func:`~pyro_cpa.geometry.regions.cached_linear_regions`).

**Local partition** (``marginal_kwargs={"partition": "local", "local_tol": τ}``; S <= 2, one process, no missing
data): every E-step and every verification runs on the regions near each datum's posterior mass
(:func:`~pyro_cpa.infer.estep.local_e_step_stats`, one local partition per call over all the data: its region
set is the call's, so the E-step is not split into ``STATS_BLOCK`` blocks), for decoders whose global partition
cannot be enumerated. The statistics are those of the posterior restricted to the integrated regions and the
NLL is −Σ_n log p_local(x_n) >= the exact NLL, both within the certified fraction e^{−τ} (~4e-18 at τ = 40) of
each datum's mass — far inside ``monotone_tol``: the EM bound of the certified blocks holds on the restricted
posterior for any θ (log p(x; θ) >= log ∫_U p(x, z; θ) dz >= Q-bound, U the E-step's regions), and the line
search compares local NLLs, which are exact to that fraction.

With these a layerwise step of an L-layer decoder runs L exact E-steps (L − 1 verified hidden-layer blocks
and the end point; L − 1 merged), one more when the cache cannot be used, instead of L + 2
(``EMStepResult.e_steps``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from ..errors import PyroCPAError, RegionBudgetExceeded
from ..geometry.regions import DEFAULT_MAX_REGIONS
from ..nn.network import as_cpa_network
from .estep import EStepStats, e_step, local_e_step_stats, s1_block_stats, weighted_log_prob
from .mstep import (DEFAULT_RCOND, RegionMapsMemo, expected_complete_loglik, frozen_region_maps, m_step,
                    prior_expansion, surrogate_of_region_maps, update_layer, update_variances)

MONOTONE_TOL = 1e-12
#: Growth of the ``"joint"`` / gradient line search's first trial length after a step that accepted its first trial
#: (:attr:`EMStepResult.next_step_size`). Measured (N=1000, 20 steps; evaluations per step, NLL/datum after 20):
#: [1,64,64,64,10] ×2: 1.55, 2.2408; ×√2: 1.20, 2.2177; ×1 (never grow): 1.10, 2.2406; [1,128,128,2] ×2: 1.25,
#: 0.6122; ×√2: 1.10, 0.6116; ×1: 1.10, 0.6199 (×2 alternates an accepted t with a rejected 2t).
STEP_GROWTH = math.sqrt(2.0)
#: Rounding allowance of a computed Q (and of a difference of two), relative to the sum of the absolute values of
#: its terms (:func:`_q_scale`): Q sums products over regions and coordinates, whose float64 rounding is a few ε
#: of that scale per term (pairwise summation); 1e-13 ≈ 450 ε leaves a wide margin. A certified block's
#: computed Q gain must exceed −tol by this allowance, so that no certificate is decided by rounding (e.g. when
#: huge weights make the terms of Q cancel by 30 digits).
Q_ROUNDING_RTOL = 1e-13
#: EM reduces its E-step statistics over consecutive blocks of this many data, one block at a time in data
#: order, whatever the marginal's ``chunk_size`` or the thread count: the same per-datum batches and the
#: same summation order, hence bit-identical statistics. (The EM map is expanding early in training —
#: measured ×10–50 per block update on the circle — so a 1e-16 difference in a sum grew to 1e-3 in the
#: NLL within 10 steps when the summation order followed ``chunk_size``.)
STATS_BLOCK = 256
#: :func:`_block_e_step` adds the statistics of up to this many blocks to its exact sum at once (one pass of the
#: digit extraction instead of one per block: the same bits, since the sum is order-independent; the rows held
#: meanwhile take ADD_BLOCKS · R · (S+1)(S+1+D+1) numbers).
ADD_BLOCKS = 16
#: Default floor of σx (``min_obs_scale``). The likelihood is unbounded as σx → 0 when the decoder can pass
#: through every datum (N = 1, N = 2, identical points, N ≤ the decoder's capacity): EM then drives σx down
#: to this floor, and warns (:class:`ObsScaleFloorWarning`).
DEFAULT_MIN_OBS_SCALE = 1e-6

_LOCAL_DISTRIBUTED = ("EM with partition='local' runs in one process only: the local partition's regions depend on "
                      "the data of each call, so the ranks' statistics would not share one region set. Use "
                      "distributed=False / process_group=None, or the global partition for distributed EM.")


class ObsScaleFloorWarning(UserWarning):
    """EM's σx update reached its floor ``min_obs_scale``: the maximum-likelihood σx is 0 (the decoder fits
    the data exactly, e.g. too few or identical data), so the likelihood is unbounded and the fit degenerate."""


@dataclass
class EMStepResult:
    """Outcome of :func:`em_step`.

    Attributes:
        nll_before: exact −Σ_n log p(x_n) at θ_old.
        nll_after: exact −Σ_n log p(x_n) at the parameters kept (= nll_before if rejected).
        backtracks: number of halvings used (0: the first trial was accepted).
        accepted: False if every candidate raised the NLL and θ_old was restored.
        step_size: the fraction t of the M-step taken, t0 · 2^{-backtracks} if accepted (t0 = ``initial_step``, 1 for
            ``"layerwise"``), else 0.
        obs_scale, prior_scale: the kept σx (0-dim for isotropic noise, else (D,)) and σz ((S,)).
        num_regions: number of regions of the E-step's partition.
        q_gain: increase of the frozen-pattern surrogate Q achieved by the (full) M-step.
        nll_trials: exact NLL of every candidate evaluated (full step first).
        e_steps: exact E-steps (likelihood and moments of every kept pair) this step computed.
        log_prob_evals: exact likelihood-only evaluations (the ``"joint"`` / gradient line searches).
        e_step_reused: the step started from the previous step's E-step (:class:`EStepCache`).
        certified_blocks: blocks accepted on the EM bound without their own evaluation (module docstring).
        merged_blocks: hidden-layer blocks verified together with the certified run before them (``merge_certified``;
            a merged trial that failed counts one backtrack).
        next_step_size: the first trial length proposed for the next step's line search (``initial_step``; module
            docstring, "Adaptive step length"); 1 for ``"layerwise"``.
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
    e_steps: int = 0
    log_prob_evals: int = 0
    e_step_reused: bool = False
    certified_blocks: int = 0
    next_step_size: float = 1.0
    merged_blocks: int = 0


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


def _q_and_scale(maps, net, stats: EStepStats, obs_var: torch.Tensor, prior_var: torch.Tensor,
                 want_scale: bool, memo: RegionMapsMemo | None = None) -> tuple[float, float | None]:
    """(Q, its rounding scale or None): the frozen-pattern surrogate
    (:func:`~pyro_cpa.infer.mstep.expected_complete_loglik`) of ``maps`` and, if ``want_scale``, :func:`_q_scale`,
    from one computation of the frozen region maps (taken from ``memo`` when given)."""
    rm = (memo.get(maps, stats.patterns) if memo is not None
          else frozen_region_maps(maps, net.activations, stats.patterns))
    q = float(surrogate_of_region_maps(rm.A, rm.b, stats, obs_var, prior_var))
    return q, (_q_scale(rm, stats, obs_var, prior_var) if want_scale else None)


def _q_scale(rm, stats: EStepStats, obs_var: torch.Tensor, prior_var: torch.Tensor) -> float:
    """Σ of the absolute values of the terms of Q (:func:`~pyro_cpa.infer.mstep.expected_complete_loglik`): the
    scale of its rounding. With ã = [A_ω b_ω] the frozen region maps ``rm`` of the parameters:

        ½ Σ_d [N |log 2πσx_d²| + Σ_ω (q_ωd + 2 |ã_ωd|ᵀ|X_ω[d]| + |ã_ωd|ᵀ|Z_ω||ã_ωd|) / σx_d²]
        + ½ Σ_s [N |log 2πσz_s²| + Σ_ω |Z_ω,ss| / σz_s²]."""
    At = torch.cat([rm.A, rm.b.unsqueeze(-1)], -1).abs()
    S = stats.Z.shape[-1] - 1
    N = stats.num_data
    log2pi = math.log(2 * math.pi)
    r = (stats.q.abs().sum(0) + 2 * torch.einsum("rdk,rdk->d", At, stats.X.abs())
         + torch.einsum("rdk,rdk->d", At @ stats.Z.abs(), At))
    zz = torch.diagonal(stats.Z[:, :S, :S], dim1=-2, dim2=-1).abs().sum(0)
    return 0.5 * float((N * (log2pi + obs_var.log()).abs() + r / obs_var).sum()
                       + (N * (log2pi + prior_var.log()).abs() + zz / prior_var).sum())


def _precision_message(decoder, sx, what: str) -> str:
    scale = max(float(p.detach().abs().max()) for p in decoder.parameters())
    return (f"em_step: the exact E-step failed at the current parameters ({what}). The decoder's largest weight is "
            f"{scale:.3g} and σx is {float(sx.min()):.3g}: products of that size overflow or lose all precision. "
            "Rescale the data and the decoder (e.g. standardise x, re-initialise the weights).")


def _snapshot(decoder) -> list[torch.Tensor]:
    return [p.detach().clone() for p in decoder.parameters()]


def _load(decoder, values) -> None:
    with torch.no_grad():
        for p, v in zip(decoder.parameters(), values):
            p.copy_(v)


#: Expected failures of evaluating a candidate step (the candidate is then rejected).
_CANDIDATE_FAILURES = (RegionBudgetExceeded, torch.linalg.LinAlgError)


def _tensor_identity(t: torch.Tensor) -> tuple:
    """What identifies a tensor's current contents without reading them: the object and its storage (both held,
    so that neither the id nor the address can be reused while the key lives), the storage's address, the view
    geometry and the version counter (bumped by every in-place write through the tensor or a view or
    ``detach()`` of it — not by writes through ``.data`` or NumPy, which the partition cache
    :func:`~pyro_cpa.geometry.regions.cached_linear_regions` does not see either)."""
    return (t, t.untyped_storage(), t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            t.stride(), t.dtype, t.device, t._version)


def _same_identity(a: tuple, b: tuple, same_object: bool = True) -> bool:
    """Same contents by identity: the same storage, view and version (and the same tensor object if asked; the
    data arrive as a fresh ``detach()``-ed view of the caller's tensor at every Pyro trace)."""
    return len(a) == len(b) and (a[0] is b[0] or not same_object) and a[2:] == b[2:]


def _same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))


class EStepCache:
    """The exact E-step of the parameters an :func:`em_step` kept, for the next step to reuse.

    Each step ends with the exact E-step of the parameters it keeps (the verification of its last accepted
    block); the next step starts from an E-step of the very same state. :meth:`lookup` returns the stored
    statistics only when nothing changed in between, decided by identity, never by closeness:

    * the decoder's parameters and buffers: the same tensor objects with the same storage, view and version
      counter (any in-place write — an optimiser, ``copy_``, ``load_state_dict`` — bumps it), and the same
      ``training`` flag; the data ``x``: the same storage, view and version counter (:func:`_tensor_identity`);
    * σx, σz and the per-datum weights: small tensors a Pyro model rebuilds at every trace, so no identity
      survives between calls; they must be the same bits (``torch.equal`` of the same dtype and shape). The
      E-step is a deterministic function of these bits (thread count and chunking included,
      :data:`STATS_BLOCK`), so equal bits give the statistics a recomputation would, bit for bit;
    * the same marginal options and process group, S <= 3 (the S >= 4 Monte-Carlo E-step draws random
      numbers: it is always recomputed) — and, distributed, every rank must hit (agreed by one collective).

    ``hits`` and ``misses`` count the lookups. ``first_trial_accepted`` records whether the last ``"joint"`` step
    accepted its first trial (no backtrack): the next joint step then evaluates its first trial by an E-step
    (which the step after it reuses) rather than by the likelihood alone (S >= 2; for S = 1 every trial is one).
    """

    def __init__(self):
        self._key = None
        self._stats: EStepStats | None = None
        self.hits = 0
        self.misses = 0
        self.first_trial_accepted = True

    @staticmethod
    def _make_key(decoder, x, sx, sz, weights, mkw, comm) -> tuple:
        tensors = list(decoder.parameters()) + list(decoder.buffers())
        opts = tuple(sorted((k, v) for k, v in mkw.items() if k != "mc_kwargs"))
        w = (None, None) if weights is None else (weights.obs.detach(), weights.latent.detach())
        return (decoder, bool(decoder.training), tuple(_tensor_identity(t) for t in tensors), _tensor_identity(x),
                (sx.detach().clone(), sz.detach().clone()), w, opts, None if comm is None else comm.group)

    def store(self, stats: EStepStats | None, decoder, x, sx, sz, weights, mkw, comm) -> None:
        """Remember ``stats`` as the E-step of the current state (None forgets)."""
        self._stats = stats
        self._key = None if stats is None else self._make_key(decoder, x, sx, sz, weights, mkw, comm)

    def lookup(self, decoder, x, sx, sz, weights, mkw, comm, latent_dim: int) -> EStepStats | None:
        """The stored statistics if they are those of this exact state (class docstring), else None."""
        hit = self._stats is not None and latent_dim <= 3 and self._matches(
            self._make_key(decoder, x, sx, sz, weights, mkw, comm))
        if comm is not None:  # every rank reuses, or none does (the E-step is a collective)
            hit = bool((comm.gather_ints([int(hit)]) == 1).all())
        if hit:
            self.hits += 1
            return self._stats
        self.misses += 1
        return None

    def _matches(self, key) -> bool:
        old = self._key
        if old is None or key[0] is not old[0] or key[1] != old[1] or key[7] is not old[7]:
            return False
        try:
            if len(key[6]) != len(old[6]) or not all(a[0] == b[0] and (a[1] is b[1] or bool(a[1] == b[1]))
                                                     for a, b in zip(key[6], old[6])):
                return False
        except (RuntimeError, TypeError, ValueError):  # an option without a plain equality: never reused
            return False
        if len(key[2]) != len(old[2]) or not all(_same_identity(a, b) for a, b in zip(key[2], old[2])):
            return False
        if not _same_identity(key[3], old[3], same_object=False):
            return False
        return all(_same_bits(a, b) for a, b in zip(key[4] + key[5], old[4] + old[5]))


def _block_e_step(marginal, x: torch.Tensor, weights=None, comm=None) -> EStepStats:
    """:func:`~pyro_cpa.infer.estep.e_step` of x (N, D) reduced over fixed blocks of ``STATS_BLOCK`` data in order.

    Each block's statistics are one term of an exact, order-independent sum
    (:class:`~pyro_cpa.infer.distributed.ExactSum`), as are the per-datum L_n and |L_n|: the result does not
    depend on chunking, threads or — with ``comm`` (a :class:`~pyro_cpa.infer.distributed.Comm`, x the rank's
    block-aligned data, :func:`~pyro_cpa.infer.distributed.align_to_blocks`) — on the number of ranks. The
    returned statistics are those of all data of all ranks; ``loglik`` is this process's data only.
    A local marginal (``partition="local"``) takes one :func:`~pyro_cpa.infer.estep.local_e_step_stats` over all of
    x instead (one process only).
    """
    from .distributed import ExactSum, agreed_failures, reduce_sums, state_signature
    from .structure import DataWeights

    if marginal.partition == "local":   # one local partition over all the data (its region set is the call's)
        if comm is not None:
            raise PyroCPAError(_LOCAL_DISTRIBUTED)
        return local_e_step_stats(marginal, x, weights)
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
        counts = [int(contributing[start:start + STATS_BLOCK].sum()) for start in range(0, N, STATS_BLOCK)]
        rows, done = [], 0   # block rows not yet added; the per-datum L_n of blocks [done, start) likewise

        def flush(stop):
            # ExactSum is order-independent: adding the rows of several blocks at once gives the same bits
            if rows:
                acc.add(torch.stack(rows))
                rows.clear()
            if stop > done:
                acc.add(torch.stack([loglik[done:stop], loglik[done:stop].abs()], -1), start=E + 1)
            return stop

        # S = 1, complete and unweighted: the blocks' statistics from the pair kernel run on groups of blocks
        # (bitwise those of one e_step per block, estep.s1_block_stats), else one e_step per block
        fused = s1_block_stats(marginal, x, STATS_BLOCK) if weights is None else None
        for b, start in enumerate(range(0, N, STATS_BLOCK)):
            sl = slice(start, start + STATS_BLOCK)
            if fused is not None:   # complete data: every block contributes
                Zb, Xb, qb, lb, nb = next(fused)
            else:
                if counts[b] == 0:  # nothing in this block carries weight: it adds 0 to every statistic
                    continue
                w = None if weights is None else DataWeights(weights.obs[sl], weights.latent[sl])
                st = e_step(marginal, x[sl], chunk_size=STATS_BLOCK, weights=w)
                Zb, Xb, qb, lb, nb = st.Z, st.X, st.q, st.loglik, st.num_data
            rows.append(torch.cat([Zb.reshape(-1), Xb.reshape(-1), qb.reshape(-1), Zb.new_tensor([nb])]))
            loglik[sl] = lb
            if len(rows) == ADD_BLOCKS:
                done = flush(min(N, start + STATS_BLOCK))
        flush(N)
        acc.add(x.new_tensor([[float(sum(counts))]], dtype=torch.float64), start=E + 3)
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
        patterns = None if comm is None else marginal.regions.patterns
        lp = weighted_log_prob(marginal, x, weights) if x.shape[0] else x.new_zeros(0)
    if comm is None:
        return float(-exact_sum(lp))
    sig = state_signature(marginal.decoder, marginal.obs_scale, marginal.prior_scale, patterns=patterns)
    return float(-reduce_sums(comm, ExactSum(1, x.device).add(lp.reshape(-1, 1)), sig)[0])


def _represent(sx: torch.Tensor, roundtrip) -> torch.Tensor:
    """σx as the caller stores it (``obs_scale_roundtrip`` of :func:`em_step`), same dtype and shape."""
    if roundtrip is None:
        return sx
    with torch.no_grad():
        return torch.as_tensor(roundtrip(sx.detach().clone()), dtype=sx.dtype, device=sx.device).reshape(sx.shape)


class _Verifier:
    """Exact NLL (and, on demand, the next E-step) of candidate parameters along a backtracking line."""

    def __init__(self, decoder, x, mkw, max_backtracks, monotone_tol, want_stats, weights=None, comm=None,
                 obs_scale_roundtrip=None):
        self.decoder, self.x, self.mkw, self.weights, self.comm = decoder, x, mkw, weights, comm
        self.max_backtracks, self.monotone_tol, self.want_stats = max_backtracks, monotone_tol, want_stats
        self.roundtrip = obs_scale_roundtrip
        self.trials: list[float] = []
        self.e_steps = 0
        self.log_prob_evals = 0

    def evaluate(self, sx, sz, want_stats: bool | None = None):
        """(NLL, E-step statistics or None) at the decoder's current parameters and (σx, σz); ``want_stats``
        (default: the verifier's) asks for the E-step, else the likelihood alone is evaluated."""
        from ..distributions import CPAMarginal

        want_stats = self.want_stats if want_stats is None else want_stats
        if not (bool((sx > 0).all()) and bool((sz > 0).all())):
            return math.inf, None
        from .distributed import SoftFailure

        if want_stats:
            self.e_steps += 1
        else:
            self.log_prob_evals += 1
        try:
            mg = CPAMarginal(self.decoder, sx, sz, **self.mkw)
            if want_stats:
                stats = _block_e_step(mg, self.x, self.weights, self.comm)
                nll = -stats.total_loglik
            else:
                stats = None
                nll = _total_nll(mg, self.x, self.weights, self.comm)
        except _CANDIDATE_FAILURES + (SoftFailure,):  # agreed by every rank (distributed.agreed_failures)
            return math.inf, None
        return (nll, stats) if math.isfinite(nll) else (math.inf, None)

    def line_search(self, nll_ref, abs_ref, old, new, sx_old, sx_new, sz_old, sz_new, t0=1.0, with_stats=None,
                    max_backtracks: int | None = None):
        """First t = t0, t0/2, … with NLL(θ_old + t(θ_new − θ_old)) <= nll_ref + tol; restores θ_old if none.

        tol = monotone_tol · max(1, abs_ref), abs_ref = Σ_n |ℓ_n| at θ_old (module docstring).
        ``with_stats(k)``: whether the k-th trial is evaluated by an E-step (its statistics are returned when it
        is accepted) rather than as the verifier would (None: the verifier's choice for every trial).
        ``max_backtracks``: this search's halvings (None: the verifier's)."""
        tol = self.monotone_tol * max(1.0, abs_ref)
        max_backtracks = self.max_backtracks if max_backtracks is None else max_backtracks
        for k in range(max_backtracks + 1):
            t = t0 * 0.5 ** k
            full = k == 0 and t0 == 1.0   # the M-step's own parameters, bit for bit
            _load(self.decoder, new if full else [a + t * (b - a) for a, b in zip(old, new)])
            sx = sx_new if full else _represent(sx_old + t * (sx_new - sx_old), self.roundtrip)
            sz = sz_new if full else sz_old + t * (sz_new - sz_old)
            nll, stats = self.evaluate(sx, sz, None if with_stats is None else bool(with_stats(k)))
            self.trials.append(nll)
            if nll <= nll_ref + tol:
                return True, k, nll, stats, sx, sz
        _load(self.decoder, old)
        return False, max_backtracks, nll_ref, None, sx_old, sz_old


def em_step(decoder, obs_scale, prior_scale, x: torch.Tensor, *, obs_noise: str = "isotropic",
            update_prior_scale: bool = False, update_obs_scale: bool = True, m_step_method: str = "closed_form",
            schedule: str = "layerwise", px: bool = False, sweeps: int = 1, order: str = "forward",
            rcond: float = DEFAULT_RCOND, gradient_steps: int = 50, gradient_lr: float = 1.0, max_backtracks: int = 10,
            monotone_tol: float = MONOTONE_TOL, max_regions: int = DEFAULT_MAX_REGIONS,
            marginal_kwargs: dict | None = None, weights=None,
            min_obs_scale: float = DEFAULT_MIN_OBS_SCALE, process_group=None, cache: EStepCache | None = None,
            obs_scale_roundtrip=None, layer_solver: str = "auto", initial_step: float = 1.0,
            merge_certified: bool | None = None) -> EMStepResult:
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
        cache: optional :class:`EStepCache` shared by consecutive calls: the step starts from the previous
            step's final E-step when the state is unchanged (the result is bit-identical to recomputing it), and
            leaves its own final E-step there. :func:`run_em` and :class:`~pyro_cpa.infer.em.EM` pass one.
        obs_scale_roundtrip: optional map σx ↦ the σx the caller will store and pass back (e.g. through a Pyro
            param's constraint transform, which may change the last bit): every σx candidate goes through it
            before it is evaluated, so the kept σx is the one the next call receives and the cache can be used.
        layer_solver: closed form only: the hidden layers' solve (``solver`` of
            :func:`~pyro_cpa.infer.mstep.update_layer`): ``"auto"`` (default; the exact damped maximiser, Cholesky of
            an n × n or m × m system, or ``"cg"`` for layers with min(n, m) >= ``mstep.CG_AUTO_MIN_UNKNOWNS``), ``"dense"``, ``"factored"``, or ``"cg"``: at most ``mstep.CG_ITERS``
            conjugate-gradient iterations through the Kronecker factors, an inexact block maximiser that never lowers
            Q (the step stays verified and monotone) and costs O(CG_ITERS · n·R·(S+1)) instead of O(n³) — for wide
            hidden layers, where the exact solve costs many E-steps.
        initial_step: ``"joint"`` and gradient M-step: the first trial length t0 in (0, 1] of the line search
            (t0, t0/2, …); pass the previous step's ``next_step_size`` (module docstring, "Adaptive step length";
            :func:`run_em` and :class:`~pyro_cpa.infer.em.EM` do). ``"layerwise"`` ignores it.
        merge_certified: ``"layerwise"`` only: start the step with its certified blocks (the output layer and the
            variances, on the step's first E-step) and verify them together with the first hidden layer's block by
            one exact E-step, instead of evaluating their end point (module docstring, "Merged certified run"):
            one E-step fewer per step. None (default): on for S = 2, where an E-step costs most of a step; off
            for S = 1 (measured there: the stale first block lost more progress than the saved E-step bought).

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
                          marginal_kwargs=marginal_kwargs, weights=weights, min_obs_scale=min_obs_scale, comm=comm,
                          cache=cache, obs_scale_roundtrip=obs_scale_roundtrip, layer_solver=layer_solver,
                          initial_step=initial_step, merge_certified=merge_certified)
        if comm is not None:  # every rank finished the step and holds the same decoder, σx, σz
            comm.status(signature=state_signature(decoder, result.obs_scale, result.prior_scale))
    return result


def _em_step(decoder, obs_scale, prior_scale, x, *, obs_noise, update_prior_scale, update_obs_scale, m_step_method,
             schedule, px, sweeps, order, rcond, gradient_steps, gradient_lr, max_backtracks, monotone_tol,
             max_regions, marginal_kwargs, weights, min_obs_scale, comm, cache, obs_scale_roundtrip,
             layer_solver, initial_step, merge_certified) -> EMStepResult:
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
    if layer_solver not in ("auto", "dense", "factored", "cg"):
        raise PyroCPAError(f"layer_solver must be 'auto', 'dense', 'factored' or 'cg', got {layer_solver!r}")
    if not (math.isfinite(min_obs_scale) and min_obs_scale > 0):
        raise PyroCPAError(f"min_obs_scale must be a positive finite number, got {min_obs_scale}")
    if not 0.0 < initial_step <= 1.0:
        raise PyroCPAError(f"initial_step must be in (0, 1], got {initial_step}")
    min_obs_var = min_obs_scale ** 2
    net = as_cpa_network(decoder)
    if m_step_method == "closed_form" and net.needs_gradient_m_step is not None:
        m_step_method = "gradient"   # convolutions, pools, PReLU: no closed-form update (issue 14)
    mkw = dict(marginal_kwargs or {})
    mkw.setdefault("max_regions", max_regions)
    if mkw.get("partition", "global") == "local" and comm is not None:
        raise PyroCPAError(_LOCAL_DISTRIBUTED)
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
    x_in, weights_in = x, weights   # the caller's tensors: the cache is keyed on their identity
    x = marginal._check_x(x).reshape(-1, D)
    num_data = x.shape[0]
    if comm is not None:  # every rank gets whole global blocks of STATS_BLOCK data
        x, weights, num_data = align_to_blocks(comm, x, weights, STATS_BLOCK,
                                               state_signature(decoder, sx_old, sz_old))
    if num_data == 0:
        raise PyroCPAError("em_step: x holds no data (shape (0, D)); EM needs at least one datum")

    def remember(st, sx, sz):
        """Leave ``st``, the E-step of the state now held (decoder, σx, σz), for the next call."""
        if cache is not None:
            cache.store(st, decoder, x_in, sx, sz, weights_in, mkw, comm)

    stats = None if cache is None else cache.lookup(decoder, x_in, sx_old, sz_old, weights_in, mkw, comm, S)
    reused = stats is not None
    try:
        if stats is None:
            stats = _block_e_step(marginal, x, weights, comm)
    except SoftFailure as e:
        raise PyroCPAError(f"em_step: the exact E-step failed at the current parameters ({e})") from e
    except torch.linalg.LinAlgError as e:
        raise PyroCPAError(_precision_message(decoder, sx_old, f"{e.__class__.__name__}: the per-region posterior "
                                              "covariances are not positive definite in float64")) from e
    finite = all(bool(torch.isfinite(t).all()) for t in (stats.Z, stats.X, stats.q))
    if not (finite and math.isfinite(stats.total_loglik)):
        raise PyroCPAError(_precision_message(decoder, sx_old, "its statistics are not finite"))
    nll_before = -stats.total_loglik
    old_params = _snapshot(decoder)
    num_regions = stats.num_regions
    initial_e_steps = 0 if reused else 1

    def Q(st, sx, sz) -> float:
        with torch.no_grad():
            return float(expected_complete_loglik(net.affine_maps(dtype), net, st.patterns, st,
                                                  (sx ** 2).expand(D), sz ** 2))

    def floored(s):
        """σx floored at ``min_obs_scale`` (exactly the floor where the update asks for less) and represented
        as the caller stores it (``obs_scale_roundtrip``) elsewhere."""
        return torch.where(s > min_obs_scale, _represent(s, obs_scale_roundtrip).clamp_min(min_obs_scale),
                           torch.full_like(s, min_obs_scale))

    def to_scale(var):
        s = floored(var.sqrt()) if update_obs_scale else var.sqrt()
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
        ver = _Verifier(decoder, x, mkw, max_backtracks, monotone_tol, want_stats=True, weights=weights, comm=comm,
                        obs_scale_roundtrip=obs_scale_roundtrip)
        layers = list(range(net.num_layers))
        if order == "backward":
            layers.reverse()
        blocks = (["px"] if px else []) + layers + (["variances"] if (update_obs_scale or update_prior_scale) else [])
        # The trailing blocks that keep the partition (module docstring) may be certified: exact for S <= 2.
        num_certifiable = 0
        if S <= 2:
            for block in reversed(blocks):
                if block not in ("variances", net.num_layers - 1):
                    break
                num_certifiable += 1
        merge = (S >= 2) if merge_certified is None else bool(merge_certified)
        merge = merge and 0 < num_certifiable < len(blocks)
        if merge:   # the certified blocks first, on this step's first E-step (module docstring)
            blocks = blocks[len(blocks) - num_certifiable:] + blocks[:len(blocks) - num_certifiable]
            certifiable_at = range(num_certifiable)
        else:
            certifiable_at = range(len(blocks) - num_certifiable, len(blocks))
        nll, sx, sz = nll_before, sx_old, sz_old
        total_bt, moved, q_gain, certified, merged = 0, False, 0.0, 0, 0
        run = None  # certified blocks not yet evaluated: (parameters, σx, σz before them, summed Q gain, Q's scale)
        memo = RegionMapsMemo(net.activations)   # Q before a block and the block's update share the region maps

        def q_at(st, sx, sz, want_scale: bool):
            """(Q, its rounding scale if ``want_scale``) at the decoder's parameters and (σx, σz)."""
            with torch.no_grad():
                maps = [(W.detach(), v.detach()) for W, v in net.affine_maps(dtype)]
                return _q_and_scale(maps, net, st, (sx ** 2).expand(D), (sz ** 2).expand(S), want_scale, memo)

        def propose(block, st, sx, sz, want_scale: bool):
            """Write the block's maximiser of Q (statistics ``st``) into the decoder; (σx, σz) candidates and
            (Q, scale) there (:func:`q_at`; None after px)."""
            obs_var, prior_var = (sx ** 2).expand(D), sz ** 2
            maps = [(W.detach().clone(), v.detach().clone()) for W, v in net.affine_maps(dtype)]
            sx_c, sz_c = sx, sz
            if block == "variances":
                new_ov, new_pv = update_variances(maps, net, st, obs_var, prior_var, obs_noise=obs_noise,
                                                  update_prior_scale=update_prior_scale,
                                                  update_obs_scale=update_obs_scale, min_obs_var=min_obs_var,
                                                  rm=memo.get(maps, st.patterns))
                sx_c, sz_c = to_scale(new_ov), new_pv.sqrt()
            elif block == "px":
                net.set_affine_maps(prior_expansion(maps, st, prior_var))
            else:
                maps[block] = update_layer(maps, block, net, st, obs_var, rcond=rcond, solver=layer_solver,
                                           rm=memo.get(maps, st.patterns))
                net.set_affine_maps(maps)
            return sx_c, sz_c, (None if block == "px" else q_at(st, sx_c, sz_c, want_scale))

        def verify(old, new, sx_from, sx_to, sz_from, sz_to):
            """Line search θ_old → θ_new from the last evaluated state; keeps the accepted point's E-step."""
            nonlocal nll, sx, sz, stats, total_bt, moved
            ok, k, nll_c, stats_c, sx_k, sz_k = ver.line_search(nll, stats.total_abs_loglik, old, new,
                                                                sx_from, sx_to, sz_from, sz_to)
            total_bt += k
            if ok:
                moved = True
                nll, sx, sz, stats = nll_c, sx_k, sz_k, stats_c
            else:
                sx, sz = sx_from, sz_from

        def flush():
            """Evaluate the end point of the certified run (the E-step the next block or step needs)."""
            nonlocal run
            old, sx_e, sz_e = run[:3]
            run = None
            verify(old, _snapshot(decoder), sx_e, sx, sz_e, sz)

        here = None  # (Q, scale or None) at the current parameters, σx, σz and statistics, when known

        def block_gain(block, certifiable):
            """Propose ``block`` from the current state: (σx, σz candidates, Q gain, (Q, scale) at the candidate)."""
            nonlocal here
            if block == "px":   # px re-labels z: Q is not comparable across it (gain reported as 0)
                return propose(block, stats, sx, sz, False)[:2] + (0.0, None)
            if here is None or (certifiable and here[1] is None):
                here = q_at(stats, sx, sz, certifiable)
            sx_c, sz_c, there = propose(block, stats, sx, sz, certifiable)
            return sx_c, sz_c, there[0] - here[0], there

        for i, block in enumerate(blocks):
            old = _snapshot(decoder)
            certifiable = i in certifiable_at
            if run is not None and not certifiable:
                # merged: the block proposed from the run's statistics at the run's end point; one exact E-step
                # verifies the run and the block together (one trial: θ_e → the block's candidate)
                sx_r, sz_r = sx, sz
                here = None
                sx_c, sz_c, gain, _ = block_gain(block, False)
                ok, _, nll_c, stats_c, sx_k, sz_k = ver.line_search(nll, stats.total_abs_loglik, run[0],
                                                                    _snapshot(decoder), run[1], sx_c, run[2], sz_c,
                                                                    max_backtracks=0)
                if ok:
                    run, moved, merged, here = None, True, merged + 1, None
                    nll, sx, sz, stats = nll_c, sx_k, sz_k, stats_c
                    q_gain += gain
                    continue
                # rejected: evaluate the run's end point (accepted by its certificate), then the block on its own
                total_bt += 1
                _load(decoder, old)
                sx, sz = sx_r, sz_r
                flush()
                old, here = _snapshot(decoder), None
            sx_c, sz_c, gain, there = block_gain(block, certifiable)
            # Q's rounding scale over the run: at its start (before any of its blocks) and after this block
            scale = max(here[1] if run is None else run[4], there[1]) if certifiable else 0.0
            tol = monotone_tol * max(1.0, stats.total_abs_loglik)
            if certifiable and (0.0 if run is None else run[3]) + gain - Q_ROUNDING_RTOL * scale >= -tol:
                # EM bound: NLL(θ) <= NLL(θ_e) − [Q(θ) − Q(θ_e)] <= NLL(θ_e) + tol (θ_e: the statistics' θ)
                run = (old, sx, sz, gain, scale) if run is None else run[:3] + (run[3] + gain, scale)
                sx, sz = sx_c, sz_c
                here = there   # the same statistics: the candidate's Q is the next block's starting Q
                q_gain += gain
                certified += 1
                continue
            if run is not None:  # a certifiable block failed its certificate: evaluate the certified ones first
                _load(decoder, old)
                flush()
                old = _snapshot(decoder)
                here = None
                sx_c, sz_c, gain, _ = block_gain(block, False)
            q_gain += gain
            here = None   # the verification moves to the accepted point and its E-step
            verify(old, _snapshot(decoder), sx, sx_c, sz, sz_c)
        if run is not None:
            flush()
        remember(stats, sx, sz)
        return finish(EMStepResult(nll_before, nll, total_bt, moved, 1.0 if moved else 0.0, sx.clone(), sz.clone(),
                                   num_regions, q_gain, ver.trials, e_steps=initial_e_steps + ver.e_steps,
                                   e_step_reused=reused, certified_blocks=certified, merged_blocks=merged))

    obs_var_old = (sx_old ** 2).expand(D)
    prior_var_old = sz_old ** 2
    if m_step_method == "closed_form":
        res = m_step(net, stats.patterns, stats, obs_var_old, prior_var_old, obs_noise=obs_noise,
                     update_prior_scale=update_prior_scale, update_obs_scale=update_obs_scale, sweeps=sweeps,
                     order=order, rcond=rcond, min_obs_var=min_obs_var, solver=layer_solver)
        net.set_affine_maps(res.maps)  # validates every step before writing anything
        sx_new, sz_new = to_scale(res.obs_var), res.prior_var.sqrt()
        q_old, q_new = res.q_trace[0], res.q_trace[-1]   # Q before and after the sweeps (σx before its rounding)
    else:
        q_old = Q(stats, sx_old, sz_old)
        sx_new, sz_new = _gradient_m_step(decoder, net, stats, sx_old, sz_old, obs_noise=obs_noise,
                                          update_prior_scale=update_prior_scale,
                                          update_obs_scale=update_obs_scale, steps=gradient_steps,
                                          lr=gradient_lr)
        sx_new = floored(sx_new) if update_obs_scale else sx_new
        q_new = Q(stats, sx_new, sz_new)
    new_params = _snapshot(decoder)
    ver = _Verifier(decoder, x, mkw, max_backtracks, monotone_tol, want_stats=False, weights=weights, comm=comm,
                    obs_scale_roundtrip=obs_scale_roundtrip)
    # Which trials are E-steps (only with a cache: the accepted trial's E-step is the next step's). S = 1 (global
    # partition): all of them — the fused kernel gives a pair's moments with its likelihood, so an E-step costs about
    # a likelihood evaluation. Otherwise the first trial, when the last step accepted its first trial.
    if cache is None:
        with_stats = None
    elif S == 1 and mkw.get("partition", "global") == "global":
        def with_stats(k):
            return True
    else:
        first = cache.first_trial_accepted

        def with_stats(k):
            return k == 0 and first
    ok, k, nll, stats_new, sx, sz = ver.line_search(nll_before, stats.total_abs_loglik, old_params, new_params,
                                                    sx_old, sx_new, sz_old, sz_new, t0=initial_step,
                                                    with_stats=with_stats)
    # An accepted E-step trial is the E-step the next step starts from; a step accepted on a likelihood leaves none;
    # a rejected one restored θ_old, whose E-step this step started from.
    remember(stats_new if ok else stats, sx, sz)
    if cache is not None:
        cache.first_trial_accepted = ok and k == 0
    t = initial_step * 0.5 ** k
    # the next line search starts from the length kept here, grown after a first-trial acceptance (module docstring)
    t_next = (1.0 if not ok else t if k > 0 else min(1.0, STEP_GROWTH * t))
    return finish(EMStepResult(nll_before, nll, k, ok, t if ok else 0.0, sx.clone(), sz.clone(), num_regions,
                               q_new - q_old, ver.trials, e_steps=initial_e_steps + ver.e_steps,
                               log_prob_evals=ver.log_prob_evals, e_step_reused=reused, next_step_size=t_next))


def run_em(decoder, obs_scale, prior_scale, x: torch.Tensor, num_steps: int, *, callback=None,
           **kwargs) -> tuple[torch.Tensor, torch.Tensor, list[EMStepResult]]:
    """Run :func:`em_step` ``num_steps`` times, threading σx, σz; returns (obs_scale, prior_scale, history).

    ``callback(step, result)`` is called after every step; returning True stops early. Consecutive steps share
    an :class:`EStepCache` (a step starts from the previous step's final E-step) unless ``cache`` is given.
    """
    history = []
    kwargs.setdefault("cache", EStepCache())
    for i in range(num_steps):
        res = em_step(decoder, obs_scale, prior_scale, x, **kwargs)
        obs_scale, prior_scale = res.obs_scale, res.prior_scale
        kwargs["initial_step"] = res.next_step_size
        history.append(res)
        if callback is not None and callback(i, res):
            break
    return obs_scale, prior_scale, history
