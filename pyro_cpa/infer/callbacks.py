"""Training callbacks that record exact metrics of a CPA model and its guide during SVI (Fig. 4/5 curves)."""
from __future__ import annotations

import math

import torch

from .evaluation import evaluate_guide

__all__ = ["ExactMetrics"]


class ExactMetrics:
    r"""Record the exact NLL, the exact ELBO and KL(q ‖ p(z | x)) of a guide every ``every`` steps.

    Usage::

        metrics = ExactMetrics(model, guide, every=10)
        for step in range(num_steps):
            loss = svi.step(x)
            metrics.update(step, x, loss=loss)
        plt.plot(metrics.history["step"], metrics.history["nll"])   # exact −log p(x), Fig. 4
        plt.plot(metrics.history["step"], metrics.history["kl"])    # KL(q ‖ p(z|x)), Fig. 5

    ``history`` is a dict of lists with keys ``step``, ``nll`` (−Σ log p(x_n), exact), ``elbo`` (exact
    ELBO of the whole data set), ``kl`` (= −nll − elbo … i.e. log p(x) − ELBO), ``elbo_stderr``, ``kl_stderr``,
    ``loss`` (the SVI loss passed to :meth:`update`, NaN if none) and ``method``. With ``per_datum=True`` the
    per-datum KL tensors are also kept under ``kl_per_datum``. Evaluation runs under ``torch.no_grad()``
    and does not touch the parameter store's values (it may create the guide's parameters on first use).

    Args:
        model, guide: as given to SVI.
        every: evaluate when ``step % every == 0`` (and always on the first call).
        per_datum: keep per-datum KL tensors.
        **eval_kwargs: options of :func:`~pyro_cpa.infer.evaluate_guide` (``num_samples``, ...).
    """

    KEYS = ("step", "nll", "elbo", "kl", "elbo_stderr", "kl_stderr", "loss", "method")

    def __init__(self, model, guide, every: int = 10, per_datum: bool = False, **eval_kwargs):
        if int(every) < 1:
            raise ValueError(f"every must be a positive integer, got {every}")
        self.model, self.guide, self.every = model, guide, int(every)
        self.per_datum = per_datum
        self.eval_kwargs = eval_kwargs
        self.history: dict[str, list] = {k: [] for k in self.KEYS}
        if per_datum:
            self.history["kl_per_datum"] = []

    def evaluate(self, *args, **kwargs):
        """One exact evaluation (a :class:`~pyro_cpa.infer.evaluation.GuideEvaluation`)."""
        with torch.no_grad():
            return evaluate_guide(self.model, self.guide, *args, **self.eval_kwargs, **kwargs)

    def update(self, step: int, *args, loss: float | None = None, **kwargs) -> bool:
        """Evaluate and record if ``step`` is due; returns whether it recorded."""
        if self.history["step"] and step % self.every != 0:
            return False
        ev = self.evaluate(*args, **kwargs)
        h = self.history
        h["step"].append(int(step))
        h["nll"].append(ev.nll)
        h["elbo"].append(float(ev.elbo.total))
        h["kl"].append(float(ev.kl.total))
        h["elbo_stderr"].append(float(ev.elbo.total_stderr))
        h["kl_stderr"].append(float(ev.kl.total_stderr))
        h["loss"].append(math.nan if loss is None else float(loss))
        h["method"].append(ev.method)
        if self.per_datum:
            h["kl_per_datum"].append(ev.kl.per_datum.detach().clone())
        return True

    __call__ = update
