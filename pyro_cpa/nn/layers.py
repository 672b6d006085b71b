"""Layers provided by pyro-cpa."""
from __future__ import annotations

import torch
from torch import nn


class Abs(nn.Module):
    """Element-wise absolute value, a continuous piecewise affine activation (|x| = LeakyReLU slope -1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()


class Clamp(nn.Module):
    """Element-wise ``clamp(x, min_val, max_val)`` (either bound may be ``None``): one or two kinks per unit."""

    def __init__(self, min_val: float | None = None, max_val: float | None = None):
        super().__init__()
        if min_val is None and max_val is None:
            raise ValueError("Clamp needs min_val or max_val (without either it is nn.Identity)")
        if min_val is not None and max_val is not None and not float(min_val) < float(max_val):
            raise ValueError(f"Clamp needs min_val < max_val, got {min_val} and {max_val}")
        self.min_val = None if min_val is None else float(min_val)
        self.max_val = None if max_val is None else float(max_val)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.min_val, self.max_val)

    def spec(self):
        """``(kinks, slopes, σ(κ_1), None)`` of the canonical element-wise view."""
        if self.max_val is None:
            return (self.min_val,), (0.0, 1.0), self.min_val, None
        if self.min_val is None:
            return (self.max_val,), (1.0, 0.0), self.max_val, None
        return (self.min_val, self.max_val), (0.0, 1.0, 0.0), self.min_val, None

    def extra_repr(self) -> str:
        return f"min_val={self.min_val}, max_val={self.max_val}"


def mlp(widths, activation=nn.ReLU, *, seed: int | None = None, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """A fully connected CPA decoder ``Linear(w0, w1), activation(), ..., Linear(w_{k-1}, w_k)`` in ``dtype``.

    ``activation`` is a zero-argument factory (a class such as ``nn.ReLU``, or e.g. ``lambda: nn.LeakyReLU(0.1)``).
    With ``seed``, ``torch.manual_seed(seed)`` is called first, so the same call gives the same weights.
    """
    if seed is not None:
        torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers).to(dtype)
