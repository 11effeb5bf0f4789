"""Convert a CLIP checkpoint to the safetensors file that coop_min.clip.load_clip reads.

    python -m coop_min.weights.convert SRC DST.safetensors [--dtype fp32|fp16] [--gelu | --quickgelu]
    python weights/convert.py SRC DST.safetensors ...          (the same, from a checkout)

SRC is detected, not declared:
  - an OpenAI TorchScript archive (ViT-B-16.pt, RN50.pt, ...), read by a restricted unpickler that
    builds tensors and runs no pickled code, and reads no storage whose size in the zip is not what
    its tensors need; a plain torch.save file of a state dict is read with torch.load(weights_only=True).
    A zip whose entries unpack to far more than the file (a zip bomb) is refused before either;
  - an OpenAI / open_clip state dict (.pt .pth .bin .ckpt or .safetensors), possibly nested under
    "state_dict" or "model" and with DDP "module." prefixes (open_clip's key names are OpenAI's);
  - a Hugging Face CLIPModel directory (config.json + model.safetensors or pytorch_model.bin, or
    shards named by an index), mapped key by key onto OpenAI's names. Shards must lie inside the
    directory (or, for a hub cache snapshot, in the cache's blobs folder its links point into).

DST holds OpenAI's key layout as contiguous tensors, fp32 by default (lossless from every source;
fp16 halves the file and rounds every float tensor), and string metadata: "config" (JSON of
coop_min.clip.CLIPConfig), "source" (file name), "source_sha256" (of the file; of config.json and
the weight files for a directory), "format" (openai-jit | state-dict | huggingface). The result is
built with coop_min.clip.build_clip before it is written, and it replaces DST atomically.

Two facts are not in the weights. The activation: OpenAI's and open_clip's "-quickgelu" models use
QuickGELU (the default); most LAION-trained open_clip models use nn.GELU (pass --gelu). A plain state
dict does not say which, so without --gelu or --quickgelu a warning says QuickGELU was assumed. The head
count, inferred as width / 64 as OpenAI does: open_clip's ViT-H-14 image tower (80-wide heads)
needs --vision-heads 16. A Hugging Face config.json states both, and contradicting flags are refused.
"""
import argparse
import hashlib
import json
import os
import sys
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import coop_min.cli as cli   # the module itself: coop_min/__init__.py (coop_min.load) leads here
import coop_min.pickles as pickles
from coop_min.clip import build_clip
from coop_min.files import atomic_write

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # int buffers in OpenAI's archives
_MAX_LAYERS = 128       # coop_min.clip refuses deeper towers too; no CLIP comes near


# ----------------------------------------------------------------------------------------------
# OpenAI TorchScript archives, read without executing pickled code


class _ScriptObject(pickles.Inert):
    """Stands in for every TorchScript class (`__torch__.*`): keeps the pickled state, runs nothing."""


class _TorchScriptUnpickler(pickles.RestrictedUnpickler):
    """Tensors, OrderedDict and TorchScript module objects (as _ScriptObject): what a traced CLIP holds."""

    def __init__(self, archive, prefix):
        super().__init__(archive, prefix, pickles.TENSORS, "CLIP weights need only tensors")

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        return super().find_class(module, name)


def _collect_tensors(obj, prefix, out, seen):
    if id(obj) in seen or not isinstance(obj.state, dict):
        return
    seen.add(id(obj))
    for name, value in obj.state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _collect_tensors(value, f"{prefix}{name}.", out, seen)


def read_torchscript(path) -> dict:
    """Every tensor attribute of a TorchScript archive's module tree, keyed by its attribute path.

    A traced module (OpenAI's archives are traced) keeps exactly its parameters and buffers as
    tensor attributes, so this is its state_dict(), with no pickled code run.
    """
    with pickles.open_zip(path) as archive:
        prefix = pickles.torchscript_prefix(archive)
        if prefix is None:
            raise ValueError(f"{path} is not a TorchScript archive (no <name>/data.pkl beside constants.pkl)")
        try:
            root = _TorchScriptUnpickler(archive, prefix).load()
        except Exception as e:  # untrusted bytes: whatever breaks, the archive is bad
            raise ValueError(f"cannot read TorchScript archive {path}: {e}") from None
    if not isinstance(root, _ScriptObject):
        raise ValueError(f"{path}: data.pkl holds a {type(root).__name__}, not a TorchScript module")
    tensors = {}
    _collect_tensors(root, "", tensors, set())
    return tensors


# ----------------------------------------------------------------------------------------------
# OpenAI / open_clip state dicts


def _torch_load(path):
    try:
        with warnings.catch_warnings():  # a plain pickle warns about its protocol before failing below
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        # weights_only wraps its reason ("unsupported GLOBAL posix.system ...") in two lines of advice
        reason = lines[-2] if lines[0].startswith("Weights only load failed") and len(lines) > 2 else lines[0]
        raise ValueError(f"cannot read {path} with torch.load(weights_only=True): {reason}; is it a PyTorch "
                         "checkpoint (torch.save) of a CLIP state dict?") from None


def _read_safetensors(path):
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {path} as safetensors: {e}") from None


def _openai_layout(sd, path):
    """A loaded checkpoint as a flat state dict with OpenAI's keys, unwrapped and de-prefixed."""
    for key in ("state_dict", "model"):                      # training checkpoints (open_clip, others)
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
    sd = {str(k).removeprefix("module."): v for k, v in sd.items()}   # DistributedDataParallel
    sd = {k: v for k, v in sd.items() if k not in _OPENAI_EXTRAS}
    # a BatchNorm saved without its batch counter gets 0, as nn.BatchNorm's own loader gives it: build_clip
    # needs every key
    for k in [k for k in sd if k.endswith(".running_mean")]:
        counter = k.removesuffix("running_mean") + "num_batches_tracked"
        sd.setdefault(counter, torch.tensor(0, dtype=torch.int64))
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        k = not_tensors[0]
        raise ValueError(f"{path}: {k!r} is a {type(sd[k]).__name__}, not a tensor; is this a state dict?")
    if any(k.startswith(("vision_model.", "text_model.")) for k in sd):
        raise ValueError(f"{path} holds Hugging Face CLIPModel weights: pass the model directory (with config.json)")
    custom_text = [k for k in sd if k.startswith("text.")]
    if custom_text:
        raise ValueError(f"{path} is an open_clip CustomTextCLIP (text tower under 'text.', e.g. {custom_text[0]!r}); "
                         "only CLIPs with OpenAI's text keys (transformer.*, token_embedding.weight) convert")
    return sd


# ----------------------------------------------------------------------------------------------
# Hugging Face CLIPModel directories

# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for config.json files that omit them
_HF_TEXT_DEFAULTS = dict(num_hidden_layers=12, num_attention_heads=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_HF_VISION_DEFAULTS = dict(num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu", layer_norm_eps=1e-5)

# OpenAI key -> Hugging Face key, one line per tensor; the _HF_TRANSPOSED ones are transposed
_HF_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
    "logit_scale": "logit_scale",
}
_HF_TRANSPOSED = ("visual.proj", "text_projection")     # nn.Linear (D, width) -> OpenAI's (width, D) matrix
# one residual block: OpenAI suffix (after resblocks.N.) -> Hugging Face suffixes (after layers.N.),
# several are concatenated along dim 0 (separate q, k, v projections -> one packed in_proj)
_HF_BLOCK = {
    "attn.in_proj_weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.in_proj_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.out_proj.weight": ("self_attn.out_proj.weight",),
    "attn.out_proj.bias": ("self_attn.out_proj.bias",),
    "ln_1.weight": ("layer_norm1.weight",),
    "ln_1.bias": ("layer_norm1.bias",),
    "mlp.c_fc.weight": ("mlp.fc1.weight",),
    "mlp.c_fc.bias": ("mlp.fc1.bias",),
    "mlp.c_proj.weight": ("mlp.fc2.weight",),
    "mlp.c_proj.bias": ("mlp.fc2.bias",),
    "ln_2.weight": ("layer_norm2.weight",),
    "ln_2.bias": ("layer_norm2.bias",),
}


def _read_json_object(path):
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:   # ValueError: not JSON, or not UTF-8
        raise ValueError(f"cannot read {path} as JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds {json.dumps(obj)[:40]}, not a JSON object")
    return obj


def _hf_weight_files(directory):
    """The weight files of a Hugging Face model directory, sharded or not."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
        index = directory / f"{name}.index.json"
        if index.is_file():
            return _hf_shards(directory, index)
    raise ValueError(f"{directory} has no model.safetensors or pytorch_model.bin (TF/Flax weights do not convert)")


def _hf_shards(directory, index):
    """The shard files that an index's weight_map names, each a file inside directory."""
    weight_map = _read_json_object(index).get("weight_map")
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
        raise ValueError(f"{index} has no weight_map of weight names to shard file names; download the model again")
    d = directory.resolve()
    # a hub cache snapshot (<repo>/snapshots/<rev>) holds links into <repo>/blobs
    homes = [d, d.parent.parent / "blobs"] if d.parent.name == "snapshots" else [d]
    names = sorted(set(weight_map.values()))
    for name in names:
        if not any((directory / name).resolve().is_relative_to(home) for home in homes):
            raise ValueError(f"{index} names the shard {name!r}, which lies outside {directory} (at "
                             f"{(directory / name).resolve()}); refusing to read it")
        if not (directory / name).is_file():
            raise ValueError(f"{index} names the shard {name!r}, which is not a file in {directory}")
    return [directory / name for name in names]


def _hf_shard(path):
    """The {name: tensor} of one Hugging Face weight file."""
    weights = _read_safetensors(path) if path.suffix == ".safetensors" else _torch_load(path)
    if not (isinstance(weights, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in weights.items())):
        raise ValueError(f"{path} holds no {{name: tensor}} state dict")
    return weights


def _hf_tower(directory, config, tower):
    """config.json's <tower>_config over transformers' defaults, checked; the very old <tower>_config_dict,
    which transformers prefers, over both."""
    c = dict(_HF_TEXT_DEFAULTS if tower == "text" else _HF_VISION_DEFAULTS)
    for key in (f"{tower}_config", f"{tower}_config_dict"):
        sub = config.get(key)
        if sub is not None and not isinstance(sub, dict):
            raise ValueError(f"{directory}/config.json: {key} is {json.dumps(sub)[:40]}, not a JSON object")
        c |= sub or {}
    layers, heads = c["num_hidden_layers"], c["num_attention_heads"]
    if type(layers) is not int or not 1 <= layers <= _MAX_LAYERS:
        raise ValueError(f"{directory}/config.json: {tower} num_hidden_layers is {layers!r}, not an int from 1 "
                         f"to {_MAX_LAYERS}")
    if type(heads) is not int or heads < 1:
        raise ValueError(f"{directory}/config.json: {tower} num_attention_heads is {heads!r}, not a positive int")
    if c["hidden_act"] not in ("quick_gelu", "gelu"):
        raise ValueError(f"{directory}: {tower} hidden_act {c['hidden_act']!r} is neither 'quick_gelu' nor 'gelu'")
    if c["layer_norm_eps"] != 1e-5:
        raise ValueError(f"{directory}: {tower} layer_norm_eps is {c['layer_norm_eps']}, coop_min's CLIP uses 1e-5")
    return c


def _hf_configs(directory):
    """(text, vision) sub-configs of a CLIPModel config.json, HF defaults filled in; refuses others."""
    config = _read_json_object(directory / "config.json")
    kind = config.get("model_type")
    if kind in ("clip_vision_model", "clip_text_model"):
        raise ValueError(f"{directory} is a Hugging Face {kind}, one tower of CLIP; convert a full CLIPModel")
    if kind != "clip":
        raise ValueError(f"{directory} holds model_type {kind!r}, not a Hugging Face CLIPModel ('clip'); Hugging Face "
                         "has no ResNet CLIP: convert OpenAI's RN*.pt or an open_clip state dict instead")
    text, vision = _hf_tower(directory, config, "text"), _hf_tower(directory, config, "vision")
    if text["hidden_act"] != vision["hidden_act"]:
        raise ValueError(f"{directory}: text and vision towers use different activations "
                         f"({text['hidden_act']!r}, {vision['hidden_act']!r}); coop_min's CLIP uses one")
    return text, vision


def from_huggingface(directory):
    """(state dict with OpenAI's keys, config fields stated by config.json) of a CLIPModel directory."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} is a directory without config.json, not a Hugging Face model")
    text, vision = _hf_configs(directory)
    hf = {}
    for f in _hf_weight_files(directory):
        hf.update(_hf_shard(f))
    key_map = {ours: (theirs,) for ours, theirs in _HF_TOP.items()}      # OpenAI key -> HF keys to concatenate
    for ours, theirs, n in (("visual.transformer", "vision_model.encoder", vision["num_hidden_layers"]),
                            ("transformer", "text_model.encoder", text["num_hidden_layers"])):
        for i in range(n):
            for a, b in _HF_BLOCK.items():
                key_map[f"{ours}.resblocks.{i}.{a}"] = tuple(f"{theirs}.layers.{i}.{s}" for s in b)
    missing = [k for theirs in key_map.values() for k in theirs if k not in hf]
    if missing:
        raise ValueError(f"{directory}: {len(missing)} Hugging Face weights are missing, e.g. {missing[:3]}")
    sd = {ours: torch.cat([hf[k] for k in theirs]) if len(theirs) > 1 else hf[theirs[0]]   # q, k, v -> in_proj
          for ours, theirs in key_map.items()}
    for k in _HF_TRANSPOSED:
        sd[k] = sd[k].t()
    used = {k for theirs in key_map.values() for k in theirs}
    extra = [k for k in hf if k not in used and not k.endswith("position_ids")]   # position_ids: an arange buffer
    if extra:
        raise ValueError(f"{directory}: {len(extra)} Hugging Face weights have no place in CLIP, e.g. {extra[:3]}")
    stated = {"vision_heads": vision["num_attention_heads"], "text_heads": text["num_attention_heads"],
              "quick_gelu": text["hidden_act"] == "quick_gelu"}
    return sd, stated


# ----------------------------------------------------------------------------------------------
# conversion


def _read_checkpoint(src):
    """(state dict with OpenAI's keys, config fields the source states, format name) of any source."""
    src = Path(src)
    if src.is_dir():
        return *from_huggingface(src), "huggingface"
    if not src.is_file():
        raise FileNotFoundError(f"no such checkpoint: {src}")
    if src.suffix == ".safetensors":
        return _openai_layout(_read_safetensors(src), src), {}, "state-dict"
    if src.suffix not in _TORCH_SUFFIXES:
        raise ValueError(f"unknown checkpoint format {src.name!r}: expected an OpenAI/open_clip "
                         f"{'/'.join(_TORCH_SUFFIXES)} or .safetensors file, or a Hugging Face CLIPModel directory")
    if zipfile.is_zipfile(src):
        with pickles.open_zip(src) as archive:
            is_torchscript = pickles.torchscript_prefix(archive) is not None
        if is_torchscript:
            return _openai_layout(read_torchscript(src), src), {}, "openai-jit"
    return _openai_layout(_torch_load(src), src), {}, "state-dict"


def _checked_config(sd, config):
    """The CLIPConfig that coop_min.clip.build_clip makes of sd; raises if sd fits no CLIP."""
    if "visual.proj" not in sd and any(k.startswith("visual.transformer.") for k in sd):
        raise ValueError("missing key 'visual.proj' (the ViT image projection)")  # else read as a ResNet
    try:
        with torch.device("meta"):  # names, shapes and sizes are all checked; no memory is touched
            model = build_clip({k: torch.empty_like(v, device="meta") for k, v in sd.items()}, config)
    except Exception as e:  # shapes that fit no CLIP fail in many ways, all the checkpoint's fault
        raise ValueError(f"not a CLIP that coop_min builds: {e}") from None
    return model.config


def _sha256(paths):
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def convert(src, dst, dtype="fp32", gelu=None, vision_heads=None, text_heads=None) -> dict:
    """Write the CLIP checkpoint src as an OpenAI-layout safetensors file dst; returns its metadata.

    gelu: True for nn.GELU, False for QuickGELU, None to take what the source states (QuickGELU when
    it states nothing); a flag that contradicts a Hugging Face config.json is refused."""
    src, dst = Path(src), Path(dst)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {list(_DTYPES)}")
    if dst.suffix != ".safetensors":
        raise ValueError(f"output {dst} must end in .safetensors")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"output folder {dst.parent} does not exist")
    sd, stated, fmt = _read_checkpoint(src)
    asked = {} if gelu is None else {"quick_gelu": not gelu}
    asked |= {k: v for k, v in (("vision_heads", vision_heads), ("text_heads", text_heads)) if v is not None}
    for k, v in asked.items():
        if k in stated and stated[k] != v:
            raise ValueError(f"the flags ask {k}={v} but {src}/config.json says {k}={stated[k]}")
    sd = {k: v.to(dtype=_DTYPES[dtype] if v.is_floating_point() else v.dtype,
                  memory_format=torch.contiguous_format, copy=True) for k, v in sd.items()}
    config = _checked_config(sd, {**stated, **asked})
    files = [src / "config.json", *_hf_weight_files(src)] if src.is_dir() else [src]
    metadata = {"config": json.dumps(asdict(config)), "source": src.name, "source_sha256": _sha256(files),
                "format": fmt}
    atomic_write(str(dst), lambda tmp: save_file(sd, tmp, metadata=metadata))  # old file or new, never half
    return metadata


def main(argv=None):
    doc = __doc__.split("\n\n")
    parser = cli.parser("convert.py", doc[0], epilog="\n\n".join(doc[2:]),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="OpenAI .pt (TorchScript or state dict), open_clip .pt/.pth/.bin/.ckpt/"
                                    ".safetensors state dict, or a Hugging Face CLIPModel directory")
    parser.add_argument("dst", help="output .safetensors file (replaced atomically)")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="fp32",
                        help="dtype of the float tensors written (default fp32, lossless; fp16 halves the file)")
    activation = parser.add_mutually_exclusive_group()
    activation.add_argument("--gelu", action="store_true",
                            help="the model uses nn.GELU, not OpenAI's QuickGELU (most LAION open_clip models)")
    activation.add_argument("--quickgelu", action="store_true",
                            help="the model uses QuickGELU (OpenAI, open_clip -quickgelu): assumed, but say so")
    parser.add_argument("--vision-heads", type=int, help="image-tower heads when not width/64 (open_clip ViT-H-14: 16)")
    parser.add_argument("--text-heads", type=int, help="text-tower heads when not width/64")
    args = parser.parse_args(argv)
    for name in ("vision_heads", "text_heads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    gelu = True if args.gelu else False if args.quickgelu else None
    try:
        meta = convert(args.src, args.dst, args.dtype, gelu, args.vision_heads, args.text_heads)
    except (ValueError, OSError, SafetensorError) as e:   # SafetensorError: e.g. DST not writable
        print(f"convert.py: error: {cli.one_line(e)}", file=sys.stderr)
        return 2
    if meta["format"] == "state-dict" and gelu is None:
        print("convert.py: warning: a state dict does not say its activation; QuickGELU assumed (OpenAI, open_clip "
              "-quickgelu); convert again with --gelu if it is nn.GELU (most LAION open_clip), or pass --quickgelu",
              file=sys.stderr)
    c = json.loads(meta["config"])
    arch = f"ViT {c['vision_layers']}x{c['vision_width']}/{c['vision_patch_size']}" if c["vision_patch_size"] else \
        f"ResNet {c['vision_layers']}x{c['vision_width']}"
    print(f"wrote {args.dst}: {arch} at {c['image_resolution']}px, embed {c['embed_dim']}, "
          f"{'QuickGELU' if c['quick_gelu'] else 'GELU'}, {args.dtype}, from {meta['format']} {meta['source']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
