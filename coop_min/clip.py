"""CLIP (Radford et al., 2021): ViT and ModifiedResNet image encoders and the text transformer.

Recognisable to anyone who knows OpenAI's `clip/model.py`: the same modules, the same parameter
names (so OpenAI state dicts load as they are), the same maths. Simpler where it can be: batch-first
tensors, attention through `F.scaled_dot_product_attention` on packed qkv, a causal flag instead of a
77x77 mask buffer. `build_clip` infers every size from the state dict, as OpenAI's `build_model`.

The text encoder also runs on token *embeddings* (`encode_text_embeddings`): prompt learning replaces
some embeddings with learned context and reads the feature at the EOT position. This file imports
nothing of ours and knows no prompt learning; the speed paths (EOT truncation, shared prefixes, fused
kernels) live in `coop_min/fast.py`.
"""
import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CLIPConfig:
    embed_dim: int                  # joint embedding size D
    image_resolution: int
    vision_layers: int | tuple      # int: ViT depth; 4-tuple: ResNet blocks per stage
    vision_width: int
    vision_patch_size: int | None   # None for ResNets
    vision_heads: int
    context_length: int
    vocab_size: int
    text_width: int                 # W, the width of token embeddings
    text_heads: int
    text_layers: int
    quick_gelu: bool = True         # OpenAI weights use QuickGELU; many open_clip models use GELU

    @property
    def is_vit(self):
        return not isinstance(self.vision_layers, (tuple, list))


# ----------------------------------------------------------------------------------------------
# building blocks


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (weights and input) and cast back, so bf16/fp16 models stay stable.

    With autograd on, backward keeps the bf16/fp16 input rather than its fp32 copy (half the saved
    bytes) and runs the same aten backward on the same fp32 values: gradients are bit-identical.
    """

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        if torch.is_grad_enabled() and x.dtype != torch.float32:           # fp32: x.float() is x, nothing to save
            return _LayerNormFP32.apply(x, w, b, self.normalized_shape, self.eps)
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class _LayerNormFP32(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, shape, eps):
        y, mean, rstd = torch.native_layer_norm(x.float(), shape, w, b, eps)   # mean, rstd (..., 1) fp32
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.shape = shape
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, w, b, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            grad.float(), x.float(), ctx.shape, mean, rstd, w, b, list(ctx.needs_input_grad[:3]))
        return None if dx is None else dx.to(x.dtype), dw, db, None, None


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x). With autograd on, backward keeps only x and recomputes the sigmoid (the
    plain expression keeps x and the sigmoid: twice the bytes of the widest activation), with the
    same ops as autograd of the plain expression, so gradients are bit-identical."""

    def forward(self, x):
        if torch.is_grad_enabled():
            return _QuickGELUFn.apply(x)
        return x * torch.sigmoid(1.702 * x)


class _QuickGELUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        s = torch.sigmoid(1.702 * x)
        # d/dx [x * s(1.702 x)] = grad * s + sigmoid'(grad * x) * 1.702, the terms autograd adds; in
        # place where that rounds the same, so at most three (..., 4W) temporaries live at once
        through_sigmoid = torch.ops.aten.sigmoid_backward(grad * x, s).mul_(1.702)
        through_product = grad * s
        del s
        return through_product.add_(through_sigmoid)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, batch-first, via SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x, causal=False):  # (B, L, W) -> (B, L, W)
        B, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)            # (B, L, 3W)
        q, k, v = qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, L, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, W))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, quick_gelu=True):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, quick_gelu=True):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers)])

    def forward(self, x, causal=False):  # (B, L, W) -> (B, L, W)
        for block in self.resblocks:
            x = block(x, causal)
        return x


# ----------------------------------------------------------------------------------------------
# image encoders


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim, quick_gelu=True):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):  # (B, 3, H, W) -> (B, D)
        x = self.conv1(x).flatten(2).transpose(1, 2)                        # (B, grid*grid, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0, :]) @ self.proj


class Bottleneck(nn.Module):
    """ResNet bottleneck with anti-aliased striding: an avgpool before strided convs, not a stride-2 conv."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """One attention step whose query is the mean of the feature map (plus a positional embedding)."""

    def __init__(self, spacial_dim, embed_dim, heads, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x):  # (B, C, H, W) -> (B, output_dim)
        x = x.flatten(2).transpose(1, 2)                                    # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)              # (B, HW+1, C)
        x = x + self.positional_embedding.to(x.dtype)
        B, L, C = x.shape
        hs = C // self.heads
        q = self.q_proj(x[:, :1]).view(B, 1, self.heads, hs).transpose(1, 2)   # (B, h, 1, hs)
        k = self.k_proj(x).view(B, L, self.heads, hs).transpose(1, 2)          # (B, h, L, hs)
        v = self.v_proj(x).view(B, L, self.heads, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)                            # (B, h, 1, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, C))


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: a 3-conv stem with an avgpool, anti-aliased bottlenecks, attention pooling."""

    def __init__(self, layers, output_dim, heads, input_resolution=224, width=64):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def _make_layer(self, planes, blocks, stride=1):
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


# ----------------------------------------------------------------------------------------------
# CLIP


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        c = self.config = config
        if c.is_vit:
            self.visual = VisionTransformer(c.image_resolution, c.vision_patch_size, c.vision_width,
                                            c.vision_layers, c.vision_heads, c.embed_dim, c.quick_gelu)
        else:
            self.visual = ModifiedResNet(c.vision_layers, c.embed_dim, c.vision_heads,
                                         c.image_resolution, c.vision_width)
        self.context_length = c.context_length
        self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads, c.quick_gelu)
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.text_width))
        self.ln_final = LayerNorm(c.text_width)
        self.text_projection = nn.Parameter(torch.empty(c.text_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self._init_text()

    def _init_text(self):
        # OpenAI's initialisation of the text tower (random-init models are used in tests and benches).
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        w, n = self.transformer.width, self.transformer.layers
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=w ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=w ** -0.5 * (2 * n) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * w) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=w ** -0.5 * (2 * n) ** -0.5)
        nn.init.normal_(self.text_projection, std=w ** -0.5)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, images):  # (B, 3, H, W) -> (B, D), unnormalised
        r = self.visual.input_resolution
        if images.dim() != 4 or images.shape[1:] != (3, r, r):
            raise ValueError(f"expected images of shape (B, 3, {r}, {r}), got {tuple(images.shape)}")
        return self.visual(images.to(self.dtype))

    def encode_text(self, tokens):  # (N, L) long -> (N, D), unnormalised
        eot = tokens.argmax(dim=-1)                 # EOT (49407) is the largest id in the vocabulary
        return self.encode_text_embeddings(self.token_embedding(tokens), eot)

    def encode_text_embeddings(self, x, eot):
        """Text features from token embeddings x (N, L, W) and EOT positions eot (N,) -> (N, D): the
        text transformer over all L positions, read at EOT (OpenAI's encode_text after its embedding)."""
        L = x.shape[1]
        x = x.to(self.dtype) + self.positional_embedding[:L].to(self.dtype)
        x = self.transformer(x, causal=True)
        x = x[torch.arange(x.shape[0], device=x.device), eot]               # (N, W): only EOT rows
        return self.ln_final(x) @ self.text_projection.to(x.dtype)

    def forward(self, images, tokens):
        f = F.normalize(self.encode_image(images), dim=-1)
        t = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp() * f @ t.t()
        return logits_per_image, logits_per_image.t()


# ----------------------------------------------------------------------------------------------
# building from state dicts and files


def infer_config(state_dict) -> CLIPConfig:
    """Every size from the shapes, as OpenAI's build_model (heads = width / 64)."""
    sd = state_dict
    try:
        vit = "visual.proj" in sd
        if vit:
            vision_width = sd["visual.conv1.weight"].shape[0]
            vision_layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = _grid(sd, "visual.positional_embedding")
            resolution, heads = patch * grid, vision_width // 64
        else:
            vision_layers = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")})
                                  for b in (1, 2, 3, 4))
            vision_width = sd["visual.layer1.0.conv1.weight"].shape[0]
            grid = _grid(sd, "visual.attnpool.positional_embedding")
            patch, resolution, heads = None, grid * 32, vision_width * 32 // 64
        text_width = sd["ln_final.weight"].shape[0]
        return CLIPConfig(
            embed_dim=sd["text_projection"].shape[1], image_resolution=resolution,
            vision_layers=vision_layers, vision_width=vision_width, vision_patch_size=patch,
            vision_heads=max(heads, 1), context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0], text_width=text_width,
            text_heads=max(text_width // 64, 1),
            text_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}))
    except KeyError as e:
        raise ValueError(f"state dict is not a CLIP in the OpenAI key layout: missing {e.args[0]!r}") from None
    except IndexError:
        raise ValueError("state dict is not a CLIP: a tensor that gives a size has too few dimensions") from None


def _grid(sd, key):
    """The side of the square grid of patches that a (grid * grid + 1, width) positional embedding covers."""
    n_pos = sd[key].shape[0]
    grid = math.isqrt(max(n_pos - 1, 0))
    if n_pos < 2 or grid * grid + 1 != n_pos:
        raise ValueError(f"{key} has {n_pos} rows, not a square grid + 1")
    return grid


# Sizes beyond these are a corrupt or hostile config, not a CLIP: every OpenAI and open_clip model with
# OpenAI's text tower lies well inside (the largest, ViT-bigG-14: 1664 wide, 48 layers; RN50x64: 448 px
# and a 4096-wide attention pool; all: 77 tokens, 49408 ids), and a CLIP at the bounds would already
# take hundreds of GiB.
_MAX_WIDTH, _MAX_LAYERS = 8192, 128
_MAX_SIZES = {"embed_dim": _MAX_WIDTH, "image_resolution": 1024, "vision_width": _MAX_WIDTH,
              "vision_patch_size": 1024, "vision_heads": _MAX_WIDTH, "context_length": 1024,
              "vocab_size": 1_000_000, "text_width": _MAX_WIDTH, "text_heads": _MAX_WIDTH, "text_layers": _MAX_LAYERS}
# the fields the weights show; the head counts and the activation leave no trace in the shapes
_SHAPE_FIELDS = ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
                 "context_length", "vocab_size", "text_width", "text_layers")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_depth(v):  # a ViT's layer count, or a ResNet's four stage depths
    return _is_int(v) or isinstance(v, (list, tuple)) and len(v) == 4 and all(map(_is_int, v))


def _is_patch(v):  # None for ResNets
    return v is None or _is_int(v)


def _is_bool(v):
    return isinstance(v, bool)


_FIELD_KINDS = {"vision_layers": ("an int or a list of 4 ints", _is_depth),
                "vision_patch_size": ("an int or null", _is_patch), "quick_gelu": ("true or false", _is_bool)}


def _check_config(c: dict):
    """Raises ValueError unless the CLIPConfig fields c could be a CLIP: types, sizes, heads."""
    for k, v in c.items():
        kind, ok = _FIELD_KINDS.get(k, ("an int", _is_int))
        if not ok(v):
            raise ValueError(f"{k} must be {kind}, got {v!r}")
    depths = [c["vision_layers"]] if _is_int(c["vision_layers"]) else c["vision_layers"]
    pool_width = c["vision_width"] * (1 if _is_int(c["vision_layers"]) else 32)  # a ResNet pools 32x its stem
    sizes = [(k, c[k], top) for k, top in _MAX_SIZES.items() if c[k] is not None]
    sizes += [("vision_layers", d, _MAX_LAYERS) for d in depths]
    sizes += [("the image attention width", pool_width, _MAX_WIDTH)]
    for name, v, top in sizes:
        if not 1 <= v <= top:
            raise ValueError(f"{name} is {v}, outside 1..{top} where every real CLIP lies")
    for tower, width, heads in (("vision", pool_width, c["vision_heads"]), ("text", c["text_width"], c["text_heads"])):
        if width % heads:
            raise ValueError(f"{tower}_heads {heads} does not divide the {tower} attention width {width}")


def _resolved_config(inferred: CLIPConfig, config) -> CLIPConfig:
    """inferred, with the fields config (a CLIPConfig, a dict of some of its fields, or None) sets; checked
    against what a CLIP can be and against the weights, before anything is built."""
    if config is not None and not isinstance(config, (CLIPConfig, dict)):
        raise ValueError(f"config must be a CLIPConfig or a dict of its fields, not a {type(config).__name__}")
    fields = asdict(inferred)
    given = asdict(config) if isinstance(config, CLIPConfig) else dict(config or {})
    unknown = [k for k in given if k not in fields]
    if unknown:
        raise ValueError(f"unknown config fields {unknown[:3]}; CLIPConfig has {list(fields)}")
    c = {**fields, **given}
    _check_config(c)
    for k in _SHAPE_FIELDS:
        ours, shown = (tuple(v) if isinstance(v, list) else v for v in (c[k], fields[k]))
        if ours != shown:
            raise ValueError(f"config says {k}={c[k]!r} but the weights' shapes say {shown!r}")
    return CLIPConfig(**{**c, "vision_layers": fields["vision_layers"]})


def build_clip(state_dict, config: CLIPConfig | dict | None = None) -> "CLIP":
    """An fp32, eval-mode, frozen CLIP from a state dict in the OpenAI key layout.

    `config` overrides inferred fields (a dict of CLIPConfig fields), e.g. head counts of models whose
    width is not 64 per head, or quick_gelu=False for open_clip models trained with GELU. Fields the
    shapes show must agree with them; sizes no CLIP has are refused.
    """
    sd = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    cfg = _resolved_config(infer_config(sd), config)
    with torch.device("meta"):  # names and shapes checked without memory: tiny tensors may claim huge layers
        _check_fits(CLIP(cfg), sd)
    model = CLIP(cfg)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return model.float().eval().requires_grad_(False)


def _check_fits(model, sd):
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    if missing or extra:
        raise ValueError(f"state dict does not fit the inferred CLIP: {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(extra)} unexpected keys (e.g. {extra[:3]})")
    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        raise ValueError(f"state dict shapes fit no CLIP: {len(bad)} mismatches, e.g. {bad[:3]} (got, expected)")


def convert_dtype(model: CLIP, dtype) -> CLIP:
    """Cast a CLIP for compute in `dtype`, keeping LayerNorm weights (they run in fp32) and
    logit_scale in fp32 (bf16 would put exp(logit_scale) = 100 off by 1%)."""
    for module in model.modules():
        if isinstance(module, LayerNorm):
            continue
        for name, p in module.named_parameters(recurse=False):
            if name != "logit_scale":
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point():
                setattr(module, name, b.to(dtype))
    return model


_RECONVERT = "reconvert the checkpoint with python -m coop_min.weights.convert"


def load_clip(path, device="cpu", dtype=None) -> CLIP:
    """A CLIP from a safetensors file written by weights/convert.py (config in its metadata)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise FileNotFoundError(f"CLIP weights not found: {path}; convert a checkpoint with "
                                "python -m coop_min.weights.convert") from None
    except Exception as e:
        raise ValueError(f"cannot read CLIP weights {path} ({' '.join(str(e).split())}); is it a safetensors "
                         "file written by python -m coop_min.weights.convert?") from None
    try:
        model = build_clip(sd, _metadata_config(meta)).to(device)
    except (ValueError, TypeError) as e:  # a bad config in the metadata, or tensors that are no CLIP
        raise ValueError(f"{path} holds no CLIP that loads: {' '.join(str(e).split())}; {_RECONVERT}") from None
    return convert_dtype(model, dtype) if dtype not in (None, torch.float32) else model


def _metadata_config(meta):
    """The CLIPConfig fields in a converted file's "config" metadata; None (infer all) when it has none."""
    if "config" not in meta:
        return None
    try:
        config = json.loads(meta["config"])
    except (ValueError, RecursionError) as e:
        raise ValueError(f"its config metadata is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"its config metadata is {meta['config'][:40]!r}, not a JSON object of CLIPConfig fields")
    missing = [k for k in CLIPConfig.__dataclass_fields__ if k not in config]
    if missing:
        raise ValueError(f"its config metadata lacks the fields {missing}")
    return config
