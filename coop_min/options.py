"""The training options: every setting of a run, each declared once as a field of `TrainConfig`,
and the papers' defaults that the unset ones take.

A field declared with `_option` is also a command-line flag. Everything else about an option is
derived from its declaration: the parser's flags (`add_options`), the bounds check (`config`), the
settings a resumed run may change (`RESUME_MAY_CHANGE`), the flag-to-field map the sweep passes flags
through with (`flag_fields`), and what `evaluate --prompt RUN_DIR` takes from the run's config.json
(`from_run`). `resolve` fills the unset fields with the official configs' values for the method,
shot count and dataset (`paper_defaults`), and the machine's device and precision; config.json
records every field, resolved.
"""
import argparse
import math
import os
import sys
import warnings
from dataclasses import dataclass, field, fields

from coop_min import cli, data, inputs, runs
from coop_min.prompts import PromptConfig


def _option(default, help, least=None, resume=False, from_run=None, **argparse_kwargs):
    """A TrainConfig field that is also a flag (--field-name unless `flag` says otherwise).
    least: its lower bound. resume: a resumed run may change it (it changes no number the run
    computes). from_run: evaluate --prompt RUN_DIR takes it from the run unless given (True), or only
    when it uses the run's data too ("data"). Any argparse keywords beyond the type, which the field's
    annotation gives."""
    return field(default=default, metadata={"help": help, "least": least, "resume": resume,
                                            "from_run": from_run, "argparse": argparse_kwargs})


@dataclass
class TrainConfig:
    """Every setting of a run. None takes the paper's default (resolve)."""
    data: str | None = _option(
        None, "dataset folder (official CoOp layouts, split_zhou json, or class/image.jpg); default: the "
        "bundled demo benchmark and tiny CLIP", from_run=True)
    dataset: str = _option("auto", "dataset name, or auto to detect from the folder (default auto)",
                           from_run="data")
    weights: str | None = _option(
        None, "CLIP: a safetensors file from coop_min.weights.convert, an OpenAI name (ViT-B/16, RN50, ...) "
        "or hf-hub:ORG/NAME, downloaded once (default: the bundled tiny demo CLIP); a moved file may "
        "resume (its sha256 is checked)", resume=True, from_run=True)
    method: str = _option("coop", "CoOp (learned context) or CoCoOp (context plus a Meta-Net shift per "
                          "image) (default coop)", choices=["coop", "cocoop"])
    shots: int = _option(16, "training images per class (default 16)", least=1)
    n_ctx: int | None = _option(None, "context length M (paper: 16 CoOp, 4 CoCoOp); a --ctx-init phrase sets "
                                "it", least=1)
    ctx_init: str | None = _option(None, 'initial context phrase, "" for random N(0, 0.02) (paper: random '
                                   'CoOp, "a photo of a" CoCoOp)')
    csc: bool = _option(False, "class-specific contexts (CoOp)")
    class_token_position: str = _option("end", "where the class name sits among the context vectors "
                                        "(CoOp; default end)", choices=["end", "middle", "front"])
    subsample: str = _option("all", "train on all classes or a half (base also reports new and the "
                             "harmonic mean)", choices=["all", "base", "new"])
    epochs: int | None = _option(None, "(paper: CoOp 50/100/200 for 1/2-4/8-16 shots, ImageNet 50; CoCoOp "
                                 "10)", least=1)
    batch_size: int | None = _option(None, "(paper: 32 CoOp, 1 CoCoOp)", least=1)
    lr: float = _option(0.002, "peak SGD learning rate (default 0.002)")
    templates: str = _option("single", "zero-shot CLIP's prompts in the results: the dataset's template, or "
                             "the ImageNet ensemble and it (default single)", choices=["single", "ensemble"])
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    seed: int = _option(1, "few-shot sampling, context init, batch order and augmentation (default 1)")
    precision: str | None = _option(None, "frozen CLIP compute dtype (default bf16 on CUDA, fp32 on CPU)",
                                    from_run=True, choices=["fp32", "bf16", "fp16"])
    device: str | None = _option(None, "cpu, cuda, cuda:1 ... (default cuda if available)", resume=True)
    output: str | None = _option(None, "run folder (default runs/[base2new/]<dataset>/shots_<K>/<method>/"
                                 "<setting>/seed<S>, the official scripts' layout; see README)", resume=True)
    resume: bool = _option(False, "continue the run in --output from its state.pt, with the settings of its "
                           "config.json", resume=True)
    workers: int | None = _option(None, "data loader worker processes (default 0 on CPU, where the compute "
                                  "needs the cores, 8 on CUDA)", least=0, resume=True)
    eval_batch_size: int = field(default=100, metadata={"resume": True})
    skip_bad_images: bool = _option(False, "skip and count unreadable images instead of failing", resume=True)
    reference_path: bool = _option(False, "compute with the method as written in prompts.py instead of the "
                                   "fast path (same numbers, slower)")
    shared_prefix: bool = _option(False, "encode [SOS, ctx] once for all classes (UC, end; CoCoOp): less "
                                  "memory at many classes, more launches")
    shard_text: bool = _option(True, "under torchrun, CoOp: every process encodes all classes (default: each "
                               "encodes 1/N of them)", resume=True, flag="--no-shard-text")
    cuda_graph: bool | None = _option(None, "capture each training step as a CUDA graph and replay it, with "
                                      "prompts in length buckets (default: on for one CUDA process without "
                                      "--reference-path; see README)", resume=True)
    save_every: int = _option(0, "also checkpoint every N steps inside an epoch", least=0)
    print_every: int = _option(10, "a metrics.jsonl line every N steps (default 10); progress lines are "
                               "printed every few seconds", least=1, resume=True)


# settings a resumed run may change: they change no number it computes (the weights are checked by
# their sha256 in state.pt, so the file may move), and a run folder may move
RESUME_MAY_CHANGE = tuple(f.name for f in fields(TrainConfig) if f.metadata.get("resume"))


def _flag(f):
    return f.metadata["argparse"].get("flag", "--" + f.name.replace("_", "-"))


def flag_fields():
    """{--flag: TrainConfig field} of every option (--no-cuda-graph too), as a command line spells them."""
    flags = {}
    for f in fields(TrainConfig):
        if "help" in f.metadata:
            flags[_flag(f)] = f.name
            if f.type == bool | None:
                flags["--no-" + _flag(f)[2:]] = f.name
    return flags


def add_options(p):
    """TrainConfig's options on the ArgumentParser p, as the fields declare them."""
    for f in fields(TrainConfig):
        if "help" not in f.metadata:
            continue
        kwargs = {k: v for k, v in f.metadata["argparse"].items() if k != "flag"}
        if f.type == bool | None:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.type is bool:
            kwargs["action"] = "store_false" if _flag(f).startswith("--no-") else "store_true"
        elif f.type in (int, int | None):
            kwargs["type"] = int
        elif f.type in (float, float | None):
            kwargs["type"] = float
        p.add_argument(_flag(f), dest=f.name, default=f.default, help=f.metadata["help"], **kwargs)


def config(p, values) -> TrainConfig:
    """TrainConfig of parsed values, each checked against its field's bounds (p.error: one line)."""
    for f in fields(TrainConfig):
        least = f.metadata.get("least")
        if least is not None and values[f.name] is not None and values[f.name] < least:
            p.error(f"--{f.name.replace('_', '-')} must be >= {least}, got {values[f.name]}")
    if not (math.isfinite(values["lr"]) and values["lr"] > 0):
        p.error(f"--lr must be a positive number, got {values['lr']}")
    if not 0 <= values["seed"] < 2 ** 63:
        p.error(f"--seed must be between 0 and 2**63 - 1, got {values['seed']}")
    return TrainConfig(**values)


def from_run(saved: dict, given: dict) -> dict:
    """{setting: value} that `evaluate --prompt RUN_DIR` takes from the run's config.json (`saved`):
    each field declared from_run that `given` (evaluate's parsed flags) leaves unset, None or its
    default; one declared from_run="data" only where the data is the run's too."""
    taken = {}
    for f in fields(TrainConfig):
        rule = f.metadata.get("from_run")
        value = saved.get(f.name)
        if not rule or not isinstance(value, str) or given.get(f.name) not in (None, f.default):
            continue
        if rule == "data" and {**given, **taken}.get("data") != saved.get("data"):
            continue
        taken[f.name] = value
    return taken


# ----------------------------------------------------------------------------------------------
# the papers' defaults: what an unset option resolves to


def paper_epochs(method, shots, dataset_name):
    """CoOp: 50 epochs for 1 shot, 100 for 2/4, 200 for 8/16; ImageNet 50 always. CoCoOp: 10."""
    if method == "cocoop":
        return 10
    if dataset_name == "ImageNet":
        return 50
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


def paper_defaults(method, shots, dataset_name):
    """{epochs, batch_size, lr} of the official configs for this method, shot count and dataset."""
    return {"epochs": paper_epochs(method, shots, dataset_name),
            "batch_size": 1 if method == "cocoop" else 32,
            "lr": TrainConfig.lr}


def resolve(cfg: TrainConfig, dataset_name: str) -> TrainConfig:
    """Fill every unset field with the paper default for this method, shot count and dataset."""
    paper = paper_defaults(cfg.method, cfg.shots, dataset_name)
    tags = folder_tags(cfg, dataset_name)    # taken before the defaults fill the unset fields
    prompt = prompt_config(cfg)              # the context's paper defaults live in prompts.PromptConfig
    cfg.n_ctx = prompt.n_ctx
    cfg.csc = prompt.csc
    if cfg.ctx_init is None:
        cfg.ctx_init = prompt.ctx_init
    if cfg.epochs is None:
        cfg.epochs = paper["epochs"]
    if cfg.batch_size is None:
        cfg.batch_size = paper["batch_size"]
    if cfg.device is None:
        cfg.device = inputs.default_device()
    if cfg.precision is None:
        cfg.precision = inputs.default_precision(cfg.device)
    if cfg.workers is None:
        cfg.workers = min(8, os.cpu_count() or 1) if cfg.device.startswith("cuda") else 0
    if cfg.output is None:
        cfg.output = runs.run_folder(cfg, data.dataset_key(dataset_name), tags)
    return cfg


def folder_tags(cfg, dataset_name):
    """Folder tags of an unresolved config's settings given that change the numbers and differ from
    the paper's (and of a precision given: its default depends on the machine), e.g. ["ep5", "bf16"]."""
    paper = paper_defaults(cfg.method, cfg.shots, dataset_name)
    tags = []
    for name, tag in (("epochs", "ep"), ("batch_size", "bs"), ("lr", "lr")):
        value = getattr(cfg, name)
        if value is not None and value != paper[name]:
            tags.append(f"{tag}{value:g}")
    if cfg.precision is not None:
        tags.append(cfg.precision)
    if cfg.templates == "ensemble":          # zero-shot CLIP's numbers in the results change
        tags.append("ensemble")
    return tags


def prompt_config(cfg):
    """PromptConfig of the flags: a phrase decides M (its BPE tokens, as in the official code), and an
    --n-ctx that disagrees is refused; CSC with a phrase is one generic context, as official (warned)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompt = PromptConfig(method=cfg.method, n_ctx=cfg.n_ctx, ctx_init=cfg.ctx_init, csc=cfg.csc,
                              class_token_position=cfg.class_token_position)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if prompt.ctx_init and cfg.n_ctx is not None and cfg.n_ctx != prompt.n_ctx:
        raise cli.UsageError(f"--n-ctx {cfg.n_ctx} disagrees with --ctx-init {prompt.ctx_init!r}, whose "
                             f"{prompt.n_ctx} tokens set M; drop --n-ctx, or pass --ctx-init \"\" for "
                             f"{cfg.n_ctx} random context vectors")
    return prompt
