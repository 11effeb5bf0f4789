"""Hostile inputs and faults: every bad input exits 2 with one line, nothing already written is lost
or silently changed, and no result is silently wrong (the drill behind these: README, train/evaluate)."""
import copy
import json
import math
import os
import shutil
import subprocess
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import ENV, cli
from coop_min import checkpoint, runs
from coop_min.clip import CLIP, CLIPConfig, build_clip
from coop_min.files import atomic_write
from coop_min.prompts import PromptConfig, build_prompted_clip, load_prompt, nearest_words, save_prompt


@pytest.fixture(scope="module")
def setup(e2e_setup):
    return e2e_setup


def _train(setup, out, *args, weights=None):
    cmd = cli("coop_min.train", setup, "--shots", "2", "--epochs", "1", "--batch-size", "8", "--print-every",
              "1", "--output", str(out), *args)
    if weights is not None:
        cmd[cmd.index("--weights") + 1] = str(weights)
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


def _one_line(r, code=2):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and len(lines) == 1, (r.returncode, r.stderr)
    return lines[0]


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def _tiny_clip(seed):
    torch.manual_seed(seed)
    return build_clip(CLIP(CLIPConfig(64, 32, 1, 64, 8, 2, 77, 49408, 64, 2, 1)).state_dict())


def _write_clip(path, seed):
    torch.manual_seed(seed)
    config = CLIPConfig(64, 32, 1, 64, 8, 2, 77, 49408, 64, 2, 1)
    save_file({k: v.contiguous() for k, v in CLIP(config).state_dict().items()}, str(path),
              metadata={"config": json.dumps(asdict(config))})


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    """A finished 1-epoch run (9 steps) with its own copy of the weights."""
    root = tmp_path_factory.mktemp("finished")
    weights = root / "clip.safetensors"
    shutil.copy(setup["weights"], weights)
    r = _train(setup, root / "run", weights=weights)
    assert r.returncode == 0, r.stderr
    return root / "run", weights


# ----------------------------------------------------------------------------------------------
# results that were wrong or lost


def test_csc_prompt_refuses_other_class_names(tmp_path):
    clip = _tiny_clip(0)
    model = build_prompted_clip(clip, ["cat", "sea_lion", "dog"], PromptConfig(n_ctx=2, csc=True), seed=1)
    save_prompt(tmp_path / "p.safetensors", model, "")
    same = load_prompt(tmp_path / "p.safetensors", clip, ["cat", "sea lion", "dog"])   # "_" reads as a space
    assert torch.equal(same.learner.ctx, model.learner.ctx)
    with pytest.raises(ValueError, match="class-specific contexts") as e:
        load_prompt(tmp_path / "p.safetensors", clip, ["car", "boat", "tree"])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="class-specific contexts"):                # same names, other order
        load_prompt(tmp_path / "p.safetensors", clip, ["dog", "cat", "sea lion"])


def test_resuming_a_finished_run_prints_its_results_and_changes_nothing(setup, finished, tmp_path):
    run, weights = tmp_path / "run", tmp_path / "clip.safetensors"
    shutil.copytree(finished[0], run)
    shutil.copy(finished[1], weights)
    before = _snapshot(run)
    _write_clip(weights, seed=99)                                # the weights file was replaced since
    r = _train(setup, run, "--resume", weights=weights)
    assert r.returncode == 0 and "is a finished run" in r.stdout, r.stderr
    assert "nothing was changed" in r.stdout, r.stderr
    assert _snapshot(run) == before


def test_resume_with_other_clip_weights_is_refused(setup, tmp_path):
    weights = tmp_path / "clip.safetensors"
    shutil.copy(setup["weights"], weights)
    run = tmp_path / "run"
    assert _train(setup, run, weights=weights).returncode == 0
    (run / "results.json").unlink()                            # as if killed during the final evaluation
    _write_clip(weights, seed=99)
    before = _snapshot(run)
    line = _one_line(_train(setup, run, "--resume", weights=weights))
    assert "CLIP weights sha256" in line and "--weights" in line
    assert _snapshot(run) == before


def test_a_second_process_on_the_same_folder_is_refused(setup, finished):
    run, _ = finished
    held = runs.lock(run)                                      # another process's lock, as flock sees it
    try:
        (run / "results.json").rename(run / "results.moved")   # an unfinished run
        line = _one_line(_train(setup, run, "--resume"))
        assert f"in use by process {os.getpid()}" in line
    finally:
        held.close()
        (run / "results.moved").rename(run / "results.json")


def _learner(clip):
    return build_prompted_clip(clip, ["cat", "dog"], PromptConfig(n_ctx=2), seed=1).learner


def _stepped_optimizer(learner):
    """SGD with momentum after one step, so that its state holds a momentum buffer (the learner's ctx
    moves)."""
    opt = torch.optim.SGD(learner.parameters(), lr=0.1, momentum=0.9)
    learner.ctx.grad = torch.ones_like(learner.ctx)
    opt.step()
    learner.ctx.grad = None
    return opt


def _good_state(learner, opt):
    return {"params": {k: v.clone() for k, v in learner.state_dict().items()},
            "optimizer": copy.deepcopy(opt.state_dict()),              # not the live momentum buffers
            "epoch": 1, "batch": 0, "metrics_bytes": 0, "torch_rng": torch.get_rng_state(),
            "clip_sha256": "ab", "progress": [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]}


def _set_group(key, value):
    return lambda s: s["optimizer"]["param_groups"][0].__setitem__(key, value)


def _same_optimizer_state(a, b):
    return a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys() and all(
        torch.equal(a["state"][k]["momentum_buffer"], b["state"][k]["momentum_buffer"]) for k in a["state"])


@pytest.mark.parametrize("hostile,message", [
    (lambda s: s.pop("torch_rng"), "not a state.pt this trainer wrote"),
    (lambda s: s["params"].__setitem__("ctx", torch.zeros(3, 64)), "parameter ctx"),
    (lambda s: s["params"].__setitem__("ctx", torch.full((2, 64), float("nan"))), "parameter ctx"),
    (lambda s: s.__setitem__("epoch", "1"), "epoch is '1'"),
    (lambda s: s.__setitem__("epoch", 10 ** 6), "epoch is 1000000"),
    (lambda s: s.__setitem__("metrics_bytes", 10 ** 8), "metrics_bytes"),
    (lambda s: s.__setitem__("metrics_bytes", -1), "metrics_bytes"),
    (lambda s: s.__setitem__("torch_rng", torch.zeros(3, dtype=torch.uint8)), "torch_rng"),
    (lambda s: s.__setitem__("optimizer", [1, 2]), "optimizer state"),
    (lambda s: s["optimizer"]["state"][0].__setitem__("momentum_buffer", torch.full((2, 64), float("nan"))),
     "momentum buffer"),
    (lambda s: s["optimizer"]["state"][0].__setitem__("momentum_buffer", torch.zeros(3, 64)),
     "momentum buffer"),
    (_set_group("lr", "0.1"), "optimizer settings"),
    (_set_group("momentum", float("nan")), "optimizer settings"),
    (lambda s: s["optimizer"]["param_groups"][0].pop("weight_decay"), "optimizer settings"),
    (lambda s: s.__setitem__("clip_sha256", "cd"), "CLIP weights sha256"),
    (lambda s: s.__setitem__("progress", [[float("nan")] * 3] * 2), "progress"),
])
def test_a_hostile_state_is_refused_before_anything_is_restored(tmp_path, hostile, message):
    learner = _learner(_tiny_clip(0))
    opt = _stepped_optimizer(learner)
    state = _good_state(learner, opt)
    hostile(state)
    (tmp_path / "metrics.jsonl").write_text("")
    ctx, rng, before = learner.ctx.detach().clone(), torch.get_rng_state(), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message) as e:        # a UsageError: one line at the CLI's edge
        checkpoint.check_state(state, str(tmp_path), learner, opt, 50, "ab")
    assert "\n" not in str(e.value)
    assert torch.equal(learner.ctx, ctx) and torch.equal(torch.get_rng_state(), rng)
    assert _same_optimizer_state(opt.state_dict(), before), "the optimizer was restored from a refused state"
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_a_good_state_restores_the_learner_the_optimizer_and_the_rng(tmp_path):
    saved_learner = _learner(_tiny_clip(0))
    state = _good_state(saved_learner, _stepped_optimizer(saved_learner))     # ctx and buffer after one step
    state["optimizer"]["param_groups"][0]["lr"] = 0.25
    state["torch_rng"] = rng = torch.Generator().manual_seed(5).get_state()
    (tmp_path / "metrics.jsonl").write_text("")
    learner = _learner(_tiny_clip(0))
    fresh = learner.ctx.detach().clone()
    opt = torch.optim.SGD(learner.parameters(), lr=0.1, momentum=0.9)                 # fresh: no buffer
    checkpoint.check_state(state, str(tmp_path), learner, opt, 50, "ab")
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(learner.ctx, state["params"]["ctx"]) and not torch.equal(learner.ctx, fresh)
    assert opt.param_groups[0]["lr"] == 0.25
    torch.testing.assert_close(opt.state[learner.ctx]["momentum_buffer"], torch.ones(2, 64), rtol=0, atol=0)


def test_a_list_instead_of_a_state_dict_is_refused(setup, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    (run / "results.json").unlink()
    torch.save([1, 2, 3], run / "state.pt")
    before = _snapshot(run)
    assert "not a state.pt this trainer wrote" in _one_line(_train(setup, run, "--resume"))
    assert _snapshot(run) == before


# ----------------------------------------------------------------------------------------------
# failures to fail cleanly


@pytest.mark.parametrize("classnames,message", [("123", "list of strings"),
                                                ("[1, 2, null]", "list of strings"),
                                                ("{not json", "not JSON")])
def test_prompt_file_with_bad_classnames_names_the_file(tmp_path, classnames, message):
    path = tmp_path / "prompt.safetensors"
    save_file({"ctx": torch.zeros(2, 64)}, str(path), metadata={
        "method": "coop", "n_ctx": "2", "class_token_position": "end", "csc": "false",
        "classnames": classnames})
    with pytest.raises(ValueError, match=message) as e:
        load_prompt(path, _tiny_clip(0))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_size_mismatch_is_one_line(tmp_path):
    clip = _tiny_clip(0)
    model = build_prompted_clip(clip, ["cat", "dog"], PromptConfig(method="cocoop"), seed=1)
    save_prompt(tmp_path / "p.safetensors", model, "")
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "p.safetensors"))
    tensors["meta_net.linear1.weight"] = torch.zeros(3, 3)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="does not fit") as e:
        load_prompt(tmp_path / "bad.safetensors", clip)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("module,args", [("coop_min.train", ["--shots", "2", "--epochs", "1"]),
                                         ("coop_min.evaluate", ["--zero-shot"])])
def test_an_unwritable_output_is_refused_before_any_work(setup, tmp_path, module, args):
    """An --output below a file cannot be made by anyone, root included (for whom a chmod'ed folder is
    still writable). The command names it before it loads anything: the line is the writability
    check's, not the OSError of a late makedirs, and nothing was printed or written."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "run"
    r = subprocess.run(cli(module, setup, *args, "--output", str(out)), env=ENV, capture_output=True,
                       text=True, timeout=300)
    line = _one_line(r)
    assert "cannot be written" in line and f"{blocker} is not a writable folder" in line, line
    assert r.stdout == ""                                   # no progress, no accuracy: nothing ran
    assert list(tmp_path.iterdir()) == [blocker] and blocker.read_text() == ""


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.pt"
    target.write_text("old")

    def full_disk(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        atomic_write(str(target), full_disk)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


# python -c _DISK_FILLS MODE ARGS...: the trainer on a disk that fills up after its first checkpoint: a
# real tmpfs filled up to half a state.pt, or torch.save and the free space as a full disk answers them
_DISK_FILLS = """
import os, shutil, sys, torch
from coop_min import runs, train

save, mode, saved = runs.Run.save, sys.argv[1], []


def full_disk_save(obj, path):
    with open(path, "wb") as f:
        f.write(bytes(1238))
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1344 vs 1238")


def save_then_fill(run, *args):
    save(run, *args)
    folder = run.folder
    saved.append(folder)
    if len(saved) == 1 and mode == "tmpfs":
        keep = os.path.getsize(os.path.join(folder, "state.pt")) // 2
        with open(os.path.join(os.path.dirname(folder), "filler"), "wb") as f:
            f.write(bytes(shutil.disk_usage(folder).free - keep))
    elif len(saved) == 1:
        usage = shutil.disk_usage(folder)
        shutil.disk_usage = lambda path: usage._replace(free=0)
        torch.save = full_disk_save


runs.Run.save = save_then_fill
train.main(sys.argv[2:])
"""


@pytest.mark.parametrize("mode", ["tmpfs", "injected"])
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(setup, tmp_path, mode):
    disk = tmp_path / "disk"
    disk.mkdir()
    if mode == "tmpfs":
        try:
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                                     capture_output=True).returncode == 0
        except FileNotFoundError:
            mounted = False
        if not mounted:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
    try:
        run = disk / "run"
        cmd = cli("coop_min.train", setup, "--shots", "2", "--epochs", "1", "--batch-size", "8",
                  "--print-every", "1", "--save-every", "2", "--output", str(run))
        cmd[1:3] = ["-c", _DISK_FILLS, mode]
        line = _one_line(subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300))
        assert str(run) in line and "free" in line and "--resume" in line
        state = torch.load(run / "state.pt", weights_only=True)       # the first checkpoint, whole
        assert (state["epoch"], state["batch"]) == (0, 2)
        with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
            assert f.metadata()["batch"] == "2"
        assert not [p.name for p in run.iterdir() if ".tmp" in p.name]
        if mode == "tmpfs":
            (disk / "filler").unlink()                                # space freed: the run continues
        r = _train(setup, run, "--resume", "--save-every", "2")
        assert r.returncode == 0 and (run / "results.json").exists(), r.stderr
    finally:
        if mode == "tmpfs":
            subprocess.run(["umount", str(disk)], check=True)


def test_a_huge_seed_is_one_line(setup, tmp_path):
    line = _one_line(_train(setup, tmp_path / "run", "--seed", "99999999999999999999999"))
    assert "--seed must be between" in line and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# friction that loses a user's work


@pytest.mark.parametrize("args,message", [(["--weights", "/typo/clip.safetensors"], "weights not found"),
                                          (["--shots", "100000"], "fewer than --shots"),
                                          (["--n-ctx", "100"], "lower --n-ctx"),
                                          (["--method", "cocoop", "--csc"], "CoCoOp")])
def test_a_failed_start_writes_nothing(setup, tmp_path, args, message):
    line = _one_line(_train(setup, tmp_path / "run", *args))
    assert message in line and not (tmp_path / "run").exists()


def test_a_folder_holding_only_a_failed_start_is_reused(setup, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")                       # what a start that stopped in epoch 1 leaves
    (run / "log.txt").write_text("epoch 1/2 batch 1/4\n")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    r = _train(setup, run, "--epochs", "1")
    assert r.returncode == 0, r.stderr
    assert "epoch 1/2 batch 1/4" not in (run / "log.txt").read_text()
    assert json.loads((run / "config.json").read_text())["epochs"] == 1


def _data_with_a_bad_test_image(setup, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    split_file = next(data.glob("split_zhou_*.json"))
    bad = data / "images" / json.loads(split_file.read_text())["test"][0][0]
    bad.write_bytes(b"not an image")
    return data, bad


def test_a_bad_test_image_is_found_before_training(setup, tmp_path):
    data, bad = _data_with_a_bad_test_image(setup, tmp_path)
    def cmd(*a):
        return cli("coop_min.train", {**setup, "data": str(data)}, "--shots", "2", "--epochs", "1",
                   "--batch-size", "8", "--output", str(tmp_path / "run"), *a)
    r = subprocess.run(cmd(), env=ENV, capture_output=True, text=True, timeout=300)
    line = _one_line(r)
    assert str(bad) in line and "--skip-bad-images" in line and not (tmp_path / "run").exists()
    r = subprocess.run(cmd("--skip-bad-images"), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "1 images cannot be read" in r.stdout, r.stderr


def test_bare_resume_takes_the_runs_settings_and_refuses_other_ones(setup, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    (run / "results.json").unlink()
    (run / "state.pt.tmp4242").write_text("a kill during a save")
    cmd = [cli("coop_min.train", setup)[0], "-m", "coop_min.train", "--resume", "--output", str(run)]
    r = subprocess.run([*cmd, "--shots", "4"], env=ENV, capture_output=True, text=True, timeout=300)
    assert "differ from the run's (shots)" in _one_line(r)
    r = subprocess.run([*cmd, "--workers", "0", "--print-every", "3"], env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "results.json").read_text())["accuracy"] == \
        json.loads((finished[0] / "results.json").read_text())["accuracy"]
    assert not (run / "state.pt.tmp4242").exists()


# ----------------------------------------------------------------------------------------------
# fidelity


def test_csc_with_a_phrase_is_one_generic_context_and_reports_new_classes(setup, tmp_path):
    r = _train(setup, tmp_path / "run", "--epochs", "1", "--csc", "--ctx-init", "a photo of a",
               "--subsample", "base")
    assert r.returncode == 0, r.stderr
    assert "csc=True is ignored" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"new", "harmonic_mean"} <= set(results)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["csc"] is False


def test_the_phrase_init_is_the_checkpoints_values_not_their_bf16_rounding():
    from coop_min.tokenizer import encode
    from coop_min.train import TrainConfig, make_learner, resolve

    clip = _tiny_clip(0)
    exact = clip.token_embedding.weight[torch.tensor(encode("a photo of a"))].clone()
    assert not torch.equal(exact.bfloat16().float(), exact)        # the rounding would show
    cfg = resolve(TrainConfig(ctx_init="a photo of a", precision="bf16", device="cpu"), "Demo")
    learner = make_learner(cfg, clip, ["cat", "dog"])
    assert torch.equal(learner.ctx.detach(), exact) and learner.ctx.dtype == torch.float32
    assert learner.token_prefix.dtype == torch.bfloat16 and clip.dtype == torch.bfloat16


def test_interpret_compares_against_the_checkpoints_fp32_embedding(setup, finished):
    from coop_min.clip import load_clip
    from coop_min.tokenizer import token_text
    from safetensors.torch import load_file

    run, weights = finished
    cmd = cli("coop_min.evaluate", {**setup, "weights": str(weights)}, "--prompt", str(run),
              "--interpret", "3", "--precision", "bf16")
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ctx = load_file(str(run / "prompt.safetensors"))["ctx"]
    ids, _ = nearest_words(ctx, load_clip(weights).token_embedding, 3)
    want = [[token_text(int(i)) for i in row] for row in ids]
    rows = [line.split() for line in r.stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert [row[1::2] for row in rows] == want


def test_progress_means_rate_and_eta_on_a_fake_clock():
    now = [100.0]
    from coop_min.progress import Progress
    progress = Progress(steps_left=10, clock=lambda: now[0])
    for loss, correct in ((2.0, 4), (1.0, 8)):                 # two steps of 8 images, 2 s each
        now[0] += 2.0
        progress.step()
        progress.add(loss * 8, correct, 8)
    assert progress.line() == "loss 1.5000 acc 75.0% 4.0 img/s eta 16s"   # 8 steps left at 2 s each
    now[0] += 60.0
    progress.step()
    progress.add(0.5 * 8, 8, 8)
    assert progress.line() == "loss 0.5000 acc 100.0% 0.1 img/s eta 2.5 min"   # 7 left at the run's 64/3 s
    assert progress.epoch_means() == {"mean_loss": round(3.5 * 8 / 24, 6),
                                      "mean_acc": round(100 * 20 / 24, 4)}


def test_progress_lines_come_every_few_seconds_and_at_the_last_step():
    """A line at the first metrics line (an early ETA), then at the first after every PRINT_SECONDS,
    and at the run's last step, however many metrics lines come between."""
    from coop_min.progress import PRINT_SECONDS, Progress, duration
    now = [0.0]
    progress = Progress(steps_left=400, clock=lambda: now[0])
    printed = []
    for step in range(400):                  # 0.4 s a step: 160 s, a metrics line every step
        now[0] += 0.4
        progress.step()
        progress.add(1.0, 1, 1)
        if progress.due():
            printed.append(step)
            progress.line()
    assert printed[0] == 0 and printed[-1] == 399
    gaps = [b - a for a, b in zip(printed[:-1], printed[1:-1])]          # in steps of 0.4 s
    assert gaps == [math.ceil(PRINT_SECONDS / 0.4)] * len(gaps) and 25 <= len(printed) <= 40
    assert (duration(0.42), duration(42), duration(150)) == ("0.4s", "42s", "2.5 min")


def test_a_closed_stdout_pipe_does_not_stop_the_run(setup, tmp_path):
    """`python -m coop_min.train ... | head -1`: the reader goes away, the run finishes and log.txt has
    it all."""
    run = tmp_path / "run"
    proc = subprocess.Popen(cli("coop_min.train", setup, "--shots", "1", "--epochs", "2", "--batch-size", "4",
                                "--print-every", "1", "--output", str(run)),
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    proc.stdout.close()                                  # as head does after its line
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert (run / "results.json").is_file() and "results: " in (run / "log.txt").read_text()
