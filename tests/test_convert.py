"""weights/convert.py: every source format lands in OpenAI's key layout and loads with load_clip.

Hugging Face CLIPModel directories are checked against transformers itself (features and logits
of the same random weights, small shapes and ViT-B/16's real ones); OpenAI TorchScript archives
and open_clip state dicts against the tensors they were made from, tensor for tensor.
"""
import hashlib
import importlib.util
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from coop_min.clip import CLIP, CLIPConfig, load_clip

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("convert", ROOT / "weights" / "convert.py")
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)

SMALL_VIT = CLIPConfig(32, 32, 2, 64, 8, 1, 77, 49408, 64, 1, 2)
SMALL_RN = CLIPConfig(32, 64, (1, 1, 1, 1), 8, None, 4, 77, 49408, 64, 1, 2)
RN50 = CLIPConfig(1024, 224, (3, 4, 6, 3), 64, None, 32, 77, 49408, 512, 8, 12)


def _tokens():
    # real-looking ids: SOT, BPE ids, EOT (49407, the largest id, so argmax finds it), zero padding
    rows = [[49406, 320, 1125, 539, 320, 2368, 269, 49407], [49406, 320, 22697, 49407]]
    tokens = torch.zeros(len(rows), 77, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    return tokens


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _perturb(model, seed):
    # random init leaves biases at 0 and LayerNorm at 1; noise everywhere makes every tensor count
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def _small_clip(config, seed=0):
    torch.manual_seed(seed)
    return _perturb(CLIP(config), seed).eval()


def _metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _cli_error(capsys, src, dst):
    """Runs the CLI in-process on bad input: exit status 2 and one line on stderr, returned."""
    capsys.readouterr()                                   # drop what the test's setup printed
    assert convert.main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("convert.py: error: "), err
    return err


# ----------------------------------------------------------------------------------------------
# Hugging Face CLIPModel: parity with transformers


def _hf_clip(tmp_path, seed, text, vision, projection_dim):
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    model = transformers.CLIPModel._from_config(config, attn_implementation="eager")
    _perturb(model, seed).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.1)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def _small_hf_config(act="quick_gelu"):
    text = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, vocab_size=49408, hidden_act=act)
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  patch_size=8, image_size=32, hidden_act=act)
    return text, vision


def _pooled(out):  # transformers >= 5 returns a model output whose pooler_output is the projection
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def _hf_errors(hf, ours, n_images, resolution):
    images, tokens = torch.randn(n_images, 3, resolution, resolution), _tokens()
    ref_image = _pooled(hf.get_image_features(pixel_values=images))
    ref_text = _pooled(hf.get_text_features(input_ids=tokens))
    ref_logits = hf(input_ids=tokens, pixel_values=images).logits_per_image
    return {"image": _rel(ours.encode_image(images), ref_image), "text": _rel(ours.encode_text(tokens), ref_text),
            "logits": _rel(ours(images, tokens)[0], ref_logits)}


def test_small_hf_clip_converts_by_cli_and_matches_transformers(tmp_path):
    hf, directory = _hf_clip(tmp_path, 0, *_small_hf_config(), projection_dim=32)
    dst = tmp_path / "clip.safetensors"
    run = subprocess.run([sys.executable, str(ROOT / "weights" / "convert.py"), str(directory), str(dst)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0 and run.stderr == "", run.stderr     # config.json states the activation
    meta = _metadata(dst)
    config = json.loads(meta["config"])
    assert meta["format"] == "huggingface" and config["vision_heads"] == 4 and config["text_heads"] == 4
    assert config["quick_gelu"] is True
    errors = _hf_errors(hf, load_clip(dst), 2, 32)
    print("HF small quick_gelu (CLI)", errors)
    assert max(errors.values()) <= 1e-5, errors


def test_hf_sharded_bin_and_old_config_layouts_convert_to_the_same_tensors(tmp_path):
    """The same model saved as shards with an index, as pytorch_model.bin, and with an old config.json
    (text_config_dict / vision_config_dict) converts to exactly the single-file result."""
    import shutil

    hf, directory = _hf_clip(tmp_path, 3, *_small_hf_config(), projection_dim=32)
    convert.convert(directory, tmp_path / "single.safetensors")
    sharded, as_bin, old = tmp_path / "sharded", tmp_path / "bin", tmp_path / "old"
    hf.save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("model-*.safetensors"))) > 2
    as_bin.mkdir()
    shutil.copy(directory / "config.json", as_bin / "config.json")
    torch.save(hf.state_dict(), as_bin / "pytorch_model.bin")
    shutil.copytree(directory, old)
    config = json.loads((old / "config.json").read_text())
    config["text_config_dict"], config["vision_config_dict"] = config.pop("text_config"), config.pop("vision_config")
    (old / "config.json").write_text(json.dumps(config))
    expected = load_file(str(tmp_path / "single.safetensors"))
    for source in (sharded, as_bin, old):
        convert.convert(source, tmp_path / f"{source.name}.safetensors")
        got = load_file(str(tmp_path / f"{source.name}.safetensors"))
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected), source


def test_hf_gelu_config_converts_to_gelu_and_matches(tmp_path):
    hf, directory = _hf_clip(tmp_path, 1, *_small_hf_config("gelu"), projection_dim=32)
    meta = convert.convert(directory, tmp_path / "clip.safetensors")
    assert json.loads(meta["config"])["quick_gelu"] is False
    errors = _hf_errors(hf, load_clip(tmp_path / "clip.safetensors"), 2, 32)
    print("HF small gelu", errors)
    assert max(errors.values()) <= 1e-5, errors
    with pytest.raises(ValueError, match="quick_gelu"):                    # --quickgelu contradicts config.json
        convert.convert(directory, tmp_path / "quick.safetensors", gelu=False)


def test_hf_vit_b16_real_shapes_match_transformers(tmp_path):
    text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12)    # 8 heads: HF's default
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, patch_size=16, image_size=224)
    hf, directory = _hf_clip(tmp_path, 2, text, vision, projection_dim=512)
    meta = convert.convert(directory, tmp_path / "clip.safetensors")
    config = json.loads(meta["config"])
    assert (config["vision_heads"], config["text_heads"], config["vision_patch_size"]) == (12, 8, 16)
    errors = _hf_errors(hf, load_clip(tmp_path / "clip.safetensors"), 1, 224)
    print("HF ViT-B/16", errors)
    assert max(errors.values()) <= 1e-5, errors


def test_hf_one_tower_models_and_foreign_settings_are_refused(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    text, vision = _small_hf_config()
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision)).save_pretrained(tmp_path / "vision")
    assert "clip_vision_model" in _cli_error(capsys, tmp_path / "vision", tmp_path / "a.safetensors")

    _, directory = _hf_clip(tmp_path, 3, text, vision, projection_dim=32)
    config = json.loads((directory / "config.json").read_text())
    config["vision_config"]["layer_norm_eps"] = 1e-6
    (directory / "config.json").write_text(json.dumps(config))
    assert "layer_norm_eps" in _cli_error(capsys, directory, tmp_path / "b.safetensors")


@pytest.mark.parametrize("damage", ["missing", "extra"])
def test_hf_missing_or_extra_weight_is_named(tmp_path, capsys, damage):
    _, directory = _hf_clip(tmp_path, 4, *_small_hf_config(), projection_dim=32)
    weights = load_file(directory / "model.safetensors")
    key = "text_model.encoder.layers.1.self_attn.k_proj.bias"
    if damage == "missing":
        del weights[key]
    else:
        key = "text_model.encoder.layers.2.mlp.fc1.bias"
        weights[key] = torch.zeros(256)
    save_file(weights, directory / "model.safetensors")
    assert key in _cli_error(capsys, directory, tmp_path / "clip.safetensors")


# ----------------------------------------------------------------------------------------------
# OpenAI TorchScript archives


class _OpenAILayout(nn.Module):
    """A CLIP with OpenAI's archive attributes: its modules at the root plus three int buffers."""

    def __init__(self, clip):
        super().__init__()
        for name, child in clip.named_children():
            setattr(self, name, child)
        for name, p in clip.named_parameters(recurse=False):
            setattr(self, name, p)
        c = clip.config
        for name, value in (("input_resolution", c.image_resolution), ("context_length", c.context_length),
                            ("vocab_size", c.vocab_size)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, x):
        return x * self.logit_scale


def _openai_half(clip):
    # OpenAI's convert_weights: conv/linear/attention weights and both projections fp16, the rest fp32
    for module in clip.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, (nn.Conv2d, nn.Linear)) or name in ("in_proj_weight", "in_proj_bias", "proj",
                                                                      "text_projection"):
                p.data = p.data.half()
    return clip


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")   # OpenAI's format is TorchScript
@pytest.mark.parametrize("config", [SMALL_VIT, SMALL_RN], ids=["vit", "resnet"])
def test_openai_torchscript_archive_converts_tensor_for_tensor(tmp_path, capsys, config):
    clip = _small_clip(config)
    reference = {k: v.clone() for k, v in _openai_half(clip).state_dict().items()}
    traced = torch.jit.trace(_OpenAILayout(clip), torch.ones(1))
    torch.jit.save(traced, str(tmp_path / "model.pt"))

    meta = convert.convert(tmp_path / "model.pt", tmp_path / "clip.safetensors")
    out = load_file(tmp_path / "clip.safetensors")
    assert meta["format"] == "openai-jit" and set(out) == set(reference)
    for k, v in reference.items():
        assert out[k].dtype == (torch.float32 if v.is_floating_point() else v.dtype), k
        assert torch.equal(out[k], v.to(out[k].dtype)), k
    # the restricted reader sees what torch.jit.load (which runs the archive's code) calls the state dict
    read = convert.read_torchscript(tmp_path / "model.pt")
    loaded = torch.jit.load(str(tmp_path / "model.pt")).state_dict()
    assert set(read) == set(loaded) == set(reference) | {"input_resolution", "context_length", "vocab_size"}
    assert all(torch.equal(read[k], loaded[k]) and read[k].dtype == loaded[k].dtype for k in read)
    capsys.readouterr()                                  # OpenAI's archives are QuickGELU: nothing to warn about
    assert convert.main([str(tmp_path / "model.pt"), str(tmp_path / "cli.safetensors")]) == 0
    assert capsys.readouterr().err == ""


def _malicious_pickle(marker, inside_torchscript_module):
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    payload = pickle.dumps(Payload(), protocol=2)
    assert any(op.name == "GLOBAL" and "system" in arg for op, arg, _ in pickletools.genops(payload))
    if not inside_torchscript_module:
        return payload
    # a TorchScript-looking module (GLOBAL __torch__.M, NEWOBJ, BUILD) whose state holds the payload
    return b"\x80\x02c__torch__\nM\n)\x81}X\x01\x00\x00\x00x" + payload[2:-1] + b"sb."


@pytest.mark.parametrize("torchscript", [True, False], ids=["torchscript-reader", "torch.load-weights-only"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, capsys, torchscript):
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("evil/data.pkl", _malicious_pickle(marker, torchscript))
        if torchscript:
            z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        else:  # the records torch.save writes, so that torch.load gets as far as unpickling
            z.writestr("evil/version", "3\n")
            z.writestr("evil/byteorder", "little")
    err = _cli_error(capsys, tmp_path / "evil.pt", tmp_path / "clip.safetensors")
    assert "system" in err and not marker.exists()
    assert not (tmp_path / "clip.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# a torch 1.7 TorchScript archive, as OpenAI's are, written by hand: torch.jit.save writes today's format


class _Torch17Pickler:
    """data.pkl opcode by opcode as torch 1.7's C++ Pickler writes it: protocol 2; each string, global,
    storage, tensor and module memoized (BINPUT, LONG_BINPUT from memo id 256 on), a string, global or
    storage fetched with BINGET when it comes again; a module is GLOBAL __torch__.<mangled name>, NEWOBJ
    and a BUILD of its attribute dict; a tensor is
    torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())."""

    def __init__(self, six_item_keys):
        self.out, self.memo, self.n_modules = bytearray(b"\x80\x02"), {}, 0
        self.six_item_keys = six_item_keys     # storages whose id ends in None, as torch.save's legacy format

    def _fetched(self, key):
        """True after a BINGET of key if it is memoized; else False, and the caller pushes it and _puts it."""
        if key not in self.memo:
            return False
        i = self.memo[key]
        self.out += b"h" + struct.pack("<B", i) if i < 256 else b"j" + struct.pack("<I", i)
        return True

    def _put(self, key):
        i = self.memo[key] = len(self.memo)
        self.out += b"q" + struct.pack("<B", i) if i < 256 else b"r" + struct.pack("<I", i)

    def string(self, s):
        if not self._fetched(("str", s)):
            self.out += b"X" + struct.pack("<I", len(s.encode())) + s.encode()
            self._put(("str", s))

    def global_(self, qualname):
        if not self._fetched(("global", qualname)):
            module, name = qualname.rsplit(".", 1)
            self.out += f"c{module}\n{name}\n".encode()
            self._put(("global", qualname))

    def int_(self, n):                           # BININT1, BININT2 or BININT: the smallest that holds n
        if n < 256:
            self.out += b"K" + struct.pack("<B", n)
        elif n < 65536:
            self.out += b"M" + struct.pack("<H", n)
        else:
            self.out += b"J" + struct.pack("<i", n)

    def ints(self, values):                      # MARK, the ints, TUPLE
        self.out += b"("
        for n in values:
            self.int_(n)
        self.out += b"t"

    def tensor(self, storage_type, key, numel, offset, shape):
        self.global_("torch._utils._rebuild_tensor_v2")
        self.out += b"("
        if not self._fetched(("storage", key)):     # a shared storage comes from the memo
            self.out += b"("
            self.string("storage")
            self.global_(f"torch.{storage_type}")
            self.string(key)
            self.string("cuda:0")
            self.int_(numel)
            self.out += b"NtQ" if key in self.six_item_keys else b"tQ"    # [None,] TUPLE, BINPERSID
            self._put(("storage", key))
        self.int_(offset)
        self.ints(shape)
        self.ints(int(np.prod(shape[i + 1:])) for i in range(len(shape)))   # contiguous strides
        self.out += b"\x89"                         # requires_grad: NEWFALSE
        self.global_("collections.OrderedDict")
        self.out += b")RtR"                         # OrderedDict() (hooks), TUPLE of the arguments, REDUCE
        self._put(("object", len(self.memo)))      # torch memoizes every tensor and module it pickles

    def module(self, qualname, attributes):
        """attributes: {name: a submodule's attributes (dict) or a tensor's arguments (tuple)}"""
        self.global_(qualname)
        self.out += b")\x81}("                      # EMPTY_TUPLE, NEWOBJ, EMPTY_DICT, MARK
        self.string("training")
        self.out += b"\x89"
        for name, value in attributes.items():
            self.string(name)
            if isinstance(value, tuple):
                self.tensor(*value)
            else:
                self.n_modules += 1
                mangled = f"__torch__.torch.nn.modules.module.___torch_mangle_{self.n_modules}.Module"
                self.module(mangled, value)
        self.out += b"ub"                           # SETITEMS, BUILD
        self._put(("object", len(self.memo)))


_NUMPY_STORAGES = {"<f2": "HalfStorage", "<f4": "FloatStorage", "<i8": "LongStorage"}


def _torch17_archive(path, config, drop=()):
    """Writes a TorchScript archive of a CLIP, as torch 1.7 wrote OpenAI's, of random values; returns
    ({key: numpy array written}, data.pkl). Matrices are fp16, vectors fp32 (OpenAI's convert_weights);
    a 1-D bias shares its weight's storage, after it; even-numbered storages have six-item ids."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CLIP(config).state_dict().items() if not k.endswith(drop)}
    rng = np.random.default_rng(0)
    arrays = {k: rng.standard_normal(s).astype("<f2" if len(s) >= 2 else "<f4") for k, s in shapes.items()}
    arrays |= {k: np.array(7, "<i8") for k in shapes if k.endswith("num_batches_tracked")}
    arrays |= {"input_resolution": np.array(config.image_resolution, "<i8"),
               "context_length": np.array(config.context_length, "<i8"),
               "vocab_size": np.array(config.vocab_size, "<i8")}
    storages, placed = [], {}                       # lists of arrays; key -> (storage number, offset)
    for k, a in arrays.items():
        weight = k.removesuffix("bias") + "weight"
        if k.endswith(".bias") and a.ndim == 1 and weight in placed and arrays[weight].ndim == 1:
            placed[k] = (placed[weight][0], sum(x.size for x in storages[placed[weight][0]]))
            storages[placed[k][0]].append(a)
        else:
            placed[k] = (len(storages), 0)
            storages.append([a])
    tree = {}
    for k, (i, offset) in placed.items():
        *modules, name = k.split(".")
        node = tree
        for m in modules:
            node = node.setdefault(m, {})
        numel = sum(x.size for x in storages[i])
        node[name] = (_NUMPY_STORAGES[arrays[k].dtype.str], str(i), numel, offset, arrays[k].shape)
    pickler = _Torch17Pickler(six_item_keys={str(i) for i in range(0, len(storages), 2)})
    pickler.module("__torch__.multimodal.model.multimodal_transformer.___torch_mangle_12.Multimodal", tree)
    data_pkl = bytes(pickler.out + b".")
    _write_torchscript_zip(path, data_pkl, [b"".join(x.tobytes() for x in parts) for parts in storages])
    return arrays, data_pkl


def _write_torchscript_zip(path, data_pkl, storages):
    with zipfile.ZipFile(path, "w") as z:             # entries stored uncompressed, as torch writes them
        z.writestr("ViT-B-16/version", "3\n")
        z.writestr("ViT-B-16/data.pkl", data_pkl)
        z.writestr("ViT-B-16/constants.pkl", b"\x80\x02).")
        for i, data in enumerate(storages):
            z.writestr(f"ViT-B-16/data/{i}", data)


def test_torch17_archive_written_by_hand_converts_to_the_values_written(tmp_path):
    """OpenAI's format: mangled __torch__ class names, storages on cuda:0, two tensors in one storage at
    different offsets, over 256 memo entries, storage ids of five and of six items (the sixth None)."""
    arrays, data_pkl = _torch17_archive(tmp_path / "ViT-B-16.pt", SMALL_VIT)
    ops = [op.name for op, _, _ in pickletools.genops(data_pkl)]
    assert "LONG_BINPUT" in ops and ops.count("BINPERSID") < len(arrays) and ops.count("NONE") > 0
    meta = convert.convert(tmp_path / "ViT-B-16.pt", tmp_path / "clip.safetensors")
    out = load_file(tmp_path / "clip.safetensors")
    assert meta["format"] == "openai-jit" and json.loads(meta["config"]) == asdict(SMALL_VIT)
    assert set(out) == set(arrays) - {"input_resolution", "context_length", "vocab_size"}
    for k, v in out.items():
        assert v.dtype == torch.float32 and np.array_equal(v.numpy(), arrays[k].astype(np.float32)), k
    load_clip(tmp_path / "clip.safetensors")


def test_batchnorm_without_num_batches_tracked_gets_a_zero_counter(tmp_path):
    arrays, _ = _torch17_archive(tmp_path / "RN.pt", SMALL_RN, drop=("num_batches_tracked",))
    convert.convert(tmp_path / "RN.pt", tmp_path / "clip.safetensors")
    out = load_file(tmp_path / "clip.safetensors")
    counters = [k for k in out if k.endswith("num_batches_tracked")]
    assert len(counters) == len([k for k in arrays if k.endswith("running_mean")]) > 0
    assert all(out[k].dtype == torch.int64 and out[k].shape == () and out[k].item() == 0 for k in counters)
    assert all(np.array_equal(out[k].numpy(), arrays[k].astype(np.float32)) for k in out if k not in counters)
    load_clip(tmp_path / "clip.safetensors")


def test_torchscript_storage_is_read_in_place_not_held_twice(tmp_path):
    n = 16 << 20                                        # one 64 MiB storage
    pickler = _Torch17Pickler(six_item_keys=set())
    pickler.module("__torch__.M", {"w": ("FloatStorage", "0", n, 0, (n,))})
    values = np.arange(n, dtype="<f4")                # exact in fp32: n = 2**24
    _write_torchscript_zip(tmp_path / "big.pt", bytes(pickler.out + b"."), [values.tobytes()])
    tracemalloc.start()
    try:
        w = convert.read_torchscript(tmp_path / "big.pt")["w"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * 4 * n, f"reading a {4 * n} byte storage peaked at {peak} bytes"   # a copy makes 2x
    assert np.array_equal(w.numpy(), values)


# ----------------------------------------------------------------------------------------------
# OpenAI / open_clip state dicts


@torch.no_grad()
def test_open_clip_checkpoint_with_state_dict_nesting_module_prefix_and_gelu(tmp_path):
    clip = _small_clip(replace(SMALL_VIT, quick_gelu=False), seed=5)
    checkpoint = {"epoch": 32, "name": "run", "state_dict": {"module." + k: v for k, v in clip.state_dict().items()}}
    torch.save(checkpoint, tmp_path / "epoch_32.pt")
    meta = convert.convert(tmp_path / "epoch_32.pt", tmp_path / "clip.safetensors", gelu=True)
    assert meta["format"] == "state-dict" and json.loads(meta["config"])["quick_gelu"] is False
    ours, images, tokens = load_clip(tmp_path / "clip.safetensors"), torch.randn(2, 3, 32, 32), _tokens()
    assert torch.equal(ours.encode_image(images), clip.encode_image(images))
    assert torch.equal(ours.encode_text(tokens), clip.encode_text(tokens))
    convert.convert(tmp_path / "epoch_32.pt", tmp_path / "quick.safetensors")      # forgetting --gelu shows
    assert _rel(load_clip(tmp_path / "quick.safetensors").encode_image(images), clip.encode_image(images)) > 1e-4


def test_safetensors_source_to_fp16_with_metadata(tmp_path):
    clip = _small_clip(SMALL_RN, seed=6)
    save_file(clip.state_dict(), tmp_path / "open_clip_model.safetensors")
    meta = convert.convert(tmp_path / "open_clip_model.safetensors", tmp_path / "clip.safetensors", dtype="fp16")
    source_hash = hashlib.sha256((tmp_path / "open_clip_model.safetensors").read_bytes()).hexdigest()
    expected = {**asdict(SMALL_RN), "vision_layers": list(SMALL_RN.vision_layers)}
    assert meta == _metadata(tmp_path / "clip.safetensors")
    assert meta["source"] == "open_clip_model.safetensors" and meta["source_sha256"] == source_hash
    assert meta["format"] == "state-dict" and json.loads(meta["config"]) == expected
    out = load_file(tmp_path / "clip.safetensors")
    for k, v in clip.state_dict().items():
        assert torch.equal(out[k], v.half() if v.is_floating_point() else v), k


@pytest.mark.parametrize("damage", ["missing", "extra", "shape", "custom-text", "hf-file"])
def test_bad_state_dict_exits_2_naming_a_key(tmp_path, capsys, damage):
    sd = _small_clip(SMALL_VIT).state_dict()
    key = {"missing": "transformer.resblocks.1.ln_2.bias", "extra": "visual.transformer.resblocks.0.ls_1.gamma",
           "shape": "visual.positional_embedding", "custom-text": "text.token_embedding.weight",
           "hf-file": "vision_model.embeddings.class_embedding"}[damage]
    if damage == "missing":
        del sd[key]
    elif damage == "shape":
        sd[key] = torch.zeros(18, 64)                         # a 4x4 grid has 17 rows: 18 fits no ViT
    else:
        sd[key] = torch.zeros(64)
    torch.save(sd, tmp_path / "bad.pt")
    (tmp_path / "clip.safetensors").write_bytes(b"old")
    err = _cli_error(capsys, tmp_path / "bad.pt", tmp_path / "clip.safetensors")
    assert key in err or (damage == "hf-file" and "Hugging Face" in err), err
    assert (tmp_path / "clip.safetensors").read_bytes() == b"old"     # a failed run leaves DST alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "clip.safetensors"]


def test_unknown_or_missing_source_exits_2(tmp_path, capsys):
    (tmp_path / "weights.npz").write_bytes(b"\x00" * 16)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    for src in ("weights.npz", "garbage.pt", "absent.pt", "."):
        _cli_error(capsys, tmp_path / src, tmp_path / "clip.safetensors")
    assert not (tmp_path / "clip.safetensors").exists()


@torch.no_grad()
def test_rn50_real_shapes_round_trip_through_a_state_dict(tmp_path):
    clip = _small_clip(RN50, seed=7)
    torch.save(clip.state_dict(), tmp_path / "RN50.pt")
    meta = convert.convert(tmp_path / "RN50.pt", tmp_path / "clip.safetensors")
    expected = {**asdict(RN50), "vision_layers": [3, 4, 6, 3]}
    assert json.loads(meta["config"]) == expected
    ours, images, tokens = load_clip(tmp_path / "clip.safetensors"), torch.randn(1, 3, 224, 224), _tokens()
    assert torch.equal(ours.encode_image(images), clip.encode_image(images))
    assert torch.equal(ours.encode_text(tokens), clip.encode_text(tokens))


# ----------------------------------------------------------------------------------------------
# hostile inputs: exit 2 and one line, before anything big is read or anything is written


def _refused(capsys, src, dst):
    """_cli_error, plus: DST was not written and nothing was left beside it."""
    before = sorted(p.name for p in dst.parent.iterdir())
    err = _cli_error(capsys, src, dst)
    assert not dst.exists() and sorted(p.name for p in dst.parent.iterdir()) == before
    return err


HOSTILE_HF_CONFIGS = {  # id: (config.json text, what the message names)
    "list": ("[1, 2]", "not a JSON object"),
    "null": ("null", "not a JSON object"),
    "string": ('"clip"', "not a JSON object"),
    "not-utf8": (b"\xff\xfe{", "config.json"),
    "nested-too-deep": ("[" * 100_000, "config.json"),
    "text_config-list": ({"model_type": "clip", "text_config": [1]}, "text_config"),
    "vision_config_dict-string": ({"model_type": "clip", "vision_config_dict": "x"}, "vision_config_dict"),
    "layers-as-string": ({"model_type": "clip", "text_config": {"num_hidden_layers": "12"}}, "num_hidden_layers"),
    "layers-as-float": ({"model_type": "clip", "vision_config": {"num_hidden_layers": 1e8}}, "num_hidden_layers"),
    "layers-1e8": ({"model_type": "clip", "vision_config": {"num_hidden_layers": 10 ** 8}}, "num_hidden_layers"),
    "heads-as-string": ({"model_type": "clip", "text_config": {"num_attention_heads": "8"}}, "num_attention_heads"),
}


@pytest.mark.parametrize("case", list(HOSTILE_HF_CONFIGS))
def test_hostile_hf_config_json_exits_2_in_one_line(tmp_path, capsys, case):
    config, named = HOSTILE_HF_CONFIGS[case]
    directory = tmp_path / "hf"
    directory.mkdir()
    raw = config if isinstance(config, (str, bytes)) else json.dumps(config)
    (directory / "config.json").write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    save_file({"logit_scale": torch.zeros(())}, directory / "model.safetensors")   # weights the config is read with
    err = _refused(capsys, directory, tmp_path / "clip.safetensors")
    assert named in err, err


def _indexed_dir(tmp_path, weight_map):
    """A CLIPModel directory whose weights are named by model.safetensors.index.json."""
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "clip"}))
    index = {"metadata": {}} if weight_map is None else {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


@pytest.mark.parametrize("case", ["no-weight_map", "list-weight_map", "number-shard", "dot-dot", "absolute",
                                  "symlink-out"])
def test_bad_shard_index_exits_2_and_reads_nothing_outside_the_folder(tmp_path, capsys, case):
    outside = tmp_path / "elsewhere" / "secret.safetensors"
    outside.parent.mkdir()
    save_file({"text_projection.weight": torch.zeros(2, 2)}, outside)
    shard = {"no-weight_map": None, "list-weight_map": ["model-1.safetensors"], "number-shard": {"a": 1},
             "dot-dot": {"a": "../elsewhere/secret.safetensors"}, "absolute": {"a": str(outside)},
             "symlink-out": {"a": "link.safetensors"}}[case]
    directory = _indexed_dir(tmp_path, shard)
    if case == "symlink-out":
        (directory / "link.safetensors").symlink_to(outside)
    err = _refused(capsys, directory, tmp_path / "clip.safetensors")
    assert ("outside" in err) if case in ("dot-dot", "absolute", "symlink-out") else ("weight_map" in err), err


def test_hf_hub_cache_snapshot_whose_shards_link_into_blobs_converts(tmp_path):
    """The hub cache keeps files in <repo>/blobs and links to them from <repo>/snapshots/<rev>/."""
    hf, directory = _hf_clip(tmp_path, 3, *_small_hf_config(), projection_dim=32)
    convert.convert(directory, tmp_path / "single.safetensors")
    repo = tmp_path / "models--org--clip"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    for i, f in enumerate(sorted((tmp_path / "sharded").iterdir())):
        f.rename(blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(f"../../blobs/blob{i}")
    convert.convert(snapshot, tmp_path / "cached.safetensors")
    cached, single = load_file(tmp_path / "cached.safetensors"), load_file(tmp_path / "single.safetensors")
    assert cached.keys() == single.keys()
    assert [k for k in single if not torch.equal(cached[k], single[k])] == []      # the single file's values
    written = hf.state_dict()                                                    # the tensors written, by hand
    assert torch.equal(cached["token_embedding.weight"], written["text_model.embeddings.token_embedding.weight"])
    assert torch.equal(cached["text_projection"], written["text_projection.weight"].t())
    assert torch.equal(cached["transformer.resblocks.1.attn.in_proj_bias"], torch.cat(
        [written[f"text_model.encoder.layers.1.self_attn.{x}_proj.bias"] for x in "qkv"]))
    errors = _hf_errors(hf, load_clip(tmp_path / "cached.safetensors"), 2, 32)  # and all of them, by their use
    assert max(errors.values()) <= 1e-5, errors


@pytest.fixture
def opened_entries(monkeypatch):
    """The names of the zip entries anything opens (reads) during the test."""
    names, real_open = [], zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        names.append(getattr(name, "filename", name))
        return real_open(self, name, *args, **kwargs)
    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    return names


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("damage", ["oversize", "undersize"])
def test_torchscript_storage_of_the_wrong_size_is_refused_before_it_is_read(tmp_path, capsys, opened_entries,
                                                                           damage):
    torch.jit.save(torch.jit.trace(_OpenAILayout(_small_clip(SMALL_VIT)), torch.ones(1)), str(tmp_path / "ok.pt"))
    with zipfile.ZipFile(tmp_path / "ok.pt") as src, zipfile.ZipFile(tmp_path / "bad.pt", "w") as dst:
        storages = [i for i in src.infolist() if "/data/" in i.filename]
        victim = max(storages, key=lambda i: i.file_size)
        for info in src.infolist():
            data = src.read(info)
            if info is victim:   # a storage entry 8 MiB longer than its tensors need, or half as long
                data = data + bytes(8 << 20) if damage == "oversize" else data[: len(data) // 2]
            dst.writestr(info.filename, data)
    opened_entries.clear()
    err = _refused(capsys, tmp_path / "bad.pt", tmp_path / "clip.safetensors")
    assert "bytes in the zip" in err and victim.filename not in opened_entries, err


def test_zip_bomb_is_refused_before_any_entry_is_read(tmp_path, capsys, opened_entries):
    with zipfile.ZipFile(tmp_path / "bomb.pt", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb/data.pkl", pickle.dumps({}, protocol=2))
        z.writestr("bomb/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("bomb/data/0", bytes(32 << 20))      # 32 MiB of zeros deflate to 32 KiB
    opened_entries.clear()
    err = _refused(capsys, tmp_path / "bomb.pt", tmp_path / "clip.safetensors")
    assert "zip bomb" in err and opened_entries == [], err


# ----------------------------------------------------------------------------------------------
# the activation a plain state dict cannot show


@pytest.mark.parametrize("flags, quick_gelu, warned", [([], True, True), (["--quickgelu"], True, False),
                                                       (["--gelu"], False, False)],
                         ids=["unstated", "quickgelu", "gelu"])
def test_state_dict_activation_is_warned_about_unless_a_flag_states_it(tmp_path, capsys, flags, quick_gelu, warned):
    torch.save(_small_clip(SMALL_VIT).state_dict(), tmp_path / "sd.pt")
    capsys.readouterr()
    assert convert.main([str(tmp_path / "sd.pt"), str(tmp_path / "clip.safetensors"), *flags]) == 0
    err = capsys.readouterr().err
    assert json.loads(_metadata(tmp_path / "clip.safetensors")["config"])["quick_gelu"] is quick_gelu
    if warned:
        assert err.count("\n") == 1 and err.startswith("convert.py: warning: ") and "QuickGELU" in err, err
        assert "--gelu" in err and "--quickgelu" in err, err
    else:
        assert err == ""


def test_gelu_and_quickgelu_together_exit_2_in_one_line(tmp_path, capsys):
    torch.save(_small_clip(SMALL_VIT).state_dict(), tmp_path / "sd.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        convert.main([str(tmp_path / "sd.pt"), str(tmp_path / "clip.safetensors"), "--gelu", "--quickgelu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--quickgelu" in err, err
    assert not (tmp_path / "clip.safetensors").exists()
