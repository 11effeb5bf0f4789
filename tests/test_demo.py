"""The offline demo: the procedural world, the benchmark on disk, and the shipped tiny CLIP."""
import importlib.util
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from coop_min import demo
from coop_min.clip import load_clip
from coop_min.prompts import nearest_words
from coop_min.tokenizer import token_string, tokenize
from coop_min.train import TrainConfig, run

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = ROOT / "weights" / "tiny_clip.safetensors"
SCRIPT = ROOT / "weights" / "pretrain_tiny.py"
MEAN, STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])


def _pixels(images):
    """CLIP normalisation written out here, independent of coop_min.transforms: (B, 3, H, W)."""
    x = np.stack([np.asarray(im, np.float64) / 255 for im in images])
    return torch.tensor((x - MEAN) / STD, dtype=torch.float32).permute(0, 3, 1, 2)


def _contrastive_loss(model, images, captions):
    f = F.normalize(model.encode_image(_pixels(images)), dim=-1)
    t = F.normalize(model.encode_text(tokenize(captions)), dim=-1)
    logits = model.logit_scale.exp() * f @ t.t()
    y = torch.arange(len(images))
    return ((F.cross_entropy(logits, y) + F.cross_entropy(logits.t(), y)) / 2).item()


def test_same_seed_same_world_other_seed_other_world():
    a_images, a_captions = demo.caption_corpus(12, seed=5)
    b_images, b_captions = demo.caption_corpus(12, seed=5)
    c_images, c_captions = demo.caption_corpus(12, seed=6)
    assert [im.tobytes() for im in a_images] == [im.tobytes() for im in b_images]
    assert a_captions == b_captions
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in a_images)
    assert sum(a.tobytes() != c.tobytes() for a, c in zip(a_images, c_images)) >= 11
    assert a_captions != c_captions


def test_shape_only_captions_name_the_shape_of_the_same_images():
    images, captions = demo.caption_corpus(50, seed=3)
    shape_images, shapes = demo.caption_corpus(50, seed=3, shape_only=True)
    assert [im.tobytes() for im in images] == [im.tobytes() for im in shape_images]
    assert set(shapes) <= set(demo.SHAPES) and len(set(shapes)) > 4
    for shape, full in zip(shapes, captions):  # the full caption always names the shape, maybe plural
        assert shape in full and not any(other in full for other in set(demo.SHAPES) - {shape}), (shape, full)


def test_captions_fit_the_context_and_name_every_class_word():
    _, captions = demo.caption_corpus(400, seed=0)
    tokens = tokenize(captions)  # raises if a caption is longer than 77 tokens
    assert int(tokens.argmax(1).max()) < 40
    assert len(set(captions)) > 300, "captions should vary"
    words = {w for c in captions for w in c.split()}
    for name in demo.classnames():  # zero-shot needs class words the tiny CLIP was trained on
        assert set(name.split()) <= words, name


def test_base_and_new_halves_hold_every_colour_and_shape():
    names = demo.classnames()
    assert len(names) == len(set(names)) == 36
    for half in (names[:18], names[18:]):
        assert {n.split()[0] for n in half} == set(demo.BENCHMARK_COLOURS)
        assert {n.split()[1] for n in half} == set(demo.BENCHMARK_SHAPES)


def test_benchmark_on_disk_has_the_split_json_layout(tmp_path):
    folder = demo.materialize_demo(tmp_path)
    assert demo.materialize_demo(tmp_path) == folder  # second call reuses the first copy
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left
    split_files = list(folder.glob("split_zhou_*.json"))
    assert [p.name for p in split_files] == ["split_zhou_Demo.json"]
    splits = json.loads(split_files[0].read_text())
    assert sorted(splits) == ["test", "train", "val"]
    names = demo.classnames()
    for split, per_class in (("train", 24), ("val", 8), ("test", 30)):
        rows = splits[split]
        assert all(isinstance(r, list) and len(r) == 3 and isinstance(r[1], int) for r in rows)
        assert {r[1]: r[2] for r in rows} == dict(enumerate(names))
        assert np.bincount([r[1] for r in rows]).tolist() == [per_class] * len(names)
    files = sorted(p.relative_to(folder / "images").as_posix() for p in (folder / "images").rglob("*.png"))
    assert files == sorted(r[0] for rows in splits.values() for r in rows)
    with Image.open(folder / "images" / splits["test"][0][0]) as im:
        assert (im.size, im.mode) == ((32, 32), "RGB")
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total < 12 * 2**20


def test_shipped_tiny_clip_loads_and_is_well_above_chance_zero_shot():
    with safe_open(str(TINY_CLIP), framework="pt") as f:
        meta = f.metadata()
    config, recipe = json.loads(meta["config"]), json.loads(meta["recipe"])
    assert config["vocab_size"] == 49408 and config["context_length"] == 77 and recipe["args"]["steps"] > 0
    assert TINY_CLIP.stat().st_size < 21 * 2**20
    model = load_clip(TINY_CLIP)
    assert model.config.vision_heads == config["vision_heads"]
    assert model.config.text_heads == config["text_heads"]
    items = demo.benchmark_split("test", seed=0, per_class=4)   # 144 images, 36 classes
    labels = torch.tensor([label for _, label, _ in items])
    with torch.no_grad():
        f = F.normalize(model.encode_image(_pixels([im for im, _, _ in items])), dim=-1)
        prompts = [f"a photo of a {n}." for n in demo.classnames()]
        t = F.normalize(model.encode_text(tokenize(prompts)), dim=-1)
    accuracy = (f @ t.t()).argmax(1).eq(labels).float().mean().item()
    assert accuracy > 4 / 36, f"zero-shot accuracy {accuracy:.1%} is not well above chance (2.8%)"


def test_three_pretraining_steps_lower_the_contrastive_loss(tmp_path):
    def run(steps):
        out = tmp_path / f"steps{steps}.safetensors"
        cmd = [sys.executable, str(SCRIPT), "--steps", str(steps), "--shape-steps", "0", "--batch-size", "64",
               "--lr", "3e-4", "--threads", "1", "--eval-per-class", "0", "--output", str(out)]
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=120)
        return load_clip(out)

    before, after = run(0), run(3)
    images, captions = demo.caption_corpus(64, seed="held-out")
    with torch.no_grad():
        assert _contrastive_loss(after, images, captions) < _contrastive_loss(before, images, captions) - 0.02


def test_script_defaults_are_the_recipe_of_the_shipped_weights():
    """`python weights/pretrain_tiny.py` with no flags must rebuild the shipped file: its architecture
    and every training argument (all but --output) equal what the file's metadata records."""
    spec = importlib.util.spec_from_file_location("pretrain_tiny", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with safe_open(str(TINY_CLIP), framework="pt") as f:
        meta = f.metadata()
    recipe_args = json.loads(meta["recipe"])["args"]
    default_args = vars(script.parse_args([]))
    for args in (recipe_args, default_args):
        del args["output"]
    assert default_args == recipe_args
    assert asdict(script.TINY) == json.loads(meta["config"])


def test_coop_with_paper_defaults_beats_zero_shot_on_the_demo_base_classes(e2e_setup, tmp_path):
    """Prompt learning must learn here: CoOp as the paper (16 shots, M=16 random init, 200 epochs),
    seed 1, on the 18 base classes, against zero-shot "a photo of a {}." computed in this test from
    CLIP's own encoders on the in-memory test images (no coop_min data, transform or eval code)."""
    results = run(TrainConfig(data=e2e_setup["data"], subsample="base", seed=1, output=str(tmp_path / "run"),
                              workers=0, print_every=10 ** 9))
    model = load_clip(TINY_CLIP)
    items = [item for item in demo.benchmark_split("test", seed=0) if item[1] < 18]      # 540 images
    labels = torch.tensor([label for _, label, _ in items])
    with torch.no_grad():
        f = F.normalize(model.encode_image(_pixels([im for im, _, _ in items])), dim=-1)
        prompts = [f"a photo of a {n}." for n in demo.classnames()[:18]]
        t = F.normalize(model.encode_text(tokenize(prompts)), dim=-1)
    zero_shot = (f @ t.t()).argmax(1).eq(labels).float().mean().item() * 100
    assert results["zero_shot"]["accuracy"] == pytest.approx(zero_shot, abs=0.4)   # at most 2 of 540 images
    assert results["base"] >= zero_shot + 3, \
        f"CoOp {results['base']:.1f}% vs zero-shot {zero_shot:.1f}% on base"

    with safe_open(str(tmp_path / "run" / "prompt.safetensors"), framework="pt") as f:
        ctx = f.get_tensor("ctx")                                                      # (16, 128)
    init = torch.empty(16, 128).normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    assert (ctx - init).norm() > 0.5 * init.norm(), "the learned context hardly moved from its init"
    ids, _ = nearest_words(ctx, model.token_embedding, 1)
    words = [token_string(i).removesuffix("</w>") for i in ids[:, 0].tolist()]   # 'heart', 'fern', 'selec'
    assert sum(w.isascii() and w.isalpha() for w in words) >= 8, words
