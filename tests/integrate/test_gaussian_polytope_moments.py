"""The public entry point: whitening, validation, pruning mask, back-transform and gradients."""
import math

import pytest
import torch

from pyro_cpa import EmptyPolytopeError, PyroCPAError
from pyro_cpa.integrate import gaussian_polytope_moments, log_mass_upper_bound, require_nonempty, whiten


def _triangle():
    H = torch.tensor([[-1.0, 0.0], [0.0, -1.0], [1.0, 1.0]])
    c = torch.tensor([0.3, 0.2, 1.5])
    return H, c


def test_moments_match_monte_carlo_after_back_transform():
    H, c = _triangle()
    loc = torch.tensor([0.4, -0.1])
    A = torch.tensor([[0.8, 0.0], [0.5, 0.6]])
    m = gaussian_polytope_moments(loc, A, H, c)
    n = 2_000_000
    z = loc + torch.randn(n, 2) @ A.T
    inside = (z @ H.T <= c).all(-1)
    zi = z[inside]
    p = inside.double().mean()
    assert abs(m.log_mass.exp() - p) < 4 * math.sqrt(p * (1 - p) / n)
    se = zi.std(0) / math.sqrt(len(zi))
    assert ((m.mean - zi.mean(0)).abs() < 5 * se).all()
    torch.testing.assert_close(m.covariance, torch.cov(zi.T), atol=3e-3, rtol=0)
    assert m.log_mass_stderr.item() == 0.0


def test_upper_bound_and_active_mask():
    H, c = _triangle()
    locs = torch.tensor([[0.4, -0.1], [8.0, 8.0], [-0.5, 0.0]])
    L = torch.eye(2).expand(3, 2, 2)
    G, d = whiten(locs, L, H, c)
    full = gaussian_polytope_moments(locs, L, H, c)
    assert (full.log_mass <= log_mass_upper_bound(G, d) + 1e-12).all()
    active = torch.tensor([True, False, True])
    part = gaussian_polytope_moments(locs, L, H, c, active=active)
    torch.testing.assert_close(part.log_mass[active], full.log_mass[active])
    torch.testing.assert_close(part.mean[active], full.mean[active])
    assert part.log_mass[1] == -math.inf


def test_no_constraint_is_the_whole_space():
    m = gaussian_polytope_moments(torch.zeros(3), torch.eye(3), torch.zeros(0, 3), torch.zeros(0))
    assert m.log_mass.item() == 0.0
    torch.testing.assert_close(m.covariance, torch.eye(3))


@pytest.mark.parametrize("S", [1, 2])
def test_gradcheck_wrt_loc_scale_H_and_c(S):
    if S == 1:
        H = torch.tensor([[1.0], [-1.0]])
        c = torch.tensor([0.7, 0.4])
    else:
        H, c = _triangle()
    loc = torch.randn(S) * 0.3
    L = torch.eye(S) * 0.9 + torch.tril(torch.full((S, S), 0.1), -1)

    def f(loc, L, H, c):
        m = gaussian_polytope_moments(loc, torch.tril(L), H, c)
        return m.log_mass, m.mean, m.covariance

    args = [t.clone().requires_grad_(True) for t in (loc, L, H, c)]
    assert torch.autograd.gradcheck(f, args, atol=1e-6, rtol=1e-5)


def test_bad_input_raises_clear_errors():
    H, c = _triangle()
    with pytest.raises(PyroCPAError, match="NaN"):
        gaussian_polytope_moments(torch.tensor([float("nan"), 0.0]), torch.eye(2), H, c)
    with pytest.raises(PyroCPAError, match="positive"):
        gaussian_polytope_moments(torch.zeros(2), -torch.eye(2), H, c)
    with pytest.raises(PyroCPAError, match="shape"):
        gaussian_polytope_moments(torch.zeros(2), torch.eye(3), H, c)
    with pytest.raises(PyroCPAError, match="rows"):
        gaussian_polytope_moments(torch.zeros(2), torch.eye(2), H, c[:2])
    with pytest.raises(EmptyPolytopeError):
        gaussian_polytope_moments(torch.zeros(2), torch.eye(2), torch.zeros(1, 2), torch.tensor([-1.0]))
    empty = gaussian_polytope_moments(torch.zeros(1), torch.eye(1), torch.tensor([[1.0], [-1.0]]),
                                      torch.tensor([-1.0, -1.0]))  # z <= -1 and z >= 1
    assert empty.log_mass.item() == -math.inf
    assert torch.isfinite(empty.mean).all()
    with pytest.raises(EmptyPolytopeError):
        require_nonempty(empty.log_mass)
