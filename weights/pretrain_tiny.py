"""Pre-train the tiny CLIP of the offline demo on captioned images of the demo world (coop_min/demo.py).

Same code path as any CLIP (coop_min.clip.CLIP), the real tokenizer (vocabulary 49408, context 77),
OpenAI's recipe at toy scale: the symmetric contrastive loss with a learnable temperature clamped at
100, AdamW (betas 0.9/0.98, eps 1e-6, no decay on gains, biases, embeddings and the temperature),
linear warm-up then cosine decay. Every step draws a fresh batch from the world (seeded by step), so
the model never sees an image twice.

One departure, a two-phase curriculum: for the first --shape-steps steps every caption is the shape's
name alone ("star"), then the full captions. Trained on full captions from the start, the tiny ViT
learns colour, size, style and background within a few hundred steps and then never learns shape in
the CPU budget (measurements in the README's demo section): the easy attributes already separate
most of a batch, and shape never gets its gradient. Captions naming only the shape leave it nothing
else to learn.

Deterministic on one machine: fixed seeds, deterministic algorithms, a fixed thread count. The
result is saved in the OpenAI key layout as fp16 safetensors (load_clip returns fp32) with the
config, the recipe and the zero-shot accuracy in its metadata.

    python weights/pretrain_tiny.py                                # the shipped weights/tiny_clip.safetensors
    python weights/pretrain_tiny.py --steps 3 --batch-size 32 --eval-per-class 0 --output /tmp/t.safetensors
"""
import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from coop_min import demo
from coop_min.clip import CLIP, CLIPConfig
from coop_min.tokenizer import tokenize
from coop_min.transforms import image_transform

TINY = CLIPConfig(embed_dim=128, image_resolution=demo.RESOLUTION, vision_layers=6, vision_width=128,
                  vision_patch_size=8, vision_heads=4, context_length=77, vocab_size=49408,
                  text_width=128, text_heads=4, text_layers=4, quick_gelu=True)
TEMPLATE = "a photo of a {}."
MAX_LOGIT_SCALE = math.log(100)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1800, help="optimiser steps (0 saves the initial weights)")
    p.add_argument("--shape-steps", type=int, default=1000,
                   help="first steps whose captions name only the shape (see the module docstring)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps with a linear warm-up")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    p.add_argument("--eval-per-class", type=int, default=None,
                   help="test images per class for the final zero-shot check (default all 30; 0 skips it)")
    p.add_argument("--output", default=str(Path(__file__).with_name("tiny_clip.safetensors")))
    args = p.parse_args(argv)
    for name in ("steps", "shape_steps", "batch_size", "threads"):
        least = 0 if "steps" in name else 1
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    return args


def lr_at(step, args):
    warmup = int(args.warmup * args.steps)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))


def make_batch(step, args, preprocess):
    """Step's batch: images (B, 3, 32, 32) normalised as CLIP's eval transform, tokens (B, 77)."""
    images, captions = demo.caption_corpus(args.batch_size, seed=f"{args.seed}/{step}",
                                           shape_only=step < args.shape_steps)
    return torch.stack([preprocess(im) for im in images]), tokenize(captions)


def contrastive_loss(model, images, tokens):
    """CLIP's symmetric cross-entropy over the in-batch image-text similarity matrix."""
    f = F.normalize(model.encode_image(images), dim=-1)
    t = F.normalize(model.encode_text(tokens), dim=-1)
    logits = model.logit_scale.exp() * f @ t.t()                             # (B, B)
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def make_optimizer(model, args):
    # as open_clip: decay only matrices, not gains, biases, embeddings or the temperature
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)


@torch.no_grad()
def zero_shot(model, per_class=None, template=TEMPLATE, seed=0):
    """Zero-shot top-1 accuracy (%) on the demo test split: all 36 classes, and base/new halves
    each classified among their own classes (as CoOp's base-to-new protocol)."""
    items = demo.benchmark_split("test", seed, per_class)
    preprocess = image_transform(model.visual.input_resolution)
    images = torch.stack([preprocess(im) for im, _, _ in items])
    labels = torch.tensor([label for _, label, _ in items])
    f = F.normalize(torch.cat([model.encode_image(b) for b in images.split(256)]), dim=-1)
    names = demo.classnames()
    t = F.normalize(model.encode_text(tokenize([template.format(n) for n in names])), dim=-1)
    sims = f @ t.t()                                                          # (N, C)
    half = math.ceil(len(names) / 2)
    result = {"all": (sims.argmax(1) == labels).float().mean().item() * 100}
    for part, cls in (("base", slice(0, half)), ("new", slice(half, None))):
        keep = (labels >= half) if part == "new" else (labels < half)
        pred = sims[keep][:, cls].argmax(1) + cls.start
        result[part] = (pred == labels[keep]).float().mean().item() * 100
    return result


def save(model, path, recipe):
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    sources = b"".join(Path(f).read_bytes() for f in (__file__, demo.__file__))
    metadata = {"config": json.dumps(asdict(model.config)), "recipe": json.dumps(recipe),
                "source_sha256": hashlib.sha256(sources).hexdigest()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)  # atomic: a reader never sees half a file


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    model = CLIP(TINY).float().train().requires_grad_(True)
    optimizer = make_optimizer(model, args)
    preprocess = image_transform(TINY.image_resolution)
    start, losses = time.time(), []
    for step in range(args.steps):
        images, tokens = make_batch(step, args, preprocess)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        loss = contrastive_loss(model, images, tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step, args):.2e}  "
                  f"scale {model.logit_scale.exp().item():6.2f}  {time.time() - start:6.0f}s", flush=True)
    seconds = time.time() - start
    model.eval()
    accuracy = zero_shot(model, args.eval_per_class) if args.eval_per_class != 0 else None
    if accuracy:
        print(f"zero-shot ({TEMPLATE!r}): all {accuracy['all']:.1f}%  base {accuracy['base']:.1f}%  "
              f"new {accuracy['new']:.1f}%  (chance {100 / len(demo.classnames()):.1f}% / "
              f"{100 / math.ceil(len(demo.classnames()) / 2):.1f}%)")
    recipe = {"command": "python weights/pretrain_tiny.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "args": vars(args), "train_seconds": round(seconds, 1), "final_loss": losses[-1] if losses else None,
              "zero_shot_test": accuracy, "template": TEMPLATE, "torch": torch.__version__,
              "numpy": np.__version__, "pillow": PIL.__version__}
    save(model, args.output, recipe)
    print(f"saved {args.output} ({Path(args.output).stat().st_size / 2**20:.1f} MiB) after {seconds:.0f}s of training")


if __name__ == "__main__":
    main()
