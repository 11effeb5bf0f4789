"""`python -m coop_min.train`: learn CoOp / CoCoOp prompts the way the papers do.

Resolve the config (unset flags take the paper default for the method, shot count and dataset),
load the frozen CLIP and the few-shot data, then epochs of SGD over the context (and Meta-Net) with
Dassl's schedule -- one constant warm-up epoch at 1e-5, then a cosine stepped once per epoch
(`train_epochs`, the loop). The last epoch's prompts are evaluated on the test split. The
model computes with the fast path (coop_min/fast.py) unless --reference-path asks for the method
as written in coop_min/prompts.py; both give the same numbers.

Everything a run writes goes to one folder, through one `runs.Run` that the loop receives; files are
replaced atomically, so a kill never leaves a half-written checkpoint. `--resume` restarts from
`state.pt` and continues bit for bit: the batch order and each image's augmentation are functions
of (seed, epoch, index), and the RNG, optimizer, schedule position and metrics file are restored.

Under torchrun the same run is data-parallel (coop_min/distributed.py): each process takes its part
of every global batch, CoOp's classes are sharded for the text encoder, gradients are summed, and
rank 0 alone writes the run folder; the result equals one process up to float rounding.
"""
import dataclasses
import json
import math
import os
import sys
import time
from functools import partial

import torch

from coop_min import checkpoint, cli, cuda_graph, data, distributed, evaluate, inputs, runs
from coop_min.clip import convert_dtype
from coop_min.fast import ClassShard, FastConfig, FastPromptedCLIP
from coop_min.options import (RESUME_MAY_CHANGE, TrainConfig, add_options, config, flag_fields, prompt_config,
                              resolve)
from coop_min.progress import Progress, duration
from coop_min.prompts import PromptedCLIP, build_prompted_clip, load_prompt
from coop_min.runs import Position
from coop_min.templates import templates_for
from coop_min.transforms import train_transform

# ----------------------------------------------------------------------------------------------
# the paper's schedule


def learning_rate(epoch, cfg):
    """Dassl's constant warm-up then cosine, stepped once per epoch (shifted by the warm-up, never 0)."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.epochs))


# ----------------------------------------------------------------------------------------------
# the training loop


def train_epochs(cfg, model, opt, dataset, run, clock=time.monotonic) -> Progress:
    """SGD over the epochs, from the start or from where `run`'s restored checkpoint left off. In the
    inner loop, the step; below it, the bookkeeping, all through `run`: a metrics line every
    --print-every steps and at the epoch's end, a checkpoint every --save-every steps and at the
    epoch's end. Returns the Progress (its training seconds and throughput)."""
    params = model.trainable_parameters()
    sgd_step = cuda_graph.TrainStep(partial(_step_forward, model), opt, cuda_graph=cfg.cuda_graph,
                                    after_backward=partial(distributed.all_reduce_grads, params))
    per_epoch = _batches_per_epoch(len(dataset), cfg.batch_size)
    first = run.position
    progress = Progress((cfg.epochs - first.epoch) * per_epoch - first.batch, clock)
    unreported = progress.resume(run.tally)
    for epoch in range(first.epoch, cfg.epochs):
        lr = learning_rate(epoch, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        rng = torch.get_rng_state()          # what a mid-epoch resume restores: its loader draws again
        start = first.batch if epoch == first.epoch else 0
        loader = data.make_loader(dataset, cfg.batch_size, seed=cfg.seed, epoch=epoch, start_batch=start,
                                  num_workers=cfg.workers, pin_memory=cfg.device.startswith("cuda"),
                                  rank=run.world.rank, world_size=run.world.size)
        # loss sum, correct, images of the steps since the last metrics line (every rank's, once summed)
        sums = torch.tensor(unreported, device=cfg.device)
        unreported = [0.0] * 3
        t0 = clock()
        model.train()
        for batch, (images, labels) in enumerate(loader, start=start):
            loss, step_sums = _train_step(sgd_step, model, images, labels, cfg.device)
            _check_finite(loss, Position(epoch, batch), run)
            sums += step_sums                                             # no host read
            progress.step()

            done = Position(epoch, batch + 1)
            if done.batch % cfg.print_every == 0 or done.batch == per_epoch:
                _report(run, progress, sums, done, cfg, per_epoch)
            if cfg.save_every and done.batch % cfg.save_every == 0 and done.batch < per_epoch:
                line_sums = distributed.all_reduce_sum(sums).tolist()   # a collective: every rank takes part
                run.save(model.learner, opt, done, rng, progress.tally(line_sums))
        run.log.record(epoch=epoch + 1, epoch_time_s=round(clock() - t0, 3), lr=lr, **progress.epoch_means())
        # the epoch's last step made a metrics line: nothing is unreported
        run.save(model.learner, opt, Position(epoch + 1, 0), torch.get_rng_state(), progress.tally([0.0] * 3))
    return progress


def _train_step(sgd_step, model, images, labels, device):
    """One SGD step on this rank's part of a global batch -> (its share of the mean loss, its
    [CE sum, correct, images] on the device): nothing is read on the host, so a graph can replay it."""
    _check_labels(labels, model.learner.n_cls)
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    n_local = torch.full((), float(len(labels)), device=device)
    n_global = distributed.all_reduce_sum(n_local)
    loss, correct = sgd_step(images, labels, n_local / n_global)
    return loss, torch.stack([loss.float() * n_global, correct.float(), n_local])


def _step_forward(model, images, labels, share):
    """This rank's part of a global batch -> (its share of the mean loss, sum(CE) / global batch; its
    correct predictions). share = its images / the global batch, as a tensor: a step that reads no
    device value on the host can be captured (cuda_graph.py). A rank with no images still encodes
    its text shard, since the gather in it is collective."""
    if len(labels) == 0:
        t = None if model.is_conditional else model.text_features()
        zero = sum(p.sum() for p in model.trainable_parameters()) * 0     # a graph, so backward runs
        if t is not None:
            zero = zero + t.sum() * 0
        return zero, torch.zeros((), dtype=torch.long, device=share.device)
    features = model.encode_images(images)
    t = model.text_features(features if model.is_conditional else None)
    if isinstance(model, FastPromptedCLIP):  # labels were checked on the host: the fused head skips its sync
        loss = model.loss(features, labels, text=t, check_labels=False)
    else:
        loss = model.loss(features, labels, text=t)
    with torch.no_grad():
        correct = (model.logits_from_features(features, text=t.detach()).argmax(-1) == labels).sum()
    return loss * share, correct


def _check_labels(labels, n_cls):  # on the host, before the step (a captured step cannot check)
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < n_cls:
        raise ValueError(f"labels must be in [0, {n_cls}), got {labels.tolist()[:8]}")


def _check_finite(loss, position, run):
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at epoch {position.epoch + 1} batch "
                                 f"{position.batch + 1}; stopped. {run.kept()} (lower --lr or use "
                                 "--precision fp32)")


def _batches_per_epoch(n_images, batch_size):  # make_loader's count: Dassl drops a last partial batch
    return n_images // batch_size if n_images >= batch_size else 1


def _report(run, progress, sums, done, cfg, per_epoch):
    """A metrics line of the steps since the last one (every rank's images; `sums` is zeroed), and a
    progress line when one is due."""
    loss_sum, correct, n = distributed.all_reduce_sum(sums).tolist()   # a collective: every rank takes part
    sums.zero_()
    progress.add(loss_sum, int(correct), int(n))
    lr = learning_rate(done.epoch, cfg)
    run.log.record(epoch=done.epoch + 1, batch=done.batch, loss=round(loss_sum / max(n, 1), 6),
                   acc=round(100.0 * correct / max(n, 1), 4), lr=lr)
    if progress.due():
        run.log.print(f"epoch {done.epoch + 1}/{cfg.epochs} batch {done.batch}/{per_epoch} lr {lr:.3e} "
                      f"{progress.line()}")


# ----------------------------------------------------------------------------------------------
# a run: check everything, train, test


def run(cfg: TrainConfig):
    """Train, evaluate on the test split, write every run output; returns the results dict.
    Everything is checked before the run folder changes. Under torchrun: data-parallel, and rank 0
    writes (every rank returns the results)."""
    inputs.check_weights(cfg.weights)        # the most useful errors first: the weights, then the data
    root = inputs.data_root(cfg.data)
    splits = data.load_dataset(root, cfg.dataset)
    cfg = resolve(cfg, splits.name)
    world, device = distributed.setup(cfg.device)
    torch.backends.cudnn.benchmark = device.startswith("cuda")   # fixed shapes: let cuDNN pick (RN50's convs)
    _decide_cuda_graph(cfg, device, world)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "resume"}
    runs.start_folder(cfg.output, settings, cfg.resume, free=RESUME_MAY_CHANGE)
    runs.check_writable(cfg.output)
    if cfg.resume and os.path.exists(os.path.join(cfg.output, "results.json")):
        return _finished(cfg.output)
    state = checkpoint.read(cfg.output) if cfg.resume else None
    cfg.device = device
    torch.manual_seed(cfg.seed)
    few = _few_shot_splits(cfg, splits)
    train_split = data.subsample_classes(few, cfg.subsample)
    clip, clip_sha = inputs.load_weights(cfg.weights, cfg.device)
    learner = make_learner(cfg, clip, train_split.classnames)
    model = _model(cfg, clip, learner, world, train=True)
    sgd = cuda_graph.SGD if cfg.cuda_graph else torch.optim.SGD   # a graph reads its lr from the device
    opt = sgd(model.trainable_parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    run = runs.Run(cfg.output, clip_sha, world, state)
    run.restore(learner, opt, cfg.epochs)
    bad = _bad_images(cfg, few, train_split.test)
    run.start(cfg, few)
    _describe(run, cfg, model, train_split, root, bad)
    dataset = data.ImageDataset(train_split.train, train_transform(clip.visual.input_resolution), train=True,
                                seed=cfg.seed, cache_decoded=len(train_split.train) <= 20000,
                                skip_bad=cfg.skip_bad_images)
    progress = train_epochs(cfg, model, opt, dataset, run)
    cost = _cost(progress, device)
    run.log.print(f"finished training in {duration(cost['train_seconds'])}")
    results = {**_test(cfg, clip, learner, few, run), **cost}
    run.write_results(results)
    run.log.print(f"results: {os.path.join(run.folder, 'results.json')}")
    run.close()
    return results


def _decide_cuda_graph(cfg, device, world):
    """--cuda-graph unset: on for one CUDA process on the fast path, where the captured step is exact
    (tests/test_bench_graph.py) and faster; given elsewhere: refused."""
    possible = device.startswith("cuda") and world.size == 1 and not cfg.reference_path
    if cfg.cuda_graph is None:
        cfg.cuda_graph = possible
    if cfg.cuda_graph and not possible:
        raise cli.UsageError("--cuda-graph captures the fast path of one process on a CUDA device; "
                             "drop it for CPU, torchrun or --reference-path runs")


def _few_shot_splits(cfg, splits):
    """The few-shot train/val sets: sampled with the seed, or on --resume the run's split.json."""
    if cfg.resume:
        return data.load_split(os.path.join(cfg.output, "split.json"))
    return data.few_shot(splits, cfg.shots, cfg.seed)


def make_learner(cfg, clip, classnames):
    """The prompt learner on the fp32 CLIP, whose phrase init is the checkpoint's own values (as the
    official code's); then the CLIP is cast to the compute precision and the learner rebuilt on it."""
    prompt_cfg = prompt_config(cfg)
    init = build_prompted_clip(clip, classnames, prompt_cfg, seed=cfg.seed).learner.state_dict()
    convert_dtype(clip, inputs.DTYPES[cfg.precision])
    learner = build_prompted_clip(clip, classnames, prompt_cfg, seed=cfg.seed).learner   # CLIP's dtype
    learner.load_state_dict(init)
    return learner


def _model(cfg, clip, learner, world=distributed.World(), train=False):
    """The method as written (--reference-path) or the fast path, on `learner`; training under
    torchrun, CoOp's classes are sharded across the processes for the text encoder."""
    if cfg.reference_path:
        return PromptedCLIP(clip, learner)
    shard = None
    if train and world.size > 1 and cfg.shard_text and learner.config.method == "coop":
        shard = ClassShard(*distributed.class_shard(learner.n_cls, world))
    # length buckets pay under a CUDA graph, where each chunk's shape is captured once
    fast = FastConfig(shared_prefix=cfg.shared_prefix, length_buckets=cfg.cuda_graph, class_shard=shard)
    return FastPromptedCLIP(clip, learner, fast)


def _bad_images(cfg, few, test):
    """[(path, reason)] of the listed images whose header does not open, found before anything is
    written (ValueError unless --skip-bad-images, which skips and counts them)."""
    bad = []
    for items in (few.train, few.val, test):
        bad += data.check_images(items, cfg.skip_bad_images)[1]
    return bad


def _describe(run, cfg, model, train_split, root, bad):
    """The run's first lines: what trains on what, where it writes, and what to know before it does."""
    world = run.world
    sharded = isinstance(model, FastPromptedCLIP) and model.config.class_shard is not None
    parallel = ""
    if world.size > 1:
        parallel = f" across {world.size} processes" + (", classes sharded" if sharded else "")
    if bad:
        run.log.print(f"warning: {len(bad)} images cannot be read and are skipped (--skip-bad-images), "
                      f"e.g. {bad[0][0]}")
    trainable = sum(p.numel() for p in model.trainable_parameters())
    run.log.print(f"{cfg.method} on {train_split.name} ({root}): {len(train_split.classnames)} classes "
                  f"({cfg.subsample}), {cfg.shots} shots, {len(train_split.train)} training images, "
                  f"{cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.precision} on {cfg.device}{parallel}, "
                  f"{trainable} trainable parameters -> {run.folder}")
    if cfg.batch_size < world.size:
        run.log.print(f"warning: batch {cfg.batch_size} < {world.size} processes: some processes idle at "
                      f"every step; pass --batch-size {world.size} or more (the global batch) to use them "
                      "all")
    if run.resumed:
        start = run.position
        run.log.print(f"resumed from epoch {start.epoch + 1} batch {start.batch + 1}")
        if start.batch % cfg.print_every and not run.tally.unreported[2]:
            run.log.print(f"warning: {os.path.join(run.folder, 'state.pt')} holds no sums of its steps since "
                          "the last metrics line (an older coop_min wrote it): the next line averages only "
                          "the steps after it")


def _cost(progress, device):
    """What the training cost, for results.json: its seconds (a resumed run's earlier processes
    included), training images per second, and the peak GPU memory allocated (None on the CPU)."""
    seconds, rate = progress.throughput()
    peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None
    return {"train_seconds": seconds, "images_per_second": rate, "peak_memory_bytes": peak}


def _finished(folder):
    """--resume of a finished run: its results, printed and returned; nothing is rewritten."""
    with open(os.path.join(folder, "results.json")) as f:
        results = json.load(f)
    h = f", H {results['harmonic_mean']:.2f}" if "harmonic_mean" in results else ""
    print(f"{folder} is a finished run: accuracy {results.get('accuracy', float('nan')):.2f}%{h}; results in "
          f"{os.path.join(folder, 'results.json')} (nothing was changed)")
    return results


# ----------------------------------------------------------------------------------------------
# testing the learned prompts


def _test(cfg, clip, learner, few, run):
    """Write the learned prompt (and CoOp's classifier), test it and zero-shot CLIP on the test split
    (base-to-new: also on the new half), and print the table; returns the results."""
    model = _model(cfg, clip, learner)       # evaluation shards images, not classes
    prompt_path = run.write_prompt(model)
    model.eval()
    split = data.subsample_classes(few, cfg.subsample)
    learned, zero_shot = _evaluate_classes(cfg, model, split, run.world)
    results = {**learned, "dataset": few.name, "method": cfg.method, "shots": cfg.shots, "seed": cfg.seed,
               "subsample": cfg.subsample, "zero_shot": zero_shot}
    baseline = evaluate.zero_shot_name(cfg.templates)
    rows = [(f"{baseline} ({cfg.subsample})", zero_shot), (f"{cfg.method} ({cfg.subsample})", learned)]
    if cfg.subsample == "base" and not cfg.csc:
        new_split = data.subsample_classes(few, "new")
        new_learner = load_prompt(prompt_path, clip, new_split.classnames, run.clip_sha256).learner
        new, new_zero_shot = _evaluate_classes(cfg, _model(cfg, clip, new_learner), new_split, run.world)
        results.update(base=learned["accuracy"], new=new["accuracy"],
                       harmonic_mean=evaluate.harmonic_mean(learned["accuracy"], new["accuracy"]),
                       new_metrics=new, zero_shot_new=new_zero_shot,
                       zero_shot_harmonic_mean=evaluate.harmonic_mean(zero_shot["accuracy"],
                                                                      new_zero_shot["accuracy"]))
        rows += [(f"{baseline} (new)", new_zero_shot), (f"{cfg.method} (new)", new)]
    title = f"test accuracy, {few.name}, {cfg.shots} shots, seed {cfg.seed}"
    run.log.print(evaluate.format_table(rows, title))
    if "harmonic_mean" in results:
        h = results["harmonic_mean"]
        zero_shot_h = results["zero_shot_harmonic_mean"]
        run.log.print(f"base {results['base']:.2f}  new {results['new']:.2f}  H {h:.2f}  (zero-shot H "
                      f"{zero_shot_h:.2f})")
    return results


def _evaluate_classes(cfg, model, split, world):
    """Test-split metrics of the learned prompts and of zero-shot CLIP on the same image features;
    each rank scores its part of the test set and the predictions are gathered (exact)."""
    feats, labels = evaluate.split_features(model.clip, split.test, cfg.eval_batch_size, cfg.device,
                                            cfg.workers, cfg.skip_bad_images, world)
    templates = templates_for(split.name, cfg.templates == "ensemble")
    weights = evaluate.zero_shot_weights(model.clip, split.classnames, templates, cfg.device,
                                         fast_path=not cfg.reference_path)
    learned = distributed.all_gather_cat(evaluate.predict_prompted(model, feats))
    zero_shot = distributed.all_gather_cat(evaluate.predict_zero_shot(feats, weights))
    labels = distributed.all_gather_cat(labels).cpu()
    return (evaluate.compute_metrics(learned.cpu(), labels, split.classnames),
            evaluate.compute_metrics(zero_shot.cpu(), labels, split.classnames))


# ----------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None) -> TrainConfig:
    p = cli.parser("python -m coop_min.train", allow_abbrev=False, description=(
        "Learn CoOp/CoCoOp prompts for a frozen CLIP. Unset flags take the paper default for the method, "
        "shot count and dataset. With no --data: the bundled demo benchmark and tiny CLIP."))
    add_options(p)
    cfg = config(p, vars(p.parse_args(argv)))
    return _resumed(p, argv, cfg) if cfg.resume else cfg


def _resumed(parser, argv, cfg):
    """--resume --output DIR: the run's settings from its config.json; flags given must agree with
    them or be among RESUME_MAY_CHANGE."""
    if cfg.output is None:
        parser.error("--resume needs --output RUN_DIR, the folder of the run to continue")
    flags = flag_fields()
    typed = [t.split("=")[0] for t in (sys.argv[1:] if argv is None else argv) if t.startswith("--")]
    given = {flags[t]: getattr(cfg, flags[t]) for t in typed}
    saved = runs.read_config(cfg.output)
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        parser.error(f"{cfg.output}/config.json has settings this trainer does not know "
                     f"({', '.join(unknown)})")
    differ = sorted(k for k in given if k in saved and saved[k] != given[k] and k not in RESUME_MAY_CHANGE)
    if differ:
        parser.error(f"--resume with settings that differ from the run's ({', '.join(differ)}); drop them "
                     "to continue the run as it was started, or start a new run in another --output")
    # whether to capture the step is the machine's choice, not the run's: resolved again unless given
    return TrainConfig(**{**saved, "cuda_graph": None, **given, "resume": True})


def main(argv=None):
    cli.exit_with(cli.run(
        _main, argv,
        interrupted="interrupted: the run folder keeps its last checkpoint; continue with --resume",
        os_error_hint="; the run folder keeps its last checkpoint; fix it and continue with --resume"))


def _main(argv):
    cfg = parse_args(argv)
    try:
        run(cfg)
        distributed.end_rank()               # torchrun: see there
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
