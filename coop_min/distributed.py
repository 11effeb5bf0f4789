"""Data-parallel training and evaluation on torch.distributed, launched by torchrun.

    torchrun --nproc_per_node 4 -m coop_min.train --data PATH ...

A run under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) is one training run split
across processes, equal to the single-process run with the same settings up to float rounding:
- Each global batch (the same order as one process: a function of seed and epoch) is cut into
  `world` contiguous parts, one per rank (`split`); the global batch size stays --batch-size.
- A rank's loss is its part of the global mean, sum(CE) / global batch, so the exact gradient is the
  sum over ranks: `all_reduce_grads` sums the learnable parameters' gradients, and every rank then
  takes the same SGD step from the same parameters. (DDP would average instead; with uneven parts
  that is not the global mean, and the context is too small for bucketed overlap to matter.)
- CoOp's text features depend on the context only, not on the images, so instead of every rank
  encoding all C classes, rank r encodes classes `split(C)[r]` and `gather_cat` (autograd-aware)
  assembles the (C, D) features; in backward each rank's slice of the summed gradient flows to the
  classes it encoded. CoCoOp's (image, class) prompts are sharded by image with the batch.
- Evaluation: each rank scores its part of every test batch, and the integer predictions and labels
  are gathered, so the metrics are exactly those of one process.
Rank 0 alone writes files; `barrier` orders the rest after it.

Without torchrun every function here is the identity (world 1), so callers need no branches.
"""
import os
import sys
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self):  # the process that writes files and prints
        return self.rank == 0


def check_device(device):
    """Raise ValueError with one line unless `device` is cpu or a CUDA device this machine has."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: only cpu and cuda are supported")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but torch sees no CUDA GPU (a CPU build of torch, or no "
                         "driver); use --device cpu")
    if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device} but this machine has {torch.cuda.device_count()} GPU(s)")


def setup(device):
    """Join torchrun's process group if there is one: (World, the device this rank uses).
    NCCL for CUDA, gloo for CPU; CUDA ranks take cuda:LOCAL_RANK."""
    check_device(device)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local_rank:
            raise ValueError(f"local rank {local_rank} has no GPU (this node has "
                             f"{torch.cuda.device_count()}); lower --nproc_per_node or pass --device cpu")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)
    return World(rank, size, local_rank), device


def teardown():
    """Leave torchrun's process group when a run stops on an error (a no-op without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def end_rank():
    """After a successful torchrun run: wait for every rank, flush, and end the process at once.

    Why: in CI, ranks that had finished everything (files written, results printed) then aborted in
    the C++ teardown of the gloo group ("terminate called without an active exception", SIGABRT):
    twice in train runs, once in bench.py's scaling workers, also after destroy_process_group.
    Nothing is left to do but Python's shutdown, so os._exit skips it. Files are closed or flushed
    by then (atomic writes, flushed logs). A no-op without a process group."""
    if not dist.is_initialized():
        return
    dist.barrier()                           # no rank leaves while another still needs it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def split(n, world: World):
    """This rank's contiguous part [lo, hi) of n items: sizes differ by at most one, rank order."""
    return n * world.rank // world.size, n * (world.rank + 1) // world.size


def barrier(world: World):
    if world.size > 1:
        dist.barrier()


def part_sizes(n, world: World):
    """The sizes of every rank's part of n items (as `split`), known without communication."""
    return [n * (r + 1) // world.size - n * r // world.size for r in range(world.size)]


def class_shard(n_cls, world: World):
    """FastConfig.class_shard for data-parallel CoOp: (this rank's classes, a range; a gather that
    gives every rank all (C, D) features with gradients flowing back to the owners)."""
    lo, hi = split(n_cls, world)
    return range(lo, hi), partial(gather_cat, sizes=part_sizes(n_cls, world))


def _gather(x, sizes=None):
    """(every rank's x concatenated along dim 0 in rank order, the ranks' sizes); sizes may differ,
    and are exchanged first unless given."""
    if sizes is None:
        size = torch.tensor([len(x)], device=x.device)
        sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, size)
        sizes = [int(s) for s in sizes]
    padded = x                                                               # all_gather needs equal shapes
    if len(x) < max(sizes):
        padded = torch.cat([x, x.new_zeros((max(sizes) - len(x), *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sizes


def _active():
    return dist.is_initialized() and dist.get_world_size() > 1


def all_gather_cat(x, sizes=None):
    """Concatenate every rank's x (n_r, ...) along dim 0 in rank order; n_r may differ. No autograd."""
    return _gather(x, sizes)[0] if _active() else x


class _GatherCat(torch.autograd.Function):
    """all_gather_cat with a backward: every rank's loss depends on every rank's rows, so the gradient
    of this rank's rows is the sum over ranks of the gradient of the gathered tensor, sliced."""

    @staticmethod
    def forward(ctx, x, sizes):
        out, sizes = _gather(x, sizes)
        ctx.rows = sum(sizes[:dist.get_rank()]), len(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)             # all_reduce works in place
        dist.all_reduce(grad)
        start, n = ctx.rows
        return grad[start:start + n], None


def gather_cat(x, sizes=None):
    """all_gather_cat that gradients flow through (to the rank that computed each row)."""
    return _GatherCat.apply(x, sizes) if _active() else x


def all_reduce_grads(params):
    """Sum the gradients of `params` over ranks, in place, in one flat buffer (a None gradient is 0)."""
    if not _active():
        return
    params = list(params)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def all_reduce_sum(x):
    """Sum a tensor over ranks (a copy; x is unchanged)."""
    x = x.clone()
    if _active():
        dist.all_reduce(x)
    return x
