"""Linear-probe CLIP's C search: coop_min.lpclip against scikit-learn, the official classifier.

    python -m benchmarks.linear_probe                  # 16 shots x 100 classes x 1024-d, then ImageNet size
    python -m benchmarks.linear_probe --quick          # small sizes (the dry run)
    python -m benchmarks.linear_probe --json lp.json   # the figures as JSON too

Both run the whole official search (7 grid values, then 8 bisection steps) on the same synthetic
features in the same process: scikit-learn as lpclip/linear_probe.py calls it (23 fits, each from
zero), ours with each C fitted once, from the fits around it. The table gives the seconds, fits and
L-BFGS iterations of each, the C each keeps and its test accuracy, and at each grid value the largest
difference between the two weight matrices: scikit-learn's absolute tolerance stops it early where
the gradient is small (large C, small C, small features), ours solves to the optimum, so the two
kept classifiers agree only where scikit-learn converged. Then ours alone at ImageNet's size (16 shots
x 1000 classes), on CUDA when there is one.

The features are CLIP-like: a common offset, class means and per-image noise, each with a spectrum
that decays over the dimensions (the signal faster than the noise).
"""
import argparse
import json
import time
import warnings

import numpy as np
import torch

from coop_min import lpclip


def features(classes, dim, shots, val_shots, test, seed=0, scale=1.0):
    """{"train"|"val"|"test": (x (N, dim) fp64, labels)}, `shots` / `val_shots` / test // classes images
    per class."""
    rng = np.random.RandomState(seed)
    k = np.arange(1, dim + 1)
    signal = 0.2 * scale * k ** -0.5                # std of the class means along each dimension
    noise = 0.25 * scale * k ** -0.25               # std of an image around its class mean
    means = rng.randn(classes, dim) * signal
    common = rng.randn(dim) * noise * 4

    def draw(per_class):
        y = np.repeat(np.arange(classes), per_class)
        return common + means[y] + rng.randn(len(y), dim) * noise, y
    return {"train": draw(shots), "val": draw(val_shots), "test": draw(max(test // classes, 1))}


def sklearn_search(splits):
    """lpclip/linear_probe.py's search with scikit-learn: every fit from zero, the kept end refitted."""
    from sklearn.linear_model import LogisticRegression
    (tx, ty), (vx, vy), (ex, ey) = splits["train"], splits["val"], splits["test"]
    fits = []

    def fit(c):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # penalty= is deprecated; ConvergenceWarning: n_iter_ says it
            clf = LogisticRegression(solver="lbfgs", max_iter=1000, penalty="l2", C=c).fit(tx, ty)
        fits.append((c, clf))
        return clf

    def score(c):
        return float((fit(c).predict(vx) == vy).mean())
    kept, _ = lpclip.bisect(score)
    clf = next(clf for c, clf in reversed(fits) if c == kept)
    grid = {c: clf for c, clf in fits[:len(lpclip.GRID)]}
    return {"accuracy": 100 * float((clf.predict(ex) == ey).mean()), "C": float(kept), "fits": len(fits),
            "iterations": sum(int(clf.n_iter_[0]) for _, clf in fits), "grid": grid}


def compare(splits, device):
    """Both searches timed on the same features; the weights of both at each grid value."""
    t0 = time.perf_counter()
    theirs = sklearn_search(splits)
    sklearn_s = time.perf_counter() - t0
    ours, ours_s = _ours(splits, device)
    (tx, ty) = splits["train"]
    grid = []
    for c, clf in theirs.pop("grid").items():
        weight, bias = lpclip.fit(torch.as_tensor(tx, device=device), ty, c)
        grid.append({"C": c, "sklearn_iterations": int(clf.n_iter_[0]),
                     "max_abs_weight_difference": float(np.abs(weight.cpu().numpy() - clf.coef_).max()),
                     "max_abs_weight": float(np.abs(weight.cpu().numpy()).max())})
    return {"sklearn": {**theirs, "seconds": sklearn_s}, "ours": {**ours, "seconds": ours_s},
            "speedup": sklearn_s / ours_s, "accuracy_difference": ours["accuracy"] - theirs["accuracy"],
            "grid": grid}


def _ours(splits, device):
    (tx, ty), (vx, vy), (ex, ey) = splits["train"], splits["val"], splits["test"]
    x = torch.as_tensor(tx, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    found = lpclip.search(x, ty, vx, vy, ex, ey, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return {"accuracy": found["accuracy"], "C": found["C"], "fits": len(found["fits"]),
            "iterations": sum(f["iterations"] for f in found["fits"]),
            "converged": all(f["converged"] for f in found["fits"])}, seconds


def _size(a, classes, test):
    return f"{a.shots} shots x {classes} classes x {a.dim}-d (val {a.val_shots} shots, test {test})"


def _print_compare(r, title):
    print(f"\n{title}")
    print(f"{'':26}{'seconds':>9}{'fits':>6}{'iterations':>12}{'kept C':>12}{'test acc':>10}")
    for name, key in (("scikit-learn (official)", "sklearn"), ("coop_min.lpclip", "ours")):
        s = r[key]
        print(f"{name:26}{s['seconds']:9.2f}{s['fits']:6d}{s['iterations']:12d}{s['C']:12.4g}"
              f"{s['accuracy']:10.2f}")
    print(f"speed-up {r['speedup']:.1f}x; test accuracy, ours - scikit-learn: "
          f"{r['accuracy_difference']:+.2f}")
    print(f"\n{'grid C':>8}{'sklearn iters':>15}{'max|W - W_sklearn|':>20}{'max|W|':>10}")
    for g in r["grid"]:
        print(f"{g['C']:8.0e}{g['sklearn_iterations']:15d}{g['max_abs_weight_difference']:20.3g}"
              f"{g['max_abs_weight']:10.3g}")


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=100, help="classes of the comparison (default 100)")
    p.add_argument("--dim", type=int, default=1024, help="feature size (default 1024, RN50's)")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--val-shots", type=int, default=4)
    p.add_argument("--test", type=int, default=3000, help="test images of the comparison (default 3000)")
    p.add_argument("--imagenet-classes", type=int, default=1000,
                   help="classes of ours alone (default 1000; 0 skips it)")
    p.add_argument("--imagenet-test", type=int, default=50000)
    p.add_argument("--scale", type=float, default=1.0,
                   help="feature scale (default 1; scikit-learn's tolerance is absolute)")
    p.add_argument("--skip-sklearn", action="store_true", help="time ours alone at the comparison's size")
    p.add_argument("--quick", action="store_true", help="10 classes x 64-d; ImageNet part 50 classes")
    p.add_argument("--device", help="of ours at ImageNet size (default cuda if available); the comparison "
                   "runs on the CPU")
    p.add_argument("--json", help="also write the figures to this file")
    return p


def main(argv=None):
    a = _parser().parse_args(argv)
    if a.quick:
        a.classes, a.dim, a.test = 10, 64, 300
        a.imagenet_classes, a.imagenet_test = min(a.imagenet_classes, 50), 2000
    cpu = torch.device("cpu")
    out = {"sizes": vars(a), "threads": torch.get_num_threads()}
    splits = features(a.classes, a.dim, a.shots, a.val_shots, a.test, scale=a.scale)
    title = f"C search, {_size(a, a.classes, a.test)}, cpu"
    if a.skip_sklearn:
        found, seconds = _ours(splits, cpu)
        out["ours"] = {**found, "seconds": seconds}
        print(f"{title}: ours {seconds:.2f} s, {found}")
    else:
        out["compare"] = compare(splits, cpu)
        _print_compare(out["compare"], title)
    if a.imagenet_classes:
        device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        big = features(a.imagenet_classes, a.dim, a.shots, a.val_shots, a.imagenet_test, seed=1,
                       scale=a.scale)
        found, seconds = _ours(big, device)
        out["imagenet"] = {**found, "seconds": seconds, "device": str(device)}
        print(f"\nours alone, {_size(a, a.imagenet_classes, a.imagenet_test)}, {device}: {seconds:.1f} s, "
              f"{found['fits']} fits, {found['iterations']} iterations, kept C {found['C']:.4g}, "
              f"test acc {found['accuracy']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
