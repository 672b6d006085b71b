r"""Local exact inference: per-datum partitions around the posterior mass, with a certified bound.

For a decoder whose global partition is too large to enumerate, log p(x) is computed from the regions
that meet a small part K(x) of latent space, and the mass outside K(x) is bounded — not estimated.

Certificate
-----------
With C = max_g N(x; g, Σx) = (2π)^{-D/2} |Σx|^{-1/2}, for every set B of latent points

    ∫_B p(x, z) dz = ∫_B N(x; g(z), Σx) N(z; 0, Σz) dz
                   <= C exp(−½ min_{z∈B} ‖x − g(z)‖²_{Σx}) P_prior(B).                        (1)

Latent space is covered by a root box ``[−ρσz, ρσz]`` (``ρ`` = :data:`OUTER_RADIUS` prior standard
deviations; the prior mass outside is at most ``2 S Φ(−ρ)``, bounded with C alone) and a quadtree
of boxes inside it. On each box, an affine-arithmetic (symbolic interval) propagation through the
network gives g(box) ⊆ Λ u + λ ± e (u ∈ [−1, 1]^S): exact for the units that keep their sign on the
box, the chord relaxation σ(t) ∈ λ_c t + [min(0, μ), max(0, μ)] for the units whose pre-activation
interval [lo, hi] straddles 0 (λ_c = (hi − α lo)/(hi − lo), μ = lo (α − λ_c); valid for every slope α
because σ(t) − λ_c t is piecewise linear with values μ at lo and hi and 0 at t = 0). Its interval hull
[lo_d, hi_d] of each output coordinate gives min ‖x − g(z)‖² >= Σ_d dist(x_d, [lo_d, hi_d])² / σ_d²
and, with P_prior(box) a product of normal cdf differences, the bound (1) on the box. The boxes are
refined level by level (the box tree does not depend on the data; the (datum, box) pairs do); a pair
is *certified* when its bound (1) lies :data:`CERT_MARGIN` nats below ``log p_low(x) − tol``, where
``p_low`` is a running lower bound of p(x) (the same propagation's *upper* bound on ‖x − g‖ over a
box: ``p(x) >= C exp(−½ max ‖x − g‖²) P_prior(box)``). Uncertified boxes are refined until their
half-widths fall below :data:`LEAF_FACTOR` posterior standard deviations (read off the box's linear
part Λ); the uncertified leaves K(x) are then partitioned exactly (for S = 2 by the same layer-wise
polygon splitting as the global enumerator, started from the leaf boxes; for S = 1 from the global
breakpoint partition, which is always cheap), and every region meeting K(x) is integrated exactly and
whole. Regions are found once per call (shared by all data) and get their full non-redundant
H-representation (not clipped to the boxes), so each integrated term is exactly a term of the global
sum.

The neglected mass is at most the sum of the certified bounds (1), the outer-box tail and the upper
bounds ``log κ + min_j log Φ(d_j)`` of the (datum, region) pairs pruned before integration; divided
by the integrated sum p_local(x) <= p(x) it bounds the neglected *fraction*:

    log p_local(x) <= log p(x) <= log p_local(x) + log1p(exp(log_bound(x))).

Exact: every integrated term (machine precision for S <= 2). Certified: ``log_bound`` (rounding in the
bound itself is ~1e-14 relative, far inside the margin). Only S <= 2 is supported.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import PyroCPAError
from ..integrate import integrate_whitened, log_mass_upper_bound, whiten
from ..integrate.univariate import log_ndtr_diff
from ..nn.network import CPANetwork, as_cpa_network
from .enumerate_2d import DEFAULT_TOL as POLYGON_TOL
from .enumerate_2d import PAD, WALL, _clip, _codes_unique, _initial_charts
from .maps import region_hyperplanes, region_maps_from_affine
from .regions import LinearRegions, RegionEnumeration

#: Default tolerance: the neglected posterior mass is certified below exp(−LOCAL_TOL) (relative).
LOCAL_TOL = 40.0
#: Half-width of the root box in prior standard deviations (prior mass outside <= 2 S Φ(−40) ≈ e^−804).
OUTER_RADIUS = 40.0
#: A (datum, box) pair is certified when its bound is this many nats below log p_low − tol (room for
#: e^12 ≈ 1.6e5 certified boxes per datum before their sum could reach exp(−tol) p_low).
CERT_MARGIN = 12.0
#: Uncertified boxes are refined until every half-width is at most this many posterior standard deviations.
LEAF_FACTOR = 1.0
#: Hard limit on the depth of the box tree.
MAX_DEPTH = 40
#: Boxes per batch of the symbolic propagation; (datum, box) pairs per batch of the bound.
BOX_CHUNK = 2048
PAIR_CHUNK = 1 << 18


# ---------------------------------------------------------------------- bounds of g over boxes
def output_bounds(maps, negative_slopes, centre: torch.Tensor, half: torch.Tensor):
    """Enclosure of g over the boxes ``{centre + half ⊙ u : ‖u‖_∞ <= 1}`` (B, S) by affine arithmetic.

    Returns ``(lo, hi, lin)``: (B, D) coordinate bounds of g on each box and the (B, D, S) linear part
    of the enclosure per unit of z (the exact Jacobian on a box that lies in one linear region). See
    the module docstring for the relaxation.
    """
    B, S = centre.shape
    lin = torch.diag_embed(half)                      # (B, n, S), per unit of u
    const = centre
    err = torch.zeros_like(centre)
    for l, (W, v) in enumerate(maps):
        lin = torch.einsum("ij,bjs->bis", W, lin)
        const = const @ W.T + v
        err = err @ W.abs().T
        rad = lin.abs().sum(-1) + err
        lo, hi = const - rad, const + rad
        if l == len(maps) - 1:
            return lo, hi, lin / half.unsqueeze(-2)
        a = negative_slopes[l]
        active, inactive = lo >= 0, hi <= 0
        unstable = ~(active | inactive)
        width = torch.where(unstable, hi - lo, torch.ones_like(hi))          # > 0 where unstable
        lam = (hi - a * lo) / width
        mu = lo * (a - lam)
        scale = torch.where(active, torch.ones_like(lo), torch.where(inactive, torch.full_like(lo, a), lam))
        shift = torch.where(unstable, 0.5 * mu, torch.zeros_like(mu))
        lin = scale.unsqueeze(-1) * lin
        const = scale * const + shift
        err = scale.abs() * err + shift.abs()
    raise AssertionError("unreachable")


def _scatter_logsumexp(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """log Σ exp(values) grouped by ``index`` into ``size`` slots (−inf where empty)."""
    m = values.new_full((size,), float("-inf")).scatter_reduce(0, index, values, "amax")
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = values.new_zeros(size).index_add(0, index, (values - m_safe[index]).exp())
    return torch.where(torch.isfinite(m), m_safe + s.log(), m)


@dataclass
class Certificate:
    """Result of :func:`certify_boxes` (N data, L leaf boxes).

    Attributes:
        leaf_centre, leaf_half: (L, S) the uncertified leaf boxes (disjoint).
        pair_datum, pair_leaf: (P,) the (datum, leaf) pairs that are not certified.
        log_neglected: (N,) log of an upper bound of ∫ p(x, z) dz outside the datum's leaves.
        log_p_low: (N,) a lower bound of log p(x) from the boxes alone.
        boxes_visited: number of boxes whose enclosure was computed.
    """

    leaf_centre: torch.Tensor
    leaf_half: torch.Tensor
    pair_datum: torch.Tensor
    pair_leaf: torch.Tensor
    log_neglected: torch.Tensor
    log_p_low: torch.Tensor
    boxes_visited: int


def certify_boxes(net: CPANetwork, x: torch.Tensor, obs_var: torch.Tensor, prior_var: torch.Tensor,
                  tol: float = LOCAL_TOL, margin: float = CERT_MARGIN, leaf_factor: float = LEAF_FACTOR,
                  outer_radius: float = OUTER_RADIUS, max_depth: int = MAX_DEPTH) -> Certificate:
    """Box tree of the certificate (see the module docstring); x (N, D) fully observed, float64."""
    dt, dev = x.dtype, x.device
    N, D = x.shape
    with torch.no_grad():
        maps = [(W.detach().to(dt), v.detach().to(dt)) for W, v in net.affine_maps()]
        S = maps[0][0].shape[1]
        slopes = net.negative_slopes
        obs_var = obs_var.detach().to(dt).expand(D)
        prior_sd = prior_var.detach().to(dt).expand(S).sqrt()
        w = obs_var.reciprocal()
        log_c = -0.5 * torch.log(2 * math.pi * obs_var).sum()
        outer = math.log(2 * S) + float(torch.special.log_ndtr(torch.tensor(-outer_radius, dtype=dt)))
        log_neg = torch.full((N,), float(log_c) + outer, dtype=dt, device=dev)
        log_low = torch.full((N,), float("-inf"), dtype=dt, device=dev)
        centre = torch.zeros(1, S, dtype=dt, device=dev)
        half = (outer_radius * prior_sd).unsqueeze(0)
        pn = torch.arange(N, device=dev)
        pb = torch.zeros(N, dtype=torch.long, device=dev)
        leaves_c, leaves_h, leaf_n, leaf_b = [], [], [], []
        n_leaves, visited = 0, 0
        signs = torch.tensor(list(np.ndindex(*(2,) * S)), dtype=dt, device=dev) * 2 - 1     # (2^S, S)
        for depth in range(max_depth + 1):
            B = centre.shape[0]
            visited += B
            lo, hi, lin = zip(*(output_bounds(maps, slopes, centre[i:i + BOX_CHUNK], half[i:i + BOX_CHUNK])
                                for i in range(0, B, BOX_CHUNK)))
            lo, hi, lin = torch.cat(lo), torch.cat(hi), torch.cat(lin)
            log_prior = log_ndtr_diff((centre - half) / prior_sd, (centre + half) / prior_sd).sum(-1)
            # posterior standard deviation along each axis from the enclosure's linear part
            prec = torch.diag_embed(prior_sd ** -2) + torch.einsum("bds,d,bdt->bst", lin, w, lin)
            post_sd = torch.diagonal(prec, dim1=-2, dim2=-1).rsqrt()
            leafy = (half <= leaf_factor * post_sd).all(-1) | (depth == max_depth)
            lbs, ubs = [], []
            for i in range(0, pn.numel(), PAIR_CHUNK):
                n, b = pn[i:i + PAIR_CHUNK], pb[i:i + PAIR_CHUNK]
                xn, l_, h_ = x[n], lo[b], hi[b]
                gap = (l_ - xn).clamp(min=0) + (xn - h_).clamp(min=0)
                far = torch.maximum((xn - l_).abs(), (h_ - xn).abs())
                lbs.append((gap.square() * w).sum(-1))
                ubs.append((far.square() * w).sum(-1))
            lb, ub = torch.cat(lbs), torch.cat(ubs)
            log_low = log_low.scatter_reduce(0, pn, log_c - 0.5 * ub + log_prior[pb], "amax")
            bound = log_c - 0.5 * lb + log_prior[pb]
            cert = bound <= log_low[pn] - tol - margin
            if bool(cert.any()):
                log_neg = torch.logaddexp(log_neg, _scatter_logsumexp(bound[cert], pn[cert], N))
            keep = ~cert
            pn, pb = pn[keep], pb[keep]
            at_leaf = leafy[pb]
            if bool(at_leaf.any()):
                ids, inv = torch.unique(pb[at_leaf], return_inverse=True)
                leaves_c.append(centre[ids])
                leaves_h.append(half[ids])
                leaf_n.append(pn[at_leaf])
                leaf_b.append(inv + n_leaves)
                n_leaves += ids.numel()
            pn, pb = pn[~at_leaf], pb[~at_leaf]
            if pn.numel() == 0:
                break
            parents, inv = torch.unique(pb, return_inverse=True)
            k = signs.shape[0]
            centre = (centre[parents].unsqueeze(1) + 0.5 * half[parents].unsqueeze(1) * signs).reshape(-1, S)
            half = (0.5 * half[parents]).repeat_interleave(k, 0)
            pn = pn.repeat_interleave(k)
            pb = (inv.unsqueeze(1) * k + torch.arange(k, device=dev)).reshape(-1)
        cat = lambda xs, shape: torch.cat(xs) if xs else torch.zeros(shape, dtype=dt, device=dev)  # noqa: E731
        return Certificate(cat(leaves_c, (0, S)), cat(leaves_h, (0, S)),
                           torch.cat(leaf_n) if leaf_n else torch.zeros(0, dtype=torch.long, device=dev),
                           torch.cat(leaf_b) if leaf_b else torch.zeros(0, dtype=torch.long, device=dev),
                           log_neg, log_low, visited)


# ---------------------------------------------------------------------- regions meeting the leaves
def _regions_in_boxes_2d(net: CPANetwork, centre: np.ndarray, half: np.ndarray, tol: float):
    """Layer-wise polygon splitting started from the boxes: activation patterns of the pieces and the
    box each piece lies in (see :mod:`.enumerate_2d`; homogeneous coordinates (x, y, 1))."""
    with torch.no_grad():
        maps = [(W.detach().to(torch.float64).cpu().numpy(), v.detach().to(torch.float64).cpu().numpy())
                for W, v in net.affine_maps()]
    L = len(centre)
    corners = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=np.float64)
    X = np.concatenate([centre[:, None, :] + corners * half[:, None, :], np.ones((L, 4, 1))], -1)
    cnt = np.full(L, 4, dtype=np.int64)
    lab = np.full((L, 4), WALL, dtype=np.int64)
    box = np.arange(L)
    W0, v0 = maps[0]
    G = np.concatenate([W0, v0[:, None]], 1)[None].repeat(L, 0)
    Ga = np.abs(G)
    pats, offset, acc = [], 0, 0
    for l in range(len(maps) - 1):
        n = maps[l][0].shape[0]
        acc += maps[l][0].shape[1] + 1
        band = tol * (acc + 1)
        par = np.arange(len(X))
        cuts, q = _cut_table(X, cnt, G, Ga, band)
        for j in np.nonzero(cuts.any(0))[0]:
            sel = np.nonzero(cuts[par, j])[0]
            k = sel.size
            Xo, co, lo, src, side = _clip(X[sel], cnt[sel], lab[sel], G[par[sel], j], Ga[par[sel], j], offset + j,
                                          band)
            if Xo.shape[1] > X.shape[1]:
                X = np.concatenate([X, np.zeros((len(X), Xo.shape[1] - X.shape[1], 3))], 1)
                lab = np.concatenate([lab, np.full((len(lab), Xo.shape[1] - lab.shape[1]), PAD)], 1)
            Vo = Xo.shape[1]
            X[sel, :Vo], X[sel, Vo:] = Xo[:k], 0.0
            lab[sel, :Vo], lab[sel, Vo:] = lo[:k], PAD
            cnt[sel] = co[:k]
            q[sel, j] = side[:k]
            new = sel[src[k:]]
            Xn = np.zeros((len(new), X.shape[1], 3))
            Xn[:, :Vo] = Xo[k:]
            Ln = np.full((len(new), X.shape[1]), PAD, dtype=np.int64)
            Ln[:, :Vo] = lo[k:]
            qn = q[new]
            qn[:, j] = side[k:]
            X, lab, cnt = np.concatenate([X, Xn]), np.concatenate([lab, Ln]), np.concatenate([cnt, co[k:]])
            par, q, box = np.concatenate([par, par[new]]), np.concatenate([q, qn]), np.concatenate([box, box[new]])
        pats = [pt[par] for pt in pats] + [q]
        offset += n
        if l + 2 < len(maps):
            W, v = maps[l + 1]
            d = torch.from_numpy(np.where(q, 1.0, net.negative_slopes[l])[..., None])
            Wt, pt_ = torch.from_numpy(W), torch.from_numpy(par)
            Gt, Gat = torch.from_numpy(G), torch.from_numpy(Ga)
            G = torch.cat([torch.einsum("ij,pjk->pik", Wt, d[a:a + 4096] * Gt[pt_[a:a + 4096]])
                           for a in range(0, len(par), 4096)]).numpy()
            Ga = torch.cat([torch.einsum("ij,pjk->pik", Wt.abs(), d[a:a + 4096].abs() * Gat[pt_[a:a + 4096]])
                            for a in range(0, len(par), 4096)]).numpy()
            G[..., 2] += v
            Ga[..., 2] += np.abs(v)
    codes = np.concatenate(pats, 1)
    first, inv = _codes_unique(codes)
    V = X.shape[1]
    valid = np.arange(V)[None, :] < cnt[:, None]
    inner = (X * valid[..., None]).sum(1) / cnt[:, None]
    cand = np.zeros((first.size, offset), dtype=bool)
    r, k = np.nonzero(valid & (lab >= 0))
    cand[inv[r], lab[r, k]] = True
    open_ = np.zeros(first.size, dtype=bool)         # a piece of the region lies on a box wall
    open_[inv[(valid & (lab == WALL)).any(1)]] = True
    return [torch.from_numpy(np.ascontiguousarray(p[first])) for p in pats], inv, box, inner[first, :2], cand, open_


def _cut_table(X, cnt, G, Ga, band, chunk: int = 2048):
    """For polygons X (P, V, 3) and their forms G (P, n, 3): which forms cut each polygon (vertices beyond
    the band ``band |Ga|`` on both sides, as in ``_clip``) and, for the others, the side (no vertex beyond
    the band on the negative side)."""
    P, V, _ = X.shape
    cuts = np.zeros((P, G.shape[1]), dtype=bool)
    side = np.zeros((P, G.shape[1]), dtype=bool)
    for a in range(0, P, chunk):
        sl = slice(a, a + chunk)
        s = np.einsum("pvk,pnk->pnv", X[sl], G[sl])
        eps = band * np.sqrt((Ga[sl] ** 2).sum(-1))[..., None]
        valid = (np.arange(V)[None, :] < cnt[sl, None])[:, None, :]
        pos = ((s > eps) & valid).any(-1)
        neg = ((s < -eps) & valid).any(-1)
        cuts[sl], side[sl] = pos & neg, ~neg
    return cuts, side


def _facets_from_table(table: np.ndarray) -> torch.Tensor:
    """(R, U) bool table of facet units -> (R, F) unit indices padded with -1."""
    rr, uu = np.nonzero(table)
    nf = table.sum(1)
    F = int(nf.max()) if nf.size else 0
    out = np.full((table.shape[0], F), -1, dtype=np.int64)
    starts = np.cumsum(nf) - nf
    out[rr, np.arange(rr.size) - starts[rr]] = uu
    return torch.from_numpy(out)


#: Rounds of the facet search (each adds every line that still cuts a region's polygon).
FACET_ROUNDS = 32
#: Regions per batch of the facet search.
FACET_CHUNK = 256


def _facets_2d(net: CPANetwork, patterns: list[torch.Tensor], cand0: np.ndarray, tol: float) -> torch.Tensor:
    """Non-redundant facets (unit indices, padded with −1) of the full regions with these patterns.

    Each region is clipped in the four projective charts of :mod:`.enumerate_2d` (so unbounded regions
    need no box) by a growing set of its unit constraints, starting from ``cand0`` (R, U) (the edge
    labels of its pieces inside the boxes), until no unit's line
    cuts the polygon beyond the tolerance band; the facets are then the unit labels of its edges.
    """
    with torch.no_grad():
        maps = [(W.detach().to(torch.float64).cpu(), v.detach().to(torch.float64).cpu())
                for W, v in net.affine_maps()]
    W0, v0 = maps[0]
    rn = W0.norm(dim=1)
    dist = (v0.abs() / rn)[rn > 0]
    rho = max(1.0, float(torch.quantile(dist, 0.9))) if dist.numel() else 1.0
    abs_maps = [(W.abs(), v.abs()) for W, v in maps]
    abs_slopes = [abs(a) for a in net.negative_slopes]
    widths = [W.shape[0] for W, _ in maps[:-1]]
    acc = np.cumsum([W.shape[1] + 1 for W, _ in maps[:-1]])
    band_unit = np.concatenate([np.full(n, tol * (a + 1)) for n, a in zip(widths, acc)])
    R = patterns[0].shape[0]
    out = []
    for s in range(0, R, FACET_CHUNK):
        pat = [p[s:s + FACET_CHUNK].cpu() for p in patterns]
        Rc = pat[0].shape[0]
        H, c = region_hyperplanes(net, pat, maps=region_maps_from_affine(maps, net.negative_slopes, pat))
        m_abs = region_maps_from_affine(abs_maps, abs_slopes, pat)
        Ha = torch.cat([M for M, _ in m_abs.preactivations], 1)
        ca = torch.cat([m for _, m in m_abs.preactivations], 1)
        # the constraint c − H z >= 0 as a linear form in chart coordinates (z = ρ (x, y) / w)
        g = torch.cat([-rho * H, c.unsqueeze(-1)], -1).numpy()                  # (Rc, U, 3)
        ga = torch.cat([rho * Ha, ca.unsqueeze(-1)], -1).numpy()
        U = g.shape[1]
        gt = torch.from_numpy(g)
        eps_u = band_unit[None, :] * np.sqrt((ga ** 2).sum(-1))                # (Rc, U)
        cand = cand0[s:s + FACET_CHUNK].copy()
        band = float(band_unit.max())
        X0, cnt0, lab0 = _initial_charts()
        X = np.repeat(X0[None], Rc, 0).reshape(-1, *X0.shape[1:])
        cnt = np.tile(cnt0, Rc)
        lab = np.tile(lab0, (Rc, 1))
        reg = np.repeat(np.arange(Rc), 4)
        new = cand.copy()          # lines to clip by in this round (clipping is incremental: the polygons only shrink)
        for _ in range(FACET_ROUNDS):
            K = int(new.sum(1).max())
            order = np.argsort(~new, 1, kind="stable")[:, :K]                   # the new lines first
            for k in range(K):
                j = order[reg, k]
                on = new[reg, j]
                gk = np.where(on[:, None], g[reg, j], 0.0)
                gak = np.where(on[:, None], ga[reg, j], 0.0)
                X, cnt, lab, src, side = _clip(X, cnt, lab, gk, gak, -10, band)
                keep = side
                X, cnt, lab, reg = X[keep], cnt[keep], lab[keep], reg[src][keep]
                labk = j[src][keep]
                lab = np.where(lab == -10, labk[:, None], lab)
            # lines that still cut some polygon (a vertex beyond the band on the wrong side)
            V = X.shape[1]
            valid = np.arange(V)[None, :] < cnt[:, None]
            val = torch.bmm(gt[torch.from_numpy(reg)], torch.from_numpy(X).transpose(1, 2)).numpy()   # (P, U, V)
            bad = ((val < -eps_u[reg][..., None]) & valid[:, None, :]).any(-1)   # (P, U)
            cut = np.zeros((Rc, U), dtype=bool)
            np.logical_or.at(cut, reg, bad)
            cut &= ~cand
            if not cut.any():
                break
            cand |= cut
            new = cut
        else:
            raise PyroCPAError("local partition: the facet search did not converge; please report this decoder")
        r, kk = np.nonzero((lab >= 0) & valid)
        keys = np.unique(reg[r] * U + lab[r, kk])
        rr, uu = keys // U, keys % U
        nf = np.bincount(rr, minlength=Rc)
        F = int(nf.max()) if nf.size else 0
        f = np.full((Rc, F), -1, dtype=np.int64)
        starts = np.cumsum(nf) - nf
        f[rr, np.arange(keys.size) - starts[rr]] = uu
        out.append(f)
    F = max(f.shape[1] for f in out)
    return torch.from_numpy(np.concatenate([np.pad(f, ((0, 0), (0, F - f.shape[1])), constant_values=-1)
                                            for f in out]))


def _intervals_1d(regions: LinearRegions) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) of every region of a one-dimensional partition, from its facets."""
    with torch.no_grad():
        H, c = regions.polytopes(torch.float64)
        h = H[..., 0]
        inf = torch.full_like(c, float("inf"))
        real = regions.facet_mask            # padding rows are H = 0; a facet's slope is nonzero by construction
        root = torch.where(real, c / torch.where(real, h, torch.ones_like(h)), inf)
        if not h.shape[-1]:      # one region: the whole line
            hi = c.new_full((len(regions),), float("inf"))
            return -hi, hi
        hi = torch.where(real & (h > 0), root, inf).amin(-1)
        lo = torch.where(real & (h < 0), root, -inf).amax(-1)
    return lo, hi


def _join(first_idx: torch.Tensor, key: torch.Tensor, inc_key: torch.Tensor, inc_val: torch.Tensor, R: int):
    """For pairs (first_idx[i], key[i]) and an incidence (inc_key, inc_val), the unique pairs
    (first_idx, inc_val) with inc_key == key, as two index tensors."""
    order = torch.argsort(inc_key, stable=True)
    inc_key, inc_val = inc_key[order], inc_val[order]
    K = int(max(int(key.max()) if key.numel() else -1, int(inc_key.max()) if inc_key.numel() else -1)) + 1
    counts = torch.bincount(inc_key, minlength=K)
    starts = torch.cumsum(counts, 0) - counts
    rep = counts[key]
    total = int(rep.sum())
    base = torch.repeat_interleave(starts[key] - (torch.cumsum(rep, 0) - rep), rep)
    val = inc_val[base + torch.arange(total, device=key.device)]
    pk = torch.unique(torch.repeat_interleave(first_idx, rep) * R + val)
    return pk // R, pk % R


#: The region cache of a decoder is dropped (and rebuilt) beyond this many regions.
CACHE_MAX_REGIONS = 2_000_000


class _RegionCache:
    """Regions (S = 2) meeting each leaf box, for one decoder's weights, shared by every call.

    The certificate's leaf boxes are cells of one dyadic tiling of the root box (their centre and half-width
    are exact binary fractions of it, so the same box has bit-identical coordinates in every call): the
    regions meeting a leaf depend on the weights and the box alone. A call searches only the leaves no earlier
    call searched, identifies the regions it finds by activation pattern (a pattern is one region), and runs the
    facet search only for regions not seen before. The cache is keyed by the decoder module and is valid while
    its affine maps are equal (``torch.equal``) to those it was built with; any change of the weights rebuilds it.
    """

    _store: weakref.WeakKeyDictionary | None = None

    def __init__(self, net: CPANetwork, tol: float):
        self.net, self.tol = net, tol
        with torch.no_grad():
            self.weights = [(W.detach().clone(), v.detach().clone()) for W, v in net.affine_maps()]
        self.leaf: dict[bytes, np.ndarray] = {}
        self.index: dict[bytes, int] = {}
        self.patterns: list[list[np.ndarray]] = []       # chunks, each a list over layers of (r, n_l) bool
        self.facets: list[np.ndarray] = []
        self.interior: list[np.ndarray] = []
        self.size = 0

    @classmethod
    def get(cls, net: CPANetwork, tol: float) -> "_RegionCache":
        if cls._store is None:
            cls._store = weakref.WeakKeyDictionary()
        key = getattr(net, "module", net)
        entry = cls._store.get(key)
        if entry is not None and entry.tol == tol and entry.size <= CACHE_MAX_REGIONS:
            with torch.no_grad():
                maps = net.affine_maps()
            if len(maps) == len(entry.weights) and all(
                    W.shape == W0.shape and v.shape == v0.shape and torch.equal(W.detach(), W0)
                    and torch.equal(v.detach(), v0) for (W, v), (W0, v0) in zip(maps, entry.weights)):
                entry.net = net
                return entry
        entry = cls(net, tol)
        cls._store[key] = entry
        return entry

    @staticmethod
    def _keys(rows: np.ndarray) -> list[bytes]:
        rows = np.ascontiguousarray(rows)
        return [r.tobytes() for r in rows]

    def _search(self, centre: np.ndarray, half: np.ndarray, keys: list[bytes]) -> None:
        patterns, inv, box, interior, cand0, open_ = _regions_in_boxes_2d(self.net, centre, half, self.tol)
        codes = self._keys(np.packbits(np.concatenate([p.numpy() for p in patterns], 1), axis=1))
        ids = np.array([self.index.get(k, -1) for k in codes], dtype=np.int64)
        fresh = np.nonzero(ids < 0)[0]
        if fresh.size:
            # a region none of whose pieces touches a box wall is that piece: its edges are its facets
            facets = _facets_from_table(cand0[fresh])
            sel = np.nonzero(open_[fresh])[0]
            if sel.size:
                sub = _facets_2d(self.net, [p[torch.from_numpy(fresh[sel])] for p in patterns], cand0[fresh[sel]],
                                 self.tol)
                F = max(facets.shape[1], sub.shape[1])
                facets = torch.nn.functional.pad(facets, (0, F - facets.shape[1]), value=-1)
                facets[torch.from_numpy(sel)] = torch.nn.functional.pad(sub, (0, F - sub.shape[1]), value=-1)
            ids[fresh] = self.size + np.arange(fresh.size)
            for i, r in zip(fresh.tolist(), ids[fresh].tolist()):
                self.index[codes[i]] = r
            self.patterns.append([p.numpy()[fresh] for p in patterns])
            self.facets.append(facets.numpy())
            self.interior.append(np.ascontiguousarray(interior[fresh]))
            self.size += fresh.size
        gid = ids[inv]
        order = np.argsort(box, kind="stable")
        bounds = np.searchsorted(box[order], np.arange(len(keys) + 1))
        for j, k in enumerate(keys):
            self.leaf[k] = np.unique(gid[order[bounds[j]:bounds[j + 1]]])

    def regions_for(self, centre: np.ndarray, half: np.ndarray):
        """(leaf index, region index) incidences of these leaves and the :class:`RegionEnumeration` of the
        regions they meet (indices into it)."""
        keys = self._keys(np.concatenate([centre, half], 1))
        new = [i for i, k in enumerate(keys) if k not in self.leaf]
        if new:
            sel = np.array(new)
            self._search(centre[sel], half[sel], [keys[i] for i in new])
        lists = [self.leaf[k] for k in keys]
        inc_leaf = np.repeat(np.arange(len(keys)), [len(a) for a in lists])
        inc_all = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
        used, inc_reg = np.unique(inc_all, return_inverse=True)
        if len(self.facets) > 1:          # consolidate the chunks
            F = max(f.shape[1] for f in self.facets)
            self.facets = [np.concatenate([np.pad(f, ((0, 0), (0, F - f.shape[1])), constant_values=-1)
                                           for f in self.facets])]
            self.patterns = [[np.concatenate(ps) for ps in zip(*self.patterns)]]
            self.interior = [np.concatenate(self.interior)]
        if self.size == 0:
            widths = [W.shape[0] for W, _ in self.weights[:-1]]
            pats = [torch.zeros(0, n, dtype=torch.bool) for n in widths]
            enum = RegionEnumeration(pats, torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 2, dtype=torch.float64))
        else:
            u = torch.from_numpy(used)
            enum = RegionEnumeration([torch.from_numpy(p)[u] for p in self.patterns[0]],
                                     torch.from_numpy(self.facets[0])[u],
                                     torch.from_numpy(self.interior[0])[u])
        return torch.from_numpy(inc_leaf), torch.from_numpy(inc_reg.ravel()), enum


@dataclass
class LocalPartition:
    """The regions needed by a batch of data (see :func:`local_partition`).

    Attributes:
        regions: :class:`LinearRegions` of every region that meets some datum's uncertified leaves (the
            union over the data; each with its full, non-redundant H-representation).
        pair_datum, pair_region: (P,) the (datum, region) pairs to integrate.
        certificate: the box certificate (``log_neglected`` bounds the mass outside the leaves).
        seconds: wall-clock of the certificate and of the region search (``certificate_s``, ``regions_s``),
            number of leaves and of boxes visited.
    """

    regions: LinearRegions
    pair_datum: torch.Tensor
    pair_region: torch.Tensor
    certificate: Certificate
    seconds: dict


def local_partition(decoder, x: torch.Tensor, obs_var: torch.Tensor, prior_var: torch.Tensor,
                    tol: float = LOCAL_TOL, *, margin: float = CERT_MARGIN, leaf_factor: float = LEAF_FACTOR,
                    outer_radius: float = OUTER_RADIUS, enum_tol: float | None = None,
                    max_regions: int = 10 ** 7, cache_regions: bool = True) -> LocalPartition:
    """The regions that hold all but a certified fraction exp(−tol) of each datum's posterior mass.

    Args:
        decoder: a CPA decoder with S <= 2 latent dimensions.
        x: (N, D) data (no missing entries).
        obs_var: (D,) or scalar σx²; prior_var: (S,) or scalar σz².
        tol: target log-fraction; the certificate refines until its boxes are ``tol + margin`` nats
            below a lower bound of p(x) (see the module docstring).
        enum_tol: tolerance of the polygon splitting (default: that of :mod:`.enumerate_2d`).
        max_regions: budget of the global breakpoint partition used for S = 1.
        cache_regions: reuse (and extend) the regions found for the same leaf boxes by earlier calls with the
            same decoder weights (:class:`_RegionCache`; the leaf boxes form a fixed, data-independent tiling).
    """
    import time

    from .regions import cached_linear_regions

    net = as_cpa_network(decoder)
    net.check_eval_mode()
    S = net.in_features
    try:
        net.negative_slopes
    except PyroCPAError as err:
        raise PyroCPAError("partition='local' needs ReLU-type activations (ReLU, LeakyReLU, Abs: one kink at 0); "
                           f"use the global partition for this decoder ({err})") from None
    if S > 2:
        raise PyroCPAError(f"partition='local' supports latent dimension S <= 2, got S={S}; use the global "
                           "partition (partition='global') for S >= 3")
    x = x.detach().to(torch.float64)
    if x.dim() != 2 or x.shape[1] != net.out_features:
        raise PyroCPAError(f"local_partition expects x of shape (N, D={net.out_features}); got {tuple(x.shape)}")
    if bool(torch.isnan(x).any()):
        raise PyroCPAError("partition='local' does not support missing data (NaN entries) yet; use the global "
                           "partition for data with missing coordinates")
    obs_var = torch.as_tensor(obs_var, dtype=torch.float64, device=x.device)
    prior_var = torch.as_tensor(prior_var, dtype=torch.float64, device=x.device)
    t0 = time.perf_counter()
    cert = certify_boxes(net, x, obs_var, prior_var, tol, margin, leaf_factor, outer_radius)
    t1 = time.perf_counter()
    if S == 2:
        etol = POLYGON_TOL if enum_tol is None else enum_tol
        cache = _RegionCache.get(net, etol) if cache_regions else _RegionCache(net, etol)
        inc_leaf, inc_reg, enum = cache.regions_for(cert.leaf_centre.cpu().numpy(), cert.leaf_half.cpu().numpy())
    else:
        glob = cached_linear_regions(net, max_regions)
        lo, hi = _intervals_1d(glob)
        order = torch.argsort(lo)
        lo_s, hi_s = lo[order], hi[order]            # disjoint intervals: both sorted
        a = (cert.leaf_centre - cert.leaf_half)[:, 0].cpu()
        b = (cert.leaf_centre + cert.leaf_half)[:, 0].cpu()
        first = torch.searchsorted(hi_s, a, right=True)      # first interval with hi > a
        last = torch.searchsorted(lo_s, b)                    # intervals with lo < b
        rep = (last - first).clamp(min=0)
        inc_leaf = torch.repeat_interleave(torch.arange(len(a)), rep)
        pos = torch.repeat_interleave(first - (torch.cumsum(rep, 0) - rep), rep) + torch.arange(int(rep.sum()))
        used, inc_reg = torch.unique(order[pos], return_inverse=True)
        enum = RegionEnumeration([p[used] for p in glob.patterns], glob.facets[used], glob.interior_points[used])
    regions = LinearRegions(net, enum, method="local")
    t2 = time.perf_counter()
    dev = x.device
    pd, pr = _join(cert.pair_datum.cpu(), cert.pair_leaf.cpu(), inc_leaf, inc_reg, max(len(regions), 1))
    return LocalPartition(regions, pd.to(dev), pr.to(dev), cert,
                          {"certificate_s": t1 - t0, "regions_s": t2 - t1, "leaves": int(cert.leaf_centre.shape[0]),
                           "boxes_visited": cert.boxes_visited})


# ---------------------------------------------------------------------- the local marginal
#: (datum, region) pairs per block of the integration; a block holds whole data (memory ∝ block · F).
PAIR_BLOCK = 1 << 16
#: Regions per batch of the per-region maps (memory ∝ chunk · widths · S).
REGION_CHUNK = 2048
#: Pruned pairs: their upper bounds sum to at most this fraction of exp(−prune_tol) · p_local(x) (the
#: remaining factor 2 absorbs the rounding of the running sum that decides the pruning; the reported
#: ``log_bound`` is recomputed from the pruned bounds themselves).
PRUNE_FRACTION = 0.5


@dataclass
class RegionGaussians:
    """Per-region quantities of the local integration (R regions of a :class:`LinearRegions`).

    Attributes:
        A, b: (R, D, S), (R, D) the affine map g(z) = A z + b on each region.
        H, c: (R, F, S), (R, F) non-redundant facets (padding rows H = 0, c = +inf).
        L_prec: (R, S, S) Cholesky factor of the posterior precision Σz⁻¹ + Aᵀ Σx⁻¹ A.
        scale_tril: (R, S, S) Cholesky factor of its inverse (the region Gaussian's covariance).
        const: (R,) D log 2π + log|Σx| + log|Σz| + log|precision|.
    """

    A: torch.Tensor
    b: torch.Tensor
    H: torch.Tensor
    c: torch.Tensor
    L_prec: torch.Tensor
    scale_tril: torch.Tensor
    const: torch.Tensor


def region_gaussians(regions: LinearRegions, obs_var: torch.Tensor, prior_var: torch.Tensor,
                     dtype: torch.dtype = torch.float64, chunk: int = REGION_CHUNK) -> RegionGaussians:
    """:class:`RegionGaussians` from the decoder's current weights, in batches of ``chunk`` regions
    (differentiable in the weights; memory of the per-layer maps O(chunk))."""
    from .maps import region_maps

    net = regions.network
    R, D, S = len(regions), net.out_features, net.in_features
    obs_var = obs_var.to(dtype).expand(D)
    prior_var = prior_var.to(dtype).expand(S)
    w = obs_var.reciprocal()
    parts = []
    for s in range(0, max(R, 1), chunk):
        pats = [p[s:s + chunk] for p in regions.patterns]
        maps = region_maps(net, pats, dtype)
        H_all, c_all = region_hyperplanes(net, pats, maps=maps)
        f = regions.facets[s:s + chunk].to(H_all.device)
        mask = f >= 0
        idx = f.clamp(min=0)
        H = torch.gather(H_all, 1, idx.unsqueeze(-1).expand(-1, -1, S))
        c = torch.gather(c_all, 1, idx)
        H = torch.where(mask.unsqueeze(-1), H, torch.zeros_like(H))
        c = torch.where(mask, c, torch.full_like(c, float("inf")))
        A = maps.A
        prec = torch.diag_embed(prior_var.reciprocal()) + torch.einsum("rds,d,rdt->rst", A, w, A)
        L_prec = torch.linalg.cholesky(prec)
        cov = torch.cholesky_inverse(L_prec)
        scale_tril = torch.linalg.cholesky(0.5 * (cov + cov.transpose(-1, -2)))
        const = D * math.log(2 * math.pi) + obs_var.log().sum() + prior_var.log().sum() + \
            2.0 * torch.diagonal(L_prec, dim1=-2, dim2=-1).log().sum(-1)
        parts.append((A, maps.b, H, c, L_prec, scale_tril, const))
    return RegionGaussians(*(torch.cat(t) for t in zip(*parts)))


def _pair_gaussians(rg: RegionGaussians, x, w, prior_var, n, r):
    """log κ, posterior mean μ and whitened facets (G, d) of the (datum n, region r) pairs:
    κ = ∫ N(x; A z + b, Σx) N(z; 0, Σz) dz, μ its posterior mean (module docstring of
    :mod:`pyro_cpa.distributions.region_gaussians`)."""
    A = rg.A[r]
    res = x[n] - rg.b[r]
    y = torch.einsum("pds,pd->ps", A, w * res)
    mu = torch.cholesky_solve(y.unsqueeze(-1), rg.L_prec[r]).squeeze(-1)
    resid = res - torch.einsum("pds,ps->pd", A, mu)
    quad = (w * resid.square()).sum(-1) + (mu.square() / prior_var).sum(-1)
    log_kappa = -0.5 * (rg.const[r] + quad)
    G, d = whiten(mu, rg.scale_tril[r], rg.H[r], rg.c[r], validate=False)
    return log_kappa, mu, G, d


def _data_blocks(pn: torch.Tensor, N: int, block: int):
    """Slices (datum range, pair range) of pairs sorted by datum, each holding whole data and at most
    ``block`` pairs (or one datum)."""
    counts = torch.bincount(pn, minlength=N).tolist()
    a, ps = 0, 0
    while a < N:
        b, pe = a + 1, ps + counts[a]
        while b < N and pe + counts[b] <= block:
            pe += counts[b]
            b += 1
        yield a, b, ps, pe
        a, ps = b, pe


@dataclass
class _BlockTerms:
    """Integrated pairs of one block: local datum index, pair index (into the block), log term, and the
    posterior moments (mean, covariance; None without moments); ``log_pruned`` (block data) the
    log-sum of the pruned pairs' upper bounds."""

    n: torch.Tensor
    idx: torch.Tensor
    terms: torch.Tensor
    mean: torch.Tensor | None
    cov: torch.Tensor | None
    log_pruned: torch.Tensor


def _integrate_block(rg, x, w, prior_var, n, r, Nb, prune_tol, need_moments):
    """Integrate the pairs (n, r) of one block of ``Nb`` data (n local to the block), pruning by
    certified upper bounds:

    1. every pair with ``ub >= max_ub(datum) − prune_tol`` is integrated (``ub = log κ + min_j log Φ(d_j)``);
    2. the others are sorted by ub per datum; the longest prefix whose bounds sum to at most
       ``PRUNE_FRACTION · exp(−prune_tol) · p₁`` (p₁ the sum of step 1, <= p(x)) is pruned, the rest integrated.
    """
    log_kappa, mu, G, d = _pair_gaussians(rg, x, w, prior_var, n, r)
    with torch.no_grad():
        ub = log_kappa.detach() + log_mass_upper_bound(G.detach(), d.detach())
        top = ub.new_full((Nb,), float("-inf")).scatter_reduce(0, n, ub, "amax")
        first = ub >= top[n] - prune_tol

    def integrate(sel):
        mom = integrate_whitened(mu[sel], rg.scale_tril[r[sel]], G[sel], d[sel], need_moments=need_moments,
                                 centred_covariance=False)
        return log_kappa[sel] + mom.log_mass, mom

    t1, m1 = integrate(first)
    lse1 = _scatter_logsumexp(t1.detach(), n[first], Nb)
    with torch.no_grad():
        rest = (~first).nonzero().squeeze(-1)
        thr = lse1 - (prune_tol - math.log(PRUNE_FRACTION))
        thr = torch.where(torch.isfinite(thr), thr, torch.full_like(thr, -1e300))     # no sum yet: prune nothing
        u = (ub[rest] - thr[n[rest]]).clamp(max=1.0)               # log of bound / threshold
        order = torch.argsort(u, stable=True)
        order = order[torch.argsort(n[rest][order], stable=True)]  # by datum, then by bound
        ns = n[rest][order]
        cs = torch.cat([u.new_zeros(1), torch.cumsum(u[order].exp(), 0)])
        cnt = torch.bincount(ns, minlength=Nb)
        start = torch.cumsum(cnt, 0) - cnt                      # first sorted position of each datum
        prunable = torch.zeros_like(first)
        prunable[rest[order]] = (cs[1:] - cs[start[ns]]) <= 1.0
        second = ~first & ~prunable
    idx, terms, mom = first.nonzero().squeeze(-1), t1, m1
    if bool(second.any()):
        t2, m2 = integrate(second)
        idx = torch.cat([idx, second.nonzero().squeeze(-1)])
        terms = torch.cat([terms, t2])
        mom = type(m1)(*(None if a is None else torch.cat([a, b]) for a, b in zip(m1, m2)))
    with torch.no_grad():
        log_pruned = _scatter_logsumexp(ub[prunable], n[prunable], Nb)
    return _BlockTerms(n[idx], idx, terms, mom.mean if need_moments else None,
                       mom.covariance if need_moments else None, log_pruned)


def _local_blocks(part: LocalPartition, x, obs_var, prior_var, dtype, prune_tol, need_moments, block):
    """Yield ``(a, b, pair_region, _BlockTerms)`` over blocks of data [a, b) (see :func:`_integrate_block`)."""
    N, D = x.shape
    dev = x.device
    x = x.to(dtype)
    obs_var = torch.as_tensor(obs_var, dtype=dtype, device=dev).expand(D)
    S = part.regions.latent_dim
    prior_var = torch.as_tensor(prior_var, dtype=dtype, device=dev).expand(S)
    rg = region_gaussians(part.regions, obs_var, prior_var, dtype)
    w = obs_var.reciprocal()
    pn, pr = part.pair_datum, part.pair_region
    for a, b, ps, pe in _data_blocks(pn, N, block):
        r = pr[ps:pe]
        yield a, b, r, _integrate_block(rg, x[a:b], w, prior_var, pn[ps:pe] - a, r, b - a, prune_tol, need_moments)


@dataclass
class LocalLogProb:
    """Result of :func:`local_log_prob` (N data).

    Attributes:
        log_prob: (N,) log p_local(x): the exact sum over the integrated regions (a lower bound of log p(x)
            within ``log1p(exp(log_bound))``), differentiable in the decoder's weights.
        log_bound: (N,) log of a certified upper bound of the neglected fraction (neglected / p_local).
        pairs: (datum, region) pairs of the partition; pairs_integrated: those integrated (the rest pruned).
        regions: regions found (union over the data).
    """

    log_prob: torch.Tensor
    log_bound: torch.Tensor
    pairs: int
    regions: int
    partition: LocalPartition
    pairs_integrated: int = 0


def local_log_prob(decoder, x: torch.Tensor, obs_var: torch.Tensor, prior_var: torch.Tensor,
                   tol: float = LOCAL_TOL, *, prune_tol: float = 40.0, dtype: torch.dtype = torch.float64,
                   chunk_size: int = PAIR_BLOCK, **partition_kwargs) -> LocalLogProb:
    r"""log p(x) from the local partition of each datum, with a certified bound on what it leaves out.

    The (datum, region) pairs of :func:`local_partition` are integrated exactly (region Gaussians by
    the S×S forms of :func:`region_gaussians`), in blocks of whole data of at most ``chunk_size`` pairs,
    except pairs pruned by their certified upper bounds ``log κ + min_j log Φ(d_j)`` (:func:`_integrate_block`:
    the pruned bounds of a datum sum to at most ``exp(−prune_tol)`` times its integrated sum); the pruned
    bounds join the certificate, so ``log_bound`` covers everything left out:

        log_bound = log(certified box mass + Σ pruned bounds) − log p_local(x).
    """
    import time

    part = local_partition(decoder, x, obs_var, prior_var, tol, **partition_kwargs)
    t0 = time.perf_counter()
    N = x.shape[0]
    lp, pruned, integrated = [], [], 0
    for a, b, _, bt in _local_blocks(part, x, obs_var, prior_var, dtype, prune_tol, False, chunk_size):
        lp.append(_scatter_logsumexp(bt.terms, bt.n, b - a))
        pruned.append(bt.log_pruned)
        integrated += int(bt.n.numel())
    lse = torch.cat(lp) if lp else x.new_full((N,), float("-inf"), dtype=dtype)
    with torch.no_grad():
        log_pruned = torch.cat(pruned) if pruned else torch.full_like(lse, float("-inf"))
        log_bound = torch.logaddexp(part.certificate.log_neglected.to(dtype), log_pruned) - lse.detach()
    if not bool(torch.isfinite(lse).all()):
        raise PyroCPAError("partition='local': some datum got no region with positive mass (the certificate's "
                           "leaves are empty); this is a bug, please report the decoder and data")
    part.seconds.update(integrate_s=time.perf_counter() - t0, pairs_integrated=integrated)
    return LocalLogProb(lse, log_bound, int(part.pair_datum.numel()), len(part.regions), part, integrated)


@dataclass
class LocalEStep:
    """Result of :func:`local_e_step`: ``stats`` (an :class:`~pyro_cpa.infer.estep.EStepStats` over the regions
    of ``partition``), the certified ``log_bound`` (N,) of each datum's neglected fraction, and the partition."""

    stats: object
    log_bound: torch.Tensor
    partition: LocalPartition


def local_e_step(decoder, x: torch.Tensor, obs_var: torch.Tensor, prior_var: torch.Tensor,
                 tol: float = LOCAL_TOL, *, prune_tol: float = 40.0, dtype: torch.dtype = torch.float64,
                 chunk_size: int = PAIR_BLOCK, **partition_kwargs) -> LocalEStep:
    r"""Exact E-step statistics (:mod:`pyro_cpa.infer.estep`) from the local partition: for the regions ω that
    meet some datum's certified neighbourhood,

        Z_ω = Σ_n e0_nω [[E zzᵀ, m], [mᵀ, 1]],   X_ω = Σ_n e0_nω x_n [m; 1]ᵀ,   q_ω = Σ_n e0_nω x_n ⊙ x_n,

    with e0_nω = exp(term_nω − log p_local(x_n)) over the integrated pairs (:func:`local_log_prob`) and
    ``loglik`` = log p_local. Each datum's posterior weights are those of the exact posterior restricted to the
    integrated regions: they differ from the global E-step's by at most the certified fraction
    ``exp(log_bound)`` (<= exp(−tol)) of the datum's mass, which is also all the mass the regions left out
    carry. ``stats.patterns`` are the local regions' patterns, so the closed-form M-step
    (:func:`pyro_cpa.infer.mstep.m_step`) runs on them unchanged. Fully observed, unweighted data only.
    """
    from ..infer.estep import EStepStats

    with torch.no_grad():
        part = local_partition(decoder, x, obs_var, prior_var, tol, **partition_kwargs)
        N, D = x.shape
        xd = x.to(dtype)
        R, S = len(part.regions), part.regions.latent_dim
        K = S + 1
        Z = xd.new_zeros(R, K, K)
        X = xd.new_zeros(R, D, K)
        q = xd.new_zeros(R, D)
        loglik = xd.new_zeros(N)
        log_pruned = xd.new_full((N,), float("-inf"))
        for a, b, r, bt in _local_blocks(part, x, obs_var, prior_var, dtype, prune_tol, True, chunk_size):
            lse = _scatter_logsumexp(bt.terms, bt.n, b - a)
            e0 = (bt.terms - lse[bt.n]).exp()
            mt = torch.cat([bt.mean, torch.ones_like(bt.mean[:, :1])], -1)
            Zn = mt.unsqueeze(-1) * mt.unsqueeze(-2)
            Zn[:, :S, :S] += bt.cov
            rr = r[bt.idx]
            xn = xd[a:b][bt.n]
            Z.index_add_(0, rr, e0[:, None, None] * Zn)
            X.index_add_(0, rr, (e0[:, None] * xn).unsqueeze(-1) * mt.unsqueeze(-2))
            q.index_add_(0, rr, e0[:, None] * xn.square())
            loglik[a:b] = lse
            log_pruned[a:b] = bt.log_pruned
        if not bool(torch.isfinite(loglik).all()):
            raise PyroCPAError("partition='local': some datum got no region with positive mass (the certificate's "
                               "leaves are empty); this is a bug, please report the decoder and data")
        log_bound = torch.logaddexp(part.certificate.log_neglected.to(dtype), log_pruned) - loglik
    stats = EStepStats(Z=Z, X=X, q=q, loglik=loglik, patterns=[p.clone() for p in part.regions.patterns],
                       num_data=float(N))
    return LocalEStep(stats, log_bound, part)
