"""Shape helpers."""
from __future__ import annotations

import torch
from pyro.distributions.util import broadcast_shape


def broadcast_shapes(*shapes) -> torch.Size:
    """The broadcast of ``shapes`` (NumPy rules) as a ``torch.Size``; ValueError naming the shapes if they do not
    broadcast.

    Pyro's pure-Python ``broadcast_shape`` rather than ``torch.broadcast_shapes``: in torch 2.13 the latter's first
    call imports ``torch.fx.experimental.symbolic_shapes`` and with it SymPy, 0.2–0.4 s added to the first exact
    log p of a process that has not imported it otherwise (Pyro does not; constructing a torch optimizer does, via
    torch._dynamo, so SVI users pay it anyway — EM fits and scoring need not). tests/test_first_call.py."""
    return torch.Size(broadcast_shape(*shapes))
