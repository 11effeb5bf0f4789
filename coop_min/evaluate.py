"""`python -m coop_min.evaluate`: zero-shot CLIP, learned prompts, base-to-new, interpretation.

Image features are computed once per evaluation (the image encoder is frozen) and every classifier,
hand-crafted or learned, is scored on the same features. Metrics as Dassl's Classification
evaluator: top-1 accuracy (the number the papers report), macro-F1 over the classes present in the
labels, and per-class accuracy, all in percent. Under torchrun each process scores its part of the
test set and the predictions are gathered, so the metrics are exactly those of one process.

CLIP and the prompts compute with the fast path (coop_min/fast.py: fused kernels on CUDA, text cut
after the last EOT) unless --reference-path asks for the plain computation; the numbers are the same.
"""
import os
import time

import torch
import torch.nn.functional as F

from coop_min import cli, data, distributed, fast, inputs, official, options, runs
from coop_min.clip import convert_dtype
from coop_min.files import write_json
from coop_min.prompts import PromptedCLIP, load_prompt, nearest_words
from coop_min.templates import templates_for


# ----------------------------------------------------------------------------------------------
# metrics


def compute_metrics(pred, labels, classnames):
    """Accuracy, macro-F1 (over the classes present in `labels`) and per-class accuracy, in percent."""
    pred = torch.as_tensor(pred).long()
    labels = torch.as_tensor(labels).long()
    f1s = []
    per_class = {}
    for c in torch.unique(labels).tolist():
        tp = int(((pred == c) & (labels == c)).sum())
        n_true = int((labels == c).sum())
        n_pred = int((pred == c).sum())
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true
        f1s.append(2 * precision * recall / (precision + recall) if tp else 0.0)
        per_class[classnames[c]] = 100.0 * recall
    accuracy = 100.0 * float((pred == labels).float().mean())
    return {"accuracy": accuracy, "macro_f1": 100.0 * sum(f1s) / len(f1s), "per_class_accuracy": per_class,
            "total": len(labels), "correct": int((pred == labels).sum())}


def zero_shot_name(templates="single"):
    """The baseline's one name in every table: zero-shot CLIP, with the ensemble named when used."""
    return "zero-shot CLIP" if templates == "single" else "zero-shot CLIP (ensemble)"


def harmonic_mean(base, new):
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# features and classifiers


@torch.no_grad()
def extract_features(clip, loader, device, say=None, every=20):
    """Unnormalised image features (N, D) in fp32 and labels (N,) of a whole loader; with `say`, a
    progress line every `every` batches when there are more than `every`."""
    feats = [torch.empty(0, clip.config.embed_dim, device=device)]
    labels = [torch.empty(0, dtype=torch.long)]
    t0 = time.monotonic()
    seen = 0
    for i, (images, y) in enumerate(loader, start=1):
        if len(y):                           # a data-parallel part of a batch may be empty
            images = images.to(device, non_blocking=True)
            feats.append(clip.encode_image(images).float())
            labels.append(y)
            seen += len(y)
        if say is not None and len(loader) > every and (i % every == 0 or i == len(loader)):
            rate = seen / max(time.monotonic() - t0, 1e-9)
            say(f"image features: batch {i}/{len(loader)}, {rate:.0f} img/s, "
                f"eta {(len(loader) - i) * seen / max(i, 1) / max(rate, 1e-9):.0f}s")
    return torch.cat(feats), torch.cat(labels).to(device)


def split_features(clip, items, batch_size, device, workers=0, skip_bad=False, world=distributed.World(),
                   say=None):
    """Image features and labels of this process's part of `items` (all of them in one process)."""
    from coop_min.transforms import image_transform

    dataset = data.ImageDataset(items, image_transform(clip.visual.input_resolution), skip_bad=skip_bad)
    loader = data.make_loader(dataset, batch_size, shuffle=False, drop_last=False, num_workers=workers,
                              pin_memory=device.startswith("cuda"), rank=world.rank, world_size=world.size)
    return extract_features(clip, loader, device, say)


@torch.no_grad()
def zero_shot_weights(clip, classnames, templates, device, fast_path=True):
    """(C, D) normalised text classifier; several templates are averaged then re-normalised (CLIP's
    ensemble). fast_path: the text is cut after its last EOT (exact)."""
    from coop_min.tokenizer import tokenize

    encode = fast.encode_text if fast_path else type(clip).encode_text
    total = 0
    for template in templates:
        texts = [template.format(name.replace("_", " ")) for name in classnames]
        tokens = tokenize(texts, clip.context_length).to(device)
        total = total + F.normalize(encode(clip, tokens).float(), dim=-1)
    return F.normalize(total / len(templates), dim=-1)


@torch.no_grad()
def predict_zero_shot(feats, weights):
    return (F.normalize(feats, dim=-1) @ weights.t()).argmax(-1)


@torch.no_grad()
def predict_prompted(model: PromptedCLIP, feats, chunk=256):
    """Argmax classes of learned prompts on precomputed image features, in chunks of images (CoCoOp)."""
    model.eval()
    if len(feats) == 0:
        return torch.empty(0, dtype=torch.long, device=feats.device)
    if not model.is_conditional:
        return model.logits_from_features(feats).argmax(-1)
    chunks = [feats[i:i + chunk] for i in range(0, len(feats), chunk)]
    return torch.cat([model.logits_from_features(f).argmax(-1) for f in chunks])


# ----------------------------------------------------------------------------------------------
# reports


def format_table(rows, title):
    """rows: list of (name, metrics dict) -> aligned text table."""
    lines = [title, f"{'':<24}{'accuracy':>10}{'macro_f1':>10}{'images':>8}"]
    for name, m in rows:
        lines.append(f"{name:<24}{m['accuracy']:>9.2f}%{m['macro_f1']:>9.2f}%{m['total']:>8}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# command line


def _prompt_file(path):
    if official.is_official(path):
        return path
    if os.path.isdir(path):
        path = os.path.join(path, "prompt.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}; pass a run folder, a prompt.safetensors or "
                                "an official CoOp/CoCoOp checkpoint")
    return path


def _interpret(ctx, classnames, embedding, k, log):
    """The k nearest words of each context vector (M, W) or (C, M, W), against `embedding` (the
    checkpoint's fp32 token embeddings), as the official interpret_prompt.py finds them."""
    from coop_min.tokenizer import token_text

    ids, distances = nearest_words(ctx.detach().float().cpu(), embedding.cpu(), k)
    M = ctx.shape[-2]
    ids, distances = ids.reshape(-1, M, k), distances.reshape(-1, M, k)               # (C or 1, M, k)
    log(f"the {k} vocabulary tokens nearest to each context vector (Euclidean distance to CLIP's token "
        "embeddings; '-' ends a piece inside a word)")
    for c in range(ids.shape[0]):
        if ids.shape[0] > 1:
            log(f"class {classnames[c] if classnames else c + 1}:")
        log(f"{'context':>7}  " + "  ".join(f"{'token':<14} {'distance':>8}" for _ in range(k)))
        for m in range(ids.shape[1]):
            cells = [f"{token_text(int(i))[:14]:<14} {float(d):8.4f}"
                     for i, d in zip(ids[c, m], distances[c, m])]
            log(f"{m + 1:>7}  " + "  ".join(cells))


def _predict_image(path, clip, classnames, model, weights, device):
    from coop_min.transforms import image_transform, load_image

    x = image_transform(clip.visual.input_resolution)(load_image(path, rgb=True)).unsqueeze(0).to(device)
    with torch.no_grad():
        f = clip.encode_image(x).float()
        if model is not None:
            logits = model.logits_from_features(f)
        else:
            logits = clip.logit_scale.exp().float() * F.normalize(f, dim=-1) @ weights.t()
    probs = logits.softmax(-1)[0]
    top = probs.topk(min(5, len(classnames)))
    return [(classnames[int(i)], float(p)) for p, i in zip(top.values, top.indices)]


def main(argv=None):
    cli.exit_with(cli.run(_main, argv))


def _parser():
    p = cli.parser("python -m coop_min.evaluate", description=(
        "Evaluate zero-shot CLIP or learned prompts on a dataset's test split; interpret learned context; "
        "classify one image. With no --data: the bundled demo benchmark and tiny CLIP."))
    p.add_argument("--data", help="dataset folder (as for training); default: the demo benchmark")
    p.add_argument("--dataset", default="auto", help="dataset name or auto (default auto)")
    p.add_argument("--weights", help="CLIP: a safetensors file, an OpenAI name (ViT-B/16, ...) or "
                   "hf-hub:ORG/NAME (default: the run's with --prompt RUN_DIR, else the bundled tiny demo "
                   "CLIP)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="a training run folder or a prompt.safetensors; or an official "
                      "CoOp/CoCoOp checkpoint: model.pth.tar-E, its prompt_learner/ folder or the official "
                      "run folder")
    what.add_argument("--zero-shot", action="store_true",
                      help="hand-crafted prompts (the default without --prompt)")
    p.add_argument("--templates", choices=["single", "ensemble"], default="single",
                   help="zero-shot: the dataset's template, or the ImageNet ensemble (+ the dataset's)")
    p.add_argument("--subsample", choices=["all", "base", "new", "base2new"], default="all",
                   help="classes to test on; base2new reports base, new and their harmonic mean")
    p.add_argument("--class-token-position", choices=["end", "middle", "front"],
                   help="for an official CoOp checkpoint whose run folder does not say (its log.txt or "
                   "folder name); default end. coop_min's prompt files record it")
    p.add_argument("--interpret", type=int, metavar="K",
                   help="print the K nearest words of each context vector")
    p.add_argument("--image", help="classify one image file: top-5 classes with probabilities")
    p.add_argument("--output", help="folder for results.json (default: print only)")
    p.add_argument("--batch-size", type=int, default=100, help="images per forward pass (default 100)")
    p.add_argument("--device", help="default cuda if available")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="frozen CLIP compute dtype (default bf16 on CUDA, fp32 on CPU, as in training)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes (default 0)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip and count unreadable images instead of failing")
    p.add_argument("--reference-path", action="store_true", help="compute with the method as written in "
                   "prompts.py instead of the fast path (same numbers)")
    return p


def _main(argv):
    p = _parser()
    args = p.parse_args(argv)
    for name, least in (("batch_size", 1), ("workers", 0), ("interpret", 1)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if args.output and os.path.exists(os.path.join(args.output, "results.json")):   # never lose a result
        p.error(f"--output {args.output} already holds a results.json (a run's or an earlier evaluation's); "
                "pick another --output")
    if args.class_token_position and not (args.prompt and official.is_official(args.prompt)):
        p.error("--class-token-position is for an official checkpoint (--prompt); coop_min's prompt files "
                "record it")
    if args.prompt and args.templates != "single":
        p.error("--templates is for zero-shot classifiers; a --prompt brings its own learned context")
    if args.output and os.path.exists(args.output) and not os.path.isdir(args.output):
        p.error(f"--output {args.output} is a file, not a folder")
    try:
        if args.output:
            runs.check_writable(args.output)
        run(_from_run(args))
        distributed.end_rank()               # torchrun: see there
    finally:
        distributed.teardown()


def _from_run(args):
    """--prompt RUN_DIR: the settings the run's options declare evaluate takes from it (its weights,
    data, dataset and precision), unless given."""
    if not (args.prompt and os.path.isfile(os.path.join(args.prompt, "config.json"))):
        return args
    for name, value in options.from_run(runs.read_config(args.prompt), vars(args)).items():
        setattr(args, name, value)
    return args


def run(args):
    """Interpret, classify one image, or score the test split, as the flags ask; returns the results
    (with the evaluation's `seconds`), written to --output."""
    t0 = time.monotonic()
    world, device = distributed.setup(args.device or inputs.default_device())
    say = print if world.main else _quiet
    clip, clip_sha = inputs.load_weights(args.weights, device)               # fp32: the checkpoint's values
    embedding = clip.token_embedding.weight.detach().clone() if args.interpret else None
    convert_dtype(clip, inputs.DTYPES[args.precision or inputs.default_precision(device)])
    if not args.reference_path:
        clip = fast.fused_copy(clip)
    prompt = _prompt_file(args.prompt) if args.prompt else None
    if args.interpret and not prompt:
        raise ValueError("--interpret needs --prompt (a run folder, a prompt.safetensors or an official "
                         "checkpoint)")
    found = None                              # an official checkpoint: say which settings it is read with
    if prompt and official.is_official(prompt):
        found = official.read_prompt(prompt, args.class_token_position)
        say(found.origin)

    def prompted(classnames=None):            # the learned prompts, on the method or the fast path
        model = load_prompt(prompt, clip, classnames, clip_sha, args.class_token_position)
        return model if args.reference_path else fast.FastPromptedCLIP(clip, model.learner)
    if args.interpret:
        _interpret_prompt(args, prompt, found, clip, clip_sha, embedding, say)
        if args.data is None and not args.image:
            return None
    if args.image:
        return _classify_image(args, clip, prompted if prompt else None, device, say)
    results = _score(args, clip, prompted if prompt else None, device, world, say)
    results["seconds"] = time.monotonic() - t0
    if args.output and world.main:
        os.makedirs(args.output, exist_ok=True)
        write_json(os.path.join(args.output, "results.json"), results)
    return results


def _interpret_prompt(args, prompt, found, clip, clip_sha, embedding, say):
    if found is not None:                    # official: no class names in the file, the data's if given
        ctx = found.tensors["ctx"]
        names = _load(args).classnames if args.data is not None and ctx.dim() == 3 else None
    else:
        learner = load_prompt(prompt, clip, clip_sha256=clip_sha).learner
        ctx, names = learner.ctx, learner.classnames
    _interpret(ctx, names, embedding, args.interpret, say)


def _quiet(*args):
    """What a process other than rank 0 prints: nothing."""


def _classify_image(args, clip, prompted, device, say):
    if prompted is not None:                 # an official checkpoint holds no class names: the data's
        model = prompted(_load(args).classnames if official.is_official(args.prompt) else None)
        names = model.learner.classnames
        weights = None
        by = f"{model.learner.config.method} prompts from {args.prompt}"
    else:
        splits = _load(args)
        names = splits.classnames
        model = None
        templates = templates_for(splits.name, args.templates == "ensemble")
        weights = zero_shot_weights(clip, names, templates, device, not args.reference_path)
        by = f"{zero_shot_name(args.templates)} (no --prompt given) on {splits.name}'s {len(names)} classes"
    say(f"{args.image}, top {min(5, len(names))} by {by}, CLIP {args.weights or 'the bundled demo CLIP'}:")
    for name, prob in _predict_image(args.image, clip, names, model, weights, device):
        say(f"{prob * 100:6.2f}%  {name}")
    return None


def _score(args, clip, prompted, device, world, say):
    """Metrics on the test split (both halves for base2new), printed; returns them."""
    splits = _load(args)
    halves = ["base", "new"] if args.subsample == "base2new" else [args.subsample]
    results = {"dataset": splits.name}
    rows = []
    for half in halves:
        part = data.subsample_classes(splits, half)
        feats, labels = split_features(clip, part.test, args.batch_size, device, args.workers,
                                       args.skip_bad_images, world, say)
        if prompted is not None:
            model = prompted(part.classnames)
            pred = predict_prompted(model, feats)
            name = f"{model.learner.config.method} ({half})"
        else:
            templates = templates_for(splits.name, args.templates == "ensemble")
            w = zero_shot_weights(clip, part.classnames, templates, device, not args.reference_path)
            pred = predict_zero_shot(feats, w)
            name = f"{zero_shot_name(args.templates)} ({half})"
        pred = distributed.all_gather_cat(pred)
        labels = distributed.all_gather_cat(labels)
        results[half] = compute_metrics(pred.cpu(), labels.cpu(), part.classnames)
        rows.append((name, results[half]))
    if len(halves) == 2:
        results["harmonic_mean"] = harmonic_mean(results["base"]["accuracy"], results["new"]["accuracy"])
    else:
        results.update(results.pop(halves[0]))
    say(format_table(rows, f"test accuracy, {splits.name}"))
    if "harmonic_mean" in results:
        say(f"harmonic mean {results['harmonic_mean']:.2f}")
    return results


def _load(args):
    return data.load_dataset(inputs.data_root(args.data), args.dataset)


if __name__ == "__main__":
    main()
