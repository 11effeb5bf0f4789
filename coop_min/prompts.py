"""CoOp (Zhou et al., IJCV 2022) and CoCoOp (CVPR 2022): learned prompts for a frozen CLIP.

Each class c gets the prompt "X X ... X {name}." (M copies of "X"). It is tokenized and embedded
once; the M embeddings at positions 1..M are then replaced by learned context vectors, as in the
official trainers/coop.py: `token_prefix` holds the SOS embedding, `token_suffix` everything after
the context (the name, ".", EOT, padding). CoOp learns one context (M, W) for all classes or one
per class (CSC, (C, M, W)) and may move the class name to the middle or the front. CoCoOp learns a
context (M, W) plus a Meta-Net that maps the normalised image feature to a bias added to every
context vector, so every (image, class) pair has its own prompt.

`PromptedCLIP` is the papers' computation written as the official `CustomCLIP.forward`: all 77
positions through the text encoder, CoCoOp one image at a time, and the head as normalise / matmul /
cross-entropy. `coop_min/fast.py` computes the same numbers faster; this file is what it must equal.

Where we differ from the official code, on purpose:
- A ctx_init phrase sets M to its number of BPE tokens (the official code counts words and assumes
  one token per word: "2012 tesla" would be 2 there but is 5 tokens here, which keeps the layout right).
- CSC with a ctx_init phrase: the official code silently builds one generic context; so do we, with
  a warning.
- Random init draws from a generator seeded by the `seed` argument, never from the global RNG.
- Context and Meta-Net stay fp32 (master weights) whatever the CLIP dtype; they are cast to it
  where they enter the text encoder.
"""
import json
import math
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from coop_min import official
from coop_min.files import atomic_write
from coop_min.tokenizer import encode, tokenize

METHODS = ("coop", "cocoop")
POSITIONS = ("end", "middle", "front")
_PAPER = {"coop": (16, ""), "cocoop": (4, "a photo of a")}  # (n_ctx, ctx_init) of the paper configs


@dataclass
class PromptConfig:
    """How prompts are built. None takes the paper default of the method; __post_init__ resolves
    every field, so a config always says exactly what is built (n_ctx of a phrase = its tokens)."""
    method: str = "coop"                 # coop | cocoop
    n_ctx: int | None = None             # M; paper: 16 (CoOp), 4 (CoCoOp)
    ctx_init: str | None = None          # "": random N(0, 0.02); a phrase: its token embeddings
    csc: bool = False                    # class-specific contexts (CoOp only)
    class_token_position: str = "end"    # end | middle | front (CoCoOp: end only)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}")
        if self.class_token_position not in POSITIONS:
            raise ValueError(f"class_token_position={self.class_token_position!r} is not one of {POSITIONS}")
        if self.method == "cocoop" and (self.csc or self.class_token_position != "end"):
            raise ValueError(f"CoCoOp has one context and the class token at the end, got csc={self.csc} "
                             f"class_token_position={self.class_token_position!r}; drop those settings")
        n_ctx, ctx_init = _PAPER[self.method]
        self.n_ctx = n_ctx if self.n_ctx is None else self.n_ctx
        self.ctx_init = ctx_init if self.ctx_init is None else self.ctx_init.replace("_", " ")
        if self.ctx_init:
            self.n_ctx = len(encode(self.ctx_init))  # the phrase decides M, as in the official code
            if self.n_ctx == 0:
                raise ValueError(f"ctx_init={self.ctx_init!r} has no tokens; give words or '' for random init")
            if self.csc:
                warnings.warn(f"csc=True is ignored with ctx_init={self.ctx_init!r}: as the official code, one "
                              "generic context is built from the phrase; use ctx_init='' for class-specific "
                              "contexts", stacklevel=3)
                self.csc = False
        if not isinstance(self.n_ctx, int) or self.n_ctx < 1:
            raise ValueError(f"n_ctx={self.n_ctx!r} must be an integer >= 1")

    @classmethod
    def for_method(cls, method: str = "coop", **overrides) -> "PromptConfig":
        """The paper's settings for `method`; overrides that are None keep the default."""
        return cls(method=method, **{k: v for k, v in overrides.items() if v is not None})


# ----------------------------------------------------------------------------------------------
# prompt learners


def _linear(n_in, n_out, generator):
    """nn.Linear with PyTorch's default init, drawn from `generator` instead of the global RNG."""
    layer = nn.utils.skip_init(nn.Linear, n_in, n_out)
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(n_in)
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


class _PromptLearner(nn.Module):
    """What CoOp and CoCoOp share: the context init and the fixed token embeddings of each prompt."""

    def __init__(self, clip, classnames, config: PromptConfig, generator: torch.Generator):
        super().__init__()
        classnames = list(classnames)
        if not classnames:
            raise ValueError("a prompt learner needs at least one class name")
        self.config, self.classnames = config, classnames
        self.n_cls, self.n_ctx = len(classnames), config.n_ctx
        emb = clip.token_embedding.weight                                   # (V, W)
        device, W, M = emb.device, emb.shape[1], config.n_ctx
        if config.ctx_init:
            ctx = emb[torch.tensor(encode(config.ctx_init), device=device)].detach().float().clone()  # (M, W)
            prompt_prefix = config.ctx_init
        else:
            shape = (self.n_cls, M, W) if config.csc else (M, W)
            ctx = torch.empty(shape).normal_(0, 0.02, generator=generator).to(device)
            prompt_prefix = " ".join(["X"] * M)
        self.ctx = nn.Parameter(ctx)                                        # fp32 master weights

        names = [name.replace("_", " ") for name in classnames]
        self.name_lens = [len(encode(name)) for name in names]
        L = clip.config.context_length
        if too_long := [(n, k) for n, k in zip(names, self.name_lens) if M + k + 3 > L]:  # SOT, ctx, name, ".", EOT
            raise ValueError(f"{M} context tokens + class name {too_long[0][0]!r} ({too_long[0][1]} tokens) "
                             f"+ SOT, '.' and EOT exceed CLIP's {L} tokens; lower --n-ctx (or shorten --ctx-init)")
        tokens = tokenize([f"{prompt_prefix} {name}." for name in names], L)
        if config.ctx_init and not (tokens[:, 1:1 + M] == torch.tensor(encode(prompt_prefix))).all():
            raise ValueError(f"ctx_init={config.ctx_init!r} tokenizes differently when followed by a class "
                             "name; end it with a word, not punctuation")
        self.eot_list = tokens.argmax(dim=-1).tolist()                      # on the host, for fast.py
        tokens = tokens.to(device)                                          # (C, L)
        with torch.no_grad():
            embedding = clip.token_embedding(tokens)                        # (C, L, W), CLIP dtype
        # Fixed per class list, rebuilt from the names on load: not part of the state dict.
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)       # SOS
        self.register_buffer("token_suffix", embedding[:, 1 + M:], persistent=False)   # name, ".", EOT, pad
        self.register_buffer("tokenized_prompts", tokens, persistent=False)
        self.register_buffer("eot", tokens.argmax(dim=-1), persistent=False)            # (C,)


class CoOpPromptLearner(_PromptLearner):
    """Context (M, W), or (C, M, W) with CSC; forward() -> prompt embeddings (C, L, W)."""

    def __init__(self, clip, classnames, config: PromptConfig, seed: int = 0):
        if config.method != "coop":
            raise ValueError(f"CoOpPromptLearner needs method='coop', got {config.method!r}")
        super().__init__(clip, classnames, config, torch.Generator().manual_seed(seed))
        self.class_token_position = config.class_token_position
        L = self.tokenized_prompts.shape[1]
        order = None if self.class_token_position == "end" else torch.tensor(
            [self._order(n, L) for n in self.name_lens], device=self.eot.device)
        self.register_buffer("_position_order", order, persistent=False)   # (C, L) or None

    def _order(self, name_len, L):
        """Where each position of the middle/front prompt comes from in the end layout
        [SOS, ctx_1..ctx_M, name_1..name_n, rest] (a permutation: the EOT position is unchanged)."""
        M, half = self.n_ctx, self.n_ctx // 2
        ctx, name = list(range(1, 1 + M)), list(range(1 + M, 1 + M + name_len))
        rest = list(range(1 + M + name_len, L))
        if self.class_token_position == "middle":
            return [0] + ctx[:half] + name + ctx[half:] + rest
        return [0] + name + ctx + rest                                      # front

    def forward(self, classes=None):  # classes (n,) long or None (all) -> (n, L, W) in the CLIP dtype
        i = slice(None) if classes is None else classes
        prefix, suffix = self.token_prefix[i], self.token_suffix[i]
        ctx = self.ctx[i] if self.ctx.dim() == 3 else self.ctx.expand(len(prefix), -1, -1)   # (n, M, W)
        prompts = torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=1)
        if self._position_order is not None:
            order = self._position_order[i].unsqueeze(-1).expand(-1, -1, prompts.shape[-1])
            prompts = prompts.gather(1, order)
        return prompts


class CoCoOpPromptLearner(_PromptLearner):
    """Context (M, W) + Meta-Net; forward(normalised image features (B, D)) -> prompts (B, C, L, W)."""

    def __init__(self, clip, classnames, config: PromptConfig, seed: int = 0):
        if config.method != "cocoop":
            raise ValueError(f"CoCoOpPromptLearner needs method='cocoop', got {config.method!r}")
        generator = torch.Generator().manual_seed(seed)
        super().__init__(clip, classnames, config, generator)
        D, W = clip.config.embed_dim, clip.config.text_width               # D = visual.output_dim
        if D < 16:
            raise ValueError(f"the Meta-Net's hidden width is embed_dim // 16, and embed_dim={D} gives 0")
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", _linear(D, D // 16, generator)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", _linear(D // 16, W, generator)),
        ])).to(self.ctx.device)

    def shifted_ctx(self, image_features):  # normalised (B, D) -> (B, M, W) fp32
        bias = self.meta_net(image_features.float())                        # (B, W)
        return self.ctx.unsqueeze(0) + bias.unsqueeze(1)                    # same shift for every token

    def forward(self, image_features):  # normalised (B, D) -> (B, C, L, W), the official layout
        ctx = self.shifted_ctx(image_features).to(self.token_prefix.dtype)  # (B, M, W)
        B, C = ctx.shape[0], self.n_cls
        return torch.cat([self.token_prefix.expand(B, -1, -1, -1),
                          ctx.unsqueeze(1).expand(-1, C, -1, -1),
                          self.token_suffix.expand(B, -1, -1, -1)], dim=2)


# ----------------------------------------------------------------------------------------------
# the prompted classifier


class PromptedCLIP(nn.Module):
    """A frozen CLIP and a prompt learner: image features, text features, logits and the loss,
    computed as the official trainers do."""

    def __init__(self, clip, learner):
        super().__init__()
        self.clip = clip.requires_grad_(False).eval()
        self.learner = learner

    @property
    def is_conditional(self):                    # CoCoOp: text features depend on the image
        return isinstance(self.learner, CoCoOpPromptLearner)

    def train(self, mode: bool = True):
        # As Dassl's set_model_mode: only the learner switches; the frozen CLIP stays in eval mode
        # (ResNet BatchNorm must keep its running statistics).
        self.training = mode
        self.learner.train(mode)
        return self

    def trainable_parameters(self):
        return [p for p in self.learner.parameters() if p.requires_grad]

    @torch.no_grad()
    def encode_images(self, images):  # (B, 3, H, W) -> (B, D) unnormalised, CLIP dtype
        return self.clip.encode_image(images)

    def text_features(self, image_features=None):
        """Unnormalised text features: CoOp (C, D); CoCoOp (B, C, D) for image features (B, D)."""
        lrn = self.learner
        if not self.is_conditional:
            if image_features is not None:
                raise ValueError("CoOp text features do not depend on images; call text_features()")
            return self.clip.encode_text_embeddings(lrn(), lrn.eot)         # (C, 77, W) -> (C, D)
        f = self.meta_net_input(image_features)
        return torch.stack([self.clip.encode_text_embeddings(p, lrn.eot) for p in lrn(f)])   # one image at a time

    @staticmethod
    def meta_net_input(image_features):  # (B, D) -> normalised fp32 (B, D), what the Meta-Net reads
        if image_features is None or image_features.dim() != 2:
            raise ValueError("CoCoOp text features need image features (B, D), got "
                             f"{None if image_features is None else tuple(image_features.shape)}")
        return F.normalize(image_features.float(), dim=-1)

    def scale(self):                             # exp of CLIP's log scale, fp32, never trained
        return self.clip.logit_scale.detach().float().exp()

    def logits_from_features(self, image_features, text=None):  # (B, D) -> (B, C) fp32
        """text: the text features if already computed for these images (else computed here)."""
        t = self.text_features(image_features if self.is_conditional else None) if text is None else text
        f, scale = F.normalize(image_features.float(), dim=-1), self.scale()
        if t.dim() == 2:                                                    # CoOp: (C, D)
            return scale * f @ F.normalize(t.float(), dim=-1).t()
        return torch.stack([scale * f_i @ F.normalize(t_i.float(), dim=-1).t() for f_i, t_i in zip(f, t)])

    def logits(self, images):  # (B, 3, H, W) -> (B, C) fp32
        return self.logits_from_features(self.encode_images(images))

    forward = logits

    def loss(self, images_or_features, labels, text=None):
        """Mean cross-entropy of the scaled cosine logits; images (B, 3, H, W) or features (B, D);
        text: the text features if already computed (else computed here)."""
        x = images_or_features
        f = self.encode_images(x) if x.dim() == 4 else x
        return F.cross_entropy(self.logits_from_features(f, text), labels)


def build_prompted_clip(clip, classnames, config: PromptConfig | None = None, seed: int = 0) -> PromptedCLIP:
    """A new learner for `classnames` (CoOp or CoCoOp by config.method) on a frozen CLIP."""
    config = config or PromptConfig()
    learner_cls = CoCoOpPromptLearner if config.method == "cocoop" else CoOpPromptLearner
    return PromptedCLIP(clip, learner_cls(clip, classnames, config, seed))


# ----------------------------------------------------------------------------------------------
# exchange files: prompt.safetensors, an exported CoOp classifier, nearest words


def _save(tensors, path, metadata):
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_prompt(path, learner_or_model, clip_sha256: str):
    """Write ctx (and the Meta-Net) in fp32 with what is needed to rebuild the classifier."""
    learner = getattr(learner_or_model, "learner", learner_or_model)
    c = learner.config
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in learner.state_dict().items()}
    metadata = {"method": c.method, "n_ctx": str(c.n_ctx), "class_token_position": c.class_token_position,
                "csc": "true" if c.csc else "false", "classnames": json.dumps(learner.classnames),
                "clip_sha256": clip_sha256}
    _save(tensors, path, metadata)


def _read(path):
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for every kind of bad file
        raise ValueError(f"cannot read prompt file {path} ({' '.join(str(e).split())}); pass a run folder "
                         "or the prompt.safetensors a training run wrote") from None


def _saved_classnames(path, meta):
    try:
        names = json.loads(meta["classnames"])
    except ValueError as e:
        raise ValueError(f"{path}: its classnames metadata is not JSON ({e}); pass a prompt.safetensors "
                         "a training run wrote") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: its classnames metadata must be a non-empty JSON list of strings, got "
                         f"{meta['classnames'][:80]!r}; pass a prompt.safetensors a training run wrote")
    return names


def _config_of(path, meta):
    try:
        return PromptConfig(method=meta["method"], n_ctx=int(meta["n_ctx"]), ctx_init="", csc=meta["csc"] == "true",
                            class_token_position=meta["class_token_position"])
    except ValueError as e:
        raise ValueError(f"{path}: its metadata is not a prompt configuration ({' '.join(str(e).split())})") from None


def load_prompt(path, clip, classnames=None, clip_sha256: str | None = None,
                class_token_position: str | None = None) -> PromptedCLIP:
    """Rebuild a PromptedCLIP from prompt.safetensors for `classnames` (default: the file's).

    A unified CoOp context or a CoCoOp learner works on any class list (base->new, cross-dataset);
    class-specific contexts only on the classes they were learned for (names compared as the
    prompts spell them, "_" read as a space).

    `path` may also be an official CoOp/CoCoOp checkpoint (coop_min/official.py: the file, its
    prompt_learner/ folder or the official run folder), read without running its pickle. It holds no
    class names, so `classnames` is required; `class_token_position` is used when its run folder does
    not say (official.read_prompt(...).origin says which settings were used and where they came from).
    """
    if official.is_official(path):
        return _load_official(path, clip, classnames, class_token_position)
    meta, tensors = _read(path)
    missing = {"method", "n_ctx", "class_token_position", "csc", "classnames"} - set(meta)
    if missing or "ctx" not in tensors:
        raise ValueError(f"{path} is not a prompt file written by save_prompt: missing {sorted(missing) or 'ctx'}")
    saved_sha = meta.get("clip_sha256", "")
    if clip_sha256 is not None and saved_sha and saved_sha != clip_sha256:
        raise ValueError(f"{path} was learned with CLIP {saved_sha}, you loaded {clip_sha256}; "
                         "pass the matching --weights")
    saved_names = _saved_classnames(path, meta)
    names = saved_names if classnames is None else list(classnames)
    config = _config_of(path, meta)
    spelled = [[n.replace("_", " ") for n in ns] for ns in (names, saved_names)]
    if config.csc and spelled[0] != spelled[1]:
        got = (f"got {len(names)} class names" if len(names) != len(saved_names) else
               "got other names ({!r} where it has {!r})".format(*next((a, b) for a, b in zip(*spelled) if a != b)))
        raise ValueError(f"{path} has class-specific contexts for {len(saved_names)} classes, {got}; CSC prompts "
                         "only work on the classes they were learned for, in their order")
    return _with_state(path, clip, names, config, tensors)


def _load_official(path, clip, classnames, class_token_position):
    found = official.read_prompt(path, class_token_position)
    ctx = found.tensors["ctx"]
    if classnames is None:
        raise ValueError(f"{path} is an official checkpoint, which holds no class names; pass the data it was "
                         "trained on (--data)")
    if ctx.dim() == 3 and ctx.shape[0] != len(classnames):
        raise ValueError(f"{path} has class-specific contexts for {ctx.shape[0]} classes, the data has "
                         f"{len(classnames)}; CSC prompts only work on the classes they were learned for")
    config = PromptConfig(method=found.method, n_ctx=ctx.shape[-2], ctx_init="", csc=ctx.dim() == 3,
                          class_token_position=found.class_token_position)
    return _with_state(path, clip, classnames, config, found.tensors)


def _with_state(path, clip, classnames, config, tensors):
    if tensors["ctx"].shape[-1] != clip.config.text_width:
        raise ValueError(f"{path} has context width {tensors['ctx'].shape[-1]}, this CLIP's text width is "
                         f"{clip.config.text_width}; pass the CLIP the prompt was learned with")
    model = build_prompted_clip(clip, classnames, config)
    try:
        model.learner.load_state_dict(tensors)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit a {config.method} learner on this CLIP: "
                         f"{' '.join(str(e).split())[:300]}") from None
    return model


@torch.no_grad()
def export_classifier(path, model: PromptedCLIP, clip_sha256: str = ""):
    """Write a CoOp classifier for plain CLIP users: `text_features` (C, D) normalised, fp32, and
    CLIP's `logit_scale` (log); logits = logit_scale.exp() * normalize(encode_image(x)) @ text_features.T."""
    if model.is_conditional:
        raise ValueError("CoCoOp's text features depend on each image (Meta-Net), so there is no fixed "
                         "classifier to export; share prompt.safetensors instead")
    t = F.normalize(model.text_features().float(), dim=-1).cpu().contiguous()
    tensors = {"text_features": t, "logit_scale": model.clip.logit_scale.detach().float().cpu().reshape(())}
    metadata = {"classnames": json.dumps(model.learner.classnames), "method": model.learner.config.method,
                "clip_sha256": clip_sha256}
    _save(tensors, path, metadata)


@torch.no_grad()
def nearest_words(ctx, token_embedding, k: int = 5):
    """The k vocabulary tokens nearest (Euclidean) to each context vector, as interpret_prompt.py:
    ctx (M, W) or (C, M, W) -> (ids, distances), each (..., M, k), nearest first."""
    E = token_embedding.weight if isinstance(token_embedding, nn.Embedding) else token_embedding
    if ctx.shape[-1] != E.shape[1] or ctx.dim() not in (2, 3):
        raise ValueError(f"ctx {tuple(ctx.shape)} must be (M, W) or (C, M, W) with W={E.shape[1]}, "
                         "the width of the token embeddings")
    if not 1 <= k <= E.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the vocabulary size {E.shape[0]}")
    # fp64 differences, not cdist's matmul form: the same digits on every run and thread count
    rows, E = ctx.reshape(-1, ctx.shape[-1]).double(), E.double().to(ctx.device)
    found = [torch.cdist(chunk, E, compute_mode="donot_use_mm_for_euclid_dist").topk(k, dim=-1, largest=False)
             for chunk in rows.split(64)]                                                    # (n, V) each
    dist, ids = torch.cat([f.values for f in found]), torch.cat([f.indices for f in found])
    return ids.view(*ctx.shape[:-1], k), dist.float().view(*ctx.shape[:-1], k)
