r"""Exact per-datum log-likelihoods and information criteria of a fitted CPA model.

Masks and scales follow Pyro (see :mod:`pyro_cpa.infer.structure`): the value for datum n is its evidence
term L_n = s_z,n log ∫ p(z) p(x_n | z)^{s_x,n/s_z,n} dz — log p(x_n) for an unweighted datum, w_n log p(x_n)
for a plate-level weight w_n, 0 for a masked observation — so ``log_evidence(model).sum()`` is the exact
maximum over guides of Pyro's ELBO (with the guide carrying the latent site's scale), as
``model.log_prob_sum()`` is Pyro's log-joint. NaN entries of x are missing coordinates (marginalised).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import pyro
import torch

from ..geometry.regions import DEFAULT_MAX_REGIONS
from .estep import weighted_log_prob
from .structure import full_data_structure


def log_evidence(model, *args, max_regions: int = DEFAULT_MAX_REGIONS, **kwargs) -> torch.Tensor:
    """Exact evidence term L_n of every datum of the model's data plate (all data, even if the plate subsamples).

    Without masks or scales L_n = log p(x_n); masked data give 0; see the module docstring for scales.
    Exact to machine precision for S <= 2 (~1e-10 for S = 3, Monte Carlo for S >= 4). Sum it for the
    total log-likelihood. Use it for anomaly scores (low log p) and model comparison.

    Args:
        model, *args, **kwargs: the model and its arguments.
        max_regions: budget of the region enumeration (:class:`~pyro_cpa.errors.RegionBudgetExceeded` above it).
    """
    structure = full_data_structure(model, *args, **kwargs)
    with torch.no_grad():
        lp = weighted_log_prob(structure.marginal(max_regions=max_regions), structure.x.detach(),
                               None if structure.weights.is_unit else structure.weights)
    return lp.reshape(structure.x.shape[:-1])


class InformationCriteria(NamedTuple):
    """Exact log-likelihood L = Σ_n L_n, number of free parameters k, the number of data contributing (weight > 0
    and at least one observed coordinate), AIC = 2k − 2L and BIC = k log N_eff − 2L, where N_eff = Σ_n s_z,n over
    the contributing data (their number when unweighted)."""

    log_likelihood: float
    num_params: int
    num_data: int
    aic: float
    bic: float


def count_free_parameters(model, *args, **kwargs) -> int:
    """Free parameters of a CPA model: the decoder's weights and biases, plus σx if it is a Pyro param."""
    return _free_parameters(full_data_structure(model, *args, **kwargs))


def _free_parameters(structure) -> int:
    k = sum(p.numel() for p in structure.network.module.parameters() if p.requires_grad)
    if structure.obs_scale_param is not None:
        k += pyro.param(structure.obs_scale_param).numel()
    return int(k)


def information_criteria(model, *args, max_regions: int = DEFAULT_MAX_REGIONS, distributed=False,
                         **kwargs) -> InformationCriteria:
    """AIC and BIC of a CPA model from its exact log-likelihood (see :class:`InformationCriteria`).

    ``distributed``: False, True (the default ``torch.distributed`` process group) or a process group — each rank
    passes its shard of the data (possibly empty) and every rank gets the criteria of all data: L, N and N_eff are
    exact, order-independent sums over the ranks (:mod:`pyro_cpa.infer.distributed`). Without it L is summed
    in float (as ``log_evidence(model).sum()``).
    """
    from .distributed import resolve_group

    group = resolve_group(distributed)
    if group is not None:
        return _distributed_criteria(group, model, args, kwargs, max_regions)
    lp = log_evidence(model, *args, max_regions=max_regions, **kwargs)
    structure = full_data_structure(model, *args, **kwargs)
    k = count_free_parameters(model, *args, **kwargs)
    w = structure.weights
    contributing = w.active & (~torch.isnan(structure.flat_x)).any(-1).to(w.obs.device)
    n = int(contributing.sum())
    n_eff = float(w.latent[contributing].sum())
    ll = float(lp.sum())
    return InformationCriteria(ll, k, n, 2 * k - 2 * ll, k * math.log(n_eff) - 2 * ll)


def _distributed_criteria(group, model, args, kwargs, max_regions) -> InformationCriteria:
    from .distributed import ExactSum, comm_for, empty_shard_structure, guard, state_signature

    comm = comm_for(group)
    with guard(comm):
        try:
            structure = full_data_structure(model, *args, **kwargs)
        except ZeroDivisionError as e:  # pyro.plate(name, 0): this rank holds no data
            structure = empty_shard_structure(model, args, kwargs, e)
        acc = ExactSum(3)
        x = structure.flat_x.detach()
        if x.shape[0]:
            w = structure.weights
            with torch.no_grad():
                lp = weighted_log_prob(structure.marginal(max_regions=max_regions), x, None if w.is_unit else w)
            contributing = w.active & (~torch.isnan(x)).any(-1).to(w.obs.device)
            acc.add(lp.reshape(-1, 1), 0)
            acc.add(w.latent[contributing].reshape(-1, 1), 1)
            acc.add(contributing.to(torch.float64).reshape(-1, 1), 2)
        k = _free_parameters(structure)
        tot, _ = comm.sum(acc, state_signature(structure.network.module, structure.obs_scale, structure.prior_scale,
                                               torch.tensor(k, device="cpu")))
        ll, n_eff, n = float(tot[0]), float(tot[1]), int(tot[2])
    return InformationCriteria(ll, k, n, 2 * k - 2 * ll, k * math.log(n_eff) - 2 * ll)
