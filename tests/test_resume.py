"""A run SIGKILLed right after any of its checkpoints and resumed writes what an uninterrupted run
writes: metrics.jsonl line for line, results.json and the learned prompt. --save-every 2 does not
divide --print-every 3, so most mid-epoch checkpoints fall between metrics lines."""
import json
import signal
import subprocess

import pytest
import torch
from safetensors import safe_open

from conftest import ENV, cli, metrics_lines

COST = ("train_seconds", "images_per_second", "peak_memory_bytes")   # results.json's wall-clock fields

# 72 images: 9 steps an epoch
ARGS = ("--shots", "2", "--epochs", "2", "--batch-size", "8", "--save-every", "2", "--print-every", "3")

# python -c _KILL_AFTER N ARGS...: the trainer, SIGKILLed as soon as its N-th checkpoint is written
_KILL_AFTER = """
import os, signal, sys
from coop_min import runs, train

save, n, saved = runs.Run.save, int(sys.argv[1]), []


def save_then_die(*args):
    save(*args)
    saved.append(args)
    if len(saved) == n:
        os.kill(os.getpid(), signal.SIGKILL)


runs.Run.save = save_then_die
train.main(sys.argv[2:])
"""


def _train(setup, out, *args, kill_after=None):
    cmd = cli("coop_min.train", setup, *ARGS, "--output", str(out), *args)
    if kill_after is not None:
        cmd[1:3] = ["-c", _KILL_AFTER, str(kill_after)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


def _results(path):
    """results.json without what the training cost (seconds, images/s, memory): wall-clock values."""
    results = json.loads(path.read_text())
    return {k: v for k, v in results.items() if k not in COST}


def _prompt(path):
    """prompt.safetensors as (tensors, metadata): safetensors writes its metadata in no fixed order."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def uninterrupted(e2e_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    r = _train(e2e_setup, out)
    assert r.returncode == 0, r.stderr
    return out


# checkpoint N -> (epoch, batch) in state.pt; lines come at batches 3, 6 and 9 (the epoch's end)
@pytest.mark.parametrize("kill_after,stop", [(1, (0, 2)),    # mid-epoch, before the first line
                                             (4, (0, 8)),    # mid-epoch, two steps after a line
                                             (5, (1, 0)),    # an epoch's end
                                             (7, (1, 4))])   # mid-epoch in a later epoch
def test_a_run_resumed_from_any_checkpoint_writes_what_an_uninterrupted_run_writes(
        e2e_setup, uninterrupted, tmp_path, kill_after, stop):
    out = tmp_path / "run"
    r = _train(e2e_setup, out, kill_after=kill_after)
    assert r.returncode == -signal.SIGKILL, r.stderr
    state = torch.load(out / "state.pt", weights_only=True)
    assert (state["epoch"], state["batch"]) == stop
    r = _train(e2e_setup, out, "--resume")
    assert r.returncode == 0, r.stderr
    assert metrics_lines(out / "metrics.jsonl") == metrics_lines(uninterrupted / "metrics.jsonl")
    assert _results(out / "results.json") == _results(uninterrupted / "results.json")
    (got, got_meta), (want, want_meta) = (_prompt(d / "prompt.safetensors") for d in (out, uninterrupted))
    assert got_meta == want_meta and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    a, b = (torch.load(d / "state.pt", weights_only=True) for d in (out, uninterrupted))
    assert torch.equal(a["torch_rng"], b["torch_rng"]) and a["progress"] == b["progress"]
