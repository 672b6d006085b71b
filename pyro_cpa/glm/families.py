r"""Exponential dispersion families (EDF) for GLM decoders (Definition 1, Table 1 of Sicks et al.).

A one-dimensional EDF density with natural (location) parameter ϑ and dispersion φ > 0 is

    log p(x | ϑ, φ) = (x ϑ − F(ϑ)) / φ + K(x, φ),

with the log-normaliser F (convex, infinitely differentiable), so that (Lemma 1, with the variance
in its standard form)

    E[x] = F′(ϑ),     Var[x] = φ F″(ϑ).

The *canonical activation* of a decoder is m = F′ (the inverse canonical link); a *linearly
canonical* activation is m(η) = F′(ρ η) for a constant ρ ≠ 0 (eq. 10), e.g. ½ tanh(η) + ½ = F′(2η)
for the Bernoulli family. A decoder with a linearly canonical activation has natural parameter
ϑ = ρ η, so every result for canonical activations applies after the substitution ϑ := ρ η.

=============  ======================  =================================  ===================  =========
family         F(ϑ)                    K(x, φ)                            Θ (natural domain)   φ
=============  ======================  =================================  ===================  =========
Gaussian       ϑ²/2                    −x²/(2φ) − ½ log(2πφ)              ℝ                    σ²
Bernoulli      log(1 + e^ϑ)            0                                  ℝ                    1
Binomial(n)    n log(1 + e^ϑ)          log C(n, x)                        ℝ                    1
Poisson        e^ϑ                     −log x!                            ℝ                    1
Gamma(k)       −log(−ϑ)                k log(k x) − log x − log Γ(k)      (−∞, 0)              1/k
=============  ======================  =================================  ===================  =========

All log-densities are evaluated in a numerically safe form that neither overflows nor produces NaN for
large |ϑ|: Bernoulli/Binomial as −x log(1 + e^{−ϑ}) − (n − x) log(1 + e^ϑ) + K (two non-positive terms, each
by :func:`log1pexp`, so the result has full relative precision, also for |ϑ| > 20 where ``softplus``'s
default threshold would return ϑ itself), Poisson as x ϑ − e^ϑ − lgamma(x + 1).

The Gamma family is exact as a distribution, but its natural domain Θ = (−∞, 0) does not contain 0,
so the second-order expansion at ϑ = 0 of Proposition 1 (and everything in
:mod:`pyro_cpa.glm.analysis`) does not exist for it (:attr:`EDFamily.expandable_at_zero` is False).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

from ..errors import PyroCPAError

__all__ = ["EDFamily", "Gaussian", "Bernoulli", "Binomial", "Poisson", "Gamma", "EDFDistribution", "get_family"]


def log1pexp(theta: torch.Tensor) -> torch.Tensor:
    """log(1 + e^ϑ) to full relative precision for every ϑ: max(ϑ, 0) + log1p(e^{−|ϑ|}) (``torch.logaddexp(ϑ, 0)``).

    Unlike ``torch.nn.functional.softplus`` (which returns ϑ itself above its threshold 20, an absolute error
    e^{−ϑ}), no branch: its gradient σ(ϑ) is exact everywhere, including ϑ = 0.
    """
    return torch.logaddexp(theta, torch.zeros((), dtype=theta.dtype, device=theta.device))


def _as_positive(value, name: str) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(float(value), dtype=torch.float64,
                                                                       device=torch.get_default_device())
    if t.dim() > 0:
        raise PyroCPAError(f"{name} must be a scalar (one dispersion shared by all coordinates); got shape "
                           f"{tuple(t.shape)}")
    if not bool(torch.isfinite(t)) or not bool(t > 0):
        raise PyroCPAError(f"{name} must be finite and strictly positive; got {float(t)}")
    return t


class EDFamily:
    r"""Base class of an exponential dispersion family (see module docstring).

    Subclasses implement :meth:`log_normalizer` F, :meth:`mean` F′, :meth:`variance_function` F″ and
    :meth:`base_measure` K; everything else (log-density, variance, activations, sampling) follows.

    Attributes:
        name: short name (``"gaussian"``, ``"bernoulli"``, ...).
        dispersion: φ as a 0-dim tensor (may require grad for a learned Gaussian variance).
        linearly_canonical: named activations m(η) = F′(ρη) and their ρ.
    """

    name: str = "edf"
    support = constraints.real
    linearly_canonical: dict[str, float] = {"canonical": 1.0}

    def __init__(self, dispersion=1.0):
        self.dispersion = _as_positive(dispersion, f"{type(self).__name__} dispersion φ")

    # ------------------------------------------------------------------ F and its derivatives
    def log_normalizer(self, theta: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """F(ϑ)."""
        raise NotImplementedError

    def mean(self, theta: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """F′(ϑ) = E[x | ϑ] — the canonical activation."""
        raise NotImplementedError

    def variance_function(self, theta: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """F″(ϑ), so that Var[x | ϑ] = φ F″(ϑ)."""
        raise NotImplementedError

    def base_measure(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """K(x, φ)."""
        raise NotImplementedError

    def link(self, mean: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The canonical link (F′)⁻¹: the natural parameter with the given mean."""
        raise NotImplementedError

    def variance(self, theta: torch.Tensor) -> torch.Tensor:
        """Var[x | ϑ] = φ F″(ϑ)."""
        return self.dispersion.to(theta) * self.variance_function(theta)

    # ------------------------------------------------------------------ density
    def log_prob(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        r"""Element-wise log p(x | ϑ, φ) = (x ϑ − F(ϑ)) / φ + K(x, φ) (no event reduction)."""
        phi = self.dispersion.to(theta)
        return (x * theta - self.log_normalizer(theta)) / phi + self.base_measure(x).to(theta)

    def validate_theta(self, theta: torch.Tensor) -> None:
        """Raise if ϑ lies outside the natural domain Θ (ℝ for all families but Gamma)."""
        if bool(torch.isnan(theta).any()):
            raise PyroCPAError(f"{self.name}: the natural parameter contains NaN")

    def validate_x(self, x: torch.Tensor) -> None:
        """Raise :class:`PyroCPAError` if some x is outside the family's support."""
        if not bool(self.support.check(x).all()):
            raise PyroCPAError(f"{self.name}: observations outside the support {self.support} "
                               f"(e.g. {x[~self.support.check(x)].flatten()[:3].tolist()})")

    def sample(self, theta: torch.Tensor, sample_shape=torch.Size()) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def distribution(self, theta: torch.Tensor, validate_args=None) -> "EDFDistribution":
        """The Pyro distribution of x | ϑ (batch shape = ϑ.shape, no event dims; use ``.to_event(1)``)."""
        return EDFDistribution(self, theta, validate_args=validate_args)

    # ------------------------------------------------------------------ activations
    def activation(self, rho: float | str = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
        r"""The linearly canonical activation m(η) = F′(ρ η) (eq. 10); ``rho`` a number or a name in
        :attr:`linearly_canonical` (e.g. ``"tanh"`` for Bernoulli: ½ tanh(η) + ½ = F′(2η))."""
        r = self.rho(rho)
        return lambda eta: self.mean(r * eta)

    def rho(self, rho: float | str) -> float:
        """Resolve an activation name or number to the factor ρ of ϑ = ρ η."""
        if isinstance(rho, str):
            if rho not in self.linearly_canonical:
                raise PyroCPAError(f"{self.name}: unknown activation '{rho}'; known linearly canonical activations: "
                                   f"{sorted(self.linearly_canonical)} (or pass the factor ρ as a number)")
            return float(self.linearly_canonical[rho])
        r = float(rho)
        if not math.isfinite(r) or r == 0.0:
            raise PyroCPAError(f"the factor ρ of a linearly canonical activation must be finite and non-zero; got {rho}")
        return r

    # ------------------------------------------------------------------ expansion at ϑ = 0
    expandable_at_zero: bool = True

    def taylor_at_zero(self) -> tuple[float, float, float]:
        """(F(0), F′(0), F″(0)) — the quantities of Table 2 used by the closed-form analysis."""
        if not self.expandable_at_zero:
            raise PyroCPAError(
                f"the {self.name} family has natural domain {self.domain_description}, which does not contain 0; "
                "the expansion at ϑ = 0 of Proposition 1 (and the closed forms built on it) does not exist for it")
        z = torch.zeros((), dtype=torch.float64)
        return float(self.log_normalizer(z)), float(self.mean(z)), float(self.variance_function(z))

    domain_description = "ℝ"

    def with_dispersion(self, dispersion) -> "EDFamily":
        """A copy of this family with dispersion φ replaced."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.dispersion = _as_positive(dispersion, f"{type(self).__name__} dispersion φ")
        return new

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dispersion={float(self.dispersion.detach()):.6g})"


class Gaussian(EDFamily):
    r"""N(ϑ, σ²): F(ϑ) = ϑ²/2, φ = σ² (``variance``), K(x, φ) = −x²/(2φ) − ½ log(2πφ). Canonical activation:
    the identity."""

    name = "gaussian"
    linearly_canonical = {"identity": 1.0, "canonical": 1.0}

    def __init__(self, variance=1.0):
        super().__init__(variance)

    def log_normalizer(self, theta):
        return 0.5 * theta ** 2

    def mean(self, theta):
        return theta

    def variance_function(self, theta):
        return torch.ones_like(theta)

    def base_measure(self, x):
        phi = self.dispersion.to(x)
        return -0.5 * x ** 2 / phi - 0.5 * torch.log(2 * math.pi * phi)

    def log_prob(self, x, theta):
        phi = self.dispersion.to(theta)
        return -0.5 * (x - theta) ** 2 / phi - 0.5 * torch.log(2 * math.pi * phi)

    def link(self, mean):
        return mean

    def sample(self, theta, sample_shape=torch.Size()):
        return torch.distributions.Normal(theta, self.dispersion.to(theta).sqrt()).sample(sample_shape)


class Binomial(EDFamily):
    r"""Bin(n, p) with ϑ = logit p: F(ϑ) = n log(1 + e^ϑ), K = log C(n, x), φ = 1.
    Canonical activation n·sigmoid; ``"tanh"``: n(½ tanh(η) + ½) = F′(2η)."""

    name = "binomial"
    linearly_canonical = {"sigmoid": 1.0, "canonical": 1.0, "tanh": 2.0}

    def __init__(self, total_count: int = 1):
        if isinstance(total_count, bool) or int(total_count) != total_count or int(total_count) < 1:
            raise PyroCPAError(f"Binomial total_count n must be a positive integer; got {total_count!r}")
        self.total_count = int(total_count)
        super().__init__(1.0)
        self.support = constraints.integer_interval(0, self.total_count)

    def log_normalizer(self, theta):
        return self.total_count * log1pexp(theta)

    def mean(self, theta):
        return self.total_count * torch.sigmoid(theta)

    def variance_function(self, theta):
        p = torch.sigmoid(theta)
        return self.total_count * p * torch.sigmoid(-theta)

    def base_measure(self, x):
        n = self.total_count
        return math.lgamma(n + 1) - torch.lgamma(x + 1) - torch.lgamma(n - x + 1)

    def log_prob(self, x, theta):
        # x ϑ − n log(1 + e^ϑ) = x log p + (n − x) log(1 − p) = −x log(1 + e^{−ϑ}) − (n − x) log(1 + e^ϑ):
        # two non-positive terms, no cancellation (x ϑ − n F(ϑ) loses e^{−|ϑ|} against ϑ for large |ϑ|)
        return -x * log1pexp(-theta) - (self.total_count - x) * log1pexp(theta) + self.base_measure(x).to(theta)

    def link(self, mean):
        p = mean / self.total_count
        return torch.log(p) - torch.log1p(-p)

    def sample(self, theta, sample_shape=torch.Size()):
        return torch.distributions.Binomial(self.total_count, logits=theta).sample(sample_shape)

    def __repr__(self):
        return f"Binomial(total_count={self.total_count})"


class Bernoulli(Binomial):
    r"""Bern(p) = Bin(1, p), ϑ = logit p: F(ϑ) = log(1 + e^ϑ), K = 0, φ = 1. Canonical activation: sigmoid;
    ``"tanh"``: ½ tanh(η) + ½ = F′(2η) (Example 1)."""

    name = "bernoulli"

    def __init__(self):
        super().__init__(1)
        self.support = constraints.boolean

    def base_measure(self, x):
        return torch.zeros_like(x)

    def sample(self, theta, sample_shape=torch.Size()):
        return torch.distributions.Bernoulli(logits=theta).sample(sample_shape)

    def __repr__(self):
        return "Bernoulli()"


class Poisson(EDFamily):
    r"""Pois(λ), ϑ = log λ: F(ϑ) = e^ϑ, K = −log x!, φ = 1. Canonical activation: exp.
    log p = x ϑ − e^ϑ − lgamma(x + 1) (−inf, never NaN, when e^ϑ overflows)."""

    name = "poisson"
    support = constraints.nonnegative_integer
    linearly_canonical = {"exp": 1.0, "canonical": 1.0}

    def __init__(self):
        super().__init__(1.0)

    def log_normalizer(self, theta):
        return torch.exp(theta)

    def mean(self, theta):
        return torch.exp(theta)

    def variance_function(self, theta):
        return torch.exp(theta)

    def base_measure(self, x):
        return -torch.lgamma(x + 1)

    def log_prob(self, x, theta):
        return x * theta - torch.exp(theta) - torch.lgamma(x + 1)

    def link(self, mean):
        return torch.log(mean)

    def sample(self, theta, sample_shape=torch.Size()):
        return torch.distributions.Poisson(torch.exp(theta)).sample(sample_shape)

    def __repr__(self):
        return "Poisson()"


class Gamma(EDFamily):
    r"""Gamma with shape k and mean μ, ϑ = −1/μ ∈ (−∞, 0): F(ϑ) = −log(−ϑ), φ = 1/k,
    K(x, φ) = (1/φ) log(x/φ) − log x − log Γ(1/φ). Canonical activation m(ϑ) = −1/ϑ (mean μ), so a
    decoder must produce *negative* natural parameters; 0 ∉ Θ, so there is no expansion at ϑ = 0."""

    name = "gamma"
    support = constraints.positive
    linearly_canonical = {"canonical": 1.0}
    expandable_at_zero = False
    domain_description = "(−∞, 0)"

    def __init__(self, shape=1.0):
        k = _as_positive(shape, "Gamma shape k")
        super().__init__(1.0 / k)

    @property
    def shape(self) -> torch.Tensor:
        return 1.0 / self.dispersion

    def validate_theta(self, theta):
        super().validate_theta(theta)
        if not bool((theta < 0).all()):
            raise PyroCPAError("gamma: the natural parameter ϑ = −1/mean must be strictly negative; the decoder "
                               f"produced {int((theta >= 0).sum())} values >= 0")

    def log_normalizer(self, theta):
        return -torch.log(-theta)

    def mean(self, theta):
        return -1.0 / theta

    def variance_function(self, theta):
        return 1.0 / theta ** 2

    def base_measure(self, x):
        phi = self.dispersion.to(x)
        return torch.log(x / phi) / phi - torch.log(x) - torch.lgamma(1.0 / phi)

    def link(self, mean):
        return -1.0 / mean

    def sample(self, theta, sample_shape=torch.Size()):
        k = self.shape.to(theta)
        return torch.distributions.Gamma(k, -theta * k).sample(sample_shape)

    def __repr__(self):
        return f"Gamma(shape={float(self.shape.detach()):.6g})"


def get_family(family, **kwargs) -> EDFamily:
    """An :class:`EDFamily` from an instance or a name (``gaussian``, ``bernoulli``, ``binomial``, ``poisson``,
    ``gamma``) with constructor keyword arguments."""
    if isinstance(family, EDFamily):
        if kwargs:
            raise PyroCPAError("family keyword arguments given together with a family instance")
        return family
    table = {"gaussian": Gaussian, "normal": Gaussian, "bernoulli": Bernoulli, "binomial": Binomial,
             "poisson": Poisson, "gamma": Gamma}
    if not isinstance(family, str) or family.lower() not in table:
        raise PyroCPAError(f"unknown family {family!r}; use an EDFamily instance or one of {sorted(table)}")
    return table[family.lower()](**kwargs)


class EDFDistribution(TorchDistribution):
    r"""The Pyro distribution x | ϑ of an EDF (element-wise; batch shape = ϑ.shape).

    ``log_prob`` is the family's numerically safe EDF log-density; ``mean`` = F′(ϑ), ``variance`` = φ F″(ϑ).
    Not reparameterisable (use it as an observed site).
    """

    arg_constraints = {"theta": constraints.real}
    has_rsample = False

    def __init__(self, family: EDFamily, theta: torch.Tensor, validate_args=None):
        if not isinstance(family, EDFamily):
            raise PyroCPAError(f"family must be an EDFamily, got {type(family).__name__}")
        family.validate_theta(theta)
        self.family, self.theta = family, theta
        super().__init__(theta.shape, torch.Size(), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return self.family.support

    def expand(self, batch_shape, _instance=None):
        return EDFDistribution(self.family, self.theta.expand(batch_shape), validate_args=False)

    @property
    def mean(self):
        return self.family.mean(self.theta)

    @property
    def variance(self):
        return self.family.variance(self.theta)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.family.sample(self.theta, sample_shape)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return self.family.log_prob(value, self.theta)
