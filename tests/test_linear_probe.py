"""coop_min.lpclip and coop_min.linear_probe against scikit-learn and transcriptions of the official lpclip
code: the solver (LogisticRegression at its optimum), the few-shot draw (np.random.seed +
np.random.choice), the C search (linear_probe.py's bisection), the official report on the official feature
files, and a run on the demo benchmark (its folder, its cached features, a second call that reuses both)."""
import contextlib
import functools
import io
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from coop_min import data, inputs, linear_probe, lpclip
from coop_min.evaluate import split_features

sklearn = pytest.importorskip("sklearn.linear_model")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The problems here are tiny: one torch thread (on a busy machine, threads that wait for each other
    make every small op slow)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sklearn(x, y, C, tol=1e-4, max_iter=1000):
    """The official classifier: LogisticRegression(solver="lbfgs", max_iter=1000, penalty="l2", C=C);
    tol=1e-4 is scikit-learn's default (the official one), a smaller tol its optimum."""
    clf = sklearn.LogisticRegression(solver="lbfgs", max_iter=max_iter, penalty="l2", C=C, tol=tol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # penalty= is deprecated; convergence is checked with n_iter_
        return clf.fit(x, y)


def _optimum(x, y, C):
    """scikit-learn solved to its optimum: a tight tolerance, on centred features (the same problem, the
    bias then b - W mean; uncentred, its fp64 objective stops moving before the bias is optimal at small C).
    Returns ((K, D) weights, (K,) biases), binary models as (0, w)."""
    mean = x.mean(0)
    clf = _sklearn(x - mean, y, C, tol=1e-12, max_iter=100000)
    weight, bias = _sklearn_rows(clf, len(np.unique(y)))
    return weight, bias - weight @ mean


def _predict(x, weight, bias):
    return np.argmax(x @ weight.T + bias, axis=1)


def _blobs(rng, classes, dim, per_class, sep=1.0, scales=None):
    """Gaussian classes (shuffled), features multiplied by `scales` (uneven scales make scikit-learn's
    absolute tolerance stop early)."""
    means = rng.randn(classes, dim) * sep
    y = rng.permutation(np.repeat(np.arange(classes), per_class))
    x = means[y] + rng.randn(len(y), dim)
    return (x if scales is None else x * scales), y


def _sklearn_rows(clf, classes):
    """(K, D) and (K,) of a fitted LogisticRegression; binary: scikit-learn's single row as (0, w)."""
    if classes == 2:
        return np.stack([np.zeros_like(clf.coef_[0]), clf.coef_[0]]), np.array([0.0, clf.intercept_[0]])
    return clf.coef_, clf.intercept_


# ----------------------------------------------------------------------------------------------
# the solver


@pytest.mark.parametrize("classes", [5, 2])
def test_fit_matches_sklearn_where_sklearn_converges(classes):
    rng = np.random.RandomState(0)
    x, y = _blobs(rng, classes, 16, 30, sep=0.7)
    for C in (1e-3, 1e-1, 1.0):
        clf = _sklearn(x, y, C)
        assert clf.n_iter_[0] < 1000
        weight, bias = lpclip.fit(x, y, C)
        w_ref, b_ref = _sklearn_rows(clf, classes)
        scale = np.abs(w_ref).max()
        assert np.abs(weight.numpy() - w_ref).max() <= 1e-2 * scale, C      # scikit-learn stops near it
        assert np.abs(bias.numpy() - b_ref).max() <= 2e-2 * scale, C
        assert (lpclip.predict(x, weight, bias).numpy() == clf.predict(x)).all()


@pytest.mark.parametrize("classes", [5, 2])
def test_fit_is_sklearns_optimum_at_every_c_of_the_grid(classes):
    """scikit-learn solved to a tight tolerance: the optimum, also at large C and on uneven scales, where
    its default tolerance stops early."""
    rng = np.random.RandomState(1)
    x, y = _blobs(rng, classes, 12, 25, sep=0.8, scales=np.logspace(0, -1.5, 12))
    for C in (1e-4, 1e-2, 1.0, 1e2):
        w_ref, b_ref = _optimum(x, y, C)
        weight, bias = lpclip.fit(x, y, C)
        scale = np.abs(w_ref).max()
        assert np.abs(weight.numpy() - w_ref).max() <= 1e-3 * scale, C
        assert np.abs(bias.numpy() - b_ref).max() <= 1e-3 * max(scale, np.abs(b_ref).max()), C
        assert (lpclip.predict(x, weight, bias).numpy() == _predict(x, w_ref, b_ref)).all()


def test_fit_from_a_warm_start_reaches_the_same_optimum():
    rng = np.random.RandomState(2)
    x, y = _blobs(rng, 4, 10, 20, sep=0.6)
    cold = lpclip.fit(x, y, 10.0)
    warm = lpclip.fit(x, y, 10.0, init=lpclip.fit(x, y, 3.0))
    assert torch.allclose(cold[0], warm[0], atol=1e-3 * float(cold[0].abs().max()))


def test_fit_refuses_labels_with_a_missing_class():
    with pytest.raises(ValueError, match="each class present"):
        lpclip.fit(np.eye(3), [0, 2, 2], 1.0)


# ----------------------------------------------------------------------------------------------
# the few-shot draw and the C search, against transcriptions of lpclip/linear_probe.py


def _official_sample(train_label, val_label, num_shot, seed):
    """lpclip/linear_probe.py's sampling, line for line."""
    val_shot_list = {1: 1, 2: 2, 4: 4, 8: 4, 16: 4}
    np.random.seed(seed)
    all_label_list = np.unique(train_label)
    selected_idx_list = []
    for label in all_label_list:
        label_collection = np.where(train_label == label)[0]
        selected_idx = np.random.choice(label_collection, size=num_shot, replace=False)
        selected_idx_list.extend(selected_idx)
    val_num_shot = val_shot_list[num_shot]
    val_selected_idx_list = []
    for label in all_label_list:
        label_collection = np.where(val_label == label)[0]
        selected_idx = np.random.choice(label_collection, size=val_num_shot, replace=False)
        val_selected_idx_list.extend(selected_idx)
    return selected_idx_list, val_selected_idx_list


def test_sample_is_the_official_draw():
    rng = np.random.RandomState(3)
    train = rng.permutation(np.repeat(np.arange(7), 20)) * 3          # labels need not be 0..K-1
    val = rng.permutation(np.repeat(np.arange(7), 5)) * 3
    state = np.random.get_state()
    try:
        for shots in (1, 2, 4, 8, 16):
            for seed in (1, 2, 3, 10):
                want = _official_sample(train, val, shots, seed)
                got = lpclip.sample(train, val, shots, seed)
                assert [list(g) for g in got] == [list(w) for w in want]
    finally:
        np.random.set_state(state)


def test_sample_names_a_class_with_too_few_images():
    with pytest.raises(ValueError, match="class 1 has 1 train images"):
        lpclip.sample([0, 0, 1], [0, 1], 2, 1)


class _FakeClassifier:
    """Stands for a LogisticRegression fitted at C: its val accuracy is the curve at C."""

    def __init__(self, C, curve, calls):
        self.C = C
        self.accuracy = curve(C)
        calls.append(C)


def _official_search(curve, num_step=8):
    """lpclip/linear_probe.py's search with a fake fit: (the C of each fit in order, clf_final's C)."""
    calls = []
    search_list = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
    acc_list = [_FakeClassifier(c, curve, calls).accuracy for c in search_list]
    peak_idx = np.argmax(acc_list)
    c_peak = search_list[peak_idx]
    c_left, c_right = 1e-1 * c_peak, 1e1 * c_peak
    clf_final = None
    for _ in range(num_step):
        clf_left = _FakeClassifier(c_left, curve, calls)
        clf_right = _FakeClassifier(c_right, curve, calls)
        if clf_left.accuracy < clf_right.accuracy:
            clf_final = clf_right
            c_left = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_right = np.log10(c_right)
        else:
            clf_final = clf_left
            c_right = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_left = np.log10(c_left)
        c_left, c_right = np.power(10, c_left), np.power(10, c_right)
    return calls, clf_final.C


@pytest.mark.parametrize("peak", [7.0, 3.3, 0.0, -2.6, -7.0])
@pytest.mark.parametrize("step", [0.0, 0.25, 1.0])
def test_bisect_is_the_official_search(peak, step):
    """Accuracy curves peaked anywhere (also beyond the grid), quantised by `step` so that ties occur."""
    def curve(c):
        distance = abs(np.log10(c) - peak)
        return -(np.floor(distance / step) * step if step else distance)
    calls, kept = _official_search(curve)
    got, trace = lpclip.bisect(curve)
    assert [c for c, _ in trace] == calls           # the same C values, bit for bit, in the same order
    assert got == kept


def test_search_fits_each_c_once_and_keeps_the_official_choice():
    rng = np.random.RandomState(4)
    x, y = _blobs(rng, 5, 8, 24, sep=0.5)
    (tx, ty), (vx, vy), (ex, ey) = (x[:60], y[:60]), (x[60:90], y[60:90]), (x[90:], y[90:])
    found = lpclip.search(tx, ty, vx, vy, ex, ey)
    assert len(found["trace"]) == 7 + 2 * 8
    assert len(found["fits"]) == len({f"{t['C']:.12g}" for t in found["trace"]}) <= 16

    optimum = functools.cache(lambda c: _optimum(tx, ty, c))      # scikit-learn at its optimum

    def accuracy(c):                                                # scored as the official code
        return float((_predict(vx, *optimum(c)) == vy).mean())
    kept, _ = lpclip.bisect(accuracy)
    assert found["C"] == kept
    assert found["accuracy"] == 100 * (_predict(ex, *optimum(kept)) == ey).sum() / len(ey)


# ----------------------------------------------------------------------------------------------
# the official feature files and report


def _official_report(splits, name, shots, seeds):
    """lpclip/linear_probe.py's report lines, its search run with scikit-learn solved to its optimum."""
    (tx, ty), (vx, vy), (ex, ey) = splits["train"], splits["val"], splits["test"]
    lines = []
    for k in shots:
        accuracies = []
        for seed in seeds:
            tr, va = _official_sample(ty, vy, k, seed)
            optimum = functools.cache(lambda c, x=tx[tr], y=ty[tr]: _optimum(x, y, c))

            def accuracy(c, x=vx[va], y=vy[va], optimum=optimum):
                return sum(_predict(x, *optimum(c)) == y) / len(y)
            kept, _ = lpclip.bisect(accuracy)
            pred = _predict(ex, *optimum(kept))
            accuracies.append(100 * sum(pred == ey) / len(pred))
        mean = sum(accuracies) / len(accuracies)
        std = (sum((a - mean) ** 2 for a in accuracies) / len(accuracies)) ** 0.5
        lines.append("{}, {} Shot, Test acc stat: {:.2f} ({:.2f})".format(name, k, mean, std))
    return lines


def _write_npz(folder, rng):
    means = rng.randn(4, 6)
    splits = {}
    for split, n in (("train", 20), ("val", 6), ("test", 25)):
        y = rng.permutation(np.repeat(np.arange(4), n))
        x = means[y] + rng.randn(len(y), 6)
        # as feat_extractor.py: lists of Python floats and ints
        np.savez(folder / split, feature_list=[list(map(float, row)) for row in x],
                 label_list=list(map(int, y)))
        splits[split] = (x, y)
    return splits


def test_features_mode_prints_the_official_report(tmp_path, capsys):
    folder = tmp_path / "OxfordPets"
    folder.mkdir()
    splits = _write_npz(folder, np.random.RandomState(5))
    assert {k: (v[0].shape, v[1].shape) for k, v in lpclip.read_features(str(folder)).items()} == \
        {k: (v[0].shape, v[1].shape) for k, v in splits.items()}
    linear_probe.main(["--features", str(folder), "--shots", "1,4", "--seeds", "1,2", "--device", "cpu"])
    assert capsys.readouterr().out.splitlines() == _official_report(splits, "OxfordPets", (1, 4), (1, 2))


# ----------------------------------------------------------------------------------------------
# a run on the demo benchmark, a second call, and the classifier on a dataset


def _rows_cached(cache):
    rows = 0
    for path in cache.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            rows += f.get_slice("features").get_shape()[0]
    return rows


def _main(argv):
    """linear_probe.main(argv) -> its stdout lines."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        linear_probe.main(argv)
    return out.getvalue().splitlines()


@pytest.fixture(scope="module")
def demo_run(e2e_setup, tmp_path_factory):
    """One run (1 shot, seed 1) on the demo benchmark with a small random CLIP, features cached in a
    scratch folder: {"argv", "report" (its stdout lines), "folder", "cache", "splits"} and e2e_setup's."""
    root = tmp_path_factory.mktemp("linear_probe")
    argv = ["--data", e2e_setup["data"], "--weights", e2e_setup["weights"], "--shots", "1", "--seeds", "1",
            "--output", str(root / "runs"), "--feature-cache", str(root / "features"), "--device", "cpu"]
    return {**e2e_setup, "argv": argv, "report": _main(argv), "cache": root / "features",
            "folder": root / "runs" / "demo" / "shots_1" / "linear-probe" / "clip" / "seed1",
            "splits": data.load_dataset(e2e_setup["data"])}


def test_demo_run_writes_config_results_and_the_official_report(demo_run):
    folder = demo_run["folder"]
    assert folder.is_dir()                   # the layout spelled out above, as the sweep finds it
    results = json.loads((folder / "results.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert {k: results[k] for k in ("method", "dataset", "shots", "seed", "subsample")} == \
        {"method": "linear-probe", "dataset": "Demo", "shots": 1, "seed": 1, "subsample": "all"}
    assert len(results["search"]) == 23
    assert results["C"] in (results["search"][-2]["C"], results["search"][-1]["C"])   # the last step's end
    keys = ("method", "dataset", "shots", "seed", "weights", "subsample", "n_ctx", "csc")
    want = {"method": "linear-probe", "dataset": "Demo", "shots": 1, "seed": 1,
            "weights": demo_run["weights"], "subsample": "all", "n_ctx": None, "csc": None}
    assert {k: config[k] for k in keys} == want
    assert demo_run["report"] == [f"Demo, 1 Shot, Test acc stat: {results['accuracy']:.2f} (0.00)"]


def test_demo_run_encodes_only_the_images_it_uses(demo_run):
    splits = demo_run["splits"]
    rows = _rows_cached(demo_run["cache"])
    assert rows == 2 * len(splits.classnames) + len(splits.test)      # 1 train + 1 val a class, and test
    assert rows < len(splits.train) + len(splits.test)


def test_demo_classifier_on_evaluates_features_gives_the_runs_accuracy(demo_run):
    """The saved classifier, on features computed by coop_min.evaluate's path, not the run's cache."""
    splits = demo_run["splits"]
    with safe_open(str(demo_run["folder"] / "classifier.safetensors"), "pt") as f:
        weight = f.get_tensor("weight").double()
        bias = f.get_tensor("bias").double()
        meta = f.metadata()
    assert weight.shape == (len(splits.classnames), 64)
    assert json.loads(meta["classnames"]) == splits.classnames
    clip = inputs.load_weights(demo_run["weights"], "cpu").clip
    feats, labels = split_features(clip, splits.test, 100, "cpu")
    accuracy = 100 * float(((feats.double() @ weight.T + bias).argmax(1) == labels).double().mean())
    results = json.loads((demo_run["folder"] / "results.json").read_text())
    assert abs(accuracy - results["accuracy"]) <= 100 / len(labels) + 1e-9      # at most one near-tie apart


def test_a_second_call_encodes_nothing_and_keeps_the_result(demo_run):
    results = demo_run["folder"] / "results.json"
    stamp = results.stat().st_mtime_ns
    parts = sorted(p.name for p in demo_run["cache"].rglob("*.safetensors"))
    assert _main(demo_run["argv"]) == demo_run["report"]
    assert results.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in demo_run["cache"].rglob("*.safetensors")) == parts


def test_the_classifier_on_its_own_dataset_gives_the_runs_accuracy(demo_run, tmp_path):
    _main(["--classifier", str(demo_run["folder"]), "--data", demo_run["data"], "--output",
           str(tmp_path / "t"), "--feature-cache", str(demo_run["cache"]), "--device", "cpu"])
    transfer = json.loads((tmp_path / "t" / "results.json").read_text())
    results = json.loads((demo_run["folder"] / "results.json").read_text())
    assert transfer["accuracy"] == results["accuracy"]
    assert transfer["method"] == "linear-probe" and transfer["dataset"] == "Demo"


def test_a_classifier_takes_the_rows_of_the_targets_classes_by_name():
    weight = torch.arange(12.0).reshape(4, 3)
    classifier = linear_probe.Classifier(weight, torch.zeros(4), ["cat", "missile", "dog", "missile"], "", {})
    x = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    # a 2-class target: dog (row 2) and the second missile (row 3, told apart by its ImageNet label)
    metrics = linear_probe.evaluate_classifier(classifier, x, torch.tensor([1, 1]), ["dog", "missile"],
                                               imagenet_labels=[2, 3])
    assert metrics["accuracy"] == 100.0
    with pytest.raises(ValueError, match="no single class named 'horse'"):
        linear_probe.evaluate_classifier(classifier, x, torch.tensor([0, 1]), ["dog", "horse"])


# ----------------------------------------------------------------------------------------------
# bad inputs: one line, exit code 2


def _fails(argv, capsys, match):
    with pytest.raises(SystemExit) as e:
        linear_probe.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and match in err, err


def test_bad_inputs_give_one_line_and_exit_code_2(tmp_path, e2e_setup, capsys):
    _fails(["--features", str(tmp_path / "nowhere")], capsys, "is not a folder")
    (tmp_path / "f").mkdir()
    for split in ("train", "val", "test"):
        np.savez(tmp_path / "f" / split, features=np.zeros((2, 3)))
    _fails(["--features", str(tmp_path / "f")], capsys, "feature_list")
    _fails(["--features", str(tmp_path / "f"), "--shots", "0"], capsys, "--shots '0'")
    _fails(["--features", str(tmp_path / "f"), "--shots", "1,x"], capsys, "--shots '1,x'")
    _fails(["--data", e2e_setup["data"], "--dataset", "nope", "--output", str(tmp_path / "o")], capsys,
           "unknown dataset 'nope'")
    _fails(["--classifier", str(tmp_path), "--data", e2e_setup["data"]], capsys, "needs --output")
    _fails(["--features", str(tmp_path / "f"), "--classifier", str(tmp_path)], capsys, "not allowed with")
