"""Prompt learners and the prompted classifier, on a small random CLIP.

The independent references here follow the official code literally: `_official_prompts` is
trainers/coop.py's PromptLearner (token_prefix / token_suffix slicing, a per-class cat for middle and
front), `_official_cocoop_logits` is trainers/cocoop.py's per-image loop; the text encoder they use is
CLIP's full-length path (all 77 positions), which test_clip.py checks against OpenAI's model.py.
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from coop_min.clip import CLIP, CLIPConfig, convert_dtype
from coop_min.fast import ClassShard, FastConfig, FastPromptedCLIP, bucket_cuts
from coop_min.prompts import (CoCoOpPromptLearner, CoOpPromptLearner, PromptConfig,
                              build_prompted_clip, export_classifier, load_prompt, nearest_words,
                              save_prompt)
from coop_min.tokenizer import encode, tokenize

CLASSNAMES = ["dog", "golden_retriever", "2012 Tesla Model S", "cat"]   # names of 1, 2 and 7 tokens
SHA = "ab" * 32


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    config = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                        vision_patch_size=8, vision_heads=2, context_length=77, vocab_size=49408,
                        text_width=64, text_heads=2, text_layers=2)
    return CLIP(config).eval().requires_grad_(False)


def _close(a, b, tol=1e-5):
    a, b = a.double(), b.double()
    assert (a - b).abs().max() <= tol * b.abs().max(), f"max diff {(a - b).abs().max():.3g}"


# ----------------------------------------------------------------------------------------------
# the official layout, written out as in trainers/coop.py


def _official_prompts(clip, classnames, ctx, n_ctx, position, prompt_prefix):
    classnames = [name.replace("_", " ") for name in classnames]
    name_lens = [len(encode(name)) for name in classnames]
    prompts = [prompt_prefix + " " + name + "." for name in classnames]
    tokenized_prompts = torch.cat([tokenize(p) for p in prompts])
    with torch.no_grad():
        embedding = clip.token_embedding(tokenized_prompts)
    prefix, suffix = embedding[:, :1, :], embedding[:, 1 + n_ctx:, :]
    n_cls = len(classnames)
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
    if position == "end":
        return torch.cat([prefix, ctx, suffix], dim=1), tokenized_prompts
    half_n_ctx = n_ctx // 2
    out = []
    for i in range(n_cls):
        name_len = name_lens[i]
        prefix_i = prefix[i:i + 1, :, :]
        class_i = suffix[i:i + 1, :name_len, :]
        suffix_i = suffix[i:i + 1, name_len:, :]
        if position == "middle":
            parts = [prefix_i, ctx[i:i + 1, :half_n_ctx, :], class_i, ctx[i:i + 1, half_n_ctx:, :], suffix_i]
        else:
            parts = [prefix_i, class_i, ctx[i:i + 1, :, :], suffix_i]
        out.append(torch.cat(parts, dim=1))
    return torch.cat(out, dim=0), tokenized_prompts


def _official_text_encoder(clip, prompts, tokenized_prompts):
    return clip.encode_text_embeddings(prompts, tokenized_prompts.argmax(dim=-1))


def _official_cocoop_logits(clip, learner, image_features):
    """trainers/cocoop.py CustomCLIP.forward after the image encoder, with its PromptLearner.forward."""
    tokenized = torch.cat([tokenize("X X X X " + n.replace("_", " ") + ".") for n in learner.classnames])
    with torch.no_grad():
        embedding = clip.token_embedding(tokenized)
    prefix, suffix = embedding[:, :1, :], embedding[:, 1 + learner.n_ctx:, :]
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    bias = learner.meta_net(image_features).unsqueeze(1)
    ctx_shifted = learner.ctx.unsqueeze(0) + bias
    prompts = torch.stack([torch.cat([prefix, c.unsqueeze(0).expand(len(tokenized), -1, -1), suffix], dim=1)
                           for c in ctx_shifted])
    logits = []
    for pts_i, imf_i in zip(prompts, image_features):
        text_features = _official_text_encoder(clip, pts_i, tokenized)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        logits.append(clip.logit_scale.exp() * imf_i @ text_features.t())
    return torch.stack(logits)


# ----------------------------------------------------------------------------------------------
# config and assembly


def test_config_resolves_paper_defaults_and_rejects_bad_settings():
    assert (PromptConfig().n_ctx, PromptConfig().ctx_init) == (16, "")
    cocoop = PromptConfig.for_method("cocoop", n_ctx=None, ctx_init=None)
    assert (cocoop.n_ctx, cocoop.ctx_init) == (4, "a photo of a")
    assert PromptConfig(method="cocoop", ctx_init="").n_ctx == 4
    assert PromptConfig(ctx_init="a 2012 photo").n_ctx == len(encode("a 2012 photo")) == 6  # BPE, not words
    for bad in (dict(method="clip"), dict(class_token_position="left"), dict(n_ctx=0),
                dict(method="cocoop", csc=True), dict(method="cocoop", class_token_position="front")):
        with pytest.raises(ValueError):
            PromptConfig(**bad)
    with pytest.warns(UserWarning, match="csc=True is ignored"):
        assert PromptConfig(csc=True, ctx_init="a photo of a").csc is False


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
@pytest.mark.parametrize("ctx_init", ["", "a photo of a"])
def test_prompts_match_official_layout(clip, position, csc, ctx_init):
    if csc and ctx_init:
        with pytest.warns(UserWarning):
            config = PromptConfig(n_ctx=5, ctx_init=ctx_init, csc=csc, class_token_position=position)
    else:
        config = PromptConfig(n_ctx=5, ctx_init=ctx_init, csc=csc, class_token_position=position)
    learner = CoOpPromptLearner(clip, CLASSNAMES, config, seed=3)
    n_ctx = 4 if ctx_init else 5
    assert learner.n_ctx == n_ctx and learner.ctx.dtype == torch.float32
    assert learner.ctx.shape == ((len(CLASSNAMES),) if csc and not ctx_init else ()) + (n_ctx, 64)
    prefix_text = ctx_init or " ".join(["X"] * n_ctx)
    expected, tokenized = _official_prompts(clip, CLASSNAMES, learner.ctx.detach(), n_ctx, position, prefix_text)
    assert torch.equal(learner().detach(), expected)
    assert torch.equal(learner.eot, tokenized.argmax(-1)) and torch.equal(learner.tokenized_prompts, tokenized)


def test_phrase_init_is_the_token_embeddings_of_the_phrase(clip):
    learner = CoOpPromptLearner(clip, CLASSNAMES, PromptConfig(ctx_init="a_photo_of_a"))
    assert learner.n_ctx == 4
    ids = tokenize("a photo of a")[0, 1:5]
    assert ids.tolist() == [320, 1125, 539, 320]
    assert torch.equal(learner.ctx.detach(), clip.token_embedding.weight[ids])


def test_random_init_is_seeded_without_touching_the_global_rng(clip):
    state = torch.get_rng_state()
    a = CoCoOpPromptLearner(clip, CLASSNAMES, PromptConfig(method="cocoop", ctx_init=""), seed=1)
    b = CoCoOpPromptLearner(clip, CLASSNAMES, PromptConfig(method="cocoop", ctx_init=""), seed=1)
    c = CoCoOpPromptLearner(clip, CLASSNAMES, PromptConfig(method="cocoop", ctx_init=""), seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb) and not torch.equal(va, vc), k
    ctx = a.ctx.detach()
    assert 0.015 < float(ctx.std()) < 0.025 and abs(float(ctx.mean())) < 0.01
    assert a.meta_net.linear1.weight.shape == (2, 32) and a.meta_net.linear2.weight.shape == (64, 2)
    bound = 1 / 32 ** 0.5                                                     # nn.Linear's default init
    assert a.meta_net.linear1.weight.abs().max() <= bound and a.meta_net.linear1.bias.abs().max() <= bound


# ----------------------------------------------------------------------------------------------
# text features, logits, loss: fast path vs the official computation


def test_end_prompt_with_phrase_context_equals_encode_text_of_the_sentence(clip):
    model = build_prompted_clip(clip, CLASSNAMES, PromptConfig(n_ctx=4))
    with torch.no_grad():
        model.learner.ctx.copy_(clip.token_embedding.weight[encode("a photo of a")])
        got = model.text_features()
    texts = [f"a photo of a {name.replace('_', ' ')}." for name in CLASSNAMES]
    _close(got, clip.encode_text(tokenize(texts)))


@pytest.mark.parametrize("position,csc", [("end", False), ("middle", False), ("front", True)])
def test_coop_fast_path_matches_official(clip, position, csc):
    config = PromptConfig(n_ctx=6, csc=csc, class_token_position=position)
    ref = build_prompted_clip(clip, CLASSNAMES, config, seed=0)
    fast = FastPromptedCLIP(clip, ref.learner, FastConfig(max_prompts_per_chunk=3))
    prefixed = FastPromptedCLIP(clip, ref.learner, FastConfig(max_prompts_per_chunk=3, shared_prefix=True))
    ctx = fast.learner.ctx
    prompts, tokenized = _official_prompts(clip, CLASSNAMES, ctx, 6, position, "X X X X X X")
    official_t = _official_text_encoder(clip, prompts, tokenized)
    f = torch.randn(5, 32)
    labels = torch.tensor([0, 3, 2, 1, 2])
    official_logits = clip.logit_scale.exp() * F.normalize(f, dim=-1) @ F.normalize(official_t, dim=-1).t()
    official_loss = F.cross_entropy(official_logits, labels)
    (official_grad,) = torch.autograd.grad(official_loss, ctx)
    for model in (fast, prefixed, ref):
        _close(model.text_features(), official_t)
        with torch.no_grad():
            _close(model.logits_from_features(f), official_logits)
        loss = model.loss(f, labels)
        _close(loss, official_loss)
        _close(torch.autograd.grad(loss, ctx)[0], official_grad)


def test_cocoop_batched_matches_official_per_image_loop(clip):
    config = PromptConfig(method="cocoop", ctx_init="")
    ref = build_prompted_clip(clip, CLASSNAMES, config, seed=0)
    fast = FastPromptedCLIP(clip, ref.learner, FastConfig(max_prompts_per_chunk=5))   # chunks cut images
    prefixed = FastPromptedCLIP(clip, ref.learner, FastConfig(max_prompts_per_chunk=5, shared_prefix=True))
    with torch.no_grad():                      # non-zero Meta-Net output so the image really matters
        fast.learner.meta_net.linear2.weight.normal_(0, 0.5)
    f = torch.randn(3, 32)
    labels = torch.tensor([2, 0, 3])
    params = fast.trainable_parameters()
    assert len(params) == 5
    official_logits = _official_cocoop_logits(clip, fast.learner, f)
    official_loss = F.cross_entropy(official_logits, labels)
    official_grads = torch.autograd.grad(official_loss, params)
    for model in (fast, prefixed, ref):
        assert model.text_features(f).shape == (3, 4, 32)
        with torch.no_grad():
            _close(model.logits_from_features(f), official_logits)
        loss = model.loss(f, labels)
        _close(loss, official_loss)
        for got, want in zip(torch.autograd.grad(loss, params), official_grads):
            _close(got, want, 1e-4)
    # the learner's (B, C, L, W) prompts are the official stack of per-image prompts
    f_n = F.normalize(f, dim=-1)
    ctx = fast.learner.shifted_ctx(f_n).detach()
    prompts = fast.learner(f_n).detach()
    for i in range(3):
        expected, _ = _official_prompts(clip, CLASSNAMES, ctx[i], 4, "end", "X X X X")
        assert torch.equal(prompts[i], expected)


def test_class_shard_encodes_only_its_classes(clip):
    method = build_prompted_clip(clip, CLASSNAMES, PromptConfig(n_ctx=4, class_token_position="middle"), seed=0)
    everything = method.text_features()
    shard = ClassShard([1, 2], lambda t: torch.cat([torch.zeros(1, 32), t, torch.zeros(1, 32)]))
    t = FastPromptedCLIP(clip, method.learner, FastConfig(class_shard=shard)).text_features()                 # the gather stands in for the other ranks' rows
    _close(t[1:3], everything[1:3])
    assert torch.equal(t[[0, 3]], torch.zeros(2, 32))


class _WritesBeforeTheText(TorchDispatchMode):
    """The ops that write a tensor (views left out) before the first op that reads a `cat`'s output
    (the text transformer's first): [(name, output shape)]."""

    def __init__(self):
        super().__init__()
        self.ops, self.cats, self.text_started = [], [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.text_started |= any(a is c for a in args for c in self.cats)
        out = func(*args, **(kwargs or {}))
        if not self.text_started and not func.is_view:
            shape = out.shape if isinstance(out, torch.Tensor) else torch.Size()
            self.ops.append((func.overloadpacket.__name__, shape))
            self.cats += [out] if func.overloadpacket is torch.ops.aten.cat else []
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,csc,limit,buckets", [("coop", False, 4096, False), ("coop", True, 4096, False),
                                                     ("coop", False, 3, True), ("cocoop", False, 4096, False),
                                                     ("cocoop", False, 3, False), ("cocoop", False, 4096, True)])
def test_a_step_writes_its_prompts_once(clip, monkeypatch, method, csc, limit, buckets, dtype):
    """The class tokens, SOS and every positional embedding never change: cast and summed once, the
    prompts of a chunk are one `cat` of them and the context, with no gather, cast or add over the
    frozen tokens at each step (the method's layout would gather, cat, cast and add)."""
    import coop_min.fast as fast

    monkeypatch.setattr(fast, "CHUNK_COST", 1)                          # buckets do cut these few prompts
    model = convert_dtype(copy.deepcopy(clip), dtype)
    config = PromptConfig(method=method, n_ctx=2, ctx_init="", csc=csc)
    learner = build_prompted_clip(model, CLASSNAMES, config, seed=0).learner
    fast_model = FastPromptedCLIP(model, learner, FastConfig(max_prompts_per_chunk=limit, length_buckets=buckets))
    f = torch.randn(2, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    features = f if method == "cocoop" else None
    fast_model.text_features(features)                                  # the plan is made on the first call
    with _WritesBeforeTheText() as ops:
        fast_model.text_features(features)
    (cat,) = [shape for name, shape in ops.ops if name == "cat"]          # (n, L, W), or (images, classes, L, W)
    tails = cat[:-2].numel() * (cat[-2] - 1 - 2) * cat[-1]                # the chunk's tokens after the context
    assert [name for name, shape in ops.ops if shape.numel() >= tails] == ["cat"], ops.ops


def test_length_bucket_plan_sorts_cuts_and_restores_the_order(clip):
    """The plan FastPromptedCLIP runs: chunks of at most 3 prompts of ascending length, each padded to
    its longest, covering every prompt once (the optimum itself: tests/test_buckets.py); and the
    features it returns, encoded in that sorted order, are put back in class order: row c is class c's,
    as the method computes it one class at a time."""
    eots = [9, 5, 7, 5, 9, 5, 12]
    chunks = bucket_cuts(eots, max_per_chunk=3, chunk_cost=1)
    assert sorted(i for idx, _ in chunks for i in idx) == list(range(7))
    assert all(len(idx) <= 3 and length == max(eots[i] for i in idx) + 1 for idx, length in chunks)
    assert [eots[i] for idx, _ in chunks for i in idx] == sorted(eots)
    assert len(chunks) > 2

    names = ["2012 Tesla Model S", "dog", "a b c d e f", "cat", "golden_retriever", "ox", "sea lion"]
    method = build_prompted_clip(clip, names, PromptConfig(n_ctx=4), seed=0)
    assert method.learner.eot_list != sorted(method.learner.eot_list)     # class order is not length order
    fast = FastPromptedCLIP(clip, method.learner, FastConfig(max_prompts_per_chunk=3, length_buckets=True))
    with torch.no_grad():
        t = fast.text_features()
        for c, name in enumerate(names):
            alone = build_prompted_clip(clip, [name], PromptConfig(n_ctx=4), seed=0)
            alone.learner.ctx.copy_(method.learner.ctx)
            _close(t[c], alone.text_features()[0])


@pytest.mark.parametrize("method,shared_prefix", [("coop", False), ("coop", True), ("cocoop", False), ("cocoop", True)])
def test_length_buckets_give_the_features_of_one_padded_batch(clip, monkeypatch, method, shared_prefix):
    """Each bucket is padded to its own longest prompt; padding after EOT is never read, so the text
    features (and the loss's gradient) must be those of the plain path, in the same order."""
    import coop_min.fast as fast

    monkeypatch.setattr(fast, "CHUNK_COST", 1)           # cheap chunks: several buckets on these few prompts
    names = ["dog", "golden_retriever", "2012 Tesla Model S", "cat", "sea lion", "a b c d e f", "ox", "fire truck"]
    f = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([7, 2, 0])
    out = {}
    for buckets in (False, True):
        learner = build_prompted_clip(clip, names, PromptConfig.for_method(method), seed=1).learner
        model = FastPromptedCLIP(clip, learner, FastConfig(shared_prefix=shared_prefix, length_buckets=buckets))
        if buckets:
            eots = learner.eot_list * (len(f) if method == "cocoop" else 1)
            assert len(fast.bucket_cuts(eots, 4096, fast.CHUNK_COST)) > 1         # several buckets do run
        t = model.text_features(f if method == "cocoop" else None)
        model.loss(f, labels).backward()
        out[buckets] = t.detach(), model.learner.ctx.grad.clone()
    _close(out[True][0], out[False][0])
    _close(out[True][1], out[False][1])


class _HostRead(Exception):
    pass


@pytest.mark.parametrize("method,shared_prefix,buckets", [("coop", False, False), ("coop", True, False),
                                                          ("cocoop", False, False), ("cocoop", True, False),
                                                          ("coop", False, True), ("cocoop", True, True)])
def test_fast_step_reads_no_device_value_on_the_host(clip, monkeypatch, method, shared_prefix, buckets):
    """A CUDA graph cannot capture a host read of a device value (.item(), int(t), if t: ...), and on a
    GPU each one stalls the launch queue. The fast step (forward, backward, SGD) must make none; on
    CPU they are made to raise here. (Length buckets plan on the first step, outside any capture.)"""
    import coop_min.fast as fast

    monkeypatch.setattr(fast, "CHUNK_COST", 0)
    learner = build_prompted_clip(clip, CLASSNAMES, PromptConfig.for_method(method), seed=0).learner
    model = FastPromptedCLIP(clip, learner, FastConfig(max_prompts_per_chunk=3, shared_prefix=shared_prefix,
                                                       length_buckets=buckets)).train()
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images, labels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 1])

    def step():
        loss = model.loss(model.encode_images(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    step()                                     # the optimizer creates its momentum buffers

    def refuse(*args, **kwargs):
        raise _HostRead()
    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    step()
    monkeypatch.undo()
    with pytest.raises(_HostRead):             # the patch does catch a host read
        monkeypatch.setattr(torch.Tensor, "__int__", refuse)
        int(labels.max())


def test_images_path_and_frozen_clip_in_eval_mode(clip):
    model = build_prompted_clip(clip, CLASSNAMES, PromptConfig(method="cocoop"))
    model.train()
    assert model.learner.training and not any(m.training for m in model.clip.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"learner.ctx", "learner.meta_net.linear1.weight", "learner.meta_net.linear1.bias",
                         "learner.meta_net.linear2.weight", "learner.meta_net.linear2.bias"}
    images = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([1, 2])
    loss = model.loss(images, labels)
    loss.backward()
    assert model.learner.ctx.grad is not None and all(p.grad is None for p in model.clip.parameters())
    with torch.no_grad():                      # the official computation from CLIP's own image features
        official = F.cross_entropy(_official_cocoop_logits(clip, model.learner, clip.encode_image(images)), labels)
    _close(loss, official)
    model.eval()
    assert not model.learner.training


def test_bf16_clip_keeps_fp32_context_and_matches_reference(clip):
    import copy

    from coop_min.clip import convert_dtype

    low = convert_dtype(copy.deepcopy(clip), torch.bfloat16)
    f = torch.randn(2, 32, generator=torch.Generator().manual_seed(0)).bfloat16()   # not the order-dependent global RNG
    labels = torch.tensor([1, 3])
    for config in (PromptConfig(n_ctx=4), PromptConfig(method="cocoop")):
        ref = build_prompted_clip(low, CLASSNAMES, config)
        fast = FastPromptedCLIP(low, ref.learner)
        assert fast.learner.ctx.dtype == torch.float32 and fast.learner.token_prefix.dtype == torch.bfloat16
        with torch.no_grad():
            _close(fast.logits_from_features(f), ref.logits_from_features(f), 2e-2)
        fast.loss(f, labels).backward()
        assert fast.learner.ctx.grad.dtype == torch.float32 and fast.learner.ctx.grad.abs().sum() > 0


def test_bf16_cocoop_shared_prefix_gradient_sums_the_classes_in_fp32():
    """Every (image, class) row's gradient flows back into its image's one prefix: 300 classes summed.
    A bf16 index_add lost most of that sum (the context gradient was 26% off the full sequences');
    it must stay within bf16 noise of the full path, as both stay of the fp32 gradient."""
    from coop_min.clip import build_clip, convert_dtype

    torch.manual_seed(0)
    state = CLIP(CLIPConfig(64, 32, 1, 64, 16, 2, 77, 49408, 128, 2, 2)).state_dict()
    names = [f"class {i}" for i in range(300)]
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0, 299])
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        low = convert_dtype(build_clip(state), dtype)
        for shared_prefix in (False, True):
            learner = build_prompted_clip(low, names, PromptConfig(method="cocoop"), seed=2).learner
            model = FastPromptedCLIP(low, learner, FastConfig(shared_prefix=shared_prefix))
            model.loss(images, labels).backward()
            grads[dtype, shared_prefix] = model.learner.ctx.grad
    exact = grads[torch.float32, False]
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(grads[torch.float32, True], exact) < 1e-5
    noise = rel(grads[torch.bfloat16, False], exact)
    assert rel(grads[torch.bfloat16, True], exact) < max(2 * noise, 0.02), (noise, rel(grads[torch.bfloat16, True], exact))


# ----------------------------------------------------------------------------------------------
# files


def test_save_load_round_trip_and_new_classes(clip, tmp_path):
    for config in (PromptConfig(n_ctx=3, class_token_position="middle"), PromptConfig(method="cocoop")):
        model = build_prompted_clip(clip, CLASSNAMES, config, seed=5)
        path = tmp_path / f"{config.method}.safetensors"
        save_prompt(path, model, clip_sha256=SHA)
        loaded = load_prompt(path, clip, clip_sha256=SHA)
        assert loaded.learner.classnames == CLASSNAMES
        for field in ("method", "n_ctx", "csc", "class_token_position"):  # ctx_init: the file holds the ctx
            assert getattr(loaded.learner.config, field) == getattr(model.learner.config, field)
        for k, v in model.learner.state_dict().items():
            assert torch.equal(loaded.learner.state_dict()[k], v), k
        f = torch.randn(2, 32)
        with torch.no_grad():
            assert torch.equal(loaded.logits_from_features(f), model.logits_from_features(f))
        new = load_prompt(path, clip, classnames=["zebra", "sea_lion"])
        fresh = build_prompted_clip(clip, ["zebra", "sea_lion"], config)   # the learned weights on new names
        fresh.learner.load_state_dict(model.learner.state_dict())
        with torch.no_grad():
            assert torch.equal(new.logits_from_features(f), fresh.logits_from_features(f))
    with pytest.raises(ValueError, match=f"learned with CLIP {SHA}, you loaded cd"):
        load_prompt(path, clip, clip_sha256="cd" * 32)


def test_class_specific_prompt_refuses_other_class_counts(clip, tmp_path):
    model = build_prompted_clip(clip, CLASSNAMES, PromptConfig(n_ctx=2, csc=True))
    path = tmp_path / "csc.safetensors"
    save_prompt(path, model.learner, clip_sha256=SHA)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"ctx"} and f.get_tensor("ctx").shape == (4, 2, 64)
    assert meta["csc"] == "true" and json.loads(meta["classnames"]) == CLASSNAMES and meta["n_ctx"] == "2"
    with pytest.raises(ValueError, match="for 4 classes, got 2 class names"):
        load_prompt(path, clip, classnames=["a", "b"])


def test_export_classifier_gives_the_same_logits(clip, tmp_path):
    from safetensors.torch import load_file

    model = build_prompted_clip(clip, CLASSNAMES, PromptConfig(n_ctx=4))
    export_classifier(tmp_path / "cls.safetensors", model)
    w = load_file(tmp_path / "cls.safetensors")
    f = torch.randn(3, 32)
    with torch.no_grad():
        deployed = w["logit_scale"].exp() * F.normalize(f, dim=-1) @ w["text_features"].t()
        _close(deployed, model.logits_from_features(f))
    cocoop = build_prompted_clip(clip, CLASSNAMES, PromptConfig(method="cocoop"))
    with pytest.raises(ValueError, match="CoCoOp"):
        export_classifier(tmp_path / "x.safetensors", cocoop)


@pytest.mark.parametrize("shape", [(4, 64), (2, 3, 64)])
def test_nearest_words_matches_brute_force(shape):
    g = torch.Generator().manual_seed(0)
    vocab = torch.randn(300, 64, generator=g)
    ctx = torch.randn(*shape, generator=g)
    ids, dist = nearest_words(ctx, torch.nn.Embedding.from_pretrained(vocab), k=5)
    assert ids.shape == dist.shape == shape[:-1] + (5,)
    for m, c in enumerate(ctx.reshape(-1, 64)):
        d = [float(((c.double() - v.double()) ** 2).sum().sqrt()) for v in vocab]
        best = sorted(range(len(d)), key=d.__getitem__)[:5]
        assert ids.reshape(-1, 5)[m].tolist() == best
        _close(dist.reshape(-1, 5)[m], torch.tensor([d[i] for i in best]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_cuda_bf16_fast_path_matches_fp32_reference(method):
    from coop_min.clip import build_clip, convert_dtype

    torch.manual_seed(0)
    cfg = CLIPConfig(512, 32, 1, 64, 8, 1, 77, 49408, 512, 8, 12)
    sd = CLIP(cfg).state_dict()
    ref_clip = build_clip(sd, cfg).cuda()
    fast_clip = convert_dtype(build_clip(sd, cfg).cuda(), torch.bfloat16)
    names = [f"class {i} " + "word " * (i % 5) for i in range(300)]
    config = PromptConfig(method=method, ctx_init="")
    ref = build_prompted_clip(ref_clip, names, config, seed=0)
    fast = FastPromptedCLIP(fast_clip, build_prompted_clip(fast_clip, names, config, seed=0).learner)
    fast.learner.load_state_dict(ref.learner.state_dict())
    f, labels = torch.randn(4, 512, device="cuda"), torch.randint(0, 300, (4,), device="cuda")
    params_ref, params_fast = ref.trainable_parameters(), fast.trainable_parameters()
    loss_ref, loss_fast = ref.loss(f, labels), fast.loss(f, labels)
    assert abs(loss_fast.item() - loss_ref.item()) <= 1e-2 * abs(loss_ref.item())
    for a, b in zip(torch.autograd.grad(loss_ref, params_ref), torch.autograd.grad(loss_fast, params_fast)):
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    with torch.no_grad():
        assert (ref.logits_from_features(f).argmax(-1) == fast.logits_from_features(f).argmax(-1)).float().mean() >= 0.75
