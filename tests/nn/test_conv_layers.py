"""Issue 14: convolutions, pools, pads, upsampling and multi-kink activations in the canonical view.

Independent reference: each decoder's own ``forward``. The canonical view (implicit affine steps,
forms and selections) must reproduce it, and so must the per-region affine maps A z + b built by
pushing the basis directions through the layers with each point's pattern.
"""
import pytest
import torch
from torch import nn

from pyro_cpa import NotCPAError, as_cpa_network
from pyro_cpa.geometry.maps import region_hyperplanes, region_maps, region_maps_from_affine
from pyro_cpa.nn import Clamp, Elementwise, MaxPool

#: float64 rounding of a forward pass through a few layers of O(1) weights.
FWD_TOL = 1e-12


def _randomise(dec, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dec.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for m in dec.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64) + 0.5)
    return dec.eval()


def _check(dec, S, seed=0, n=64):
    net = as_cpa_network(dec)
    gen = torch.Generator().manual_seed(seed + 1)
    z = 2.0 * torch.randn(n, S, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ref = dec(z).reshape(n, -1)
        out = net(z)
        torch.testing.assert_close(out, ref, rtol=FWD_TOL, atol=FWD_TOL)
        # per-point region maps (patterns of the points) reproduce the forward pass
        rm = region_maps(net, net.activation_pattern(z))
        torch.testing.assert_close(torch.einsum("rds,rs->rd", rm.A, z) + rm.b, ref, rtol=1e-10, atol=1e-10)
        # every point satisfies its own region's constraints (up to rounding)
        H, c = region_hyperplanes(net, net.activation_pattern(z), maps=rm)
        slack = c - torch.einsum("rus,rs->ru", H, z)
        assert bool((slack >= -1e-9 * (1 + c.abs())).all())
        # the dense maps (pushed identity) give the same region maps
        rd = region_maps_from_affine(net.affine_maps(), net.activations, net.activation_pattern(z))
        torch.testing.assert_close(rd.A, rm.A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rd.b, rm.b, rtol=1e-12, atol=1e-12)
    return net


CONV_DECODERS = {
    "conv_transpose2d_issue": lambda: nn.Sequential(
        nn.Linear(2, 2 * 3 * 3), nn.Unflatten(1, (2, 3, 3)), nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1,
                                                                                output_padding=1), nn.ReLU(),
        nn.ConvTranspose2d(3, 1, 3, padding=1)),
    "conv1d_stride_dilation_groups_nobias": lambda: nn.Sequential(
        nn.Linear(1, 12), nn.Unflatten(1, (2, 6)), nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2, groups=2,
                                                             bias=False), nn.LeakyReLU(0.1), nn.Flatten(),
        nn.Linear(12, 3)),
    "conv2d_reflect_batchnorm2d_pool": lambda: nn.Sequential(
        nn.Linear(3, 32), nn.Unflatten(1, (2, 4, 4)), nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        nn.BatchNorm2d(3), nn.ReLU6(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 2)),
    "conv_transpose1d_groups_dilation": lambda: nn.Sequential(
        nn.Linear(2, 8), nn.Unflatten(-1, (2, 4)), nn.ConvTranspose1d(2, 4, 3, stride=3, padding=1, dilation=2,
                                                                      groups=2), nn.Hardtanh(-0.3, 0.7),
        nn.AvgPool1d(2), nn.Flatten(), nn.Linear(24, 2)),
    "pads_upsample_adaptive": lambda: nn.Sequential(
        nn.Linear(2, 18), nn.Unflatten(1, (2, 3, 3)), nn.ConstantPad2d((1, 0, 2, 1), 0.7), nn.ZeroPad2d(1),
        nn.Upsample(scale_factor=2, mode="nearest"), nn.PReLU(2), nn.AdaptiveMaxPool2d((3, 2)),
        nn.ReplicationPad2d(1), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)),
    "maxpool_padding_dilation_ceil": lambda: nn.Sequential(
        nn.Linear(2, 2 * 7 * 6), nn.Unflatten(1, (2, 7, 6)), nn.MaxPool2d(3, stride=2, padding=1, dilation=(1, 2),
                                                                          ceil_mode=True),
        nn.Flatten(), nn.Linear(24, 2)),
    "maxpool1d_adaptive_avg_upsample_linear": lambda: nn.Sequential(
        nn.Linear(1, 10), nn.Unflatten(1, (1, 10)), nn.AdaptiveMaxPool1d(4), nn.Upsample(scale_factor=3,
                                                                                         mode="linear"),
        nn.Softshrink(0.3), nn.AdaptiveAvgPool1d(5), nn.Hardsigmoid(), nn.Flatten(), nn.Linear(5, 2)),
    "clamp_relu_then_relu6_pixelshuffle": lambda: nn.Sequential(
        nn.Linear(2, 16), nn.ReLU(), nn.ReLU6(), Clamp(max_val=0.4), nn.Unflatten(1, (4, 2, 2)), nn.PixelShuffle(2),
        nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(18, 2)),
    "conv3d_batchnorm3d": lambda: nn.Sequential(
        nn.Linear(2, 16), nn.Unflatten(1, (2, 2, 2, 2)), nn.Conv3d(2, 2, 2, padding=1), nn.BatchNorm3d(2),
        nn.ReLU(), nn.MaxPool3d(2), nn.Flatten(), nn.Linear(2, 2)),
}


@pytest.mark.parametrize("name", sorted(CONV_DECODERS))
def test_canonical_view_matches_forward(name):
    dec = _randomise(CONV_DECODERS[name]().double(), seed=len(name))
    S = dec[0].in_features
    _check(dec, S)


def test_layer_kinds_and_form_counts():
    dec = _randomise(CONV_DECODERS["conv2d_reflect_batchnorm2d_pool"]().double(), 3)
    net = as_cpa_network(dec)
    assert [type(a) for a in net.activations] == [Elementwise, MaxPool]
    relu6, pool = net.activations
    assert relu6.kinks == (0.0, 6.0) and net.units[0] == 3 * 4 * 4
    assert net.widths == (2 * 3 * 4 * 4, 3 * 2 * 2 * 6)     # two kinks per unit; 6 pairs per 2x2 window
    assert (net.in_features, net.out_features) == (3, 2)
    with pytest.raises(NotCPAError, match="not ReLU-type"):
        net.negative_slopes
    assert net.needs_gradient_m_step is not None
    lin = as_cpa_network(nn.Sequential(nn.Linear(2, 3), nn.ReLU6(), nn.Linear(3, 2)))
    assert lin.needs_gradient_m_step is None                # multi-kink units keep the closed form


def test_image_output_is_flattened_c_order():
    dec = _randomise(CONV_DECODERS["conv_transpose2d_issue"]().double(), 1)
    net = as_cpa_network(dec)
    assert net.output_shape == (1, 6, 6) and net.out_features == 36
    z = torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(net(z), dec(z).flatten(1), rtol=FWD_TOL, atol=FWD_TOL)


def test_no_dense_matrix_for_region_maps():
    """The issue's 392 -> 3,136 transposed convolution: region maps for many regions come from pushing S
    directions, and agree with the dense map (built once here only as the reference)."""
    dec = nn.Sequential(nn.Linear(2, 392), nn.Unflatten(1, (8, 7, 7)),
                        nn.ConvTranspose2d(8, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3136, 3)).double().eval()
    net = as_cpa_network(dec)
    z = torch.randn(40, 2, dtype=torch.float64)
    with torch.no_grad():
        rm = region_maps(net, net.activation_pattern(z))
        torch.testing.assert_close(torch.einsum("rds,rs->rd", rm.A, z) + rm.b, dec(z), rtol=1e-10, atol=1e-10)
        W, v = net.affine_maps()[0]
        assert W.shape == (3136, 2)
        W1, _ = net.affine_maps()[1]
        assert W1.shape == (3, 3136)


def test_gradients_reach_conv_and_prelu_weights():
    dec = _randomise(CONV_DECODERS["pads_upsample_adaptive"]().double(), 2)
    net = as_cpa_network(dec)
    z = torch.randn(7, 2, dtype=torch.float64)
    rm = region_maps(net, net.activation_pattern(z))
    (rm.A.square().sum() + rm.b.sum()).backward()
    prelu = next(m for m in dec.modules() if isinstance(m, nn.PReLU))
    assert prelu.weight.grad is not None and bool(prelu.weight.grad.abs().sum() > 0)
    assert dec[0].weight.grad is not None


@pytest.mark.parametrize("dec,match", [
    (lambda: nn.Sequential(nn.Linear(2, 6), nn.Conv1d(1, 1, 2)), "expects a per-sample input of 2 dimensions"),
    (lambda: nn.Sequential(nn.Linear(2, 4), nn.Unflatten(1, (1, 4)), nn.BatchNorm1d(1, track_running_stats=False),
                           nn.Flatten(), nn.Linear(4, 1)), "not piecewise affine"),
    (lambda: nn.Sequential(nn.Linear(2, 4), nn.Unflatten(1, (1, 4)), nn.MaxPool1d(2, return_indices=True)),
     "return_indices"),
    (lambda: nn.Sequential(nn.Linear(2, 4), nn.Flatten(0)), "batch"),
    (lambda: nn.Sequential(nn.Conv1d(1, 1, 2), nn.Linear(3, 1)), "latent dimension"),
    (lambda: nn.Sequential(nn.Linear(2, 4), nn.LazyLinear(3)), "lazy module"),
    (lambda: nn.Sequential(nn.Linear(2, 4), nn.LPPool1d(2, 2)), "not a layer pyro-cpa knows"),
])
def test_refusals_are_truthful(dec, match):
    with pytest.raises(NotCPAError, match=match):
        as_cpa_network(dec())


def test_train_mode_layers_refused_until_eval():
    dec = nn.Sequential(nn.Linear(2, 8), nn.Unflatten(1, (2, 4)), nn.BatchNorm1d(2), nn.RReLU(), nn.Flatten(),
                        nn.Linear(8, 1)).double()
    net = as_cpa_network(dec)
    with pytest.raises(NotCPAError, match="eval"):
        net(torch.zeros(1, 2, dtype=torch.float64))
    dec.eval()
    torch.testing.assert_close(net(torch.ones(3, 2, dtype=torch.float64)), dec(torch.ones(3, 2, dtype=torch.float64)))


def test_clamp_layer_validates():
    with pytest.raises(ValueError, match="min_val or max_val"):
        Clamp()
    with pytest.raises(ValueError, match="min_val < max_val"):
        Clamp(1.0, 1.0)
