r"""Exact EM and exact evaluation on data sharded over ``torch.distributed`` ranks (gloo on CPU, nccl on GPU).

Each rank holds a *contiguous* shard of the data in rank order (rank 0 the first n_0 data, rank 1 the next
n_1, …; any sizes, 0 included) and runs the same program: ``EM(model, distributed=True).step(x_shard)``,
``information_criteria(model, x_shard, distributed=True)``, ``exact_elbo(..., distributed=True)``,
``all_reduce_sum(log_evidence(model, x_shard))``. Launch with ``torchrun --nproc_per_node P script.py`` (see
:func:`init_distributed`) or ``torch.multiprocessing.spawn``.

**What is reduced.** Exact EM is a map-reduce: the E-step is per datum, and the closed-form M-step needs only
the per-region statistics Z (R, S+1, S+1), X (R, D, S+1), q (R, D) and the weighted count N
(:mod:`pyro_cpa.infer.estep`), and the backtracking check needs Σ_n ℓ_n and Σ_n |ℓ_n|. Every E-step (the
initial one and each verified candidate) reduces exactly these over the ranks; every rank then takes the
same M-step, the same accept/reject decision and holds the same decoder. Nothing that scales with N is
communicated.

**Why an exact (integer) reduction.** The EM map amplifies rounding: perturbing every entry of the
statistics by one ulp at each E-step moved the circle's NLL (N = 1000, 50 steps) by 3e-7 relative
(1e-11 after 1 step, 4e-8 after 5). A float ``all_reduce`` sums in an order that depends on the world
size and the backend's algorithm, so 2 and 4 ranks could not reproduce one process to 1e-10. Instead
every sum here is *order-independent*:

* Blocks. :func:`~pyro_cpa.infer.em_engine._block_e_step` computes the statistics of fixed blocks of
  ``STATS_BLOCK`` consecutive data, defined by the *global* index (block b = data [256 b, 256 b + 256)).
  A block is computed by the rank that holds its first datum; the ≤ 255 data of a block that spill onto the
  following ranks are sent to it once per EM step (:func:`align_to_blocks`, O(P · STATS_BLOCK · D) numbers,
  independent of N). So every block is computed on exactly the same rows, in the same batch, as in one
  process: its statistics are bit-identical.
* Exact sums. The block statistics (one term per block) and the per-datum ℓ_n are summed by
  :class:`ExactSum`, a binned fixed-point accumulator (after Demmel & Nguyen's reproducible summation):
  every term v is cut at the fixed bit positions 32·k into signed 32-bit digits; per entry, the three
  32-bit slots from the slot holding the largest |term|'s leading bit downward are kept, and digits are
  added as int64 (exact, associative: any order, any grouping, any number of ranks gives the same
  integers). Across ranks: an ``all_reduce(MAX)`` of the per-entry top slots, then an ``all_reduce(SUM)``
  of the int64 digits. The result is a deterministic function of the *multiset* of terms, bit-identical on
  every rank, for every world size and sharding. Its error: each term loses its bits below 2^-64 of the
  entry's largest term (≤ N_terms · 2^-64 · max|v| in all, 2000× below the ~N · 2^-53 · max|v| of a float
  sum), plus ≤ 3 ulp converting the integers to one float64.

Hence 1, 2, 4, … processes give the one-process EM trajectory bit for bit on one machine (the tests allow
1e-10 relative per step, the issue's bound). One process without a process group uses the same code.

**Communication per EM step** (payload bytes; a ring all-reduce moves about twice this per rank). One exact
reduction of E entries costs 8 E bytes (int64 top slots, MAX) + 32 E bytes (three int64 digits and an
int64 non-finite code, SUM) + a status all-gather of 6 int64 per rank (48 P bytes), with

    E = R ((S+1)² + D (S+1) + D) + 4        (Z, X, q, and N, Σℓ, Σ|ℓ|, the count of contributing data).

The layerwise schedule (the default) reduces once per E-step: the initial one plus one per verified
candidate, i.e. T = 1 + Σ_blocks (1 + backtracks) ≥ L + 2 per step for L layers and the σ block. Each
step also re-cuts the shards once (a status all-gather and an all-gather of P · 255 · (D + 2) float64) and
ends with a status all-gather (the decoder check). So

    bytes per step = T (40 E + 48 P) + 8 · 255 · P (D + 2) + 96 P      — independent of N.

Examples for P = 8 ranks and N = 10⁷ (N does not enter), T = 5 (no backtracking): the circle model
(S = 1, D = 2, decoder [1, 8, 8, 2], R = 16 regions at its initialisation, ≈ 20 when trained): E = 20 · 10 + 4
= 204, 8.5 kB per reduction, 43 kB + 65 kB (re-cut) ≈ 0.11 MB per step. A [2, 32, 32, 3] decoder (S = 2,
D = 3, R ≈ 1900–2100 regions at a random initialisation): E = 2000 · 21 + 4 ≈ 42 000, 1.68 MB per reduction,
≈ 8.5 MB per step. (A float64 all_reduce of the same statistics would be 8 E bytes: the exactness costs 5×.)
Print ``len(cached_linear_regions(decoder))`` for your decoder's R.

**The partition is computed identically on every rank**, not broadcast: every rank enumerates the regions
of its own decoder, which is bit-identical on all ranks (same initial state, same reduced statistics,
same deterministic M-step), and enumeration is a deterministic function of the weights' bits on a given
machine type. This is *checked*, not assumed: every collective starts with a status all-gather carrying a
64-bit hash of the decoder's parameters, σx, σz and the activation patterns of the partition; if two
ranks differ (e.g. heterogeneous hardware rounding differently) every rank raises
:class:`PyroCPAError` ("ranks disagree …") instead of silently combining statistics of different regions.

**Failures.** The status all-gather of every collective also carries each rank's state: a rank whose local
work raised joins the next status exchange with a failure code and its message (:func:`guard`), so all
ranks stop with :class:`PeerFailure` naming the rank and its exception (no hang). The expected local
failures of a candidate (``LinAlgError``, :class:`~pyro_cpa.errors.RegionBudgetExceeded`) are agreed
collectively (:class:`SoftFailure`: every rank rejects the candidate). A rank that *dies* breaks the
process group: the others' next collective fails (gloo: at once; nccl: at the process group's timeout),
and is re-raised as :class:`PeerFailure`. Give the process group a timeout (:func:`init_distributed` does).

**Checkpoints.** :func:`save_checkpoint` (rank 0 writes the decoder's ``state_dict``, the Pyro parameter
store — σx as its exact unconstrained value — and the step) and :func:`load_checkpoint` resume the run
bit for bit: EM's state is only the decoder, σx and σz.
"""
from __future__ import annotations

import hashlib
import math
import os
from contextlib import contextmanager
from datetime import timedelta

import torch

from ..errors import PyroCPAError

__all__ = ["ExactSum", "exact_sum", "all_reduce_sum", "init_distributed", "resolve_group", "shard_range",
           "empty_shard_structure", "align_to_blocks", "guard", "agreed_failures", "PeerFailure", "SoftFailure",
           "save_checkpoint", "load_checkpoint"]

#: Width of one fixed-point digit (bits) and number of digits kept per entry: terms keep their bits down to
#: 2^-(LIMB_BITS · (NUM_LIMBS − 1)) = 2^-64 of the entry's largest term.
LIMB_BITS = 32
NUM_LIMBS = 3
#: int64 digit sums are exact for up to this many terms per entry (|digit| < 2^32).
MAX_TERMS = 2 ** 31 - 1
#: Top slot of an entry with no non-zero term (below every float64: 0 has no exponent).
_EMPTY_SLOT = -(2 ** 20)
#: 2^LIMB_BITS as a float (digits are formed by exact float operations).
_LIMB_UNIT = float(2 ** LIMB_BITS)
#: Rows whose digits (|d| < 2^32) are summed as floats at once: every partial sum is an integer below 2^53, exact.
_FLOAT_SUM_ROWS = 2 ** (53 - LIMB_BITS)
#: Smallest exponent of a normal float64 (2^base is a normal number for base >= this).
_MIN_NORMAL_EXP = -1022
#: Status codes of the per-collective all-gather.
_OK, _SOFT, _HARD = 0, 1, 2
_INFO = 3     # small integers a collective may carry besides (code, signature, terms)
DEFAULT_TIMEOUT_S = 300


class PeerFailure(PyroCPAError, RuntimeError):
    """Another rank raised (or died) during a distributed computation; this rank stops too."""


class SoftFailure(PyroCPAError):
    """A rank's part of a collective evaluation failed in an expected way (a candidate's E-step hit
    ``LinAlgError`` or :class:`~pyro_cpa.errors.RegionBudgetExceeded`); every rank rejects the candidate."""


# ---------------------------------------------------------------------------------------------- exact sums
def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2^k as float64, exactly, for an int64 tensor k in [-1022, 1023] (built from the exponent bits)."""
    return ((k + 1023) << 52).view(torch.float64)


def _slot(vmax: torch.Tensor) -> torch.Tensor:
    """The 32-bit slot of the leading bit of each max |v| (floor((e − 1) / 32) for |v| in [2^(e−1), 2^e)); an entry
    whose terms are all 0 sets no slot (0 has no exponent: a representation, not a rounding decision)."""
    e = torch.frexp(vmax)[1].to(torch.int64)
    return torch.where(vmax != 0, torch.div(e - 1, LIMB_BITS, rounding_mode="floor"), _EMPTY_SLOT)


def _shift(limbs: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Digits re-based to a top slot ``delta`` >= 0 slots higher: slot j takes old slot j + delta, 0 above."""
    idx = torch.arange(NUM_LIMBS, device=limbs.device).unsqueeze(-1) + delta.unsqueeze(0)
    moved = limbs.gather(0, idx.clamp(max=NUM_LIMBS - 1))
    return torch.where(idx < NUM_LIMBS, moved, torch.zeros_like(moved))


class ExactSum:
    r"""Order-independent sum of float64 terms for a vector of ``size`` entries (module docstring).

    Per entry it holds the top slot a (the 32-bit slot holding the largest |term|'s leading bit) and three
    int64 digit sums for the slots a−2, a−1, a: the value is Σ_j digits_j · 2^{32 (a−2+j)}. A term v is
    cut into its sign-magnitude digits trunc(|v| / 2^{32 s}) mod 2^32 of those slots (exact float
    operations: scaling by powers of two and ``trunc``); its bits below slot a−2 are dropped. The digits of v
    at a slot do not depend on a, and raising a drops only slots that the final a drops too, so the result
    is a function of the multiset of terms alone. ±inf and NaN terms are tracked per entry (the sum is
    NaN, or ±inf, as float addition would give).
    """

    def __init__(self, size: int, device="cpu"):
        self.top = torch.full((size,), _EMPTY_SLOT, dtype=torch.int64, device=device)
        self.limbs = torch.zeros((NUM_LIMBS, size), dtype=torch.int64, device=device)
        self.nonfinite = torch.zeros((3, size), dtype=torch.bool, device=device)   # NaN, +inf, -inf
        self.terms = 0

    @property
    def size(self) -> int:
        return int(self.top.shape[0])

    def add(self, values: torch.Tensor, start: int = 0) -> "ExactSum":
        """Add the rows of ``values`` (n, m) as n terms of the entries ``start … start + m − 1``."""
        v = values.detach().to(torch.float64).reshape(values.shape[0], -1) if values.dim() else \
            values.detach().to(torch.float64).reshape(1, 1)
        n, m = v.shape
        if start < 0 or start + m > self.size:
            raise PyroCPAError(f"ExactSum.add: entries {start}…{start + m - 1} outside 0…{self.size - 1}")
        if n == 0:
            return self
        self.terms += n
        if self.terms > MAX_TERMS:
            raise PyroCPAError(f"ExactSum: more than {MAX_TERMS} terms per entry would overflow the int64 digits; "
                               "sum in several accumulators")
        v = v.to(self.top.device)
        sl = slice(start, start + m)
        vmax = v.abs().amax(0)   # max |v| per entry (amax propagates NaN; isfinite(v).all() is 4x slower)
        if not bool(torch.isfinite(vmax).all()):
            finite = torch.isfinite(v)
            self.nonfinite[0, sl] |= torch.isnan(v).any(0)
            self.nonfinite[1, sl] |= (v == math.inf).any(0)
            self.nonfinite[2, sl] |= (v == -math.inf).any(0)
            v = torch.where(finite, v, torch.zeros_like(v))
            vmax = v.abs().amax(0)
        old = self.top[sl]
        top = torch.maximum(old, _slot(vmax))
        if bool(((top != old) & (old != _EMPTY_SLOT)).any()):   # an empty entry's digits are 0: nothing to move
            self.limbs[:, sl] = _shift(self.limbs[:, sl], top - old)
        self.top[sl] = top
        # every term in units of the lowest kept slot, truncated toward 0: t = trunc(v / 2^base), |t| < 2^96
        base = (torch.where(top == _EMPTY_SLOT, NUM_LIMBS - 1, top) - (NUM_LIMBS - 1)) * LIMB_BITS
        if int(base.min()) >= _MIN_NORMAL_EXP:     # 2^base is a normal float: one exact division
            t = torch.div(v, _pow2(base), rounding_mode="trunc")
        else:                                       # 2^-base in two exact factors (entries below 2^-900)
            half = torch.div(-base, 2, rounding_mode="floor")
            t = torch.trunc(v * _pow2(half) * _pow2(-base - half))
        # sign-magnitude digits d_j = trunc(t / 2^(32 j)) − 2^32 trunc(t / 2^(32 (j+1))), summed over the rows as
        # floats: exact while rows · 2^32 <= 2^53 (integers below 2^53)
        for lo in range(0, n, _FLOAT_SUM_ROWS):
            tc = t[lo:lo + _FLOAT_SUM_ROWS]
            d = tc.new_empty((NUM_LIMBS,) + tuple(tc.shape))
            for j in range(1, NUM_LIMBS):          # d[j] = trunc(t / 2^(32 j)) (nested truncations: the same)
                torch.div(tc if j == 1 else d[j - 1], _LIMB_UNIT, rounding_mode="trunc", out=d[j])
            for j in range(NUM_LIMBS - 1):          # the digit: the low 32 bits, exact (in increasing j)
                torch.sub(tc if j == 0 else d[j], d[j + 1], alpha=_LIMB_UNIT, out=d[j])
            self.limbs[:, sl] += d.sum(1).to(torch.int64)
        return self

    def merge(self, other: "ExactSum") -> "ExactSum":
        """Add another accumulator of the same size (the result is the same as adding its terms here)."""
        top = torch.maximum(self.top, other.top)
        self.limbs = _shift(self.limbs, top - self.top) + _shift(other.limbs, top - other.top)
        self.top, self.nonfinite = top, self.nonfinite | other.nonfinite
        self.terms += other.terms
        return self

    def _code(self) -> torch.Tensor:
        nf = self.nonfinite.to(torch.int64)
        return nf[0] + (nf[1] << 20) + (nf[2] << 40)

    def value(self, code: torch.Tensor | None = None) -> torch.Tensor:
        """The sums as float64 (size,), within 3 ulp of the exactly kept digits."""
        L = self.limbs.clone()
        base = 2 ** LIMB_BITS
        for j in range(NUM_LIMBS - 1):              # carries: digits 0 … K−2 into [0, 2^32), exact int64
            c = torch.div(L[j], base, rounding_mode="floor")
            L[j] -= c * base
            L[j + 1] += c
        out = L[NUM_LIMBS - 1].to(torch.float64)
        for j in reversed(range(NUM_LIMBS - 1)):
            out = out * float(base) + L[j].to(torch.float64)
        scale = (LIMB_BITS * (self.top - (NUM_LIMBS - 1))).clamp(-2100, 2100)
        for part in range(3):                       # 2^scale in three exact factors (each within ±700)
            h = torch.div(scale, 3 - part, rounding_mode="floor")
            out = out * _pow2(h)
            scale = scale - h
        code = self._code() if code is None else code
        nan = (code & 0xFFFFF) > 0
        pos = ((code >> 20) & 0xFFFFF) > 0
        neg = (code >> 40) > 0
        out = torch.where(pos, torch.full_like(out, math.inf), out)
        out = torch.where(neg, torch.full_like(out, -math.inf), out)
        return torch.where(nan | (pos & neg), torch.full_like(out, math.nan), out)


def exact_sum(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Order-independent float64 sum of ``values`` over ``dim`` (all elements if None); see :class:`ExactSum`."""
    v = values.detach().to(torch.float64)
    if dim is None:
        v = v.reshape(-1, 1)
        shape = ()
    else:
        v = v.movedim(dim, 0)
        shape = v.shape[1:]
        v = v.reshape(v.shape[0], -1)
    return ExactSum(v.shape[1], v.device).add(v).value().reshape(shape)


# ---------------------------------------------------------------------------------------------- process groups
def resolve_group(distributed):
    """``False``/``None`` → None (one process); ``True`` → the default process group; a ProcessGroup → itself."""
    if distributed is None or distributed is False:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise PyroCPAError("distributed=True needs an initialised torch.distributed process group: call "
                           "pyro_cpa.infer.distributed.init_distributed() (or torch.distributed.init_process_group) "
                           "in every process first, e.g. under `torchrun --nproc_per_node 2 script.py`")
    return dist.group.WORLD if distributed is True else distributed


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs):
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, …).

    ``backend`` defaults to nccl when CUDA is available, else gloo; ``timeout_s`` bounds how long a collective
    waits for a dead or stuck rank. With nccl, each process uses GPU ``LOCAL_RANK``. Returns (rank, world size).
    """
    import torch.distributed as dist

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return dist.get_rank(), dist.get_world_size()


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous shard when n data are split as evenly as possible (larger last)."""
    start = (n * rank) // world_size
    return start, (n * (rank + 1)) // world_size


def _hash(*items) -> int:
    """56-bit hash of tensors' bytes (values, shapes and dtypes), for the consistency check of ranks."""
    h = hashlib.blake2b(digest_size=7)
    for it in items:
        if it is None:
            continue
        ts = it if isinstance(it, (list, tuple)) else [it]
        for t in ts:
            t = t.detach().cpu().contiguous()
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return int.from_bytes(h.digest(), "little")


def state_signature(decoder, *tensors, patterns=None) -> int:
    """Hash of the decoder's parameters, the given tensors (σx, σz) and the partition's activation patterns."""
    return _hash(list(decoder.parameters()), *tensors, patterns)


class Comm:
    """The collectives of one process group, each preceded by a status all-gather (module docstring)."""

    def __init__(self, group):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(group) == "nccl" else torch.device("cpu")

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, OSError) as e:
            err = PeerFailure(f"rank {self.rank}: a collective of the distributed computation failed — another rank "
                              f"died, or the process group's timeout expired ({type(e).__name__}: {e})")
            err._pyro_cpa_reported = True
            raise err from e

    def status(self, code: int = _OK, signature: int = 0, info=(), message: str = "", error=None) -> torch.Tensor:
        """All-gather (code, signature, info…) of every rank; raise on every rank if any rank failed or disagrees.

        Returns the gathered (P, 2 + _INFO) int64 table when all ranks are fine and agree."""
        row = torch.zeros(2 + _INFO, dtype=torch.int64, device="cpu")
        row[0], row[1] = code, signature
        for i, v in enumerate(info):
            row[2 + i] = int(v)
        row = row.to(self.device)
        table = [torch.zeros_like(row) for _ in range(self.size)]
        self._call(self.dist.all_gather, table, row, group=self.group)
        table = torch.stack(table).cpu()
        codes = table[:, 0]
        if bool((codes != _OK).any()):
            msgs = [None] * self.size
            self._call(self.dist.all_gather_object, msgs, message, group=self.group)
            worst = int(codes.max())
            bad = [r for r in range(self.size) if int(codes[r]) == worst]
            text = "; ".join(f"rank {r}: {msgs[r]}" for r in bad)
            cls = SoftFailure if worst == _SOFT else PeerFailure
            err = cls(f"stopped on rank {self.rank} because {text}")
            err._pyro_cpa_reported = True
            if error is not None:
                raise err from error
            raise err
        sigs = table[:, 1]
        if bool((sigs != sigs[0]).any()):
            err = PyroCPAError(f"the ranks disagree on the decoder's parameters, σx, σz or the partition of latent "
                               f"space (state hashes {[hex(int(s)) for s in sigs]}): the ranks' decoders diverged "
                               "(different initial weights? heterogeneous hardware rounding differently?). Start every "
                               "rank from the same state (e.g. load one checkpoint) on identical hardware.")
            err._pyro_cpa_reported = True
            raise err
        return table

    def fail(self, error: BaseException) -> None:
        """Report this rank's exception at the next status exchange of the other ranks (then the caller re-raises)."""
        code = _SOFT if isinstance(error, SoftFailure) else _HARD
        try:
            self.status(code, message=f"{type(error).__name__}: {error}")
        except PyroCPAError:
            pass

    def sum(self, acc: ExactSum, signature: int = 0, info=()) -> tuple[torch.Tensor, torch.Tensor]:
        """(exact sums over all ranks (size,), the status table) of the accumulators of every rank."""
        table = self.status(_OK, signature, (acc.size,) + tuple(info))
        if bool((table[:, 2] != acc.size).any()):
            raise PyroCPAError(f"the ranks reduce statistics of different sizes {table[:, 2].tolist()} (different "
                               "partitions or decoders)")
        own = acc.top.to(self.device)
        top = own.clone()       # all_reduce works in place: keep this rank's top slots
        self._call(self.dist.all_reduce, top, op=self.dist.ReduceOp.MAX, group=self.group)
        limbs = _shift(acc.limbs.to(self.device), top - own)
        payload = torch.cat([limbs.reshape(-1), acc._code().to(self.device)])
        self._call(self.dist.all_reduce, payload, op=self.dist.ReduceOp.SUM, group=self.group)
        out = ExactSum(acc.size, self.device)
        out.top = top
        out.limbs = payload[:NUM_LIMBS * acc.size].reshape(NUM_LIMBS, acc.size)
        return out.value(payload[NUM_LIMBS * acc.size:]).to(acc.top.device), table

    def gather_ints(self, info, signature: int = 0) -> torch.Tensor:
        """Every rank's small integers ``info`` (≤ 3), (P, len(info)), after the status check."""
        return self.status(_OK, signature, info)[:, 2:2 + len(info)]


def comm_for(group) -> Comm | None:
    return None if group is None else Comm(group)


@contextmanager
def guard(comm: Comm | None):
    """Run a rank's share of a distributed computation; if it raises, tell the other ranks (they stop with
    :class:`PeerFailure` at their next collective) and re-raise here. A no-op without a process group."""
    if comm is None:
        yield
        return
    try:
        yield
    except BaseException as e:
        if not getattr(e, "_pyro_cpa_reported", False):
            try:
                e._pyro_cpa_reported = True
            except AttributeError:
                pass
            comm.fail(e)
        raise


@contextmanager
def agreed_failures(comm: Comm | None, kinds: tuple):
    """Local work whose expected failures (exception types ``kinds``) every rank must agree on: if it raises one of
    them, every rank raises :class:`SoftFailure` at its next collective (this rank at once, from the original).
    Without a process group the original exception propagates unchanged."""
    try:
        yield
    except kinds as e:
        if comm is None:
            raise
        comm.status(_SOFT, message=f"{type(e).__name__}: {e}", error=e)
        raise  # not reached: status raises on every rank when a code is not OK


def reduce_sums(comm: Comm | None, acc: ExactSum, signature: int = 0) -> torch.Tensor:
    """The exact sums of ``acc`` over all ranks (its own value without a process group)."""
    return acc.value() if comm is None else comm.sum(acc, signature)[0]


def all_reduce_sum(values: torch.Tensor, dim: int | None = None, group=True) -> torch.Tensor:
    """Exact, order-independent sum of ``values`` over ``dim`` (all elements if None) *and over all ranks*.

    Every rank gets the same float64 result, bit for bit, whatever the world size and the sharding (see
    :class:`ExactSum`); e.g. ``all_reduce_sum(log_evidence(model, x_shard))`` is the total log-likelihood of
    all data. The shape of the result (the non-reduced dims) must be the same on every rank; a rank with no
    data passes an empty tensor of the right shape. ``group``: True (the default process group, or one
    process when torch.distributed is not initialised), or a ProcessGroup.
    """
    import torch.distributed as dist

    if group is True and not (dist.is_available() and dist.is_initialized()):
        group = None
    comm = comm_for(resolve_group(group) if group is not None else None)
    v = values.detach().to(torch.float64)
    if dim is None:
        v, shape = v.reshape(-1, 1), ()
    else:
        v = v.movedim(dim, 0)
        shape = v.shape[1:]
        v = v.reshape(v.shape[0], -1)
    acc = ExactSum(v.shape[1], v.device).add(v)
    return reduce_sums(comm, acc).reshape(shape)


# ---------------------------------------------------------------------------------------------- data layout
def align_to_blocks(comm: Comm, x: torch.Tensor, weights, block: int, signature: int = 0):
    """Re-cut contiguous shards so that each rank holds whole global blocks of ``block`` data.

    Block b (global data [b·block, (b+1)·block)) goes to the rank holding its first datum; each rank sends
    the data before its first block start (< ``block`` rows, with their weights) to that rank. Returns
    (x_owned, weights_owned or None, N_global): weights are None when every datum of every rank is unweighted
    (as in one process). One status all-gather and one all-gather of P · (block − 1) · (D + 2) numbers.
    """
    from .structure import DataWeights

    n, D = x.shape[0], x.shape[-1]
    unit = weights is None
    table = comm.gather_ints((n, 0 if unit else 1, D), signature)
    sizes = [int(s) for s in table[:, 0]]
    if len(set(int(d) for d in table[:, 2])) != 1:
        raise PyroCPAError(f"the ranks' data have different dimensions D: {table[:, 2].tolist()}")
    weighted = bool(table[:, 1].any())
    offsets = [sum(sizes[:r]) for r in range(comm.size)]
    N = sum(sizes)
    o = offsets[comm.rank]
    if weighted and weights is None:
        weights = DataWeights.ones(n, x)
    w_obs = weights.obs.to(x) if weighted else x.new_ones(n)
    w_lat = weights.latent.to(x) if weighted else x.new_ones(n)

    def lead(r):   # number of leading rows of rank r that belong to a block owned by an earlier rank
        first = -(-offsets[r] // block) * block
        return min(sizes[r], first - offsets[r])

    k = lead(comm.rank)
    send = x.new_full((block - 1, D + 2), math.nan)
    send[:k, :D] = x[:k]
    send[:k, D] = w_obs[:k]
    send[:k, D + 1] = w_lat[:k]
    send = send.to(comm.device)
    recv = [torch.empty_like(send) for _ in range(comm.size)]
    comm._call(comm.dist.all_gather, recv, send, group=comm.group)
    own_start = -(-o // block) * block
    if own_start >= o + n:        # this rank holds no block start: it owns no data
        return x[:0], (DataWeights(w_obs[:0], w_lat[:0]) if weighted else None), N
    own_end = min(-(-(o + n) // block) * block, N)
    rows, wo, wl = [x[k:]], [w_obs[k:]], [w_lat[k:]]
    r = comm.rank + 1
    while r < comm.size and offsets[r] < own_end:
        take = min(lead(r), own_end - offsets[r])
        part = recv[r][:take].to(x.device, x.dtype)
        rows.append(part[:, :D])
        wo.append(part[:, D])
        wl.append(part[:, D + 1])
        r += 1
    xo = torch.cat(rows)
    if xo.shape[0] != own_end - own_start:
        raise PyroCPAError(f"align_to_blocks: rank {comm.rank} assembled {xo.shape[0]} rows for global data "
                           f"[{own_start}, {own_end})")
    return xo, (DataWeights(torch.cat(wo).to(torch.float64), torch.cat(wl).to(torch.float64)) if weighted else None), N


def empty_shard_structure(model, args, kwargs, error):
    """The model's structure on a rank whose shard is empty (Pyro refuses a plate of size 0): the model is traced
    with every 0-row floating tensor argument replaced by one all-NaN row (a fully missing datum), to read its
    decoder, σx and σz; the returned structure holds 0 data."""
    from .structure import DataWeights, full_data_structure

    def stand_in(a):
        if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == 0 and a.is_floating_point():
            return a.new_full((1,) + tuple(a.shape[1:]), math.nan)
        return a

    try:
        structure = full_data_structure(model, *[stand_in(a) for a in args],
                                        **{k: stand_in(v) for k, v in kwargs.items()})
    except Exception as e:
        raise PyroCPAError(f"this rank's data plate is empty ({error}) and the model could not be traced on a one-row "
                           f"stand-in ({type(e).__name__}: {e}); give every rank at least one datum") from e
    structure.x = structure.x[..., :0, :] if structure.x.dim() >= 2 else structure.x[:0]
    w = structure.weights
    structure.weights = DataWeights(w.obs[:0], w.latent[:0])
    return structure


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, decoder, step: int, group=True, **extra) -> None:
    """Rank 0 writes {decoder state_dict, Pyro param store state (σx exactly, unconstrained), step, extra};
    every rank waits until the file is complete (a barrier). Works in one process too."""
    import pyro
    import torch.distributed as dist

    group = resolve_group(group) if (group is not True or (dist.is_available() and dist.is_initialized())) else None
    comm = comm_for(group)
    if comm is None or comm.rank == 0:
        state = {"step": int(step), "decoder": decoder.state_dict(), "param_store": pyro.get_param_store().get_state(),
                 **extra}
        tmp = f"{path}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)
    if comm is not None:
        comm.status(_OK, state_signature(decoder))


def load_checkpoint(path, decoder, map_location=None) -> dict:
    """Load a :func:`save_checkpoint` file into ``decoder`` and the Pyro param store; returns the dict (its
    ``"step"`` is the number of steps done). Call it on every rank before building the model's EM."""
    import pyro

    state = torch.load(path, map_location=map_location, weights_only=False)
    decoder.load_state_dict(state["decoder"])
    pyro.get_param_store().set_state(state["param_store"])
    return state
