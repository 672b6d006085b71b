"""The M-step's objective for one layer as a function of a flat parameter vector (autograd references in tests)."""
import torch

from pyro_cpa.infer.mstep import expected_complete_loglik


def layer_neg_q(maps, layer: int, net, stats, obs_var):
    """(negQ, w0): −Q as a function of w = [vec W_layer, v_layer] with the other layers held at ``maps``, and the
    current w0 (prior variance 1)."""
    W0, v0 = maps[layer]
    n_out, n_in = W0.shape

    def neg_q(w):
        m = list(maps)
        m[layer] = (w[:n_out * n_in].reshape(n_out, n_in), w[n_out * n_in:])
        return -expected_complete_loglik(m, net, stats.patterns, stats, obs_var, 1.0)

    return neg_q, torch.cat([W0.reshape(-1), v0])
