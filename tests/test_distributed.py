"""Data-parallel training under torchrun (gloo, 2 CPU processes) equals one process with the same
global batch: CoOp with sharded and unsharded classes, CoCoOp; a 2-process run killed mid-epoch
resumes bit-identical; distributed evaluation gives exactly the single-process metrics. The
autograd all-gather and the batch split are checked against plain single-process computations."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import ENV, cli, metrics_lines
from coop_min import distributed as dist
from coop_min.clip import load_clip
from coop_min.data import make_loader
from coop_min.demo import classnames
from coop_min.prompts import PromptConfig, build_prompted_clip

TRAIN = ("--shots", "2", "--epochs", "3", "--batch-size", "8", "--print-every", "1")


def _train(setup, out, *args, nproc=1):
    cmd = cli("coop_min.train", setup, *TRAIN, "--output", str(out), *args, nproc=nproc)
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _ctx(run):
    return load_file(str(run / "prompt.safetensors"))


@pytest.fixture(scope="module")
def runs(e2e_setup):
    """Single- and 2-process runs, made once and shared by the tests below: {name: run folder}."""
    root, out = e2e_setup["root"] / "dist", {}
    plans = {"coop_1": ((), 1), "coop_2": ((), 2), "coop_2_unsharded": (("--no-shard-text",), 2),
             "cocoop_1": (("--method", "cocoop", "--epochs", "2"), 1),
             "cocoop_2": (("--method", "cocoop", "--epochs", "2"), 2),
             # a global batch of 1 leaves rank 1 without images at every step (its zero-loss path)
             "coop_1_b1": (("--batch-size", "1", "--epochs", "2", "--shots", "1"), 1),
             "coop_2_b1": (("--batch-size", "1", "--epochs", "2", "--shots", "1"), 2)}
    for name, (args, nproc) in plans.items():
        out[name] = root / name
        _train(e2e_setup, out[name], *args, nproc=nproc)
    return out


@pytest.mark.parametrize("name,one", [("coop_2", "coop_1"), ("coop_2_unsharded", "coop_1"),
                                      ("cocoop_2", "cocoop_1"), ("coop_2_b1", "coop_1_b1")])
def test_two_processes_learn_the_single_process_prompt(e2e_setup, runs, name, one):
    method = name.split("_")[0]
    single, parallel = _ctx(runs[one]), _ctx(runs[name])
    assert single.keys() == parallel.keys()
    for key in single:
        difference = (parallel[key] - single[key]).abs().max()
        assert torch.allclose(parallel[key], single[key], rtol=0, atol=1e-6), (key, difference)
    # the context moved far more than the tolerance, so the comparison covers real updates
    clip = load_clip(e2e_setup["weights"])
    init = build_prompted_clip(clip, classnames(), PromptConfig.for_method(method), seed=1).learner.ctx
    init = init.detach()
    assert (single["ctx"] - init).abs().max() > 1e-4


def test_sharded_run_says_so_and_rank_0_alone_writes(runs):
    log = (runs["coop_2"] / "log.txt").read_text()
    assert "across 2 processes, classes sharded" in log
    assert "classes sharded" not in (runs["coop_2_unsharded"] / "log.txt").read_text()
    assert not list(runs["coop_2"].glob("*.tmp*"))
    lines = (runs["coop_2"] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == 30       # (9 steps + the epoch) x 3 epochs, each written once


def test_killed_two_process_run_resumes_bit_identical(e2e_setup, runs):
    killed = e2e_setup["root"] / "dist" / "killed"
    cmd = cli("coop_min.train", e2e_setup, *TRAIN, "--output", str(killed), "--save-every", "1", nproc=2)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:   # kill the launcher and both workers mid-epoch 2
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "results.json").exists()
    _train(e2e_setup, killed, "--save-every", "1", "--resume", nproc=2)
    # --save-every only adds checkpoints: the uninterrupted 2-process run is the reference
    assert torch.equal(_ctx(killed)["ctx"], _ctx(runs["coop_2"])["ctx"])
    assert metrics_lines(killed / "metrics.jsonl") == metrics_lines(runs["coop_2"] / "metrics.jsonl")


def test_distributed_evaluation_equals_one_process(e2e_setup, runs, tmp_path):
    results = {}
    for nproc in (1, 2):   # batch 1 per process, so every image's features are computed alike
        out = tmp_path / f"eval{nproc}"
        cmd = cli("coop_min.evaluate", e2e_setup, "--prompt", str(runs["coop_1"]), "--subsample", "base2new",
                  "--batch-size", str(nproc), "--output", str(out), nproc=nproc)
        r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("harmonic mean") == 1                # rank 0 alone prints
        results[nproc] = json.loads((out / "results.json").read_text())
        del results[nproc]["seconds"]                              # wall-clock: what the evaluation took
    assert results[1] == results[2]
    assert results[1]["base"]["total"] + results[1]["new"]["total"] == 36 * 30


# ----------------------------------------------------------------------------------------------
# the pieces, in-process


def test_batch_parts_cover_the_global_batch_in_order():
    class Items(torch.utils.data.Dataset):
        train = True

        def set_epoch(self, epoch):
            pass

        def __len__(self):
            return 23

        def __getitem__(self, i):
            return torch.zeros(1), i

    whole = [labels.tolist() for _, labels in make_loader(Items(), 7, seed=3, epoch=1)]
    parts = [[labels.tolist() for _, labels in make_loader(Items(), 7, seed=3, epoch=1, rank=r, world_size=3)]
             for r in range(3)]
    assert len(whole) == 3 and all(len(p) == 3 for p in parts)                    # drop_last: 23 // 7
    for b, batch in enumerate(whole):
        assert sum((p[b] for p in parts), []) == batch
        assert sorted(len(p[b]) for p in parts) == [2, 2, 3]


def _gather_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    x, w = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    lo, hi = (0, 2) if rank == 0 else (2, 5)                                   # uneven shards
    mine = x[lo:hi].clone().requires_grad_(True)
    full = dist.gather_cat(mine)                                               # (5, 4)
    loss = (w[rank] * full).sin().sum() * (rank + 1)                           # each rank its own loss
    loss.backward()
    torch.save((full.detach(), mine.grad), os.path.join(out, f"rank{rank}.pt"))
    dist.end_rank()                          # as the CLIs end: gloo's teardown has aborted finished ranks


def test_gather_cat_gradient_is_the_sum_over_ranks(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gather_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    x, w = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    x.requires_grad_(True)
    total = sum((w[r] * x).sin().sum() * (r + 1) for r in range(2))            # the global loss, one process
    total.backward()
    assert torch.equal(got[0][0], x.detach()) and torch.equal(got[1][0], x.detach())
    assert torch.allclose(got[0][1], x.grad[0:2], rtol=1e-12, atol=0)
    assert torch.allclose(got[1][1], x.grad[2:5], rtol=1e-12, atol=0)
