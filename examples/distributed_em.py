"""Exact EM on data sharded over processes (torch.distributed), then exact ML by collapse + SVI under DDP.

Every rank holds a contiguous shard of the data (here: the circle's N points cut by ``shard_range``) and runs
this same script:

1. ``EM(model, distributed=True)``: the per-region E-step statistics and the exact NLLs are summed exactly
   over the ranks (an integer fixed-point all-reduce, O(R·(S² + D·S)) numbers per reduction, independent of
   N), every rank takes the same M-step and accept/reject decision, and the trajectory is that of one process
   holding all the data, bit for bit. Rank 0 writes a checkpoint (decoder, param store with σx, step) every
   ``--checkpoint-every`` steps; ``--resume`` continues from it exactly.
2. Exact evaluation of all data: ``information_criteria(model, x_shard, distributed=True)``, the exact ELBO of
   ``ExactPosterior`` (``exact_elbo(..., distributed=True)``) and ``all_reduce_sum(log_evidence(model, x_shard))``.
3. Exact maximum likelihood by gradient, Pyro's usual data-parallel pattern: the loss of ``collapse(model)``
   with ``empty_guide`` (the exact −Σ log p(x_n) of the shard, ``Trace_ELBO().differentiable_loss``) is the
   forward of an ``nn.Module`` wrapped in ``DistributedDataParallel``, which all-reduces the gradients.

Run it with torchrun (gloo on CPU, nccl on GPUs)::

    torchrun --nproc_per_node 2 examples/distributed_em.py
    torchrun --nproc_per_node 2 examples/distributed_em.py --checkpoint ckpt.pt --resume

or let it spawn the ranks itself (gloo, a file:// rendezvous)::

    python examples/distributed_em.py --nproc 2 --quick --out /tmp/dem
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time

import pyro
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import base_parser, print_table, setup, write_json  # noqa: E402

from pyro_cpa.datasets import noisy_circle  # noqa: E402
from pyro_cpa.demo.circle import make_decoder, make_model  # noqa: E402
from pyro_cpa.distributions import CPALikelihood  # noqa: E402
from pyro_cpa.geometry import cached_linear_regions  # noqa: E402
from pyro_cpa.guides import ExactPosterior  # noqa: E402
from pyro_cpa.infer import (EM, all_reduce_sum, collapse, empty_guide, exact_elbo, information_criteria,  # noqa: E402
                            log_evidence)
from pyro_cpa.infer.distributed import (init_distributed, load_checkpoint, save_checkpoint,  # noqa: E402
                                        shard_range)


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--n", type=int, default=2000, help="data points in all (split over the ranks)")
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--em-steps", type=int, default=30)
    p.add_argument("--svi-steps", type=int, default=200, help="Adam steps of collapse + SVI under DDP")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not launched by torchrun")
    p.add_argument("--backend", default=None, help="gloo or nccl (default: nccl if CUDA is available, else gloo)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective waits for a dead rank")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (rank 0 writes it)")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.em_steps, args.svi_steps, args.checkpoint_every = 300, 4, 20, 2
    return args


class CollapsedLoss(nn.Module):
    """The exact NLL of a shard, −Σ_n log p(x_n), as the forward of a module (for DistributedDataParallel).

    The model is the circle's with σx = exp(log_sx) an ``nn.Parameter``; ``collapse`` integrates z out exactly
    and the loss is Pyro's ``Trace_ELBO().differentiable_loss`` with ``empty_guide`` (zero-variance)."""

    def __init__(self, decoder: nn.Module, obs_scale: float):
        super().__init__()
        self.decoder = decoder
        self.log_sx = nn.Parameter(torch.tensor(math.log(obs_scale)))
        self.elbo = pyro.infer.Trace_ELBO()

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", pyro.distributions.Normal(0.0, 1.0).expand([1]).to_event(1))
            pyro.sample("x", CPALikelihood(self.decoder, z, self.log_sx.exp()), obs=x)

    def forward(self, x):
        return self.elbo.differentiable_loss(collapse(self.model), empty_guide, x)


def run(args) -> dict:
    rank, world = init_distributed(args.backend, args.timeout)
    setup(args if rank == 0 else _no_out(args))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")
    x = noisy_circle(args.n, noise=args.noise, seed=args.seed)   # in real use, each rank reads only its shard
    start, stop = shard_range(args.n, rank, world)
    xs = x[start:stop].to(device)

    # 1. exact EM on the shards ----------------------------------------------------------------------------
    decoder = make_decoder(args.seed).to(device)
    model = make_model(decoder)
    step0 = 0
    if args.checkpoint and args.resume and os.path.exists(args.checkpoint):
        step0 = load_checkpoint(args.checkpoint, decoder, map_location=device)["step"]
    em = EM(model, distributed=True)
    initial_nll = em.evaluate_loss(xs)
    history, seconds = [], []
    for step in range(step0, args.em_steps):
        t0 = time.perf_counter()
        history.append(em.step(xs))
        seconds.append(time.perf_counter() - t0)
        if rank == 0 and (step + 1) % max(1, args.em_steps // 5) == 0:
            print(f"EM step {step + 1:4d}  NLL/N = {history[-1] / args.n:.5f}", flush=True)
        if args.checkpoint and (step + 1) % args.checkpoint_every == 0:
            save_checkpoint(args.checkpoint, decoder, step + 1)
    R = len(cached_linear_regions(decoder))

    # 2. exact evaluation of all ranks' data ----------------------------------------------------------------
    ic = information_criteria(model, xs, distributed=True)
    elbo = exact_elbo(model, ExactPosterior(model), xs, distributed=True)
    loglik = float(all_reduce_sum(log_evidence(model, xs)))

    # 3. collapse + SVI under DistributedDataParallel (exact ML by gradient) --------------------------------
    svi_decoder = make_decoder(args.seed).to(device)
    module = CollapsedLoss(svi_decoder, 0.5).to(device)
    ddp = DistributedDataParallel(module)   # broadcasts rank 0's parameters, all-reduces (averages) gradients
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    svi_nll = math.nan
    for _ in range(args.svi_steps):
        opt.zero_grad()
        loss = ddp(xs)                      # −Σ_{n in shard} log p(x_n)
        (loss * world).backward()           # DDP averages: the gradient of the total NLL of all ranks
        opt.step()
    with torch.no_grad():
        svi_nll = float(all_reduce_sum(module(xs).detach()))

    S, D = 1, 2
    E = R * ((S + 1) ** 2 + D * (S + 1) + D) + 4     # entries of one exact reduction (infer.distributed)
    result = {"world_size": world, "n": args.n, "shard": [start, stop], "em_steps": args.em_steps,
              "initial_nll": initial_nll,
              "em_nll_history": history, "em_nll": history[-1] if history else math.nan,
              "em_seconds_per_step": sum(seconds[1:]) / max(1, len(seconds) - 1) if seconds else math.nan,
              "regions": R, "aic": ic.aic, "bic": ic.bic, "log_likelihood": ic.log_likelihood,
              "elbo_exact_posterior": float(elbo.total), "log_evidence_sum": loglik,
              "svi_nll": svi_nll, "obs_scale": float(pyro.param("obs_scale").detach()),
              "bytes_per_reduction": 40 * E + 48 * world}
    if rank == 0:
        print_table([{"method": "EM (exact, distributed)", "nll": result["em_nll"] / args.n},
                     {"method": "collapse + SVI (DDP)", "nll": svi_nll / args.n}],
                    [("method", "method", ""), ("nll", "NLL/N", "{:.5f}")],
                    title=f"{world} ranks, N = {args.n}, {R} regions")
        print(f"AIC {ic.aic:.2f}  BIC {ic.bic:.2f}  ELBO(ExactPosterior) = log p(x) = {loglik:.4f}  "
              f"{result['em_seconds_per_step']:.3f} s per EM step, {result['bytes_per_reduction']} bytes per reduction")
        write_json(args, "distributed_em.json", result)
    del ddp, opt                            # DDP's reducer holds the group: release it before the group goes
    leave_group()
    return result


#: Set in the ranks this script spawns itself (``_spawned``): they leave by ``os._exit`` after the barrier.
_SELF_SPAWNED = False


def leave_group() -> None:
    """Leave the process group cleanly: every rank reaches this point (a barrier, so no rank closes its
    connections while a peer still uses them), then the group is destroyed. Without the barrier a gloo rank that
    tears down first can abort its peer ("terminate called without an active exception"). A rank this script
    spawned itself skips the destruction: it exits right after (``_spawned``), and gloo's teardown has aborted
    such a rank after the barrier (seen once in CI); under torchrun the group is destroyed as it should be."""
    import gc

    gc.collect()
    torch.distributed.barrier()
    if not _SELF_SPAWNED:
        torch.distributed.destroy_process_group()


def _no_out(args):
    import copy

    other = copy.copy(args)
    other.out = None
    return other


def _spawned(rank, world, init_file, args):
    global _SELF_SPAWNED
    _SELF_SPAWNED = True
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    init_distributed(args.backend or "gloo", args.timeout, init_method=f"file://{init_file}", rank=rank,
                     world_size=world)
    run(args)
    # A rank this script spawned leaves without the interpreter's teardown: gloo's C++ threads can abort a process
    # at exit ("terminate called without an active exception") after its work and the group's barrier are done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(args) -> dict:
    """Under torchrun: this rank's part. Otherwise: spawn ``--nproc`` gloo ranks and return rank 0's result."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return run(args)
    import json

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        args.out = out
        mp.spawn(_spawned, args=(args.nproc, os.path.join(tmp, "init"), args), nprocs=args.nproc)
        with open(os.path.join(out, "distributed_em.json")) as fh:
            return json.load(fh)


if __name__ == "__main__":
    main(parse_args())
