"""S = 2 centred moments of far-out polygons (bivariate.centred_moments: the slicing quadrature with the coarser
cuts of DEFAULT_CENTRED_S_CUTS and the node count of their error model) against an independent mpmath reference."""
from __future__ import annotations

import math

import pytest
import torch

from pyro_cpa.integrate import bivariate as bv
from pyro_cpa.integrate.bivariate import polygon_edges, std_moments_2d
from polygon_reference import mp_polygon_moments, polygon

# |Δ mean| and ‖Δ Cov‖ in the metric of the covariance (Δ whitened by Cov^{-1/2}), relative to eps (1 + r²): the
# conditioning of the centred moments w.r.t. the offsets at distance r (bivariate._moments_slices)
TOL_CENTRED = 200.0
EPS = 2.0 ** -52


def centred_error(mean, cov, ref, r):
    """Max of the mean's and the covariance's errors in the metric of the reference covariance, / eps (1 + r²)."""
    mr, cr = ref
    Li = torch.linalg.inv(torch.linalg.cholesky(cr))
    em = (Li @ (mean - mr)).norm()
    ec = torch.linalg.matrix_norm(Li @ (cov - cr) @ Li.T, ord=2)
    return max(em.item(), ec.item()) / (EPS * (1 + r * r))


def _wedge(apex, angle, half, shift=0.0):
    """{u : G u <= d}: the wedge with apex ``apex`` opening away from the origin (axis at ``angle`` + ``shift``,
    half-opening ``half``), unbounded."""
    ax = angle + shift
    G, d = [], []
    for sg in (1.0, -1.0):
        th = ax + sg * (math.pi / 2 + half)              # outward normal of the side at ax ± half
        g = (math.cos(th), math.sin(th))
        G.append(g)
        d.append(g[0] * apex[0] + g[1] * apex[1])
    return torch.tensor(G, dtype=torch.float64), torch.tensor(d, dtype=torch.float64)


def _cases():
    """Far-out polygons like those the benchmark's [2,16,16] partition sends to the centred slicing: a wedge whose
    apex is the nearest point, a wedge with one side nearly along the slicing direction (both the Gaussian and a slice
    bound vary on the same piece), a half-plane cut by a far edge, a bounded quadrilateral 12 units out."""
    out = [_wedge((9.0 * math.cos(0.4), 9.0 * math.sin(0.4)), 0.4, 0.35),
           _wedge((14.0 * math.cos(2.0), 14.0 * math.sin(2.0)), 2.0, 0.6, shift=0.5)]
    G = torch.tensor([[-math.cos(1.0), -math.sin(1.0)], [math.cos(1.0 + 1.4), math.sin(1.0 + 1.4)]], dtype=torch.float64)
    out.append((G, torch.tensor([-11.0, 3.0], dtype=torch.float64)))
    out.append(polygon([(12.0, -1.0), (13.5, -0.5), (13.0, 1.5), (11.8, 0.7)]))
    return out


def _pad(G, d, F=4):
    k = d.shape[-1]
    return (torch.cat([G, G.new_zeros(F - k, 2)]), torch.cat([d, d.new_full((F - k,), float("inf"))]))


def _slices(G, d, s_cuts):
    """The centred slicing of the polygons with these cuts (and their model's node count), + r and the axis w."""
    E = polygon_edges(G, d)
    sel = (E.Gs, E.ds, E.e, E.t_lo, E.t_hi, E.exists)
    levels = tuple(sorted({sg * math.sqrt(2.0 * s) for s in s_cuts for sg in (-1.0, 1.0)}))
    n = bv._centred_num_nodes(tuple(s_cuts), bv.DEFAULT_CENTRED_TOL)
    nd = bv._slice_nodes(*sel, 2, s_cuts, levels)
    return bv._moments_slices(*sel, n, s_cuts, levels), nd["r"], nd["w"]


@pytest.fixture(scope="module")
def references():
    cases = [_pad(G, d) for G, d in _cases()]
    G, d = torch.stack([c[0] for c in cases]), torch.stack([c[1] for c in cases])
    _, r, w = _slices(G, d, bv.DEFAULT_CENTRED_S_CUTS)
    return G, d, r, [mp_polygon_moments(G[k], d[k], w[k].tolist())[1:] for k in range(G.shape[0])]


@pytest.mark.slow
def test_centred_slicing_against_mpmath(references):
    G, d, r, refs = references
    (mean, cov), _, _ = _slices(G, d, bv.DEFAULT_CENTRED_S_CUTS)
    assert bv._centred_num_nodes(bv.DEFAULT_CENTRED_S_CUTS, bv.DEFAULT_CENTRED_TOL) <= bv.DEFAULT_NUM_NODES
    for k, ref in enumerate(refs):
        assert r[k] > 5.0                                # far out: E[uuᵀ] − E[u]E[u]ᵀ would lose r⁴ eps
        assert centred_error(mean[k], cov[k], ref, r[k].item()) <= TOL_CENTRED
    # the test can fail: one decay piece (s_cuts (0, 50): the model asks for 51 nodes) at the default node count
    levels = tuple(sorted({sg * math.sqrt(2.0 * s) for s in (0.0, 50.0) for sg in (-1.0, 1.0)}))
    E = polygon_edges(G, d)
    m2, c2 = bv._moments_slices(E.Gs, E.ds, E.e, E.t_lo, E.t_hi, E.exists, bv.DEFAULT_NUM_NODES, (0.0, 50.0), levels)
    assert max(centred_error(m2[k], c2[k], ref, r[k].item()) for k, ref in enumerate(refs)) > TOL_CENTRED


@pytest.mark.slow
def test_std_moments_2d_takes_the_centred_slicing(references):
    G, d, r, refs = references
    out = std_moments_2d(G, d)
    for k, ref in enumerate(refs):
        lam = torch.linalg.eigvalsh(out.covariance[k])[0]
        assert (1 + out.mean[k].norm() ** 2) / lam > bv.DEFAULT_COV_MAX_AMP     # the centred path is exercised
        assert centred_error(out.mean[k], out.covariance[k], ref, r[k].item()) <= TOL_CENTRED
    one = std_moments_2d(G[1], d[1])                     # batch-shape invariance of the centred path
    assert torch.equal(one.covariance, out.covariance[1]) and torch.equal(one.mean, out.mean[1])


def test_centred_node_count_model():
    # the model asks for more nodes where the gaps are wider, and refuses cuts beyond _CENTRED_MAX_NODES
    n_fine = bv._centred_num_nodes(bv.DEFAULT_S_CUTS, bv.DEFAULT_CENTRED_TOL)
    n_def = bv._centred_num_nodes(bv.DEFAULT_CENTRED_S_CUTS, bv.DEFAULT_CENTRED_TOL)
    assert n_fine < n_def < bv._centred_num_nodes((0.0, 50.0), bv.DEFAULT_CENTRED_TOL)
    with pytest.raises(ValueError, match="s_cuts"):
        bv._centred_num_nodes((0.0, 500.0), bv.DEFAULT_CENTRED_TOL)
