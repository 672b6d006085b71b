"""What a wide joint EM step spends besides its E-step and CG (issue 12, "Wide layers"): one model trace per step
(CPAModelStructure.observed_fn, and CPALikelihood.expand without a second decoder pass), and the CG layer solve's
right-hand side B through the grouped input maps (mstep._layer_rhs) against an independent reference — autograd's
gradient of the surrogate Q plus K w from the dense Kronecker sum, since Q is the quadratic −½wᵀKw + Bᵀw + const in
the layer's weights w."""
import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

from pyro_cpa.distributions import CPALikelihood, CPAMarginal
from pyro_cpa.infer import EM, mstep
from pyro_cpa.infer.estep import e_step
from pyro_cpa.infer.structure import trace_model
from pyro_cpa.nn import as_cpa_network, mlp

from mstep_reference import layer_gradient_hessian
from test_mstep_grouped import _dense_K

#: B from the grouped sum vs B from autograd's gradient and the dense K: both round at ~ε·Σ|terms| (O(1) factors).
RHS_RTOL = 1e-11
#: an expanded likelihood vs one built on the expanded z: the decoder's rows are the same maths (a batched product
#: may round a row differently by its position in the batch).
EXPAND_RTOL = 1e-13


def _model(decoder, S, calls=None):
    def model(x):
        if calls is not None:
            calls.append(1)
        pyro.module("decoder", decoder)
        sx = pyro.param("obs_scale", torch.tensor(0.5, dtype=torch.float64), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(S, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", CPALikelihood(decoder, z, sx), obs=x)
    return model


def test_an_em_step_runs_the_model_once():
    widths = [1, 8, 8, 2]
    torch.manual_seed(0)
    with torch.no_grad():
        x = CPAMarginal(mlp(widths, lambda: nn.LeakyReLU(0.1), seed=0), 0.3).sample((60,))
    pyro.clear_param_store()
    calls = []
    em = EM(_model(mlp(widths, lambda: nn.LeakyReLU(0.1), seed=1), 1, calls), schedule="joint")
    for _ in range(3):
        calls.clear()
        em.step(x)
        assert len(calls) == 1


def test_a_trace_runs_the_decoder_once_and_the_expanded_likelihood_is_the_same():
    dec = mlp([2, 6, 3], lambda: nn.LeakyReLU(0.1), seed=0)
    forwards = []
    hook = dec.register_forward_hook(lambda *args: forwards.append(1))
    x = torch.randn(5, 3, dtype=torch.float64)
    pyro.clear_param_store()
    try:
        trace = trace_model(_model(dec, 2), x)
    finally:
        hook.remove()
    assert len(forwards) == 1   # Pyro's plate expands the site to its own shape: no second forward pass
    assert trace.nodes["x"]["fn"].batch_shape == (5,)
    z = torch.randn(3, 1, 2, dtype=torch.float64)
    sx = torch.tensor([0.3, 0.4, 0.5], dtype=torch.float64)
    expanded = CPALikelihood(dec, z, sx).expand((3, 4))
    fresh = CPALikelihood(dec, z.expand(3, 4, 2), sx)
    value = torch.randn(3, 4, 3, dtype=torch.float64)
    value[0, 1, 2] = float("nan")   # a missing coordinate
    assert expanded.batch_shape == fresh.batch_shape == (3, 4) and expanded.event_shape == (3,)
    assert torch.allclose(expanded.loc, fresh.loc, rtol=EXPAND_RTOL, atol=0)
    lp_e, lp_f = expanded.log_prob(value), fresh.log_prob(value)
    assert torch.allclose(lp_e, lp_f, rtol=EXPAND_RTOL, atol=0)
    g_e = torch.autograd.grad(lp_e.sum(), list(dec.parameters()))
    g_f = torch.autograd.grad(lp_f.sum(), list(dec.parameters()))
    for a, b in zip(g_e, g_f):
        assert torch.allclose(a, b, rtol=EXPAND_RTOL, atol=EXPAND_RTOL * float(b.abs().max()))


def test_grouped_right_hand_side_equals_the_gradient_of_q_plus_k_w():
    widths = [1, 6, 7, 5, 3]
    torch.manual_seed(0)
    with torch.no_grad():
        x = CPAMarginal(mlp(widths, lambda: nn.LeakyReLU(0.1), seed=0), 0.3).sample((80,))
    dec = mlp(widths, lambda: nn.LeakyReLU(0.1), seed=1)
    net = as_cpa_network(dec)
    st = e_step(CPAMarginal(dec, 0.5, 1.0), x)
    maps = [(W.detach().clone(), v.detach().clone()) for W, v in net.affine_maps()]
    obs_var = torch.linspace(0.2, 0.4, widths[-1], dtype=torch.float64)
    R = st.Z.shape[0]
    for l in (1, 2):   # a middle hidden layer and the last one
        Pt, F, FL, Y, Wt_old, lam_x, _ = mstep._hidden_normal_equations(maps, l, net, st, obs_var, rhs=False)
        groups = mstep._input_groups(st.patterns, l, R, Pt.device)
        _, Psi, _ = mstep._layer_factors(Pt, F, lam_x, st, groups)
        assert isinstance(Psi, mstep.GroupedInputs) and Psi.P.shape[0] < R   # regions do share input maps
        B = mstep._layer_rhs(Pt, FL, Y, Psi)
        g, H, w0, _ = layer_gradient_hessian(maps, l, net, st, obs_var)   # of −Q, in the solver's row order
        K = _dense_K(maps, l, net, st, obs_var)
        assert torch.allclose(H, K, rtol=0, atol=RHS_RTOL * float(K.abs().max()))   # the reference's own check
        ref = (K @ w0 - g).reshape(B.shape)   # ∇Q = B − K w  ⇒  B = K w − ∇(−Q)
        assert float((B - ref).abs().max()) <= RHS_RTOL * float(ref.abs().max())
        per_region = mstep._hidden_normal_equations(maps, l, net, st, obs_var)[3]
        assert float((B - per_region).abs().max()) <= RHS_RTOL * float(ref.abs().max())
