"""bench's graph and compile columns are checked against eager steps after they are timed
(benchmarks/checks.py). On the CPU, stand-ins for the CUDA graph replay and for torch.compile show
that a replay that skips the SGD update, or keeps reading its first inputs, or a compiled encoder
that computes something else, prints FAIL and no speedup, while an honest one passes."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from coop_min.cuda_graph import TrainStep

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder beside bench.py, not an installed package
from benchmarks import checks, methods, table  # noqa: E402

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
        assert row["graph ms*"] == "FAIL" and row["check bkt / graph*"].startswith("FAIL")
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
    assert buckets["check"]["ok"] and buckets["check"]["grad"] < 1e-5          # fp32: the same function
    assert buckets["text_tokens"] < ours["text_tokens"]                         # ImageNet's names do cut
    row = dict(table.cells(record))
    assert row["buckets ms"] != "-" and row["bkt speedup"] != "-" and row["graph ms*"] == "-"


def test_a_buckets_step_off_the_official_one_fails_and_shows_no_speedup():
    g = torch.ones(4, 8)
    step = {"ms": 10.0, "loss": 2.0}
    case = bench.Case("c", "coop", "vit_tiny", 5, 2, 4)
    record = bench.summarise(case, {"official": {**step, "grad": g}, "ours": {**step, "grad": g},
                                    "buckets": {**step, "ms": 5.0, "grad": 1.5 * g}})
    assert record["match"] and not record["checks_passed"] and record["speedup_buckets"] is None
    assert record["methods"]["buckets"]["check"]["grad"] == pytest.approx(0.5)
    row = dict(table.cells(record))
    assert row["buckets ms"] == "FAIL" and row["check bkt / graph*"] == "FAIL 5.0e-01"
