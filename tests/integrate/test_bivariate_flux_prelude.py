"""The flux formula's half-edge prelude (issue 12): the interleaved (edge, half) pairs by
bivariate._pairs_of (the real view of torch.complex, the same values as a last-dim torch.stack), and edges whose
line passes through the origin (h = 0: no half-edge of theirs is integrated) against mpmath references."""
import mpmath as mp
import pytest
import torch

from pyro_cpa.integrate.bivariate import _pairs_of, log_mass_2d, std_moments_2d


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pairs_of_equals_a_last_dim_stack(dtype):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1001, generator=g, dtype=torch.float64).to(dtype)
    assert torch.equal(_pairs_of(a, b), torch.stack([a, b], -1))
    wide = torch.randn(1001, 3, generator=g, dtype=torch.float64).to(dtype)
    assert torch.equal(_pairs_of(wide[:, 0], wide[:, 2]), torch.stack([wide[:, 0], wide[:, 2]], -1))   # strided
    empty = a[:0]
    assert _pairs_of(empty, empty).shape == (0, 2)


def test_pairs_of_falls_back_to_stack_under_autograd_and_for_other_dtypes():
    a = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([3.0, 4.0], dtype=torch.float64)
    out = _pairs_of(a, b)
    (g,) = torch.autograd.grad(out[:, 0].sum() + 2 * out[:, 1].sum(), a)
    assert torch.equal(g, torch.ones(2, dtype=torch.float64))
    ints = torch.arange(3)
    assert torch.equal(_pairs_of(ints, ints), torch.stack([ints, ints], -1))


def _box(x0, x1, y0, y1):
    """{x0 <= u1 <= x1, y0 <= u2 <= y1}: normals and offsets, and log P by mpmath (a product of 1-D masses)."""
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    d = torch.tensor([x1, -x0, y1, -y0], dtype=torch.float64)
    with mp.workdps(40):
        ref = mp.log((mp.ncdf(x1) - mp.ncdf(x0)) * (mp.ncdf(y1) - mp.ncdf(y0)))
    return G, d, float(ref)


@pytest.mark.parametrize("box", [(0.0, 1.0, 2.0, 3.0), (0.0, 0.5, -4.0, -3.0), (-1.0, 0.0, 1.5, 2.5),
                                 (0.0, 2.0, -1.0, 1.0), (-0.5, 0.5, 0.0, 1.0)])
def test_edges_on_lines_through_the_origin(box):
    """A box with a side on a line through the origin (d = 0): off the origin's segment (the flux formula, that
    edge's half-edges dropped) and through the origin (the boundary case, left to the fallback)."""
    G, d, ref = _box(*box)
    lp = log_mass_2d(G, d)
    assert lp.item() == pytest.approx(ref, rel=1e-13, abs=1e-13)
    assert std_moments_2d(G, d).log_mass.item() == pytest.approx(ref, rel=1e-13, abs=1e-13)
