"""Exact maximum likelihood by gradient: collapse a CPA model's latent site into CPAMarginal.

The collapsed model observes x through the exact marginal :class:`~pyro_cpa.distributions.CPAMarginal`
and has no latent site, so ``SVI(collapse(model), empty_guide, optim, Trace_ELBO())`` minimises the
exact negative log-likelihood −Σ log p(x) (zero-variance gradients)::

    svi = SVI(collapse(model), empty_guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for step in range(1000):
        nll = svi.step(x)                     # the exact NLL, a float

Writing the collapsed model by hand is the same: ``pyro.sample("x", CPAMarginal(decoder, obs_scale), obs=x)``
inside the data plate, with ``empty_guide``.
"""
from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger

from ..distributions import CPALikelihood, CPAMarginal
from ..errors import check_not_tracing
from .structure import _prior_scale


def empty_guide(*args, **kwargs) -> None:
    """A guide with no sample sites, for models without latent variables (e.g. collapsed CPA models)."""
    return None


class CollapseMessenger(Messenger):
    """Replace ``x ~ CPALikelihood(g, z, σx)`` by ``x ~ CPAMarginal(g, σx, σz)`` and drop the latent ``z``.

    The latent site keeps a value (a draw from its prior, so the model code runs) but contributes
    nothing to the log-density: it becomes an observed ``Delta`` at that value.
    """

    def __init__(self, latent: str | None = None, **marginal_kwargs):
        super().__init__()
        self.latent = latent
        self.marginal_kwargs = marginal_kwargs
        self._prior_scale = None

    def _pyro_sample(self, msg):
        fn = msg["fn"]
        if msg["is_observed"] and isinstance(fn, CPALikelihood):
            if self._prior_scale is None:
                raise RuntimeError("collapse(): the latent site must come before the CPALikelihood site")
            marginal = CPAMarginal(fn.network, fn.obs_scale, self._prior_scale, **self.marginal_kwargs)
            msg["fn"] = marginal.expand(fn.batch_shape)
        elif not msg["is_observed"] and (self.latent is None or msg["name"] == self.latent) \
                and isinstance(fn, torch.distributions.Distribution) and msg["type"] == "sample":
            if type(fn).__name__ == "_Subsample":
                return
            self._prior_scale = _prior_scale(fn, msg["name"])
            value = fn.sample().detach()
            msg["fn"] = dist.Delta(value, event_dim=fn.event_dim)
            msg["value"] = value
            msg["is_observed"] = True


def collapse(model, latent: str | None = None, **marginal_kwargs):
    """The collapsed (latent-free) version of a CPA model: its observed site becomes CPAMarginal.

    Args:
        model: a CPA model (one latent site with a zero-mean Normal prior, one CPALikelihood site).
        latent: name of the latent site (default: the first unobserved sample site).
        **marginal_kwargs: options of :class:`~pyro_cpa.distributions.CPAMarginal`.
    """
    def collapsed(*args, **kwargs):
        check_not_tracing("collapse(model)")
        with CollapseMessenger(latent, **marginal_kwargs):
            return model(*args, **kwargs)

    collapsed.__name__ = f"collapsed_{getattr(model, '__name__', 'model')}"
    return collapsed
