"""Affine ``torch.nn`` modules as implicit linear maps on batches of vectors.

An affine module ``T(x) = W x + v`` is never materialised as a dense matrix here: :class:`AffineOp`
applies ``W`` (``linear``), ``|W|`` (``abs_linear``, the absolute-value accumulation used for rounding
bounds) and adds ``v`` (``bias``) by calling the module's own functional form on a batch ``(B,
*in_shape)``. Pushing the ``S`` basis directions of a region and its origin through these maps gives
the region's affine map without the layer's (possibly huge) Toeplitz matrix.

Supported (each one exactly affine, weights read live, so everything is differentiable in them):
``Linear``, ``Conv1d/2d/3d`` (any stride, padding, padding mode, dilation, groups, bias or not),
``ConvTranspose1d/2d/3d`` (any stride, padding, output padding, dilation, groups, bias or not),
``BatchNorm1d/2d/3d`` in eval mode with running statistics, ``AvgPool1d/2d/3d``,
``AdaptiveAvgPool1d/2d/3d``, ``ConstantPad``/``ZeroPad``, ``ReflectionPad``, ``ReplicationPad``,
``CircularPad``, ``Upsample`` (modes with non-negative weights: nearest, nearest-exact, linear, bilinear,
trilinear, area), ``Flatten``, ``Unflatten``, ``PixelShuffle``, ``PixelUnshuffle``, ``ChannelShuffle``,
``Identity`` and eval-mode ``Dropout`` variants.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def forward_owner(module: nn.Module) -> type:
    """The class whose ``forward`` a module runs (a subclass overriding ``forward`` is its own owner)."""
    return next(k for k in type(module).__mro__ if "forward" in k.__dict__)


def _types(*names: str) -> tuple[type, ...]:
    return tuple(t for t in (getattr(nn, n, None) for n in names) if isinstance(t, type))


_CONV = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_T = {nn.ConvTranspose1d: (1, F.conv_transpose1d), nn.ConvTranspose2d: (2, F.conv_transpose2d),
           nn.ConvTranspose3d: (3, F.conv_transpose3d)}
_BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_BATCHNORM = tuple({next(k for k in t.__mro__ if "forward" in k.__dict__) for t in _BATCHNORM_TYPES})
_DROPOUT = _types("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout")
#: Linear modules without a bias whose weights are all non-negative (|W| x = W x for x >= 0): the module
#: itself is both ``linear`` and ``abs_linear``. Keyed by the class that owns ``forward``.
_PLAIN_LINEAR = tuple(
    next(k for k in t.__mro__ if "forward" in k.__dict__) for t in _types(
        "Identity", "Flatten", "Unflatten", "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d",
        "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "ReflectionPad1d", "ReplicationPad1d", "CircularPad1d",
        "PixelShuffle", "PixelUnshuffle", "ChannelShuffle", "Upsample"))
_CONSTANT_PAD = next(k for k in nn.ConstantPad1d.__mro__ if "forward" in k.__dict__)
#: Interpolation modes of ``nn.Upsample`` whose weights are non-negative (bicubic's are not).
UPSAMPLE_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area")
#: Modules that take a channel dimension plus this many spatial dimensions per sample.
SPATIAL_DIMS = {**{c: d for c, d in _CONV.items()}, **{c: d for c, (d, _) in _CONV_T.items()},
                nn.BatchNorm2d: 2, nn.BatchNorm3d: 3,
                **{t: int(t.__name__[-2]) for t in _types(
                    "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d",
                    "AdaptiveAvgPool3d", "MaxPool1d", "MaxPool2d", "MaxPool3d", "AdaptiveMaxPool1d",
                    "AdaptiveMaxPool2d", "AdaptiveMaxPool3d")}}


def spatial_dims(module: nn.Module) -> int | None:
    """Number of spatial dimensions a conv/pool module expects after the channel dimension (else None)."""
    for cls, d in SPATIAL_DIMS.items():
        if isinstance(module, cls):
            return d
    return None


def is_affine_module(module: nn.Module) -> bool:
    """Whether ``module`` is one of the supported affine modules (not a subclass overriding forward)."""
    owner = forward_owner(module)
    if owner in _CONV or owner in _CONV_T or owner in _BATCHNORM or owner is nn.Linear:
        return True
    if owner is _CONSTANT_PAD or owner in _DROPOUT:
        return True
    if owner in _PLAIN_LINEAR:
        return not isinstance(module, nn.Upsample) or module.mode in UPSAMPLE_MODES
    return False


def batchnorm_affine(m: nn.Module, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` of an eval-mode batch norm: ``y = scale x + shift`` with
    ``scale = γ / sqrt(running_var + eps)``, ``shift = β − running_mean · scale``."""
    var = m.running_var.to(dtype=dtype, device=device)
    scale = torch.rsqrt(var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight.to(dtype)
    shift = -m.running_mean.to(dtype) * scale
    if m.bias is not None:
        shift = shift + m.bias.to(dtype)
    return scale, shift


class AffineOp:
    """One affine module ``x -> W x + v`` on batches ``(B, *in_shape) -> (B, *out_shape)``.

    ``linear(x)`` = W x, ``abs_linear(x)`` = |W| x, ``bias(like)`` = v as a tensor of ``out_shape``
    (or ``None`` when v = 0), ``abs_bias(like)`` = |v|. All are exact applications of the module's own
    functional form (no dense matrix), in the dtype and on the device of the input.
    """

    def __init__(self, name: str, module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        self.name, self.module = name, module
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.owner = forward_owner(module)

    # ------------------------------------------------------------------ W x and |W| x
    def _apply(self, x: torch.Tensor, absolute: bool) -> torch.Tensor:
        m, o = self.module, self.owner
        if o is nn.Linear:
            W = m.weight.to(x.dtype)
            return F.linear(x, W.abs() if absolute else W)
        if o in _CONV:
            w = m.weight.to(x.dtype)
            return m._conv_forward(x, w.abs() if absolute else w, None)
        if o in _CONV_T:
            _, fn = _CONV_T[o]
            w = m.weight.to(x.dtype)
            return fn(x, w.abs() if absolute else w, None, m.stride, m.padding, m.output_padding, m.groups,
                      m.dilation)
        if o in _BATCHNORM:
            scale, _ = batchnorm_affine(m, x.dtype, x.device)
            scale = scale.abs() if absolute else scale
            return x * scale.view((-1,) + (1,) * (x.dim() - 2))
        if o is _CONSTANT_PAD:
            return F.pad(x, m.padding, "constant", 0.0)
        if o in _DROPOUT:
            return x
        return m(x)   # linear, no bias, non-negative weights

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(x, False)

    def abs_linear(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(x, True)

    # ------------------------------------------------------------------ v and |v|
    def bias(self, like: torch.Tensor, absolute: bool = False) -> torch.Tensor | None:
        m, o = self.module, self.owner
        shape = self.out_shape
        if o is nn.Linear or o in _CONV or o in _CONV_T:
            if m.bias is None:
                return None
            b = m.bias.to(like.dtype)
            b = b.abs() if absolute else b
            return b.view((-1,) + (1,) * (len(shape) - 1)).expand(shape)
        if o in _BATCHNORM:
            _, shift = batchnorm_affine(m, like.dtype, like.device)
            shift = shift.abs() if absolute else shift
            return shift.view((-1,) + (1,) * (len(shape) - 1)).expand(shape)
        if o is _CONSTANT_PAD:
            value = abs(float(m.value)) if absolute else float(m.value)
            if value == 0.0:       # structural: a zero pad value adds nothing
                return None
            return F.pad(like.new_zeros((1,) + self.in_shape), m.padding, "constant", value)[0]
        return None

    def __repr__(self) -> str:
        return f"AffineOp({self.name}: {type(self.module).__name__}, {self.in_shape} -> {self.out_shape})"


def batchnorm_running_stats_missing(module: nn.Module) -> bool:
    return isinstance(module, _BATCHNORM_TYPES) and (module.running_mean is None or module.running_var is None)


def needs_eval(module: nn.Module) -> bool:
    """Modules that are affine only in eval mode (dropout, batch norm)."""
    return isinstance(module, _BATCHNORM_TYPES + _DROPOUT)
