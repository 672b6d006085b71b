"""The LinearRegions API on enumerated partitions: sizes, affine maps, H-representations, locate."""
import pytest
import torch
from torch import nn

from pyro_cpa import Abs
from pyro_cpa.errors import PyroCPAError, RegionBudgetExceeded
from pyro_cpa.geometry import LinearRegions, linear_regions


def decoder(S, widths=(8, 8), act=nn.ReLU, D=3, seed=0):
    torch.manual_seed(seed)
    layers, a = [], S
    for w in widths:
        layers += [nn.Linear(a, w), act()]
        a = w
    layers.append(nn.Linear(a, D))
    return nn.Sequential(*layers)


CASES = [(1, (16, 16), nn.ReLU), (2, (10, 10), lambda: nn.LeakyReLU(-0.3)), (3, (6, 6), Abs)]


@pytest.fixture(params=CASES, ids=["S1", "S2", "S3"])
def regions(request):
    S, widths, act = request.param
    return linear_regions(decoder(S, widths, act))


def test_sizes(regions):
    R, S = len(regions), regions.latent_dim
    assert isinstance(regions, LinearRegions) and R > 1
    assert regions.data_dim == 3
    assert regions.interior_points.shape == (R, S)
    assert regions.facets.dtype == torch.long and regions.facets.shape[0] == R
    assert [p.shape for p in regions.patterns] == [(R, w) for w in regions.network.widths]
    assert all(p.dtype == torch.bool for p in regions.patterns)
    f = regions.facets
    assert ((f >= -1) & (f < sum(regions.network.widths))).all()
    # padding only at the end of each row, no facet listed twice
    assert (regions.facet_mask.long().diff(dim=-1) <= 0).all()
    for row in f:
        real = row[row >= 0]
        assert len(real.unique()) == len(real)
    assert "LinearRegions" in repr(regions) and regions.method in ("breakpoints", "polygons", "lp")


def test_affine_maps_agree_with_network(regions):
    S = regions.latent_dim
    A, b = regions.A, regions.b
    assert A.shape == (len(regions), 3, S) and b.shape == (len(regions), 3)
    z = 4 * torch.randn(500, S)
    idx = regions.locate(z)
    out = regions.network(z)
    torch.testing.assert_close(torch.einsum("nds,ns->nd", A[idx], z) + b[idx], out, rtol=1e-10, atol=1e-10)
    # the Jacobian of the decoder is A on each region (interior points: away from the kinks)
    for r in range(0, len(regions), max(1, len(regions) // 10)):
        x = regions.interior_points[r]
        J = torch.autograd.functional.jacobian(regions.network, x)
        torch.testing.assert_close(J, A[r].detach(), rtol=1e-10, atol=1e-10)


def test_locate(regions):
    S = regions.latent_dim
    z = 3 * torch.randn(7, 11, S)
    idx = regions.locate(z)
    assert idx.shape == (7, 11)
    codes = torch.cat(regions.network.activation_pattern(z.reshape(-1, S)), -1)
    assert torch.equal(regions._codes[idx.reshape(-1)], codes)
    assert torch.equal(regions.locate(regions.interior_points), torch.arange(len(regions)))
    with pytest.raises(ValueError, match="shape"):
        regions.locate(torch.zeros(4, S + 1))
    with pytest.raises(ValueError, match="NaN"):
        regions.locate(torch.full((2, S), float("nan")))


def test_h_representation(regions):
    H, c = regions.H, regions.c
    R, F = regions.facets.shape
    S = regions.latent_dim
    assert H.shape == (R, F, S) and c.shape == (R, F)
    mask = regions.facet_mask
    assert (H[~mask] == 0).all() and torch.isinf(c[~mask]).all()
    assert (H[mask].norm(dim=-1) > 0).all()
    # interior points strictly inside, located points inside their region
    x = regions.interior_points
    assert (torch.einsum("rfs,rs->rf", H, x) < c).all()
    z = 3 * torch.randn(400, S)
    idx = regions.locate(z)
    slack = c[idx] - torch.einsum("nfs,ns->nf", H[idx], z)
    assert (slack > -1e-9).all()
    # every point belongs to exactly one region of the H-representation (up to boundaries)
    inside = (torch.einsum("rfs,ns->nrf", H, z) < c[None]).all(-1)
    assert (inside.sum(-1) <= 1).all()


def test_outer_intervals_have_one_facet():
    regions = linear_regions(decoder(1, (16, 16)))
    order = torch.argsort(regions.interior_points[:, 0])
    nf = regions.facet_mask.sum(-1)[order]
    assert nf[0] == 1 and nf[-1] == 1 and (nf[1:-1] == 2).all()
    H = regions.H
    assert H[order[0], 0, 0] > 0 and H[order[-1], 0, 0] < 0     # (-inf, β_1] and [β_K, +inf)


def test_maps_are_differentiable():
    dec = decoder(2, (6, 6))
    regions = linear_regions(dec)
    (regions.A.square().sum() + regions.b.sum() + regions.H[regions.facet_mask].sum()).backward()
    assert dec[0].weight.grad is not None and dec[0].weight.grad.abs().sum() > 0
    assert not regions.is_stale()
    with torch.no_grad():
        dec[0].weight.add_(0.01)
    assert regions.is_stale()


def test_budget_error():
    dec = decoder(2, (16, 16))
    with pytest.raises(RegionBudgetExceeded) as info:
        linear_regions(dec, max_regions=10)
    err = info.value
    assert isinstance(err, PyroCPAError) and isinstance(err, RuntimeError)
    assert err.regions_found > 10 and err.layers_done in (0, 1, 2)
    assert "max_regions=10" in str(err)
    with pytest.raises(ValueError, match="positive"):
        linear_regions(dec, max_regions=0)


def test_single_linear_decoder():
    regions = linear_regions(nn.Sequential(nn.Linear(2, 4)))
    assert len(regions) == 1 and regions.facets.shape == (1, 0)
    z = torch.randn(10, 2)
    assert (regions.locate(z) == 0).all()
    torch.testing.assert_close(regions.A[0], regions.network.module[0].weight)


# ----------------------------------------------------------------------------------------- cost (issue 11 item 7)
def test_budget_refused_promptly_inside_a_layer():
    """S=2: the budget is checked after every unit, not only between layers (or at 4x the budget)."""
    dec = decoder(2, (48, 48), nn.ReLU, D=2, seed=3)
    full = len(linear_regions(dec, progress=False))
    budget = full // 3
    with pytest.raises(RegionBudgetExceeded, match="narrow the network") as info:
        linear_regions(dec, max_regions=budget, progress=False)
    assert budget < info.value.regions_found < 1.5 * budget
    assert "fewer latent dimensions" in str(info.value) and "estimate_cost" in str(info.value)


def test_estimate_cost_exact_and_estimated():
    from pyro_cpa.geometry import BYTES_PER_PAIR, BYTES_PER_PAIR_AUTOGRAD, estimate_cost

    dec = decoder(2, (24, 24), nn.LeakyReLU, D=2, seed=4)
    R = len(linear_regions(dec, progress=False))
    exact = estimate_cost(dec, num_data=50)
    assert exact.exact and exact.regions == R and exact.pairs == 50 * R
    assert exact.log_prob_bytes == 50 * R * BYTES_PER_PAIR
    assert exact.autograd_bytes == 50 * R * BYTES_PER_PAIR_AUTOGRAD
    est = estimate_cost(dec, num_data=50, exact_budget=R // 4)
    assert not est.exact and 0.5 * R < est.regions < 2.0 * R          # an estimate, not a bound
    assert "estimate" in str(est) and "pairs" in str(est)
    with pytest.raises(ValueError, match="num_data"):
        estimate_cost(dec, num_data=-1)


def test_progress_bar_quiet_on_short_enumerations(capsys):
    linear_regions(decoder(2, (8, 8)), progress=True)
    linear_regions(decoder(1, (8, 8)), progress=False)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""
