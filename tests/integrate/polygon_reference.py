"""Exact-input polygons for the S = 2 reference tests."""
import math

import torch


def triangle(V, rot: float = 0.0):
    """(G (3, 2), d (3,)): the triangle with vertices ``V`` rotated by ``rot`` as {u : G u <= d}, G the unit
    outward normals of its edges (float64)."""
    c, s = math.cos(rot), math.sin(rot)
    V = [(c * x - s * y, s * x + c * y) for x, y in V]
    G, d = [], []
    for i in range(3):
        p, q, o = V[i], V[(i + 1) % 3], V[(i + 2) % 3]
        n = (q[1] - p[1], -(q[0] - p[0]))
        nn = math.hypot(*n)
        n = (n[0] / nn, n[1] / nn)
        if n[0] * (o[0] - p[0]) + n[1] * (o[1] - p[1]) > 0:
            n = (-n[0], -n[1])
        G.append(n)
        d.append(n[0] * p[0] + n[1] * p[1])
    return torch.tensor(G, dtype=torch.float64), torch.tensor(d, dtype=torch.float64)
