"""The run folder: what train.py and evaluate.py share about files, devices and the demo.

A run folder holds `config.json` (every setting, resolved), `log.txt` (the progress lines),
`metrics.jsonl` (one JSON line per logged step), `state.pt` (everything needed to continue:
parameters, optimizer, position, RNG, the metrics file's length) and `checkpoint.safetensors` (the
learned parameters), then `prompt.safetensors` and `results.json`. Every file is written through
`files.atomic_write`, so a kill never leaves a half-written one.
"""
import dataclasses
import json
import os

import torch

from coop_min import weights
from coop_min.files import atomic_write, sha256_file, write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEMO_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(weights.__file__)), "tiny_clip.safetensors")


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_precision(device):
    """The frozen CLIP's compute dtype: bf16 on CUDA (fp32 LayerNorm and logit scale), fp32 on CPU."""
    return "bf16" if str(device).startswith("cuda") else "fp32"


def cache_dir():
    """$COOP_MIN_CACHE, else $XDG_CACHE_HOME/coop_min, else ~/.cache/coop_min."""
    if os.environ.get("COOP_MIN_CACHE"):
        return os.environ["COOP_MIN_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "coop_min")


def data_root(data):
    """--data, or the bundled demo benchmark (written into the cache on first use)."""
    if data is not None:
        return data
    from coop_min.demo import materialize_demo
    return materialize_demo(cache_dir())


def load_weights(path, device, precision):
    """(frozen CLIP in `precision` on `device`, the file's sha256) from --weights (default: the demo's)."""
    from coop_min.clip import load_clip

    path = path or DEMO_WEIGHTS
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP weights not found: {path}; convert a checkpoint with "
                                "python -m coop_min.weights.convert")
    return load_clip(path, device=device, dtype=DTYPES[precision]), sha256_file(path)


# ----------------------------------------------------------------------------------------------
# progress


class RunLog:
    """Progress to stdout and log.txt; one JSON line per step/epoch to metrics.jsonl."""

    def __init__(self, folder, metrics_bytes=None):
        self.log = open(os.path.join(folder, "log.txt"), "a")
        path = os.path.join(folder, "metrics.jsonl")
        if metrics_bytes is not None and os.path.exists(path):   # resume: drop lines after the checkpoint
            with open(path, "r+") as f:
                f.truncate(metrics_bytes)
        self.metrics = open(path, "a")

    def print(self, line):
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def record(self, **values):
        self.metrics.write(json.dumps(values) + "\n")
        self.metrics.flush()

    def metrics_bytes(self):
        return self.metrics.tell()


class QuietLog:
    """What a process other than rank 0 logs: nothing (rank 0 writes the run folder)."""

    def print(self, line):
        pass

    def record(self, **values):
        pass


# ----------------------------------------------------------------------------------------------
# the folder and its checkpoints


def start_folder(folder, settings: dict, resume: bool, free=()):
    """Check that `folder` can take a new run (or, with resume, that it holds this run: the same
    settings except those in `free`). Raises SystemExit with one line; changes nothing."""
    config_path, state_path = os.path.join(folder, "config.json"), os.path.join(folder, "state.pt")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SystemExit(f"error: --output {folder} is a file, not a folder; pick another --output")
    if resume:
        if not os.path.exists(state_path):
            raise SystemExit(f"error: --resume but {state_path} does not exist; start without --resume")
        try:
            with open(config_path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read {config_path} ({e}); --resume needs the run's own config.json")
        if not isinstance(saved, dict):
            raise SystemExit(f"error: {config_path} is not a run's config.json; start a new run in another --output")
        changed = sorted(k for k in settings if saved.get(k) != settings[k] and k not in free)
        if changed:
            raise SystemExit(f"error: --resume with different settings ({', '.join(changed)}); use the run's "
                             f"settings or another --output")
    elif os.path.exists(state_path) or os.path.exists(os.path.join(folder, "results.json")):
        raise SystemExit(f"error: {folder} already holds a run; pass --resume to continue it or --output for a new one")
    elif os.path.isdir(folder) and os.listdir(folder):   # a failed run's split.json, or someone else's files
        raise SystemExit(f"error: --output {folder} is not empty (it holds {', '.join(sorted(os.listdir(folder))[:3])}); "
                         "a new run needs a new or empty folder: remove its files or pick another --output")


def write_config(folder, cfg):
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), dataclasses.asdict(cfg))


def kept(folder):
    if os.path.exists(os.path.join(folder, "state.pt")):
        return f"The last good checkpoint is kept in {folder}"
    return "No checkpoint had been written yet"


def save_state(folder, learner, optimizer, epoch, batch, metrics_bytes):
    """state.pt and checkpoint.safetensors after `epoch` epochs and `batch` steps of the next."""
    from safetensors.torch import save_file

    if not all(torch.isfinite(p).all() for p in learner.parameters()):   # never overwrite a good checkpoint
        raise FloatingPointError(f"the learned parameters became nan/inf (checkpoint due after {epoch} epochs and "
                                 f"{batch} steps); stopped. {kept(folder)} (lower --lr or use --precision fp32)")
    state = {"params": {k: v.detach().cpu() for k, v in learner.state_dict().items()},
             "optimizer": optimizer.state_dict(), "epoch": epoch, "batch": batch,
             "metrics_bytes": metrics_bytes, "torch_rng": torch.get_rng_state()}
    atomic_write(os.path.join(folder, "state.pt"), lambda tmp: torch.save(state, tmp))
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in learner.named_parameters()}
    atomic_write(os.path.join(folder, "checkpoint.safetensors"),
                 lambda tmp: save_file(tensors, tmp, metadata={"epoch": str(epoch), "batch": str(batch)}))


def read_state(folder):
    path = os.path.join(folder, "state.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: --resume but {path} does not exist; start without --resume")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise SystemExit(f"error: cannot read {path} ({type(e).__name__}): it is not a state.pt this trainer "
                         "wrote, so the run cannot be resumed; start a new run in another --output") from None


def load_state(folder, learner, optimizer):
    """Restore parameters, optimizer and the RNG from state.pt; returns the state."""
    state = read_state(folder)
    learner.load_state_dict(state["params"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state
