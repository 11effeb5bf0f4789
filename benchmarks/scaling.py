"""--distributed: data-parallel CoOp (coop_min/distributed.py), in two parts.

- shard_cost, a per-rank cost model on one device: the text encoder's forward and backward over the
  part of the classes that one of N ranks encodes (its FastConfig.class_shard, without the gather),
  at 1k, 10k and 21k classes: ms and peak memory per rank.
- scaling, where there are several GPUs (or on the CPU, with gloo): N processes each take their part
  of a global batch of 32 and run whole CoOp train steps as coop_min.train does (image encoder,
  sharded text encoder, all-gather, fused head, gradient all-reduce, SGD); steps/s for each N.
"""
import json
import os
import socket
import tempfile
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from benchmarks.methods import ARCHS, LR, MOMENTUM, WEIGHT_DECAY, Settings, classnames, sgd_step
from benchmarks.timing import free, nbytes, run_method, time_ms
from coop_min import distributed as dist
from coop_min.clip import CLIP, convert_dtype
from coop_min.cuda_graph import TrainStep
from coop_min.fast import ClassShard, FastConfig, FastPromptedCLIP
from coop_min.prompts import CoOpPromptLearner, PromptConfig

GLOBAL_BATCH = 32


def _clip(device, settings, tiny):
    """(config, the frozen ViT-B/16, or a tiny ViT, at random init in the compute dtype)."""
    config = ARCHS["vit_tiny" if tiny else "vit_b16"]
    torch.manual_seed(0)
    return config, convert_dtype(CLIP(config).eval().requires_grad_(False).to(device), settings.ours_dtype)


def _coop_learner(clip, n_classes, device):
    return CoOpPromptLearner(clip, classnames(n_classes), PromptConfig(method="coop", n_ctx=16, ctx_init="")).to(device)


def _no_gather(t):  # one rank alone: its own features are all there is
    return t


def _text_step(clip, learner, classes, settings):
    """An SGD step on the text features of `classes` alone: the text encoder's forward and backward."""
    config = FastConfig(fused_elementwise=settings.fused_elementwise, class_shard=ClassShard(classes, _no_gather))
    model = FastPromptedCLIP(clip, learner, config).train()
    return sgd_step(lambda: model.text_features().float().square().mean(), model.trainable_parameters())


def shard_cost(device, settings: Settings, smoke=False, repeats=None):
    """Rows {"classes", "world", "classes_per_rank", "ms", "peak_gib"} for rank 0 of N, on one device."""
    _, clip = _clip(device, settings, smoke)
    rows = []
    for C in ((20, 50) if smoke else (1000, 10000, 21000)):
        learner = _coop_learner(clip, C, device)
        for N in ((1, 2) if smoke else (1, 2, 4, 8)):
            classes = range(*dist.split(C, dist.World(0, N)))
            r = run_method(lambda: _text_step(clip, learner, classes, settings), device, settings.warmup,
                           repeats or (2 if smoke else 5), nbytes(clip))
            rows.append({"classes": C, "world": N, "classes_per_rank": len(classes), **r})
            peak = "" if r.get("peak_gib") is None else f", {r['peak_gib']:.2f} GiB"
            result = r["error"] if "error" in r else f"{r['ms']:.1f} ms{peak}"
            print(f"    text encoder, {C} classes, rank of {N}: {result}", flush=True)
        learner = None
        free(device)
    return rows


@dataclass(frozen=True)
class _Job:
    """What every spawned rank needs (pickled to it)."""
    device: str
    settings: Settings
    tiny: bool
    classes: int
    repeats: int
    port: int
    out: str                 # rank 0 writes {"world", "ms"} here


def _worker(rank, world_size, job: _Job):
    """One rank of a data-parallel CoOp run: the same steps as coop_min.train, timed on rank 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job.port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1 if job.device == "cpu" else torch.get_num_threads())
    world, dev = dist.setup(job.device)
    device = torch.device(dev)
    config, clip = _clip(device, job.settings, job.tiny)
    learner = _coop_learner(clip, job.classes, device)
    shard = dist.class_shard(learner.n_cls, world)
    model = FastPromptedCLIP(clip, learner, FastConfig(fused_elementwise=job.settings.fused_elementwise,
                                                       class_shard=ClassShard(*shard))).train()
    g, B, r = torch.Generator().manual_seed(1), GLOBAL_BATCH, config.image_resolution
    images = torch.randn(B, 3, r, r, generator=g).to(device)
    labels = torch.randint(0, job.classes, (B,), generator=g).to(device)
    lo, hi = dist.split(B, world)
    params = model.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    train_step = TrainStep(lambda: (model.loss(images[lo:hi], labels[lo:hi]) * ((hi - lo) / B),),
                           optimizer, after_backward=lambda: dist.all_reduce_grads(params))

    def step():
        train_step()
        dist.barrier(world)                                              # a step ends when every rank's ends
    ms = time_ms(step, device, job.settings.warmup, job.repeats)
    if world.main:
        with open(job.out, "w") as f:
            json.dump({"world": world_size, "ms": ms}, f)
    dist.end_rank()                  # as coop_min.train: gloo's teardown has aborted finished ranks


def _spawn(n, device, settings, tiny, classes, repeats):
    """{"world", "ms"} of n processes on a free local port."""
    with socket.socket() as s, tempfile.TemporaryDirectory() as tmp:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        job = _Job(device.type, settings, tiny, classes, repeats, port, os.path.join(tmp, "rank0.json"))
        mp.start_processes(_worker, args=(n, job), nprocs=n, start_method="spawn")
        with open(job.out) as f:
            return json.load(f)


def scaling(device, settings: Settings, smoke=False, repeats=None):
    """Rows {"world", "ms", "classes", "global_batch", "steps_per_s", "speedup"} for N = 1, 2, 4, 8
    processes (as many as there are GPUs; two on the CPU); [] with one GPU."""
    available = torch.cuda.device_count() if device.type == "cuda" else 2
    worlds = [n for n in (1, 2, 4, 8) if n <= available]
    if len(worlds) < 2:
        print("    one GPU: no scaling to measure (the cost model above is the per-rank estimate)", flush=True)
        return []
    classes, rows = 50 if smoke else 1000, []
    for n in worlds:
        r = _spawn(n, device, settings, smoke, classes, repeats or (3 if smoke else 20))
        r.update(classes=classes, global_batch=GLOBAL_BATCH, steps_per_s=1e3 / r["ms"])
        r["speedup"] = rows[0]["ms"] / r["ms"] if rows else 1.0
        rows.append(r)
        print(f"    {n} process{'es' if n > 1 else ''}: {r['ms']:.1f} ms/step, {r['steps_per_s']:.2f} steps/s, "
              f"{r['speedup']:.2f}x", flush=True)
    return rows
