"""CLIP architectures: every OpenAI model builds from a state dict of its real shapes, and our forward
matches an independent functional re-implementation of OpenAI's model.py (sequence-first layout,
nn.MultiheadAttention maths via F.multi_head_attention_forward, an additive -inf causal mask)."""
import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from coop_min import clip as clip_module
from coop_min.clip import (CLIP, CLIPConfig, LayerNorm, QuickGELU, ResidualAttentionBlock, build_clip,
                           convert_dtype, infer_config, load_clip)

# name: (embed, resolution, vision layers, vision width, patch, text width, text heads, text layers)
OPENAI_MODELS = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 512, 8, 12),
    "RN50x4": (640, 288, (4, 6, 10, 6), 80, None, 640, 10, 12),
    "RN50x16": (768, 384, (6, 8, 18, 8), 96, None, 768, 12, 12),
    "RN50x64": (1024, 448, (3, 15, 36, 10), 128, None, 1024, 16, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 768, 12, 12),
    "ViT-L/14@336px": (768, 336, 24, 1024, 14, 768, 12, 12),
}


def _config(name):
    e, r, vl, vw, p, tw, th, tl = OPENAI_MODELS[name]
    heads = vw // 64 if p else vw * 32 // 64
    return CLIPConfig(e, r, vl, vw, p, heads, 77, 49408, tw, th, tl)


@pytest.mark.parametrize("name", list(OPENAI_MODELS))
def test_every_openai_architecture_builds_from_its_shapes(name):
    expected = _config(name)
    with torch.device("meta"):  # shapes only: RN50x64 would take seconds and GiBs to materialise
        sd = CLIP(expected).state_dict()
    assert infer_config(sd) == expected
    with torch.device("meta"):
        model = build_clip(sd)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


# ---------------------------------------------------------------------------------------------
# independent functional reference, following OpenAI clip/model.py literally


def _ln(x, sd, p):
    return F.layer_norm(x.float(), x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)


def _resblock(x, sd, p, heads, mask=None):  # x: (L, N, W)
    h = _ln(x, sd, p + ".ln_1")
    W = x.shape[-1]
    a, _ = F.multi_head_attention_forward(
        h, h, h, W, heads, sd[p + ".attn.in_proj_weight"], sd[p + ".attn.in_proj_bias"], None, None, False, 0.0,
        sd[p + ".attn.out_proj.weight"], sd[p + ".attn.out_proj.bias"], need_weights=False, attn_mask=mask)
    x = x + a
    h = F.linear(_ln(x, sd, p + ".ln_2"), sd[p + ".mlp.c_fc.weight"], sd[p + ".mlp.c_fc.bias"])
    h = h * torch.sigmoid(1.702 * h)
    return x + F.linear(h, sd[p + ".mlp.c_proj.weight"], sd[p + ".mlp.c_proj.bias"])


def _ref_text(sd, tokens, heads, layers):
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    L = tokens.shape[1]
    mask = torch.full((L, L), float("-inf")).triu_(1)
    x = x.permute(1, 0, 2)
    for i in range(layers):
        x = _resblock(x, sd, f"transformer.resblocks.{i}", heads, mask)
    x = _ln(x.permute(1, 0, 2), sd, "ln_final")
    return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ sd["text_projection"]


def _ref_vit(sd, images, heads, layers):
    x = F.conv2d(images, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = sd["visual.class_embedding"] + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre").permute(1, 0, 2)
    for i in range(layers):
        x = _resblock(x, sd, f"visual.transformer.resblocks.{i}", heads)
    return _ln(x.permute(1, 0, 2)[:, 0, :], sd, "visual.ln_post") @ sd["visual.proj"]


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        False, 0.0, 1e-5)


def _bottleneck(x, sd, p, stride):
    out = F.relu(_bn(F.conv2d(x, sd[p + ".conv1.weight"]), sd, p + ".bn1"))
    out = F.relu(_bn(F.conv2d(out, sd[p + ".conv2.weight"], padding=1), sd, p + ".bn2"))
    if stride > 1:
        out = F.avg_pool2d(out, stride)
    out = _bn(F.conv2d(out, sd[p + ".conv3.weight"]), sd, p + ".bn3")
    if p + ".downsample.0.weight" in sd:
        x = x if stride == 1 else F.avg_pool2d(x, stride)
        x = _bn(F.conv2d(x, sd[p + ".downsample.0.weight"]), sd, p + ".downsample.1")
    return F.relu(out + x)


def _ref_resnet(sd, images, heads, layers):
    x = F.relu(_bn(F.conv2d(images, sd["visual.conv1.weight"], stride=2, padding=1), sd, "visual.bn1"))
    x = F.relu(_bn(F.conv2d(x, sd["visual.conv2.weight"], padding=1), sd, "visual.bn2"))
    x = F.relu(_bn(F.conv2d(x, sd["visual.conv3.weight"], padding=1), sd, "visual.bn3"))
    x = F.avg_pool2d(x, 2)
    for stage, n in enumerate(layers, start=1):
        for b in range(n):
            x = _bottleneck(x, sd, f"visual.layer{stage}.{b}", 2 if (b == 0 and stage > 1) else 1)
    x = x.flatten(2).permute(2, 0, 1)                                      # (HW, N, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + sd["visual.attnpool.positional_embedding"][:, None]
    p = "visual.attnpool."
    out, _ = F.multi_head_attention_forward(
        x[:1], x, x, x.shape[-1], heads, None,
        torch.cat([sd[p + "q_proj.bias"], sd[p + "k_proj.bias"], sd[p + "v_proj.bias"]]), None, None, False, 0.0,
        sd[p + "c_proj.weight"], sd[p + "c_proj.bias"], use_separate_proj_weight=True,
        q_proj_weight=sd[p + "q_proj.weight"], k_proj_weight=sd[p + "k_proj.weight"],
        v_proj_weight=sd[p + "v_proj.weight"], need_weights=False)
    return out.squeeze(0)


def _randomise_batchnorm(sd, gen):
    # Random-init BN is the identity (mean 0, var 1); give it real statistics so the check means something.
    for k in sd:
        if k.endswith("running_mean") or k.endswith(".bias") and "bn" in k:
            sd[k] = 0.1 * torch.randn(sd[k].shape, generator=gen)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(sd[k].shape, generator=gen)
        elif ("bn" in k or "downsample.1" in k) and k.endswith(".weight"):
            sd[k] = 1 + 0.1 * torch.randn(sd[k].shape, generator=gen)
    return sd


def _randomise_identities(sd, gen):
    # At init LayerNorm is the identity (weight 1, bias 0) and attention / MLP biases are 0: swapping
    # ln_1 for ln_2 or dropping a bias would go unseen. Perturb them so each parameter matters.
    for k in sd:
        if k.endswith(".weight") and any(f"{ln}." in k for ln in ("ln_1", "ln_2", "ln_pre", "ln_post", "ln_final")):
            sd[k] = 1 + 0.1 * torch.randn(sd[k].shape, generator=gen)
        elif k.endswith(".bias") or k.endswith(".in_proj_bias"):
            sd[k] = sd[k] + 0.05 * torch.randn(sd[k].shape, generator=gen)
    return sd


def _tokens(n, L=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, L, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(1, 20, (1,), generator=g))
        tokens[i, 0] = 49406
        tokens[i, 1:length + 1] = torch.randint(1, 49406, (length,), generator=g)
        tokens[i, length + 1] = 49407
    return tokens


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_vit_b16_real_shapes_match_reference():
    torch.manual_seed(0)
    cfg = _config("ViT-B/16")
    sd = _randomise_identities(CLIP(cfg).state_dict(), torch.Generator().manual_seed(5))
    model = build_clip(sd)
    images = torch.randn(2, 3, 224, 224)
    tokens = _tokens(3)
    assert _rel(model.encode_image(images), _ref_vit(sd, images, 12, 12)) < 1e-5
    ref_text = _ref_text(sd, tokens, 8, 12)
    assert _rel(model.encode_text(tokens), ref_text) < 1e-5
    assert _rel(model.encode_text(tokens), ref_text) < 1e-5


@torch.no_grad()
def test_rn50_real_shapes_match_reference():
    torch.manual_seed(1)
    cfg = _config("RN50")
    sd = _randomise_batchnorm(CLIP(cfg).state_dict(), torch.Generator().manual_seed(2))
    model = build_clip(sd)
    images = torch.randn(2, 3, 224, 224)
    assert _rel(model.encode_image(images), _ref_resnet(sd, images, 32, (3, 4, 6, 3))) < 1e-5


@torch.no_grad()
def test_small_resnet_with_odd_stage_counts_matches_reference():
    torch.manual_seed(3)
    cfg = CLIPConfig(48, 64, (1, 2, 1, 2), 16, None, 8, 77, 49408, 64, 4, 2)
    sd = _randomise_batchnorm(CLIP(cfg).state_dict(), torch.Generator().manual_seed(4))
    model = build_clip(sd, {"vision_heads": 8})
    images = torch.randn(3, 3, 64, 64)
    assert _rel(model.encode_image(images), _ref_resnet(sd, images, 8, (1, 2, 1, 2))) < 1e-5


@torch.no_grad()
def test_forward_logits_are_scaled_cosines():
    torch.manual_seed(5)
    cfg = CLIPConfig(32, 32, 2, 64, 8, 2, 77, 49408, 64, 2, 2)
    model = build_clip(CLIP(cfg).state_dict(), {"vision_heads": 2, "text_heads": 2})
    images, tokens = torch.randn(2, 3, 32, 32), _tokens(3)
    per_image, per_text = model(images, tokens)
    f, t = model.encode_image(images), model.encode_text(tokens)
    cos = torch.tensor([[float(a @ b / a.norm() / b.norm()) for b in t] for a in f])
    assert torch.allclose(per_image, cos / 0.07, rtol=1e-5, atol=1e-5)   # logit_scale init = log(1/0.07)
    assert torch.equal(per_text, per_image.t())


def test_bf16_keeps_layernorm_fp32_and_stays_close():
    torch.manual_seed(6)
    cfg = CLIPConfig(32, 32, 2, 64, 8, 2, 77, 49408, 64, 2, 2)
    ref = build_clip(CLIP(cfg).state_dict(), {"vision_heads": 2, "text_heads": 2})
    low = convert_dtype(build_clip(ref.state_dict(), cfg), torch.bfloat16)
    assert low.ln_final.weight.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert low.logit_scale.dtype == torch.float32
    tokens = _tokens(4)
    with torch.no_grad():
        a, b = ref.encode_text(tokens), low.encode_text(tokens).float()
    assert F.cosine_similarity(a, b).min() > 0.99
    # the LayerNorms of the bf16 model compute in fp32: exactly fp32 LN of the bf16 input, rounded once
    ln = low.transformer.resblocks[0].ln_1
    with torch.no_grad():
        ln.weight.copy_(1 + 0.3 * torch.randn(64))
        ln.bias.copy_(0.3 * torch.randn(64))
        x = (3 * torch.randn(5, 7, 64) + 1).to(torch.bfloat16)
        expected = F.layer_norm(x.float(), (64,), ln.weight, ln.bias, ln.eps).to(torch.bfloat16)
        assert ln(x).dtype == torch.bfloat16 and torch.equal(ln(x), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layernorm_and_quickgelu_gradients_are_the_bits_of_the_plain_expressions(dtype):
    # both keep less for backward than autograd of OpenAI's expressions would, and recompute the rest:
    # the gradients must still be exactly what autograd of those expressions gives
    g = torch.Generator().manual_seed(7)
    x0 = (3 * torch.randn(5, 7, 64, generator=g) + 1).to(dtype)
    grad = torch.randn(5, 7, 64, generator=g).to(dtype)
    ln = LayerNorm(64)                          # fp32 weights, as convert_dtype leaves them
    with torch.no_grad():
        ln.weight.copy_(1 + 0.3 * torch.randn(64, generator=g))
        ln.bias.copy_(0.3 * torch.randn(64, generator=g))
    w, b = ln.weight.detach().clone().requires_grad_(), ln.bias.detach().clone().requires_grad_()
    x, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    ln(x).backward(grad)
    F.layer_norm(xr.float(), (64,), w, b, ln.eps).to(dtype).backward(grad)
    assert torch.equal(x.grad, xr.grad) and torch.equal(ln.weight.grad, w.grad) and torch.equal(ln.bias.grad, b.grad)
    ln.weight.grad = None
    ln(x0).backward(grad)                       # no input gradient wanted: only the weights'
    assert torch.equal(ln.weight.grad, w.grad)

    x, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    QuickGELU()(x).backward(grad)
    (xr * torch.sigmoid(1.702 * xr)).backward(grad)
    assert torch.equal(x.grad, xr.grad)


def test_a_frozen_bf16_text_block_keeps_20_bytes_per_token_and_width_for_backward():
    # Counted by hand, per token, for the context's gradient through a frozen bf16 block (W = 256,
    # 4 heads): the two LayerNorm inputs 2W + 2W bytes (not their fp32 copies), SDPA's packed q/k/v 6W and
    # output 2W, QuickGELU's (4W) input 8W (not its sigmoid as well) = 20W, plus fp32 mean and rstd per
    # LayerNorm (16) and SDPA's fp32 log-sum-exp per head (16). The plain expressions keep 32W. Frozen
    # Linear layers keep no input: only their weight, which is not an activation.
    W, heads, n, L = 256, 4, 6, 11
    torch.manual_seed(0)
    block = ResidualAttentionBlock(W, heads)
    for m in block.modules():                   # bf16 except LayerNorm, as convert_dtype does it
        if not isinstance(m, LayerNorm):
            for p in m.parameters(recurse=False):
                p.data = p.data.to(torch.bfloat16)
    block.requires_grad_(False)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    x = torch.randn(n, L, W, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x, causal=True)
    assert sum(kept.values()) == n * L * (20 * W + 16 + 4 * heads)
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bad_state_dicts_give_clear_errors():
    cfg = CLIPConfig(32, 32, 2, 64, 8, 2, 77, 49408, 64, 2, 2)
    sd = CLIP(cfg).state_dict()
    with pytest.raises(ValueError, match="missing 'text_projection'"):
        build_clip({k: v for k, v in sd.items() if k != "text_projection"})
    with pytest.raises(ValueError, match="unexpected keys"):
        build_clip({**sd, "visual.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="image"):
        build_clip(sd, cfg).encode_image(torch.zeros(1, 3, 33, 32))
    assert math.isclose(float(build_clip(sd, cfg).logit_scale.exp()), 1 / 0.07, rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------
# hostile files: a bad config is refused before any CLIP is built, in one line naming the file

SMALL = CLIPConfig(32, 32, 2, 64, 8, 2, 77, 49408, 64, 2, 2)


def _refuse_real_builds(monkeypatch):
    """Fails the test if a CLIP is built outside the meta device (where building costs no memory)."""
    real = clip_module.CLIP

    def meta_only(config):
        assert torch.empty(0).device.type == "meta", f"built a CLIP of {config} before checking it"
        return real(config)
    monkeypatch.setattr(clip_module, "CLIP", meta_only)


def _with_config(path, config):
    """A converted-looking file: SMALL's tensors and `config` (a dict, or raw text) as its metadata."""
    text = config if isinstance(config, str) else json.dumps(config)
    save_file(CLIP(SMALL).state_dict(), str(path), metadata={"config": text})
    return path


_DROP = object()


def _edit(**fields):
    config = asdict(SMALL)
    for k, v in fields.items():
        if v is _DROP:
            del config[k]
        else:
            config[k] = v
    return config


HOSTILE_CONFIGS = {  # id: (config metadata, what the message names)
    "zero-heads": (_edit(vision_heads=0), "vision_heads"),
    "48GiB-text-tower": (_edit(text_width=65536, text_layers=64), "text_width"),
    "int-as-string": (_edit(text_layers="2"), "text_layers"),
    "int-as-bool": (_edit(embed_dim=True), "embed_dim"),
    "int-as-float": (_edit(vision_width=64.0), "vision_width"),
    "three-resnet-stages": (_edit(vision_layers=[1, 1, 1], vision_patch_size=None), "vision_layers"),
    "gelu-as-string": (_edit(quick_gelu="yes"), "quick_gelu"),
    "negative": (_edit(image_resolution=-32), "image_resolution"),
    "heads-do-not-divide": (_edit(text_heads=3), "text_heads"),
    "disagrees-with-shapes": (_edit(text_layers=3), "text_layers"),
    "vocab-disagrees": (_edit(vocab_size=10 ** 6), "vocab_size"),
    "unknown-field": (_edit(dropout=0.1), "dropout"),
    "missing-field": (_edit(text_heads=_DROP), "text_heads"),
    "not-an-object": ("[1, 2]", "not a JSON object"),
    "not-json": ("{", "not JSON"),
    "nested-too-deep": ("[" * 100_000, "not JSON"),
}


@pytest.mark.parametrize("case", list(HOSTILE_CONFIGS))
def test_hostile_config_metadata_is_refused_in_one_line_before_building(tmp_path, monkeypatch, case):
    config, named = HOSTILE_CONFIGS[case]
    path = _with_config(tmp_path / "clip.safetensors", config)
    _refuse_real_builds(monkeypatch)
    with pytest.raises(ValueError) as e:
        load_clip(path)
    message = str(e.value)
    assert type(e.value) is ValueError and "\n" not in message, message
    assert str(path) in message and named in message and "python -m coop_min.weights.convert" in message, message
    assert [p.name for p in tmp_path.iterdir()] == ["clip.safetensors"]


def test_tiny_tensors_that_claim_a_huge_tower_are_refused_on_the_meta_device(monkeypatch):
    sd = CLIP(SMALL).state_dict()
    sd["ln_final.weight"] = sd["ln_final.bias"] = torch.zeros(8192)  # infers an 8192-wide text tower: ~8 GB
    _refuse_real_builds(monkeypatch)
    with pytest.raises(ValueError, match="shapes fit no CLIP"):
        build_clip(sd)


def test_the_config_a_file_states_loads_and_the_bounds_admit_the_largest_open_clip_models(tmp_path):
    model = load_clip(_with_config(tmp_path / "clip.safetensors", asdict(SMALL)))
    assert model.config == SMALL
    # ViT-bigG-14 (1664 wide, 48 layers, 104-wide heads) and ViT-H-14 (80-wide image heads), shapes only
    for config in (CLIPConfig(1280, 224, 48, 1664, 14, 16, 77, 49408, 1280, 20, 32),
                   CLIPConfig(1024, 224, 32, 1280, 14, 16, 77, 49408, 1024, 16, 24)):
        with torch.device("meta"):
            sd = CLIP(config).state_dict()
            heads = {"vision_heads": config.vision_heads, "text_heads": config.text_heads}
            assert build_clip(sd, heads).config == config
