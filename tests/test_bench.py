"""bench.py and benchmarks/: the CPU smoke run covers every case with finite numbers, and the
official-equivalent path is a faithful twin of OpenAI's CLIP (checked against coop_min.clip, itself
tested against an independent re-implementation of OpenAI's model.py in test_clip.py)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from coop_min.clip import CLIP, CLIPConfig, LayerNorm, QuickGELU
from coop_min.tokenizer import encode, tokenize

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is bench.py's folder of modules, registered by conftest.py
from benchmarks import cost, memory, methods, official, timing  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench", ROOT / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TINY = {"vit": CLIPConfig(32, 32, 2, 64, 16, 2, 77, 49408, 64, 4, 2),
        "rn": CLIPConfig(32, 64, (1, 2, 1, 1), 8, None, 2, 77, 49408, 64, 4, 2)}


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_smoke_run_reports_every_case_with_finite_numbers(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--smoke", "--json", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = run.stdout.split("\ntotal ")[-1]  # printed last, after the progress lines
    assert "official ms" in table and "head case" in table and "text tokens" in table
    report = json.loads(out.read_text())
    cases = report["cases"]
    kinds = [c["kind"] for c in cases]
    assert {k: kinds.count(k) for k in set(kinds)} == {"head": 3, "coop": 6, "cocoop": 4, "zeroshot": 2}
    assert _finite(report["environment"]["copy_gbps"]) and "commit" in report["environment"]
    for c in cases:
        expected = {"fused", "eager"} if c["kind"] == "head" else {"official", "ours"}
        assert set(c["methods"]) == expected, c["case"]
        assert c["reference"]["dtype"] == "float32" and _finite(c["reference"]["loss"]), c["case"]
        for name, m in c["methods"].items():
            assert _finite(m["ms"]) and m["ms"] > 0 and _finite(m["loss"]), (c["case"], name, m)
            assert 0 < m["ms_min"] <= m["ms"] <= m["ms_max"], (c["case"], name, m)     # median and spread
            assert m["vs_fp32"]["ok"] and m["vs_fp32"]["loss"] <= 1e-5, (c["case"], name, m)   # fp32 on CPU
            assert m["vs_fp32"].get("grad", 0) <= 1e-4, (c["case"], name, m)
            if c["kind"] != "head":
                assert _finite(m["images_per_s"]), (c["case"], name)
        if c["kind"] in ("coop", "cocoop"):                  # per step: official pads every prompt to 77
            prompts = c["classes"] * (c["batch"] if c["kind"] == "cocoop" else 1)
            assert c["methods"]["official"]["text_tokens"] == 77 * prompts
            assert prompts <= c["methods"]["ours"]["text_tokens"] < 77 * prompts
        ratio = c["speedup_vs_eager"] if c["kind"] == "head" else c["speedup"]
        assert _finite(ratio) and ratio > 0, c["case"]
        assert c["match"] and c["checks_passed"], c["case"]
        if c["kind"] != "head":                                   # the official path's distance, reported
            assert c["official_vs_fp32"]["dtype"] == "float32" and c["official_vs_fp32"]["loss"] <= 1e-5


def test_class_names_are_imagenets_as_coop_spells_them_with_their_real_token_lengths():
    lines = methods.IMAGENET_CLASSNAMES.read_text().splitlines()
    assert len(lines) == 1000 and lines[0] == "n01440764 tench" and lines[21] == "n01608432 kite (bird of prey)"
    assert [line.split(" ", 1)[0] for line in lines] == sorted(line.split(" ", 1)[0] for line in lines)  # class order
    names = methods.classnames(1000)
    lengths = [len(encode(name.replace("_", " "))) for name in names]
    assert [lengths.count(n) for n in (1, 2, 3)] == [246, 508, 154] and max(lengths) == 12
    assert methods.classnames(500) == names[:500] and methods.classnames(1001)[1000] == names[0]


def test_text_tokens_are_the_prompts_padded_per_chunk():
    settings = methods.Settings()
    coop, cocoop = bench.Case("c", "coop", "vit_tiny", 3, 2, 16), bench.Case("c", "cocoop", "vit_tiny", 3, 2, 4)
    eots = [20, 25, 21]                                       # padded lengths 21, 26, 22
    assert methods.text_tokens(coop, eots, settings) == 3 * 26
    assert methods.text_tokens(cocoop, eots, settings) == 2 * 3 * 26            # a prompt per (image, class)
    assert methods.text_tokens(coop, eots, settings, buckets=True) == 3 * 26    # 8 padded tokens: not worth a chunk
    shared = methods.Settings(shared_prefix=True)                                # [SOS, 4 ctx] once per image
    assert methods.text_tokens(cocoop, eots, shared) == 2 * 5 + 2 * 3 * (26 - 5)


def _tiny(kind, seed=0):
    torch.manual_seed(seed)
    ours = CLIP(TINY[kind]).eval().requires_grad_(False)
    for p in ours.parameters():  # OpenAI's init leaves biases and LayerNorm at 0/1: test them too
        p.add_(0.02 * torch.randn_like(p))
    return ours, official.build_official_clip(ours.state_dict(), TINY[kind], torch.float32, "cpu")


def _assert_close(actual, expected, tol=1e-5):
    err = (actual - expected).abs().max().item()
    assert err <= tol * expected.abs().max().item(), f"max error {err:.3g}"


def test_official_text_encoder_matches_clip_on_full_sequences():
    ours, theirs = _tiny("vit")
    tokens = tokenize(["X X X X red car.", "X X X X a very old stone bridge.", "X X X X x."])
    x = ours.token_embedding(tokens) + 0.1 * torch.randn(3, 77, 64)  # as if ctx replaced positions 1..4
    want = ours.encode_text_embeddings(x, tokens.argmax(-1))
    _assert_close(official.official_encode_text(theirs, x, tokens), want)


@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_official_image_encoder_matches_clip(kind):
    ours, theirs = _tiny(kind, seed=1)
    r = TINY[kind].image_resolution
    images = torch.randn(3, 3, r, r)
    _assert_close(theirs.visual(images), ours.encode_image(images))


def test_official_fp16_conversion_follows_openai_convert_weights():
    _, clip = _tiny("rn")
    official.convert_weights(clip)
    half = {n for n, p in clip.named_parameters() if p.dtype == torch.float16}
    for n, p in clip.named_parameters():  # OpenAI: only conv/linear/attention weights and projections
        m = clip.get_submodule(n.rsplit(".", 1)[0]) if "." in n else clip
        expected = isinstance(m, (nn.Conv2d, nn.Linear, nn.MultiheadAttention)) or n == "text_projection"
        assert (n in half) == expected, n
    for n in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "logit_scale",
              "visual.bn1.weight", "visual.attnpool.positional_embedding"):
        assert n not in half
    for n in ("visual.conv1.weight", "visual.attnpool.q_proj.bias", "transformer.resblocks.0.attn.in_proj_weight",
              "transformer.resblocks.0.attn.out_proj.weight", "text_projection"):
        assert n in half


def test_distributed_smoke_reports_shard_cost_and_two_process_scaling(tmp_path):
    out = tmp_path / "dist.json"
    run = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--smoke", "--distributed", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    cost = {(r["classes"], r["world"]): r for r in report["shard_cost"]}
    assert set(cost) == {(20, 1), (20, 2), (50, 1), (50, 2)}
    assert [cost[50, n]["classes_per_rank"] for n in (1, 2)] == [50, 25]
    assert all(_finite(r["ms"]) and r["ms"] > 0 for r in cost.values())
    assert [r["world"] for r in report["scaling"]] == [1, 2]
    assert all(_finite(r["steps_per_s"]) for r in report["scaling"])


def test_json_that_exists_or_cannot_be_written_is_refused_before_the_run(tmp_path):
    kept = tmp_path / "kept.json"
    kept.write_text('{"results": "of an earlier run"}')
    for path, message in ((kept, "exists"), (tmp_path / "no" / "such" / "x.json", "cannot be written")):
        run = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--smoke", "--json", str(path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and message in lines[0], run.stderr
    assert kept.read_text() == '{"results": "of an earlier run"}'


def test_cpu_peak_is_the_most_bytes_held_at_once_inside_and_outside_the_image_encoder():
    class Encoder(nn.Module):
        def forward(self, n):
            scratch = torch.empty(n, dtype=torch.uint8)  # freed on return
            return torch.empty(n // 4, dtype=torch.uint8)
    encoder = Encoder()
    memory.mark_image_encoder(encoder)

    def fn():
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(2 << 20, dtype=torch.uint8)     # 3 MiB held
        del a
        f = encoder(4 << 20)                            # 2 + 4 + 1 MiB held inside, 3 MiB after
        c = torch.empty(1 << 19, dtype=torch.uint8)     # 3.5 MiB
        return len(b) + len(c) + len(f)
    peak, out = memory.cpu_peak_bytes(fn)
    assert peak == {"image": 7 << 20, "text": 7 << 19} and out == (7 << 19)


def test_memory_mode_extrapolates_the_text_depth_to_the_full_depth_peak(monkeypatch):
    """--memory models a step at text depth 1 and 2 and extrapolates: it must predict what the step
    at the full depth (6 text layers, and both image layers) is measured to take, weights included."""
    monkeypatch.setitem(methods.ARCHS, "vit_deep", CLIPConfig(32, 32, 2, 64, 16, 2, 77, 49408, 128, 2, 6))
    args = bench.parse_args(["--device", "cpu", "--memory", "--smoke", "--cases", "coop"])
    settings = args.settings
    assert settings.ours_dtype == settings.official_dtype == torch.bfloat16
    assert all(c.kind == "coop" for c in args.selected)
    device = torch.device("cpu")
    for case in (bench.Case("coop", "coop", "vit_deep", 150, 4, 16, repeats=1),
                 bench.Case("cocoop", "cocoop", "vit_deep", 20, 3, 4, repeats=1)):
        modeled = memory.train_peaks(case, device, settings)
        models = methods.Models("vit_deep", device, settings)
        measured = methods.train_methods(case, models, device, settings, measure=memory.cpu_peak_bytes)
        for name in ("official", "ours"):
            full_gib = (max(measured[name]["record"].values()) + timing.nbytes(getattr(models, name))) / 2 ** 30
            assert modeled[name]["peak_gib"] == pytest.approx(full_gib, rel=0.03), (case.kind, name)
        record = bench.summarise(case, modeled)
        assert record["memory_ratio"] > 1.5                           # 77-token prompts keep far more
        assert record["methods"]["ours"]["vs_fp32"]["ok"] is None      # a model: reported, not checked


def test_memory_mode_is_refused_on_a_gpu_or_with_distributed():
    for extra in (["--device", "cuda"], ["--device", "cpu", "--distributed"]):
        run = subprocess.run([sys.executable, "bench.py", "--memory", *extra], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 2 and "--memory" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_op_cost_counts_flops_bytes_and_ops_by_hand():
    a, b, c = torch.randn(8, 16), torch.randn(16, 4), torch.randn(8, 4)
    record, out = cost.op_cost(lambda: (a @ b + c).t())                # .t() is a view: not an op
    assert torch.allclose(out, (a @ b + c).t())
    assert record["flops"] == 2 * 8 * 16 * 4 and record["ops"] == 2
    assert record["mm_bytes"] == 4 * (8 * 16 + 16 * 4 + 8 * 4)              # reads a and b, writes a @ b
    assert record["other_bytes"] == 4 * 3 * 8 * 4                         # reads a @ b and c, writes the sum


def test_op_cost_counts_quick_gelu_apart_and_the_fused_kernel_in_its_place():
    gelu, x = QuickGELU(), torch.randn(64, dtype=torch.bfloat16, requires_grad=True)
    record, _ = cost.op_cost(lambda: gelu(x).float().sum().backward(), [gelu])
    # forward mul, sigmoid, mul; backward mul, sigmoid, mul, sigmoid_backward, mul_, mul, add_ (clip.QuickGELU)
    assert record["fusable_ops"] == 3 + 7
    assert record["fused_ops"] == 2 and record["fused_bytes"] == 2 * 64 * (2 + 3)  # x and y; x, grad and dx
    assert record["ops"] > record["fusable_ops"]                          # the cast, sum and its backward too


def test_cost_mode_extrapolates_both_depths_to_the_full_model_exactly(monkeypatch):
    monkeypatch.setitem(methods.ARCHS, "vit_deep", CLIPConfig(32, 32, 3, 64, 16, 2, 77, 49408, 64, 2, 4))
    settings = bench.parse_args(["--device", "cpu", "--cost", "--smoke", "--cases", "coop"]).settings
    device = torch.device("cpu")
    for case in (bench.Case("coop", "coop", "vit_deep", 30, 4, 16, repeats=1),
                 bench.Case("zeroshot", "zeroshot", "vit_deep", 10, 4, repeats=1)):
        modeled = cost.step_costs(case, device, settings)
        models = methods.Models("vit_deep", device, settings)               # the full depths: 4 text, 3 image layers
        fusable = [m for m in models.ours.modules() if isinstance(m, (LayerNorm, QuickGELU))]
        measure = lambda step: cost.op_cost(step, fusable)  # noqa: E731
        direct = (methods.zeroshot_methods if case.kind == "zeroshot" else methods.train_methods)(
            case, models, device, settings, measure)
        for name in ("official", "ours"):
            got, want = modeled[name]["record"], direct[name]["record"]
            assert {k: got[k] for k in want} == dict(want), (case.kind, name)
        assert modeled["fused"]["record"]["ops"] < modeled["ours"]["record"]["ops"]
        assert modeled["fused"]["gpu_ms"] < modeled["ours"]["gpu_ms"]


def test_memory_and_cost_modes_run_from_the_command_line(tmp_path):
    for mode, column in (("--memory", "ours GiB"), ("--cost", "GPU ms off")):
        out = tmp_path / f"{mode[2:]}.json"
        run = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--smoke", mode, "--cases",
                              "coop-vit_tiny-c3,zeroshot-vit", "--json", str(out)], cwd=ROOT, capture_output=True,
                             text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0 and column in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
        cases = {r["case"]: r for r in json.loads(out.read_text())["cases"]}
        if mode == "--memory":                                # zero-shot has no memory target: not run
            assert list(cases) == ["coop-vit_tiny-c3"]
            assert all(cases["coop-vit_tiny-c3"]["methods"][m]["peak_gib"] > 0 for m in ("official", "ours"))
        else:
            assert set(cases) == {"coop-vit_tiny-c3", "zeroshot-vit_tiny"}
            for r in cases.values():
                assert r["match"] and all(r["methods"][m]["gpu_ms"] > 0 for m in ("official", "ours", "fused"))
