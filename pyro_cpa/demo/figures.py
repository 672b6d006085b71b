"""Figures of the circle demo (the paper's Figs. 3–6), written as PNG files with matplotlib."""
from __future__ import annotations

import os

import torch

from ..distributions import CPAMarginal
from ..geometry.regions import cached_linear_regions


def _np(t):
    return t.detach().cpu().numpy()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _region_bounds_1d(regions) -> list[float]:
    H, c = regions.polytopes()
    mask = regions.facet_mask
    return sorted({(c[r, f] / H[r, f, 0]).item() for r in range(len(regions)) for f in range(H.shape[1])
                   if mask[r, f]})


def fig_partition(decoder, x, path):
    plt = _plt()
    regions = cached_linear_regions(decoder)
    bounds = _region_bounds_1d(regions)
    z = torch.linspace(-3.5, 3.5, 2001).unsqueeze(-1)
    with torch.no_grad():
        g = decoder(z)
    idx = regions.locate(z)
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 4.5))
    prior = torch.exp(-0.5 * z[:, 0] ** 2) / (2 * torch.pi) ** 0.5
    a0.scatter(_np(z[:, 0]), _np(prior), c=_np(idx), cmap="tab20", s=3, label="prior N(0,1), coloured by region")
    for i, bnd in enumerate(bounds):
        a0.axvline(bnd, color="k", lw=0.6, alpha=0.6, label="region boundary" if i == 0 else None)
    a0.set(xlabel="latent z", ylabel="prior density p(z)", title=f"Partition of latent space ({len(regions)} regions)",
           xlim=(-3.5, 3.5))
    a0.legend(loc="upper right", fontsize=8)
    a1.scatter(_np(x[:, 0]), _np(x[:, 1]), s=4, color="0.7", label="data")
    a1.scatter(_np(g[:, 0]), _np(g[:, 1]), c=_np(idx), cmap="tab20", s=3, label="g(z), coloured by region")
    a1.set(xlabel="x1", ylabel="x2", title="Generated manifold (EM fit)", aspect="equal")
    a1.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_density(decoder, obs_scale, x, path, grid: int = 160):
    plt = _plt()
    lim = 1.6
    g = torch.linspace(-lim, lim, grid)
    X, Y = torch.meshgrid(g, g, indexing="xy")
    with torch.no_grad():
        lp = CPAMarginal(decoder, obs_scale).log_prob(torch.stack([X, Y], -1))
    fig, ax = plt.subplots(figsize=(5.8, 5))
    im = ax.pcolormesh(_np(X), _np(Y), _np(lp.clamp(min=-10)), shading="auto", cmap="viridis")
    fig.colorbar(im, ax=ax, label="log p(x) (exact, clipped at -10)")
    ax.scatter(_np(x[:, 0]), _np(x[:, 1]), s=2, color="w", alpha=0.5, label="data")
    ax.set(xlabel="x1", ylabel="x2", title="Exact marginal density p(x) (EM fit)", aspect="equal")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_posterior(decoder, obs_scale, datum, path):
    plt = _plt()
    regions = cached_linear_regions(decoder)
    with torch.no_grad():
        post = CPAMarginal(decoder, obs_scale).posterior(datum)
        z = torch.linspace(-3.5, 3.5, 4001)
        dens = post.log_prob(z.unsqueeze(-1)).exp()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(_np(z), _np(dens), color="C0", label="exact posterior p(z | x)")
    for i, bnd in enumerate(_region_bounds_1d(regions)):
        ax.axvline(bnd, color="k", lw=0.6, alpha=0.5, label="region boundary" if i == 0 else None)
    ax.axvline(post.mean.item(), color="C3", ls="--", label="posterior mean")
    ax.set(xlabel="latent z", ylabel="density", xlim=(-3.5, 3.5),
           title=f"Exact posterior of x = ({datum[0]:.2f}, {datum[1]:.2f}): truncated-Gaussian mixture")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_curves(results, path, key: str, ylabel: str, title: str, only_variational: bool = False):
    plt = _plt()
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(results):
        hist = getattr(r, key)
        if not hist or (only_variational and r.final_kl in (None, 0.0)):
            continue
        steps = [h[0] + 1 for h in hist]
        secs = [h[1] for h in hist]
        vals = [h[2] for h in hist]
        a0.plot(steps, vals, label=r.name, color=f"C{i}")
        a1.plot(secs, vals, label=r.name, color=f"C{i}")
    a0.set(xscale="log", xlabel="training step + 1", ylabel=ylabel, title=title + " vs steps")
    a1.set(xlabel="training wall-clock (s)", ylabel=ylabel, title=title + " vs time")
    if key == "kl_history":
        a0.set_yscale("log")
        a1.set_yscale("log")
    for a in (a0, a1):
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_manifolds(results, x, path):
    plt = _plt()
    n = len(results)
    cols = 3
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
    z = torch.linspace(-3.0, 3.0, 1001).unsqueeze(-1)
    for ax, r in zip(axes.flat, results):
        with torch.no_grad():
            g = r.decoder(z)
        ax.scatter(_np(x[:, 0]), _np(x[:, 1]), s=3, color="0.7", label="data")
        ax.plot(_np(g[:, 0]), _np(g[:, 1]), color="C3", lw=1.5, label="g(z), z in [-3, 3]")
        ax.set(xlabel="x1", ylabel="x2", title=f"{r.name}\nNLL {r.final_nll:.3f}", aspect="equal",
               xlim=(-1.8, 1.8), ylim=(-1.8, 1.8))
        ax.legend(fontsize=7, loc="upper right")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Learned manifolds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_figures(experiment: dict, out: str) -> list[str]:
    """Write every figure of the demo into ``out``; returns the file paths."""
    os.makedirs(out, exist_ok=True)
    x = experiment["data"]
    results = experiment["results"]
    em = results[0]
    obs_scale_em = em.obs_scale
    paths = {name: os.path.join(out, name) for name in (
        "fig3_partition.png", "fig3_density.png", "fig3_posterior.png", "fig4_nll.png", "fig5_kl.png",
        "fig6_manifolds.png")}
    fig_partition(em.decoder, x, paths["fig3_partition.png"])
    fig_density(em.decoder, obs_scale_em, x, paths["fig3_density.png"])
    # the datum whose exact posterior is the most spread out (multimodal where branches pass close)
    with torch.no_grad():
        post = CPAMarginal(em.decoder, obs_scale_em).posterior(x)
        i = int(post.variance[:, 0].argmax())
    fig_posterior(em.decoder, obs_scale_em, x[i], paths["fig3_posterior.png"])
    trained = [r for r in results if not r.name.endswith("on EM decoder")]
    fig_curves(trained, paths["fig4_nll.png"], "nll_history", "exact NLL per sample (nats)",
               "Exact negative log-likelihood")
    fig_curves(results, paths["fig5_kl.png"], "kl_history", "KL(q || p(z|x)) per sample (nats)",
               "Exact KL of the variational posterior", only_variational=True)
    fig_manifolds(trained, x, paths["fig6_manifolds.png"])
    return list(paths.values())
