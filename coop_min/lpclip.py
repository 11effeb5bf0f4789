"""The official lpclip recipe of linear-probe CLIP (CoOp's dashed lines): the solver, the few-shot draw,
the C search, and the official feature files and report line. `coop_min.linear_probe` runs it.

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
"""
import os
from typing import NamedTuple

import numpy as np
import torch

from coop_min import cli

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
