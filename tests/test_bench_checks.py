"""bench's checks (benchmarks/checks.py). Every method's first loss and context gradient against the
method in fp32: a planted wrong gradient (scaled by 1.2, or labels off by one) prints FAIL, no speedup
and exit 1, real bf16 rounding passes, and the official fp16 path's distance is reported, not
checked. The graph and compile columns against eager steps after they are timed: on the CPU,
stand-ins for the CUDA graph replay and for torch.compile show that a replay that skips the SGD
update, or keeps reading its first inputs, or a compiled encoder that computes something else, prints
FAIL and no speedup, while an honest one passes. And the README's table from bench's JSON."""
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from coop_min.cuda_graph import TrainStep

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is bench.py's folder of modules, registered by conftest.py
from benchmarks import checks, methods, table, timing  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench", ROOT / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

CPU = torch.device("cpu")
SETTINGS = methods.Settings(warmup=1, cuda_graph=True, compile=True)   # fp32, as bench on the CPU


class _Replay(TrainStep):
    """TrainStep whose cuda_graph=True runs `replay` after the eager warm-ups instead of a CUDA graph
    (cuda_graph=False, the check's eager twin, is TrainStep's own eager step)."""

    def __call__(self, *inputs):
        if not self.cuda_graph:
            return self._eager(inputs)
        if self.warmup > 0:
            self.warmup -= 1
            return self._eager(inputs)
        return self.replay(inputs)

    def replay(self, inputs):                       # honest: the same step
        return self._eager(inputs)


class _SkipsUpdate(_Replay):
    def replay(self, inputs):                       # forward only: the parameters stay put
        return tuple(x.detach() for x in self.forward(*inputs))


class _StaleInputs(_Replay):
    def replay(self, inputs):                       # copies its inputs once, at "capture"
        if self.static_inputs is None:
            self.static_inputs = inputs
        return self._eager(self.static_inputs)


@pytest.fixture(scope="module")
def models():
    return methods.Models("vit_tiny", CPU, SETTINGS)


@pytest.mark.parametrize("replay,honest", [(_Replay, True), (_SkipsUpdate, False), (_StaleInputs, False)])
@pytest.mark.parametrize("kind", ["coop", "cocoop"])
def test_graph_column_passes_only_a_replay_that_trains_as_the_eager_step(monkeypatch, models, replay, honest, kind):
    monkeypatch.setattr(methods, "TrainStep", replay)
    case = bench.Case(f"{kind}-check", kind, "vit_tiny", 5, 2, 4, repeats=3)
    record = bench.summarise(case, methods.train_methods(case, models, CPU, SETTINGS))
    check = record["methods"]["graph"]["check"]
    assert check["ok"] == honest and record["checks_passed"] == honest, check
    if honest:
        assert check["output"] == check["update"] == 0.0                 # the same kernels, the same numbers
        assert record["speedup_graph"] is not None
    else:
        assert check["update"] > 1e-3 and record["speedup_graph"] is None     # no speedup for a wrong step
        row = dict(table.cells(record))
        assert row["graph ms*"] == "FAIL" and row["graph* vs eager"].startswith("FAIL")
    assert record["match"]                                                # official vs ours is its own check


def _rows_off_by_one(visual):                       # a "compiled" encoder that returns the wrong image's features
    def forward(x):
        return visual(x).roll(1, 0)
    return forward


@pytest.mark.parametrize("compiled,honest", [(lambda module, dynamic: module, True),
                                             (lambda module, dynamic: _rows_off_by_one(module), False)])
def test_zero_shot_compile_column_is_checked_against_eager_ours(monkeypatch, models, compiled, honest):
    monkeypatch.setattr(methods.torch, "compile", compiled)               # no inductor on the CPU
    case = bench.Case("zeroshot-check", "zeroshot", "vit_tiny", 10, 4, repeats=2)
    record = bench.summarise(case, methods.zeroshot_methods(case, models, CPU, SETTINGS))
    check = record["methods"]["compile"]["check"]
    assert check["ok"] == honest and (record["speedup_compile"] is None) != honest, check
    assert set(check) == {"output", "ok"}                                 # no parameters to compare


def test_check_compares_the_update_not_the_parameters():
    """Parameters that did not move at all are 100% off in their update, whatever their size."""
    start = checks.flat([torch.ones(3)])
    assert checks.rel_diff(checks.flat([torch.ones(3)]) - start, checks.flat([torch.full((3,), 1.001)]) - start) == 1.0


def test_buckets_column_runs_ours_with_buckets_eagerly_and_is_checked_as_ours(models):
    settings = methods.Settings(warmup=1, buckets=True)
    case = bench.Case("cocoop-buckets", "cocoop", "vit_tiny", 500, 2, 4, repeats=1)
    record = bench.summarise(case, methods.train_methods(case, models, CPU, settings))
    buckets, ours = record["methods"]["buckets"], record["methods"]["ours"]
    assert buckets["vs_fp32"]["ok"] and buckets["vs_fp32"]["grad"] < 1e-5      # fp32: the same function
    assert buckets["text_tokens"] < ours["text_tokens"]                         # ImageNet's names do cut
    row = dict(table.cells(record))
    assert row["buckets ms"] != "-" and row["bkt speedup"] != "-" and row["graph ms*"] == "-"


# ----------------------------------------------------------------------------------------------
# first outputs against the method in fp32


def _step(grad, dtype, ms):
    return {"ms": ms, "ms_min": ms, "ms_max": ms, "loss": 2.0, "grad": grad, "dtype": dtype}


@pytest.mark.parametrize("planted,honest", [(1.2, False), (1.02, True)])   # wrong; bf16-sized noise
def test_a_first_gradient_off_the_fp32_method_fails_and_shows_no_speedup(planted, honest):
    g = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    case = bench.Case("c", "coop", "vit_tiny", 5, 2, 16)
    record = bench.summarise(case, {"reference": {"dtype": "float32", "loss": 2.0, "grad": g.clone()},
                                    "official": _step(0.3 * g, "float16", 20.0),    # fp16 rounding: reported
                                    "ours": _step(planted * g, "bfloat16", 5.0)})
    ours = record["methods"]["ours"]["vs_fp32"]
    assert ours["grad"] == pytest.approx(planted - 1, rel=1e-5) and ours["ok"] == honest
    assert record["match"] == record["checks_passed"] == honest
    assert record["speedup"] == (4.0 if honest else None)
    assert record["official_vs_fp32"] == {"dtype": "float16", "loss": 0.0, "grad": pytest.approx(0.7)}
    assert record["methods"]["official"]["vs_fp32"]["ok"] is None          # far off, and not a failure
    row = dict(table.cells(record))
    assert row["official ms"] == "20.0 (20.0-20.0)"
    assert row["ours ms"] == ("5.0 (5.0-5.0)" if honest else "FAIL")
    vs_fp32 = row["vs fp32 off / ours / bkt / graph*"]
    assert vs_fp32 == ("7.0e-01 / 2.0e-02" if honest else "7.0e-01 / FAIL 2.0e-01")
    json.dumps(record)                                                      # no tensors left


def test_the_official_path_is_checked_where_it_runs_fp32_and_a_missing_reference_fails_all():
    g = torch.ones(4, 8)
    case = bench.Case("c", "coop", "vit_tiny", 5, 2, 16)
    reference = {"dtype": "float32", "loss": 2.0, "grad": g}
    record = bench.summarise(case, {"reference": reference, "official": _step(1.2 * g, "float32", 20.0),
                                    "ours": _step(g, "float32", 5.0)})
    assert record["methods"]["official"]["vs_fp32"]["ok"] is False and record["speedup"] is None
    record = bench.summarise(case, {"reference": {"dtype": "float32", "error": "OOM"},
                                    "official": _step(g, "float16", 20.0), "ours": _step(g, "bfloat16", 5.0)})
    assert record["methods"]["ours"]["vs_fp32"] == {"ok": False, "error": "no fp32 reference"}
    assert not record["match"] and record["speedup"] is None


BF16 = methods.Settings(warmup=1, official_dtype=torch.float16, ours_dtype=torch.bfloat16)   # as on a GPU


@pytest.fixture(scope="module")
def bf16_models():
    return methods.Models("vit_tiny", CPU, BF16)


@pytest.mark.parametrize("kind,classes,batch,n_ctx", [("coop", 100, 4, 16), ("cocoop", 20, 2, 4)])
def test_bf16_ours_passes_against_the_fp32_method_and_official_fp16_is_reported(bf16_models, kind, classes,
                                                                                  batch, n_ctx):
    case = bench.Case(f"{kind}-bf16", kind, "vit_tiny", classes, batch, n_ctx, repeats=1)
    record = bench.summarise(case, methods.train_methods(case, bf16_models, CPU, BF16))
    record = json.loads(json.dumps(record))                                 # as bench's JSON has it
    ours = record["methods"]["ours"]["vs_fp32"]
    tolerance = checks.REFERENCE_TOLERANCE["bfloat16"]["grad"]
    assert ours["ok"] and 1e-3 < ours["grad"] <= tolerance, ours           # real bf16 rounding, inside it
    assert record["match"] and record["checks_passed"] and record["speedup"] is not None
    official = record["official_vs_fp32"]
    assert official["dtype"] == "float16" and official["grad"] > 1e-5 and official["loss"] >= 0
    assert record["methods"]["official"]["vs_fp32"]["ok"] is None
    assert record["reference"]["dtype"] == "float32" and record["reference"]["loss"] > 0


def test_labels_off_by_one_print_fail_and_exit_1(monkeypatch, tmp_path, capsys):
    """ours with its labels rolled by one: the context gradient moves far past any tolerance."""
    from coop_min import fast

    loss = fast.FastPromptedCLIP.loss
    monkeypatch.setattr(fast.FastPromptedCLIP, "loss", lambda self, x, y, **k: loss(self, x, y.roll(1), **k))
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--smoke", "--cases", "coop-vit_tiny-c8", "--json", str(out)]) == 1
    record = json.loads(out.read_text())["cases"][0]
    ours = record["methods"]["ours"]["vs_fp32"]
    assert ours["ok"] is False and ours["grad"] > 0.1 and record["speedup"] is None
    assert record["methods"]["official"]["vs_fp32"]["ok"]                  # fp32 on the CPU: the method
    assert "FAIL" in capsys.readouterr().out.split("\ntotal ")[-1]         # the table, printed last


def test_each_time_is_the_median_of_the_timed_steps_with_the_fastest_and_slowest():
    sleeps = iter([0, 1, 40, 2, 30, 3])                                    # ms: the first call, then 5 timed

    def make_step():
        return lambda: time.sleep(next(sleeps) / 1e3) or torch.tensor(1.0)
    r = timing.run_method(make_step, CPU, warmup=1, repeats=5)
    assert r["ms_min"] <= r["ms"] <= r["ms_max"] and r["ms_max"] - r["ms_min"] > 30
    assert 2.9 < r["ms"] < 15                    # the median, 3 ms and what a busy machine adds (the mean is 15.2)


# ----------------------------------------------------------------------------------------------
# the README's speed table


def _timed(ms, low, high, peak=None, ok=True):
    return {"ms": ms, "ms_min": low, "ms_max": high, "peak_gib": peak, "vs_fp32": {"ok": ok}}


def _train(case, kind, classes, batch, methods_, **ratios):
    return {"case": case, "kind": kind, "arch": "vit_b16", "classes": classes, "batch": batch,
            "methods": methods_, **ratios}


REPORT = {"environment": {"device": "NVIDIA H200", "commit": "abc1234", "torch": "2.13.0", "triton": "3.9.0",
                          "fused_head": "triton", "fused_elementwise": True, "shared_prefix": False,
                          "length_buckets": False},
          "cases": [
              _train("coop-vit_b16-c1000", "coop", 1000, 32,
                     {"official": _timed(119.2, 118.9, 120.3, 15.5, ok=None),
                      "ours": _timed(41.9, 41.5, 42.3, 3.6), "graph": _timed(14.9, 14.8, 15.1, 3.9)},
                     speedup=119.2 / 41.9, speedup_graph=119.2 / 14.9),
              _train("cocoop-vit_b16-c500-b8", "cocoop", 500, 8,
                     {"official": _timed(474.7, 470.0, 480.1, 58.2), "ours": _timed(82.4, 82.0, 83.0, 10.6),
                      "graph": {**_timed(12.0, 11.9, 12.2, 9.0), "check": {"update": 0.5, "ok": False}}},
                     speedup=474.7 / 82.4, speedup_graph=None),
              _train("zeroshot-vit_b16", "zeroshot", 1000, 256,
                     {"official": _timed(44.1, 44.0, 44.3, 1.2), "ours": {"error": "OOM"}}, speedup=None),
              {"case": "head-cocoop-b8-c500-d512", "kind": "head", "arch": "", "classes": 500, "batch": 8,
               "dim": 512, "per_image": True,
               "methods": {"fused": _timed(0.95, 0.94, 0.97), "eager": _timed(2.33, 2.30, 2.40),
                           "graph": _timed(0.40, 0.39, 0.41)},
               "speedup_vs_eager": 2.33 / 0.95, "speedup_vs_compile": 1.5},
              _train("coop-vit_b16-c100", "coop", 100, 32,                # --memory's model: left out
                     {"official": {"peak_gib": 1.84}, "ours": {"peak_gib": 0.61}})]}


def test_markdown_table_from_bench_json(tmp_path, capsys):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(REPORT))
    assert bench.main(["--markdown", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("NVIDIA H200, torch 2.13.0, triton 3.9.0, commit abc1234.") and lines[1] == ""
    assert lines[2:] == [
        "| case | official ms | ours eager ms (speedup) | ours graph ms (speedup) "
        "| peak GiB official / ours / graph | target |",
        "| --- | --- | --- | --- | --- | --- |",
        "| CoOp ViT-B/16, batch 32, 1000 classes | 119.2 (118.9-120.3) | 41.9 (41.5-42.3), 2.8x "
        "| 14.9 (14.8-15.1), 8.0x | 15.50 / 3.60 / 3.90 | ≥ 12x: 8.0x, not met; ≤ 4 GiB: 3.60, met |",
        "| CoCoOp ViT-B/16, batch 8, 500 classes | 474.7 (470.0-480.1) | 82.4 (82.0-83.0), 5.8x | FAIL "
        "| 58.20 / 10.60 / 9.00 | ≥ 25x: 5.8x, not met; ≤ 1/6 of official: 1/5.5, not met |",
        "| zero-shot ViT-B/16, batch 256, 1000 classes | 44.1 (44.0-44.3) | OOM | - | 1.20 / OOM / - "
        "| ≥ 1.5x: no checked number |",
        "| head fwd+bwd, CoCoOp B8 C500 D512 | eager twin 2.330 (2.300-2.400) | 0.950 (0.940-0.970), 2.5x "
        "| 0.400 (0.390-0.410), 5.8x | - | ≥ 2x: 2.5x, met; ≥ 1.2x torch.compile: 1.5x, met |"]


def test_markdown_refuses_a_file_bench_did_not_write(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text('{"results": []}')
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--markdown", str(path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "--markdown" in lines[0], lines
