"""What train.py and evaluate.py read before they compute, with their defaults: the CLIP weights (a
file, a model name, or the bundled tiny CLIP), the data root (--data, or the bundled demo benchmark),
and the device and precision the frozen CLIP computes in.
"""
import os
from typing import NamedTuple

import torch

from coop_min import hub, weights
from coop_min.clip import CLIP, load_clip
from coop_min.files import sha256_file

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEMO_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(weights.__file__)), "tiny_clip.safetensors")


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_precision(device):
    """The frozen CLIP's compute dtype: bf16 on CUDA (fp32 LayerNorm and logit scale), fp32 on CPU."""
    return "bf16" if str(device).startswith("cuda") else "fp32"


def data_root(data):
    """--data, or the bundled demo benchmark (written into the cache on first use)."""
    if data is not None:
        return data
    from coop_min.demo import materialize_demo
    return materialize_demo(hub.cache_dir())


class Weights(NamedTuple):
    clip: CLIP
    sha256: str          # of the weights file: prompts and checkpoints record it, resuming checks it


def load_weights(path, device, precision="fp32") -> Weights:
    """The frozen CLIP in `precision` on `device`, and its file's sha256, from --weights: a file, a
    model name (`ViT-B/16`, `hf-hub:ORG/NAME`: downloaded once, coop_min/hub.py), or by default the
    bundled tiny CLIP."""
    path = DEMO_WEIGHTS if path is None else path
    check_weights(path)
    if not os.path.isfile(path):
        path = hub.resolve(path)
    return Weights(load_clip(path, device=device, dtype=DTYPES[precision]), sha256_file(path))


def check_weights(path):
    """Refuse, before anything else is checked, --weights that is neither a file nor a model name."""
    if path is None or os.path.isfile(path) or path in hub.NAMES or path.startswith("hf-hub:"):
        return
    raise FileNotFoundError(f"CLIP weights not found: {path}; pass a file from python -m "
                            f"coop_min.weights.convert, one of {', '.join(hub.NAMES)}, or hf-hub:ORG/NAME")
