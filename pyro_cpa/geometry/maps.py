"""Per-region affine maps of a CPA network, computed from activation patterns.

On the region ω with pattern q (one bit per form of every activation layer, see
:mod:`pyro_cpa.nn.activations`), every intermediate quantity is affine in z:

    h_0(z) = z,   t_l(z) = T_l(h_l(z)) = M_l z + m_l,
    h_{l+1}(z) = scale_l ⊙ t_l(z)[src_l] + offset_l     (the layer's selection under q_l),
    g(z) = t_L(z) = A_ω z + b_ω.

``M_l`` is obtained by pushing the S columns of ``P_l`` (the directions of h_l) through the linear part
of ``T_l`` and ``m_l`` by pushing ``p_l`` through ``T_l`` (:meth:`~pyro_cpa.nn.CPANetwork.affine_step`):
no layer matrix is built. The forms of layer l on ω are ``φ(t_l(z)) = F_l z + f_l``; the region is
``{z : φ_f(z) >= 0 where q_f = 1, φ_f(z) <= 0 where q_f = 0}``.

All maps are batched over regions and differentiable with respect to the network's weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nn.activations import Elementwise
from ..nn.network import CPANetwork


@dataclass
class RegionMaps:
    """Affine maps of every region (R regions, S latent dims).

    Attributes:
        layer_inputs: per affine step l, ``(P_l, p_l)`` with h_l(z) = P_l z + p_l; shapes (R, n_in, S), (R, n_in).
        preactivations: per activation layer l, ``(M_l, m_l)``: t_l(z) = M_l z + m_l; (R, n_l, S), (R, n_l).
        slopes: per activation layer l, the ``scale`` of its selection (R, n_out) (for element-wise layers
            the diagonal of the Jacobian dh/dt).
        forms: per activation layer l, ``(F_l, f_l)``: its forms as affine functions of z; (R, u_l, S), (R, u_l).
        selections: per activation layer l, ``(src, scale, offset)`` (``src`` None for element-wise layers).
        A: (R, D, S) and b: (R, D), the output map g(z) = A z + b on each region.
    """

    layer_inputs: list[tuple[torch.Tensor, torch.Tensor]]
    preactivations: list[tuple[torch.Tensor, torch.Tensor]]
    slopes: list[torch.Tensor]
    A: torch.Tensor
    b: torch.Tensor
    forms: list[tuple[torch.Tensor, torch.Tensor]]
    selections: list[tuple]


def as_activation(act, n: int):
    """An activation layer object; a float α stands for the ReLU-type layer of n units with slope α below 0."""
    if isinstance(act, (int, float)):
        return Elementwise((), (0.0,), (float(act), 1.0), 0.0, (n,))
    return act


def form_maps(act, M: torch.Tensor, m: torch.Tensor, absolute: bool = False):
    """Forms ``t[pos] − t[neg] + const`` of affine functions ``t = M · + m`` (units on dim 1 of M and m).

    ``absolute=True`` combines absolute-value accumulations instead: ``|M|[pos] + |M|[neg]``, ``… + |const|``.
    """
    pos, neg = act.form_pos.to(M.device), act.form_neg.to(M.device)
    const = act.form_const(m.dtype, m.device)
    F, f = M[:, pos], m[:, pos] + (const.abs() if absolute else const)
    has = neg >= 0
    if bool(has.any()):
        idx = neg.clamp(min=0)
        w = has.to(M.dtype)
        sign = 1.0 if absolute else -1.0
        F = F + sign * M[:, idx] * w.view((1, -1) + (1,) * (M.dim() - 2))
        f = f + sign * m[:, idx] * w
    return F, f


def select_maps(act, q: torch.Tensor, M: torch.Tensor, m: torch.Tensor, absolute: bool = False, sel=None):
    """Input of the next layer ``scale ⊙ t[src] + offset`` of ``t = M · + m`` under patterns ``q`` (R, u).

    ``absolute=True``: ``|scale| ⊙ |M|[src]`` and ``|scale| ⊙ |m|[src] + |offset|``. Returns ``(P, p, sel)``.
    """
    src, scale, offset = sel if sel is not None else act.select(q, m.dtype, m.device)
    if absolute:
        scale, offset = scale.abs(), offset.abs()
    if src is not None:
        idx = src.to(M.device)
        M = M.gather(1, idx.view(idx.shape + (1,) * (M.dim() - 2)).expand(idx.shape + M.shape[2:]))
        m = m.gather(1, idx)
    P = scale.view(scale.shape + (1,) * (M.dim() - 2)) * M
    return P, scale * m + offset, (src, scale, offset)


def push_step(net, l: int, P: torch.Tensor, p: torch.Tensor, absolute: bool = False):
    """``T_l`` of the affine functions ``P z + p`` (P (R, n_in, S), p (R, n_in)): returns ``(M, m)``
    (R, n_out, S), (R, n_out), by pushing the S directions (linear part) and ``p`` (with bias) through
    :meth:`~pyro_cpa.nn.CPANetwork.affine_step`; ``absolute``: the absolute-value accumulations."""
    R, n_in, S = P.shape
    rows = P.transpose(1, 2).reshape(R * S, n_in)
    M = net.affine_step(l, rows, bias=False, absolute=absolute).reshape(R, S, -1).transpose(1, 2)
    m = net.affine_step(l, p, bias=True, absolute=absolute)
    return M, m


def _propagate(step, activations, patterns, R: int, S: int, dtype, device) -> RegionMaps:
    P = torch.eye(S, dtype=dtype, device=device).expand(R, S, S)
    p = torch.zeros(R, S, dtype=dtype, device=device)
    layer_inputs, pre, slopes, forms, sels = [], [], [], [], []
    L = len(activations)
    for l in range(L + 1):
        layer_inputs.append((P, p))
        M, m = step(l, P, p)
        if l == L:
            return RegionMaps(layer_inputs, pre, slopes, M, m, forms, sels)
        pre.append((M, m))
        act = as_activation(activations[l], M.shape[1])
        forms.append(form_maps(act, M, m))
        P, p, sel = select_maps(act, patterns[l].to(M.device), M, m)
        slopes.append(sel[1])
        sels.append(sel)
    raise AssertionError("unreachable")


def region_maps(net: CPANetwork, patterns: list[torch.Tensor] | tuple[torch.Tensor, ...],
                dtype: torch.dtype | None = None) -> RegionMaps:
    """Compute :class:`RegionMaps` for regions given by their boolean ``patterns`` (one (R, widths[l]) per layer).

    The network's layers are applied implicitly (no dense layer matrices); the first layer's directions
    are the same for every region and are pushed once.
    """
    net.check_eval_mode()
    ref = net._ref()
    dt = dtype if dtype is not None else (ref.dtype if ref.is_floating_point() else torch.get_default_dtype())
    R = patterns[0].shape[0] if len(patterns) else 1

    def step(l, P, p):
        if l == 0:       # h_0 = z on every region: push once
            M, m = push_step(net, 0, P[:1], p[:1])
            return M.expand(P.shape[0], -1, -1), m.expand(P.shape[0], -1)
        return push_step(net, l, P, p)

    return _propagate(step, net.activations, patterns, R, net.in_features, dt, ref.device)


def region_maps_from_affine(maps, activations, patterns) -> RegionMaps:
    """:func:`region_maps` for explicit dense affine maps ``[(W_l, v_l)]`` (differentiable in them).

    ``activations``: the network's activation layers (``net.activations``), or floats α for ReLU-type
    layers (slope α below 0). The patterns are taken as given (frozen): the selections come from
    ``patterns`` whatever the signs of the forms under these maps — the frozen-pattern surrogate of the
    EM M-step.
    """
    W0 = maps[0][0]
    R = patterns[0].shape[0] if len(patterns) else 1

    def step(l, P, p):
        W, v = maps[l]
        return W @ P, p @ W.T + v

    return _propagate(step, activations, patterns, R, W0.shape[1], W0.dtype, W0.device)


def region_hyperplanes(net: CPANetwork, patterns, dtype: torch.dtype | None = None,
                       maps: RegionMaps | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All (possibly redundant) constraints {z : H z <= c} of each region, one per form.

    Form f of layer l contributes ``-(F z + f) <= 0`` if its bit is 1 and ``(F z + f) <= 0`` if not.
    Returns H (R, U, S) and c (R, U) with U = sum of widths, forms ordered layer by layer.
    """
    maps = maps if maps is not None else region_maps(net, patterns, dtype)
    Hs, cs = [], []
    for (F, f), q in zip(maps.forms, patterns):
        sign = 1.0 - 2.0 * q.to(F.dtype).to(F.device)  # -1 where the form is >= 0, +1 where <= 0
        Hs.append(sign.unsqueeze(-1) * F)
        cs.append(-sign * f)
    if not Hs:  # an affine decoder: one region, no constraints
        R, S = maps.A.shape[0], maps.A.shape[-1]
        return maps.A.new_zeros(R, 0, S), maps.A.new_zeros(R, 0)
    return torch.cat(Hs, dim=-2), torch.cat(cs, dim=-1)
