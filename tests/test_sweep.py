"""coop_min.sweep and coop_min.summarize: a few-shot sweep over two small datasets, interrupted with
SIGINT and rerun to completion (finished runs untouched), summarised against means computed here
from the results.json files; the papers' other tables on hand-written results; the commands that
--print-commands gives; bad inputs exit 2 with one line."""
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import ENV
from coop_min import data, summarize, sweep
from coop_min.runs import backbone


def _dataset(root, demo, folder, name, labels):
    """A split-file dataset under root/folder: the demo's images of six classes, relabelled 0..5, a
    fifth of their test images."""
    (root / folder).mkdir(parents=True)
    os.symlink(os.path.join(demo, "images"), root / folder / "images")
    split = json.loads((demo / "split_zhou_Demo.json").read_text())
    rows = {k: [[p, labels.index(y), c] for p, y, c in v if y in labels] for k, v in split.items()}
    rows["test"] = rows["test"][::5]
    (root / folder / f"split_zhou_{name}.json").write_text(json.dumps(rows))


@pytest.fixture(scope="module")
def root(e2e_setup):
    """A data root holding dtd and oxford_pets (the official folder names), made of demo images."""
    root, demo = e2e_setup["root"] / "sweep_data", e2e_setup["root"] / "coop_demo"
    _dataset(root, demo, "dtd", "DescribableTextures", list(range(6)))
    _dataset(root, demo, "oxford_pets", "OxfordPets", list(range(6, 12)))
    return root


def _sweep_args(root, out):
    # the bundled tiny CLIP: trained, so its accuracy depends on the seed's context init (random weights do not)
    return ["--data", str(root), "--protocol", "few-shot", "--datasets", "dtd,oxford_pets", "--shots", "1,2",
            "--seeds", "1,2", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--output", str(out)]


def _results(out):
    return {p: json.loads(p.read_text()) for p in out.rglob("results.json")}


def test_interrupted_sweep_continues_and_summarize_gives_the_means_of_its_runs(root, tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "coop_min.sweep", *_sweep_args(root, out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:                 # the third run has started: wait until it is training, then Ctrl-C
        if line.startswith("[3/8]") and "start" in line:
            folder = line.split(" -> ")[1].strip()
            deadline = time.monotonic() + 60
            while not os.path.exists(os.path.join(folder, "config.json")) and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("interrupted"), stderr
    before = {p: p.stat().st_mtime_ns for p in _results(out)}
    assert 2 <= len(before) < 8

    rerun = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert rerun.stdout.startswith(f"8 runs: {len(before)} finished (skipped), {8 - len(before)} to run")
    results = _results(out)
    assert len(results) == 8
    assert {p: p.stat().st_mtime_ns for p in before} == before          # finished runs were not rewritten
    for path, r in results.items():                                     # the official layout
        rel = path.parent.relative_to(out).parts
        assert rel[0] in ("dtd", "oxford_pets") and rel[1] == f"shots_{r['shots']}" and rel[2] == "coop"
        assert rel[3] == "tiny_clip_nctx16_cscFalse_ctpend_ep1_bs4" and rel[4] == f"seed{r['seed']}"

    r = subprocess.run([sys.executable, "-m", "coop_min.summarize", str(out), "--output", str(tmp_path / "summary")],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    by_cell = {}
    for res in results.values():
        by_cell.setdefault((res["dataset"], str(res["shots"])), []).append(res["accuracy"])
        by_cell.setdefault((res["dataset"], "zero-shot"), []).append(res["zero_shot"]["accuracy"])
    with open(tmp_path / "summary" / "few_shot.csv") as f:
        rows = {(row["dataset"], row["column"]): row for row in csv.DictReader(f)}
    assert set(rows) == set(by_cell)
    for cell, values in by_cell.items():
        assert float(rows[cell]["mean"]) == pytest.approx(statistics.mean(values), abs=1e-4)
        assert float(rows[cell]["std"]) == pytest.approx(statistics.pstdev(values), abs=1e-4)
    table = (tmp_path / "summary" / "summary.md").read_text()
    assert table in r.stdout
    for name in ("DescribableTextures", "OxfordPets"):
        cells = [f"{statistics.mean(v):.2f} ± {statistics.pstdev(v):.2f}" for v in (by_cell[(name, k)] for k in "12")]
        assert f"| {name} | {statistics.mean(by_cell[(name, 'zero-shot')]):.2f} | {cells[0]} | {cells[1]} |" in table
    average = statistics.mean(statistics.mean(by_cell[(d, "2")]) for d in ("DescribableTextures", "OxfordPets"))
    assert table.split("| Average |")[1].splitlines()[0].endswith(f"| {average:.2f} |")      # 2 shots: the last column
    with Image.open(tmp_path / "summary" / "few_shot.png") as img:    # a panel per dataset and the Average
        assert img.width > img.height > 0
    svg = (tmp_path / "summary" / "few_shot.svg").read_text()
    assert all(f">{name}</text>" in svg for name in ("DescribableTextures", "OxfordPets", "Average"))


def test_print_commands_gives_one_command_per_run(root, capsys):
    sweep.main([*_sweep_args(root, "runs"), "--print-commands"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 and all(line.startswith("python -m coop_min.sweep ") for line in lines)
    assert sum("--datasets dtd --shots 2 --seeds 1 " in line for line in lines) == 1
    assert all(line.endswith("--epochs 1 --batch-size 4 --workers 0") for line in lines)
    for name in ("imagenet", "caltech-101"):
        (root / name).mkdir(exist_ok=True)
    sweep.main(["--data", str(root), "--protocol", "cross-dataset", "--datasets", "caltech101,dtd", "--print-commands"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 + 2 * 3                                      # ImageNet x 3 seeds, then 2 targets x 3 seeds
    assert all("--datasets imagenet" in line for line in lines[:3]) and "--method cocoop" in lines[0]


def test_protocols_take_the_papers_defaults(root):
    args, extras = sweep.parse_args(["--data", str(root), "--protocol", "base2new", "--method", "coop",
                                     "--datasets", "dtd"])
    jobs = sweep.plan(args, extras)
    assert len(jobs) == 3 and all("--subsample base --output" in " ".join(j.argv) for j in jobs)
    assert jobs[0].argv[-2:] == ["--ctx-init", "a photo of a"]         # CoOp as the CoCoOp paper ran it
    assert os.path.relpath(jobs[0].folder, args.output) == os.path.join(
        "base2new", "dtd", "shots_16", "coop", "tiny_clip_nctx4_cscFalse_ctpend_ctxv1", "seed1")
    args, extras = sweep.parse_args(["--data", str(root), "--protocol", "few-shot", "--datasets", "dtd"])
    assert [j.argv[j.argv.index("--shots") + 1] for j in sweep.plan(args, extras)][::3] == ["1", "2", "4", "8", "16"]
    assert backbone("ViT-B/16") == "vit_b16" and backbone("/w/RN50.safetensors") == "rn50"


def test_dataset_names_and_folders_are_the_loaders(root):
    for key, (name, folder) in sweep.DATASETS.items():
        if key != "demo":
            assert data._FOLDERS[name] == folder, key
    assert data.load_dataset(str(root / "dtd"), "DescribableTextures").name == "DescribableTextures"


@pytest.mark.parametrize("args, message", [
    (["--datasets", "sun397"], "has no sun397 (folder sun397)"),
    (["--datasets", "dtd", "--seed", "1"], "--seed is not a sweep flag (use --seeds)"),
    (["--datasets", "mnist"], "has no folder mnist; --datasets takes the official names"),
    (["--datasets", "dtd", "--grid", "n-ctx=4,8", "--n-ctx", "2"], "--n-ctx is given twice"),
    (["--datasets", "dtd", "--grid", "nctx=4,8"], "expected a train flag and its values"),
    (["--datasets", "dtd", "--grid", "seed=1,2"], "--seed is not a sweep flag (use --seeds)"),
    (["--datasets", "dtd", "--method", "linear-probe", "--n-ctx", "4"], "--n-ctx is not a linear-probe setting"),
    (["--datasets", "dtd", "--shots", "1,x"], "comma-separated integers"),
    (["--datasets", "imagenetv2"], "test-only"),
    (["--datasets", "dtd", "--devices", "gpu0"], "--devices takes cpu or CUDA indices"),
])
def test_bad_inputs_exit_2_with_one_line(root, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        sweep.main(["--data", str(root), "--protocol", "few-shot", *args, "--print-commands"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def _write(folder, results, config=None, side=None):
    folder.mkdir(parents=True)
    for name, obj in (("results.json", results), ("config.json", config), ("sweep.json", side)):
        if obj is not None:
            (folder / name).write_text(json.dumps(obj))


def _run(dataset, shots, seed, acc, zs, method="coop", **b2n):
    r = {"dataset": dataset, "method": method, "shots": shots, "seed": seed, "accuracy": acc,
         "subsample": "base" if b2n else "all", "zero_shot": {"accuracy": zs}}
    if b2n:
        r.update(base=acc, new=b2n["new"], harmonic_mean=0.0, zero_shot_new={"accuracy": b2n["zs_new"]})
    return r, {"method": method, "n_ctx": 4, "ctx_init": "a photo of a", "csc": False,
               "class_token_position": "end", "weights": None}


def test_summarize_tables_of_partial_base2new_and_transfer_results(tmp_path):
    runs = tmp_path / "runs"
    for d, seed, b, n in (("Caltech101", 1, 90.0, 60.0), ("Caltech101", 2, 92.0, 64.0), ("EuroSAT", 1, 80.0, 40.0)):
        _write(runs / "base2new" / d / f"seed{seed}", *_run(d, 16, seed, b, 50.0, new=n, zs_new=70.0))
    _write(runs / "imagenet" / "seed1", *_run("ImageNet", 16, 1, 70.0, 66.0))
    _write(runs / "imagenet" / "seed2", *_run("ImageNet", 16, 2, 72.0, 66.0))
    for seed, acc in ((1, 60.0), (2, 62.0)):
        _write(runs / "evaluation" / "ImageNetV2" / f"seed{seed}", {"dataset": "ImageNetV2", "accuracy": acc},
               side={"prompt": os.path.join("..", "..", "..", "imagenet", f"seed{seed}")})
    _write(runs / "evaluation" / "zero_shot" / "ImageNetV2", {"dataset": "ImageNetV2", "accuracy": 55.0},
           side={"prompt": None, "weights": None})
    _write(runs / "stray", {"dataset": "DescribableTextures", "accuracy": 1.0})      # no sweep.json: left out
    text, _ = summarize.summarize(str(runs), str(tmp_path / "out"))
    # per dataset: H of the mean base (91) and mean new (62), 2 * 91 * 62 / 153 = 73.7516; EuroSAT has one seed of two
    assert "| Caltech101 | CoOp | 91.00 ± 1.00 | 62.00 ± 2.00 | 73.75 |" in text
    assert "| EuroSAT | CoOp | 80.00 (1/2) | 40.00 (1/2) |" in text        # one seed: its value, no std
    # the average row: mean base (85.5) and mean new (51) over datasets, then H of those: 8721 / 136.5 = 63.8901
    assert "| Average | CoOp | 85.50 | 51.00 | 63.89 |" in text
    assert "| Average | zero-shot CLIP | 50.00 | 70.00 | 58.33 |" in text                # 7000 / 120
    assert "| zero-shot CLIP | 66.00 | 55.00 | 55.00 |" in text                   # source from the runs
    assert "| CoOp | 71.00 ± 1.00 | 61.00 ± 1.00 | 61.00 |" in text
    assert "| 16 shots |" in text and "| ImageNet | 66.00 | 71.00 ± 1.00 |" in text
    assert "(1 results.json left out" in text
    assert "\"(n/m)\": n seeds of the m" in text
    with Image.open(tmp_path / "out" / "base2new.png") as img:
        assert img.width > 0
    assert (tmp_path / "out" / "base2new.svg").read_text().startswith("<svg")
    with open(tmp_path / "out" / "base2new.csv") as f:
        eurosat = [row for row in csv.DictReader(f) if row["dataset"] == "EuroSAT" and row["method"] == "CoOp"]
    assert [(row["column"], row["seed_1"], row["seed_2"]) for row in eurosat] == [("base", "80.0000", "-"),
                                                                                   ("new", "40.0000", "-")]


def test_summarize_a_folder_without_results_and_a_missing_folder(tmp_path, capsys):
    summarize.main([str(tmp_path)])
    assert "No results yet" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        summarize.main([str(tmp_path / "nope")])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_sweep_started_ignoring_sigint_still_stops_on_sigint(root, tmp_path):
    """A shell starts a background job (`cmd &` in a script) with SIGINT ignored, and Python then leaves
    it ignored; the sweep catches it all the same, so kill -INT stops it and its run as Ctrl-C does."""
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "coop_min.sweep", "--data", str(root), "--protocol", "few-shot", "--datasets", "dtd",
           "--shots", "1", "--seeds", "1", "--epochs", "50", "--batch-size", "4", "--workers", "0", "--output", str(out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    for line in proc.stdout:                 # the run has started: wait until it is training, then kill -INT
        if line.startswith("[1/1]") and "start" in line:
            config = os.path.join(line.split(" -> ")[1].strip(), "config.json")
            deadline = time.monotonic() + 60
            while not os.path.exists(config) and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, stdout, stderr)
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("interrupted"), stderr
    assert not _results(out)                 # its run was stopped too, before it finished


def test_a_grid_gives_each_combination_its_own_run_folders(root):
    args, extras = sweep.parse_args(["--data", str(root), "--protocol", "few-shot", "--datasets", "dtd", "--shots",
                                     "1", "--seeds", "1", "--grid", "class-token-position=end,middle",
                                     "--grid", "csc=off,on", "--epochs", "1"])
    jobs = sweep.plan(args, extras)
    settings = [os.path.basename(os.path.dirname(j.folder)) for j in jobs]
    assert settings == ["tiny_clip_nctx16_cscFalse_ctpend_ep1", "tiny_clip_nctx16_cscTrue_ctpend_ep1",
                        "tiny_clip_nctx16_cscFalse_ctpmiddle_ep1", "tiny_clip_nctx16_cscTrue_ctpmiddle_ep1"]
    assert ["--csc" in j.argv for j in jobs] == [False, True, False, True]
    assert [j.argv[j.argv.index("--class-token-position") + 1] for j in jobs] == ["end", "end", "middle", "middle"]
    assert all(j.argv[j.argv.index("--epochs") + 1] == "1" for j in jobs)
    # a run in the way must hold its combination
    assert [j.expect["class_token_position"] for j in jobs] == ["end", "end", "middle", "middle"]


def test_a_folder_of_ones_own_is_a_dataset_named_after_it(root, tmp_path):
    mine = tmp_path / "data" / "garden_flowers"
    for c in ("rose", "tulip"):
        (mine / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(mine / c / f"{i}.png")
    assert data.load_dataset(str(mine)).name == "garden_flowers"
    assert data.load_dataset(str(mine), "imagefolder").name == "garden_flowers"
    args, extras = sweep.parse_args(["--data", str(tmp_path / "data"), "--protocol", "few-shot", "--datasets",
                                     "garden_flowers", "--shots", "1", "--seeds", "1"])
    [job] = sweep.plan(args, extras)
    assert os.path.relpath(job.folder, args.output).split(os.sep)[:2] == ["garden_flowers", "shots_1"]
    assert job.argv[job.argv.index("--data") + 1] == str(mine)
    assert job.argv[job.argv.index("--dataset") + 1] == "auto"


def test_summarize_never_pools_runs_of_other_settings_and_says_how_rows_differ(tmp_path):
    """Runs of one dataset and shot count with the paper's epochs and with --epochs 2 (CoOp at 1 shot: 50
    epochs), and on two data folders: three rows, never one cell."""
    out = tmp_path / "runs"
    rows = (("a", 50, "/d1/dtd", 1, 40.0), ("b", 50, "/d1/dtd", 2, 42.0), ("c", 2, "/d1/dtd", 1, 10.0),
            ("d", 50, "/d2/dtd", 1, 70.0))
    for name, epochs, folder, seed, acc in rows:
        r, config = _run("DescribableTextures", 1, seed, acc, 30.0)
        config.update(epochs=epochs, batch_size=32, lr=0.002, data=folder, n_ctx=16, ctx_init="")
        r.update(train_seconds=10.0 * seed, images_per_second=5.0 * seed, peak_memory_bytes=None)
        _write(out / name, r, config)
    text, tables = summarize.summarize(str(out), str(tmp_path / "summary"))
    assert len(tables["few_shot"]) == 3
    assert "Rows differ in: data, training." in text
    assert "### CoOp (data d1, training as the paper)\n\n| dataset | zero-shot CLIP | 1 shot |" in text
    assert "| DescribableTextures | 30.00 | 41.00 ± 1.00 |" in text           # seeds 1 and 2 of a and b
    assert "### CoOp (data d1, training epochs 2)\n" in text and "| DescribableTextures | 30.00 | 10.00 |" in text
    assert "### CoOp (data d2, training as the paper)\n" in text and "| DescribableTextures | 30.00 | 70.00 |" in text
    # compute: a and b, 10 s and 20 s per run, 5 and 10 images/s: means 15 s and 7.5
    assert "| CoOp (data d1, training as the paper) | 2 | 15.0 s | 7.5 | - |" in text


def test_a_linear_probe_sweep_on_the_demo_and_its_summary(tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "coop_min.sweep", "--protocol", "few-shot", "--method", "linear-probe",
           "--shots", "1,2", "--seeds", "1", "--output", str(out), "--feature-cache", str(tmp_path / "cache")]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--feature-cache is not a linear-probe setting" in r.stderr   # not a train flag
    r = subprocess.run(cmd[:-2], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    results = _results(out)
    assert sorted(os.path.relpath(p.parent, out) for p in results) == [
        os.path.join("demo", f"shots_{k}", "linear-probe", "tiny_clip", "seed1") for k in (1, 2)]
    for r in results.values():
        assert r["method"] == "linear-probe" and r["C"] in [step["C"] for step in r["search"]]
    text, tables = summarize.summarize(str(out), str(tmp_path / "summary"))
    by_shots = {r["shots"]: r["accuracy"] for r in results.values()}
    assert f"| Demo | - | {by_shots[1]:.2f} | {by_shots[2]:.2f} |" in text       # no zero-shot of its own
    assert "### linear-probe CLIP" in text
    assert 'stroke-dasharray' in (tmp_path / "summary" / "few_shot.svg").read_text()


def test_a_linear_probe_dg_sweep_tests_the_imagenet_classifier_on_the_targets(tmp_path, capsys):
    for folder in ("imagenet", "imagenetv2", "imagenet-adversarial"):
        (tmp_path / folder).mkdir()
    args, extras = sweep.parse_args(["--data", str(tmp_path), "--protocol", "dg", "--method", "linear-probe",
                                     "--datasets", "imagenetv2,imagenet_a", "--seeds", "1", "--weights", "RN50"])
    source, *targets = sweep.plan(args, extras)
    assert source.argv[2:4] == ["coop_min.linear_probe", "--data"] and source.argv[-2:] == ["--weights", "RN50"]
    assert os.path.relpath(source.folder, args.output) == os.path.join("imagenet", "shots_16", "linear-probe",
                                                                       "rn50", "seed1")
    assert [t.needs for t in targets] == [source.folder] * 2
    for t, name in zip(targets, ("ImageNetV2", "ImageNetA")):
        assert t.argv[t.argv.index("--classifier") + 1] == source.folder
        assert t.argv[t.argv.index("--dataset") + 1] == name
        assert os.path.normpath(os.path.join(t.folder, t.sidecar["prompt"])) == source.folder


def test_rows_that_differ_in_backbone_show_a_model_name_whole_and_a_file_by_its_name():
    from coop_min import summarize

    def row(weights):
        values = {**dict.fromkeys(summarize.SETTING), "method": "coop", "weights": weights}
        return tuple(values[k] for k in summarize.SETTING)
    got = summarize.labels([row("ViT-B/16"), row("/w/rn50.safetensors"), row("hf-hub:org/clip")])
    assert sorted(got.values()) == ["CoOp (weights ViT-B/16)", "CoOp (weights hf-hub:org/clip)",
                                    "CoOp (weights rn50.safetensors)"]
