"""The exact posterior of a CPA model as a Pyro guide."""
from __future__ import annotations

from contextlib import ExitStack

import pyro
import torch
from pyro.infer.autoguide import AutoGuide

from ..errors import PyroCPAError
from ..geometry.regions import DEFAULT_MAX_REGIONS
from ..infer.structure import read_structure, trace_model


class ExactPosterior(AutoGuide):
    r"""Guide whose latent site is drawn from the exact posterior p(z | x) of a CPA model.

    The decoder, σx, σz and the latent/observed sites are read from the model's trace (as Pyro's
    autoguides do), under the *current* parameters at every call. The posterior is the
    :class:`~pyro_cpa.distributions.TruncatedGaussianMixture` of
    :meth:`~pyro_cpa.distributions.CPAMarginal.posterior`, built under ``torch.no_grad()`` so no
    score-function gradient leaks into the model's parameters. With it, every particle of
    ``Trace_ELBO`` equals −log p(x) exactly (zero variance). Subsampled data plates are supported:
    the guide draws the plate indices and reads the matching observations.

    Args:
        model: a CPA model (see :mod:`pyro_cpa.infer.structure`).
        max_regions, prune_tol: passed to :class:`~pyro_cpa.distributions.CPAMarginal`.
    """

    def __init__(self, model, *, create_plates=None, max_regions: int = DEFAULT_MAX_REGIONS,
                 prune_tol: float = 40.0):
        super().__init__(model, create_plates=create_plates)
        self.max_regions, self.prune_tol = max_regions, prune_tol

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        structure = read_structure(trace_model(self.model, *args, **kwargs))
        if structure.latent is None:
            raise PyroCPAError("ExactPosterior needs a model with a latent site; a collapsed CPAMarginal model "
                               "needs no guide (use an empty guide)")
        self._latent = structure.latent
        self._latent_frames = [f for f in self.prototype_trace.nodes[self._latent]["cond_indep_stack"] if f.vectorized]

    def posterior(self, *args, subsample: dict | None = None, **kwargs):
        """The exact posterior (a TruncatedGaussianMixture over the data in the plate) under current parameters."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        structure = read_structure(trace_model(self.model, *args, subsample=subsample, **kwargs))
        with torch.no_grad():
            marginal = structure.marginal(max_regions=self.max_regions, prune_tol=self.prune_tol)
            return marginal.posterior(structure.x.detach())

    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        subsample = {f.name: plates[f.name].indices for f in self._latent_frames
                     if plates[f.name].subsample_size < plates[f.name].size}
        post = self.posterior(*args, subsample=subsample or None, **kwargs)
        with ExitStack() as stack:
            for frame in self._latent_frames:
                stack.enter_context(plates[frame.name])
            z = pyro.sample(self._latent, post)
        return {self._latent: z}

    def median(self, *args, **kwargs):
        raise NotImplementedError("the exact posterior can be multimodal; use .posterior(...).mean or samples")
