"""Per-region affine maps of a CPA network, computed from activation patterns.

On the region ω with activation pattern q (q_l[i] = 1 if unit i of activation layer l has a
non-negative pre-activation), every intermediate quantity is affine in z:

    h_0(z) = z,   t_l(z) = W_l h_l(z) + v_l = M_l z + m_l,
    h_{l+1}(z) = D_l t_l(z),   D_l = diag(q_l + α_l (1 − q_l)),
    g(z) = t_L(z) = A_ω z + b_ω.

All maps are batched over regions and differentiable with respect to the network's weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nn.network import CPANetwork


@dataclass
class RegionMaps:
    """Affine maps of every region (R regions, S latent dims).

    Attributes:
        layer_inputs: per affine step l, ``(P_l, p_l)`` with h_l(z) = P_l z + p_l; shapes (R, n_in, S), (R, n_in).
        preactivations: per activation layer l, ``(M_l, m_l)``: t_l(z) = M_l z + m_l; (R, n_l, S), (R, n_l).
        slopes: per activation layer l, the diagonal of D_l, shape (R, n_l).
        A: (R, D, S) and b: (R, D), the output map g(z) = A z + b on each region.
    """

    layer_inputs: list[tuple[torch.Tensor, torch.Tensor]]
    preactivations: list[tuple[torch.Tensor, torch.Tensor]]
    slopes: list[torch.Tensor]
    A: torch.Tensor
    b: torch.Tensor


def region_maps(net: CPANetwork, patterns: list[torch.Tensor] | tuple[torch.Tensor, ...],
                dtype: torch.dtype | None = None) -> RegionMaps:
    """Compute :class:`RegionMaps` for regions given by their boolean ``patterns`` (one (R, n_l) per layer)."""
    return region_maps_from_affine(net.affine_maps(dtype=dtype), net.negative_slopes, patterns)


def region_maps_from_affine(maps, negative_slopes, patterns) -> RegionMaps:
    """:func:`region_maps` for explicit affine maps ``[(W_l, v_l)]`` (differentiable in them).

    The activation patterns are taken as given (frozen): D_l = diag(q_l + α_l (1 − q_l)) comes from
    ``patterns`` whatever the sign of the pre-activations under these maps — the frozen-pattern
    surrogate of the EM M-step.
    """
    W0 = maps[0][0]
    R = patterns[0].shape[0] if len(patterns) else 1
    S = W0.shape[1]
    P = torch.eye(S, dtype=W0.dtype, device=W0.device).expand(R, S, S)
    p = W0.new_zeros(R, S)
    layer_inputs, pre, slopes = [], [], []
    for l, (W, v) in enumerate(maps):
        layer_inputs.append((P, p))
        M = W @ P
        m = p @ W.T + v
        if l == len(maps) - 1:
            return RegionMaps(layer_inputs, pre, slopes, M, m)
        pre.append((M, m))
        q = patterns[l].to(device=W.device, dtype=W.dtype)
        d = q + negative_slopes[l] * (1.0 - q)
        slopes.append(d)
        P = d.unsqueeze(-1) * M
        p = d * m
    raise AssertionError("unreachable")


def region_hyperplanes(net: CPANetwork, patterns, dtype: torch.dtype | None = None,
                       maps: RegionMaps | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All (possibly redundant) constraints {z : H z <= c} of each region, one per unit.

    Unit i of layer l contributes ``-(M z + m)_i <= 0`` if active (q=1) and ``(M z + m)_i <= 0`` if not.
    Returns H (R, U, S) and c (R, U) with U = sum of widths, units ordered layer by layer.
    """
    maps = maps if maps is not None else region_maps(net, patterns, dtype)
    Hs, cs = [], []
    for (M, m), q in zip(maps.preactivations, patterns):
        sign = 1.0 - 2.0 * q.to(M.dtype)  # -1 active, +1 inactive
        Hs.append(sign.unsqueeze(-1) * M)
        cs.append(-sign * m)
    if not Hs:  # an affine decoder: one region, no constraints
        R, S = maps.A.shape[0], maps.A.shape[-1]
        return maps.A.new_zeros(R, 0, S), maps.A.new_zeros(R, 0)
    return torch.cat(Hs, dim=-2), torch.cat(cs, dim=-1)
