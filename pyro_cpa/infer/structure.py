r"""Recognise a CPA model in a Pyro trace: its latent site, observed site, decoder, scales, data plate and weights.

A CPA model has exactly one latent sample site with a zero-mean Normal prior over an event of size S
(``dist.Normal(0, σz).expand([S]).to_event(1)``), and one observed site whose distribution is either
:class:`~pyro_cpa.distributions.CPALikelihood` (explicit latent) or — for the collapsed model used
for exact maximum likelihood — :class:`~pyro_cpa.distributions.CPAMarginal` (no latent site).

**Masks and scales (Pyro's semantics).** Pyro multiplies each site's log-density by its ``scale`` and its
``mask`` (``poutine.scale``, ``poutine.mask``, ``fn.mask(m)``, the subsampling factor of a plate). Per
datum n, let s_x,n = scale × mask of the observed site and s_z,n = scale × mask of the latent site
(both with a plate's subsampling factor N/B divided out: the exact tools use all data). The model's
log-joint is s_z,n log p(z_n) + s_x,n log p(x_n | z_n); with a guide carrying the latent's scale (as for
plate-level scales, and :func:`~pyro_cpa.glm.beta_scaled_guide`) the best ELBO, which the exact tools
call the datum's *evidence term*, is

    L_n = s_z,n · log ∫ p(z) p(x_n | z)^{t_n} dz,      t_n = s_x,n / s_z,n,
        = s_z,n · [ log C(t_n) + log p(x_n; σx/√t_n) ],
    log C(t) = Σ_{d observed} [ ½ (1 − t) log(2π σx_d²) − ½ log t ],

because N(x; g, σ²)^t = C(t) N(x; g, σ²/t) per coordinate: the tempered marginal is the exact CPA
marginal with σx/√t (exact, no extra approximation). Cases:

* s_x,n = 0 (masked observation, a ``mask=False`` datum, or ``obs_mask=False``): L_n = 0 — masked data
  contribute nothing, whatever the latent's weight.
* s_x,n = s_z,n = w_n (a plate-level scale or mask, as in subsampling): t = 1, L_n = w_n log p(x_n) —
  a data weight.
* s_x,n ≠ s_z,n (a scale on one site only, e.g. the β-VAE of ``GLMDecoder.model(beta=β)``): a tempered
  likelihood, handled exactly by the formula above.
* s_z,n = 0 < s_x,n: the latent is masked but its observation is not — an improper posterior; refused.

``pyro.sample(name, fn, obs=x, obs_mask=m)`` is recognised: Pyro splits it into ``{name}_observed``
(masked by ``m``), ``{name}_unobserved`` (the missing values, not a latent of the model) and a
deterministic ``{name}``. Pyro's ``obs_mask`` is batch-shaped (one bool per datum for the vector event of
CPALikelihood), so ``obs_mask=False`` marks a whole datum as missing: L_n = 0. Missing *coordinates* are
NaN entries of x (marginalised exactly everywhere).
"""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import Independent, MaskedDistribution, MultivariateNormal, Normal
from pyro.poutine.subsample_messenger import _Subsample

from ..distributions import CPALikelihood, CPAMarginal
from ..errors import PyroCPAError
from ..nn.network import CPANetwork


#: Relative tolerance deciding that the tempers t_n = s_x,n / s_z,n are 1 (or one value): the two sites' scales are
#: products of the same floats in the usual cases, so this only absorbs round-off of the user's own arithmetic.
TEMPER_RTOL = 1e-12


@dataclass
class DataWeights:
    r"""Per-datum weights of the observed and latent sites (module docstring), flattened like ``x[..., 0]``.

    Attributes:
        obs: (N,) s_x,n = scale × mask of the observed site (subsampling factor divided out), >= 0.
        latent: (N,) s_z,n, the same for the latent site (equal to ``obs`` for a collapsed model).
    """

    obs: torch.Tensor
    latent: torch.Tensor

    def __post_init__(self):
        for name, w in (("observed", self.obs), ("latent", self.latent)):
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise PyroCPAError(f"the {name} site's scale × mask must be finite and >= 0 for every datum "
                                   f"(poutine.scale / poutine.mask); got values in "
                                   f"[{float(w.min())}, {float(w.max())}]")
        improper = (self.obs > 0) & ~(self.latent > 0)
        if bool(improper.any()):
            raise PyroCPAError(
                f"{int(improper.sum())} data have a masked (or zero-scaled) latent site but an observed site that "
                "is not: their posterior is improper. Mask the observation too (or only the observation).")

    @staticmethod
    def ones(n: int, like: torch.Tensor) -> "DataWeights":
        w = torch.ones(n, dtype=torch.float64, device=like.device)
        return DataWeights(w, w.clone())

    @property
    def active(self) -> torch.Tensor:
        """(N,) bool: data whose observation carries weight (s_x,n > 0); the others contribute 0 everywhere."""
        return self.obs > 0

    @property
    def temper(self) -> torch.Tensor:
        """(N,) t_n = s_x,n / s_z,n on active data (1 elsewhere, unused)."""
        act = self.active
        return torch.where(act, self.obs / torch.where(act, self.latent, torch.ones_like(self.latent)),
                           torch.ones_like(self.obs))

    @property
    def is_unit(self) -> bool:
        """True if every datum has s_x = s_z = 1 (the unweighted model)."""
        return bool((self.obs == 1).all()) and bool((self.latent == 1).all())

    @property
    def is_tempered(self) -> bool:
        """True if some active datum has s_x ≠ s_z beyond ``TEMPER_RTOL`` (a tempered likelihood)."""
        t = self.temper
        return not bool(torch.isclose(t, torch.ones_like(t), rtol=TEMPER_RTOL, atol=0.0).all())

    def __getitem__(self, idx) -> "DataWeights":
        return DataWeights(self.obs[idx], self.latent[idx])


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
        x: the observed values (batch + (D,)); NaN entries are missing coordinates.
        plates: names of the plates the latent (or observed) site lives in, outermost first.
        weights: per-datum :class:`DataWeights` (from the sites' masks and scales), flattened like ``x[..., 0]``.
        observed_fn: the observed site's distribution in the trace read (for a subsampled data plate, that of the
            model's own run, over its subsample), e.g. to check its batch shape against x without another trace.
    """

    latent: str | None
    observed: str
    network: CPANetwork
    obs_scale: torch.Tensor
    obs_scale_param: str | None
    prior_scale: torch.Tensor
    x: torch.Tensor
    plates: tuple[str, ...]
    weights: DataWeights
    observed_fn: object = None

    @property
    def flat_x(self) -> torch.Tensor:
        """x as (N, D)."""
        return self.x.reshape(-1, self.x.shape[-1])

    def marginal(self, **kwargs) -> CPAMarginal:
        return CPAMarginal(self.network, self.obs_scale, self.prior_scale, **kwargs)


#: A MultivariateNormal prior counts as diagonal when every correlation |Σ_ij| / √(Σ_ii Σ_jj), i ≠ j, is at
#: most this (the exact tools then use its diagonal; a smaller correlation changes log p(x) by O(this)).
PRIOR_CORRELATION_TOL = 1e-12


def _prior_scale(fn, name: str) -> torch.Tensor:
    """σz (S,) of a zero-mean Normal(0, σz).to_event(1) or MultivariateNormal(0, diag σz²) latent prior."""
    base, reinterpreted = fn, 0
    while isinstance(base, Independent):
        reinterpreted += base.reinterpreted_batch_ndims
        base = base.base_dist
    if isinstance(base, MultivariateNormal) and reinterpreted == 0:
        if bool((base.loc != 0).any()):
            raise PyroCPAError(f"latent site '{name}' must have a zero-mean prior (absorb the mean into the "
                               "decoder's first bias)")
        cov = base.covariance_matrix
        sd = torch.diagonal(cov, dim1=-2, dim2=-1).sqrt()
        corr = cov / (sd.unsqueeze(-1) * sd.unsqueeze(-2))
        off = ~torch.eye(cov.shape[-1], dtype=torch.bool, device=cov.device)
        if bool((corr.abs() > PRIOR_CORRELATION_TOL)[..., off].any()):
            raise PyroCPAError(
                f"latent site '{name}': a MultivariateNormal prior with correlated coordinates is not supported "
                "(the exact tools need a diagonal prior covariance). Reparameterise: z = L u with u ~ "
                "MultivariateNormal(0, I) and L = cholesky(Σ) folded into the decoder's first nn.Linear "
                "(weight @ L).")
        S = base.event_shape[0]
        scale = sd.expand(base.batch_shape + (S,)).reshape(-1, S)
    elif isinstance(base, Normal) and reinterpreted == 1:
        if bool((base.loc != 0).any()):
            raise PyroCPAError(f"latent site '{name}' must have a zero-mean prior (absorb the mean into the "
                               "decoder's first bias)")
        S = base.event_shape[0] if base.event_shape else base.batch_shape[-1]
        scale = base.scale.expand(base.batch_shape).reshape(-1, S)
    else:
        raise PyroCPAError(
            f"latent site '{name}' must have a zero-mean Normal prior over a vector event: "
            f"dist.Normal(0., σz).expand([S]).to_event(1) or dist.MultivariateNormal(torch.zeros(S), "
            f"torch.diag(σz**2)); got {type(fn).__name__}")
    if not bool((scale == scale[:1]).all()):
        raise PyroCPAError(f"latent site '{name}': the prior scale must be the same for every datum")
    return scale[0].detach()


def _unmask(fn):
    """(the distribution under any MaskedDistribution wrappers, the combined mask or None)."""
    mask = None
    while isinstance(fn, MaskedDistribution):
        m = fn._mask
        if isinstance(m, bool):
            m = torch.tensor(m)
        mask = m if mask is None else mask & m
        fn = fn.base_dist
    return fn, mask


def _site_weight(site, batch_shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """scale × mask of a sample site over ``batch_shape``, flattened, with the subsampling factors removed."""
    fn, fn_mask = _unmask(site["fn"])
    w = torch.as_tensor(site["scale"], dtype=torch.float64, device=like.device).detach()
    for frame in site["cond_indep_stack"]:
        if frame.full_size is not None:  # a plate's subsampling factor full_size / size
            w = w * (float(frame.size) / float(frame.full_size))
    w = w.expand(batch_shape) if w.dim() <= len(batch_shape) else w
    for m in (site["mask"], fn_mask):
        if m is not None:
            w = w * torch.as_tensor(m, device=like.device).to(torch.float64)
    try:
        return w.expand(batch_shape).reshape(-1).clone()
    except RuntimeError as e:
        raise PyroCPAError(f"site '{site['name']}': its scale/mask of shape {tuple(w.shape)} does not broadcast to "
                           f"the data's batch shape {tuple(batch_shape)}") from e


def _is_sample(site) -> bool:
    return site["type"] == "sample" and not isinstance(site["fn"], _Subsample) \
        and not site["infer"].get("_deterministic", False)


def read_structure(trace: poutine.Trace) -> CPAModelStructure:
    """Find the CPA structure in a model trace; raise :class:`PyroCPAError` naming what is missing."""
    latents, observed = [], []
    for name, site in trace.nodes.items():
        if not _is_sample(site):
            continue
        if not site["is_observed"] and isinstance(_unmask(site["fn"])[0], CPALikelihood):
            continue  # the missing values of an obs_mask observation (``{name}_unobserved``), not a latent
        (observed if site["is_observed"] else latents).append(name)
    cpa_obs = [n for n in observed if isinstance(_unmask(trace.nodes[n]["fn"])[0], (CPALikelihood, CPAMarginal))]
    if len(cpa_obs) != 1:
        raise PyroCPAError(
            f"a CPA model needs exactly one observed site with a CPALikelihood (or CPAMarginal) distribution; "
            f"found {len(cpa_obs)} among observed sites {observed}")
    obs_name = cpa_obs[0]
    site = trace.nodes[obs_name]
    fn = _unmask(site["fn"])[0]
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
    x = site["value"]
    batch = x.shape[:-1]
    w_obs = _site_weight(site, batch, x)
    w_lat = w_obs.clone() if latent is None else _site_weight(trace.nodes[latent], batch, x)
    return CPAModelStructure(latent, obs_name, fn.network, obs_scale, param_name, prior_scale, x, plates,
                             DataWeights(w_obs, w_lat), site["fn"])


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
    x_full = w_obs = w_lat = None
    for start in range(0, size, batch):
        idx = torch.arange(start, start + batch, device=device) % size
        chunk = read_structure(trace_model(model, *args, subsample={name: idx}, **kwargs))
        if chunk.x.dim() != 2:
            raise PyroCPAError("a subsampled data plate must be the only batch dimension of the observed site "
                               f"(x of shape (batch, D)); got {tuple(chunk.x.shape)}")
        if x_full is None:
            x_full = chunk.x.new_empty((size,) + chunk.x.shape[1:])
            w_obs, w_lat = (chunk.weights.obs.new_empty(size) for _ in range(2))
        x_full[idx] = chunk.x
        w_obs[idx], w_lat[idx] = chunk.weights.obs, chunk.weights.latent
        structure = chunk
    structure.x = x_full
    structure.weights = DataWeights(w_obs, w_lat)
    structure.observed_fn = proto.nodes[structure.observed]["fn"]
    return structure
