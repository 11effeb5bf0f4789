"""A training run's folder: where it goes, the checks before a run starts in it, its lock, and `Run`,
the one object through which the training loop writes it.

A run folder holds `config.json` (every setting, resolved), `split.json` (the few-shot sets),
`log.txt` and `metrics.jsonl` (coop_min/progress.py), `state.pt` and `checkpoint.safetensors`
(coop_min/checkpoint.py), then `prompt.safetensors` (and CoOp's `classifier.safetensors`) and
`results.json`. Every file is written through `files.atomic_write`, so a kill never leaves a
half-written one, and by rank 0 alone under torchrun.
"""
import dataclasses
import fcntl
import json
import os
import re
from typing import NamedTuple

from coop_min import checkpoint, cli, data, distributed, hub
from coop_min.distributed import World
from coop_min.files import write_json
from coop_min.progress import QuietLog, RunLog, Tally
from coop_min.prompts import export_classifier, save_prompt

# ----------------------------------------------------------------------------------------------
# where a run goes: the official scripts' layout


CTX_V1 = "a photo of a"                      # the official *_ctxv1 configs


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def backbone(weights):
    """The folder tag of --weights: ViT-B/16 -> vit_b16 (as the official configs name it), a file -> its
    stem."""
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


def probe_folder(root, dataset_key, weights, shots, seed):
    """<root>/<dataset>/shots_<K>/linear-probe/<backbone>/seed<S>: a linear-probe run, beside the prompt
    runs of the same dataset and shots."""
    return os.path.join(root, dataset_key, f"shots_{shots}", "linear-probe", backbone(weights), f"seed{seed}")


def check_writable(folder, flag="--output"):
    """Refuse, before any work, a folder that cannot be created or written (read-only filesystem)."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise cli.UsageError(f"{flag} {folder} cannot be written ({probe} is not a writable folder); "
                             f"pick another {flag}")


# ----------------------------------------------------------------------------------------------
# before a run starts: the folder's checks and its lock


OWN_FILES = {"config.json", "log.txt", "metrics.jsonl", "split.json", ".lock"}   # written before state.pt
_TEMP = re.compile(r".*\.tmp\d+$")                                   # files.atomic_write's temporaries


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
                                 "settings or another --output")
    elif os.path.exists(state_path) or os.path.exists(os.path.join(folder, "results.json")):
        raise cli.UsageError(f"{folder} already holds a run; pass --resume to continue it or --output for a "
                             "new one")
    elif os.path.isdir(folder) and os.listdir(folder) and not failed_start(folder):   # someone else's files
        some = ", ".join(sorted(os.listdir(folder))[:3])
        raise cli.UsageError(f"--output {folder} is not empty (it holds {some}); a new run needs a new or "
                             "empty folder: remove its files or pick another --output")


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



# ----------------------------------------------------------------------------------------------
# the run


class Position(NamedTuple):
    """Where training stands: `epoch` epochs done and `batch` steps of the next."""
    epoch: int = 0
    batch: int = 0


class Run:
    """A training run's folder and everything written to it, handed to the training loop as one object.

    It holds the folder, its lock (one process at a time), the log (progress lines and metrics), the
    processes (`world`: rank 0 alone writes, every rank takes part in the barriers), the sha256 of the
    CLIP weights (every checkpoint and prompt records it), and where training starts: `position` and
    `tally`, the start of a new run, or a resumed run's checkpoint once restore() has checked it.
    Creating a Run writes nothing; start() begins writing, once every input has been checked."""

    def __init__(self, folder, clip_sha256, world=World(), state=None):
        self.folder = folder
        self.clip_sha256 = clip_sha256
        self.world = world
        self.state = state                   # a resumed run's state.pt, as checkpoint.read gave it
        self.position = Position()
        self.tally = Tally([0.0] * 3, [0.0] * 3, 0.0)
        self.log = QuietLog()
        self.held = None                     # the lock file, while rank 0 holds it

    @property
    def resumed(self):
        return self.state is not None

    def restore(self, learner, optimizer, epochs):
        """A resumed run: check its state.pt, then restore the learner, the optimizer and the RNG from
        it (UsageError, with nothing restored, if this run cannot continue from it)."""
        if not self.resumed:
            return
        checkpoint.check_state(self.state, self.folder, learner, optimizer, epochs, self.clip_sha256)
        self.position = Position(self.state["epoch"], self.state["batch"])
        unreported, epoch = self.state["progress"]
        if not self.world.main:              # sums over every rank's images: rank 0 alone carries them
            unreported = [0.0] * 3
        self.tally = Tally(unreported, epoch, self.state.get("train_seconds", 0.0))   # older: no seconds

    def start(self, cfg, few):
        """Begin writing, after every process has checked its inputs: rank 0 takes the lock and, for
        a new run, writes config.json and split.json (replacing what a failed start left); then the log
        (a resumed run's metrics.jsonl cut back to its checkpoint)."""
        distributed.barrier(self.world)
        if self.world.main:
            self.held = lock(self.folder)
            if not self.resumed:
                for name in ("log.txt", "metrics.jsonl"):
                    if os.path.exists(os.path.join(self.folder, name)):
                        os.remove(os.path.join(self.folder, name))
                write_json(os.path.join(self.folder, "config.json"), dataclasses.asdict(cfg))
                data.save_split(os.path.join(self.folder, "split.json"), few)
            self.log = RunLog(self.folder, self.state["metrics_bytes"] if self.resumed else None)
        distributed.barrier(self.world)

    def save(self, learner, optimizer, position, rng, tally):
        """Checkpoint at `position` (rank 0 writes). rng: the global RNG state to continue with (for a
        mid-epoch position, as it was before the epoch's loader drew from it); tally: the progress."""
        if not self.world.main:
            return
        checkpoint.save(self.folder, learner, optimizer, {
            "epoch": position.epoch, "batch": position.batch, "metrics_bytes": self.log.metrics_bytes(),
            "torch_rng": rng, "clip_sha256": self.clip_sha256, "progress": [tally.unreported, tally.epoch],
            "train_seconds": tally.seconds})

    def kept(self):
        return checkpoint.kept(self.folder)

    def write_prompt(self, model):
        """prompt.safetensors of `model`'s learner (and CoOp's classifier.safetensors), written before
        any process reads them; returns the prompt's path."""
        path = os.path.join(self.folder, "prompt.safetensors")
        if self.world.main:
            save_prompt(path, model.learner, self.clip_sha256)
            if not model.is_conditional:
                classifier = os.path.join(self.folder, "classifier.safetensors")
                export_classifier(classifier, model, self.clip_sha256)
        distributed.barrier(self.world)
        return path

    def write_results(self, results):
        if self.world.main:
            write_json(os.path.join(self.folder, "results.json"), results)

    def close(self):
        """Release the lock: a finished run keeps no lock file."""
        if self.held is not None:
            self.held.close()
            os.remove(os.path.join(self.folder, ".lock"))
            self.held = None
