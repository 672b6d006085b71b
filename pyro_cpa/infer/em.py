"""``EM``: exact expectation–maximisation for a CPA Pyro model, with the interface of ``pyro.infer.SVI``."""
from __future__ import annotations

import pyro
import torch
from torch.distributions import constraints
from tqdm.auto import tqdm

from ..errors import PyroCPAError
from .distributed import comm_for, empty_shard_structure, guard, resolve_group
from .em_engine import DEFAULT_MIN_OBS_SCALE, EMStepResult, EStepCache, _total_nll, em_step
from .structure import full_data_structure


def _store_links(module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(module parameter, param-store tensor)] for the parameters of ``module`` that ``pyro.module`` registered
    in the store under tensors other than the module's own (the store was loaded or set after the module was
    built, and ``update_module_params`` was not used). Empty when the store and the module share tensors, or
    when the module is not in the store.

    ``pyro.module(name, m)`` stores ``m``'s parameter ``path`` as ``f"{name}$$$" + path`` (a submodule of a
    registered module as ``f"{name}$$${sub}." + path``); the prefix is found from the store's names, and must
    be unique (shapes equal) unless one candidate already shares the module's tensors.
    """
    store = pyro.get_param_store()
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not params:
        return []
    first = params[0][0]
    prefixes = set()
    for key in store.keys():
        if "$$$" in key and (key.endswith("$$$" + first) or key.endswith("." + first)):
            prefixes.add(key[:len(key) - len(first)])
    candidates = []
    for prefix in sorted(prefixes):
        if all(prefix + n in store and store[prefix + n].shape == p.shape for n, p in params):
            candidates.append([(p, store[prefix + n]) for n, p in params])
    for links in candidates:
        if all(stored is p for p, stored in links):
            return []  # the store holds the module's own tensors (pyro.module's usual state)
    if len(candidates) > 1:
        raise PyroCPAError("the decoder's parameters match several modules in the param store "
                           f"({len(candidates)} candidates); register the decoder with "
                           "pyro.module(name, decoder, update_module_params=True) so that EM knows which is its state")
    if not candidates:
        return []
    return [(p, stored.unconstrained() if hasattr(stored, "unconstrained") else stored)
            for p, stored in candidates[0]]


class EM:
    r"""Exact EM on a Pyro model whose observation site is a CPA likelihood.

    Usage mirrors ``SVI``::

        em = EM(model, ExactPosterior(model))
        for step in range(200):
            nll = em.step(x)            # exact −Σ log p(x_n) after the step (a float)

    Each :meth:`step` runs the exact E-step (truncated-Gaussian posterior moments per datum and
    region), the closed-form M-step for every layer's weights and bias and for σx (frozen activation
    patterns), then evaluates the exact likelihood and backtracks so that the NLL never increases
    (see :func:`~pyro_cpa.infer.em_engine.em_step`; a step starts from the exact E-step the previous one
    ended with when nothing changed in between, :class:`~pyro_cpa.infer.em_engine.EStepCache`). The decoder
    is updated in place and σx is written to its Pyro param (EM keeps σx as the store gives it back through
    the param's constraint), so the model, the parameter store and ``decoder.state_dict()`` always hold the
    current state: resuming from them continues the same trajectory (except, for ``schedule="joint"`` and the
    gradient M-step, the line search's first trial length, which EM keeps in memory: a resumed run starts it at 1, not
    at the last step's :attr:`~pyro_cpa.infer.em_engine.EMStepResult.next_step_size`). In particular, after
    ``pyro.get_param_store().load(path)`` with a newly built decoder registered by ``pyro.module(name,
    decoder)`` (no ``update_module_params`` needed), EM reads the decoder's weights from the store
    entries ``f"{name}$$$..."`` before each step (overwriting the decoder object's own values) and writes
    the new weights back to those same store tensors, in place.

    Args:
        model: a CPA model (see :mod:`pyro_cpa.infer.structure`); a subsampled data plate is evaluated
            on all data (EM is a full-batch method). Pyro's masks and scales are honoured: the objective is
            Σ_n L_n (masked observations contribute 0, plate-level scales weight the data, a scale on one site
            only tempers the likelihood — :mod:`pyro_cpa.infer.structure`), and NaN entries of x (or
            ``obs_mask=False`` data) are missing (exact incomplete-data EM, :mod:`pyro_cpa.infer.estep`).
        guide: ``None`` or :class:`~pyro_cpa.guides.ExactPosterior` (the E-step *is* the exact posterior;
            any other guide is rejected).
        obs_noise: ``"isotropic"`` or ``"diagonal"`` σx (diagonal needs a length-D ``obs_scale`` param).
        m_step: ``"closed_form"`` (default) or ``"gradient"`` (generalised EM: an optimiser on the exact
            expected complete log-likelihood; works for decoders with BatchNorm folded in).
        update_obs_scale: whether to update σx (needs σx to be a Pyro param).
        min_obs_scale: floor of the updated σx (default 1e-6, in the data's units). With too few data for
            the decoder (N = 1, N = 2, identical points) the likelihood is unbounded as σx → 0; σx then stops
            at this floor and an :class:`~pyro_cpa.infer.em_engine.ObsScaleFloorWarning` is issued.
        distributed: False (one process), True (the default ``torch.distributed`` process group) or a process
            group. Each rank then calls :meth:`step` with its contiguous shard of the data (rank order, any sizes,
            0 included) and the same initial decoder and σx; the E-step statistics and the exact NLLs are summed
            exactly over the ranks, every rank takes the same step, and the trajectory is that of one process
            with all the data (:mod:`pyro_cpa.infer.distributed`). An exception on one rank stops every rank.
        partition: ``"global"`` (default: every linear region of the decoder, enumerated once per parameter
            state) or ``"local"`` (S <= 2, ReLU-type layers, fully observed data, one process): every E-step and
            every verification runs on the regions near each datum's posterior mass, with the neglected fraction
            of each datum's evidence certified below exp(−``local_tol``) (:mod:`pyro_cpa.geometry.local`), for
            decoders whose global partition is too large. A model observing ``CPALikelihood`` cannot carry this
            choice, hence the keyword (it fills ``marginal_kwargs``). Masks and scales are honoured (one local
            partition per distinct (observed, latent) weight pair, :func:`~pyro_cpa.infer.estep.local_e_step_stats`).
        local_tol: the local partition's certified log-fraction (default 40: at most e^−40 of each datum's mass
            is left out).
        **em_kwargs: further options of :func:`~pyro_cpa.infer.em_engine.em_step`
            (``max_backtracks``, ``schedule``, ``rcond``, ``max_regions``, ``layer_solver`` ("auto" takes a truncated CG
            solve for wide hidden layers), ``merge_certified`` (layerwise: one E-step fewer per step; default for
            S = 2), ...).
    """

    def __init__(self, model, guide=None, *, obs_noise: str = "isotropic", m_step: str = "closed_form",
                 update_obs_scale: bool = True, min_obs_scale: float = DEFAULT_MIN_OBS_SCALE, distributed=False,
                 partition: str = "global", local_tol: float = 40.0, **em_kwargs):
        from ..guides import ExactPosterior
        from .em_engine import _LOCAL_DISTRIBUTED

        if guide is not None and not isinstance(guide, ExactPosterior):
            raise PyroCPAError(f"EM's E-step is the exact posterior; pass ExactPosterior(model) or None, "
                               f"not {type(guide).__name__}. Use pyro.infer.SVI for other guides.")
        if partition not in ("global", "local"):
            raise PyroCPAError(f"EM: partition must be 'global' or 'local', got {partition!r}")
        mkw = dict(em_kwargs.pop("marginal_kwargs", None) or {})
        if partition == "local":
            mkw.update(partition="local", local_tol=float(local_tol))
        if mkw.get("partition", "global") == "local" and distributed is not False:
            raise PyroCPAError(_LOCAL_DISTRIBUTED)
        self.model, self.guide = model, guide
        self.obs_noise, self.m_step, self.update_obs_scale = obs_noise, m_step, update_obs_scale
        self.em_kwargs = dict(em_kwargs, min_obs_scale=min_obs_scale, marginal_kwargs=mkw)
        self.distributed = distributed
        self.history: list[EMStepResult] = []
        self._cache = EStepCache()   # each step starts from the previous step's final E-step when nothing changed
        # the line search's first trial length: the last step's EMStepResult.next_step_size ("joint", "gradient")
        self._initial_step = float(self.em_kwargs.pop("initial_step", 1.0))

    def _structure(self, *args, **kwargs):
        try:
            structure = full_data_structure(self.model, *args, **kwargs)
        except ZeroDivisionError as e:  # pyro.plate(name, 0)
            if not self.distributed:
                raise PyroCPAError(f"EM: the model's data plate is empty ({e}); EM needs at least one datum") from e
            structure = empty_shard_structure(self.model, args, kwargs, e)
        if structure.latent is None:
            raise PyroCPAError("EM needs a model with a latent site and a CPALikelihood observation")
        # the model's own run (full_data_structure's first trace); an empty shard (distributed) was traced on a stand-in
        obs_fn = structure.observed_fn if structure.x.numel() else None
        if obs_fn is not None and obs_fn.batch_shape.numel() > structure.x.shape[:-1].numel():
            raise PyroCPAError(
                f"EM: the observed site '{structure.observed}' has batch shape {tuple(obs_fn.batch_shape)} but its "
                f"value x has shape {tuple(structure.x.shape)}: the model broadcasts fewer data than it has latents "
                "(e.g. x of shape (D,) — one datum — inside a plate of size D). Pass x of shape (N, D), N data "
                "(x.unsqueeze(0) for one datum), with the plate sized by x.shape[0].")
        self._store_links = _store_links(structure.network.module)
        with torch.no_grad():  # the param store holds the state: a loaded store overrides a fresh decoder object
            for p, stored in self._store_links:
                p.copy_(stored)
        return structure

    def _write_back(self) -> None:
        """Copy the decoder's new weights into the param store entries they were read from (in place)."""
        with torch.no_grad():
            for p, stored in self._store_links:
                stored.copy_(p)

    @staticmethod
    def _weights(structure):
        return None if structure.weights.is_unit else structure.weights

    def evaluate_loss(self, *args, **kwargs) -> float:
        """Exact −Σ_n L_n under the current parameters (nothing changes): −Σ_n log p(x_n) without masks or scales.

        Summed exactly (order-independent); over all ranks' data when ``distributed``."""
        comm = comm_for(resolve_group(self.distributed))
        with guard(comm):
            structure = self._structure(*args, **kwargs)
            mkw = dict(self.em_kwargs["marginal_kwargs"])
            if "max_regions" in self.em_kwargs:
                mkw.setdefault("max_regions", self.em_kwargs["max_regions"])
            return _total_nll(structure.marginal(**mkw), structure.flat_x.detach(), self._weights(structure), comm)

    @staticmethod
    def _roundtrip(structure):
        """σx ↦ the value the param store gives back after σx is written to it (in the param's dtype, through its
        constraint transform, e.g. exp(log σx), which may change the last bits): EM keeps what the store will hold."""
        from torch.distributions import transform_to

        store = pyro.get_param_store()
        name = structure.obs_scale_param
        if name is None or name not in store:
            return None
        transform = transform_to(store.get_state()["constraints"].get(name, constraints.real))
        dtype = store[name].dtype
        return lambda s: transform(transform.inv(s.to(dtype))).to(s.dtype)

    def step(self, *args, **kwargs) -> float:
        """One E-step + M-step (+ backtracking); returns the exact NLL after the step (of all ranks' data)."""
        group = resolve_group(self.distributed)
        with guard(comm_for(group)):   # a failure here (e.g. in the model) stops every rank
            return self._step(group, *args, **kwargs)

    def _step(self, group, *args, **kwargs) -> float:
        structure = self._structure(*args, **kwargs)
        if self.update_obs_scale and structure.obs_scale_param is None:
            raise PyroCPAError("update_obs_scale=True needs σx to be a pyro.param in the model "
                               "(or pass update_obs_scale=False to keep it fixed)")
        obs_scale = structure.obs_scale.detach()
        if self.obs_noise == "diagonal" and obs_scale.numel() == 1:
            raise PyroCPAError("obs_noise='diagonal' needs a length-D obs_scale param in the model")
        result = em_step(structure.network.module, obs_scale, structure.prior_scale, structure.x.detach(),
                         obs_noise=self.obs_noise, m_step_method=self.m_step,
                         update_obs_scale=self.update_obs_scale, weights=self._weights(structure),
                         process_group=group, cache=self._cache,
                         obs_scale_roundtrip=self._roundtrip(structure) if self.update_obs_scale else None,
                         initial_step=self._initial_step, **self.em_kwargs)
        self._initial_step = result.next_step_size
        self._write_back()
        if self.update_obs_scale:
            store = pyro.get_param_store()
            old = store[structure.obs_scale_param]
            new = result.obs_scale.detach().to(dtype=old.dtype, device=old.device)
            new = new.reshape(old.shape) if new.numel() == old.numel() else new.expand(old.shape)
            store[structure.obs_scale_param] = new.clone()
        self.history.append(result)
        return float(result.nll_after)

    def fit(self, num_steps: int, *args, progress: bool = True, **kwargs) -> list[float]:
        """Run ``num_steps`` EM steps with a tqdm progress bar; returns the NLL after each step."""
        losses = []
        with tqdm(range(num_steps), desc="EM", disable=not progress) as bar:
            for _ in bar:
                losses.append(self.step(*args, **kwargs))
                bar.set_postfix(nll=f"{losses[-1]:.4f}")
        return losses
