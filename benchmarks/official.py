"""The official compute path, re-created: OpenAI's clip/model.py as vendored by KaiyangZhou/CoOp, cut
to what CoOp and CoCoOp run, and the trainers' prompt learner and losses (trainers/coop.py, cocoop.py).

What makes it the official path rather than ours:
- sequence-first nn.MultiheadAttention blocks with a 77x77 additive -inf causal mask, LayerNorm
  computed in fp32 and cast back;
- fp16 weights as OpenAI's convert_weights leaves them (embeddings, LayerNorm, BatchNorm and
  logit_scale in fp32), and an fp16 context trained by plain SGD (no master weights);
- full 77-token prompts for every class, CoCoOp's per-image Python loop, and the head as normalise /
  logit_scale.exp() * f @ t.T / F.cross_entropy.
The state-dict keys are coop_min.clip.CLIP's, so one random-init state dict loads into both;
tests/test_bench.py checks this path against coop_min.clip on the same weights.
"""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from coop_min.clip import CLIPConfig, ModifiedResNet
from coop_min.tokenizer import tokenize


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


def convert_weights(model, dtype=torch.float16):
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
    (or bf16 the same way: the modelled modes run on the CPU, where bf16 has fp16's bytes and is fast)."""
    with torch.device("meta"):                                # no random init: every tensor is loaded
        model = OfficialCLIP(config)
    model.load_state_dict({k: v.to(device, copy=True) for k, v in state_dict.items()}, assign=True)
    if dtype in (torch.float16, torch.bfloat16):
        convert_weights(model, dtype)
    elif dtype != torch.float32:
        raise ValueError(f"the official path runs fp16 or fp32, got {dtype}")
    return model.eval().requires_grad_(False)


def official_encode_text(clip: OfficialCLIP, prompts, tokenized_prompts):
    """CoOp's TextEncoder.forward: prompt embeddings (N, 77, W), token ids (N, 77) -> (N, D)."""
    x = prompts + clip.positional_embedding.type(clip.dtype)
    x = clip.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)            # NLD -> LND -> NLD
    x = clip.ln_final(x).type(clip.dtype)
    return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ clip.text_projection


# ----------------------------------------------------------------------------------------------
# the trainers: prompt learner, Meta-Net, losses


class OfficialPromptLearner(nn.Module):
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


def meta_net(vis_dim, ctx_dim):
    """CoCoOp's Meta-Net: image feature (.., vis_dim) -> a context shift (.., ctx_dim)."""
    return nn.Sequential(OrderedDict([("linear1", nn.Linear(vis_dim, vis_dim // 16)), ("relu", nn.ReLU(inplace=True)),
                                      ("linear2", nn.Linear(vis_dim // 16, ctx_dim))]))


def coop_loss(clip, learner, images, labels):
    """trainers/coop.py CustomCLIP.forward, then F.cross_entropy."""
    image_features = clip.visual(images.type(clip.dtype))
    text_features = official_encode_text(clip, learner(), learner.tokenized_prompts)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    logits = clip.logit_scale.exp() * image_features @ text_features.t()
    return F.cross_entropy(logits, labels)


def cocoop_loss(clip, learner, images, labels):
    """trainers/cocoop.py CustomCLIP.forward in training mode: one image at a time."""
    image_features = clip.visual(images.type(clip.dtype))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    ctx_shifted = learner.ctx.unsqueeze(0) + learner.meta_net(image_features).unsqueeze(1)  # (B, M, W)
    prompts = torch.stack([learner(ctx_i) for ctx_i in ctx_shifted])     # (B, C, 77, W)
    logits = []
    for pts_i, imf_i in zip(prompts, image_features):
        text_features = official_encode_text(clip, pts_i, learner.tokenized_prompts)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        logits.append(clip.logit_scale.exp() * imf_i @ text_features.t())
    return F.cross_entropy(torch.stack(logits), labels)
