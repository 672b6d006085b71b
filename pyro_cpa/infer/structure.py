"""Recognise a CPA model in a Pyro trace: its latent site, observed site, decoder, scales and data plate.

A CPA model has exactly one latent sample site with a zero-mean Normal prior over an event of size S
(``dist.Normal(0, σz).expand([S]).to_event(1)``), and one observed site whose distribution is either
:class:`~pyro_cpa.distributions.CPALikelihood` (explicit latent) or — for the collapsed model used
for exact maximum likelihood — :class:`~pyro_cpa.distributions.CPAMarginal` (no latent site).
"""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import Independent, Normal
from pyro.poutine.subsample_messenger import _Subsample

from ..distributions import CPALikelihood, CPAMarginal
from ..errors import PyroCPAError
from ..nn.network import CPANetwork


@dataclass
class CPAModelStructure:
    """What pyro-cpa needs to know about a CPA model (read from one trace).

    Attributes:
        latent: name of the latent site (None for a collapsed model).
        observed: name of the observed site.
        network: the decoder's CPA view.
        obs_scale: the σx tensor used by the observed site.
        obs_scale_param: name of the Pyro param holding σx (None if it is a constant).
        prior_scale: σz as an (S,) tensor.
        x: the observed values (batch + (D,)).
        plates: names of the plates the latent (or observed) site lives in, outermost first.
    """

    latent: str | None
    observed: str
    network: CPANetwork
    obs_scale: torch.Tensor
    obs_scale_param: str | None
    prior_scale: torch.Tensor
    x: torch.Tensor
    plates: tuple[str, ...]

    def marginal(self, **kwargs) -> CPAMarginal:
        return CPAMarginal(self.network, self.obs_scale, self.prior_scale, **kwargs)


def _prior_scale(fn, name: str) -> torch.Tensor:
    base, reinterpreted = fn, 0
    while isinstance(base, Independent):
        reinterpreted += base.reinterpreted_batch_ndims
        base = base.base_dist
    if not isinstance(base, Normal) or reinterpreted != 1:
        raise PyroCPAError(
            f"latent site '{name}' must have a Normal prior over a vector event, e.g. "
            f"dist.Normal(0., 1.).expand([S]).to_event(1); got {type(fn).__name__}")
    if bool((base.loc != 0).any()):
        raise PyroCPAError(f"latent site '{name}' must have a zero-mean prior (absorb the mean into the decoder's "
                           "first bias)")
    S = base.event_shape[0] if base.event_shape else base.batch_shape[-1]
    scale = base.scale.expand(base.batch_shape).reshape(-1, S)
    if not bool((scale == scale[:1]).all()):
        raise PyroCPAError(f"latent site '{name}': the prior scale must be the same for every datum")
    return scale[0].detach()


def read_structure(trace: poutine.Trace) -> CPAModelStructure:
    """Find the CPA structure in a model trace; raise :class:`PyroCPAError` naming what is missing."""
    latents, observed = [], []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
            continue
        (observed if site["is_observed"] else latents).append(name)
    cpa_obs = [n for n in observed if isinstance(trace.nodes[n]["fn"], (CPALikelihood, CPAMarginal))]
    if len(cpa_obs) != 1:
        raise PyroCPAError(
            f"a CPA model needs exactly one observed site with a CPALikelihood (or CPAMarginal) distribution; "
            f"found {len(cpa_obs)} among observed sites {observed}")
    obs_name = cpa_obs[0]
    site = trace.nodes[obs_name]
    fn = site["fn"]
    if isinstance(fn, CPAMarginal):
        if latents:
            raise PyroCPAError(f"a model observing CPAMarginal must have no latent site; found {latents}")
        latent, prior_scale = None, fn.prior_scale.detach().expand(fn.latent_dim)
        plates_site = site
    else:
        if len(latents) != 1:
            raise PyroCPAError(f"a CPA model needs exactly one latent site (the decoder's input); found {latents}")
        latent = latents[0]
        prior_scale = _prior_scale(trace.nodes[latent]["fn"], latent)
        plates_site = trace.nodes[latent]
        if prior_scale.shape[-1] != fn.network.in_features:
            raise PyroCPAError(f"latent site '{latent}' has dimension {prior_scale.shape[-1]} but the decoder expects "
                               f"{fn.network.in_features}")
    obs_scale = fn.obs_scale
    param_name = None
    for pname, psite in trace.nodes.items():
        if psite["type"] == "param" and psite["value"] is obs_scale:
            param_name = pname
    if param_name is None:  # param sites hidden (e.g. by poutine.block): match by value, silently
        store = pyro.get_param_store()
        with torch.no_grad():
            matches = [pname for pname in store.keys()
                       if store[pname].shape == obs_scale.shape and bool(torch.equal(store[pname], obs_scale))]
        if len(matches) == 1:
            param_name = matches[0]
    plates = tuple(f.name for f in reversed(plates_site["cond_indep_stack"]) if f.vectorized)
    return CPAModelStructure(latent, obs_name, fn.network, obs_scale, param_name, prior_scale, site["value"], plates)


def trace_model(model, *args, subsample: dict | None = None, **kwargs) -> poutine.Trace:
    """Run ``model`` once, hidden from any enclosing handler; ``subsample`` fixes plate indices by name."""
    fn = poutine.condition(model, data=subsample) if subsample else model
    with poutine.block():
        return poutine.trace(fn).get_trace(*args, **kwargs)


def full_data_structure(model, *args, **kwargs) -> CPAModelStructure:
    """The model's structure with the observations of *all* data, even if its data plate subsamples.

    A subsampled plate is run over consecutive chunks of its own subsample size (the last chunk padded
    with earlier indices) and the observations are gathered by index.
    """
    proto = trace_model(model, *args, **kwargs)
    subsampled = [(name, site) for name, site in proto.nodes.items()
                  if site["type"] == "sample" and isinstance(site["fn"], _Subsample)
                  and site["value"].shape[0] < site["fn"].size]
    structure = read_structure(proto)
    if not subsampled:
        return structure
    if len(subsampled) > 1:
        raise PyroCPAError(f"only one subsampled plate is supported; found {[n for n, _ in subsampled]}")
    name, site = subsampled[0]
    size, batch = site["fn"].size, site["value"].shape[0]
    device = site["value"].device
    x_full = None
    for start in range(0, size, batch):
        idx = torch.arange(start, start + batch, device=device) % size
        chunk = read_structure(trace_model(model, *args, subsample={name: idx}, **kwargs))
        if x_full is None:
            x_full = chunk.x.new_empty((size,) + chunk.x.shape[1:])
        x_full[idx] = chunk.x
        structure = chunk
    structure.x = x_full
    return structure
