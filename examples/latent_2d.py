"""A 2-D latent space: exact EM on the swiss roll, the partition of latent space and a bimodal posterior.

Data: ``swiss_roll`` (a 2-D surface rolled up in R³, unit size, noise 0.05). Model: z ~ N(0, I₂),
x | z ~ N(g(z), σx² I₃) with a leaky-ReLU(0.1) decoder g = [2, 8, 8, 3], fitted by exact EM. For S = 2
every quantity is exact to machine precision: the linear regions are polygons (``cached_linear_regions``),
log p(x) and the posterior p(z | x) (a mixture of Gaussians truncated to those polygons) are closed forms.

Figure: (left) the partition of latent space, each linear region in its own colour (``regions.locate`` on a
grid); (middle) the exact posterior density p(z | x*) of the training point x* whose posterior is the most
clearly bimodal (``CPAMarginal.posterior(x).log_prob`` on a grid), with exact posterior draws and its mean,
which falls between the modes; (right) the data, the learned surface g(z) and the images g(mode) of
both modes — two distant parts of the surface that both explain x*.

    python examples/latent_2d.py --out latent2d_out          # full size (about 3 minutes)
    python examples/latent_2d.py --quick --out /tmp/l2d      # seconds
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import base_parser, fit_em, make_decoder, plt, print_table, setup, write_json  # noqa: E402

from pyro_cpa.datasets import swiss_roll  # noqa: E402
from pyro_cpa.distributions import CPAMarginal  # noqa: E402
from pyro_cpa.geometry import cached_linear_regions  # noqa: E402


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--n", type=int, default=200, help="training points")
    p.add_argument("--n-test", type=int, default=500, help="held-out points")
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=8, help="width of the decoder's two hidden layers")
    p.add_argument("--em-steps", type=int, default=30)
    p.add_argument("--lim", type=float, default=3.5, help="latent window [−lim, lim]² of the figures")
    p.add_argument("--grid", type=int, default=241, help="grid points per axis of the figures")
    p.add_argument("--search-grid", type=int, default=41, help="grid per axis of the bimodality search")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.n_test, args.hidden, args.em_steps, args.grid, args.search_grid = 40, 40, 4, 2, 81, 25
    return args


def latent_grid(lim, num):
    g = torch.linspace(-lim, lim, num)
    Z1, Z2 = torch.meshgrid(g, g, indexing="xy")
    return torch.stack([Z1, Z2], -1)   # (num, num, 2); [i, j] = (g[j], g[i])


def posterior_log_density(marginal, x, z, chunk=4096):
    """log p(z | x_b) for data x (B, D) at points z (G, 2) → (G, B), in chunks of grid points."""
    post = marginal.posterior(x)
    out = [post.log_prob(z[s:s + chunk].unsqueeze(-2)) for s in range(0, z.shape[0], chunk)]
    return torch.cat(out)


def bimodality(logp_grid, z_grid, marginal, x, num_line=64):
    """(score, (mode1, mode2)) of one datum: ratio of the 2nd to the 1st highest local maximum of the grid
    density, counted only if the density dips below half the 2nd peak on the segment between them."""
    num = z_grid.shape[0]
    p = (logp_grid - logp_grid.max()).exp().reshape(1, 1, num, num)
    peaks = (p == F.max_pool2d(p, 3, 1, 1)) & (p > 1e-3)
    idx = peaks.reshape(-1).nonzero().squeeze(-1)
    if idx.numel() < 2:
        return 0.0, None
    vals = p.reshape(-1)[idx]
    order = vals.argsort(descending=True)
    pts = z_grid.reshape(-1, 2)[idx[order]]
    vals = vals[order]
    for k in range(1, min(len(idx), 6)):   # the highest peak vs the next ones: the first with a dip wins
        t = torch.linspace(0, 1, num_line).unsqueeze(-1)
        line = pts[0] + t * (pts[k] - pts[0])
        lp_line = posterior_log_density(marginal, x.unsqueeze(0), line)[:, 0]
        dip = (lp_line - logp_grid.max()).exp().min()
        if dip < 0.5 * vals[k]:
            return float(vals[k]), (pts[0], pts[k])
    return 0.0, None


def find_bimodal(marginal, x, lim, num, chunk=8):
    """Index of the datum with the most bimodal posterior, its score and its two modes."""
    z_grid = latent_grid(lim, num)
    flat = z_grid.reshape(-1, 2)
    best = (0.0, 0, None)
    for s in range(0, x.shape[0], chunk):
        lp = posterior_log_density(marginal, x[s:s + chunk], flat)
        for j in range(lp.shape[1]):
            score, modes = bimodality(lp[:, j], z_grid, marginal, x[s + j])
            if score > best[0]:
                best = (score, s + j, modes)
    return best


def _region_boundaries(idx):
    """Bool mask of grid cells whose region differs from the right or lower neighbour."""
    edge = torch.zeros_like(idx, dtype=torch.bool)
    edge[:, :-1] |= idx[:, 1:] != idx[:, :-1]
    edge[:-1, :] |= idx[1:, :] != idx[:-1, :]
    return edge


def figure(fit, x, k, modes, lim, num, path):
    pyplot = plt()
    from matplotlib.colors import ListedColormap

    regions = cached_linear_regions(fit.decoder)
    R = len(regions)
    z_grid = latent_grid(lim, num)
    idx = regions.locate(z_grid)
    import matplotlib

    colours = matplotlib.colormaps["tab20"]((torch.randperm(R, generator=torch.Generator().manual_seed(1)) % 20)
                                            .numpy())
    extent = (-lim, lim, -lim, lim)
    marginal = CPAMarginal(fit.decoder, fit.obs_scale)
    post = marginal.posterior(x[k])
    fig = pyplot.figure(figsize=(17, 5.4))
    ax0 = fig.add_subplot(1, 3, 1)
    ax0.imshow(idx.numpy(), origin="lower", extent=extent, cmap=ListedColormap(colours), interpolation="nearest")
    with torch.no_grad():
        zmean_all = marginal.posterior(x).mean
    ax0.scatter(zmean_all[:, 0].numpy(), zmean_all[:, 1].numpy(), s=4, color="k", label="posterior means E[z | x_n]")
    ax0.set(xlabel="z1", ylabel="z2", title=f"Partition of latent space: {R} linear regions")
    ax0.legend(loc="upper right", fontsize=8)

    ax1 = fig.add_subplot(1, 3, 2)
    lp = posterior_log_density(marginal, x[k:k + 1], z_grid.reshape(-1, 2))[:, 0].reshape(num, num)
    top = float(lp.max())
    im = ax1.imshow(lp.clamp(min=top - 12).numpy(), origin="lower", extent=extent, cmap="magma_r",
                    vmin=top - 12, vmax=top)
    fig.colorbar(im, ax=ax1, label="log p(z | x*)  (12 nats shown)")
    edge = _region_boundaries(idx)
    ez = z_grid[edge].numpy()
    ax1.scatter(ez[:, 0], ez[:, 1], s=0.05, color="0.55", alpha=0.5, label="region boundaries")
    draws = post.sample((300,), generator=torch.Generator().manual_seed(0)).numpy()
    ax1.scatter(draws[:, 0], draws[:, 1], s=3, color="tab:cyan", alpha=0.6, label="exact posterior draws")
    m = post.mean.numpy()
    ax1.plot(m[0], m[1], "X", color="tab:green", ms=10, label="posterior mean")
    if modes is not None:
        mm = torch.stack(modes).numpy()
        ax1.plot(mm[:, 0], mm[:, 1], "*", color="tab:blue", ms=13, label="modes")
    ax1.set(xlabel="z1", ylabel="z2", title=f"Exact posterior p(z | x*) of training point #{k}",
            xlim=(-lim, lim), ylim=(-lim, lim))
    ax1.legend(loc="upper right", fontsize=7)

    ax2 = fig.add_subplot(1, 3, 3, projection="3d")
    zs = torch.randn(4000, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        g = fit.decoder(zs)
    lo, hi = x.min(0).values - 0.15, x.max(0).values + 0.15
    keep = ((g >= lo) & (g <= hi)).all(-1)          # 3-D axes do not clip: drop far-away points
    g, xn, col = g[keep].numpy(), x.numpy(), colours[regions.locate(zs[keep]).numpy()]
    lo, hi = lo.tolist(), hi.tolist()
    ax2.scatter(g[:, 0], g[:, 1], g[:, 2], c=col, s=3, alpha=0.4, label="g(z), z ~ prior, by region")
    ax2.scatter(xn[:, 0], xn[:, 1], xn[:, 2], s=4, color="k", label="training data")
    ax2.scatter(*xn[k], s=90, color="red", marker="o", depthshade=False, zorder=9, label="x*")
    if modes is not None:
        with torch.no_grad():
            gm = fit.decoder(torch.stack(modes)).numpy()
        ax2.scatter(gm[:, 0], gm[:, 1], gm[:, 2], s=160, color="tab:blue", marker="*", edgecolors="k",
                    depthshade=False, zorder=10, label="g(modes)")
    ax2.set(xlabel="x1", ylabel="x2", zlabel="x3", title="Swiss roll: data and learned surface",
            xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), zlim=(lo[2], hi[2]))
    ax2.view_init(elev=12, azim=-80)
    ax2.legend(loc="upper left", fontsize=7)
    fig.suptitle(f"Exact EM with a [2, H, H, 3] decoder on the swiss roll (S = 2): exact NLL {fit.train_nll:.3f} "
                 f"(train), {fit.test_nll:.3f} (held out) nats/point")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    pyplot.close(fig)


def main(args) -> dict:
    setup(args)
    x = swiss_roll(args.n, args.noise, seed=args.seed)
    x_test = swiss_roll(args.n_test, args.noise, seed=args.seed + 1000)
    init = make_decoder([2, args.hidden, args.hidden, 3], 0.1, seed=args.seed)
    fit = fit_em(x, init, 2, args.em_steps, progress=not args.quick)
    fit.train_nll, fit.test_nll = fit.nll(x), fit.nll(x_test)
    R = len(cached_linear_regions(fit.decoder))
    marginal = CPAMarginal(fit.decoder, fit.obs_scale)
    with torch.no_grad():
        score, k, modes = find_bimodal(marginal, x, args.lim, args.search_grid)
        if modes is None:   # none bimodal (e.g. a barely trained model): show the most spread-out posterior
            k = int(torch.diagonal(marginal.posterior(x).covariance_matrix, dim1=-2, dim2=-1).sum(-1).argmax())
        post = marginal.posterior(x[k])
        weights = post.mixture_log_weights.exp()
    row = {"model": f"[2, {args.hidden}, {args.hidden}, 3]", "train_nll": fit.train_nll, "test_nll": fit.test_nll,
           "obs_scale": fit.obs_scale, "regions": R, "seconds": fit.seconds, "steps": fit.steps}
    print_table([row], [("model", "decoder", ""), ("train_nll", "NLL train", "{:.4f}"),
                        ("test_nll", "NLL test", "{:.4f}"), ("obs_scale", "sigma_x", "{:.4f}"),
                        ("regions", "regions", "{:d}"), ("seconds", "EM s", "{:.1f}"), ("steps", "EM steps", "{:d}")],
                title=f"swiss roll: N={args.n} training, {args.n_test} held-out points; exact, per-point nats")
    result = {**row, "bimodal_index": int(k), "bimodal_score": score,
              "posterior_regions_with_mass": int((weights > 1e-3).sum()),
              "modes": [m.tolist() for m in modes] if modes is not None else None}
    if modes is not None:
        print(f"most bimodal posterior: training point #{k}, 2nd/1st peak height {score:.3f}, modes at "
              f"{modes[0].numpy().round(2)} and {modes[1].numpy().round(2)}, "
              f"{result['posterior_regions_with_mass']} regions with posterior mass > 1e-3")
    else:
        print(f"no bimodal posterior found among the training points; showing the widest one (#{k})")
    if args.out:
        path = os.path.join(args.out, "latent_2d.png")
        with torch.no_grad():
            figure(fit, x, k, modes, args.lim, args.grid, path)
        result["figures"] = [path]
        write_json(args, "latent_2d.json", result)
    return result


if __name__ == "__main__":
    main(parse_args())
