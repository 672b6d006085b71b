"""Small generated data sets used by the demo, the examples and the tests (no downloads)."""
from __future__ import annotations

import math

import torch


def _generator(seed: int | None) -> torch.Generator:
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


def noisy_circle(n: int = 500, noise: float = 0.05, seed: int | None = 0, dtype=torch.float64) -> torch.Tensor:
    """n points uniformly on the unit circle plus N(0, noise²) noise in each coordinate (the paper's §4.3 data)."""
    g = _generator(seed)
    t = torch.rand(n, generator=g, dtype=dtype) * 2 * math.pi
    return torch.stack([t.cos(), t.sin()], -1) + noise * torch.randn(n, 2, generator=g, dtype=dtype)


def cosine_wave(n: int = 500, noise: float = 0.05, periods: float = 1.5, seed: int | None = 0,
                dtype=torch.float64) -> torch.Tensor:
    """Points (t, cos(π·periods·t)) for t ~ U(−1, 1) — ``periods`` full periods — plus N(0, noise²) noise
    (the paper's Fig. 6 data)."""
    g = _generator(seed)
    t = torch.rand(n, generator=g, dtype=dtype) * 2 - 1
    x = torch.stack([t, torch.cos(math.pi * periods * t)], -1)
    return x + noise * torch.randn(n, 2, generator=g, dtype=dtype)


def swiss_roll(n: int = 500, noise: float = 0.05, seed: int | None = 0, dtype=torch.float64) -> torch.Tensor:
    """A 2-D swiss-roll surface in R³ (scaled to unit size) plus N(0, noise²) noise."""
    g = _generator(seed)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=dtype))
    h = torch.rand(n, generator=g, dtype=dtype) * 2 - 1
    x = torch.stack([t * torch.cos(t), 3 * h, t * torch.sin(t)], -1) / 10
    return x + noise * torch.randn(n, 3, generator=g, dtype=dtype)
