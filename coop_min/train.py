"""`python -m coop_min.train`: learn CoOp / CoCoOp prompts the way the papers do.

Resolve the config (unset flags take the paper default for the method, shot count and dataset),
load the frozen CLIP and the few-shot data, then epochs of SGD over the context (and Meta-Net) with
Dassl's schedule -- one constant warm-up epoch at 1e-5, then a cosine stepped once per epoch
(`train_epochs`, the loop). The last epoch's prompts are evaluated on the test split. The
model computes with the fast path (coop_min/fast.py) unless --reference-path asks for the method
as written in coop_min/prompts.py; both give the same numbers.

Everything a run writes goes to one folder (coop_min/runs.py); files are replaced atomically, so a
kill never leaves a half-written checkpoint. `--resume` restarts from `state.pt` and continues
bit for bit: the batch order and each image's augmentation are functions of (seed, epoch, index),
and the RNG, optimizer, schedule position and metrics file are restored with it.

Under torchrun the same run is data-parallel (coop_min/distributed.py): each process takes its part
of every global batch, CoOp's classes are sharded for the text encoder, gradients are summed, and
rank 0 alone writes the run folder; the result equals one process up to float rounding.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, fields

import torch

from coop_min import cli, cuda_graph, runs
from coop_min import data as D
from coop_min import distributed as dist
from coop_min import evaluate as E
from coop_min.clip import convert_dtype
from coop_min.cuda_graph import TrainStep
from coop_min.fast import ClassShard, FastConfig, FastPromptedCLIP
from coop_min.files import write_json
from coop_min.prompts import PromptConfig, PromptedCLIP, build_prompted_clip, export_classifier, load_prompt, save_prompt
from coop_min.templates import templates_for
from coop_min.transforms import train_transform


def _option(default, help, least=None, resume=False, **argparse_kwargs):
    """A TrainConfig field that is also a command-line flag (--field-name unless `flag` says otherwise):
    its help, its lower bound, whether a resumed run may change it (it changes no number the run
    computes), and any argparse keywords beyond the type, which the field's annotation gives."""
    return field(default=default, metadata={"help": help, "least": least, "resume": resume, **argparse_kwargs})


@dataclass
class TrainConfig:
    """Every setting of a run, each declared once: parse_args, the --resume check and the sweep's
    pass-through flags are derived from these fields. None takes the paper's default (resolve)."""
    data: str | None = _option(None, "dataset folder (official CoOp layouts, split_zhou json, or "
                               "class/image.jpg); default: the bundled demo benchmark and tiny CLIP")
    dataset: str = _option("auto", "dataset name, or auto to detect from the folder (default auto)")
    weights: str | None = _option(None, "CLIP: a safetensors file from coop_min.weights.convert, an OpenAI name "
                                  "(ViT-B/16, RN50, ...) or hf-hub:ORG/NAME, downloaded once (default: the "
                                  "bundled tiny demo CLIP); a moved file may resume (its sha256 is checked)",
                                  resume=True)
    method: str = _option("coop", "CoOp (learned context) or CoCoOp (context plus a Meta-Net shift per image) "
                          "(default coop)", choices=["coop", "cocoop"])
    shots: int = _option(16, "training images per class (default 16)", least=1)
    n_ctx: int | None = _option(None, "context length M (paper: 16 CoOp, 4 CoCoOp); a --ctx-init phrase sets it",
                                least=1)
    ctx_init: str | None = _option(None, 'initial context phrase, "" for random N(0, 0.02) (paper: random CoOp, '
                                   '"a photo of a" CoCoOp)')
    csc: bool = _option(False, "class-specific contexts (CoOp)")
    class_token_position: str = _option("end", "where the class name sits among the context vectors (CoOp; "
                                        "default end)", choices=["end", "middle", "front"])
    subsample: str = _option("all", "train on all classes or a half (base also reports new and the harmonic "
                             "mean)", choices=["all", "base", "new"])
    epochs: int | None = _option(None, "(paper: CoOp 50/100/200 for 1/2-4/8-16 shots, ImageNet 50; CoCoOp 10)",
                                 least=1)
    batch_size: int | None = _option(None, "(paper: 32 CoOp, 1 CoCoOp)", least=1)
    lr: float = _option(0.002, "peak SGD learning rate (default 0.002)")
    templates: str = _option("single", "zero-shot CLIP's prompts in the results: the dataset's template, or the "
                             "ImageNet ensemble and it (default single)", choices=["single", "ensemble"])
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    seed: int = _option(1, "few-shot sampling, context init, batch order and augmentation (default 1)")
    precision: str | None = _option(None, "frozen CLIP compute dtype (default bf16 on CUDA, fp32 on CPU)",
                                    choices=["fp32", "bf16", "fp16"])
    device: str | None = _option(None, "cpu, cuda, cuda:1 ... (default cuda if available)", resume=True)
    output: str | None = _option(None, "run folder (default runs/[base2new/]<dataset>/shots_<K>/<method>/"
                                 "<setting>/seed<S>, the official scripts' layout; see README)", resume=True)
    resume: bool = _option(False, "continue the run in --output from its state.pt, with the settings of its "
                           "config.json", resume=True)
    workers: int | None = _option(None, "data loader worker processes (default 0 on CPU, where the compute "
                                  "needs the cores, 8 on CUDA)", least=0, resume=True)
    eval_batch_size: int = field(default=100, metadata={"resume": True})
    skip_bad_images: bool = _option(False, "skip and count unreadable images instead of failing", resume=True)
    reference_path: bool = _option(False, "compute with the method as written in prompts.py instead of the "
                                   "fast path (same numbers, slower)")
    shared_prefix: bool = _option(False, "encode [SOS, ctx] once for all classes (UC, end; CoCoOp): less "
                                  "memory at many classes, more launches")
    shard_text: bool = _option(True, "under torchrun, CoOp: every process encodes all classes (default: each "
                               "encodes 1/N of them)", resume=True, flag="--no-shard-text")
    cuda_graph: bool | None = _option(None, "capture each training step as a CUDA graph and replay it, with "
                                      "prompts in length buckets (default: on for one CUDA process without "
                                      "--reference-path; see README)", resume=True)
    save_every: int = _option(0, "also checkpoint every N steps inside an epoch", least=0)
    print_every: int = _option(10, "progress line every N steps (default 10)", least=1, resume=True)


def flag_fields():
    """{--flag: TrainConfig field} of every option (--no-cuda-graph too), as a command line spells them."""
    flags = {}
    for f in fields(TrainConfig):
        if "help" in f.metadata:
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            flags[flag] = f.name
            if f.type == bool | None:
                flags["--no-" + flag[2:]] = f.name
    return flags


# settings a resumed run may change: they change no number it computes (the weights are checked by
# their sha256 in state.pt, so the file may move), and a run folder may move
RESUME_MAY_CHANGE = tuple(f.name for f in fields(TrainConfig) if f.metadata.get("resume"))

# ----------------------------------------------------------------------------------------------
# the paper's schedule


def paper_epochs(method, shots, dataset_name):
    """CoOp: 50 epochs for 1 shot, 100 for 2/4, 200 for 8/16; ImageNet 50 always. CoCoOp: 10."""
    if method == "cocoop":
        return 10
    if dataset_name == "ImageNet":
        return 50
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


def learning_rate(epoch, cfg):
    """Dassl's constant warm-up then cosine, stepped once per epoch (shifted by the warm-up, never 0)."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.epochs))


def resolve(cfg: TrainConfig, dataset_name: str) -> TrainConfig:
    """Fill every unset field with the paper default for this method, shot count and dataset."""
    paper = {"epochs": paper_epochs(cfg.method, cfg.shots, dataset_name),
             "batch_size": 1 if cfg.method == "cocoop" else 32, "lr": TrainConfig.lr}
    tags = _changed(cfg, paper)              # taken before the defaults fill the unset fields
    prompt = _prompt_config(cfg)             # the context's paper defaults live in prompts.PromptConfig
    cfg.n_ctx = prompt.n_ctx
    cfg.csc = prompt.csc
    if cfg.ctx_init is None:
        cfg.ctx_init = prompt.ctx_init
    if cfg.epochs is None:
        cfg.epochs = paper["epochs"]
    if cfg.batch_size is None:
        cfg.batch_size = paper["batch_size"]
    if cfg.device is None:
        cfg.device = runs.default_device()
    if cfg.precision is None:
        cfg.precision = runs.default_precision(cfg.device)
    if cfg.workers is None:
        cfg.workers = min(8, os.cpu_count() or 1) if cfg.device.startswith("cuda") else 0
    if cfg.output is None:
        cfg.output = runs.run_folder(cfg, D.dataset_key(dataset_name), tags)
    return cfg


def _changed(cfg, paper):
    """Folder tags of the settings given that change the numbers and differ from the paper's (and of
    a precision given: its default depends on the machine)."""
    tags = []
    for name, tag in (("epochs", "ep"), ("batch_size", "bs"), ("lr", "lr")):
        value = getattr(cfg, name)
        if value is not None and value != paper[name]:
            tags.append(f"{tag}{value:g}")
    if cfg.precision is not None:
        tags.append(cfg.precision)
    return tags


def _prompt_config(cfg):
    """PromptConfig of the flags: a phrase decides M (its BPE tokens, as in the official code), and an
    --n-ctx that disagrees is refused; CSC with a phrase is one generic context, as official (warned)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompt = PromptConfig(method=cfg.method, n_ctx=cfg.n_ctx, ctx_init=cfg.ctx_init, csc=cfg.csc,
                              class_token_position=cfg.class_token_position)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if prompt.ctx_init and cfg.n_ctx is not None and cfg.n_ctx != prompt.n_ctx:
        raise cli.UsageError(f"--n-ctx {cfg.n_ctx} disagrees with --ctx-init {prompt.ctx_init!r}, whose "
                             f"{prompt.n_ctx} tokens set M; drop --n-ctx, or pass --ctx-init \"\" for "
                             f"{cfg.n_ctx} random context vectors")
    return prompt


# ----------------------------------------------------------------------------------------------
# the training loop


def _check_finite(loss, epoch, batch, folder):
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1} batch {batch + 1}; stopped. "
                                 f"{runs.kept(folder)} (lower --lr or use --precision fp32)")


def _step_forward(model, images, labels, share):
    """This rank's part of a global batch -> (its share of the mean loss, sum(CE) / global batch; its
    correct predictions). share = its images / the global batch, as a tensor: a step that reads no
    device value on the host can be captured (cuda_graph.py). A rank with no images still encodes
    its text shard, since the gather in it is collective."""
    if len(labels) == 0:
        t = None if model.is_conditional else model.text_features()
        zero = sum(p.sum() for p in model.trainable_parameters()) * 0     # a graph, so backward runs
        return (zero if t is None else zero + t.sum() * 0), torch.zeros((), dtype=torch.long, device=share.device)
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


def _batches_per_epoch(n_images, batch_size):  # make_loader's count: Dassl drops a last partial batch
    return n_images // batch_size if n_images >= batch_size else 1


def train_epochs(cfg, model, opt, dataset, log, folder, clip_sha, state=None, world=dist.World(),
                 clock=time.monotonic):
    """The SGD loop over epochs; with `state` (a state.pt that runs.check_state has restored into the
    learner and `opt`), from where it left off."""
    params = model.trainable_parameters()
    start_epoch, start_batch = (state["epoch"], state["batch"]) if state is not None else (0, 0)
    if state is not None:
        log.print(f"resumed from epoch {start_epoch + 1} batch {start_batch + 1}")
    step = TrainStep(lambda *inputs: _step_forward(model, *inputs), opt, cuda_graph=cfg.cuda_graph,
                     after_backward=lambda: dist.all_reduce_grads(params))
    per_epoch = _batches_per_epoch(len(dataset), cfg.batch_size)
    progress = runs.Progress((cfg.epochs - start_epoch) * per_epoch - start_batch, clock)
    unreported = [0.0, 0.0, 0.0]             # a mid-epoch checkpoint's sums of its steps since the last line
    if state is not None:
        unreported, progress.epoch_totals = (list(t) for t in state["progress"])
        if start_batch % cfg.print_every and not unreported[2]:
            log.print(f"warning: {os.path.join(folder, 'state.pt')} holds no sums of its steps since the last "
                      "progress line (an older coop_min wrote it): the next line averages only the steps after it")
    for epoch in range(start_epoch, cfg.epochs):
        lr = learning_rate(epoch, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        rng = torch.get_rng_state()          # what a mid-epoch resume restores: its loader draws again
        loader = D.make_loader(dataset, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                               start_batch=start_batch, num_workers=cfg.workers,
                               pin_memory=cfg.device.startswith("cuda"), rank=world.rank, world_size=world.size)
        # loss sum, correct, images since the last line; a resumed run's rank 0 starts from the checkpoint's
        t0, totals = clock(), torch.tensor(unreported if world.main else [0.0] * 3, device=cfg.device)
        unreported = [0.0, 0.0, 0.0]
        model.train()
        for batch, (images, labels) in enumerate(loader, start=start_batch):
            _check_labels(labels, model.learner.n_cls)
            images, labels = images.to(cfg.device, non_blocking=True), labels.to(cfg.device, non_blocking=True)
            n_local = torch.full((), float(len(labels)), device=cfg.device)
            n_global = dist.all_reduce_sum(n_local)
            loss, correct = step(images, labels, n_local / n_global)
            _check_finite(loss, epoch, batch, folder)
            totals += torch.stack([loss.float() * n_global, correct.float(), n_local])   # no host read
            progress.step()
            if (batch + 1) % cfg.print_every == 0 or batch + 1 == per_epoch:
                _report(log, progress, dist.all_reduce_sum(totals).tolist(), epoch, batch, per_epoch, lr, cfg)
                totals.zero_()
            if cfg.save_every and (batch + 1) % cfg.save_every == 0 and batch + 1 < per_epoch:
                line_sums = dist.all_reduce_sum(totals).tolist()          # a collective: every rank takes part
                if world.main:
                    runs.save_state(folder, model.learner, opt, epoch, batch + 1, log.metrics_bytes(), rng,
                                    clip_sha, (line_sums, progress.epoch_totals))
        log.record(epoch=epoch + 1, epoch_time_s=round(clock() - t0, 3), lr=lr, **progress.epoch_means())
        start_batch = 0
        if world.main:
            runs.save_state(folder, model.learner, opt, epoch + 1, 0, log.metrics_bytes(), torch.get_rng_state(), clip_sha,
                            ([0.0, 0.0, 0.0], progress.epoch_totals))      # the epoch's last step made a line


def _report(log, progress, totals, epoch, batch, per_epoch, lr, cfg):
    """A progress line: means over the steps since the last line (every rank's images)."""
    loss_sum, correct, n = totals
    progress.add(loss_sum, int(correct), int(n))
    log.print(f"epoch {epoch + 1}/{cfg.epochs} batch {batch + 1}/{per_epoch} lr {lr:.3e} {progress.line()}")
    log.record(epoch=epoch + 1, batch=batch + 1, loss=round(loss_sum / max(n, 1), 6),
               acc=round(100.0 * correct / max(n, 1), 4), lr=lr)


def _few_shot_splits(cfg, splits, folder, resume):
    """The few-shot train/val sets: sampled with the seed, or on --resume the run's split.json."""
    if resume:
        return D.load_split(os.path.join(folder, "split.json"))
    return D.few_shot(splits, cfg.shots, cfg.seed)


def _evaluate_classes(cfg, model, splits, world):
    """Test-split metrics of the learned prompts and of zero-shot CLIP on the same image features;
    each rank scores its part of the test set and the predictions are gathered (exact)."""
    feats, labels = E.split_features(model.clip, splits.test, cfg.eval_batch_size, cfg.device, cfg.workers,
                                     cfg.skip_bad_images, world)
    templates = templates_for(splits.name, cfg.templates == "ensemble")
    weights = E.zero_shot_weights(model.clip, splits.classnames, templates, cfg.device, fast_path=not cfg.reference_path)
    learned, zero_shot, labels = (dist.all_gather_cat(x) for x in (
        E.predict_prompted(model, feats), E.predict_zero_shot(feats, weights), labels))
    return (E.compute_metrics(learned.cpu(), labels.cpu(), splits.classnames),
            E.compute_metrics(zero_shot.cpu(), labels.cpu(), splits.classnames))


def _model(cfg, clip, learner, world=dist.World(), train=False):
    """The method as written (--reference-path) or the fast path, on `learner`; training under
    torchrun, CoOp's classes are sharded across the processes for the text encoder."""
    if cfg.reference_path:
        return PromptedCLIP(clip, learner)
    shard = train and world.size > 1 and cfg.shard_text and learner.config.method == "coop"
    return FastPromptedCLIP(clip, learner, FastConfig(
        shared_prefix=cfg.shared_prefix, length_buckets=cfg.cuda_graph,       # buckets pay under a graph
        class_shard=ClassShard(*dist.class_shard(learner.n_cls, world)) if shard else None))


def make_learner(cfg, clip, classnames):
    """The prompt learner on the fp32 CLIP, whose phrase init is the checkpoint's own values (as the
    official code's); then the CLIP is cast to the compute precision and the learner rebuilt on it."""
    prompt_cfg = PromptConfig(method=cfg.method, n_ctx=cfg.n_ctx, ctx_init=cfg.ctx_init, csc=cfg.csc,
                              class_token_position=cfg.class_token_position)
    init = build_prompted_clip(clip, classnames, prompt_cfg, seed=cfg.seed).learner.state_dict()
    convert_dtype(clip, runs.DTYPES[cfg.precision])
    learner = build_prompted_clip(clip, classnames, prompt_cfg, seed=cfg.seed).learner   # buffers in the CLIP dtype
    learner.load_state_dict(init)
    return learner


def _bad_images(cfg, few, test):
    """[(path, reason)] of the listed images whose header does not open, found before anything is
    written (ValueError unless --skip-bad-images, which skips and counts them)."""
    return [b for items in (few.train, few.val, test) for b in D.check_images(items, cfg.skip_bad_images)[1]]


def _prepare_folder(cfg, folder, few, world):
    """Rank 0 takes the folder's lock and, for a new run, writes config.json and split.json (replacing
    a failed start's files). Returns the lock, held for the run."""
    held = runs.lock(folder) if world.main else None
    if world.main and not cfg.resume:
        for name in ("log.txt", "metrics.jsonl"):
            if os.path.exists(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
        runs.write_config(folder, cfg)
        D.save_split(os.path.join(folder, "split.json"), few)
    dist.barrier(world)
    return held


def run(cfg: TrainConfig):
    """Train, evaluate on the test split, write every run output; returns the results dict.
    Everything is checked before the run folder changes. Under torchrun: data-parallel, and rank 0
    writes (every rank returns the same results)."""
    runs.check_weights(cfg.weights)          # the most useful errors first: the weights, then the data
    root = runs.data_root(cfg.data)
    splits = D.load_dataset(root, cfg.dataset)
    cfg = resolve(cfg, splits.name)
    world, device = dist.setup(cfg.device)
    torch.backends.cudnn.benchmark = device.startswith("cuda")   # fixed shapes: let cuDNN pick (RN50's convs)
    folder = cfg.output
    if cfg.cuda_graph is None:               # the captured step is exact (tests/test_bench_graph.py) and faster
        cfg.cuda_graph = device.startswith("cuda") and world.size == 1 and not cfg.reference_path
    if cfg.cuda_graph and (not device.startswith("cuda") or world.size > 1 or cfg.reference_path):
        raise cli.UsageError("--cuda-graph captures the fast path of one process on a CUDA device; "
                         "drop it for CPU, torchrun or --reference-path runs")
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "resume"}
    runs.start_folder(folder, settings, cfg.resume, free=RESUME_MAY_CHANGE)
    runs.check_writable(folder)
    if cfg.resume and os.path.exists(os.path.join(folder, "results.json")):
        return _finished(folder)
    state = runs.read_state(folder) if cfg.resume else None
    cfg.device = device
    torch.manual_seed(cfg.seed)
    few = _few_shot_splits(cfg, splits, folder, cfg.resume)
    train_split = D.subsample_classes(few, cfg.subsample)
    clip, clip_sha = runs.load_weights(cfg.weights, cfg.device)
    learner = make_learner(cfg, clip, train_split.classnames)
    model = _model(cfg, clip, learner, world, train=True)
    sgd = cuda_graph.SGD if cfg.cuda_graph else torch.optim.SGD   # a graph reads its lr from the device
    opt = sgd(model.trainable_parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if state is not None:
        runs.check_state(state, folder, learner, opt, cfg.epochs, clip_sha)   # and restores it
    bad = _bad_images(cfg, few, train_split.test)
    dist.barrier(world)                      # every rank has checked before rank 0 changes anything
    held = _prepare_folder(cfg, folder, few, world)
    log = runs.RunLog(folder, state["metrics_bytes"] if cfg.resume else None) if world.main else runs.QuietLog()
    if bad:
        log.print(f"warning: {len(bad)} images cannot be read and are skipped (--skip-bad-images), e.g. {bad[0][0]}")
    sharded = isinstance(model, FastPromptedCLIP) and model.config.class_shard is not None
    parallel = "" if world.size == 1 else f" across {world.size} processes" + (", classes sharded" if sharded else "")
    log.print(f"{cfg.method} on {splits.name} ({root}): {len(train_split.classnames)} classes ({cfg.subsample}), "
              f"{cfg.shots} shots, {len(train_split.train)} training images, {cfg.epochs} epochs, batch "
              f"{cfg.batch_size}, {cfg.precision} on {cfg.device}{parallel}, "
              f"{sum(p.numel() for p in model.trainable_parameters())} trainable parameters -> {folder}")
    if cfg.batch_size < world.size:
        log.print(f"warning: batch {cfg.batch_size} < {world.size} processes: some processes idle at every step; "
                  f"pass --batch-size {world.size} or more (the global batch) to use them all")
    dataset = D.ImageDataset(train_split.train, train_transform(clip.visual.input_resolution), train=True,
                             seed=cfg.seed, cache_decoded=len(train_split.train) <= 20000, skip_bad=cfg.skip_bad_images)
    t0 = time.time()
    train_epochs(cfg, model, opt, dataset, log, folder, clip_sha, state, world)
    log.print(f"finished training in {runs.duration(time.time() - t0)}")
    results = _save_and_test(cfg, clip, clip_sha, learner, few, train_split, splits.name, log, folder, world)
    log.print(f"results: {os.path.join(folder, 'results.json')}")
    if held is not None:
        held.close()                         # releases the lock; a finished run keeps no lock file
        os.remove(os.path.join(folder, ".lock"))
    return results


def _finished(folder):
    """--resume of a finished run: its results, printed and returned; nothing is rewritten."""
    with open(os.path.join(folder, "results.json")) as f:
        results = json.load(f)
    h = f", H {results['harmonic_mean']:.2f}" if "harmonic_mean" in results else ""
    print(f"{folder} is a finished run: accuracy {results.get('accuracy', float('nan')):.2f}%{h}; results in "
          f"{os.path.join(folder, 'results.json')} (nothing was changed)")
    return results


def _save_and_test(cfg, clip, clip_sha, learner, few, train_split, dataset_name, log, folder, world):
    """Write the learned prompt (and CoOp's classifier), test it and zero-shot CLIP on the test split
    (base-to-new: also on the new half), write results.json and print the table; returns the results."""
    model = _model(cfg, clip, learner)       # evaluation shards images, not classes
    prompt_path = os.path.join(folder, "prompt.safetensors")
    if world.main:
        save_prompt(prompt_path, learner, clip_sha)
        if not model.is_conditional:
            export_classifier(os.path.join(folder, "classifier.safetensors"), model, clip_sha)
    dist.barrier(world)                      # the prompt file is written before any rank reads it
    model.eval()
    learned, zero_shot = _evaluate_classes(cfg, model, train_split, world)
    results = {**learned, "dataset": dataset_name, "method": cfg.method, "shots": cfg.shots, "seed": cfg.seed,
               "subsample": cfg.subsample, "zero_shot": zero_shot}
    baseline = E.zero_shot_name(cfg.templates)
    rows = [(f"{baseline} ({cfg.subsample})", zero_shot), (f"{cfg.method} ({cfg.subsample})", learned)]
    if cfg.subsample == "base" and not cfg.csc:
        new_split = D.subsample_classes(few, "new")
        new_model = _model(cfg, clip, load_prompt(prompt_path, clip, new_split.classnames, clip_sha).learner)
        new, new_zero_shot = _evaluate_classes(cfg, new_model, new_split, world)
        results.update(base=learned["accuracy"], new=new["accuracy"],
                       harmonic_mean=E.harmonic_mean(learned["accuracy"], new["accuracy"]),
                       new_metrics=new, zero_shot_new=new_zero_shot,
                       zero_shot_harmonic_mean=E.harmonic_mean(zero_shot["accuracy"], new_zero_shot["accuracy"]))
        rows += [(f"{baseline} (new)", new_zero_shot), (f"{cfg.method} (new)", new)]
    if world.main:
        write_json(os.path.join(folder, "results.json"), results)
    log.print(E.format_table(rows, f"test accuracy, {dataset_name}, {cfg.shots} shots, seed {cfg.seed}"))
    if "harmonic_mean" in results:
        log.print(f"base {results['base']:.2f}  new {results['new']:.2f}  H {results['harmonic_mean']:.2f}"
                  f"  (zero-shot H {results['zero_shot_harmonic_mean']:.2f})")
    return results


# ----------------------------------------------------------------------------------------------
# command line


def add_options(p):
    """TrainConfig's options on the ArgumentParser p, as the fields declare them."""
    for f in fields(TrainConfig):
        if "help" not in f.metadata:
            continue
        kwargs = {k: v for k, v in f.metadata.items() if k not in ("least", "resume", "flag")}
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        if f.type == bool | None:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.type is bool:
            kwargs["action"] = "store_false" if flag.startswith("--no-") else "store_true"
        elif f.type in (int, float, int | None, float | None):
            kwargs["type"] = int if f.type in (int, int | None) else float
        p.add_argument(flag, dest=f.name, default=f.default, **kwargs)


def config(p, values) -> TrainConfig:
    """TrainConfig of parsed values, each checked against its field's bounds (p.error: one line)."""
    for f in fields(TrainConfig):
        least = f.metadata.get("least")
        if least is not None and values[f.name] is not None and values[f.name] < least:
            p.error(f"--{f.name.replace('_', '-')} must be >= {least}, got {values[f.name]}")
    if not (math.isfinite(values["lr"]) and values["lr"] > 0):
        p.error(f"--lr must be a positive number, got {values['lr']}")
    if not 0 <= values["seed"] < 2 ** 63:
        p.error(f"--seed must be between 0 and 2**63 - 1, got {values['seed']}")
    return TrainConfig(**values)


def parse_args(argv=None) -> TrainConfig:
    p = cli.parser("python -m coop_min.train", allow_abbrev=False, description=(
        "Learn CoOp/CoCoOp prompts for a frozen CLIP. Unset flags take the paper default for the method, shot "
        "count and dataset. With no --data: the bundled demo benchmark and tiny CLIP."))
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
    unknown = sorted(set(saved) - {f.name for f in fields(TrainConfig)})
    if unknown:
        parser.error(f"{cfg.output}/config.json has settings this trainer does not know ({', '.join(unknown)})")
    differ = sorted(k for k in given if k in saved and saved[k] != given[k] and k not in RESUME_MAY_CHANGE)
    if differ:
        parser.error(f"--resume with settings that differ from the run's ({', '.join(differ)}); drop them to "
                     "continue the run as it was started, or start a new run in another --output")
    # whether to capture the step is the machine's choice, not the run's: resolved again unless given
    return TrainConfig(**{**saved, "cuda_graph": None, **given, "resume": True})


def main(argv=None):
    cli.exit_with(cli.run(
        _main, argv, interrupted="interrupted: the run folder keeps its last checkpoint; continue with --resume",
        os_error_hint="; the run folder keeps its last checkpoint; fix it and continue with --resume"))


def _main(argv):
    cfg = parse_args(argv)
    try:
        run(cfg)
        dist.end_rank()                      # torchrun: see there
    finally:
        dist.teardown()


if __name__ == "__main__":
    main()
