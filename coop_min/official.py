"""The official CoOp / CoCoOp code's prompt checkpoints: read without running their pickles, and written.

Dassl saves a prompt learner as `<run>/prompt_learner/model.pth.tar-<E>` (or `model-best.pth.tar`),
a torch.save of {"state_dict": {ctx, token_prefix, token_suffix[, meta_net.linear1/linear2.weight/bias]},
"epoch": E, "optimizer": ..., "scheduler": ..., "val_result": ...}, in the context's training dtype
(fp16 by default), beside a text file `checkpoint` naming the last one. The "scheduler" entry is the
state of Dassl's warm-up scheduler, which pickles its successor scheduler object and that one's
optimizer, so `torch.load(weights_only=True)` refuses the file and a full `torch.load` would run
whatever its pickle says. `read_checkpoint` reads it with `pickles.RestrictedUnpickler`: tensors and
containers load, the optimizer and scheduler classes such a file is known to hold become `Inert`
stand-ins, and any other global is refused before anything runs.

Only `ctx` and the Meta-Net matter: `token_prefix` / `token_suffix` are the class names' token
embeddings, rebuilt from the data's class names as the official `load_model` does (it deletes them).
The file does not hold the class-token position, nor the init phrase (which changes no number: its
tokens are replaced by the context); `read_prompt` takes them from the official run folder (the
config Dassl prints at the top of log.txt, the folder name `nctx<M>_csc<C>_ctp<P>`), else from the
caller, else the paper default, and says which.
"""
import collections
import os
import re
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch

from coop_min import official_runs, pickles
from coop_min.files import atomic_write

_OBJECTS = (  # classes pickled whole inside an official checkpoint's optimizer / scheduler entries
    ("torch.optim.sgd", "SGD"), ("torch.optim.adam", "Adam"), ("torch.optim.adamw", "AdamW"),
    ("torch.optim.rmsprop", "RMSprop"),
    *[("torch.optim.lr_scheduler", name) for name in (
        "CosineAnnealingLR", "StepLR", "MultiStepLR", "ExponentialLR", "LinearLR", "ConstantLR")],
    *[("dassl.optim.lr_scheduler", name) for name in (
        "ConstantWarmupScheduler", "LinearWarmupScheduler", "_BaseWarmupScheduler")],
)
_ALLOWED = pickles.TENSORS | {key: pickles.inert(*key) for key in _OBJECTS} | {
    ("torch._utils", "_rebuild_parameter"): pickles.rebuild_parameter,   # the optimizer object's params
    ("collections", "defaultdict"): collections.defaultdict,             # its state: defaultdict(dict)
    ("builtins", "dict"): dict, ("__builtin__", "dict"): dict,         # its factory (protocol 2's name)
}
_REFUSED = ("an official checkpoint needs only tensors, containers and its optimizer / scheduler classes; "
            "this file names another, so it was not loaded (nothing in it was run)")
_EPOCH_FILE = re.compile(r"model\.pth\.tar-(\d+)")
_META_NET = tuple(f"meta_net.{layer}.{p}" for layer in ("linear1", "linear2") for p in ("weight", "bias"))


# ----------------------------------------------------------------------------------------------
# reading


def checkpoint_file(path) -> Path:
    """The checkpoint a path means: the file itself; in a `prompt_learner/` folder (or the run folder
    above it) the one its `checkpoint` file names, else the highest epoch, else model-best.pth.tar."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    folder = path / "prompt_learner" if (path / "prompt_learner").is_dir() else path
    named = folder / "checkpoint"
    if named.is_file():
        name = named.read_text().strip()
        if not name or os.path.basename(name) != name or not (folder / name).is_file():
            raise FileNotFoundError(f"{named} names {name!r}, which is not a file in {folder}; pass the "
                                    "checkpoint file itself")
        return folder / name
    epochs = {int(m.group(1)): f for f in folder.iterdir() if (m := _EPOCH_FILE.fullmatch(f.name))}
    if epochs:
        return epochs[max(epochs)]
    if (folder / "model-best.pth.tar").is_file():
        return folder / "model-best.pth.tar"
    raise FileNotFoundError(f"no official checkpoint in {folder} (model.pth.tar-<E> or model-best.pth.tar)")


def is_official(path) -> bool:
    """Whether `path` is (or holds) an official checkpoint rather than coop_min's prompt.safetensors."""
    path = Path(path)
    if path.is_dir():
        return (path / "prompt_learner").is_dir() or (path / "checkpoint").is_file() or any(
            _EPOCH_FILE.fullmatch(f.name) or f.name == "model-best.pth.tar" for f in path.iterdir())
    named = _EPOCH_FILE.fullmatch(path.name) or path.name.endswith(".pth.tar")
    return path.is_file() and bool(named or zipfile.is_zipfile(path))   # torch.save's zip; safetensors isn't


def read_checkpoint(path) -> dict:
    """The dict in an official checkpoint file, read with nothing in its pickle run; its state_dict
    is checked to hold a context."""
    checkpoint = pickles.load(path, _ALLOWED, _REFUSED)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    ctx = state.get("ctx") if isinstance(state, dict) else None
    if not isinstance(ctx, torch.Tensor) or ctx.dim() not in (2, 3) or not ctx.is_floating_point():
        raise ValueError(f"{path} is not an official CoOp/CoCoOp checkpoint: no 'state_dict' with a 2-D or "
                         "3-D 'ctx' tensor")
    return checkpoint


class OfficialPrompt(NamedTuple):
    tensors: dict            # ctx (M, W) or (C, M, W) and the Meta-Net, fp32, named as coop_min's learners
    method: str              # coop | cocoop
    class_token_position: str
    origin: str              # one line: the file, and where each setting came from


def _run_folder(path: Path, file: Path):
    """The official run folder of a checkpoint (the folder above `prompt_learner/`), or None."""
    if path.is_dir() and (path / "prompt_learner").is_dir():
        return path
    return file.parent.parent if file.parent.name == "prompt_learner" else None


def _run_settings(run):
    """({setting: (value, where)}) from an official run folder's log.txt config and folder names."""
    found = {}
    if run is None:
        return found
    for key, value in official_runs.folder_settings(run).items():
        found[key] = (value, "the folder name")
    log = run / "log.txt"
    config = official_runs.read_log_config(log) if log.is_file() else {}
    logged = {**official_runs.prompt_settings(config), "dataset": config.get("DATASET.NAME"),
              "backbone": config.get("MODEL.BACKBONE.NAME")}
    found.update({name: (value, "log.txt") for name, value in logged.items() if value is not None})
    return found


def _tensors(path, state):
    unknown = set(state) - {"ctx", "token_prefix", "token_suffix", *_META_NET}
    if unknown:
        raise ValueError(f"{path} holds {sorted(unknown)[:3]} beside ctx: not an official CoOp/CoCoOp prompt "
                         "learner")
    meta = [k for k in _META_NET if k in state]
    if meta and len(meta) != len(_META_NET):
        raise ValueError(f"{path} has an incomplete Meta-Net ({meta}); CoCoOp's has {list(_META_NET)}")
    tensors = {"ctx": state["ctx"].float()}
    for key in meta:
        if not isinstance(state[key], torch.Tensor):
            raise ValueError(f"{path}: {key} is a {type(state[key]).__name__}, not a tensor")
        tensors[key] = state[key].float()
    return tensors


def read_prompt(path, class_token_position: str | None = None) -> OfficialPrompt:
    """The learned prompt in an official checkpoint (a file, its prompt_learner/ folder or the run
    folder), with the class-token position from the run folder, else `class_token_position`, else "end"."""
    path = Path(path)
    file = checkpoint_file(path)
    checkpoint = read_checkpoint(file)
    tensors = _tensors(file, checkpoint["state_dict"])
    method = "cocoop" if len(tensors) > 1 else "coop"
    run = _run_folder(path, file)
    found = _run_settings(run)
    trainer = found.get("method", ("",))[0]
    if trainer and trainer != method:
        raise ValueError(f"{run / 'log.txt'} names the trainer {trainer} (TRAINER.NAME), but {file} holds a "
                         f"{method} prompt")
    if method == "cocoop":                   # the official CoCoOp puts the class name at the end only
        position, where = "end", "CoCoOp's only layout"
    elif "class_token_position" in found:
        position, where = found["class_token_position"]
        if class_token_position not in (None, position):
            raise ValueError(f"{run} says the class token is at the {position}, --class-token-position says "
                             f"{class_token_position}; drop the flag")
    elif class_token_position is not None:
        position, where = class_token_position, "--class-token-position"
    else:
        position, where = "end", "the paper default; the file does not say, pass --class-token-position"
    ctx, dtype = tensors["ctx"], str(checkpoint["state_dict"]["ctx"].dtype).removeprefix("torch.")
    parts = [f"official {'CoCoOp' if method == 'cocoop' else 'CoOp'} checkpoint {file} (epoch "
             f"{checkpoint.get('epoch', '?')}, {dtype})",
             f"M={ctx.shape[-2]} {'class-specific' if ctx.dim() == 3 else 'unified'} context",
             f"class token {position} ({where})"]
    if "ctx_init" in found:
        parts.append(f"init {found['ctx_init'][0] or 'random'!r} (log.txt)")
    if "backbone" in found or "dataset" in found:
        parts.append(f"trained with {found.get('backbone', ('?',))[0]} on {found.get('dataset', ('?',))[0]}")
    return OfficialPrompt(tensors, method, position, ", ".join(parts))


# ----------------------------------------------------------------------------------------------
# writing


def write_checkpoint(folder, state_dict: dict, epoch: int) -> Path:
    """`folder/prompt_learner/model.pth.tar-<epoch>` and its `checkpoint` file, as Dassl's
    save_checkpoint writes them; the official `train.py --eval-only --model-dir folder --load-epoch
    <epoch>` loads it. Refuses to replace a checkpoint that is already there."""
    learner = Path(folder) / "prompt_learner"
    file = learner / f"model.pth.tar-{epoch}"
    if file.exists():
        raise FileExistsError(f"{file} already exists; pick another output folder or remove it")
    learner.mkdir(parents=True, exist_ok=True)
    state = {"state_dict": collections.OrderedDict(state_dict), "epoch": epoch, "optimizer": None,
             "scheduler": None, "val_result": None}
    atomic_write(file, lambda tmp: torch.save(state, tmp))
    atomic_write(learner / "checkpoint", lambda tmp: Path(tmp).write_text(f"{file.name}\n"))
    return file
