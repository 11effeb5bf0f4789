"""The run folder: what train.py and evaluate.py share about files, devices and the demo.

A run folder holds `config.json` (every setting, resolved), `log.txt` (the progress lines),
`metrics.jsonl` (one JSON line per logged step), `state.pt` (everything needed to continue:
parameters, optimizer, position, RNG, the metrics file's length) and `checkpoint.safetensors` (the
learned parameters), then `prompt.safetensors` and `results.json`. Every file is written through
`files.atomic_write`, so a kill never leaves a half-written one.
"""
import dataclasses
import fcntl
import json
import os
import re
import time

import torch

from coop_min import cli, hub, weights
from coop_min.files import atomic_write, sha256_file, write_json

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


def load_weights(path, device, precision="fp32"):
    """(frozen CLIP in `precision` on `device`, the file's sha256) from --weights: a file, a model name
    (`ViT-B/16`, `hf-hub:ORG/NAME`: downloaded once, coop_min/hub.py), or by default the demo's."""
    from coop_min.clip import load_clip

    path = DEMO_WEIGHTS if path is None else path
    check_weights(path)
    if not os.path.isfile(path):
        path = hub.resolve(path)
    return load_clip(path, device=device, dtype=DTYPES[precision]), sha256_file(path)


def check_weights(path):
    """Refuse, before anything else is checked, --weights that is neither a file nor a model name."""
    if path is not None and not os.path.isfile(path) and not (path in hub.NAMES or path.startswith("hf-hub:")):
        raise FileNotFoundError(f"CLIP weights not found: {path}; pass a file from python -m "
                                f"coop_min.weights.convert, one of {', '.join(hub.NAMES)}, or hf-hub:ORG/NAME")


# ----------------------------------------------------------------------------------------------
# where a run goes: the official scripts' layout


CTX_V1 = "a photo of a"                      # the official *_ctxv1 configs


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def backbone(weights):
    """The folder tag of --weights: ViT-B/16 -> vit_b16 (as the official config names), a file -> its stem."""
    if weights is None:
        return "tiny_clip"
    if weights in hub.NAMES:
        return _slug(weights.replace("/", ""))
    if weights.startswith("hf-hub:"):
        return _slug(weights.rsplit("/", 1)[-1])
    return _slug(os.path.splitext(os.path.basename(weights))[0])


def setting(cfg):
    """The <setting> folder of a resolved TrainConfig: the backbone, then the official main.sh
    nctx<M>_csc<C>_ctp<P>, then the init phrase."""
    init = cfg.ctx_init.strip()
    tag = "_ctxv1" if init == CTX_V1 else f"_ctx_{_slug(init)[:40]}" if init else ""
    return f"{backbone(cfg.weights)}_nctx{cfg.n_ctx}_csc{cfg.csc}_ctp{cfg.class_token_position}{tag}"


def run_folder(cfg, dataset_key, tags=(), root="runs"):
    """<root>/[base2new/]<dataset>/shots_<K>/<method>/<setting>/seed<S>, as the official scripts lay out
    their runs (base-to-new runs, trained on the base half, under base2new/; new-half runs under
    train_new/). tags (e.g. "ep5", "bs8") end the setting: the settings given that change the numbers
    beyond it."""
    half = {"all": [], "base": ["base2new"], "new": ["train_new"]}[cfg.subsample]
    name = "_".join([setting(cfg), *tags])
    return os.path.join(root, *half, dataset_key, f"shots_{cfg.shots}", cfg.method, name, f"seed{cfg.seed}")


def check_writable(folder, flag="--output"):
    """Refuse, before any work, a folder that cannot be created or written (read-only filesystem)."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise cli.UsageError(f"{flag} {folder} cannot be written ({probe} is not a writable folder); "
                         f"pick another {flag}")


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
        self.stdout = True                   # False once a closed pipe (`| head`) stops reading it

    def print(self, line):
        if self.stdout:
            try:
                print(line, flush=True)
            except BrokenPipeError:          # the run goes on; log.txt keeps every line
                self.stdout = False
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)   # so Python's exit flush does not fail again
        self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        self.log.flush()

    def record(self, **values):
        self.metrics.write(json.dumps(values) + "\n")
        self.metrics.flush()

    def metrics_bytes(self):
        return self.metrics.tell()


class Progress:
    """Means since the last progress line, throughput, and an ETA from the run's average step time.

    step() after every training step; add() the totals (loss sum, correct, images) of the steps
    since the last line, then line(); epoch_means() at each epoch's end. clock: seconds
    (time.monotonic; tests pass a fake one)."""

    def __init__(self, steps_left, clock=time.monotonic):
        self.clock, self.steps_left, self.steps = clock, steps_left, 0
        self.start = self.last = clock()
        self.line_totals, self.epoch_totals = [0.0, 0, 0], [0.0, 0, 0]

    def step(self):
        self.steps, self.steps_left = self.steps + 1, self.steps_left - 1

    def add(self, loss_sum, correct, n):
        for totals in (self.line_totals, self.epoch_totals):
            totals[0], totals[1], totals[2] = totals[0] + loss_sum, totals[1] + correct, totals[2] + n

    def line(self):
        """'loss L acc A% R img/s eta T' over the steps since the last line."""
        (loss_sum, correct, n), now = self.line_totals, self.clock()
        rate = n / max(now - self.last, 1e-9)
        eta = (now - self.start) / max(self.steps, 1) * self.steps_left
        self.last, self.line_totals = now, [0.0, 0, 0]
        return (f"loss {loss_sum / max(n, 1):.4f} acc {100.0 * correct / max(n, 1):.1f}% {rate:.1f} img/s "
                f"eta {duration(eta)}")

    def epoch_means(self):
        (loss_sum, correct, n), self.epoch_totals = self.epoch_totals, [0.0, 0, 0]
        return {"mean_loss": round(loss_sum / max(n, 1), 6), "mean_acc": round(100.0 * correct / max(n, 1), 4)}


def duration(seconds):
    """'42s', '3.5 min', '1.2 h'."""
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class QuietLog:
    """What a process other than rank 0 logs: nothing (rank 0 writes the run folder)."""

    def print(self, line):
        pass

    def record(self, **values):
        pass


# ----------------------------------------------------------------------------------------------
# the folder and its checkpoints


OWN_FILES = {"config.json", "log.txt", "metrics.jsonl", "split.json", ".lock"}   # what a run writes before state.pt
_TEMP = re.compile(r".*\.tmp\d+$")                                             # files.atomic_write's temporaries


def failed_start(folder):
    """True when `folder` holds only what a run that stopped before its first checkpoint wrote."""
    names = {n for n in os.listdir(folder) if not _TEMP.match(n)}
    return "config.json" in names and names <= OWN_FILES


def start_folder(folder, settings: dict, resume: bool, free=()):
    """Check that `folder` can take a new run (or, with resume, that it holds this run: the same
    settings except those in `free`). Raises UsageError; changes nothing."""
    state_path = os.path.join(folder, "state.pt")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise cli.UsageError(f"--output {folder} is a file, not a folder; pick another --output")
    if resume:
        if not os.path.exists(state_path):
            raise cli.UsageError(f"--resume but {state_path} does not exist; start without --resume")
        saved = read_config(folder)
        # a setting its config.json does not record is one added since: the run had its default
        changed = sorted(k for k in settings if k in saved and saved[k] != settings[k] and k not in free)
        if changed:
            raise cli.UsageError(f"--resume with different settings ({', '.join(changed)}); use the run's "
                             f"settings or another --output")
    elif os.path.exists(state_path) or os.path.exists(os.path.join(folder, "results.json")):
        raise cli.UsageError(f"{folder} already holds a run; pass --resume to continue it or --output for a new one")
    elif os.path.isdir(folder) and os.listdir(folder) and not failed_start(folder):   # someone else's files
        raise cli.UsageError(f"--output {folder} is not empty (it holds {', '.join(sorted(os.listdir(folder))[:3])}); "
                         "a new run needs a new or empty folder: remove its files or pick another --output")


def read_config(folder):
    """The run's config.json as a dict (UsageError if it is missing or not one)."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise cli.UsageError(f"cannot read {path} ({cli.one_line(e)}); --resume needs the run's own "
                         "config.json") from None
    if not isinstance(saved, dict):
        raise cli.UsageError(f"{path} is not a run's config.json; start a new run in another --output")
    return saved


def lock(folder):
    """Create `folder` and hold an exclusive lock on it for this process's life (the returned file);
    another process that holds it is named in a UsageError."""
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise cli.UsageError(f"{folder} is in use by process {holder}; wait for it to finish or pick "
                         "another --output") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    for name in os.listdir(folder):          # a kill during a write leaves its temporary file
        if _TEMP.match(name):
            os.remove(os.path.join(folder, name))
    return f


def write_config(folder, cfg):
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), dataclasses.asdict(cfg))


def kept(folder):
    if os.path.exists(os.path.join(folder, "state.pt")):
        return f"The last good checkpoint is kept in {folder}"
    return "No checkpoint had been written yet"


def save_state(folder, learner, optimizer, epoch, batch, metrics_bytes, torch_rng, clip_sha256, progress):
    """state.pt and checkpoint.safetensors after `epoch` epochs and `batch` steps of the next.
    torch_rng: the global RNG state to resume with (taken before this epoch's loader drew from it);
    progress: the (loss sum, correct, images) of the steps since the last progress line and of the epoch's
    lines so far, so that the means after a resume are the same."""
    from safetensors.torch import save_file

    if not all(torch.isfinite(p).all() for p in learner.parameters()):   # never overwrite a good checkpoint
        raise FloatingPointError(f"the learned parameters became nan/inf (checkpoint due after {epoch} epochs and "
                                 f"{batch} steps); stopped. {kept(folder)} (lower --lr or use --precision fp32)")
    state = {"params": {k: v.detach().cpu() for k, v in learner.state_dict().items()},
             "optimizer": optimizer.state_dict(), "epoch": epoch, "batch": batch,
             "metrics_bytes": metrics_bytes, "torch_rng": torch_rng, "clip_sha256": clip_sha256,
             "progress": [[float(x) for x in t] for t in progress]}
    atomic_write(os.path.join(folder, "state.pt"), lambda tmp: torch.save(state, tmp))
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in learner.named_parameters()}
    atomic_write(os.path.join(folder, "checkpoint.safetensors"),
                 lambda tmp: save_file(tensors, tmp, metadata={"epoch": str(epoch), "batch": str(batch)}))


def read_state(folder):
    path = os.path.join(folder, "state.pt")
    if not os.path.exists(path):
        raise cli.UsageError(f"--resume but {path} does not exist; start without --resume")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise cli.UsageError(f"cannot read {path} ({type(e).__name__}): it is not a state.pt this trainer "
                             "wrote, so the run cannot be resumed; start a new run in another --output") from None


def check_state(state, folder, learner, optimizer, epochs, clip_sha256):
    """Refuse (UsageError) a state.pt whose schema, types, shapes or values this run cannot continue
    from, before anything is restored; then restore the optimizer, parameters and RNG."""
    path = os.path.join(folder, "state.pt")

    def refuse(why):
        raise cli.UsageError(f"{path} cannot be resumed: {why}; start a new run in another --output")
    keys = {"params", "optimizer", "epoch", "batch", "metrics_bytes", "torch_rng", "clip_sha256", "progress"}
    if not isinstance(state, dict) or not keys <= set(state):
        refuse(f"it is not a state.pt this trainer wrote (it needs {sorted(keys)})")
    if state["clip_sha256"] != clip_sha256:
        refuse(f"it was trained with CLIP weights sha256 {str(state['clip_sha256'])[:12]}..., these are "
               f"{clip_sha256[:12]}...; pass the run's --weights")
    for name, high in (("epoch", epochs), ("batch", None)):
        value = state[name]
        if type(value) is not int or value < 0 or (high is not None and value > high):
            refuse(f"{name} is {value!r}")
    metrics = os.path.join(folder, "metrics.jsonl")
    size = os.path.getsize(metrics) if os.path.exists(metrics) else 0
    if type(state["metrics_bytes"]) is not int or not 0 <= state["metrics_bytes"] <= size:
        refuse(f"metrics_bytes is {state['metrics_bytes']!r}, metrics.jsonl has {size} bytes")
    totals = state["progress"]
    if not (isinstance(totals, list) and len(totals) == 2 and all(
            isinstance(t, list) and len(t) == 3 and all(type(x) is float and x == x and abs(x) < 1e300 for x in t)
            for t in totals)):
        refuse("progress is not two lists of three finite numbers")
    rng = state["torch_rng"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        refuse("torch_rng is not a CPU RNG state")
    params, own = state["params"], learner.state_dict()
    if not isinstance(params, dict) or set(params) != set(own):
        refuse(f"its parameters are not this learner's ({sorted(own)})")
    for k, v in params.items():
        if not isinstance(v, torch.Tensor) or v.shape != own[k].shape or not v.is_floating_point() \
                or not torch.isfinite(v).all():
            refuse(f"parameter {k} is not a finite tensor of shape {tuple(own[k].shape)}")
    if fault := _optimizer_state_fault(optimizer, state["optimizer"]):
        refuse(fault)
    optimizer.load_state_dict(state["optimizer"])       # checked: every check above passed
    learner.load_state_dict(params)
    torch.set_rng_state(rng)


def _optimizer_state_fault(optimizer, saved):
    """Why the optimizer state `saved` cannot continue `optimizer` (None if it can). It is loaded into
    a stand-in with parameters of the same shapes, so that `optimizer` is untouched until it passes."""
    groups = [dict(g, params=[torch.empty_like(p) for p in g["params"]]) for g in optimizer.param_groups]
    trial = torch.optim.Optimizer(groups, {})
    try:
        trial.load_state_dict(saved)
    except Exception as e:  # torch raises several types for a malformed optimizer state
        return f"its optimizer state does not fit ({cli.one_line(e)[:200]})"
    for group in trial.param_groups:
        settings = [group.get(k) for k in ("lr", "momentum", "weight_decay", "dampening")]
        if not all(isinstance(v, (int, float)) and abs(v) < float("inf") for v in settings):   # NaN fails too
            return "its optimizer settings (lr, momentum, weight_decay, dampening) are not finite numbers"
        for p in group["params"]:
            buf = trial.state.get(p, {}).get("momentum_buffer")
            if buf is not None and (not isinstance(buf, torch.Tensor) or buf.shape != p.shape
                                    or not torch.isfinite(buf).all()):
                return f"a momentum buffer is not a finite tensor of shape {tuple(p.shape)}"
    return None
