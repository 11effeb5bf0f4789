"""The exact reference of a case: the method itself computed in fp32, once, before its methods run.

Every method of a case (official, ours, buckets, graph, compile; the head's kernels) is checked on
its first output against this (benchmarks/checks.vs_reference): the method as the papers compute it,
prompts.PromptedCLIP (for zero-shot: CLIP's encoders; for the head: the kernel's eager twin), in fp32
on the same device, weights and inputs. Not against the official path: that runs fp16, and at
ImageNet's class counts its context gradient is mostly rounding, so it is a second estimate of the
method, not the method. TF32 is off while the reference runs: cuDNN's convolutions default to it.
"""
import traceback
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from benchmarks.timing import free
from coop_min.kernels.cosine_ce import cosine_ce_reference


@contextmanager
def exact_fp32():
    """fp32 matmuls and convolutions in full fp32 precision, not TF32; the settings restored after."""
    knobs = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    before = [k.fp32_precision for k in knobs]
    for k in knobs:
        k.fp32_precision = "ieee"
    try:
        yield
    finally:
        for k, precision in zip(knobs, before):
            k.fp32_precision = precision


def compute(fn, device):
    """fn() -> {"loss", "grad" (train steps)} in exact fp32: {"dtype": "float32", **fn()}, or with
    {"error": ...} ("OOM" when out of memory) in their place; its memory freed after."""
    free(device)
    try:
        with exact_fp32():
            result = fn()
    except torch.cuda.OutOfMemoryError:
        result = {"error": "OOM"}
    except Exception as e:  # reported as the case's reference error: every method then fails its check
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    free(device)
    return {"dtype": "float32", **result}


def train_step(model, images, labels, per_image=False):
    """A train step's first loss and context gradient: model a PromptedCLIP on an fp32 CLIP, from the
    step's start. per_image (CoCoOp): the loss, a mean over images, is backpropagated one image's share
    at a time: the same gradient (a sum over images) in a B-th of the activation memory."""
    model.train()
    f = model.encode_images(images)                                   # (B, D), no grad
    parts = [slice(i, i + 1) for i in range(len(labels))] if per_image else [slice(None)]
    loss = 0.0
    for part in parts:
        share = model.loss(f[part], labels[part]) * (len(labels[part]) / len(labels))
        share.backward()
        loss += share.item()
    return {"loss": loss, "grad": model.learner.ctx.grad.detach().cpu().clone()}


@torch.no_grad()
def zeroshot(clip, images, tokens, labels):
    """Zero-shot CLIP's loss: the cross-entropy of the scaled cosine logits of images and prompts."""
    f = F.normalize(clip.encode_image(images).float(), dim=-1)
    t = F.normalize(clip.encode_text(tokens).float(), dim=-1)
    return {"loss": F.cross_entropy(clip.logit_scale.float().exp() * f @ t.t(), labels).item()}


def head(f, t, scale, labels):
    """The head's loss: its eager twin on the same (rounded) inputs in fp32."""
    return {"loss": cosine_ce_reference(f.detach().float(), t.detach().float(), scale, labels).item()}
