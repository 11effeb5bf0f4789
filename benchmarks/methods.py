"""The methods each bench.py case compares, built as steps for timing.run_method.

Both paths start from the same random-init CLIP weights, inputs, class names, initial context and
Meta-Net:
- official: benchmarks/official.py in fp16 (fp32 on CPU), and no torch.no_grad around the frozen
  image encoder (its parameters do not require grad).
- ours: coop_min.fast.FastPromptedCLIP on a bf16 CLIP with fp32 LayerNorm (fp32 on CPU), fp32
  context and Meta-Net, the image encoder under no_grad, EOT truncation, batched CoCoOp and the fused
  cosine_ce head; where Triton runs, the fused LayerNorm and QuickGELU kernels in the frozen CLIP
  (`fast.fused_copy`); shared prefixes and length buckets when Settings asks for them.
- buckets (CUDA): ours with length buckets in its eager steps, so that their gain is seen apart from
  the graph's.
- graph (CUDA): for train steps, ours with the whole step (forward, backward, SGD update) captured
  once as a CUDA graph and replayed (coop_min/cuda_graph.py), with prompts in length buckets and the
  lr on the device as train.py --cuda-graph has them; for the head, the fused forward and backward
  replayed.
- compile: zero-shot ours with the image encoder under torch.compile instead of the elementwise
  kernels; for the head, torch.compile of the kernel's eager twin. The compile itself is not timed.
Before them, once per case, the reference: the method in fp32 on the same weights and inputs
(benchmarks/reference.py), returned as "reference"; every method's first output is checked against
it (bench.summarise, benchmarks/checks.py), and the graph and compile methods also after timing
against their eager twins. Each train step's calls alternate two batches, the labels and the
labels + 1, so that a replay reading stale inputs shows. Left out of both paths: the batch's
host-to-device copy and the loops' bookkeeping (Dassl's per-step NaN check and accuracy, our loop's
accuracy count and finite check).
"""
import copy
import itertools
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import checks, official, reference
from benchmarks.timing import graphed, nbytes, run_method
from coop_min.clip import CLIP, CLIPConfig, convert_dtype
from coop_min.cuda_graph import SGD, TrainStep
from coop_min.fast import FastConfig, FastPromptedCLIP, bucket_cuts, encode_text, fused_copy
from coop_min.kernels.cosine_ce import cosine_ce, cosine_ce_reference, cosine_logits
from coop_min.prompts import CoCoOpPromptLearner, CoOpPromptLearner, PromptConfig, PromptedCLIP
from coop_min.tokenizer import tokenize

LR, MOMENTUM, WEIGHT_DECAY = 0.002, 0.9, 5e-4  # Dassl SGD as configured by CoOp/CoCoOp

ARCHS = {"vit_b16": CLIPConfig(512, 224, 12, 768, 16, 12, 77, 49408, 512, 8, 12),
         "rn50": CLIPConfig(1024, 224, (3, 4, 6, 3), 64, None, 32, 77, 49408, 512, 8, 12),
         "vit_tiny": CLIPConfig(32, 32, 2, 64, 16, 2, 77, 49408, 64, 2, 2),
         "rn_tiny": CLIPConfig(32, 64, (1, 1, 1, 1), 8, None, 2, 77, 49408, 64, 2, 2)}
# CoOp's ImageNet classnames.txt ("n01440764 tench"): CLIP's cleaned ImageNet class names, in class order
IMAGENET_CLASSNAMES = Path(__file__).with_name("imagenet_classnames.txt")


@dataclass(frozen=True)
class Settings:
    """How the methods run; bench.py's command line fills it."""
    official_dtype: torch.dtype = torch.float32   # fp16 on CUDA, as OpenAI's weights; bf16 in the CPU models
    ours_dtype: torch.dtype = torch.float32       # bf16 on CUDA and in the CPU models
    warmup: int = 3                               # warm-up steps per method
    fused_elementwise: bool = True                # ours: kernels/elementwise.py in the frozen CLIP
    fused_attention: bool = True                  # ours: kernels/attention.py in the text encoder
    shared_prefix: bool = False                   # ours: FastConfig.shared_prefix
    length_buckets: bool = False                  # ours' eager steps too (graph always has them)
    buckets: bool = False                         # also the "buckets" method: ours eagerly with length buckets
    cuda_graph: bool = False                      # also the "graph" method (CUDA only)
    compile: bool = False                         # also the "compile" method


def classnames(n):
    """ImageNet's first n class names (CoOp's spelling); past 1000 (--distributed) they repeat."""
    names = [line.split(" ", 1)[1] for line in IMAGENET_CLASSNAMES.read_text().splitlines()]
    return [names[i % len(names)] for i in range(n)]


def shallow(config, text_layers, vision_layers=1):
    """The same CLIP with text_layers text layers and, for a ViT, vision_layers image layers."""
    vision = vision_layers if config.is_vit else config.vision_layers
    return replace(config, text_layers=text_layers, vision_layers=vision)


class Models:
    """One architecture's frozen CLIP in both forms and in fp32 (the reference's), built once from one
    random-init state dict; text_layers (the CPU models): that text depth and vision_layers ViT
    layers instead."""

    def __init__(self, arch, device, settings: Settings, text_layers=None, vision_layers=1):
        self.arch, self.config = arch, ARCHS[arch]
        if text_layers is not None:
            self.config = shallow(self.config, text_layers, vision_layers)
        torch.manual_seed(0)
        clip = CLIP(self.config).eval().requires_grad_(False)            # fp32, CPU, OpenAI's init
        self.official = official.build_official_clip(clip.state_dict(), self.config, settings.official_dtype, device)
        self.fp32 = copy.deepcopy(clip).to(device)
        self.ours = convert_dtype(clip.to(device), settings.ours_dtype)  # LayerNorm stays fp32
        self.official_bytes, self.ours_bytes = nbytes(self.official), nbytes(self.ours)


def sgd_step(loss_fn, params):
    """One training step as the official trainer does it: forward, zero_grad, backward, SGD step."""
    optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step():
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


# ----------------------------------------------------------------------------------------------
# train steps: CoOp and CoCoOp


@dataclass
class _TrainInputs:
    images: torch.Tensor       # (B, 3, H, W)
    labels: torch.Tensor       # (B,)
    next_labels: torch.Tensor  # (B,) (labels + 1) % C: every other call's labels, see _batches
    names: list                # class names
    ctx: torch.Tensor          # (M, W) fp32, N(0, 0.02)
    meta_state: dict | None    # CoCoOp: the Meta-Net's initial state
    eots: list                 # each class's EOT position in the prompt "X X ... X {name}." (host ints)


def _train_inputs(case, config, device):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)                                      # the Meta-Net's default init
    r = config.image_resolution
    images = torch.randn(case.batch, 3, r, r, generator=g).to(device)
    labels = torch.randint(0, case.classes, (case.batch,), generator=g).to(device)
    ctx = (torch.randn(case.n_ctx, config.text_width, generator=g) * 0.02).to(device)
    meta = official.meta_net(config.embed_dim, config.text_width).state_dict() if case.kind == "cocoop" else None
    names = classnames(case.classes)
    prompts = [" ".join(["X"] * case.n_ctx) + " " + name.replace("_", " ") + "." for name in names]
    eots = tokenize(prompts).argmax(dim=-1).tolist()
    return _TrainInputs(images, labels, (labels + 1) % case.classes, names, ctx, meta, eots)


def _batches(inputs):
    """A step's batches, one per call: the images with their labels, then with the next labels, and so
    on, the same for every method: a replay that kept reading its first inputs trains on wrong labels."""
    batches, calls = ((inputs.images, inputs.labels), (inputs.images, inputs.next_labels)), itertools.count()

    def batch():
        return batches[next(calls) % 2]
    return batch


def text_tokens(case, eots, settings: Settings, buckets=False):
    """Token positions ours' text encoder runs per step: every prompt (CoCoOp: one per image and
    class) padded to its chunk's longest, in FastPromptedCLIP's chunks (buckets: fast.bucket_cuts');
    with the shared prefix, [SOS, ctx] once (CoCoOp: once per image) and the rest per prompt."""
    groups = case.batch if case.kind == "cocoop" else 1
    eots, limit = eots * groups, FastConfig.max_prompts_per_chunk
    chunks = bucket_cuts(eots, limit) if buckets else [
        (range(a, min(a + limit, len(eots))), max(eots) + 1) for a in range(0, len(eots), limit)]
    prefix = 1 + case.n_ctx if settings.shared_prefix else 0
    return groups * prefix + sum(len(idx) * (length - prefix) for idx, length in chunks)


def _official_train_step(models, inputs):
    meta = None
    if inputs.meta_state is not None:
        meta = official.meta_net(models.config.embed_dim, models.config.text_width)
        meta.load_state_dict(inputs.meta_state)
    learner = official.OfficialPromptLearner(models.official, inputs.names, inputs.ctx, meta)
    loss, batch = official.coop_loss if meta is None else official.cocoop_loss, _batches(inputs)

    def loss_fn():
        return loss(models.official, learner, *batch())
    step = sgd_step(loss_fn, list(learner.parameters()))
    step.ctx = learner.ctx
    return step


def _learner(clip, case, inputs):
    """coop_min's prompt learner on `clip`, from the case's initial context (and Meta-Net)."""
    learner_cls = CoCoOpPromptLearner if case.kind == "cocoop" else CoOpPromptLearner
    learner = learner_cls(clip, inputs.names, PromptConfig(method=case.kind, n_ctx=case.n_ctx, ctx_init=""))
    with torch.no_grad():
        learner.ctx.copy_(inputs.ctx)
    if inputs.meta_state is not None:
        learner.meta_net.load_state_dict(inputs.meta_state)
    return learner


def _reference_train_step(models, case, inputs):
    """The method, prompts.PromptedCLIP on the fp32 CLIP: its first loss and context gradient."""
    model = PromptedCLIP(models.fp32, _learner(models.fp32, case, inputs))
    return reference.train_step(model, inputs.images, inputs.labels, per_image=case.kind == "cocoop")


def _ours_model(models, case, inputs, settings, length_buckets):
    config = FastConfig(fused_elementwise=settings.fused_elementwise, fused_attention=settings.fused_attention,
                        shared_prefix=settings.shared_prefix, length_buckets=length_buckets)
    return FastPromptedCLIP(models.ours, _learner(models.ours, case, inputs), config).train()


def _with_params(step, model):
    """step with what a check reads: the context, the trainable parameters and their start."""
    step.ctx, step.params = model.learner.ctx, model.trainable_parameters()
    step.start = checks.flat(step.params)
    return step


def _ours_train_step(models, case, inputs, settings, length_buckets):
    """Ours eagerly, with torch.optim.SGD as train.py without --cuda-graph."""
    model, batch = _ours_model(models, case, inputs, settings, length_buckets), _batches(inputs)

    def loss():
        return model.loss(*batch(), check_labels=False)   # in range by construction; train.py checks on the host
    return _with_params(sgd_step(loss, model.trainable_parameters()), model)


def _loss_only(model, images, labels):      # TrainStep's forward: (loss, *extras)
    return (model.loss(images, labels, check_labels=False),)


def _graph_train_step(models, case, inputs, settings, cuda_graph=True):
    """Ours as train.py --cuda-graph runs it: length buckets, cuda_graph.SGD (lr on the device) and the
    step captured after TrainStep's eager warm-ups, then replayed; cuda_graph=False: the same step
    eagerly (the graph's check)."""
    model, batch = _ours_model(models, case, inputs, settings, length_buckets=True), _batches(inputs)
    optimizer = SGD(model.trainable_parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    train_step = TrainStep(partial(_loss_only, model), optimizer, cuda_graph=cuda_graph)

    def step():
        return train_step(*batch())[0]
    return _with_params(step, model)


def _dtypes(methods, settings: Settings):
    """Each method's compute dtype as its "dtype" (the checks' tolerances depend on it)."""
    for name, r in methods.items():
        if name != "reference":
            dtype = settings.official_dtype if name == "official" else settings.ours_dtype
            r["dtype"] = str(dtype).removeprefix("torch.")
    return methods


def train_methods(case, models, device, settings: Settings, measure=None):
    """CoOp or CoCoOp train steps (one SGD step per call), from the same context (and Meta-Net) for
    both paths: {method: timing.run_method's result, "reference": the fp32 method's first loss and
    context gradient}. measure: see run_method."""
    inputs = _train_inputs(case, models.config, device)
    methods = {
        "reference": reference.compute(partial(_reference_train_step, models, case, inputs), device),
        "official": run_method(partial(_official_train_step, models, inputs), device, settings.warmup, case.repeats,
                               models.official_bytes, measure=measure),
        "ours": run_method(partial(_ours_train_step, models, case, inputs, settings, settings.length_buckets),
                           device, settings.warmup, case.repeats, models.ours_bytes, measure=measure)}
    if settings.buckets and measure is None:      # length buckets without a graph: the two effects apart
        methods["buckets"] = run_method(partial(_ours_train_step, models, case, inputs, settings, True), device,
                                        settings.warmup, case.repeats, models.ours_bytes)
    if settings.cuda_graph and measure is None:
        eager = partial(_graph_train_step, models, case, inputs, settings, cuda_graph=False)
        methods["graph"] = run_method(partial(_graph_train_step, models, case, inputs, settings), device,
                                      max(settings.warmup, 3), case.repeats, models.ours_bytes,
                                      check=checks.matches_eager(eager, settings.ours_dtype))
    per_prompt = (case.batch if case.kind == "cocoop" else 1) * models.config.context_length   # 77 each
    methods["official"]["text_tokens"] = per_prompt * case.classes
    methods["ours"]["text_tokens"] = text_tokens(case, inputs.eots, settings, settings.length_buckets)
    for bucketed in ("buckets", "graph"):
        if bucketed in methods:
            methods[bucketed]["text_tokens"] = text_tokens(case, inputs.eots, settings, buckets=True)
    return _dtypes(methods, settings)


# ----------------------------------------------------------------------------------------------
# zero-shot evaluation and the head alone


def _official_zeroshot_step(clip, images, tokens):
    """ZeroshotCLIP: the fp16 CLIP, normalised text features computed once."""
    with torch.no_grad():
        t = official.official_encode_text(clip, clip.token_embedding(tokens).type(clip.dtype), tokens)
        t = t / t.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def step():
        f = clip.visual(images.type(clip.dtype))
        f = f / f.norm(dim=-1, keepdim=True)
        return clip.logit_scale.exp() * f @ t.t()
    return step


def _ours_zeroshot_step(clip, images, tokens, compiled=False):
    """Ours: text features computed once; the image encoder as given, or under torch.compile."""
    encode = clip.encode_image
    if compiled:
        visual = torch.compile(clip.visual, dynamic=False)

        def encode(x):
            return visual(x.to(clip.dtype))
    with torch.no_grad():
        t, scale = encode_text(clip, tokens), clip.logit_scale.float().exp()

    @torch.inference_mode()
    def step():
        return cosine_logits(encode(images), t, scale)
    return step


def zeroshot_methods(case, models, device, settings: Settings, measure=None):
    """Evaluation: the frozen image encoder at batch B and a classifier of precomputed text features."""
    g = torch.Generator().manual_seed(2)
    r = models.config.image_resolution
    images = torch.randn(case.batch, 3, r, r, generator=g).to(device)
    labels = torch.randint(0, case.classes, (case.batch,), generator=g).to(device)
    tokens = tokenize([f"a photo of a {n}." for n in classnames(case.classes)]).to(device)
    fused = settings.fused_elementwise or settings.fused_attention
    ours = fused_copy(models.ours, settings.fused_elementwise, settings.fused_attention) if fused else models.ours

    def to_loss(logits):
        return F.cross_entropy(logits.float(), labels)

    def run(make_step, weight_bytes, check=None):
        return run_method(make_step, device, settings.warmup, case.repeats, weight_bytes, to_loss, measure, check)
    eager = partial(_ours_zeroshot_step, ours, images, tokens)
    exact = partial(reference.zeroshot, models.fp32, images, tokens, labels)
    official_step = partial(_official_zeroshot_step, models.official, images, tokens)
    methods = {"reference": reference.compute(exact, device),
               "official": run(official_step, models.official_bytes), "ours": run(eager, models.ours_bytes)}
    if settings.compile and measure is None:   # inductor fuses LayerNorm's casts and QuickGELU too, and more
        methods["compile"] = run(partial(_ours_zeroshot_step, models.ours, images, tokens, compiled=True),
                                 models.ours_bytes, checks.matches_eager(eager, settings.ours_dtype))
    return _dtypes(methods, settings)


def head_methods(case, device, settings: Settings, copy_gbps):
    """The head alone, forward and backward: fused kernel, its eager twin, torch.compile of the twin;
    each with its achieved GB/s and that as a fraction of copy_gbps (the device's copy bandwidth);
    "reference": the twin in fp32 on the same inputs."""
    g = torch.Generator().manual_seed(3)
    B, C, D = case.batch, case.classes, case.dim
    f = torch.randn(B, D, generator=g).to(device, settings.ours_dtype).requires_grad_()
    t = torch.randn(*((B,) if case.per_image else ()), C, D, generator=g).to(device, settings.ours_dtype)
    t.requires_grad_()
    scale, labels = torch.tensor(100.0, device=device), torch.randint(0, C, (B,), generator=g).to(device)
    heads = {"fused": cosine_ce, "eager": cosine_ce_reference}
    if settings.compile:
        heads["compile"] = torch.compile(cosine_ce_reference, dynamic=False)

    def make(head):
        def step():
            loss = head(f, t, scale, labels)
            torch.autograd.grad(loss, (f, t))
            return loss.detach()
        return lambda: step

    def checked(eager_head):                   # the compile and graph columns, against their eager twins
        return checks.matches_eager(make(eager_head), settings.ours_dtype)
    out = {"reference": reference.compute(partial(reference.head, f, t, scale, labels), device)}
    for name, head in heads.items():
        out[name] = run_method(make(head), device, settings.warmup, case.repeats,
                               check=checked(cosine_ce_reference) if name == "compile" else None)
    if settings.cuda_graph:                    # the kernels' own time: no Python, launch or sync gaps
        out["graph"] = run_method(lambda: graphed(make(cosine_ce)()), device, settings.warmup, case.repeats,
                                  check=checked(cosine_ce))
    moved = 2 * (f.numel() + t.numel()) * f.element_size()   # f, t read once; df, dt written once
    for r in out.values():
        if "ms" in r:
            r["gbps"] = moved / (r["ms"] * 1e-3) / 1e9
            r["bandwidth_fraction"] = r["gbps"] / copy_gbps
    return _dtypes(out, settings)
