"""Exact maximum likelihood by gradient: collapse a CPA model's latent site into CPAMarginal.

The collapsed model observes x through the exact marginal :class:`~pyro_cpa.distributions.CPAMarginal`
and has no latent site, so ``SVI(collapse(model), empty_guide, optim, Trace_ELBO())`` minimises the
exact negative log-likelihood −Σ log p(x) (zero-variance gradients)::

    svi = SVI(collapse(model), empty_guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for step in range(1000):
        nll = svi.step(x)                     # the exact NLL, a float

Writing the collapsed model by hand is the same: ``pyro.sample("x", CPAMarginal(decoder, obs_scale), obs=x)``
inside the data plate, with ``empty_guide``.

Masks, scales and missing data are honoured (:mod:`pyro_cpa.infer.structure`): the collapsed site's
log-density is the evidence term L_n, so the loss is −Σ_n L_n — masked observations contribute 0, a
plate-level scale w_n gives w_n log p(x_n), and a scale on only one of the two sites (s_z ≠ s_x, the β-VAE)
gives the tempered s_z [log C(t) + log p(x_n; σx/√t)], t = s_x/s_z (one t for all data). NaN entries of x
and ``obs_mask`` are missing data.
"""
from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from pyro.poutine.messenger import Messenger

from ..distributions import CPALikelihood, CPAMarginal
from ..distributions.likelihood import real_vector_or_missing
from ..errors import PyroCPAError, check_not_tracing
from .estep import _log_temper_constant, tempered_marginal
from .structure import TEMPER_RTOL, _prior_scale, _unmask



class _TemperedMarginal(TorchDistribution):
    """log C(t) + log p(x; σx/√t): the tempered marginal ∫ p(z) p(x | z)^t dz of a CPA model (t > 0)."""

    support = real_vector_or_missing
    has_rsample = False

    def __init__(self, marginal: CPAMarginal, t: float, batch_shape=torch.Size()):
        self.marginal, self.t = marginal, float(t)
        super().__init__(torch.Size(batch_shape), marginal.event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return _TemperedMarginal(self.marginal, self.t, batch_shape)

    def log_prob(self, value):
        lp = tempered_marginal(self.marginal, self.t).log_prob(value)
        return lp + _log_temper_constant(self.marginal, self.marginal._check_x(value), self.t)

    def sample(self, sample_shape=torch.Size()):
        return tempered_marginal(self.marginal, self.t).expand(self.batch_shape).sample(sample_shape)


def _weight(msg, fn_mask, shape, device) -> torch.Tensor:
    """scale × mask of a site over ``shape`` (subsampling factors included: they cancel in s_x / s_z)."""
    w = torch.as_tensor(msg["scale"], dtype=torch.float64, device=device)
    for m in (msg["mask"], fn_mask):
        if m is not None:
            w = w * torch.as_tensor(m, device=w.device).to(torch.float64)
    return w.expand(shape)


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
        self._latent_weight = None

    def _pyro_sample(self, msg):
        fn, fn_mask = _unmask(msg["fn"])
        if isinstance(fn, CPALikelihood) and not msg["is_observed"]:
            # the missing values of an obs_mask observation: integrated out by the marginal
            value = msg["fn"].sample().detach()
            msg["fn"] = dist.Delta(value, event_dim=1)
            msg["value"] = value
            msg["is_observed"] = True
        elif msg["is_observed"] and isinstance(fn, CPALikelihood):
            if self._prior_scale is None:
                raise RuntimeError("collapse(): the latent site must come before the CPALikelihood site")
            marginal = CPAMarginal(fn.network, fn.obs_scale, self._prior_scale, **self.marginal_kwargs)
            batch = fn.batch_shape
            s_x = _weight(msg, fn_mask, batch, msg["value"].device)
            s_z = self._latent_weight.expand(batch)
            active = s_x > 0
            if bool((active & ~(s_z > 0)).any()):
                raise PyroCPAError("collapse(): the latent site is masked or zero-scaled for data whose observation is "
                                   "not: their posterior is improper")
            t = torch.where(active, s_x / torch.where(active, s_z, torch.ones_like(s_z)), torch.ones_like(s_x))
            t_act = t[active]
            if bool(torch.isclose(t_act, torch.ones_like(t_act), rtol=TEMPER_RTOL, atol=0.0).all()):
                new = marginal.expand(batch)  # data weights (or all masked): Pyro's scale and mask act as they are
            else:
                if not bool(torch.isclose(t_act, t_act[:1], rtol=TEMPER_RTOL, atol=0.0).all()):
                    raise PyroCPAError("collapse(): the ratio of the observed site's scale to the latent site's varies "
                                       "between data; one tempered likelihood (one ratio) is supported")
                new = _TemperedMarginal(marginal, float(t_act[0]), batch)
                msg["scale"] = s_z.to(marginal.dtype)  # L_n = s_z,n [log C(t) + log p(x_n; σx/√t)] ...
                msg["mask"] = active  # ... on data whose observation is kept, 0 elsewhere
            msg["fn"] = new if fn_mask is None else new.mask(fn_mask)
        elif not msg["is_observed"] and (self.latent is None or msg["name"] == self.latent) \
                and isinstance(fn, torch.distributions.Distribution) and msg["type"] == "sample":
            if type(fn).__name__ == "_Subsample":
                return
            self._prior_scale = _prior_scale(fn, msg["name"])
            value = fn.sample().detach()
            self._latent_weight = _weight(msg, fn_mask, fn.batch_shape, value.device)
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
