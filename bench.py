"""Throughput and memory of CoOp / CoCoOp: an official-equivalent path and ours, side by side.

    python bench.py [--device cuda|cpu] [--cases PREFIX,...] [--json PATH] [--smoke] [--memory | --cost]

One process, one device, the same random-init CLIP weights, inputs, class names and initial context
for both paths:
- official: OpenAI's clip/model.py as vendored by KaiyangZhou/CoOp (sequence-first
  nn.MultiheadAttention blocks with a 77x77 additive -inf causal mask, LayerNorm computed in fp32),
  fp16 weights as OpenAI's convert_weights leaves them, trainers/coop.py and cocoop.py: full 77-token
  prompts for every class, the fp16 context trained by plain SGD, CoCoOp's per-image Python loop,
  the head as normalise / logit_scale.exp() * f @ t.T / F.cross_entropy, and no torch.no_grad
  around the frozen image encoder (its parameters do not require grad).
- ours: coop_min.prompts.PromptedCLIP's fast path on a bf16 CLIP with fp32 LayerNorm, fp32 context
  and Meta-Net, the image encoder under no_grad, EOT truncation, batched CoCoOp, the fused cosine_ce
  head (kernels/cosine_ce.py), on CUDA the fused LayerNorm and QuickGELU kernels in the frozen CLIP
  (kernels/elementwise.py; off with --no-fused-elementwise), and with --shared-prefix the shared
  [SOS, ctx] prefixes.
- graph (CUDA only; off with --no-cuda-graph): for train steps, ours with the whole step -- forward,
  backward, SGD update -- captured once as a CUDA graph and replayed (coop_min/cuda_graph.py, train.py
  --cuda-graph), which removes the launch and Python cost that bounds these steps; with prompts in
  length buckets, as train.py --cuda-graph has them (--length-buckets: in ours' eager steps too). For the head
  cases, "graph" is the fused forward and backward replayed from a CUDA graph: the kernels' own time,
  which is what the bandwidth fraction of a memory-bound kernel should be judged by.
On CPU both paths compute in fp32.

Cases: CoOp train steps (batch 32, M=16) at 10/100/1000 classes for ViT-B/16 and RN50, CoCoOp train
steps (M=4) at 50/500 classes and batch 1/8, zero-shot evaluation (batch 256, 1000 classes), and the
classification head alone (fused kernel vs its eager twin vs torch.compile of the twin, with
achieved GB/s against a measured device-to-device copy). Zero-shot also times ours with the image
encoder under torch.compile instead of our elementwise kernels (unless --no-compile; the compile
itself is not timed): inductor fuses the same LayerNorm casts and QuickGELU, and more. Before
timing, each case checks that both paths compute the same loss on the same inputs (relative 2e-2:
fp16 against bf16) and, for train steps, the same first-step gradient of the context (relative
0.15): at random init the loss sits near log C whatever the prompts, so it alone misses real bugs.
Each method is timed after a warm-up as the median of N steps, each bracketed by CUDA events and a
synchronize (the official trainer syncs every step too: loss.item()). Left out of both paths: the
batch's host-to-device copy and the loops' bookkeeping (Dassl's per-step NaN check and accuracy, two
more syncs in CoOp; our loop's accuracy count and finite check), so the official step measured here
is, if anything, a little faster than the real one. Peak memory is that path alone: its CLIP weights
plus the most it allocated during the case (torch.cuda.max_memory_allocated, reset per method). A
case that runs out of memory reports OOM. The process exits 1 if a check failed.

`--memory` (CPU) models the train cases' peak GPU memory without a GPU and times nothing. Both paths
run in 2-byte dtypes (bf16 stands in for the official fp16: the same bytes, 65x faster on a CPU), the
peak of a step's allocations comes from the profiler's allocation events, measured at text depth 1
and 2 and extrapolated linearly (every text layer keeps the same activations for backward; the image
encoder keeps none), plus the real model's weights. Checked against peaks measured on an H100: within
4% where activations dominate; 0.1-0.3 GiB low at 10 classes, where CUDA's workspaces count (README).

`--cost` (CPU) models the train and zero-shot cases' GPU work and times nothing: one step per path
counted op by op (FLOPs from torch.utils.flop_counter; bytes as every non-view aten op's tensor
arguments and results), text and ViT depth each extrapolated from 1 and 2 layers, in 2-byte dtypes;
"GPU ms" puts matmuls and attention at 400 TFLOPS (or their traffic, if slower) and all other traffic
at 2.8 TB/s, with no launch or host time: roughly what a step replayed from a CUDA graph approaches.
"fused" is ours with kernels/elementwise.py's kernels in place of the ops LayerNorm and QuickGELU
run (their real inputs and outputs, one launch each way). Against session 1's H100 timings where the
GPU was busy (1000 classes, CoCoOp at batch 8, zero-shot) the model is 5-26% low (README).

`--distributed` measures data-parallel CoOp (coop_min/distributed.py) instead of the cases above:
- a per-rank cost model on one device: the text encoder's forward and backward over the 1/N of the
  classes that one of N ranks encodes, at 1k, 10k and 21k classes (ms, peak memory per rank);
- scaling, where there are several GPUs (or `--device cpu`, with gloo): N processes each take
  their part of a global batch of 32 and run whole CoOp train steps (image encoder, sharded text
  encoder, all-gather, fused head, gradient all-reduce, SGD); steps/s for each N.
"""
import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
import traceback
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from coop_min import distributed as dist
from coop_min.clip import CLIP, CLIPConfig, LayerNorm, ModifiedResNet, QuickGELU, convert_dtype
from coop_min.cuda_graph import TrainStep
from coop_min.kernels.cosine_ce import (cosine_ce, cosine_ce_reference, cosine_logits,
                                        use_triton)
from coop_min.prompts import CoCoOpPromptLearner, CoOpPromptLearner, PromptConfig, PromptedCLIP, elementwise_ops
from coop_min.tokenizer import tokenize

TOLERANCE = 2e-2   # relative loss difference allowed between the official fp16 and our bf16 path
# relative difference of the first step's context gradient (see _grad_rel_diff); measured on CPU with a
# 4-layer width-256 CLIP, official fp16 vs ours bf16: 0.026-0.034, and 0.33-0.39 with labels off by one
GRAD_TOLERANCE = 0.15
LR, MOMENTUM, WEIGHT_DECAY = 0.002, 0.9, 5e-4  # Dassl SGD as configured by CoOp/CoCoOp

# ----------------------------------------------------------------------------------------------
# the official-equivalent path: OpenAI clip/model.py (as vendored by CoOp), cut to what CoOp runs


class _LayerNorm(nn.LayerNorm):
    """OpenAI's LayerNorm: computed in fp32 and cast back (its weights stay fp32 in fp16 models)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)      # sequence-first (L, N, W)
        self.ln_1 = _LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", _QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = _LayerNorm(width)
        self.attn_mask = attn_mask                            # a plain attribute, as in OpenAI's code

    def forward(self, x):
        if self.attn_mask is not None:                        # moved once, then cached (as OpenAI)
            self.attn_mask = self.attn_mask.to(dtype=x.dtype, device=x.device)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width, layers, heads, attn_mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[_ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class _VisionTransformer(nn.Module):
    def __init__(self, resolution, patch, width, layers, heads, output_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty((resolution // patch) ** 2 + 1, width))
        self.ln_pre = _LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads)
        self.ln_post = _LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    def forward(self, x):  # (N, 3, H, W) -> (N, D)
        x = self.conv1(x).flatten(2).permute(0, 2, 1)                     # (N, grid**2, width)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype,
                                                             device=x.device)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)   # NLD -> LND -> NLD
        return self.ln_post(x[:, 0, :]) @ self.proj


class _AttentionPool2d(nn.Module):
    """CoOp's vendored version: multi_head_attention_forward over all HW+1 queries, keeps query 0."""

    def __init__(self, spacial_dim, embed_dim, heads, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.empty(spacial_dim ** 2 + 1, embed_dim))
        self.k_proj, self.q_proj = nn.Linear(embed_dim, embed_dim), nn.Linear(embed_dim, embed_dim)
        self.v_proj, self.c_proj = nn.Linear(embed_dim, embed_dim), nn.Linear(embed_dim, output_dim)
        self.num_heads = heads

    def forward(self, x):  # (N, C, H, W) -> (N, D)
        x = x.flatten(2).permute(2, 0, 1)                                   # (HW, N, C)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + self.positional_embedding[:, None].to(x.dtype)
        x, _ = F.multi_head_attention_forward(
            x, x, x, x.shape[-1], self.num_heads, None,
            torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]), None, None, False, 0.0,
            self.c_proj.weight, self.c_proj.bias, training=self.training, need_weights=False,
            use_separate_proj_weight=True, q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight)
        return x[0]


class OfficialCLIP(nn.Module):
    """OpenAI's CLIP module tree (same state-dict keys as coop_min.clip.CLIP). The ResNet trunk is
    coop_min's ModifiedResNet: plain convolutions, BatchNorm and pooling, the same ops as OpenAI's;
    only its attention pooling is swapped for the official one."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        if c.is_vit:
            self.visual = _VisionTransformer(c.image_resolution, c.vision_patch_size, c.vision_width,
                                             c.vision_layers, c.vision_heads, c.embed_dim)
        else:
            self.visual = ModifiedResNet(c.vision_layers, c.embed_dim, c.vision_heads, c.image_resolution,
                                         c.vision_width)
            self.visual.attnpool = _AttentionPool2d(c.image_resolution // 32, c.vision_width * 32,
                                                    c.vision_heads, c.embed_dim)
        L = c.context_length
        mask = torch.full((L, L), float("-inf"), device="cpu").triu_(1)   # additive causal mask
        self.transformer = _Transformer(c.text_width, c.text_layers, c.text_heads, mask)
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(L, c.text_width))
        self.ln_final = _LayerNorm(c.text_width)
        self.text_projection = nn.Parameter(torch.empty(c.text_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype


def _convert_weights(model, dtype=torch.float16):
    """OpenAI's convert_weights: conv, linear and attention weights and the two projections to fp16;
    embeddings, LayerNorm, BatchNorm and logit_scale stay fp32. (bf16: --memory's stand-in for fp16.)"""
    for m in model.modules():
        names = []
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            names = ["weight", "bias"]
        elif isinstance(m, nn.MultiheadAttention):
            names = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                     "bias_k", "bias_v"]
        for name in names + ["text_projection", "proj"]:
            p = getattr(m, name, None)
            if isinstance(p, torch.Tensor):
                p.data = p.data.to(dtype)


def build_official_clip(state_dict, config: CLIPConfig, dtype, device) -> OfficialCLIP:
    """The official CLIP from a state dict in OpenAI's layout: fp32, or fp16 as OpenAI converts it
    (or bf16 the same way: --memory measures on the CPU, where fp16 is 65x slower, the same bytes)."""
    with torch.device("meta"):                                # no random init: every tensor is loaded
        model = OfficialCLIP(config)
    model.load_state_dict({k: v.to(device, copy=True) for k, v in state_dict.items()}, assign=True)
    if dtype in (torch.float16, torch.bfloat16):
        _convert_weights(model, dtype)
    elif dtype != torch.float32:
        raise ValueError(f"the official path runs fp16 or fp32, got {dtype}")
    return model.eval().requires_grad_(False)


def official_encode_text(clip: OfficialCLIP, prompts, tokenized_prompts):
    """CoOp's TextEncoder.forward: prompt embeddings (N, 77, W), token ids (N, 77) -> (N, D)."""
    x = prompts + clip.positional_embedding.type(clip.dtype)
    x = clip.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)            # NLD -> LND -> NLD
    x = clip.ln_final(x).type(clip.dtype)
    return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ clip.text_projection


class _OfficialPromptLearner(nn.Module):
    """trainers/coop.py PromptLearner (unified context, class token at the end), plus CoCoOp's
    Meta-Net; the context is a Parameter in the CLIP dtype (fp16: no master weights)."""

    def __init__(self, clip: OfficialCLIP, classnames, ctx, meta_net=None):
        super().__init__()
        n_ctx, dtype, device = ctx.shape[0], clip.dtype, clip.positional_embedding.device
        prompts = [" ".join(["X"] * n_ctx) + " " + name.replace("_", " ") + "." for name in classnames]
        self.tokenized_prompts = tokenize(prompts)   # (C, 77); a plain attribute, so it stays on the CPU
        with torch.no_grad():
            embedding = clip.token_embedding(self.tokenized_prompts.to(device)).type(dtype)
        self.register_buffer("token_prefix", embedding[:, :1, :])          # SOS
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:, :])  # name, ".", EOT, padding
        self.ctx = nn.Parameter(ctx.detach().to(device, dtype, copy=True))
        self.meta_net = None if meta_net is None else meta_net.to(device, dtype)

    def forward(self, ctx=None):  # -> (C, 77, W)
        ctx = self.ctx if ctx is None else ctx
        ctx = ctx.unsqueeze(0).expand(len(self.token_prefix), -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)


def _official_coop_loss(clip, learner, images, labels):  # CustomCLIP.forward + F.cross_entropy
    image_features = clip.visual(images.type(clip.dtype))
    text_features = official_encode_text(clip, learner(), learner.tokenized_prompts)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    logits = clip.logit_scale.exp() * image_features @ text_features.t()
    return F.cross_entropy(logits, labels)


def _official_cocoop_loss(clip, learner, images, labels):  # cocoop.py CustomCLIP.forward
    image_features = clip.visual(images.type(clip.dtype))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    ctx_shifted = learner.ctx.unsqueeze(0) + learner.meta_net(image_features).unsqueeze(1)  # (B, M, W)
    prompts = torch.stack([learner(ctx_i) for ctx_i in ctx_shifted])     # (B, C, 77, W)
    logits = []
    for pts_i, imf_i in zip(prompts, image_features):                    # one image at a time
        text_features = official_encode_text(clip, pts_i, learner.tokenized_prompts)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        logits.append(clip.logit_scale.exp() * imf_i @ text_features.t())
    return F.cross_entropy(torch.stack(logits), labels)


def _meta_net(vis_dim, ctx_dim):
    return nn.Sequential(OrderedDict([("linear1", nn.Linear(vis_dim, vis_dim // 16)), ("relu", nn.ReLU(inplace=True)),
                                      ("linear2", nn.Linear(vis_dim // 16, ctx_dim))]))


# ----------------------------------------------------------------------------------------------
# cases

_VIT_B16 = CLIPConfig(512, 224, 12, 768, 16, 12, 77, 49408, 512, 8, 12)
_RN50 = CLIPConfig(1024, 224, (3, 4, 6, 3), 64, None, 32, 77, 49408, 512, 8, 12)
_VIT_TINY = CLIPConfig(32, 32, 2, 64, 16, 2, 77, 49408, 64, 2, 2)
_RN_TINY = CLIPConfig(32, 64, (1, 1, 1, 1), 8, None, 2, 77, 49408, 64, 2, 2)
ARCHS = {"vit_b16": _VIT_B16, "rn50": _RN50, "vit_tiny": _VIT_TINY, "rn_tiny": _RN_TINY}
_WORDS = ("cat dog bird fish horse car truck plane ship red blue green black white small large old young wild "
          "house tree flower rose tulip lake river mountain beach forest desert road bridge tower castle church "
          "train bus boat bike apple orange banana lemon bread cake pizza coffee tea chair table lamp clock phone "
          "book").split()  # one BPE token each


@dataclass
class Case:
    name: str
    kind: str               # coop | cocoop | zeroshot | head
    arch: str = ""          # a key of ARCHS (not for head)
    classes: int = 0
    batch: int = 0
    n_ctx: int = 0
    dim: int = 0            # head: feature width D
    per_image: bool = False  # head: CoCoOp's (B, C, D) text features
    repeats: int = 10


def all_cases(smoke=False):
    """Training and evaluation cases grouped by architecture (each is built once), then the head."""
    vit, rn = ("vit_tiny", "rn_tiny") if smoke else ("vit_b16", "rn50")
    coop_classes, cocoop_classes, cocoop_batches = ((3, 5, 8), (4, 6), (1, 2)) if smoke else \
        ((10, 100, 1000), (50, 500), (1, 8))
    reps = (lambda n: 2) if smoke else (lambda n: n)
    cases = []
    for arch in (vit, rn):
        cases += [Case(f"coop-{arch}-c{C}", "coop", arch, C, 4 if smoke else 32, 16,
                       repeats=reps(5 if C >= 1000 else 10)) for C in coop_classes]
        if arch == vit:
            cases += [Case(f"cocoop-{arch}-c{C}-b{B}", "cocoop", arch, C, B, 4, repeats=reps(3 if B * C >= 4000 else 5))
                      for C in cocoop_classes for B in cocoop_batches]
        cases.append(Case(f"zeroshot-{arch}", "zeroshot", arch, 10 if smoke else 1000, 4 if smoke else 256,
                          repeats=reps(10)))
    heads = [(4, 10, 32, False), (2, 6, 32, True), (4, 12, 32, True)] if smoke else \
        [(32, 1000, 512, False), (8, 500, 512, True), (32, 1000, 512, True)]   # the last: bandwidth-bound
    cases += [Case(f"head-{'cocoop' if p else 'coop'}-b{B}-c{C}-d{D}", "head", classes=C, batch=B, dim=D,
                   per_image=p, repeats=reps(50)) for B, C, D, p in heads]
    return cases


def _classnames(n, seed=0):
    """n real-looking class names of 1-6 tokens each."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 6))) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# measuring


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(step, device, warmup, repeats):
    """Median milliseconds of `step` over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _nbytes(module):
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _run(make_step, device, warmup, repeats, weight_bytes=0, to_loss=None, measure=None):
    """Build one method's state with make_step() -> step, check its first output, time it.

    Returns {"ms", "peak_gib", "loss"}, or {"error": "OOM"}. The first call is also the first
    warm-up step; its output (a loss, or logits turned into one by to_loss) is the check value.
    measure (CPU, --memory and --cost): no timing; measure(step) -> (record, output) makes the first
    call, and its record is returned as "record" (_cpu_peak_bytes, _op_cost).
    """
    _free(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    try:
        step = make_step()
        if measure is not None:
            record, out = measure(step)
            grad = {"grad": step.ctx.grad.detach().float().clone()} if hasattr(step, "ctx") else {}
            return {"record": record, "loss": float(to_loss(out) if to_loss else out), **grad}
        out = step()
        loss = float(to_loss(out) if to_loss else out)
        grad = step.ctx.grad.detach().float().cpu().clone() if hasattr(step, "ctx") else None  # train steps
        del out
        ms = _time_ms(step, device, max(warmup - 1, 0), repeats)
    except torch.cuda.OutOfMemoryError:
        return {"error": "OOM"}
    except Exception as e:  # one broken method must not lose the other cases of a long run
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}
    peak = (torch.cuda.max_memory_allocated(device) - base + weight_bytes) / 2 ** 30 if cuda else None
    return {"ms": ms, "peak_gib": peak, "loss": loss, **({} if grad is None else {"grad": grad})}


_IMAGE_RANGE = "bench: image encoder"


def _cpu_peak_bytes(fn):
    """({"image": most bytes held at once inside the image encoder (see _mark_image_encoder), "text":
    most held elsewhere}, fn's output): a running sum over the allocation and free events that the
    profiler records with profile_memory (kineto's events: no public API gives them in order).
    Kernel-internal buffers count too, as they do in CUDA's peak."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = prof.profiler.kineto_results.events()
    image = [(e.start_ns(), e.end_ns()) for e in events if e.name() == _IMAGE_RANGE]
    held, peak = 0, {"image": 0, "text": 0}
    for t, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        held += nbytes
        phase = "image" if any(start <= t <= end for start, end in image) else "text"
        peak[phase] = max(peak[phase], held)
    return peak, out


def _mark_image_encoder(module):
    """Bracket module's forwards with a profiler range, so that _cpu_peak_bytes can tell the frozen image
    encoder's transient peak (the same at any depth) from the text side's (linear in the text depth)."""
    ranges = []
    module.register_forward_pre_hook(lambda m, a: ranges.append(torch.profiler.record_function(_IMAGE_RANGE).__enter__()))
    module.register_forward_hook(lambda m, a, out: ranges.pop().__exit__(None, None, None))


def _sgd_step(loss_fn, params):
    """One training step as the official trainer does it: forward, zero_grad, backward, SGD step."""
    optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step():
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


class _Models:
    """One architecture's frozen CLIP in both forms, built once from one random-init state dict;
    text_layers (--memory, --cost): that text depth and vision_layers ViT layers instead."""

    def __init__(self, arch, device, args, text_layers=None, vision_layers=1):
        self.arch, self.config = arch, ARCHS[arch]
        if text_layers is not None:
            self.config = _shallow(self.config, text_layers, vision_layers)
        torch.manual_seed(0)
        clip = CLIP(self.config).eval().requires_grad_(False)            # fp32, CPU, OpenAI's init
        self.official = build_official_clip(clip.state_dict(), self.config, args.official_dtype, device)
        self.ours = convert_dtype(clip.to(device), args.ours_dtype)     # LayerNorm stays fp32
        self.official_bytes, self.ours_bytes = _nbytes(self.official), _nbytes(self.ours)


def _train_case(case, models, device, args, measure=None):
    """CoOp or CoCoOp: one SGD step per call, from the same context (and Meta-Net) for both paths."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)                                      # the Meta-Net's default init
    c = models.config
    images = torch.randn(case.batch, 3, c.image_resolution, c.image_resolution, generator=g).to(device)
    labels = torch.randint(0, case.classes, (case.batch,), generator=g).to(device)
    names = _classnames(case.classes)
    ctx = (torch.randn(case.n_ctx, c.text_width, generator=g) * 0.02).to(device)   # N(0, 0.02), fp32
    cocoop = case.kind == "cocoop"
    meta_state = _meta_net(c.embed_dim, c.text_width).state_dict() if cocoop else None

    def official():
        meta = None
        if cocoop:
            meta = _meta_net(c.embed_dim, c.text_width)
            meta.load_state_dict(meta_state)
        learner = _OfficialPromptLearner(models.official, names, ctx, meta)
        loss = _official_cocoop_loss if cocoop else _official_coop_loss
        step = _sgd_step(lambda: loss(models.official, learner, images, labels), list(learner.parameters()))
        step.ctx = learner.ctx
        return step

    def ours(cuda_graph=False):
        config = PromptConfig(method=case.kind, n_ctx=case.n_ctx, ctx_init="")
        learner = (CoCoOpPromptLearner if cocoop else CoOpPromptLearner)(models.ours, names, config)
        with torch.no_grad():
            learner.ctx.copy_(ctx)
        if cocoop:
            learner.meta_net.load_state_dict(meta_state)
        model = PromptedCLIP(models.ours, learner, shared_prefix=args.shared_prefix, fused_elementwise=args.fused_elementwise,
                             length_buckets=args.length_buckets or cuda_graph).train()   # as train.py --cuda-graph
        if not cuda_graph:
            step = _sgd_step(lambda: model.loss(images, labels), model.trainable_parameters())
        else:
            optimizer = torch.optim.SGD(model.trainable_parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
            graphed = TrainStep(lambda x, y: (model.loss(x, y),), optimizer, cuda_graph=True)  # 2 eager warm-ups

            def step():
                return graphed(images, labels)[0]
        step.ctx = learner.ctx
        return step

    methods = {"official": _run(official, device, args.warmup, case.repeats, models.official_bytes, measure=measure),
               "ours": _run(ours, device, args.warmup, case.repeats, models.ours_bytes, measure=measure)}
    if args.cuda_graph:
        methods["graph"] = _run(lambda: ours(cuda_graph=True), device, max(args.warmup, 3), case.repeats,
                                models.ours_bytes)
    return methods


def _shallow(config, text_layers, vision_layers=1):
    """The same CLIP with text_layers text layers and, for a ViT, vision_layers image layers."""
    vision = vision_layers if config.is_vit else config.vision_layers
    return replace(config, text_layers=text_layers, vision_layers=vision)


def _memory_case(case, device, args):
    """--memory: the train case's peak GPU memory per path, modelled on the CPU in the same 2-byte
    dtypes. Every text layer keeps the same activations for backward, so the step's own peak is
    linear in the text depth: measured at depths 1 and 2, extrapolated to the real one. The frozen
    image encoder keeps nothing (no grad), so one ViT layer shows its transient peak, which the step's
    peak is when it is larger. Plus the real model's weights. The checks run at depth 2."""
    full = ARCHS[case.arch]
    runs = []
    for depth in (1, 2):
        models = _Models(case.arch, device, args, text_layers=depth)
        _mark_image_encoder(models.official.visual)
        _mark_image_encoder(models.ours.visual)
        runs.append(_train_case(case, models, device, args, measure=_cpu_peak_bytes))
    with torch.device("meta"):                                 # the real model's weight bytes, allocating nothing
        clip = CLIP(full)
        weights = {"official": _nbytes(build_official_clip(clip.state_dict(), full, args.official_dtype, "meta")),
                   "ours": _nbytes(convert_dtype(clip, args.ours_dtype))}
    methods = {}
    for name, (one, two) in zip(runs[1], zip(runs[0].values(), runs[1].values())):
        if "error" in one or "error" in two:
            methods[name] = one if "error" in one else two
            continue
        (a, b), image = ((one["record"]["text"], two["record"]["text"]), two["record"]["image"])
        step = max(image, a + (full.text_layers - 1) * (b - a))
        methods[name] = {"peak_gib": (weights[name] + step) / 2 ** 30, "loss": two["loss"], "grad": two["grad"]}
    return methods


# --cost: a model of a step's GPU work from its aten ops, counted on the CPU

GPU_TFLOPS, GPU_TBPS = 400, 2.8     # what dense bf16 matmuls and memory traffic reach on an H100 SXM
_MATMULS = ("mm", "addmm", "bmm", "baddbmm", "conv", "_convolution", "linear", "matmul", "_scaled_dot_product",
            "scaled_dot_product", "_native_multi_head_attention")  # name prefixes; inference_mode keeps linear, sdpa whole
_VIEWS = {"view", "_unsafe_view", "expand", "permute", "transpose", "t", "slice", "select", "unsqueeze", "squeeze",
          "as_strided", "detach", "alias", "split", "split_with_sizes", "unbind", "reshape", "lift_fresh", "empty",
          "empty_like", "new_empty", "new_empty_strided", "empty_strided"}
_FUSABLE_BACKWARDS = ("_LayerNormFP32Backward", "_QuickGELUFnBackward")
_COUNTS = ("ops", "mm_bytes", "other_bytes", "fusable_ops", "fusable_bytes", "fused_ops", "fused_bytes")


class _OpCost(TorchDispatchMode):
    """Counts one call's aten ops that are not views: how many, the bytes of their tensor arguments
    and results (what they read and write), matmuls and attention apart; and separately what our
    CLIP's LayerNorm and QuickGELU modules run, forward (inside the modules) and backward (in their
    autograd nodes), so that kernels/elementwise.py's kernels can stand in for them (see _cost_case)."""

    def __init__(self):
        super().__init__()
        self.count, self.inside = Counter(), 0

    def _enter(self, module, inputs):
        self.inside += 1

    def _leave(self, module, inputs, out):
        # the fused kernel: read x, write y (4 or 6 bytes per element with 16-bit x), one launch; and
        # if a gradient flows, read x and the gradient, write dx, one launch
        self.inside -= 1
        x = inputs[0]
        self.count["fused_bytes"] += x.nbytes + out.nbytes
        self.count["fused_ops"] += 1
        if torch.is_grad_enabled() and x.requires_grad:
            self.count["fused_bytes"] += 3 * x.nbytes
            self.count["fused_ops"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name.rstrip("_") in _VIEWS:
            return out
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor) and t.numel() > 1]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self.count["ops"] += 1
        self.count["mm_bytes" if name.startswith(_MATMULS) else "other_bytes"] += nbytes
        node = torch._C._current_autograd_node()
        if self.inside or (node is not None and node.name() in _FUSABLE_BACKWARDS):
            self.count["fusable_ops"] += 1
            self.count["fusable_bytes"] += nbytes
        return out


def _op_cost(fn, modules=()):
    """({"flops", "ops", "mm_bytes", "other_bytes", "fusable_*", "fused_*"}, fn's output); modules:
    the LayerNorm and QuickGELU modules to count apart."""
    flops, counter = FlopCounterMode(display=False), _OpCost()
    hooks = [h for m in modules for h in (m.register_forward_pre_hook(counter._enter),
                                          m.register_forward_hook(counter._leave))]
    try:
        with flops, counter:
            out = fn()
    finally:
        for h in hooks:
            h.remove()
    return {"flops": flops.get_total_flops(), **{k: counter.count[k] for k in _COUNTS}}, out


def _gpu_ms(flops, mm_bytes, other_bytes):
    """Matmuls at the FLOP rate (or their traffic, if that takes longer), everything else at the bandwidth."""
    return 1e3 * (max(flops / (GPU_TFLOPS * 1e12), mm_bytes / (GPU_TBPS * 1e12)) + other_bytes / (GPU_TBPS * 1e12))


def _cost_case(case, device, args):
    """--cost: each path's step counted at text depth 1 and 2 and ViT depth 1 and 2, every count
    extrapolated linearly to the real depths; "gpu_ms" from _gpu_ms, no launch or host time. Ours is
    counted with PyTorch's LayerNorm and QuickGELU, and "fused" is ours with kernels/elementwise.py's
    kernels in their place (their ops and bytes replaced by one kernel each way). The loss and
    gradient checks run at the first depths."""
    full = ARCHS[case.arch]
    depths = [(1, 1), (2, 1)] + ([(1, 2)] if full.is_vit else [])
    runs = []
    for text, vision in depths:
        models = _Models(case.arch, device, args, text_layers=text, vision_layers=vision)
        fusable = [m for m in models.ours.modules() if isinstance(m, (LayerNorm, QuickGELU))]
        measure = lambda step, fusable=fusable: _op_cost(step, fusable)  # noqa: E731  (the official path runs none)
        runs.append((_zeroshot_case if case.kind == "zeroshot" else _train_case)(case, models, device, args, measure))
    methods = {}
    for name in runs[0]:
        if any("error" in r[name] for r in runs):
            methods[name] = next(r[name] for r in runs if "error" in r[name])
            continue
        base, deeper = runs[0][name]["record"], [r[name]["record"] for r in runs[1:]]
        layers = (full.text_layers, full.vision_layers)
        c = {k: base[k] + sum((n - 1) * (d[k] - base[k]) for n, d in zip(layers, deeper)) for k in base}
        methods[name] = {**runs[0][name], "record": c, "gpu_ms": _gpu_ms(c["flops"], c["mm_bytes"], c["other_bytes"])}
        if name == "ours":
            other = c["other_bytes"] - c["fusable_bytes"] + c["fused_bytes"]
            methods["fused"] = {"record": {"ops": c["ops"] - c["fusable_ops"] + c["fused_ops"], "other_bytes": other},
                                "gpu_ms": _gpu_ms(c["flops"], c["mm_bytes"], other)}
    return methods


def _zeroshot_case(case, models, device, args, measure=None):
    """Evaluation: frozen image encoder at batch B and a classifier of precomputed text features."""
    g = torch.Generator().manual_seed(2)
    r = models.config.image_resolution
    images = torch.randn(case.batch, 3, r, r, generator=g).to(device)
    labels = torch.randint(0, case.classes, (case.batch,), generator=g).to(device)
    tokens = tokenize([f"a photo of a {n}." for n in _classnames(case.classes)]).to(device)
    to_loss = lambda logits: F.cross_entropy(logits.float(), labels)  # noqa: E731

    def official():  # ZeroshotCLIP: fp16 CLIP, normalised text features computed once
        clip = models.official
        with torch.no_grad():
            t = official_encode_text(clip, clip.token_embedding(tokens).type(clip.dtype), tokens)
            t = t / t.norm(dim=-1, keepdim=True)

        @torch.no_grad()
        def step():
            f = clip.visual(images.type(clip.dtype))
            f = f / f.norm(dim=-1, keepdim=True)
            return clip.logit_scale.exp() * f @ t.t()
        return step

    def ours(visual=None):
        clip = models.ours
        ops = elementwise_ops(images) if args.fused_elementwise and visual is None else None
        encode = (lambda x: clip.encode_image(x, ops=ops)) if visual is None else (lambda x: visual(x.to(clip.dtype)))
        with torch.no_grad():
            t, scale = clip.encode_text(tokens), clip.logit_scale.float().exp()

        @torch.inference_mode()
        def step():
            return cosine_logits(encode(images), t, scale)
        return step

    methods = {"official": _run(official, device, args.warmup, case.repeats, models.official_bytes, to_loss, measure),
               "ours": _run(ours, device, args.warmup, case.repeats, models.ours_bytes, to_loss, measure)}
    if not args.no_compile and measure is None:   # does fusing LayerNorm's casts and QuickGELU's 3 kernels pay? (compile untimed)
        methods["compile"] = _run(lambda: ours(torch.compile(models.ours.visual, dynamic=False)), device,
                                  args.warmup, case.repeats, models.ours_bytes, to_loss)
    return methods


def _head_case(case, device, args):
    """The head alone, forward and backward: fused kernel, its eager twin, torch.compile of the twin."""
    g = torch.Generator().manual_seed(3)
    B, C, D = case.batch, case.classes, case.dim
    f = torch.randn(B, D, generator=g).to(device, args.ours_dtype).requires_grad_()
    t = torch.randn(*((B,) if case.per_image else ()), C, D, generator=g).to(device, args.ours_dtype)
    t.requires_grad_()
    scale, labels = torch.tensor(100.0, device=device), torch.randint(0, C, (B,), generator=g).to(device)
    methods = {"fused": cosine_ce, "eager": cosine_ce_reference}
    if not args.no_compile:
        methods["compile"] = torch.compile(cosine_ce_reference, dynamic=False)

    def make(fn):
        def step():
            loss = fn(f, t, scale, labels)
            torch.autograd.grad(loss, (f, t))
            return loss.detach()
        return lambda: step

    out = {name: _run(make(fn), device, args.warmup, case.repeats) for name, fn in methods.items()}
    if args.cuda_graph and device.type == "cuda":   # the kernels' own time: no Python, launch or sync gaps
        out["graph"] = _run(lambda: _graphed(make(cosine_ce)()), device, args.warmup, case.repeats)
    moved = 2 * (f.numel() + t.numel()) * f.element_size()   # f, t read once; df, dt written once
    for r in out.values():
        if "ms" in r:
            r["gbps"] = moved / (r["ms"] * 1e-3) / 1e9
            r["bandwidth_fraction"] = r["gbps"] / args.copy_gbps
    return out


def _graphed(step):
    """step() captured once as a CUDA graph after a warm-up call on a side stream; returns replay()."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = step()

    def replay():
        graph.replay()
        return out
    return replay


def _copy_gbps(device):
    """The device's memory bandwidth ceiling: a large device-to-device copy (read + write)."""
    n = (256 if device.type == "cuda" else 16) * 2 ** 20
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * n / (_time_ms(lambda: y.copy_(x), device, 3, 20) * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------
# --distributed: data-parallel CoOp


def _coop_model(clip, classes, device):
    learner = CoOpPromptLearner(clip, _classnames(classes), PromptConfig(method="coop", n_ctx=16, ctx_init=""))
    return PromptedCLIP(clip, learner.to(device)).train()


def _shard_cost(args, device):
    """Per-rank cost of the sharded text encoder on one device: rank 0 of N encodes ceil(C / N) classes."""
    config = ARCHS["vit_tiny" if args.smoke else "vit_b16"]
    torch.manual_seed(0)
    clip = convert_dtype(CLIP(config).eval().requires_grad_(False).to(device), args.ours_dtype)
    rows = []
    for C in ((20, 50) if args.smoke else (1000, 10000, 21000)):
        model = _coop_model(clip, C, device)
        for N in ((1, 2) if args.smoke else (1, 2, 4, 8)):
            shard = torch.arange(dist.part_sizes(C, dist.World(0, N))[0], device=device)
            model.class_shard = (shard, lambda t: t)                     # one rank alone: no gather
            step = _sgd_step(lambda: model.text_features().float().square().mean(), model.trainable_parameters())
            r = _run(lambda: step, device, args.warmup, args.repeats or (2 if args.smoke else 5), _nbytes(clip))
            rows.append({"classes": C, "world": N, "classes_per_rank": len(shard), **r})
            print(f"    text encoder, {C} classes, rank of {N}: {_fmt(r.get('ms'), '.1f')} ms, "
                  f"{_fmt(r.get('peak_gib'), '.2f')} GiB{' ' + r['error'] if 'error' in r else ''}", flush=True)
        model = None
        _free(device)
    return rows


def _scaling_worker(rank, world_size, port, args, out):
    """One rank of a data-parallel CoOp run: the same steps as coop_min.train, timed on rank 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    world, dev = dist.setup(args.device)
    device = torch.device(dev)
    torch.manual_seed(0)
    config = ARCHS["vit_tiny" if args.smoke else "vit_b16"]
    clip = convert_dtype(CLIP(config).eval().requires_grad_(False).to(device), args.ours_dtype)
    model = _coop_model(clip, args.scaling_classes, device)
    model.class_shard = dist.class_shard(model.learner.n_cls, world, device)
    g = torch.Generator().manual_seed(1)
    B = 32
    images = torch.randn(B, 3, config.image_resolution, config.image_resolution, generator=g).to(device)
    labels = torch.randint(0, args.scaling_classes, (B,), generator=g).to(device)
    lo_b, hi_b = dist.split(B, world)
    params = model.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    train_step = TrainStep(lambda: (model.loss(images[lo_b:hi_b], labels[lo_b:hi_b]) * ((hi_b - lo_b) / B),),
                           optimizer, after_backward=lambda: dist.all_reduce_grads(params))

    def step():
        train_step()
        dist.barrier(world)                                              # a step ends when every rank's ends
    ms = _time_ms(step, device, args.warmup, args.repeats or (3 if args.smoke else 20))
    if world.main:
        with open(out, "w") as f:
            json.dump({"world": world_size, "ms": ms}, f)
    dist.end_rank()                  # as coop_min.train: gloo's teardown has aborted finished ranks


def _scaling(args, device):
    """Steps/s of data-parallel CoOp for N = 1, 2, 4, 8 processes (as many as there are GPUs)."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    available = torch.cuda.device_count() if device.type == "cuda" else 2
    worlds = [n for n in (1, 2, 4, 8) if n <= available]
    if len(worlds) < 2:
        print("    one GPU: no scaling to measure (the cost model above is the per-rank estimate)", flush=True)
        return []
    args.scaling_classes = 50 if args.smoke else 1000
    rows = []
    for n in worlds:
        with socket.socket() as s, tempfile.TemporaryDirectory() as tmp:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            out = os.path.join(tmp, "rank0.json")
            mp.start_processes(_scaling_worker, args=(n, port, args, out), nprocs=n, start_method="spawn")
            with open(out) as f:
                r = json.load(f)
        r.update(classes=args.scaling_classes, global_batch=32, steps_per_s=1e3 / r["ms"])
        r["speedup"] = rows[0]["ms"] / r["ms"] if rows else 1.0
        rows.append(r)
        print(f"    {n} process{'es' if n > 1 else ''}: {r['ms']:.1f} ms/step, {r['steps_per_s']:.2f} steps/s, "
              f"{r['speedup']:.2f}x", flush=True)
    return rows


def _distributed(args, device, env):
    print("per-rank cost of the sharded CoOp text encoder (forward + backward, one device):", flush=True)
    report = {"environment": env, "shard_cost": _shard_cost(args, device)}
    print(f"data-parallel CoOp train steps ({'gloo' if device.type == 'cpu' else 'nccl'}):", flush=True)
    report["scaling"] = _scaling(args, device)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    failed = [r for r in report["shard_cost"] if r.get("error", "OOM") != "OOM"]
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# reporting


def _summarise(case, methods):
    """The case's JSON record: its sizes, each method's numbers, ratios and the same-function check."""
    res = {"case": case.name, **{k: v for k, v in asdict(case).items() if k != "name"}, "methods": methods}
    ms = {name: r.get("ms") for name, r in methods.items()}
    if case.kind == "head":
        base, new = methods["eager"], methods["fused"]
        res["speedup_vs_eager"] = _ratio(ms["eager"], ms["fused"])
        res["speedup_vs_compile"] = _ratio(ms.get("compile"), ms["fused"])
    else:
        base, new = methods["official"], methods["ours"]
        res["speedup"] = _ratio(ms["official"], ms["ours"])
        for third in ("graph", "compile"):
            if third in methods:
                res[f"speedup_{third}"] = _ratio(ms["official"], ms[third])
                res[f"memory_ratio_{third}"] = _ratio(base.get("peak_gib"), methods[third].get("peak_gib"))
        res["memory_ratio"] = _ratio(base.get("peak_gib"), new.get("peak_gib"))
        for r in methods.values():
            if "ms" in r:
                r["images_per_s"] = case.batch / (r["ms"] * 1e-3)
    if "loss" in base and "loss" in new:
        res["loss_rel_diff"] = abs(new["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-12)
        res["match"] = res["loss_rel_diff"] <= TOLERANCE
    grads = {name: r.pop("grad") for name, r in methods.items() if "grad" in r}   # tensors stay out of the JSON
    if "official" in grads and "ours" in grads:
        res["grad_rel_diff"] = _grad_rel_diff(grads["ours"], grads["official"])
        res["match"] = res.get("match", True) and res["grad_rel_diff"] <= GRAD_TOLERANCE
    return res


def _grad_rel_diff(g, ref):
    """|g - ref| / |ref| for the first step's context gradient. At random init every image looks alike
    to CLIP and the loss sits near log C, so the loss alone misses real bugs (a wrong EOT row, no
    causal mask, shuffled labels); the gradient carries the class-dependent signal they change."""
    return float((g - ref).norm() / ref.norm().clamp_min(1e-30))


def _ratio(num, den):
    return num / den if num is not None and den else None


def _fmt(x, spec=".1f", suffix=""):
    return "-" if x is None else format(x, spec) + suffix


def _table_kind(r):
    return "head" if r["kind"] == "head" else "cost" if "gpu_ms" in r["methods"].get("ours", {}) else "train"


def _row(r):
    """One table row; a method that failed shows OOM or error in its columns."""
    def get(method, key, spec, suffix=""):
        m = r["methods"].get(method, {})
        return _fmt(m.get(key), spec, suffix) if "error" not in m else "OOM" if m["error"] == "OOM" else "error"
    diff = _fmt(r.get("loss_rel_diff"), ".1e") + ("" if "grad_rel_diff" not in r else f" / {r['grad_rel_diff']:.1e}") \
        + ("" if r.get("match", True) else " FAIL")
    if _table_kind(r) == "cost":
        rec = {m: r["methods"][m].get("record", {}) for m in ("official", "ours", "fused")}
        gb = lambda m, k: _fmt(rec[m].get(k, 0) / 1e9, ".1f")  # noqa: E731
        return (r["case"], _fmt(rec["official"].get("flops", 0) / 1e12, ".2f"), _fmt(rec["ours"].get("flops", 0) / 1e12, ".2f"),
                f"{gb('official', 'mm_bytes')} / {gb('official', 'other_bytes')}",
                f"{gb('ours', 'mm_bytes')} / {gb('ours', 'other_bytes')}", gb("fused", "other_bytes"),
                " / ".join(_fmt(rec[m].get("ops"), ".0f") for m in rec),
                get("official", "gpu_ms", ".1f"), get("ours", "gpu_ms", ".1f"), get("fused", "gpu_ms", ".1f"),
                _fmt(_ratio(r["methods"]["official"].get("gpu_ms"), r["methods"]["fused"].get("gpu_ms")), ".1f", "x"), diff)
    if r["kind"] == "head":
        return (r["case"], get("fused", "ms", ".3f"), get("eager", "ms", ".3f"), get("compile", "ms", ".3f"),
                _fmt(r["speedup_vs_eager"], ".2f", "x"), _fmt(r["speedup_vs_compile"], ".2f", "x"),
                get("fused", "gbps", ".1f"), get("fused", "bandwidth_fraction", ".0%"), get("graph", "ms", ".3f"),
                get("graph", "bandwidth_fraction", ".0%"), diff)
    third = "compile" if r["kind"] == "zeroshot" else "graph"
    return (r["case"], get("official", "ms", ".1f"), get("ours", "ms", ".1f"), _fmt(r["speedup"], ".2f", "x"),
            get(third, "ms", ".1f"), _fmt(r.get(f"speedup_{third}"), ".2f", "x"),
            get("official", "images_per_s", ".0f"), get("ours", "images_per_s", ".0f"),
            get("official", "peak_gib", ".2f"), get("ours", "peak_gib", ".2f"), _fmt(r["memory_ratio"], ".1f", "x"),
            get(third, "peak_gib", ".2f"), diff)


_HEADERS = {"train": ("case", "official ms", "ours ms", "speedup", "graph ms*", "graph speedup*", "off img/s",
                      "ours img/s", "off GiB", "ours GiB", "mem ratio", "graph GiB*", "loss / grad diff"),
            "head": ("head case", "fused ms", "eager ms", "compile ms", "vs eager", "vs compile", "fused GB/s",
                     "of copy bw", "graph ms", "graph of bw", "loss diff"),
            "cost": ("modelled case", "off TFLOP", "ours TFLOP", "off GB mm / other", "ours GB mm / other",
                     "fused GB other", "ops off / ours / fused", "GPU ms off", "ours", "fused", "off / fused",
                     "loss / grad diff")}


def _table(results):
    tables = []
    for kind, header in _HEADERS.items():
        rows = [header] + [_row(r) for r in results if _table_kind(r) == kind]
        if len(rows) > 1:
            widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
            tables.append("\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                                              for i, (v, w) in enumerate(zip(row, widths))) for row in rows))
            if kind == "train":
                tables[-1] += "\n* zero-shot rows: ours with the image encoder under torch.compile instead"
            if kind == "cost":
                tables[-1] += (f"\nGPU ms: matmuls at {GPU_TFLOPS} TFLOPS, all other traffic at {GPU_TBPS} TB/s, no launch "
                               "or host time; fused: ours with kernels/elementwise.py")
    return "\n\n".join(tables)


def _environment(device, args):
    import platform
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    probe = torch.empty(1, device=device)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "official_dtype": str(args.official_dtype), "ours_dtype": str(args.ours_dtype),
            "fused_head": "triton" if use_triton(probe) else "pytorch twin", "shared_prefix": args.shared_prefix,
            "fused_elementwise": args.fused_elementwise and use_triton(probe), "length_buckets": args.length_buckets,
            "copy_gbps": args.copy_gbps, "smoke": args.smoke, "warmup": args.warmup}


# ----------------------------------------------------------------------------------------------
# main


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}; see --help\n")  # one line, no usage block
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--cases", default="", help="comma-separated name prefixes, e.g. coop-vit,head (default: all)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--smoke", action="store_true", help="tiny models and classes, 2 timed steps (CI on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per method (default 3, smoke 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per method (default: per case, 3-50)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (of the head twin, of the zero-shot image encoder; smoke skips it)")
    p.add_argument("--shared-prefix", action="store_true", help="ours with the shared-prefix text path (less memory, more launches)")
    p.add_argument("--no-fused-elementwise", dest="fused_elementwise", action="store_false",
                   help="ours with PyTorch's LayerNorm and QuickGELU instead of kernels/elementwise.py (CUDA), to see what they give")
    p.add_argument("--length-buckets", action="store_true",
                   help="ours with prompts in length buckets in eager steps too (the graph method always has them)")
    p.add_argument("--list", action="store_true", help="print the selected case names and exit")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="skip the methods replayed from a CUDA graph: ours for train steps, fused for the head (CUDA only)")
    p.add_argument("--memory", action="store_true",
                   help="CPU: model each train case's peak GPU memory instead of timing (see the docstring)")
    p.add_argument("--cost", action="store_true",
                   help="CPU: model each train and zero-shot case's GPU work from its ops instead of timing (docstring)")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel CoOp instead: per-rank text cost at 1k/10k/21k classes, scaling over GPUs")
    args = p.parse_args(argv)
    for flag, what in (("memory", "GPU memory"), ("cost", "GPU work")):
        if getattr(args, flag) and (args.device != "cpu" or args.distributed or (args.memory and args.cost)):
            p.exit(2, f"bench.py: error: --{flag} models {what} on the CPU: pass --device cpu, without --distributed "
                      f"or the other model (on a GPU the tables measure it directly)\n")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "bench.py: error: --device cuda but torch sees no CUDA GPU; use --device cpu\n")
    if args.json:                                     # now, not after a long run; and never overwrite one
        try:
            open(args.json, "x").close()
            os.remove(args.json)
        except OSError as e:
            why = "exists; pick a new path (or remove it)" if os.path.exists(args.json) else f"cannot be written ({e.strerror})"
            p.exit(2, f"bench.py: error: --json {args.json} {why}\n")
    prefixes = [s for s in args.cases.split(",") if s]
    args.selected = [c for c in all_cases(args.smoke) if not prefixes or any(c.name.startswith(s) for s in prefixes)]
    if args.memory:                                   # the train steps: the only cases with memory targets
        args.selected = [c for c in args.selected if c.kind in ("coop", "cocoop")]
    if args.cost:
        args.selected = [c for c in args.selected if c.kind != "head"]
    if not args.selected:
        p.exit(2, f"bench.py: error: --cases {args.cases!r} matches no case; see --list\n")
    if args.repeats is not None:
        if args.repeats < 1:
            p.exit(2, f"bench.py: error: --repeats {args.repeats} must be >= 1\n")
        for case in args.selected:
            case.repeats = args.repeats
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 3
    args.no_compile = args.no_compile or args.smoke   # inductor's first compile takes longer than CI allows
    args.cuda_graph = args.cuda_graph and args.device == "cuda"
    gpu = args.device == "cuda"
    modelled = args.memory or args.cost                # in the GPU's 2-byte dtypes (bf16 for the official fp16)
    args.official_dtype = torch.float16 if gpu else torch.bfloat16 if modelled else torch.float32
    args.ours_dtype = torch.bfloat16 if gpu or modelled else torch.float32   # CPU: fp32 unless modelled
    return args


def main(argv=None):
    args = _parse(argv)
    if args.list:
        print("\n".join(c.name for c in args.selected))
        return 0
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True   # as Dassl sets it
    t_start = time.perf_counter()
    args.copy_gbps = _copy_gbps(device)
    env = _environment(device, args)
    print(f"bench: {env['device']}, torch {env['torch']}, triton {env['triton']}, official {args.official_dtype}, "
          f"ours {args.ours_dtype}, fused head: {env['fused_head']}, copy {args.copy_gbps:.0f} GB/s, "
          f"{0 if args.distributed else len(args.selected)} cases", flush=True)
    if args.distributed:
        return _distributed(args, device, env)
    results, models = [], None
    for i, case in enumerate(args.selected, 1):
        print(f"[{i}/{len(args.selected)}] {case.name}", flush=True)
        t0 = time.perf_counter()
        if case.kind == "head":
            methods = _head_case(case, device, args)
        elif args.memory:
            methods = _memory_case(case, device, args)
        elif args.cost:
            methods = _cost_case(case, device, args)
        else:
            if models is None or models.arch != case.arch:
                models = None                                # free the previous architecture first
                _free(device)
                models = _Models(case.arch, device, args)
            methods = (_zeroshot_case if case.kind == "zeroshot" else _train_case)(case, models, device, args)
        results.append(_summarise(case, methods))
        if args.json:                                       # after every case: a killed run keeps its results
            with open(args.json, "w") as fh:
                json.dump({"environment": env, "cases": results}, fh, indent=1)
        header = _HEADERS[_table_kind(results[-1])]
        cells = ", ".join(f"{h} {v}" for h, v in zip(header[1:], _row(results[-1])[1:]) if v != "-")
        print(f"    {cells} ({time.perf_counter() - t0:.0f} s)", flush=True)
    models = None
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s\n\n{_table(results)}", flush=True)
    failed = [r["case"] for r in results if not r.get("match", True) or any(
        m.get("error", "OOM") != "OOM" for m in r["methods"].values())]
    if failed:
        print(f"bench: the paths disagree or a method failed in: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
