import pickle

import pytest
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_cpa import Abs, NotCPAError, as_cpa_network


def _check_forward(decoder, S):
    net = as_cpa_network(decoder)
    z = torch.randn(50, S)
    torch.testing.assert_close(net(z), decoder(z), rtol=1e-12, atol=1e-12)
    return net


def test_reads_dimensions_and_slopes():
    dec = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 6), nn.LeakyReLU(-0.3), nn.Linear(6, 5), Abs(),
                        nn.Linear(5, 3))
    net = _check_forward(dec, 2)
    assert (net.in_features, net.out_features) == (2, 3)
    assert net.widths == (8, 6, 5)
    assert net.negative_slopes == (0.0, -0.3, -1.0)


def test_nested_identity_dropout_batchnorm_eval():
    dec = nn.Sequential(nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4)), nn.Identity(), nn.LeakyReLU(0.2),
                        nn.Dropout(0.5), nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    dec[0][1].running_mean.normal_()
    dec[0][1].running_var.uniform_(0.5, 2.0)
    dec.eval()
    net = _check_forward(dec, 1)
    assert net.widths == (4, 4)


def test_train_mode_batchnorm_is_rejected():
    dec = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    net = as_cpa_network(dec)
    with pytest.raises(NotCPAError, match="eval"):
        net.affine_maps()


def test_consecutive_activations_compose():
    for acts in [(nn.ReLU(), nn.LeakyReLU(0.3)), (Abs(), nn.ReLU()), (nn.LeakyReLU(0.5), nn.LeakyReLU(0.2)),
                 (nn.LeakyReLU(-0.5), nn.LeakyReLU(0.2))]:
        dec = nn.Sequential(nn.Linear(2, 5), *acts, nn.Linear(5, 3))
        net = _check_forward(dec, 2)
        assert len(net.widths) == 1


def test_activation_first_and_last():
    dec = nn.Sequential(nn.ReLU(), nn.Linear(2, 3), nn.ReLU())
    net = _check_forward(dec, 2)
    assert net.widths == (2, 3)
    assert net.out_features == 3


def test_pyro_module_versions():
    dec = PyroModule[nn.Sequential](PyroModule[nn.Linear](1, 4), nn.ReLU(), PyroModule[nn.Linear](4, 2))
    net = _check_forward(dec, 1)
    assert net.widths == (4,)


@pytest.mark.parametrize("layer", [nn.Tanh(), nn.GELU(), nn.Sigmoid(), nn.Softplus()])
def test_non_cpa_layers_are_named(layer):
    dec = nn.Sequential(nn.Linear(1, 4), layer, nn.Linear(4, 2))
    with pytest.raises(NotCPAError, match=type(layer).__name__):
        as_cpa_network(dec)


def test_custom_forward_is_rejected():
    class MyReLU(nn.ReLU):
        def forward(self, x):
            return torch.relu(x) ** 2

    with pytest.raises(NotCPAError, match="MyReLU"):
        as_cpa_network(nn.Sequential(nn.Linear(1, 3), MyReLU(), nn.Linear(3, 1)))
    with pytest.raises(NotCPAError):
        as_cpa_network(lambda z: z)


def test_size_mismatch_and_no_linear():
    with pytest.raises(NotCPAError, match="expects"):
        as_cpa_network(nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(NotCPAError, match="Linear"):
        as_cpa_network(nn.Sequential(nn.ReLU()))


def test_affine_maps_are_differentiable_and_version_tracks_updates():
    dec = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 2))
    net = as_cpa_network(dec)
    W, v = net.affine_maps()[-1]
    W.sum().backward()
    assert dec[2].weight.grad is not None
    before = net.parameters_version()
    with torch.no_grad():
        dec[0].bias.add_(1.0)
    assert net.parameters_version() != before


def test_network_pickles():
    dec = nn.Sequential(nn.Linear(1, 3), Abs(), nn.Linear(3, 2))
    net = pickle.loads(pickle.dumps(as_cpa_network(dec)))
    z = torch.randn(4, 1)
    torch.testing.assert_close(net(z), net.module(z))


@pytest.mark.parametrize("layer", [nn.Upsample(scale_factor=2, mode="bicubic"), nn.MaxUnpool1d(2), nn.Unfold(2),
                                   nn.Fold(4, 2), nn.FractionalMaxPool2d(2, output_size=2)])
def test_item9_cpa_layers_are_refused_as_not_supported_yet(layer):
    """Unfold, bicubic upsampling, ... are continuous piecewise affine: the refusal must not say otherwise."""
    with pytest.raises(NotCPAError, match="is continuous piecewise affine.*does not support it yet") as info:
        as_cpa_network(nn.Sequential(nn.Linear(1, 4), layer, nn.Linear(4, 2)))
    assert type(layer).__name__ in str(info.value) and "not piecewise affine" not in str(info.value)


@pytest.mark.parametrize("layer", [nn.Tanh(), nn.Sigmoid(), nn.GELU(), nn.Softplus(), nn.SiLU(), nn.ELU(),
                                   nn.LayerNorm(4)])
def test_item9_smooth_layers_are_refused_as_not_piecewise_affine(layer):
    with pytest.raises(NotCPAError, match="is not piecewise affine"):
        as_cpa_network(nn.Sequential(nn.Linear(1, 4), layer, nn.Linear(4, 2)))


def test_item9_discontinuous_unknown_and_overriding_layers_are_refused_truthfully():
    with pytest.raises(NotCPAError, match="Hardshrink.*not continuous"):
        as_cpa_network(nn.Sequential(nn.Linear(1, 4), nn.Hardshrink(), nn.Linear(4, 2)))

    class Custom(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(NotCPAError, match="Custom.*not a layer pyro-cpa knows"):
        as_cpa_network(nn.Sequential(nn.Linear(1, 4), Custom(), nn.Linear(4, 2)))

    class Squared(nn.ReLU):
        def forward(self, x):
            return torch.relu(x) ** 2

    with pytest.raises(NotCPAError, match="Squared.*overrides forward"):
        as_cpa_network(nn.Sequential(nn.Linear(1, 4), Squared(), nn.Linear(4, 2)))


def test_mlp_builds_a_seeded_cpa_decoder():
    from pyro_cpa.nn import mlp

    a, b = mlp([2, 5, 3], torch.nn.ReLU, seed=3), mlp([2, 5, 3], torch.nn.ReLU, seed=3)
    assert [type(m).__name__ for m in a] == ["Linear", "ReLU", "Linear"]
    assert all(torch.equal(p, q) and p.dtype == torch.float64 for p, q in zip(a.parameters(), b.parameters()))
    assert mlp([1, 4, 4, 2], lambda: torch.nn.LeakyReLU(0.1), dtype=torch.float32)[1].negative_slope == 0.1
    assert next(mlp([1, 2], dtype=torch.float32).parameters()).dtype == torch.float32
