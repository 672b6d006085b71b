"""Exact per-datum log-likelihoods and information criteria of a fitted CPA model."""
from __future__ import annotations

import math
from typing import NamedTuple

import pyro
import torch

from .structure import full_data_structure


def log_evidence(model, *args, **kwargs) -> torch.Tensor:
    """Exact log p(x_n) for every datum of the model's data plate (all data, even if the plate subsamples).

    Exact to machine precision for S <= 2 (~1e-10 for S = 3, Monte Carlo for S >= 4). Sum it for the
    total log-likelihood. Use it for anomaly scores (low log p) and model comparison.
    """
    structure = full_data_structure(model, *args, **kwargs)
    with torch.no_grad():
        return structure.marginal().log_prob(structure.x)


class InformationCriteria(NamedTuple):
    """Exact log-likelihood of the data, number of free parameters k, AIC = 2k − 2 log L, BIC = k log N − 2 log L."""

    log_likelihood: float
    num_params: int
    num_data: int
    aic: float
    bic: float


def count_free_parameters(model, *args, **kwargs) -> int:
    """Free parameters of a CPA model: the decoder's weights and biases, plus σx if it is a Pyro param."""
    structure = full_data_structure(model, *args, **kwargs)
    k = sum(p.numel() for p in structure.network.module.parameters() if p.requires_grad)
    if structure.obs_scale_param is not None:
        k += pyro.param(structure.obs_scale_param).numel()
    return int(k)


def information_criteria(model, *args, **kwargs) -> InformationCriteria:
    """AIC and BIC of a CPA model from its exact log-likelihood (see :class:`InformationCriteria`)."""
    lp = log_evidence(model, *args, **kwargs)
    k = count_free_parameters(model, *args, **kwargs)
    n = int(lp.numel())
    ll = float(lp.sum())
    return InformationCriteria(ll, k, n, 2 * k - 2 * ll, k * math.log(n) - 2 * ll)
