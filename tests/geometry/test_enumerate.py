"""Exactness of the region enumerators (breakpoints S=1, polygons S=2, lp any S).

The checks are designed to be exact rather than statistical:

* every region's interior point has exactly the region's activation pattern and lies strictly
  inside all of the region's per-unit constraints;
* the activation pattern of every grid point is one of the enumerated patterns, and the grid plus
  the interior points show exactly R distinct patterns;
* the regions tile the space: for S=1 the intervals are contiguous from -inf to +inf, for S>=2 the
  areas/volumes of the regions clipped to a box add up to the box's (a missed cell leaves a hole,
  a duplicated one overlaps);
* the facets are non-redundant (LP: dropping a facet enlarges the region) and sufficient (points
  satisfying the facet constraints have the region's pattern).
"""
import numpy as np
import pytest
import torch
from scipy.spatial import ConvexHull
from torch import nn

from pyro_cpa import Abs
from pyro_cpa.errors import RegionBudgetExceeded
from pyro_cpa.geometry import linear_regions, region_hyperplanes
from pyro_cpa.geometry.enumerate import enumerate_regions
from pyro_cpa.geometry.polytope import chebyshev_center, facet_rows, linprog_robust, vrep
from pyro_cpa.nn import as_cpa_network

ACTS = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.2), "leakyneg": lambda: nn.LeakyReLU(-0.5), "abs": Abs}


def mlp(sizes, act="relu", seed=0, out=2):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), ACTS[act]()]
    layers.append(nn.Linear(sizes[-1], out))
    return nn.Sequential(*layers)


def codes_of(regions, z):
    return torch.cat(regions.network.activation_pattern(z), -1)


def check_interior_points(regions):
    z = regions.interior_points
    assert z.shape == (len(regions), regions.latent_dim)
    assert torch.isfinite(z).all()
    assert torch.equal(codes_of(regions, z), regions._codes)
    H, c = (t.detach() for t in region_hyperplanes(regions.network, regions.patterns))
    slack = c - torch.einsum("rus,rs->ru", H, z)
    assert (slack > 0).all(), slack.min()
    assert len(torch.unique(regions._codes, dim=0)) == len(regions)   # each region listed once
    assert torch.equal(regions.locate(z), torch.arange(len(regions)))


def check_grid(regions, grid):
    codes = codes_of(regions, grid)
    known = torch.unique(regions._codes, dim=0)
    allc = torch.unique(torch.cat([codes, regions._codes]), dim=0)
    assert len(allc) == len(known) == len(regions)   # every grid pattern is an enumerated one


def check_facets_sufficient(regions, n=8):
    """Points satisfying the facet constraints of a region have the region's pattern."""
    H, c = (t.detach() for t in regions.polytopes(torch.float64))
    R, S = regions.interior_points.shape
    gen = torch.Generator().manual_seed(1)
    x = regions.interior_points
    scales = torch.tensor([1e-3, 1e-2, 1e-1, 1.0, 10.0]).repeat_interleave(n)     # multi-scale
    z = x[:, None] + scales[None, :, None] * torch.randn(R, len(scales), S, generator=gen) * \
        (1 + x.norm(dim=-1))[:, None, None]
    inside = (torch.einsum("rfs,rns->rnf", H, z) < c[:, None]).all(-1)
    assert inside.sum() > 5 * R   # the test samples well beyond the interior points
    codes = codes_of(regions, z[inside])
    ridx = torch.arange(R)[:, None].expand(R, len(scales))[inside]
    assert torch.equal(codes, regions._codes[ridx])


def check_facets_nonredundant(regions, max_regions=40):
    """Dropping any facet constraint lets the LP go beyond it (bounded LP: capped at c_i + 1)."""
    H, c = (t.detach() for t in regions.polytopes(torch.float64))
    mask = regions.facet_mask
    rng = np.random.default_rng(0)
    sel = rng.choice(len(regions), size=min(max_regions, len(regions)), replace=False)
    for r in sel:
        Hr, cr = H[r][mask[r]].numpy(), c[r][mask[r]].numpy()
        nrm = np.linalg.norm(Hr, axis=1)
        Hr, cr = Hr / nrm[:, None], cr / nrm          # normalised rows: HiGHS is happier
        for i in range(len(cr)):
            others = np.delete(np.arange(len(cr)), i)
            A = np.concatenate([Hr[others], Hr[i:i + 1]])
            b = np.concatenate([cr[others], [cr[i] + 1.0]])
            res = linprog_robust(-Hr[i], A, b, [(None, None)] * Hr.shape[1])
            assert res.status == 0
            assert -res.fun > cr[i] + 1e-7, (r, i)


def box_measure(H, c, lo, hi):
    """Area/volume of {H z <= c} within the box [lo, hi]^S."""
    S = H.shape[1]
    Hb = np.concatenate([H, np.eye(S), -np.eye(S)])
    cb = np.concatenate([c, np.full(S, hi), np.full(S, -lo)])
    nrm = np.linalg.norm(Hb, axis=1)
    v = vrep(Hb / nrm[:, None], cb / nrm)
    if v is None or not v.is_full_dimensional():
        return 0.0
    return ConvexHull(v.vertices).volume


def check_tiling(regions, lo=-6.0, hi=6.0):
    H, c = (t.detach() for t in regions.polytopes(torch.float64))
    mask = regions.facet_mask
    S = regions.latent_dim
    if S == 1:
        # intervals [l, u] contiguous from -inf to +inf
        h, cc = H[..., 0], c
        lower = torch.where(mask & (h < 0), cc / h, torch.full_like(cc, -np.inf)).max(-1).values
        upper = torch.where(mask & (h > 0), cc / h, torch.full_like(cc, np.inf)).min(-1).values
        order = torch.argsort(lower)
        lower, upper = lower[order], upper[order]
        assert lower[0] == -np.inf and upper[-1] == np.inf
        torch.testing.assert_close(lower[1:], upper[:-1], rtol=1e-9, atol=1e-9)
        assert (upper > lower).all()
        return
    total = sum(box_measure(H[r][mask[r]].numpy(), c[r][mask[r]].numpy(), lo, hi) for r in range(len(regions)))
    assert total == pytest.approx((hi - lo) ** S, rel=1e-8)


def check_all(regions, grid, tiling=True, lp=True):
    check_interior_points(regions)
    check_grid(regions, grid)
    check_facets_sufficient(regions)
    if lp:
        check_facets_nonredundant(regions)
    if tiling:
        check_tiling(regions)


def grid_1d(regions, n=4001):
    x = regions.interior_points[:, 0]
    lo, hi = float(x.min()) - 5, float(x.max()) + 5
    return torch.cat([torch.linspace(lo, hi, n), torch.linspace(-3, 3, n)])[:, None]


def grid_nd(S, n, lim=6.0):
    axes = [torch.linspace(-lim, lim, n)] * S
    g = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, S)
    return torch.cat([g, 20 * torch.randn(4000, S)])


# ----------------------------------------------------------------------------------------- S = 1
SLOW = pytest.mark.slow


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("sizes", [[1, 8], [1, 16, 16], [1, 32, 32, 32], [1, 128, 128, 128, 128]])
def test_breakpoints_exact(sizes, act):
    regions = linear_regions(mlp(sizes, act))
    assert regions.method == "breakpoints"
    check_all(regions, grid_1d(regions), lp=sizes[-1] <= 16)
    # every interval has its two end points as facets, the outer ones a single facet
    nf = regions.facet_mask.sum(-1)
    x = regions.interior_points[:, 0]
    order = torch.argsort(x)
    assert nf[order[0]] == 1 and nf[order[-1]] == 1
    assert (nf[order[1:-1]] == 2).all()


def test_breakpoints_match_lp():
    dec = mlp([1, 12, 12], "leaky", seed=3)
    a = linear_regions(dec, method="breakpoints")
    b = linear_regions(dec, method="lp")
    assert len(a) == len(b)
    ia = torch.argsort(a.interior_points[:, 0])
    ib = torch.argsort(b.interior_points[:, 0])
    assert torch.equal(a._codes[ia], b._codes[ib])
    assert torch.equal(a.facets[ia].sort(-1).values, b.facets[ib].sort(-1).values)


# ----------------------------------------------------------------------------------------- S = 2
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("sizes", [[2, 6], [2, 12, 12], [2, 32, 32, 32]])
def test_polygons_exact(sizes, act):
    regions = linear_regions(mlp(sizes, act, seed=1))
    assert regions.method == "polygons"
    big = len(sizes) > 3
    check_all(regions, grid_nd(2, 201), tiling=not big, lp=not big)


@SLOW
def test_polygons_exact_large():
    regions = linear_regions(mlp([2, 32, 32, 32], "leaky", seed=1))
    check_all(regions, grid_nd(2, 501))


def _match(a, b):
    """Same patterns and, per pattern, the same facet sets."""
    ka = {tuple(c.tolist()): set(f[f >= 0].tolist()) for c, f in zip(a._codes, a.facets)}
    kb = {tuple(c.tolist()): set(f[f >= 0].tolist()) for c, f in zip(b._codes, b.facets)}
    assert ka == kb


@pytest.mark.parametrize("act", ["relu", "abs"])
def test_polygons_match_lp(act):
    dec = mlp([2, 10, 10], act, seed=4)
    _match(linear_regions(dec, method="polygons"), linear_regions(dec, method="lp"))


def test_polygons_unbounded_central_arrangement():
    """Lines through the origin (two of them along the chart walls): all cells are cones."""
    lin = nn.Linear(2, 5)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -2.0], [-3.0, 1.0]]))
        lin.bias.zero_()
    dec = nn.Sequential(lin, nn.ReLU(), nn.Linear(5, 1))
    for method in ("polygons", "lp"):
        regions = linear_regions(dec, method=method)
        assert len(regions) == 10
        assert (regions.facet_mask.sum(-1) == 2).all()
        check_all(regions, grid_nd(2, 101))
        # every region is a cone: a nonzero recession cone (rays in its V-representation)
        H, c = (t.detach() for t in regions.polytopes())
        for r in range(len(regions)):
            m = regions.facet_mask[r]
            v = vrep(H[r][m].numpy(), c[r][m].numpy())
            assert len(v.rays) == 2 and len(v.lines) == 0
    _match(linear_regions(dec, method="polygons"), linear_regions(dec, method="lp"))


def test_polygons_near_origin_unbounded():
    torch.manual_seed(5)
    dec = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        dec[0].bias.mul_(1e-3)
    regions = linear_regions(dec)
    check_all(regions, grid_nd(2, 201, lim=0.01), tiling=False)
    check_tiling(regions)
    H, c = (t.detach() for t in regions.polytopes())
    unbounded = 0
    for r in range(len(regions)):
        # recession cone {d : H d <= 0} is nonzero iff max sum(-H d) ... use the V-representation
        m = regions.facet_mask[r]
        v = vrep(H[r][m].numpy(), c[r][m].numpy())
        unbounded += not v.bounded
    assert unbounded >= 2 * 8


def test_parallel_strips():
    """Parallel lines only (no vertex anywhere) and a strip far from the origin."""
    lin = nn.Linear(2, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0]]))
        lin.bias.copy_(torch.tensor([-1000.0, -1001.0, 4.0]))
    dec = nn.Sequential(lin, nn.ReLU(), nn.Linear(3, 1))
    for method in ("polygons", "lp"):
        regions = linear_regions(dec, method=method)
        assert len(regions) == 4
        check_interior_points(regions)
        assert sorted(regions.facet_mask.sum(-1).tolist()) == [1, 1, 2, 2]


# ----------------------------------------------------------------------------------------- S >= 3
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("sizes", [[3, 8], [3, 6, 6]])
def test_lp_exact(sizes, act):
    regions = linear_regions(mlp(sizes, act, seed=2))
    assert regions.method == "lp"
    check_all(regions, grid_nd(3, 31))


def test_lp_exact_width_16():
    regions = linear_regions(mlp([3, 16, 16], "relu", seed=2))
    check_all(regions, grid_nd(3, 31), tiling=False)


@SLOW
@pytest.mark.parametrize("act", ["abs", "leakyneg"])
def test_lp_exact_width_16_tiling(act):
    regions = linear_regions(mlp([3, 16, 16], act, seed=2))
    check_all(regions, grid_nd(3, 41))


def test_lp_four_dims():
    regions = linear_regions(mlp([4, 8, 6], "leaky", seed=6))
    check_all(regions, grid_nd(4, 13), tiling=False)


# ----------------------------------------------------------------------------------------- misc
@pytest.mark.parametrize("S", [1, 2, 3])
def test_single_linear_is_one_region(S):
    regions = linear_regions(nn.Sequential(nn.Linear(S, 3)))
    assert len(regions) == 1
    assert regions.facets.shape == (1, 0)
    assert regions.patterns == []
    assert regions.interior_points.shape == (1, S)
    z = torch.randn(5, S)
    torch.testing.assert_close(z @ regions.A[0].T + regions.b[0], regions.network(z))


@pytest.mark.parametrize("S", [1, 2, 3])
def test_nested_batchnorm_dropout(S):
    torch.manual_seed(7)
    dec = nn.Sequential(nn.Sequential(nn.Linear(S, 6), nn.BatchNorm1d(6)), nn.Dropout(0.3), nn.LeakyReLU(0.1),
                        nn.Sequential(nn.Linear(6, 6), nn.Identity(), Abs()), nn.Linear(6, 2))
    dec[0][1].running_mean.normal_()
    dec[0][1].running_var.uniform_(0.5, 2.0)
    dec.eval()
    regions = linear_regions(dec)
    grid = grid_1d(regions) if S == 1 else grid_nd(S, 201 if S == 2 else 31)
    check_all(regions, grid)


@pytest.mark.parametrize("S,method", [(1, "breakpoints"), (2, "polygons"), (3, "lp"), (2, "lp")])
def test_budget_exceeded(S, method):
    dec = mlp([S, 16, 16] if method != "lp" else [S, 6, 6], seed=8)
    full = len(linear_regions(dec, method=method))
    with pytest.raises(RegionBudgetExceeded, match="max_regions=5") as info:
        linear_regions(dec, max_regions=5, method=method)
    err = info.value
    assert err.regions_found > 5
    assert err.layers_done in (0, 1, 2)
    assert f"S={S}" in str(err) and "raise max_regions" in str(err) and "narrow the network" in str(err)
    assert len(linear_regions(dec, max_regions=full, method=method)) == full
    with pytest.raises(RegionBudgetExceeded):
        linear_regions(dec, max_regions=full - 1, method=method)


def test_method_validation():
    net = as_cpa_network(mlp([2, 4]))
    with pytest.raises(ValueError, match="unknown"):
        enumerate_regions(net, method="magic")
    with pytest.raises(ValueError, match="S=1"):
        enumerate_regions(net, method="breakpoints")
    with pytest.raises(ValueError, match="S=2"):
        enumerate_regions(as_cpa_network(mlp([3, 4])), method="polygons")


def test_tolerance_merges_slivers():
    """Two lines 1e-15 apart (a few ulps) are one breakpoint/line at the default tolerance (a few-ulp
    nudge of the weights could close the strip), two with tol=0; 1e-12 apart they are resolvable and
    always kept (thin cells can carry steep slopes: see tests/geometry/test_perturbation.py)."""
    for S in (1, 2):
        for gap, default_count in [(1e-15, 2), (1e-12, 3)]:
            lin = nn.Linear(S, 2)
            with torch.no_grad():
                lin.weight.copy_(torch.ones(2, S))
                lin.bias.copy_(torch.tensor([0.5, 0.5 + gap]))
            net = as_cpa_network(nn.Sequential(lin, nn.ReLU(), nn.Linear(2, 1)))
            enum, _ = enumerate_regions(net, progress=False)
            assert enum.interior_points.shape[0] == default_count, (S, gap)
            enum, _ = enumerate_regions(net, tol=0.0, progress=False)
            assert enum.interior_points.shape[0] == 3, (S, gap)


def test_tolerance_merges_slivers_lp():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, -1.0], [1.0, 2.0, -1.0]]))
        lin.bias.copy_(torch.tensor([0.5, 0.5 + 1e-12]))
    net = as_cpa_network(nn.Sequential(lin, nn.ReLU(), nn.Linear(2, 1)))
    enum, used = enumerate_regions(net)
    assert used == "lp" and enum.interior_points.shape[0] == 2
    assert (enum.facets >= 0).sum() == 2       # one facet each: the duplicated hyperplane listed once


def test_non_finite_weights_rejected():
    dec = mlp([2, 4])
    with torch.no_grad():
        dec[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        linear_regions(dec)


def test_polytope_helpers():
    H = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [1.0, 1.0], [1.0, 0.0]])
    c = np.array([1.0, 1.0, 1.0, 1.0, 5.0, 1.0])
    v = vrep(H, c)
    assert v.bounded and len(v.vertices) == 4 and v.is_full_dimensional()
    assert sorted(facet_rows(v.incidence).tolist()) == [0, 1, 2, 3]     # row 5 duplicates row 0
    x, r = chebyshev_center(H, c)
    assert r == pytest.approx(1.0) and np.allclose(x, 0.0, atol=1e-9)
    x, r = chebyshev_center(H[[0]], c[[0]], max_radius=2.0)          # unbounded: capped radius
    assert r == pytest.approx(2.0)
    assert vrep(np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([-1.0, -1.0])) is None
