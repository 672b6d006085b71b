"""Result types shared by the Gaussian-on-polytope integrators."""
from __future__ import annotations

from typing import NamedTuple

import torch


class StandardMoments(NamedTuple):
    """Mass and conditional moments of the standard normal u ~ N(0, I_S) on a polytope {u : G u <= d}.

    Attributes:
        log_mass: (...,) log P(u in ω).
        mean: (..., S) E[u | u in ω].
        second_moment: (..., S, S) E[u uᵀ | u in ω].
        log_mass_stderr: (...,) standard error of ``log_mass`` (exactly 0 for the exact methods S <= 3).
        covariance: optional (..., S, S) Cov[u | u in ω] computed without the subtraction
            E[uuᵀ] − E[u]E[u]ᵀ (which cancels catastrophically in the tails); when given, the
            assembly in :func:`~pyro_cpa.integrate.integrate_whitened` uses it.
    """

    log_mass: torch.Tensor
    mean: torch.Tensor
    second_moment: torch.Tensor
    log_mass_stderr: torch.Tensor
    covariance: torch.Tensor | None = None


class PolytopeMoments(NamedTuple):
    """Mass and conditional moments of z ~ N(loc, Σ) on a polytope {z : H z <= c}.

    Attributes:
        log_mass: (...,) log P(z in ω).
        mean: (..., S) E[z | z in ω].
        covariance: (..., S, S) Cov[z | z in ω].
        log_mass_stderr: (...,) standard error of ``log_mass`` (0 where exact to machine precision).
    """

    log_mass: torch.Tensor
    mean: torch.Tensor
    covariance: torch.Tensor
    log_mass_stderr: torch.Tensor
