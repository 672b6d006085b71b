"""The observation distribution of a CPA model with an explicit latent site: x | z ~ N(g(z), diag σx²)."""
from __future__ import annotations

import torch
from pyro.distributions import Normal, TorchDistribution
from torch.distributions import constraints

from ..errors import PyroCPAError
from ..nn.network import as_cpa_network


class _RealVectorOrMissing(constraints.Constraint):
    """Real vectors whose NaN entries mark missing coordinates (±inf is not allowed)."""

    is_discrete = False
    event_dim = 1

    def check(self, value):
        return (~torch.isinf(value)).all(-1)


real_vector_or_missing = _RealVectorOrMissing()


class CPALikelihood(TorchDistribution):
    r"""x | z ~ N(g(z), diag(obs_scale²)) for a CPA decoder g, one Gaussian event of dimension D.

    Numerically it is ``Normal(decoder(z), obs_scale).to_event(1)``; in addition it carries the decoder
    and the scale, so that the exact machinery of pyro-cpa (``ExactPosterior``, ``EM``, exact guide
    evaluation) can recognise a CPA model from its trace::

        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0., 1.).expand([S]).to_event(1))
            pyro.sample("x", CPALikelihood(decoder, z, obs_scale), obs=x)

    Missing data: NaN entries of an observed value are missing coordinates; :meth:`log_prob` sums
    log N(x_d; g_d(z), σx_d²) over the observed coordinates only (exactly Pyro's reading of a missing
    value: it carries no likelihood), so SVI with any guide, ``EM`` and the exact tools accept NaN.

    Args:
        decoder: a CPA network (see :mod:`pyro_cpa.nn`).
        z: latent values, shape batch + (S,).
        obs_scale: σx, a scalar or (D,) tensor (positive).
    """

    arg_constraints = {"obs_scale": constraints.positive}
    support = real_vector_or_missing
    has_rsample = True

    def __init__(self, decoder, z: torch.Tensor, obs_scale, validate_args=None):
        self.network = as_cpa_network(decoder)
        self.decoder = self.network.module
        S, D = self.network.in_features, self.network.out_features
        if z.shape[-1:] != (S,):
            raise PyroCPAError(f"z must have shape (..., S={S}); got {tuple(z.shape)}")
        obs_scale = torch.as_tensor(obs_scale, dtype=z.dtype, device=z.device)
        if obs_scale.dim() > 1 or (obs_scale.dim() == 1 and obs_scale.shape[0] not in (1, D)):
            raise PyroCPAError(f"obs_scale must be a scalar or have length D={D}; got shape {tuple(obs_scale.shape)}")
        if not bool((obs_scale > 0).all()):
            raise PyroCPAError("obs_scale must be strictly positive")
        self.z, self.obs_scale = z, obs_scale
        self.loc = self.decoder(z)
        self._normal = Normal(self.loc, obs_scale.expand(self.loc.shape[-1:])).to_event(1)
        super().__init__(self._normal.batch_shape, self._normal.event_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        """The same likelihood over ``batch_shape``: z and g(z) expanded (the decoder acts per datum, so g of the
        expanded z is the expanded g(z): no second forward pass; Pyro's plates expand every site, even to its own
        shape)."""
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(CPALikelihood, _instance)
        new.network, new.decoder, new.obs_scale = self.network, self.decoder, self.obs_scale
        new.z = self.z.expand(batch_shape + self.z.shape[-1:])
        new.loc = self.loc.expand(batch_shape + self.loc.shape[-1:])
        new._normal = Normal(new.loc, self.obs_scale.expand(new.loc.shape[-1:])).to_event(1)
        super(CPALikelihood, new).__init__(new._normal.batch_shape, new._normal.event_shape, validate_args=False)
        return new

    @property
    def mean(self):
        return self._normal.mean

    @property
    def variance(self):
        return self._normal.variance

    def rsample(self, sample_shape=torch.Size()):
        return self._normal.rsample(sample_shape)

    def log_prob(self, value):
        """Σ over observed (non-NaN) coordinates of log N(x_d; g_d(z), σx_d²); batch shape of broadcast."""
        if self._validate_args:
            self._validate_sample(value)
        missing = torch.isnan(value)
        if not bool(missing.any()):
            return self._normal.log_prob(value)
        # double where: the log-density is evaluated at a finite stand-in, then the missing terms are dropped
        safe = torch.where(missing, torch.zeros_like(value), value)
        base = self._normal.base_dist
        lp = base.log_prob(safe)
        return torch.where(missing, torch.zeros_like(lp), lp).sum(-1)
