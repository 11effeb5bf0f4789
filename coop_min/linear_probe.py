"""`python -m coop_min.linear_probe`: linear-probe CLIP, the official lpclip recipe (CoOp's dashed lines).

The recipe, as lpclip/linear_probe.py runs it on the image features of lpclip/feat_extractor.py:
1. features: CLIP's image embedding (`encode_image`, not normalised) of the eval transform.
2. sampling, per shot count K and seed: `np.random.seed(seed)`; for each train label in ascending
   order, `np.random.choice(its indices, K, replace=False)`; then {1: 1, 2: 2, 4: 4, 8: 4, 16: 4}[K]
   val images of each of those labels the same way, from the same stream.
3. classifier: scikit-learn's LogisticRegression(solver="lbfgs", max_iter=1000, penalty="l2", C=C),
   i.e. multinomial logistic regression minimising C * sum_i CE(W x_i + b, y_i) + 0.5 * ||W||^2
   (the bias is not penalised; two classes: scikit-learn's binomial model).
4. search: C in GRID scored by val accuracy, the first best is the peak; then STEPS steps of a
   bisection in log10 C between 0.1 and 10 times the peak, ties going left. Reported: the test
   accuracy of the last step's classifier; per K, the mean and the population std over seeds.

The solver needs no scikit-learn: L-BFGS in fp64 PyTorch (on the GPU when the features are there)
on the same objective, solved to its optimum. It works in a basis where the problem is well
conditioned: features centred (the unpenalised bias absorbs the mean) and rotated onto their
principal axes (the penalty is rotation invariant; axes without variance are dropped, their
weights being zero at the optimum), each axis scaled by the inverse square root of the objective's
curvature there at W = 0. The search fits each C once (the official bisection refits the end it
keeps at every step) and starts each fit from the fits around it, interpolated in log C.

Where the result differs from the official script's: scikit-learn stops when the largest entry of
the gradient of mean(CE) + ||W||^2 / (2 C n) is below 1e-4, an absolute tolerance. On features with
small or uneven scales that happens far from the optimum (at large C, and at small C after one
step), and the official accuracies are then those of the stopped iterate. We stop at the optimum
(relative weight error below RTOL), so we agree with scikit-learn wherever it reaches the optimum.
Image features come from CLIP in fp32 (the official extractor runs CLIP in fp16 on CUDA).

Features are computed once per (CLIP weights, dataset, image) and cached, only for the images a run
uses: <cache>/features/<sha256[:16]>/<dataset>-<root digest>/part-*.safetensors. ImageNet has no
val split; as the official ImageNet class (val = test), its val shots are drawn from the test set.
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

from coop_min import cli, data, hub, inputs, runs
from coop_min.evaluate import compute_metrics, extract_features
from coop_min.files import atomic_write, sha256_file, write_json
from coop_min.transforms import image_transform

GRID = (1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6)     # the official search_list
STEPS = 8                                       # linear_probe.sh's --num_step
VAL_SHOTS = {1: 1, 2: 2, 4: 4, 8: 4, 16: 4}     # the official val_shot_list (other K: min(K, 4))
SHOTS = (1, 2, 4, 8, 16)
SEEDS = (1, 2, 3)                               # linear_probe.sh's --num_run 3
MAX_ITER = 1000                                 # LogisticRegression(max_iter=1000)
RTOL = 1e-4                                     # stop at ||grad_W F|| <= RTOL * ||W||
HISTORY = 10                                    # L-BFGS pairs kept (scipy's default)


# ----------------------------------------------------------------------------------------------
# the solver: scikit-learn's multinomial logistic regression, solved to its optimum


class _Fit(NamedTuple):
    weight: torch.Tensor        # (K, D) fp64, original basis
    bias: torch.Tensor          # (K,)
    wb: torch.Tensor            # (rows, r + 1): weights and bias in the solver's basis, unscaled
    iterations: int
    converged: bool


class _Problem:
    """One train set in the solver's basis, shared by every C of a search: z = (x - mean) @ axes, the
    principal axes of the centred features (numpy's matrix_rank rule drops the axes without variance)."""

    def __init__(self, x, y, n_classes):
        x = torch.as_tensor(x).double()
        self.y = torch.as_tensor(y, device=x.device).long()
        self.n, self.n_classes = len(x), n_classes
        self.rows = 1 if n_classes == 2 else n_classes      # binomial: logits (0, w.z + b), as scikit-learn
        self.mean = x.mean(0)
        u, sv, vh = torch.linalg.svd(x - self.mean, full_matrices=False)
        keep = sv > sv.max() * max(x.shape) * torch.finfo(torch.float64).eps
        self.axes = vh[keep].T                              # (D, r)
        self.z = u[:, keep] * sv[keep]                      # (n, r)
        self.variance = sv[keep] ** 2                       # (r,): sum_i z_ij^2
        self.sigma = self.z.square().sum(1).mean().sqrt()   # the bias counts as a weight on a feature sigma
        self.curvature = 0.25 if n_classes == 2 else 1.0 / n_classes   # of CE at W = 0, per logit

    def scales(self, C):
        """(r + 1,): 1 / sqrt(the objective's curvature along each axis and the bias at W = 0)."""
        cq = C * self.curvature
        bias = torch.tensor([1.0 / (cq * self.n) ** 0.5], dtype=torch.float64, device=self.z.device)
        return torch.cat([1.0 / (1.0 + cq * self.variance).sqrt(), bias])

    def logits(self, wb):
        """(n, K) logits of the scaled-back variables wb (rows, r + 1)."""
        out = self.z @ wb[:, :-1].T + wb[:, -1]
        return torch.cat([torch.zeros_like(out), out], 1) if self.n_classes == 2 else out

    def objective(self, C):
        """v -> (F, dF/dv, done) with F = C * sum_i CE + 0.5 * ||W||^2. done: the logits are within RTOL of
        their scale sigma ||W|| of the optimum's. F is 1-strongly convex in W, so ||W - W*|| <= ||grad_W||
        (the bias counting as a weight on a feature sigma); the bias is not penalised, so its error is also
        bounded by its Newton step at the curvature of W = 0 (which matters at small C, where it is small)."""
        s = self.scales(C)
        unit = torch.ones_like(s)
        unit[-1] = self.sigma
        rows = torch.arange(self.n, device=self.z.device)

        def f(v):
            wb = v * s
            logits = self.logits(wb)
            lse = torch.logsumexp(logits, 1)
            value = C * (lse - logits[rows, self.y]).sum() + 0.5 * wb[:, :-1].square().sum()
            p = torch.exp(logits - lse[:, None])
            p[rows, self.y] -= 1                            # dCE/dlogits
            p = p[:, 1:] if self.n_classes == 2 else p
            grad = torch.cat([C * p.T @ self.z + wb[:, :-1], C * p.sum(0)[:, None]], 1)
            weights = (grad * unit).norm() <= RTOL * (wb / unit).norm()
            bias = (grad[:, -1] * s[-1] ** 2).norm() <= RTOL * wb[:, :-1].norm() * self.sigma
            return value.item(), grad * s, bool(weights & bias)
        return f

    def solve(self, C, start=None, max_iter=MAX_ITER) -> _Fit:
        """The optimum at C, from `start` (rows, r + 1) in the unscaled solver basis (default 0)."""
        s = self.scales(C)
        v0 = torch.zeros(self.rows, len(s), dtype=torch.float64, device=self.z.device)
        v, iterations, converged = _lbfgs(self.objective(C), v0 if start is None else start / s, max_iter)
        wb = v * s
        weight = wb[:, :-1] @ self.axes.T
        bias = wb[:, -1] - weight @ self.mean
        if self.n_classes == 2:
            weight = torch.cat([torch.zeros_like(weight), weight])
            bias = torch.cat([torch.zeros_like(bias), bias])
        return _Fit(weight, bias, wb, iterations, converged)


def _lbfgs(f, v, max_iter):
    """Minimise f from v: L-BFGS (two-loop recursion) with a backtracking Armijo line search, which
    suffices on a strictly convex function (every pair has s.y > 0). Returns (v, iterations, converged);
    a step that no longer lowers f in fp64 counts as converged (the optimum to machine precision)."""
    value, grad, done = f(v)
    pairs = []
    for it in range(max_iter):
        if done:
            return v, it, True
        d = _direction(grad, pairs)
        slope = float((grad * d).sum())
        t = 1.0
        for _ in range(40):
            new_value, new_grad, done = f(v + t * d)
            if new_value <= value + 1e-4 * t * slope:
                break
            t /= 2
        else:
            return v, it, True
        step = t * d
        change = new_grad - grad
        if float((step * change).sum()) > 0:
            pairs = [*pairs[-(HISTORY - 1):], (step, change)]
        small = value - new_value <= 64 * torch.finfo(torch.float64).eps * abs(value)
        v = v + step
        value = new_value
        grad = new_grad
        if small:
            return v, it + 1, True
    return v, max_iter, done


def _direction(grad, pairs):
    """-H grad, H the L-BFGS inverse Hessian of the stored (step, change) pairs (0-dim tensors throughout:
    no device synchronisation)."""
    d = -grad
    alphas = []
    for s, y in reversed(pairs):
        a = (s * d).sum() / (s * y).sum()
        d = d - a * y
        alphas.append(a)
    if pairs:
        s, y = pairs[-1]
        d = d * ((s * y).sum() / (y * y).sum())
    for (s, y), a in zip(pairs, reversed(alphas)):
        d = d + (a - (y * d).sum() / (s * y).sum()) * s
    return d


def fit(features, labels, C, n_classes=None, init=None):
    """(weight (K, D), bias (K,)), fp64 on the features' device: the minimiser of
    C * sum_i CE(W x_i + b, y_i) + 0.5 * ||W||^2, scikit-learn's LogisticRegression(C=C) at its optimum.
    labels: 0..K-1, each present. init: a (weight, bias) to start from (e.g. the fit at a nearby C)."""
    x = torch.as_tensor(features).double()
    y = torch.as_tensor(labels, device=x.device).long()
    n_classes = int(y.max()) + 1 if n_classes is None else n_classes
    if n_classes < 2 or torch.unique(y).numel() != n_classes or int(y.min()) < 0:
        raise ValueError(f"labels must cover 0..{n_classes - 1}, each class present, two classes at least")
    problem = _Problem(x, y, n_classes)
    start = None
    if init is not None:
        start = _to_solver_basis(problem, *(torch.as_tensor(t, device=x.device).double() for t in init))
    result = problem.solve(C, start)
    return result.weight, result.bias


def _to_solver_basis(problem, weight, bias):
    """(rows, r + 1) unscaled solver variables of a classifier (the inverse of solve's mapping)."""
    if problem.n_classes == 2:
        weight = weight[1:] - weight[:1]
        bias = bias[1:] - bias[:1]
    return torch.cat([weight @ problem.axes, (bias + weight @ problem.mean)[:, None]], 1)


def predict(x, weight, bias, chunk=8192):
    """argmax_k (x W^T + b)_k in fp64, in chunks of rows (ties: the first class, as numpy's argmax)."""
    x = torch.as_tensor(x)
    return torch.cat([(x[i:i + chunk].to(weight).double() @ weight.T + bias).argmax(1)
                      for i in range(0, len(x), chunk)] or [torch.empty(0, dtype=torch.long)])


# ----------------------------------------------------------------------------------------------
# the sampling and the search


def sample(train_labels, val_labels, shots, seed):
    """(train indices, val indices) of the official few-shot draw: np.random.seed(seed), then per label
    of np.unique(train_labels) in ascending order np.random.choice(its indices, shots, replace=False),
    then VAL_SHOTS[shots] per label from the val labels, continuing the stream (legacy RandomState:
    the global generator's algorithm)."""
    rng = np.random.RandomState(seed)
    labels = np.unique(train_labels)
    train = _draw(rng, np.asarray(train_labels), labels, shots, "train")
    val = _draw(rng, np.asarray(val_labels), labels, VAL_SHOTS.get(shots, min(shots, 4)), "val")
    return train, val


def _draw(rng, all_labels, labels, k, split):
    order = np.argsort(all_labels, kind="stable")           # each label's indices, ascending (np.where)
    starts = np.searchsorted(all_labels[order], labels, side="left")
    ends = np.searchsorted(all_labels[order], labels, side="right")
    picked = []
    for label, a, b in zip(labels, starts, ends):
        if b - a < k:
            raise cli.UsageError(f"class {label} has {b - a} {split} images, fewer than the {k} to draw; "
                                 "lower --shots")
        picked.extend(rng.choice(order[a:b], size=k, replace=False))
    return np.asarray(picked, dtype=np.int64)


def bisect(score, steps=STEPS):
    """The official C search on score(C) -> val accuracy: GRID, then `steps` steps of the log-space
    bisection, its float arithmetic transcribed. Returns (the last step's kept C, [(C, accuracy)] of
    every score the official script computes, in its order)."""
    trace = []

    def scored(c):
        trace.append((c, score(c)))
        return trace[-1][1]
    accuracies = [scored(c) for c in GRID]
    c_peak = GRID[int(np.argmax(accuracies))]
    c_left, c_right = 1e-1 * c_peak, 1e1 * c_peak
    c_final = None
    for _ in range(steps):
        acc_left, acc_right = scored(c_left), scored(c_right)
        if acc_left < acc_right:
            c_final = c_right
            c_left = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_right = np.log10(c_right)
        else:
            c_final = c_left
            c_right = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_left = np.log10(c_left)
        c_left, c_right = np.power(10, c_left), np.power(10, c_right)
    return c_final, trace


def search(train_x, train_y, val_x, val_y, test_x, test_y, device=None, steps=STEPS):
    """The official search on features (N, D) and labels: the kept classifier's test accuracy.

    Returns {"accuracy": test accuracy in percent (100 * correct / n, as the official script),
    "val_accuracy", "C", "trace": [{"C", "val_accuracy"}] of the official script's 23 scores,
    "fits": [{"C", "iterations", "converged"}] of the distinct fits, "weight" (K, D), "bias" (K,)
    (fp64, rows in the order of np.unique(train_y)), "classes", "predictions" (test)}."""
    x = torch.as_tensor(train_x)
    device = torch.device(device or x.device)
    classes = np.unique(np.asarray(train_y))
    index = torch.as_tensor(np.searchsorted(classes, np.asarray(train_y)), device=device)
    problem = _Problem(x.to(device), index, len(classes))
    classes_t = torch.as_tensor(classes, device=device)
    val_y = torch.as_tensor(np.asarray(val_y), device=device)
    fits = {}                                # _key(C) -> _Fit
    scores = {}                              # _key(C) -> val accuracy

    def fitted(c):
        key = _key(c)
        if key not in fits:
            fits[key] = problem.solve(c, _start(fits, c))
        return fits[key]

    def score(c):
        key = _key(c)
        if key not in scores:
            f = fitted(c)
            scores[key] = int((classes_t[predict(val_x, f.weight, f.bias)] == val_y).sum()) / len(val_y)
        return scores[key]
    for c in sorted(GRID):                   # ascending: each grid fit starts from the ones below it
        fitted(c)
    c, trace = bisect(score, steps)
    kept = fitted(c)
    pred = classes_t[predict(test_x, kept.weight, kept.bias)].cpu()
    correct = int((pred == torch.as_tensor(np.asarray(test_y))).sum())
    return {"accuracy": 100 * correct / len(pred), "val_accuracy": 100 * score(c), "C": float(c),
            "trace": [{"C": float(c), "val_accuracy": 100 * a} for c, a in trace],
            "fits": [{"C": k, "iterations": f.iterations, "converged": f.converged} for k, f in fits.items()],
            "weight": kept.weight, "bias": kept.bias, "classes": classes, "predictions": pred}


def _key(c):
    """A fit's cache key: C to 12 digits (the bisection's 10 ** log10(C) may move C by one ulp)."""
    return float(f"{c:.12g}")


def _start(fits, c):
    """Where the fit at c starts: the fits on either side interpolated linearly in log C, else the two
    nearest on one side extrapolated, else the nearest; None before the first fit."""
    if not fits:
        return None
    below = sorted((k for k in fits if k < c), reverse=True)
    above = sorted(k for k in fits if k > c)
    side = (below or above)[:2]
    a, b = (below[0], above[0]) if below and above else (side[0], side[-1])
    if a == b:
        return fits[a].wb
    t = (np.log10(c) - np.log10(a)) / (np.log10(b) - np.log10(a))
    return fits[a].wb + float(t) * (fits[b].wb - fits[a].wb)


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
# the official feature files


def read_features(folder):
    """{"train"|"val"|"test": (features (N, D) fp64, labels (N,) int64)} from the train.npz, val.npz and
    test.npz that lpclip/feat_extractor.py writes (arrays `feature_list` and `label_list`)."""
    if not os.path.isdir(folder):
        raise cli.UsageError(f"--features {folder} is not a folder; pass the folder holding train.npz, "
                             "val.npz and test.npz (lpclip/feat_extractor.py's <output>/<Dataset>)")
    out = {}
    for split in ("train", "val", "test"):
        path = os.path.join(folder, f"{split}.npz")
        if not os.path.isfile(path):
            raise cli.UsageError(f"{path} not found; --features needs train.npz, val.npz and test.npz as "
                                 "lpclip/feat_extractor.py writes them")
        try:
            with np.load(path) as f:
                x = np.asarray(f["feature_list"], dtype=np.float64)
                y = np.asarray(f["label_list"])
        except (KeyError, ValueError, OSError) as e:
            raise cli.UsageError(f"{path} is not a feature file ({cli.one_line(e)}); it needs the arrays "
                                 "feature_list (N, D) and label_list (N,), as lpclip/feat_extractor.py "
                                 "writes them")
        if x.ndim != 2 or y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise cli.UsageError(f"{path}: feature_list {x.shape} and label_list {y.shape} {y.dtype} must be "
                                 "(N, D) and (N,) integers")
        out[split] = (x, y.astype(np.int64))
    return out


def report_line(dataset, shots, accuracies):
    """The official report line of one shot count: mean and population std over seeds."""
    return f"{dataset}, {shots} Shot, Test acc stat: {np.mean(accuracies):.2f} ({np.std(accuracies):.2f})"


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
        train_idx, val_idx = sample([d.label for d in self.splits.train], [d.label for d in val], shots, seed)
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
    found = search(*_labelled(probe, train), *_labelled(probe, val), test_x, test_y, device=probe.device)
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
            "grid": list(GRID), "steps": STEPS, "val_shots": VAL_SHOTS.get(shots, min(shots, 4)),
            "max_iter": MAX_ITER, "rtol": RTOL, "device": str(probe.device)}


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
    pred = predict(x, classifier.weight[rows].double(), classifier.bias[rows].double())
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
    default_shots = ",".join(map(str, SHOTS))
    default_seeds = ",".join(map(str, SEEDS))
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
    splits = read_features(folder)
    name = os.path.basename(os.path.normpath(folder))
    (tx, ty), (vx, vy), (ex, ey) = splits["train"], splits["val"], splits["test"]
    for k in shots:
        accuracies = []
        for seed in seeds:
            train, val = sample(ty, vy, k, seed)
            found = search(tx[train], ty[train], vx[val], vy[val], ex, ey, device=device)
            _say(f"{name}, seed {seed}, {k} shot, weight {found['C']}, test_acc {found['accuracy']:.2f}")
            accuracies.append(found["accuracy"])
        print(report_line(name, k, accuracies), flush=True)


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
        print(report_line(splits.name, k, accuracies[k]), flush=True)


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
