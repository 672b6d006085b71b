"""Intra-op thread count of the library's exact computations.

The exact integrals and E-steps run as many small tensor operations (a few thousand to a few hundred thousand
elements each) on data-dependent batches. Splitting such an operation over torch's intra-op thread pool costs a
synchronisation per operation, which dominates at these sizes and becomes catastrophic when the cores are
shared (measured on a 2-core machine: 2 threads 4–25× slower than 1 on the S = 2 pair integrals, the S = 2
E-step and log p, and the circle E-step). A thread count above 1 also changes which elements of an operation
take the vectorised and which the scalar code path (the work is split at thread-dependent offsets), so results
could change in the last bit with the thread count. :func:`intra_op_threads` therefore runs the library's
entry points on one intra-op thread and restores the caller's setting afterwards: results are bit-identical
for every ``torch.set_num_threads`` and never slower with more threads. Parallelism across data is available
through :mod:`pyro_cpa.infer.distributed`.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

__all__ = ["LIBRARY_THREADS", "intra_op_threads", "with_library_threads"]

LIBRARY_THREADS = 1
"""Intra-op threads of the library's exact computations (see the module docstring)."""


@contextmanager
def intra_op_threads(threads: int = LIBRARY_THREADS):
    """Run the enclosed code with at most ``threads`` torch intra-op threads; restore the caller's count after.

    Nested uses are cheap (``torch.set_num_threads`` is only called when the count changes). The setting is
    process-wide, as ``torch.set_num_threads`` is.
    """
    before = torch.get_num_threads()
    target = min(before, int(threads))
    if target == before:
        yield
        return
    torch.set_num_threads(target)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def with_library_threads(fn):
    """Decorator: run ``fn`` under :func:`intra_op_threads` (``LIBRARY_THREADS``)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with intra_op_threads(LIBRARY_THREADS):
            return fn(*args, **kwargs)
    return wrapper
