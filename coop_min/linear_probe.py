"""`python -m coop_min.linear_probe`: linear-probe CLIP, the official lpclip recipe (CoOp's dashed lines),
applied to a dataset: its CLIP image features, one run folder per shot count and seed, a run's classifier
tested on another dataset, and the official feature files' report. The recipe itself (the solver, the
few-shot draw, the C search) is `coop_min.lpclip`.

Image features come from CLIP in fp32 (the official extractor runs CLIP in fp16 on CUDA). They are
computed once per (CLIP weights, dataset, image) and cached, only for the images a run uses:
<cache>/features/<sha256[:16]>/<dataset>-<root digest>/part-*.safetensors. ImageNet has no val split;
as the official ImageNet class (val = test), its val shots are drawn from the test set.
"""
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from coop_min import cli, data, hub, inputs, lpclip, runs
from coop_min.evaluate import compute_metrics, extract_features
from coop_min.files import atomic_write, sha256_file, write_json
from coop_min.transforms import image_transform


# ----------------------------------------------------------------------------------------------
# image features, computed once per (CLIP weights, dataset, image) and cached


class _Features:
    """CLIP's image embeddings of a dataset's images, from the cache or encoded (then cached).

    The cache folder holds part-*.safetensors files: `features` (N, D) fp32 and the metadata `images`,
    [relative path, size, mtime_ns] per row (a changed file is encoded again). Each encoding adds one
    part, written atomically, so concurrent runs never see half a file. CLIP is loaded on first need."""

    def __init__(self, weights, splits, device, cache_root=None, workers=0, skip_bad=False, say=print):
        inputs.check_weights(weights)
        self.path = inputs.DEMO_WEIGHTS if weights is None else weights
        self.path = self.path if os.path.isfile(self.path) else hub.resolve(self.path)
        self.sha256 = sha256_file(self.path)
        self.splits = splits
        self.device = device
        self.workers = workers
        self.skip_bad = skip_bad
        self.say = say
        root_digest = hashlib.sha256(os.path.abspath(splits.root).encode()).hexdigest()[:12]
        self.folder = os.path.join(cache_root or os.path.join(hub.cache_dir(), "features"), self.sha256[:16],
                                   f"{data.dataset_key(splits.name)}-{root_digest}")
        self.rows = self._read()
        self.clip = None

    def _identity(self, item):
        st = os.stat(item.path)
        return (os.path.relpath(item.path, self.splits.root), st.st_size, st.st_mtime_ns)

    def _read(self):
        rows = {}
        names = sorted(os.listdir(self.folder)) if os.path.isdir(self.folder) else []
        for name in (n for n in names if n.startswith("part-") and n.endswith(".safetensors")):
            with safe_open(os.path.join(self.folder, name), "pt") as f:
                images = json.loads(f.metadata()["images"])
                feats = f.get_tensor("features")
            rows.update({tuple(key): row for key, row in zip(images, feats)})
        return rows

    def get(self, items):
        """(features (M, D) fp32 on the CPU, the indices of `items` they belong to): every item, or with
        skip_bad those whose image reads."""
        keys = [self._identity(d) for d in items]
        missing = list({k: d for k, d in zip(keys, items) if k not in self.rows}.items())
        if missing:
            self._encode(missing)
        kept = [i for i, k in enumerate(keys) if k in self.rows]
        rows = [self.rows[keys[i]] for i in kept]
        return (torch.stack(rows) if rows else torch.empty(0, 0)), kept

    def _encode(self, missing):
        good, bad = data.check_images([d for _, d in missing], self.skip_bad)
        for path, reason in bad:
            self.say(f"warning: skipped {reason}")
        if self.clip is None:
            self.clip = inputs.load_weights(self.path, self.device).clip
        self.say(f"image features: encoding {len(good)} images of {self.splits.name} (cache: {self.folder})")
        transform = image_transform(self.clip.visual.input_resolution)
        dataset = data.ImageDataset(good, transform, skip_bad=self.skip_bad)
        loader = data.make_loader(dataset, 200, shuffle=False, drop_last=False, num_workers=self.workers,
                                  pin_memory=str(self.device).startswith("cuda"))
        feats, _ = extract_features(self.clip, loader, self.device, self.say)
        skipped = set(loader.skipped)
        key_of = {d.path: k for k, d in missing}
        keys = [key_of[d.path] for d in good if d.path not in skipped]
        if not keys:
            return
        feats = feats.float().cpu().contiguous()
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"part-{time.time_ns()}-{os.getpid()}.safetensors")
        meta = {"images": json.dumps(keys), "clip_sha256": self.sha256, "dataset": self.splits.name}
        atomic_write(path, lambda tmp: save_file({"features": feats}, tmp, metadata=meta))
        self.rows.update(zip(keys, feats))


# ----------------------------------------------------------------------------------------------
# runs on a dataset: one folder per (shots, seed)


@dataclass
class Probe:
    """What every (shots, seed) run on one dataset shares: its splits, its image features, the settings
    the run folders record, and where they go."""
    splits: data.DatasetSplits
    features: _Features
    data_given: str | None               # --data as given (None: the demo benchmark)
    weights: str | None                  # --weights as given (None: the bundled tiny CLIP)
    device: str
    root: str = "runs"

    def folder(self, shots, seed):
        return runs.probe_folder(self.root, data.dataset_key(self.splits.name), self.weights, shots, seed)

    def val(self):
        """The split the search scores C on: val; ImageNet's test split, as the official class has it."""
        if self.splits.val:
            return self.splits.val
        if self.splits.name == "ImageNet":
            return self.splits.test
        raise cli.UsageError(f"{self.splits.name} has no val split, and the recipe picks C on val images; "
                             "use a dataset layout with a val split")

    def few_shot(self, shots, seed):
        """(train items, val items) of the official draw."""
        if not self.splits.train:
            raise cli.UsageError(f"{self.splits.name} has no train split (a test-only dataset); probe a "
                                 "dataset with one and test it here with --classifier")
        val = self.val()
        train_labels = [d.label for d in self.splits.train]
        train_idx, val_idx = lpclip.sample(train_labels, [d.label for d in val], shots, seed)
        return [self.splits.train[i] for i in train_idx], [val[i] for i in val_idx]


def _labelled(probe, items):
    x, kept = probe.features.get(items)
    return x, np.asarray([items[i].label for i in kept], dtype=np.int64)


def run(probe: Probe, shots, seed):
    """One (shots, seed) run: the search on its few-shot sets, written to its folder (config.json,
    split.json, classifier.safetensors, then results.json); returns the results. A folder that holds
    results.json is left alone and its results returned."""
    folder = probe.folder(shots, seed)
    done = os.path.join(folder, "results.json")
    if os.path.exists(done):
        return _read_json(done)
    t0 = time.monotonic()
    cuda = str(probe.device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(probe.device)
    train, val = probe.few_shot(shots, seed)
    test_x, test_y = _labelled(probe, probe.splits.test)
    if not len(test_y):
        raise cli.UsageError(f"{probe.splits.name} has no readable test image; check --data")
    found = lpclip.search(*_labelled(probe, train), *_labelled(probe, val), test_x, test_y,
                          device=probe.device)
    names = probe.splits.classnames
    if list(found["classes"]) != list(range(len(names))):
        raise cli.UsageError(f"{probe.splits.name}'s few-shot train set lacks classes (it has "
                             f"{len(found['classes'])} of {len(names)}); every class needs {shots} train "
                             "images")
    metrics = compute_metrics(found["predictions"], test_y, names)
    metrics["accuracy"] = found["accuracy"]                  # 100 * correct / n, as the official script
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), _config(probe, shots, seed))
    data.save_split(os.path.join(folder, "split.json"), replace(probe.splits, train=train, val=val, test=[]))
    _save_classifier(os.path.join(folder, "classifier.safetensors"), found, names, probe.features.sha256)
    results = {"method": "linear-probe", "dataset": probe.splits.name, "shots": shots, "seed": seed,
               "subsample": "all", **metrics, "val_accuracy": found["val_accuracy"], "C": found["C"],
               "search": found["trace"], "fits": found["fits"], "seconds": time.monotonic() - t0,
               "peak_memory_bytes": torch.cuda.max_memory_allocated(probe.device) if cuda else None}
    write_json(done, results)
    return results


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise cli.UsageError(f"{path} is not valid JSON ({cli.one_line(e)}); remove it, run again") from None


def _config(probe, shots, seed):
    """config.json: every setting of the run (the prompt settings of CoOp's runs are null here)."""
    return {"method": "linear-probe", "dataset": probe.splits.name, "data": probe.data_given, "shots": shots,
            "seed": seed, "weights": probe.weights, "clip_sha256": probe.features.sha256, "subsample": "all",
            "n_ctx": None, "ctx_init": None, "csc": None, "class_token_position": None, "precision": "fp32",
            "grid": list(lpclip.GRID), "steps": lpclip.STEPS,
            "val_shots": lpclip.VAL_SHOTS.get(shots, min(shots, 4)), "max_iter": lpclip.MAX_ITER,
            "rtol": lpclip.RTOL, "device": str(probe.device)}


def _save_classifier(path, found, classnames, clip_sha256):
    tensors = {name: found[name].float().cpu().contiguous() for name in ("weight", "bias")}
    meta = {"method": "linear-probe", "classnames": json.dumps(classnames), "clip_sha256": clip_sha256,
            "C": repr(found["C"])}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


# ----------------------------------------------------------------------------------------------
# a saved classifier on another dataset (domain generalisation)


class Classifier(NamedTuple):
    weight: torch.Tensor        # (K, D) fp32
    bias: torch.Tensor          # (K,)
    classnames: list
    clip_sha256: str
    config: dict                # the run's config.json ({} for a bare file)


def load_classifier(path) -> Classifier:
    """A run folder's classifier.safetensors (or the file itself) and the run's config.json."""
    file = os.path.join(path, "classifier.safetensors") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise cli.UsageError(f"--classifier {path}: {file} not found; pass a linear-probe run folder")
    with safe_open(file, "pt") as f:
        meta = f.metadata() or {}
        if "classnames" not in meta or set(f.keys()) != {"weight", "bias"}:
            raise cli.UsageError(f"{file} is not a linear-probe classifier (weight, bias and classnames)")
        weight = f.get_tensor("weight")
        bias = f.get_tensor("bias")
    config_path = os.path.join(os.path.dirname(file), "config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    return Classifier(weight, bias, json.loads(meta["classnames"]), meta.get("clip_sha256", ""), config)


def evaluate_classifier(classifier: Classifier, x, y, classnames, imagenet_labels=None):
    """Metrics (percent) of `classifier` on features x and labels y of a dataset with `classnames`: its
    rows of those classes, matched by name (a name it has twice by the ImageNet label, when given)."""
    rows = _rows(classifier.classnames, classnames, imagenet_labels)
    pred = lpclip.predict(x, classifier.weight[rows].double(), classifier.bias[rows].double())
    metrics = compute_metrics(pred, y, classnames)
    metrics["accuracy"] = 100 * metrics["correct"] / max(metrics["total"], 1)
    return metrics


def _rows(source, target, imagenet_labels=None):
    rows_of = {}
    for i, name in enumerate(source):
        rows_of.setdefault(name, []).append(i)
    rows, missing = [], []
    for t, name in enumerate(target):
        found = rows_of.get(name, [])
        if len(found) > 1 and imagenet_labels is not None and imagenet_labels[t] in found:
            found = [imagenet_labels[t]]
        if len(found) != 1:
            missing.append(name)
        rows.extend(found[:1])
    if missing:
        named = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise cli.UsageError(f"the classifier has no single class named {named} ({len(missing)} of the "
                             f"target's {len(target)}); test it on a dataset whose classes it was trained on")
    return rows


# ----------------------------------------------------------------------------------------------
# the command line


def main(argv=None):
    cli.exit_with(cli.run(_main, argv))


def _main(argv):
    p = cli.parser("python -m coop_min.linear_probe", description=(
        "Linear-probe CLIP, the official lpclip recipe: few-shot logistic regression on CLIP image features, "
        "C searched on val images. --features DIR: the official feature files, the official report. --data: "
        "a dataset (default: the demo benchmark), one run folder per shot count and seed. --classifier: a "
        "run's classifier tested on another dataset."))
    what = p.add_mutually_exclusive_group()
    what.add_argument("--features", metavar="DIR", help="a folder with lpclip/feat_extractor.py's train.npz, "
                      "val.npz and test.npz")
    what.add_argument("--classifier", metavar="RUN_FOLDER", help="test this run's classifier on --data")
    p.add_argument("--data", help="dataset folder or data root (default: the demo benchmark)")
    p.add_argument("--dataset", default="auto", help="dataset name or auto (default auto)")
    p.add_argument("--weights", help="CLIP: a safetensors file, an OpenAI name (RN50, ViT-B/16, ...) or "
                   "hf-hub:ORG/NAME (default: the bundled tiny CLIP; with --classifier, the run's)")
    default_shots = ",".join(map(str, lpclip.SHOTS))
    default_seeds = ",".join(map(str, lpclip.SEEDS))
    p.add_argument("--shots", default=default_shots, help=f"shot counts, comma-separated (default "
                   f"{default_shots})")
    p.add_argument("--seeds", default=default_seeds, help=f"seeds, comma-separated (default {default_seeds})")
    p.add_argument("--output", help="the runs' root (default runs); with --classifier, the folder for its "
                   "results.json")
    p.add_argument("--device", help="default cuda if available")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes (default 0)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip and count unreadable images")
    p.add_argument("--feature-cache", metavar="DIR", help="where image features are cached "
                   "(default <cache>/features, the cache of coop_min.hub)")
    args = p.parse_args(argv)
    shots = _ints(args.shots, "--shots", least=1)
    seeds = _ints(args.seeds, "--seeds", least=0)
    if args.workers < 0:
        raise cli.UsageError(f"--workers must be >= 0, got {args.workers}")
    device = args.device or inputs.default_device()
    if args.features:
        if args.data or args.weights:
            raise cli.UsageError("--features brings its own image features; drop --data and --weights")
        return _report_features(args.features, shots, seeds, device)
    if args.classifier:
        return _transfer(args, device)
    return _probe_dataset(args, shots, seeds, device)


def _ints(text, flag, least):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < least or len(set(values)) != len(values):
        raise cli.UsageError(f"{flag} {text!r} must be distinct integers >= {least}, comma-separated "
                             f"(e.g. {flag} 1,2,4)")
    return values


def _say(line):
    print(line, file=sys.stderr, flush=True)


def _report_features(folder, shots, seeds, device):
    """The official script on its own feature files: one report line per shot count."""
    splits = lpclip.read_features(folder)
    name = os.path.basename(os.path.normpath(folder))
    (tx, ty), (vx, vy), (ex, ey) = splits["train"], splits["val"], splits["test"]
    for k in shots:
        accuracies = []
        for seed in seeds:
            train, val = lpclip.sample(ty, vy, k, seed)
            found = lpclip.search(tx[train], ty[train], vx[val], vy[val], ex, ey, device=device)
            _say(f"{name}, seed {seed}, {k} shot, weight {found['C']}, test_acc {found['accuracy']:.2f}")
            accuracies.append(found["accuracy"])
        print(lpclip.report_line(name, k, accuracies), flush=True)


def _probe_dataset(args, shots, seeds, device):
    """Every (shots, seed) run on one dataset, its image features encoded in one pass; then the report."""
    root = args.output or "runs"
    runs.check_writable(root)
    splits = data.load_dataset(inputs.data_root(args.data), args.dataset)
    features = _Features(args.weights, splits, device, args.feature_cache, args.workers, args.skip_bad_images,
                         _say)
    probe = Probe(splits, features, args.data, args.weights, device, root)
    todo = [(k, s) for k in shots for s in seeds
            if not os.path.exists(os.path.join(probe.folder(k, s), "results.json"))]
    needed = list(splits.test)
    for k, s in todo:
        train, val = probe.few_shot(k, s)
        needed += train + val
    features.get(needed)                                  # one encoding pass for every run
    accuracies = {}
    for k in shots:
        for s in seeds:
            r = run(probe, k, s)
            _say(f"{splits.name}, {k} shots, seed {s}: C {r['C']:.6g}, test accuracy {r['accuracy']:.2f} "
                 f"({probe.folder(k, s)})")
            accuracies.setdefault(k, []).append(r["accuracy"])
    for k in shots:
        print(lpclip.report_line(splits.name, k, accuracies[k]), flush=True)


def _transfer(args, device):
    """--classifier: a run's classifier on another dataset's test split; results.json in --output."""
    if not args.output:
        raise cli.UsageError("--classifier needs --output, the folder for its results.json")
    done = os.path.join(args.output, "results.json")
    if os.path.exists(done):
        raise cli.UsageError(f"--output {args.output} already holds a results.json; pick another --output")
    runs.check_writable(args.output)
    t0 = time.monotonic()
    classifier = load_classifier(args.classifier)
    weights = args.weights or classifier.config.get("weights")
    splits = data.load_dataset(inputs.data_root(args.data), args.dataset)
    features = _Features(weights, splits, device, args.feature_cache, args.workers, args.skip_bad_images,
                         _say)
    if classifier.clip_sha256 and features.sha256 != classifier.clip_sha256:
        raise cli.UsageError(f"{args.classifier} was trained on other CLIP weights than "
                             f"{weights or 'the bundled tiny CLIP'}; pass the run's --weights")
    x, kept = features.get(splits.test)
    y = np.asarray([splits.test[i].label for i in kept], dtype=np.int64)
    metrics = evaluate_classifier(classifier, x, y, splits.classnames, splits.imagenet_labels)
    os.makedirs(args.output, exist_ok=True)
    write_json(done, {"method": "linear-probe", "dataset": splits.name, **metrics,
                      "seconds": time.monotonic() - t0})
    print(f"{splits.name}: accuracy {metrics['accuracy']:.2f} (linear probe {args.classifier})", flush=True)


if __name__ == "__main__":
    main()
