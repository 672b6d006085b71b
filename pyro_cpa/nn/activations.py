"""Piecewise-affine activation layers in the canonical form used by pyro-cpa.

An activation layer maps its pre-activation ``t`` (n values) to its output ``h`` (n_out values). It is
described by

* its **forms**: ``u`` affine functions of t, ``φ_f(t) = t[pos_f] − t[neg_f] + const_f`` (the
  ``t[neg]`` term absent when ``neg_f = −1``). The layer is affine wherever no form changes sign,
  so the hyperplanes ``φ_f(t(z)) = 0`` bound the linear regions. A region's **pattern** is the
  boolean vector ``φ_f >= 0`` (one bit per form, exactly as for a ReLU unit);
* its **selection**: given a pattern, ``h_j = scale_j · t[src_j] + offset_j``.

Two kinds:

* :class:`Elementwise` — a continuous piecewise-linear function σ applied per unit, with kinks
  ``κ_1 < … < κ_k`` (the same for every unit) and slopes ``s_0, …, s_k`` (per unit for PReLU). Its
  forms are ``t_i − κ_j`` (unit-major: form ``i k + j``); a unit's state is the number of kinks it
  has passed (0 … k) and ``σ(t) = s_state t + o_state`` with the offsets fixed by continuity,
  ``o_0 = σ(κ_1) − s_0 κ_1``, ``o_j = σ(κ_j) − s_j κ_j``, ``σ(κ_{j+1}) = s_j κ_{j+1} + o_j``. ReLU,
  LeakyReLU, Abs, PReLU: one kink at 0; Hardtanh / ReLU6 / Clamp / Hardsigmoid / Softshrink: two.
* :class:`MaxPool` — ``h_j = max_{i ∈ window_j} t_i``. Its forms are ``t_a − t_b`` for every pair
  ``a < b`` of entries of a window (bit 1: a is at least b); the selected entry is the one that wins
  most pairwise comparisons (the first of those on a tie, like ``torch.argmax``). Within a region
  no two entries cross, so the pattern defines a total order and the winner is the argmax.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import NotCPAError


class Elementwise:
    """Element-wise continuous piecewise-linear activation (see the module docstring).

    Args:
        names: module names composed into this layer.
        kinks: sorted, strictly increasing kinks κ_1 … κ_k (floats).
        slopes: k + 1 slopes (floats), or ``None`` for the first slope when ``prelu`` gives it.
        value_at_first_kink: σ(κ_1).
        shape: per-sample shape of the pre-activation (n = prod(shape)).
        prelu: a ``nn.PReLU`` whose weight (per channel, channel = first entry of ``shape``) is the
            slope below 0 (read live, differentiable).
    """

    def __init__(self, names, kinks, slopes, value_at_first_kink: float, shape, prelu: nn.Module | None = None):
        self.names = tuple(names)
        self.kinks = tuple(float(k) for k in kinks)
        if any(b <= a for a, b in zip(self.kinks, self.kinks[1:])):
            raise NotCPAError(f"activation {self.names}: kinks must increase strictly, got {self.kinks}")
        self.slope_values = tuple(slopes)
        self.value_at_first_kink = float(value_at_first_kink)
        self.shape = tuple(shape)
        self.prelu = prelu
        self.n_in = self.n_out = math.prod(self.shape)
        k = len(self.kinks)
        self.num_forms = self.n_in * k
        self.form_pos = torch.arange(self.n_in, device="cpu").repeat_interleave(k)  # moved to the data's device at use
        self.form_neg = torch.full((self.num_forms,), -1, dtype=torch.long, device="cpu")
        self._kinks_t = torch.tensor(self.kinks, dtype=torch.float64, device="cpu")

    # ------------------------------------------------------------------ classic view
    @property
    def negative_slope(self) -> float | None:
        """α when σ(t) = t for t >= 0 and α t below (ReLU, LeakyReLU, Abs); else ``None``."""
        if self.kinks == (0.0,) and self.prelu is None and self.value_at_first_kink == 0.0 \
                and self.slope_values[1] == 1.0:
            return float(self.slope_values[0])
        return None

    def form_const(self, dtype, device) -> torch.Tensor:
        return (-self._kinks_t).to(dtype=dtype, device=device).repeat(self.n_in)

    def slopes_and_offsets(self, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(k+1, n) slopes and offsets of the pieces (continuity fixes the offsets)."""
        n, k = self.n_in, len(self.kinks)
        rows = []
        for j, s in enumerate(self.slope_values):
            if s is None:
                w = self.prelu.weight.to(dtype=dtype, device=device)
                if w.numel() == 1:
                    rows.append(w.reshape(1).expand(n))
                else:
                    rows.append(w.view((-1,) + (1,) * (len(self.shape) - 1)).expand(self.shape).reshape(n))
            else:
                rows.append(torch.full((n,), float(s), dtype=dtype, device=device))
        slopes = torch.stack(rows)
        offsets = []
        value = torch.full((n,), self.value_at_first_kink, dtype=dtype, device=device)
        for j in range(k + 1):
            if j == 0:
                offsets.append(value - slopes[0] * self.kinks[0])
            else:
                offsets.append(value - slopes[j] * self.kinks[j - 1])
                if j < k:   # value at the next kink
                    value = slopes[j] * self.kinks[j] + offsets[-1]
        return slopes, torch.stack(offsets)

    def select(self, q: torch.Tensor, dtype, device):
        """``(src, scale, offset)`` of patterns ``q`` (R, u) bool: h = scale · t[src] + offset, each (R, n);
        ``src`` is ``None`` (the identity: h_i depends on t_i only)."""
        R = q.shape[0]
        k = len(self.kinks)
        slopes, offsets = self.slopes_and_offsets(dtype, device)
        state = q.reshape(R, self.n_in, k).sum(-1).to(device)
        scale = slopes.gather(0, state)
        offset = offsets.gather(0, state)
        return None, scale, offset

    def __repr__(self) -> str:
        return f"Elementwise({'+'.join(self.names)}, kinks={self.kinks}, n={self.n_in})"


class MaxPool:
    """Max over windows of the pre-activation (see the module docstring).

    Args:
        names: module names.
        windows: (n_out, K) long, flat input indices of each window, padded with -1.
        in_shape, out_shape: per-sample shapes.
    """

    def __init__(self, names, windows: torch.Tensor, in_shape, out_shape):
        self.names = tuple(names)
        self.windows = windows
        self.in_shape, self.shape = tuple(in_shape), tuple(out_shape)
        self.n_in, self.n_out = math.prod(self.in_shape), windows.shape[0]
        K = windows.shape[1]
        a, b = torch.triu_indices(K, K, 1)
        valid = (windows[:, a] >= 0) & (windows[:, b] >= 0)            # (n_out, P)
        w_idx, p_idx = torch.nonzero(valid, as_tuple=True)
        self.form_window = w_idx
        self.form_a, self.form_b = a[p_idx], b[p_idx]                  # entries within the window
        self.form_pos = windows[w_idx, self.form_a]
        self.form_neg = windows[w_idx, self.form_b]
        self.num_forms = int(w_idx.numel())

    negative_slope = None

    def form_const(self, dtype, device) -> torch.Tensor:
        return torch.zeros(self.num_forms, dtype=dtype, device=device)

    def select(self, q: torch.Tensor, dtype, device):
        R = q.shape[0]
        K = self.windows.shape[1]
        qf = q.to(torch.long).cpu()
        wins = torch.zeros(R, self.n_out * K, dtype=torch.long)
        ia = (self.form_window * K + self.form_a).expand(R, -1)
        ib = (self.form_window * K + self.form_b).expand(R, -1)
        wins.scatter_add_(1, ia, qf)
        wins.scatter_add_(1, ib, 1 - qf)
        wins = wins.view(R, self.n_out, K)
        wins = torch.where(self.windows[None] >= 0, wins, torch.full_like(wins, -1))
        winner = wins.argmax(-1)                                       # first of the best on a tie
        src = self.windows.expand(R, -1, -1).gather(2, winner[..., None])[..., 0].to(device)
        scale = torch.ones(R, self.n_out, dtype=dtype, device=device)
        return src, scale, torch.zeros_like(scale)

    def __repr__(self) -> str:
        return f"MaxPool({'+'.join(self.names)}, {self.in_shape} -> {self.shape})"


def _window_1d(L: int, O: int, module, d: int) -> list[list[int]]:
    """Input positions of each of the O outputs along one spatial dimension of a (adaptive) max pool."""
    if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        return [list(range((o * L) // O, -((-(o + 1) * L) // O))) for o in range(O)]
    def get(v):
        return v if isinstance(v, int) else v[d]
    k, s, p, dil = get(module.kernel_size), get(module.stride), get(module.padding), get(module.dilation)
    return [[i for i in (o * s - p + j * dil for j in range(k)) if 0 <= i < L] for o in range(O)]


def maxpool_windows(module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> torch.Tensor:
    """(n_out, K) flat input indices of each output of a max pool (padded with -1), C-order."""
    nd = len(in_shape) - 1
    C = in_shape[0]
    per_dim = [_window_1d(in_shape[1 + d], out_shape[1 + d], module, d) for d in range(nd)]
    K = math.prod(max(len(w) for w in ws) for ws in per_dim)
    strides = [math.prod(in_shape[2 + d:]) for d in range(nd)]
    rows = []
    import itertools
    for c in range(C):
        for outs in itertools.product(*per_dim):
            idx = [c * math.prod(in_shape[1:]) + sum(i * st for i, st in zip(combo, strides))
                   for combo in itertools.product(*outs)]
            rows.append(idx + [-1] * (K - len(idx)))
    return torch.tensor(rows, dtype=torch.long).reshape(-1, K)
