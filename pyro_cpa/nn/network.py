"""Reading a ``torch.nn`` decoder as a continuous piecewise affine (CPA) network.

A CPA network is stored in the canonical alternating form

    g(z) = T_L ∘ σ_{L-1} ∘ T_{L-1} ∘ ... ∘ σ_0 ∘ T_0 (z),

where each ``T_l(h) = W_l h + v_l`` is affine and each ``σ_l`` is a piecewise-affine activation layer
(:mod:`pyro_cpa.nn.activations`): element-wise with one or more kinks per unit (ReLU, LeakyReLU,
:class:`~pyro_cpa.nn.Abs`, PReLU, Hardtanh, ReLU6, :class:`~pyro_cpa.nn.Clamp`, Hardsigmoid,
Softshrink, eval-mode RReLU) or a max over windows (MaxPool, AdaptiveMaxPool). Each activation layer
contributes ``widths[l]`` *forms* (affine functions of its pre-activation whose signs make up the
region's pattern: one per kink of every unit, one per pair of entries of every pooling window).
Consecutive affine modules (:mod:`pyro_cpa.nn.ops`: Linear, convolutions, transposed convolutions,
average pools, pads, upsampling, Flatten/Unflatten, eval-mode batch norm and dropout, ...) are
composed into one ``T_l``, applied implicitly (``affine_step``): no dense matrix is built unless
:meth:`CPANetwork.affine_maps` is asked for one. Consecutive ReLU-type activations (kink at 0, slope
1 above) are composed into one; other consecutive activations are separated by an identity ``T_l``.
Tensors between layers keep their per-sample shapes (channels, spatial dims); the latent input is a
vector ``(..., S)`` and the output is flattened (C-order, like ``nn.Flatten``) to ``(..., D)``.
The weights are read *live* from the modules on every call, so everything computed from them is
differentiable with respect to the decoder's parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..errors import NotCPAError
from .activations import Elementwise, MaxPool, maxpool_windows
from .layers import Abs, Clamp
from .ops import (AffineOp, batchnorm_running_stats_missing, forward_owner, is_affine_module, needs_eval,
                  spatial_dims)

SUPPORTED = (
    "affine: nn.Linear, nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d, nn.AvgPool1d/2d/3d, nn.AdaptiveAvgPool1d/2d/3d, "
    "nn.ConstantPad/ZeroPad/ReflectionPad/ReplicationPad/CircularPad, nn.Upsample (nearest, nearest-exact, "
    "linear, bilinear, trilinear, area), nn.Flatten, nn.Unflatten, nn.PixelShuffle/PixelUnshuffle/ChannelShuffle, "
    "nn.Identity, nn.Dropout variants and nn.BatchNorm1d/2d/3d (eval mode); piecewise affine: nn.ReLU, "
    "nn.LeakyReLU, nn.PReLU, nn.RReLU (eval mode), nn.Hardtanh, nn.ReLU6, nn.Hardsigmoid, nn.Softshrink, "
    "pyro_cpa.nn.Abs, pyro_cpa.nn.Clamp, nn.MaxPool1d/2d/3d, nn.AdaptiveMaxPool1d/2d/3d; nested nn.Sequential "
    "(and PyroModule versions)"
)


def _nn_types(*names: str) -> tuple[type, ...]:
    return tuple(t for t in (getattr(nn, n, None) for n in names) if isinstance(t, type))


_ACTIVATION_OWNERS = _nn_types("ReLU", "LeakyReLU", "PReLU", "RReLU", "Hardtanh", "Hardsigmoid", "Softshrink") + \
    (Abs, Clamp)
_MAXPOOL_TYPES = _nn_types("MaxPool1d", "MaxPool2d", "MaxPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d",
                           "AdaptiveMaxPool3d")
# Continuous piecewise affine (or affine) layers, or configurations, that pyro-cpa cannot read yet.
_CPA_NOT_SUPPORTED_YET = _nn_types(
    "LazyLinear", "LazyConv1d", "LazyConv2d", "LazyConv3d", "LazyConvTranspose1d", "LazyConvTranspose2d",
    "LazyConvTranspose3d", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d", "MaxUnpool1d", "MaxUnpool2d",
    "MaxUnpool3d", "Fold", "Unfold", "FractionalMaxPool2d", "FractionalMaxPool3d", "Upsample")
# Layers that are not piecewise affine at all (smooth, normalising, multiplicative) or not continuous.
_NOT_PIECEWISE_AFFINE = _nn_types(
    "Tanh", "Sigmoid", "GELU", "SiLU", "Mish", "ELU", "SELU", "CELU", "GLU", "Softplus", "Softsign", "Tanhshrink",
    "LogSigmoid", "Softmax", "Softmin", "LogSoftmax", "Softmax2d", "Hardswish", "LayerNorm", "GroupNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LocalResponseNorm", "RMSNorm", "Bilinear",
    "MultiheadAttention", "RNN", "LSTM", "GRU", "Transformer", "TransformerEncoder", "TransformerDecoder",
    "TransformerEncoderLayer", "TransformerDecoderLayer")
_NOT_CONTINUOUS = _nn_types("Hardshrink", "Threshold")
_SUPPORTED_BASES = _nn_types(
    "Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "BatchNorm1d",
    "BatchNorm2d", "BatchNorm3d", "Identity", "Dropout", "Flatten", "Unflatten", "AvgPool1d", "AvgPool2d",
    "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "ConstantPad1d", "ConstantPad2d",
    "ConstantPad3d", "ReflectionPad1d", "ReflectionPad2d", "ReflectionPad3d", "ReplicationPad1d",
    "ReplicationPad2d", "ReplicationPad3d", "PixelShuffle", "PixelUnshuffle", "ChannelShuffle") + \
    _ACTIVATION_OWNERS + _MAXPOOL_TYPES


def _refusal(name: str, layer: nn.Module, detail: str = "") -> str:
    """A truthful reason why ``layer`` cannot be read as part of a CPA decoder."""
    kind = type(layer).__name__
    supported = f"Supported layers: {SUPPORTED}."
    if detail:
        return f"layer '{name}' ({kind}) {detail} {supported}"
    if isinstance(layer, nn.Upsample) and forward_owner(layer) is nn.Upsample:
        return (f"layer '{name}' ({kind}, mode={layer.mode!r}) is continuous piecewise affine (affine), but pyro-cpa "
                f"does not support it yet: its interpolation weights can be negative. {supported}")
    if isinstance(layer, _CPA_NOT_SUPPORTED_YET) and type(layer) in _CPA_NOT_SUPPORTED_YET:
        return (f"layer '{name}' ({kind}) is continuous piecewise affine (or affine) or has a piecewise-affine "
                f"setting, but pyro-cpa does not support it yet. {supported} Workaround: write it with these "
                "layers (e.g. an unfold as a convolution with one-hot kernels).")
    if isinstance(layer, _SUPPORTED_BASES) and not isinstance(layer, _CPA_NOT_SUPPORTED_YET):
        return (f"layer '{name}' ({kind}) subclasses a supported layer but overrides forward(), so pyro-cpa cannot "
                f"know that it is still piecewise affine. {supported}")
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


def _elementwise_spec(module: nn.Module):
    """``(kinks, slopes, σ(κ_1), prelu)`` of a supported element-wise activation, else ``None``."""
    owner = forward_owner(module)
    if owner is nn.ReLU:
        return (0.0,), (0.0, 1.0), 0.0, None
    if owner is nn.LeakyReLU:
        return (0.0,), (float(module.negative_slope), 1.0), 0.0, None
    if owner is Abs:
        return (0.0,), (-1.0, 1.0), 0.0, None
    if owner is nn.RReLU:        # eval mode: LeakyReLU with the mean slope (training mode is refused)
        return (0.0,), ((float(module.lower) + float(module.upper)) / 2.0, 1.0), 0.0, None
    if owner is nn.PReLU:
        return (0.0,), (None, 1.0), 0.0, module
    if owner is nn.Hardtanh:     # also ReLU6
        return (float(module.min_val), float(module.max_val)), (0.0, 1.0, 0.0), float(module.min_val), None
    if owner is nn.Hardsigmoid:  # relu6(t + 3) / 6
        return (-3.0, 3.0), (0.0, 1.0 / 6.0, 0.0), 0.0, None
    if owner is nn.Softshrink:
        lam = float(module.lambd)
        return (-lam, lam), (1.0, 0.0, 1.0), 0.0, None
    if owner is Clamp:
        return module.spec()
    return None


def _is_maxpool(module: nn.Module) -> bool:
    return isinstance(module, _MAXPOOL_TYPES) and forward_owner(module) is type(module).__mro__[
        next(i for i, k in enumerate(type(module).__mro__) if k in _MAXPOOL_TYPES)]


@dataclass(frozen=True)
class _AffineStep:
    ops: tuple[AffineOp, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def modules(self) -> tuple[tuple[str, nn.Module], ...]:
        return tuple((op.name, op.module) for op in self.ops)


def _probe(name: str, module: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample output shape of ``module`` on per-sample input ``shape`` (checked on a batch of 2)."""
    d = spatial_dims(module)
    if d is not None and len(shape) != d + 1:
        raise NotCPAError(f"layer sizes do not chain: layer '{name}' ({type(module).__name__}) expects a per-sample "
                          f"input of {d + 1} dimensions (channels, {d} spatial), gets shape {shape}. Reshape with "
                          "nn.Unflatten(1, (C, ...)) before it.")
    if isinstance(module, nn.Linear) and shape[-1] != module.in_features:
        raise NotCPAError(f"layer sizes do not chain: layer '{name}' expects {module.in_features} inputs, gets "
                          f"{shape[-1]}")
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.PReLU)):
        want = module.num_features if not isinstance(module, nn.PReLU) else module.num_parameters
        if want != 1 or not isinstance(module, nn.PReLU):
            if shape[0] != want:
                raise NotCPAError(f"layer sizes do not chain: layer '{name}' expects {want} features (channels), "
                                  f"gets shape {shape}")
    if needs_eval(module) or _elementwise_spec(module) is not None:
        return shape        # shape-preserving; not run (batch norm in training mode would update its statistics)
    try:
        with torch.no_grad():
            ref = next(iter(module.parameters()), None)
            x = torch.zeros((2,) + shape, dtype=ref.dtype if ref is not None else torch.get_default_dtype(),
                            device=ref.device if ref is not None else None)
            y = module(x)
    except Exception as err:  # noqa: BLE001 - any failure means the sizes do not chain
        raise NotCPAError(f"layer sizes do not chain: layer '{name}' ({type(module).__name__}) cannot take a "
                          f"per-sample input of shape {shape}: {err}") from err
    if not isinstance(y, torch.Tensor) or y.dim() < 2 or y.shape[0] != 2:
        raise NotCPAError(f"layer '{name}' ({type(module).__name__}) does not map a batch of per-sample inputs to a "
                          "batch of tensors (it works across the batch dimension or returns a tuple); pyro-cpa "
                          "needs per-sample maps (e.g. nn.Flatten(start_dim=1)).")
    return tuple(y.shape[1:])


def _latent_dim(layers) -> int:
    for name, m in layers:
        if isinstance(m, nn.Linear):
            return m.in_features
        if isinstance(m, nn.BatchNorm1d):
            return m.num_features
        if isinstance(m, nn.Unflatten) and m.dim in (1, -1):
            return math.prod(m.unflattened_size)
        if _elementwise_spec(m) is not None or isinstance(m, (nn.Identity,)) or \
                (needs_eval(m) and not isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d))):
            continue
        break
    raise NotCPAError(
        "cannot read the latent dimension: the decoder's input is the latent vector z of shape (..., S). "
        "Start the decoder with nn.Linear(S, width) (or nn.Unflatten(1, (C, ...)) for a latent image).")


class CPANetwork:
    """Canonical alternating view of a CPA decoder (see module docstring).

    Attributes:
        module: the wrapped ``nn.Module`` (its parameters are the live parameters).
        in_features: latent dimension S.
        out_features: data dimension D (the output flattened).
        activations: the activation layers σ_l (:class:`~pyro_cpa.nn.activations.Elementwise` or
            :class:`~pyro_cpa.nn.activations.MaxPool`).
        widths: number of forms (hyperplanes per region, one bit of the pattern each) of every σ_l; for
            ReLU-type layers the number of units.
        units: number of pre-activation entries of every σ_l.
    """

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise NotCPAError(f"decoder must be a torch.nn.Module, got {type(module).__name__}")
        layers = list(_flatten(module, ""))
        kinds = []
        for name, layer in layers:
            if isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
                raise NotCPAError(_refusal(name, layer, "is a lazy module with uninitialised parameters; run one "
                                                        "forward pass of the decoder before exact inference."))
            if _elementwise_spec(layer) is not None:
                kinds.append("act")
            elif _is_maxpool(layer):
                if layer.return_indices:
                    raise NotCPAError(_refusal(name, layer, "returns indices (return_indices=True); pyro-cpa needs "
                                                            "the pooled tensor only. Use return_indices=False."))
                kinds.append("pool")
            elif is_affine_module(layer):
                if batchnorm_running_stats_missing(layer):
                    raise NotCPAError(_refusal(name, layer, "has no running statistics (track_running_stats=False), "
                                                            "so it normalises with batch statistics and is not "
                                                            "piecewise affine in z."))
                kinds.append("affine")
            else:
                raise NotCPAError(_refusal(name, layer))
        S = _latent_dim(layers)
        shape: tuple[int, ...] = (S,)
        steps: list = []
        pending: list[AffineOp] = []
        step_in = shape
        for (name, layer), kind in zip(layers, kinds):
            if kind == "affine":
                out = _probe(name, layer, shape)
                pending.append(AffineOp(name, layer, shape, out))
                shape = out
                continue
            if kind == "pool":
                out = _probe(name, layer, shape)
                act = MaxPool((name,), maxpool_windows(layer, shape, out), shape, out)
            else:
                _probe(name, layer, shape)
                kinks, slopes, v0, prelu = _elementwise_spec(layer)
                act = Elementwise((name,), kinks, slopes, v0, shape, prelu)
                out = shape
            prev = steps[-1] if steps else None
            if not pending and isinstance(prev, (Elementwise, MaxPool)) and prev.negative_slope is not None \
                    and act.negative_slope is not None:
                a1 = prev.negative_slope      # compose two ReLU-type layers: t -> a1 t below 0, then a2
                composed = a1 if a1 <= 0 else a1 * act.negative_slope
                steps[-1] = Elementwise(prev.names + (name,), (0.0,), (composed, 1.0), 0.0, shape)
            else:
                steps.append(_AffineStep(tuple(pending), step_in, shape))
                steps.append(act)
            pending = []
            shape = step_in = out
        steps.append(_AffineStep(tuple(pending), step_in, shape))
        self.module = module
        self._affine_steps: tuple[_AffineStep, ...] = tuple(s for s in steps if isinstance(s, _AffineStep))
        self.activations: tuple = tuple(s for s in steps if not isinstance(s, _AffineStep))
        self.in_features: int = S
        self.out_features: int = math.prod(shape)
        self.output_shape: tuple[int, ...] = shape
        self.widths: tuple[int, ...] = tuple(a.num_forms for a in self.activations)
        self.units: tuple[int, ...] = tuple(a.n_in for a in self.activations)

    # ------------------------------------------------------------------ structure
    @property
    def num_layers(self) -> int:
        """Number of affine maps T_0..T_L (= number of activation layers + 1)."""
        return len(self._affine_steps)

    @property
    def negative_slopes(self) -> tuple[float, ...]:
        """``α_l`` of every activation layer when all are ReLU-type (σ(t) = t above 0, α t below).

        Raises:
            NotCPAError: a layer has several kinks, per-channel slopes or is a max pool; use
                :attr:`activations`.
        """
        out = []
        for a in self.activations:
            if a.negative_slope is None:
                raise NotCPAError(f"activation layer {a!r} is not ReLU-type (one kink at 0, slope 1 above, a "
                                  "scalar slope below); this code path needs CPANetwork.activations.")
            out.append(a.negative_slope)
        return tuple(out)

    @property
    def needs_gradient_m_step(self) -> str | None:
        """Why the closed-form M-step (written for ``nn.Linear`` layers) has no update for this network, or
        ``None``: a convolution, pooling, padding, reshaping or upsampling module in an affine step, or an
        activation that is not element-wise with fixed slopes (a max pool, PReLU). EM then uses the gradient
        M-step. (Batch norm and bias-free Linear layers are refused by :meth:`set_affine_maps` instead.)"""
        for l, step in enumerate(self._affine_steps):
            for name, m in step.modules:
                if not isinstance(m, (nn.Linear, nn.Identity, nn.Dropout, nn.BatchNorm1d)):
                    return f"affine step {l} contains '{name}' ({type(m).__name__})"
        for a in self.activations:
            if not isinstance(a, Elementwise) or a.prelu is not None:
                return f"activation layer {a!r} is not element-wise with fixed slopes"
        return None

    def check_eval_mode(self) -> None:
        for step in self._affine_steps:
            for name, m in step.modules:
                if needs_eval(m) and m.training and (not isinstance(m, nn.Dropout) or m.p > 0):
                    raise NotCPAError(
                        f"layer '{name}' ({type(m).__name__}) is only affine in eval mode; "
                        "call decoder.eval() before exact inference.")
        for _, m in _flatten(self.module, ""):
            if isinstance(m, nn.RReLU) and m.training:
                raise NotCPAError("nn.RReLU draws random slopes in training mode; call decoder.eval() before "
                                  "exact inference (its eval-mode slope is (lower + upper) / 2).")

    def _ref(self) -> torch.Tensor:
        return next(iter(self.module.parameters()), torch.empty(0, device=torch.get_default_device()))

    # ------------------------------------------------------------------ affine steps
    def affine_step(self, l: int, x: torch.Tensor, bias: bool = True, absolute: bool = False) -> torch.Tensor:
        """Apply ``T_l`` to rows ``x`` (B, n_in) without building its matrix: ``W_l x + v_l``.

        ``bias=False`` gives ``W_l x``; ``absolute=True`` the absolute-value accumulation ``|W_l| x (+ |v_l|)``
        (every product and sum over absolute values, the running rounding bound of ``W_l x + v_l``, for
        ``x >= 0``), module by module. Computed in ``x``'s dtype on ``x``'s device; differentiable.
        """
        step = self._affine_steps[l]
        B = x.shape[0]
        y = x.reshape((B,) + step.in_shape)
        for op in step.ops:
            y = op.abs_linear(y) if absolute else op.linear(y)
            if bias:
                v = op.bias(y, absolute=absolute)
                if v is not None:
                    y = y + v
        return y.reshape(B, -1)

    def affine_maps(self, dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Dense live ``(W_l, v_l)`` of every affine step ``T_l``, differentiable w.r.t. the module's parameters.

        ``W_l`` has shape ``(n_out, n_in)``, ``v_l`` has shape ``(n_out,)``; built by pushing the identity
        through :meth:`affine_step` (exact: one product per entry for a single layer). Prefer
        :meth:`affine_step` for convolutions, whose dense matrices can be large.
        """
        self.check_eval_mode()
        ref = self._ref()
        dt = dtype if dtype is not None else (ref.dtype if ref.numel() or ref.is_floating_point() else
                                               torch.get_default_dtype())
        maps = []
        for l, step in enumerate(self._affine_steps):
            n_in = math.prod(step.in_shape)
            eye = torch.eye(n_in, dtype=dt, device=ref.device)
            W = self.affine_step(l, eye, bias=False).T
            v = self.affine_step(l, eye.new_zeros(1, n_in))[0]
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
                ``nn.Linear`` (e.g. ``BatchNorm1d`` folded in, a convolution, or an implicit identity), or a
                ``Linear`` without bias. For such decoders use a gradient M-step instead.
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
    def forms(self, l: int, t: torch.Tensor) -> torch.Tensor:
        """Values of the forms of activation layer ``l`` at pre-activations ``t`` (B, n_l) -> (B, widths[l])."""
        a = self.activations[l]
        pos, neg = a.form_pos.to(t.device), a.form_neg.to(t.device)
        f = t[:, pos] + a.form_const(t.dtype, t.device)
        if bool((neg >= 0).any()):
            f = f - t[:, neg.clamp(min=0)] * (neg >= 0).to(t.dtype)
        return f

    def preactivations(self, z: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Pre-activations of every activation layer and the (flattened) output, for latent points ``z`` (..., S)."""
        self.check_eval_mode()
        batch = z.shape[:-1]
        h = z.reshape(-1, z.shape[-1])
        pre = []
        for l in range(self.num_layers):
            t = self.affine_step(l, h)
            if l == self.num_layers - 1:
                return [p.reshape(batch + p.shape[-1:]) for p in pre], t.reshape(batch + t.shape[-1:])
            pre.append(t)
            q = self.forms(l, t) >= 0
            src, scale, offset = self.activations[l].select(q, t.dtype, t.device)
            h = scale * (t if src is None else t.gather(1, src)) + offset
        raise AssertionError("unreachable")

    def activation_pattern(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Per activation layer, the boolean pattern ``form >= 0`` of each point (..., widths[l])."""
        with torch.no_grad():
            pre, _ = self.preactivations(z)
        return [(self.forms(l, t.reshape(-1, t.shape[-1])) >= 0).reshape(t.shape[:-1] + (-1,))
                for l, t in enumerate(pre)]

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.preactivations(z)[1]

    def __repr__(self) -> str:
        kinds = [type(a).__name__ for a in self.activations]
        return (f"CPANetwork(S={self.in_features}, D={self.out_features}, widths={list(self.widths)}, "
                f"activations={kinds})")


def as_cpa_network(decoder) -> CPANetwork:
    """Return the :class:`CPANetwork` view of ``decoder`` (idempotent); raise :class:`NotCPAError` if not CPA."""
    if isinstance(decoder, CPANetwork):
        return decoder
    return CPANetwork(decoder)
