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


def layer_gradient_hessian(maps, layer: int, net, stats, obs_var):
    """(g, H, w0, neg_q_rows): gradient and symmetrised Hessian of −Q (autograd) at w0, all in the M-step solver's
    row order [W_i, v_i] (i = 0..n_out−1) rather than layer_neg_q's [vec W, v], and −Q of a vector in that order."""
    n_out, n_in = maps[layer][0].shape
    neg_q, w0 = layer_neg_q(maps, layer, net, stats, obs_var)
    perm = torch.cat([torch.cat([torch.arange(i * n_in, (i + 1) * n_in), torch.tensor([n_out * n_in + i])])
                      for i in range(n_out)])
    g = torch.autograd.functional.jacobian(neg_q, w0)[perm]
    H = torch.autograd.functional.hessian(neg_q, w0)[perm][:, perm]
    inv = torch.argsort(perm)
    return g, 0.5 * (H + H.T), w0[perm], lambda w: neg_q(w.index_select(0, inv))
