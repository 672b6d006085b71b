"""A user's first exact log p, its gradient and an EM step do not import SymPy (torch 2.13 imports it, 0.2–0.4 s, on
the first torch.broadcast_shapes call and on autograd.grad with grad_outputs; Pyro does not, a torch optimizer does):
a fresh interpreter runs them and reports the modules it loaded. Fails before pyro_cpa._shapes and the sum-form
vector-Jacobian product of chunked._RecomputedLogProb.backward."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    import pyro
    import pyro.distributions as pdist
    import torch
    from torch import nn
    from pyro_cpa.distributions import CPAMarginal
    from pyro_cpa.distributions.likelihood import CPALikelihood
    from pyro_cpa.guides import ExactPosterior
    from pyro_cpa.infer import EM
    from pyro_cpa.nn import mlp
    torch.set_default_dtype(torch.float64)
    for S in (1, 2):
        dec = mlp([S, 6, 6, 2], lambda: nn.LeakyReLU(0.1), seed=0)
        x = CPAMarginal(dec, 0.3).sample((20,))
        dist = CPAMarginal(dec, 0.3)
        dist.log_prob(x).sum().backward()               # the recomputing backward of log p
        assert all(p.grad is not None for p in dec.parameters())

        def model(x, dec=dec, S=S):
            pyro.module("decoder", dec)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", pdist.Normal(torch.zeros(S), 1.0).to_event(1))
                pyro.sample("x", CPALikelihood(dec, z, torch.tensor(0.3)), obs=x)

        pyro.clear_param_store()
        EM(model, ExactPosterior(model), update_obs_scale=False).step(x)
    print(sorted(m for m in sys.modules if m == "sympy" or m.startswith("sympy.")))
""")


def test_first_log_prob_gradient_and_em_step_do_not_import_sympy():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
