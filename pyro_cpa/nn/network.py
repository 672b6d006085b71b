"""Reading a ``torch.nn`` decoder as a continuous piecewise affine (CPA) network.

A CPA network is stored in the canonical alternating form

    g(z) = T_L ∘ σ_{L-1} ∘ T_{L-1} ∘ ... ∘ σ_0 ∘ T_0 (z),

where each ``T_l(h) = W_l h + v_l`` is affine and each ``σ_l`` is an element-wise activation
``σ(t) = t`` for ``t >= 0`` and ``σ(t) = α_l t`` for ``t < 0`` (ReLU: α=0, LeakyReLU: α=slope,
:class:`~pyro_cpa.nn.Abs`: α=-1). Consecutive affine modules (``Linear``, ``BatchNorm1d`` in eval
mode, ``Dropout`` in eval mode, ``Identity``) are composed into one ``T_l``; consecutive
activations are composed into one; missing affine maps are identities. The weights are read
*live* from the modules on every call, so everything computed from them is differentiable with
respect to the decoder's parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..errors import NotCPAError
from .layers import Abs

SUPPORTED = (
    "nn.Linear, nn.ReLU, nn.LeakyReLU (any slope), pyro_cpa.nn.Abs, nn.Identity, "
    "nn.Dropout / nn.BatchNorm1d (affine in eval mode), nested nn.Sequential (and PyroModule versions)"
)


def _nn_types(*names: str) -> tuple[type, ...]:
    return tuple(t for t in (getattr(nn, n, None) for n in names) if isinstance(t, type))


# Continuous piecewise affine (or affine) layers that pyro-cpa cannot read yet.
_CPA_NOT_SUPPORTED_YET = _nn_types(
    "ReLU6", "Hardtanh", "PReLU", "RReLU", "Hardsigmoid", "Softshrink",
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
    "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
    "Flatten", "Unflatten", "BatchNorm2d", "BatchNorm3d", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
    "FeatureAlphaDropout", "ZeroPad1d", "ZeroPad2d", "ZeroPad3d", "ConstantPad1d", "ConstantPad2d",
    "ConstantPad3d", "ReflectionPad1d", "ReflectionPad2d", "ReplicationPad1d", "ReplicationPad2d", "Upsample",
    "PixelShuffle", "PixelUnshuffle", "ChannelShuffle", "LazyLinear")
# Layers that are not piecewise affine at all (smooth, normalising, multiplicative) or not continuous.
_NOT_PIECEWISE_AFFINE = _nn_types(
    "Tanh", "Sigmoid", "GELU", "SiLU", "Mish", "ELU", "SELU", "CELU", "GLU", "Softplus", "Softsign", "Tanhshrink",
    "LogSigmoid", "Softmax", "Softmin", "LogSoftmax", "Softmax2d", "Hardswish", "LayerNorm", "GroupNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LocalResponseNorm", "RMSNorm", "Bilinear",
    "MultiheadAttention", "RNN", "LSTM", "GRU", "Transformer", "TransformerEncoder", "TransformerDecoder",
    "TransformerEncoderLayer", "TransformerDecoderLayer")
_NOT_CONTINUOUS = _nn_types("Hardshrink", "Threshold")


def _refusal(name: str, layer: nn.Module) -> str:
    """A truthful reason why ``layer`` cannot be read as part of a CPA decoder."""
    kind = type(layer).__name__
    supported = f"Supported layers: {SUPPORTED}."
    exact_supported = (nn.ReLU, nn.LeakyReLU, Abs, nn.Linear, nn.Identity, nn.Dropout, nn.BatchNorm1d)
    if isinstance(layer, exact_supported):
        return (f"layer '{name}' ({kind}) subclasses a supported layer but overrides forward(), so pyro-cpa cannot "
                f"know that it is still piecewise affine. {supported}")
    if isinstance(layer, _CPA_NOT_SUPPORTED_YET):
        return (f"layer '{name}' ({kind}) is continuous piecewise affine (or affine), but pyro-cpa does not support "
                f"it yet. {supported} Workarounds: write ReLU6 / Hardtanh as differences of ReLUs (ReLU6(t) = "
                "ReLU(t) − ReLU(t − 6)), max(a, b) as b + ReLU(a − b), a PReLU with a fixed slope as LeakyReLU, a "
                "convolution as the equivalent nn.Linear.")
    if isinstance(layer, _NOT_CONTINUOUS):
        return (f"layer '{name}' ({kind}) is not continuous (it jumps at its threshold), so the decoder is not "
                f"continuous piecewise affine and its exact marginal is not covered. {supported}")
    if isinstance(layer, _NOT_PIECEWISE_AFFINE):
        return (f"layer '{name}' ({kind}) is not piecewise affine, so exact inference does not apply to this "
                f"decoder. {supported} Replace it by ReLU, LeakyReLU or pyro_cpa.nn.Abs.")
    return (f"layer '{name}' ({kind}) is not a layer pyro-cpa knows; it cannot tell whether it is continuous "
            f"piecewise affine. {supported} If it is, write it with these layers.")


def _flatten(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _flatten(child, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix or type(module).__name__, module


@dataclass(frozen=True)
class _AffineStep:
    modules: tuple[tuple[str, nn.Module], ...]


@dataclass(frozen=True)
class _ActivationStep:
    negative_slope: float
    names: tuple[str, ...]


def _negative_slope(module: nn.Module) -> float | None:
    # Exact types only: a subclass may override forward() and stop being CPA.
    if type(module) in (nn.ReLU,) or (isinstance(module, nn.ReLU) and type(module).forward is nn.ReLU.forward):
        return 0.0
    if isinstance(module, nn.LeakyReLU) and type(module).forward is nn.LeakyReLU.forward:
        return float(module.negative_slope)
    if isinstance(module, Abs) and type(module).forward is Abs.forward:
        return -1.0
    return None


def _is_affine(module: nn.Module) -> bool:
    for cls in (nn.Linear, nn.Identity, nn.Dropout, nn.BatchNorm1d):
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return True
    return False


class CPANetwork:
    """Canonical alternating view of a CPA decoder (see module docstring).

    Attributes:
        module: the wrapped ``nn.Module`` (its parameters are the live parameters).
        in_features: latent dimension S.
        out_features: data dimension D.
        widths: number of units of each activation layer ``σ_l``.
        negative_slopes: ``α_l`` of each activation layer.
    """

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise NotCPAError(f"decoder must be a torch.nn.Module, got {type(module).__name__}")
        steps: list = []
        pending: list[tuple[str, nn.Module]] = []
        for name, layer in _flatten(module, ""):
            slope = _negative_slope(layer)
            if slope is not None:
                steps.append(_AffineStep(tuple(pending)))
                pending = []
                if isinstance(steps[-1], _AffineStep) and not steps[-1].modules and len(steps) > 1 \
                        and isinstance(steps[-2], _ActivationStep):
                    # activation directly after activation: compose the two.
                    steps.pop()
                    prev = steps.pop()
                    a1 = prev.negative_slope
                    composed = a1 if a1 <= 0 else a1 * slope
                    steps.append(_ActivationStep(composed, prev.names + (name,)))
                else:
                    steps.append(_ActivationStep(slope, (name,)))
            elif _is_affine(layer):
                pending.append((name, layer))
            else:
                raise NotCPAError(_refusal(name, layer))
        steps.append(_AffineStep(tuple(pending)))
        self.module = module
        self._affine_steps: tuple[_AffineStep, ...] = tuple(s for s in steps if isinstance(s, _AffineStep))
        self._activation_steps: tuple[_ActivationStep, ...] = tuple(
            s for s in steps if isinstance(s, _ActivationStep))
        self.negative_slopes: tuple[float, ...] = tuple(s.negative_slope for s in self._activation_steps)
        dims = [self._step_dims(s) for s in self._affine_steps]
        # Resolve dimensions: an affine step with no Linear keeps its width.
        in_dim = None
        for d in dims:
            if d[0] is not None:
                in_dim = d[0]
                break
        if in_dim is None:
            raise NotCPAError(
                "cannot read the latent dimension: the decoder has no nn.Linear layer. "
                "Start the decoder with nn.Linear(S, width).")
        widths = []
        cur = in_dim
        for i, (din, dout) in enumerate(dims):
            if din is not None and din != cur:
                raise NotCPAError(f"layer sizes do not chain: affine block {i} expects {din} inputs, gets {cur}")
            cur = dout if dout is not None else cur
            widths.append(cur)
        self.in_features: int = in_dim
        self.out_features: int = widths[-1]
        self.widths: tuple[int, ...] = tuple(widths[:-1])

    @staticmethod
    def _step_dims(step: _AffineStep) -> tuple[int | None, int | None]:
        din = dout = None
        for name, m in step.modules:
            if isinstance(m, nn.Linear):
                if din is None and dout is None:
                    din = m.in_features
                elif dout != m.in_features:
                    raise NotCPAError(f"layer '{name}' expects {m.in_features} inputs, gets {dout}")
                dout = m.out_features
            elif isinstance(m, nn.BatchNorm1d):
                if dout is not None and dout != m.num_features:
                    raise NotCPAError(f"layer '{name}' expects {m.num_features} features, gets {dout}")
                if din is None and dout is None:
                    din = m.num_features
                dout = m.num_features
        return din, dout

    # ------------------------------------------------------------------ parameters
    @property
    def num_layers(self) -> int:
        """Number of affine maps T_0..T_L (= number of activation layers + 1)."""
        return len(self._affine_steps)

    def check_eval_mode(self) -> None:
        for step in self._affine_steps:
            for name, m in step.modules:
                if isinstance(m, (nn.Dropout, nn.BatchNorm1d)) and m.training and \
                        (not isinstance(m, nn.Dropout) or m.p > 0):
                    raise NotCPAError(
                        f"layer '{name}' ({type(m).__name__}) is only affine in eval mode; "
                        "call decoder.eval() before exact inference.")

    def affine_maps(self, dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Live ``(W_l, v_l)`` of every affine step ``T_l``, differentiable w.r.t. the module's parameters.

        ``W_l`` has shape ``(n_out, n_in)``, ``v_l`` has shape ``(n_out,)``.
        """
        self.check_eval_mode()
        maps = []
        width = self.in_features
        for step in self._affine_steps:
            W = v = None
            for _, m in step.modules:
                if isinstance(m, nn.Linear):
                    mW = m.weight
                    mv = m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=mW.dtype,
                                                                      device=mW.device)
                elif isinstance(m, nn.BatchNorm1d):
                    ref = m.running_var if m.running_var is not None else m.weight
                    var = m.running_var if m.running_var is not None else torch.ones_like(ref)
                    mean = m.running_mean if m.running_mean is not None else torch.zeros_like(ref)
                    scale = torch.rsqrt(var + m.eps)
                    if m.weight is not None:
                        scale = scale * m.weight
                    shift = -mean * scale
                    if m.bias is not None:
                        shift = shift + m.bias
                    mW, mv = torch.diag(scale), shift
                else:  # Identity, Dropout (eval)
                    continue
                if W is None:
                    W, v = mW, mv
                else:
                    W, v = mW @ W, mW @ v + mv
            if W is None:
                ref = next(iter(self.module.parameters()), torch.empty(0))
                W = torch.eye(width, dtype=ref.dtype, device=ref.device)
                v = torch.zeros(width, dtype=ref.dtype, device=ref.device)
            width = W.shape[0]
            if dtype is not None:
                W, v = W.to(dtype), v.to(dtype)
            maps.append((W, v))
        return maps

    def set_affine_maps(self, maps) -> None:
        """Write new ``(W_l, v_l)`` into the decoder's modules in place (the inverse of :meth:`affine_maps`).

        Used by closed-form M-steps. Every affine step must consist of exactly one ``nn.Linear`` with a
        bias (``Identity`` / eval-mode ``Dropout`` around it are fine); the values are copied under
        ``torch.no_grad()`` into the existing parameters, keeping their dtype and device (so optimisers
        and the region cache see an in-place change).

        Raises:
            NotCPAError: wrong number of maps or shapes, an affine step that is not exactly one
                ``nn.Linear`` (e.g. ``BatchNorm1d`` folded in, or an implicit identity), or a ``Linear``
                without bias. For such decoders use a gradient M-step instead.
        """
        maps = list(maps)
        if len(maps) != len(self._affine_steps):
            raise NotCPAError(f"set_affine_maps: expected {len(self._affine_steps)} (W, v) pairs, got {len(maps)}")
        targets = []
        for l, (step, (W, v)) in enumerate(zip(self._affine_steps, maps)):
            linears = [(n, m) for n, m in step.modules if isinstance(m, nn.Linear)]
            others = [n for n, m in step.modules if not isinstance(m, (nn.Linear, nn.Identity, nn.Dropout))]
            if len(linears) != 1 or others:
                what = ", ".join(f"{n} ({type(m).__name__})" for n, m in step.modules) or "an implicit identity"
                raise NotCPAError(
                    f"set_affine_maps: affine step {l} is [{what}], not exactly one nn.Linear; a closed-form "
                    "update cannot be written back into it. Use the gradient M-step (m_step_method='gradient').")
            name, lin = linears[0]
            if lin.bias is None:
                raise NotCPAError(f"set_affine_maps: layer '{name}' has no bias (bias=False); the closed-form "
                                  "M-step needs one. Use nn.Linear(..., bias=True) or the gradient M-step.")
            if tuple(W.shape) != tuple(lin.weight.shape) or tuple(v.shape) != tuple(lin.bias.shape):
                raise NotCPAError(f"set_affine_maps: layer '{name}' has weight {tuple(lin.weight.shape)} and bias "
                                  f"{tuple(lin.bias.shape)}; got {tuple(W.shape)} and {tuple(v.shape)}")
            targets.append((lin, W, v))
        with torch.no_grad():
            for lin, W, v in targets:
                lin.weight.copy_(W.detach().to(dtype=lin.weight.dtype, device=lin.weight.device))
                lin.bias.copy_(v.detach().to(dtype=lin.bias.dtype, device=lin.bias.device))

    def parameters_version(self) -> tuple:
        """A key that changes whenever a parameter or buffer of the decoder changes in place."""
        return tuple((p.data_ptr(), p._version) for p in self.module.parameters()) + \
            tuple((b.data_ptr(), b._version) for b in self.module.buffers()) + (self.module.training,)

    # ------------------------------------------------------------------ evaluation
    def preactivations(self, z: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Pre-activations of every activation layer and the output, for latent points ``z`` (..., S)."""
        maps = self.affine_maps(dtype=z.dtype)
        pre = []
        h = z
        for l, (W, v) in enumerate(maps):
            t = h @ W.T + v
            if l == len(maps) - 1:
                return pre, t
            pre.append(t)
            h = torch.where(t >= 0, t, self.negative_slopes[l] * t)
        raise AssertionError("unreachable")

    def activation_pattern(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Per activation layer, the boolean pattern ``pre-activation >= 0`` of each point."""
        with torch.no_grad():
            pre, _ = self.preactivations(z)
        return [t >= 0 for t in pre]

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.preactivations(z)[1]

    def __repr__(self) -> str:
        return (f"CPANetwork(S={self.in_features}, D={self.out_features}, widths={list(self.widths)}, "
                f"negative_slopes={list(self.negative_slopes)})")


def as_cpa_network(decoder) -> CPANetwork:
    """Return the :class:`CPANetwork` view of ``decoder`` (idempotent); raise :class:`NotCPAError` if not CPA."""
    if isinstance(decoder, CPANetwork):
        return decoder
    return CPANetwork(decoder)
