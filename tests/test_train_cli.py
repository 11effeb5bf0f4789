"""End to end: `python -m coop_min.train` and `python -m coop_min.evaluate` as subprocesses on the demo
benchmark with a small random-init CLIP; a run SIGKILLed mid-epoch and resumed ends bit-identical to an
uninterrupted one; bad inputs exit 2 with one clear line."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ENV, cli, metrics_lines


@pytest.fixture(scope="module")
def setup(e2e_setup):
    return e2e_setup


_cmd = cli


def _train(setup, out, *args):
    args = ["--shots", "2", "--epochs", "3", "--batch-size", "8", "--print-every", "1", "--output", str(out),
            *args]
    return subprocess.run(_cmd("coop_min.train", setup, *args), env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_training_writes_every_run_output_and_evaluate_agrees(setup):
    out = setup["root"] / "run"
    r = _train(setup, out, "--subsample", "base")
    assert r.returncode == 0, r.stderr
    for name in ("config.json", "log.txt", "metrics.jsonl", "checkpoint.safetensors", "state.pt",
                 "prompt.safetensors", "classifier.safetensors", "results.json", "split.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert {"accuracy", "macro_f1", "per_class_accuracy", "base", "new", "harmonic_mean"} <= set(results)
    b, n = results["base"], results["new"]
    assert results["harmonic_mean"] == pytest.approx(2 * b * n / (b + n))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in lines if m.get("batch") == 1][:2] == [1e-5, 0.002]   # warm-up, then the peak
    config = json.loads((out / "config.json").read_text())
    assert (config["n_ctx"], config["ctx_init"], config["lr"], config["momentum"]) == (16, "", 0.002, 0.9)
    assert not (out / ".lock").exists()                  # a finished run keeps no lock
    assert "finished training in " in (out / "log.txt").read_text()
    assert config["cuda_graph"] is False                 # on by default for one CUDA process only
    # evaluate the saved prompt on both halves: the same numbers as the training run reported
    r = subprocess.run(_cmd("coop_min.evaluate", setup, "--prompt", str(out), "--subsample", "base2new"),
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"harmonic mean {results['harmonic_mean']:.2f}" in r.stdout
    # a second run into the same folder must not overwrite it
    r = _train(setup, out)
    assert r.returncode == 2 and "already holds a run" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _train(setup, out, "--weights", str(setup["root"] / "missing.safetensors"))   # the more useful error
    assert r.returncode == 2 and "CLIP weights not found" in r.stderr, r.stderr


def test_results_say_what_training_and_evaluation_cost(setup, tmp_path):
    """A run's results.json: train_seconds, images_per_second (the images of every step over
    train_seconds, counted here from the epochs, the full batches and the batch size) and
    peak_memory_bytes (None on the CPU); evaluate's results.json: its seconds."""
    out = tmp_path / "run"
    t0 = time.monotonic()
    assert _train(setup, out, "--epochs", "2").returncode == 0
    wall = time.monotonic() - t0
    results = json.loads((out / "results.json").read_text())
    n_train = len(json.loads((out / "split.json").read_text())["train"])    # 36 classes x 2 shots
    images = 2 * (n_train // 8) * 8                                          # Dassl drops a partial batch
    assert 0 < results["train_seconds"] < wall
    assert results["images_per_second"] == pytest.approx(images / results["train_seconds"], rel=1e-9)
    assert results["peak_memory_bytes"] is None                             # a CPU run
    r = subprocess.run(_cmd("coop_min.evaluate", setup, "--zero-shot", "--output", str(tmp_path / "eval")),
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["seconds"] > 0


def test_evaluate_at_the_runs_precision_reproduces_its_accuracy(setup, tmp_path):
    """A bf16 run (the CUDA default; here forced on CPU): evaluate --precision bf16 gives the accuracy
    of its results.json, whose bf16 logits the fp32 default need not reproduce exactly."""
    out = tmp_path / "run"
    assert _train(setup, out, "--epochs", "1", "--precision", "bf16").returncode == 0
    accuracy = json.loads((out / "results.json").read_text())["accuracy"]
    r = subprocess.run(_cmd("coop_min.evaluate", setup, "--prompt", str(out), "--precision", "bf16",
                            "--output", str(tmp_path / "eval")), env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["accuracy"] == accuracy


def test_killed_run_resumes_bit_identical(setup):
    full, killed = setup["root"] / "full", setup["root"] / "killed"
    args = ("--epochs", "4", "--save-every", "1")
    assert _train(setup, full, *args).returncode == 0
    cmd = _cmd("coop_min.train", setup, "--shots", "2", "--epochs", "4", "--batch-size", "8", "--print-every",
               "1", "--output", str(killed), *args)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:     # kill in the middle of epoch 2
        # 10 lines per epoch: 9 steps and the epoch
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "results.json").exists()
    r = _train(setup, killed, *args, "--resume")
    assert r.returncode == 0, r.stderr
    a, b = load_file(str(full / "checkpoint.safetensors")), load_file(str(killed / "checkpoint.safetensors"))
    assert torch.equal(a["ctx"], b["ctx"])
    assert metrics_lines(full / "metrics.jsonl") == metrics_lines(killed / "metrics.jsonl")
    sa, sb = (torch.load(d / "state.pt", weights_only=True) for d in (full, killed))
    assert torch.equal(sa["torch_rng"], sb["torch_rng"])     # the RNG too, not only what it produced
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (full, killed))
    assert ra["accuracy"] == rb["accuracy"] and ra["per_class_accuracy"] == rb["per_class_accuracy"]


@pytest.mark.parametrize("args,message", [
    (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--weights", "/nonexistent/clip.safetensors"], "weights not found"),
    (["--shots", "100"], "fewer than --shots 100"),
    (["--method", "cocoop", "--csc"], "CoCoOp"),
    (["--cuda-graph", "--device", "cpu"], "--cuda-graph"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--print-every", "0"], "--print-every must be >= 1"),
    (["--shots", "0"], "--shots must be >= 1"),
    (["--class-token-position", "bogus"], "invalid choice"),
    (["--device", "nonsense"], "not a device"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--n-ctx", "2", "--ctx-init", "a photo of a"], "disagrees with --ctx-init"),
    (["--method", "cocoop", "--n-ctx", "2"], "--ctx-init \"\" for 2 random"),
    (["--n-ctx", "100"], "lower --n-ctx"),
])
def test_bad_inputs_exit_2_with_one_line(setup, tmp_path, args, message):
    cmd = _cmd("coop_min.train", setup, "--output", str(tmp_path / "run"), "--epochs", "1") + args
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_evaluate_interprets_context_and_classifies_one_image(setup, tmp_path):
    out = tmp_path / "run"
    assert _train(setup, out, "--epochs", "1").returncode == 0
    r = subprocess.run(_cmd("coop_min.evaluate", setup, "--prompt", str(out), "--interpret", "3"),
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    # M=16 rows: the context vector's number, then 3 tokens with their distances
    assert [row[0] for row in rows] == [str(m) for m in range(1, 17)] and all(len(row) == 7 for row in rows)
    assert all(float(d) > 0 for row in rows for d in row[2::2])
    split = json.loads((out / "split.json").read_text())
    image = os.path.join(split["root"], split["test"][0][0])
    r = subprocess.run(_cmd("coop_min.evaluate", setup, "--prompt", str(out), "--image", image),
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.strip().splitlines()          # the image and the model, then the top 5
    assert header.startswith(f"{image}, top 5 by coop prompts from {out}"), header
    probs = [float(line.split("%")[0]) for line in rows]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.01
    from coop_min.clip import load_clip                  # the same top 5 from the saved prompt, in-process
    from coop_min.prompts import load_prompt
    from coop_min.transforms import image_transform, load_image
    clip = load_clip(setup["weights"])
    model = load_prompt(str(out / "prompt.safetensors"), clip)
    with torch.no_grad():
        x = image_transform(clip.visual.input_resolution)(load_image(image, rgb=True))[None]
        top = model.logits(x).softmax(-1)[0].topk(5)
    printed = [line.split("%", 1)[1].strip() for line in rows]
    assert printed == [model.learner.classnames[i] for i in top.indices.tolist()]
    assert probs == pytest.approx([100 * p for p in top.values.tolist()], abs=0.01)
    r = subprocess.run(_cmd("coop_min.evaluate", setup, "--image", image), env=ENV, capture_output=True,
                       text=True, timeout=120)           # zero-shot, with the dataset's template
    header, *rows = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(rows) == 5, r.stderr
    assert "zero-shot CLIP (no --prompt given)" in header, header
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    r = subprocess.run(_cmd("coop_min.evaluate", setup, "--prompt", str(out), "--image", str(bad)),
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "bad.jpg" in r.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_cuda_graph_run_logs_the_losses_of_an_eager_run(setup, tmp_path, method):
    """The real CLI on a GPU, bf16, with pinned loader workers (their thread runs during capture): a
    --cuda-graph run (captured once: cuda_graph.SGD reads each epoch's lr from the device) logs the
    steps of an eager run."""
    losses = {}
    for mode in ("eager", "graph"):
        out = tmp_path / mode
        r = _train(setup, out, "--method", method, "--device", "cuda", "--workers", "2",
                   *(["--cuda-graph"] if mode == "graph" else []))
        assert r.returncode == 0, r.stderr
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [m["loss"] for m in lines if "batch" in m]
    assert len(losses["eager"]) >= 6 and losses["graph"] == pytest.approx(losses["eager"], rel=1e-4)


def test_a_new_run_never_reuses_or_clobbers_files_in_its_folder(setup, tmp_path):
    """A folder with a failed run's split.json (other shots) or someone's files is refused, untouched."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "split.json").write_text("{}")
    (out / "log.txt").write_text("someone's log")
    r = _train(setup, out)
    assert r.returncode == 2 and "not empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "split.json"]
    assert (out / "log.txt").read_text() == "someone's log"
    (tmp_path / "afile").write_text("x")
    r = _train(setup, tmp_path / "afile")
    assert r.returncode == 2 and "is a file" in r.stderr


def test_parameters_gone_nan_never_overwrite_the_last_good_checkpoint(setup, tmp_path):
    """lr 3e38 from epoch 2 on sends the context to inf/nan; with a checkpoint due after every step,
    the one on disk must still be the last finite one, and the run stops with one line."""
    out = tmp_path / "run"
    r = _train(setup, out, "--lr", "3e38", "--save-every", "1")
    assert r.returncode == 2 and "nan" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "last good checkpoint is kept" in r.stderr
    ctx = load_file(str(out / "checkpoint.safetensors"))["ctx"]
    assert torch.isfinite(ctx).all()
    state = torch.load(out / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["params"].values())


def test_evaluate_never_overwrites_results_and_names_a_bad_prompt_file(setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"accuracy": 1.0}')
    r = subprocess.run(_cmd("coop_min.evaluate", setup, "--zero-shot", "--output", str(out)),
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "already holds a results.json" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert (out / "results.json").read_text() == '{"accuracy": 1.0}'
    bad = tmp_path / "prompt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    r = subprocess.run(_cmd("coop_min.evaluate", setup, "--prompt", str(bad)), env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "cannot read prompt file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_wrong_files_and_flag_combinations_get_one_line(setup, tmp_path):
    from safetensors.torch import save_file

    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"a": torch.zeros(3)}, str(unrelated))
    cases = [("coop_min.train", ["--data", setup["weights"]], "is a file, not a folder"),
             ("coop_min.evaluate", ["--weights", str(unrelated)], "holds no CLIP that loads"),
             ("coop_min.evaluate", ["--prompt", str(unrelated), "--templates", "ensemble"],
              "--templates is for zero-shot")]
    for module, args, message in cases:
        r = subprocess.run(_cmd(module, setup, "--output", str(tmp_path / "out"), *args), env=ENV,
                           capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (args, r.stderr)


def test_a_context_phrase_sets_and_records_m(setup, tmp_path):
    out = tmp_path / "run"
    assert _train(setup, out, "--epochs", "1", "--ctx-init", "a photo of a").returncode == 0
    assert json.loads((out / "config.json").read_text())["n_ctx"] == 4          # not the CoOp default 16
    assert load_file(str(out / "prompt.safetensors"))["ctx"].shape[0] == 4


def test_the_captured_step_is_the_cuda_default_and_can_be_turned_off():
    from coop_min.train import parse_args
    assert parse_args(["--data", "x"]).cuda_graph is None          # resolved by run(): CUDA, one process
    assert parse_args(["--data", "x", "--cuda-graph"]).cuda_graph is True
    assert parse_args(["--data", "x", "--no-cuda-graph"]).cuda_graph is False


def test_a_resumed_run_decides_the_capture_again(tmp_path):
    """A run captured on a GPU continues on the CPU: whether to capture is the machine's choice."""
    import dataclasses
    from coop_min.train import TrainConfig, parse_args
    saved = {**dataclasses.asdict(TrainConfig(data="x")), "cuda_graph": True}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert parse_args(["--resume", "--output", str(tmp_path)]).cuda_graph is None
    assert parse_args(["--resume", "--output", str(tmp_path), "--no-cuda-graph"]).cuda_graph is False


def test_the_default_run_folder_is_the_sweeps_layout_and_tells_runs_apart():
    from coop_min.train import TrainConfig, resolve
    folder = lambda **kw: resolve(TrainConfig(device="cpu", **kw), "DescribableTextures").output  # noqa: E731
    # the folder test_sweep.py expects of `sweep --protocol base2new --method coop` on dtd, seed 1
    assert folder(ctx_init="a photo of a", subsample="base") == os.path.join(
        "runs", "base2new", "dtd", "shots_16", "coop", "tiny_clip_nctx4_cscFalse_ctpend_ctxv1", "seed1")
    assert folder(weights="ViT-B/16", epochs=5, shots=1) == os.path.join(
        "runs", "dtd", "shots_1", "coop", "vit_b16_nctx16_cscFalse_ctpend_ep5", "seed1")
    assert folder(epochs=200, batch_size=32) == folder()          # the paper's values name no tag
    assert len({folder(), folder(weights="RN50"), folder(epochs=10), folder(lr=0.01),
                folder(precision="bf16"), folder(batch_size=8), folder(seed=2), folder(method="cocoop")}) == 8


def test_templates_ensemble_gives_the_zero_shot_row_evaluate_gives(setup, tmp_path):
    out = tmp_path / "run"
    r = _train(setup, out, "--epochs", "1", "--templates", "ensemble")
    assert r.returncode == 0, r.stderr
    assert "zero-shot CLIP (ensemble) (all)" in (out / "log.txt").read_text()
    zero_shot = json.loads((out / "results.json").read_text())["zero_shot"]["accuracy"]
    r = subprocess.run(_cmd("coop_min.evaluate", setup, "--zero-shot", "--templates", "ensemble"),
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"{zero_shot:.2f}" in r.stdout, r.stdout + r.stderr
