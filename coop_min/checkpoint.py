"""A run's checkpoint: `state.pt`, everything needed to continue bit for bit, and
`checkpoint.safetensors`, the learned parameters; and the checks a state.pt passes before a run
continues from it.

state.pt holds the learner's parameters and buffers, the optimizer's state, the position (`epoch`
epochs done and `batch` steps of the next), `torch_rng` (the global RNG to continue with),
`metrics_bytes` (the length of metrics.jsonl at the checkpoint), `clip_sha256` (the CLIP weights it
was trained on), `progress` (two [loss, correct, images] sums: since the last metrics line, and of
the epoch's lines so far) and `train_seconds`. Both files are written through files.atomic_write, so
a kill never leaves a half-written one, and nothing is written once the parameters are not finite.
"""
import os

import torch

from coop_min import cli
from coop_min.files import atomic_write

KEYS = {"params", "optimizer", "epoch", "batch", "metrics_bytes", "torch_rng", "clip_sha256", "progress"}


def kept(folder):
    """What a failed run leaves to continue from, for its error message."""
    if os.path.exists(os.path.join(folder, "state.pt")):
        return f"The last good checkpoint is kept in {folder}"
    return "No checkpoint had been written yet"


def save(folder, learner, optimizer, state: dict):
    """state.pt (`state` with the learner's parameters and the optimizer's state) and
    checkpoint.safetensors; refuses (FloatingPointError) parameters that are no longer finite, so a
    good checkpoint is never overwritten by a diverged one."""
    from safetensors.torch import save_file

    if not all(torch.isfinite(p).all() for p in learner.parameters()):
        due = f"checkpoint due after {state['epoch']} epochs and {state['batch']} steps"
        raise FloatingPointError(f"the learned parameters became nan/inf ({due}); stopped. {kept(folder)} "
                                 "(lower --lr or use --precision fp32)")
    params = {k: v.detach().cpu() for k, v in learner.state_dict().items()}
    state = {"params": params, "optimizer": optimizer.state_dict(), **state}
    atomic_write(os.path.join(folder, "state.pt"), lambda tmp: torch.save(state, tmp))
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in learner.named_parameters()}
    metadata = {"epoch": str(state["epoch"]), "batch": str(state["batch"])}
    atomic_write(os.path.join(folder, "checkpoint.safetensors"),
                 lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read(folder):
    """The run's state.pt, read without executing code (UsageError if it cannot be: runs.start_folder
    has refused a --resume without one)."""
    path = os.path.join(folder, "state.pt")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        why = f"{type(e).__name__}): it is not a state.pt this trainer wrote, so the run cannot be resumed"
        raise cli.UsageError(f"cannot read {path} ({why}; start a new run in another --output") from None


def check_state(state, folder, learner, optimizer, epochs, clip_sha256):
    """Refuse (UsageError) a state.pt whose schema, types, shapes or values this run cannot continue
    from, before anything is restored; then restore the optimizer, parameters and RNG."""
    path = os.path.join(folder, "state.pt")

    def refuse(why):
        raise cli.UsageError(f"{path} cannot be resumed: {why}; start a new run in another --output")
    if not isinstance(state, dict) or not KEYS <= set(state):
        refuse(f"it is not a state.pt this trainer wrote (it needs {sorted(KEYS)})")
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
    if not _finite_sums(state["progress"]):
        refuse("progress is not two lists of three finite numbers")
    if not _finite_number(state.get("train_seconds", 0.0)):   # absent from an older state.pt
        refuse(f"train_seconds is {state['train_seconds']!r}")
    rng = state["torch_rng"]
    cpu_rng = torch.get_rng_state()
    if not isinstance(rng, torch.Tensor) or rng.dtype != cpu_rng.dtype or rng.shape != cpu_rng.shape:
        refuse("torch_rng is not a CPU RNG state")
    params = state["params"]
    own = learner.state_dict()
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


def _finite_number(x):
    return type(x) is float and x == x and abs(x) < 1e300


def _finite_sums(totals):
    """Two lists of three finite floats: the `progress` entry of a state.pt."""
    return isinstance(totals, list) and len(totals) == 2 and all(
        isinstance(t, list) and len(t) == 3 and all(_finite_number(x) for x in t) for t in totals)


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
