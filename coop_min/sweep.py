"""`python -m coop_min.sweep`: one of the papers' protocols over a data root, one run folder per run.

    few-shot       CoOp's Figure 3 (scripts/coop/main.sh): datasets x shots 1/2/4/8/16 x seeds 1-3, CoOp.
    base2new       CoCoOp's Table 1 (base2new_train.sh + base2new_test.sh): 16 shots, --subsample base (which
                   tests new too); CoCoOp, or CoOp as that paper ran it (*_ctxv1: "a photo of a", M=4).
    cross-dataset  CoCoOp's Table 2 (xd_train.sh + xd_test.sh): ImageNet at 16 shots, its prompts tested on
                   the other 10 datasets; CoCoOp, or CoOp as vit_b16_ep50_ctxv1.
    dg             CoOp's domain generalisation (scripts/coop/eval.sh: CoOp, M=16; --method cocoop: CoCoOp's
                   Table 3): the ImageNet prompts tested on ImageNetV2/Sketch/A/R.
    --method zero-shot (cross-dataset, dg): zero-shot CLIP on those datasets, the tables' CLIP row.
Unset train flags take the paper defaults (coop_min/train.py); other flags are passed to every run.

Layout under --output, as the official scripts' (dataset/shots/method/setting/seed):
    <dataset>/shots_<K>/<method>/<setting>/seed<S>/            few-shot runs, and the ImageNet runs of
                                                               cross-dataset and dg
    base2new/<dataset>/shots_<K>/<method>/<setting>/seed<S>/   base-to-new runs
    evaluation/<method>/<setting>_<K>shots/<dataset>/seed<S>/  an ImageNet run's prompts on a dataset
    evaluation/zero_shot/<backbone>/<dataset>/                 zero-shot CLIP on a dataset
    sweep-logs/<a folder's path>.log                           each subprocess's output
<setting> is the backbone then main.sh's `nctx<M>_csc<C>_ctp<P>`, `_ctxv1` for the "a photo of a" init.
A folder with results.json is skipped, one with state.pt continued (`train --resume --output DIR`),
any other started: interrupt the sweep and rerun the same command to continue. An evaluation folder
holds evaluate's results.json and sweep.json, naming the run whose prompts it tested.
"""
import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import NamedTuple

from coop_min import cli, hub, runs
from coop_min.data import DATASETS
from coop_min.runs import CTX_V1, backbone, setting
from coop_min import train as T
from coop_min.files import write_json

ELEVEN = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
          "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
TEST_ONLY = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
SOURCE = "imagenet"                          # where cross-dataset and dg train


class Protocol(NamedTuple):
    method: str
    shots: tuple
    datasets: tuple
    subsample: str


PROTOCOLS = {"few-shot": Protocol("coop", (1, 2, 4, 8, 16), ELEVEN, "all"),
             "base2new": Protocol("cocoop", (16,), ELEVEN, "base"),
             "cross-dataset": Protocol("cocoop", (16,), ELEVEN, "all"),
             "dg": Protocol("coop", (16,), (SOURCE, *TEST_ONLY), "all")}
_OWNED = {"resume": "the sweep continues unfinished runs by itself", "seed": "use --seeds",
          "dataset": "use --datasets", "subsample": "the protocol sets it"}
_EVAL_FLAGS = ("workers", "device", "skip_bad_images", "reference_path")   # train flags evaluate has too
PY = [sys.executable, "-m"]


@dataclass
class Job:
    label: str
    folder: str
    argv: list                               # the command of a new run or of an evaluation
    line: list                               # this one run as a sweep command (--print-commands)
    resume: list | None = None               # a train run: the command that continues it
    expect: dict | None = None               # a train run: settings its config.json must hold
    needs: str | None = None                 # an evaluation: the run whose prompts it tests
    sidecar: dict | None = None              # an evaluation: its sweep.json


# ----------------------------------------------------------------------------------------------
# the plan: every run of the protocol, ImageNet runs before their evaluations


def _flags(extras):
    """Pass-through tokens as [(train field name, tokens)], one group per --flag."""
    flags, groups = T.flag_fields(), []
    for t in extras:
        if t.startswith("--"):
            flag = t.split("=")[0]
            groups.append((flags.get(flag, flag[2:].replace("-", "_")), [t]))
        elif groups:
            groups[-1][1].append(t)
    return groups


def _train_config(extras, method):
    """The resolved TrainConfig of the pass-through flags, parsed by train's options as TrainConfig
    declares them (an unknown or bad flag: one line, exit 2)."""
    p = cli.parser("python -m coop_min.sweep", allow_abbrev=False, description="")
    T.add_options(p)
    return T.resolve(T.config(p, vars(p.parse_args([*extras, "--method", method]))), "")


class _Planner:
    """What the jobs of one sweep share: the pass-through flags, the resolved settings, the commands."""

    def __init__(self, args, extras):
        self.args, self.out, self.sub = args, args.output, PROTOCOLS[args.protocol].subsample
        groups = _flags(extras)
        typed = {n for n, _ in groups}
        ctxv1 = args.method == "coop" and args.protocol in ("base2new", "cross-dataset")   # CoOp as CoCoOp ran it
        if ctxv1 and not typed & {"ctx_init", "n_ctx"}:
            extras = [*extras, "--ctx-init", CTX_V1]
        method = "coop" if args.method == "zero-shot" else args.method
        self.cfg = _train_config(extras, method)
        self.extras, self.tag = extras, setting(self.cfg)
        self.free = [t for n, ts in groups if n in T.RESUME_MAY_CHANGE for t in ts]
        self.fixed = {n: getattr(self.cfg, n) for n in typed if n not in T.RESUME_MAY_CHANGE}
        zero_shot = ("weights", "precision") if args.method == "zero-shot" else ()  # a prompt brings its run's
        self.eval_flags = [t for n, ts in groups if n in (*_EVAL_FLAGS, *zero_shot) for t in ts]

    def data(self, key):                     # a dataset's folder (the demo's: written into the cache on first use)
        return str(runs.data_root(None)) if self.args.data is None else os.path.join(self.args.data, DATASETS[key][1])

    def line(self, key, k=None, s=None):
        a = self.args
        return ["python", "-m", "coop_min.sweep", *(["--data", a.data] if a.data else []), "--protocol", a.protocol,
                "--method", a.method, "--datasets", key,
                *(["--shots", str(k), "--seeds", str(s)] if s is not None else []), "--output", self.out, *a.extras]

    def train(self, key, k, s):
        method, name = self.args.method, DATASETS[key][0]
        f = runs.run_folder(replace(self.cfg, method=method, shots=k, seed=s, subsample=self.sub), key, root=self.out)
        argv = [*PY, "coop_min.train", "--data", self.data(key), "--dataset", name, "--method", method,
                "--shots", str(k), "--seed", str(s), "--subsample", self.sub, "--output", f, *self.extras]
        expect = {"dataset": name, "method": method, "shots": k, "seed": s, "subsample": self.sub, **self.fixed}
        return Job(f"{key} {k} shots seed {s} {method}", f, argv, self.line(key, k, s),
                   resume=[*PY, "coop_min.train", "--resume", "--output", f, *self.free], expect=expect)

    def evaluation(self, key, source, k, s):
        f = os.path.join(self.out, "evaluation", self.args.method, f"{self.tag}_{k}shots", key, f"seed{s}")
        return Job(f"{key} <- {SOURCE} {k} shots seed {s} {self.args.method}", f,
                   [*PY, "coop_min.evaluate", "--prompt", source.folder, *self._target(key, f)], self.line(key, k, s),
                   needs=source.folder, sidecar={"prompt": os.path.relpath(source.folder, f)})

    def zero_shot(self, key):
        f = os.path.join(self.out, "evaluation", "zero_shot", backbone(self.cfg.weights), key)
        return Job(f"{key} zero-shot CLIP", f, [*PY, "coop_min.evaluate", "--zero-shot", *self._target(key, f)],
                   self.line(key), sidecar={"prompt": None, "weights": self.cfg.weights})

    def _target(self, key, f):
        return ["--data", self.data(key), "--dataset", DATASETS[key][0], "--output", f, *self.eval_flags]


def plan(args, extras):
    """The jobs of the sweep in the order they run; `extras`: the pass-through train flags."""
    p = _Planner(args, extras)
    if args.method == "zero-shot":
        return [p.zero_shot(key) for key in args.datasets]
    if args.protocol in ("few-shot", "base2new"):
        return [p.train(key, k, s) for key in args.datasets for k in args.shots for s in args.seeds]
    sources = {(k, s): p.train(SOURCE, k, s) for k in args.shots for s in args.seeds}
    return [*sources.values(), *(p.evaluation(key, src, k, s) for key in args.datasets if key != SOURCE
                                 for (k, s), src in sources.items())]


def check_settings(jobs):
    """A run already in a job's folder must hold the settings this sweep asks for (else UsageError)."""
    for job in jobs:
        if job.expect is None or not (_done(job.folder) or os.path.exists(os.path.join(job.folder, "state.pt"))):
            continue
        saved = runs.read_config(job.folder)
        differ = [f"{k} {saved.get(k)!r}, not {v!r}" for k, v in job.expect.items() if saved.get(k) != v]
        if differ:
            raise cli.UsageError(f"{job.folder} holds a run with other settings ({'; '.join(differ)}); rerun "
                             "with that run's flags, or pass another --output")


# ----------------------------------------------------------------------------------------------
# running: one subprocess per run, one run per device at a time


def _done(folder):
    return os.path.exists(os.path.join(folder, "results.json"))


def _outcome(folder):                        # what a finished run or evaluation found
    with open(os.path.join(folder, "results.json")) as f:
        r = json.load(f)
    if "new" in r and "harmonic_mean" in r:
        return f"base {r['base']:.2f}% new {r['new']:.2f}% H {r['harmonic_mean']:.2f}"
    return f"accuracy {r['accuracy']:.2f}%"


def _launch(job, device, typed, log):
    """The job's subprocess on `device` (None: the default; "cpu"; a CUDA index), its output into `log`.
    It runs in a process group of its own (start_new_session), so a Ctrl-C reaches the sweep alone, which
    passes it on once."""
    resume = job.resume is not None and os.path.exists(os.path.join(job.folder, "state.pt"))
    argv, env = list(job.resume if resume else job.argv), dict(os.environ)
    if device == "cpu" and "device" not in typed:
        argv += ["--device", "cpu"]
    elif device not in (None, "cpu"):
        env["CUDA_VISIBLE_DEVICES"] = device
    if job.sidecar is not None:
        os.makedirs(job.folder, exist_ok=True)
        write_json(os.path.join(job.folder, "sweep.json"), job.sidecar)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, "continue" if resume else "start"


def _last_line(path):
    with open(path, errors="replace") as f:
        return ([line.strip() for line in f if line.strip()] or ["no output"])[-1]


def execute(jobs, devices, typed, out):
    """Run the unfinished jobs, one per device at a time; returns the folders of those that failed."""
    todo = [(i, j) for i, j in enumerate(jobs, 1) if not _done(j.folder)]
    logs, failed, running, free, n = os.path.join(out, "sweep-logs"), [], {}, list(devices), len(jobs)
    print(f"{n} runs: {n - len(todo)} finished (skipped), {len(todo)} to run; their output goes to {logs}", flush=True)
    try:
        while todo or running:
            for proc in [p for p in running if p.poll() is not None]:
                i, job, device, t0, log = running.pop(proc)
                free.append(device)
                if proc.returncode == 0 and _done(job.folder):
                    minutes = (time.monotonic() - t0) / 60
                    print(f"[{i}/{n}] done in {minutes:.1f} min: {_outcome(job.folder)}", flush=True)
                else:
                    failed.append(job.folder)
                    print(f"[{i}/{n}] failed (exit {proc.returncode}): {_last_line(log)} (see {log})", flush=True)
            for i, job in [(i, j) for i, j in todo if j.needs in failed]:
                todo.remove((i, job))
                failed.append(job.folder)
                print(f"[{i}/{n}] {job.label}: not run, its prompts {job.needs} did not finish", flush=True)
            for i, job in [(i, j) for i, j in todo if j.needs is None or _done(j.needs)][:len(free)]:
                todo.remove((i, job))
                device, log = free.pop(0), os.path.join(logs, os.path.relpath(job.folder, out) + ".log")
                proc, verb = _launch(job, device, typed, log)
                running[proc] = (i, job, device, time.monotonic(), log)
                on = "" if device is None else " on cpu" if device == "cpu" else f" on cuda {device}"
                print(f"[{i}/{n}] {job.label}: {verb}{on} -> {job.folder}", flush=True)
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(running)
        raise
    return failed


def _stop(running):
    """Pass the interrupt on to each running run once, and wait for it to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for proc in running:
        proc.send_signal(signal.SIGINT)
    for proc in running:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


# ----------------------------------------------------------------------------------------------
# command line


def _ints(text):
    if not re.fullmatch(r"\d+(,\d+)*", text):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,3, got {text!r}")
    return [int(v) for v in text.split(",")]


def _dataset_keys(text):
    keys = [next((k for k, (name, folder) in DATASETS.items() if d.lower() in (k, name.lower(), folder)), d)
            for d in text.split(",")]
    if unknown := [k for k in keys if k not in DATASETS]:
        raise argparse.ArgumentTypeError(f"unknown dataset {unknown[0]!r}; use {', '.join(DATASETS)}")
    return keys


def _check(p, args, extras):
    """Every input, before anything runs; p.error exits 2 with one line."""
    if owned := [n for n, _ in _flags(extras) if n in _OWNED]:
        p.error(f"--{owned[0].replace('_', '-')} is not a sweep flag ({_OWNED[owned[0]]})")
    if args.method == "zero-shot" and args.protocol in ("few-shot", "base2new"):
        p.error("--method zero-shot is for cross-dataset and dg; every training run reports zero-shot CLIP already")
    if args.protocol in ("few-shot", "base2new") and (bad := [d for d in args.datasets if d in TEST_ONLY]):
        p.error(f"{', '.join(bad)} cannot be trained on (test-only); evaluate on them with --protocol dg")
    if min(args.shots) < 1:
        p.error(f"--shots must be >= 1, got {','.join(map(str, args.shots))}")
    if any(d != "cpu" and not d.isdigit() for d in args.devices or []):
        p.error(f"--devices takes cpu or CUDA indices like 0,1,2,3, got {','.join(args.devices)}")
    if any(d != "cpu" for d in args.devices or []) and "device" in {n for n, _ in _flags(extras)}:
        p.error("--device and CUDA --devices both choose the device; drop --device")
    if args.data is None:
        if args.datasets != ["demo"] or args.protocol in ("cross-dataset", "dg"):
            p.error("without --data the sweep runs few-shot or base2new on the bundled demo; pass --data ROOT, the "
                    "folder of the datasets")
        return
    if not os.path.isdir(args.data):
        p.error(f"--data {args.data} is not a folder; pass the folder that holds the dataset folders")
    source = [SOURCE] if args.protocol in ("cross-dataset", "dg") and args.method != "zero-shot" else []
    here = {k for k, (_, folder) in DATASETS.items() if os.path.isdir(os.path.join(args.data, folder))}
    if missing := [d for d in dict.fromkeys(source + args.datasets) if d not in here]:
        p.error(f"{args.data} has no {', '.join(f'{d} (folder {DATASETS[d][1]})' for d in missing)}, the layout of "
                f"CoOp's DATASETS.md; pass --datasets with those it has: {', '.join(sorted(here)) or 'none'}")


def parse_args(argv=None):
    p = cli.parser("python -m coop_min.sweep", allow_abbrev=False, description=(
        "Run a protocol of the CoOp/CoCoOp papers over a data root, one run folder per run; finished runs are "
        "skipped and unfinished ones continued, so interrupt and rerun it freely. Other flags are "
        "coop_min.train flags, passed to every run."))
    a = p.add_argument
    a("--data", help="the folder holding the datasets under their official folder names (default: the demo)")
    a("--protocol", required=True, choices=list(PROTOCOLS),
      help="few-shot (CoOp Figure 3), base2new (CoCoOp Table 1), cross-dataset (Table 2), dg (domain generalisation)")
    a("--datasets", type=_dataset_keys, help="comma-separated, named as the official configs/datasets "
                                             "(default: the protocol's, e.g. the 11 for few-shot)")
    a("--shots", type=_ints, help="comma-separated (default 1,2,4,8,16 for few-shot, else 16)")
    a("--seeds", type=_ints, default=[1, 2, 3], help="comma-separated (default 1,2,3)")
    a("--method", choices=["coop", "cocoop", "zero-shot"],
      help="(default: coop for few-shot and dg, cocoop for base2new and cross-dataset)")
    a("--output", default="runs", help="the folder of all the runs (default runs)")
    a("--devices", type=lambda t: t.split(","),
      help="cpu, or CUDA indices 0,1,2,3: one run per device at a time (default: one run at a time)")
    a("--print-commands", action="store_true",
      help="print one command per run (for a Slurm array, GNU parallel) and run nothing")
    args, extras = p.parse_known_args(argv)
    proto = PROTOCOLS[args.protocol]
    args.method, args.shots = args.method or proto.method, args.shots or list(proto.shots)
    args.datasets = args.datasets or (["demo"] if args.data is None else list(proto.datasets))
    _check(p, args, extras)
    args.data, args.output, args.extras = args.data and os.path.abspath(args.data), os.path.abspath(args.output), extras
    return args, extras


def main(argv=None):
    cli.exit_with(cli.run(_main, argv, interrupted="interrupted: the running runs were stopped, each folder keeps "
                                                   "its last checkpoint; rerun the same command to continue"))


def _main(argv):
    args, extras = parse_args(argv)
    jobs = plan(args, extras)
    if args.print_commands:
        print("\n".join(shlex.join(job.line) for job in jobs))
        return 0
    check_settings(jobs)
    runs.check_writable(args.output)
    # Ctrl-C, a kill -INT (even where a shell started the sweep ignoring it) and a scheduler's SIGTERM all stop the
    # runs; the runs, in process groups of their own, get SIGINT from the sweep alone, once
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if failed := execute(jobs, args.devices or [None], {n for n, _ in _flags(extras)}, args.output):
        print(f"error: {len(failed)} of {len(jobs)} runs failed (logs in {os.path.join(args.output, 'sweep-logs')}); "
              "rerun the same command to retry them", file=sys.stderr)
        return 1
    print(f"all {len(jobs)} runs finished; their tables: python -m coop_min.summarize {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    main()
