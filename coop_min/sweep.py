"""`python -m coop_min.sweep`: one of the papers' protocols over a data root, one run folder per run.

    few-shot       CoOp's Figure 3 (scripts/coop/main.sh): datasets x shots 1/2/4/8/16 x seeds 1-3, CoOp.
    base2new       CoCoOp's Table 1 (base2new_train.sh + base2new_test.sh): 16 shots, --subsample base (which
                   tests new too); CoCoOp, or CoOp as that paper ran it (*_ctxv1: "a photo of a", M=4).
    cross-dataset  CoCoOp's Table 2 (xd_train.sh + xd_test.sh): ImageNet at 16 shots, its prompts tested on
                   the other 10 datasets; CoCoOp, or CoOp as vit_b16_ep50_ctxv1.
    dg             CoOp's domain generalisation (scripts/coop/eval.sh: CoOp, M=16; --method cocoop: CoCoOp's
                   Table 3): the ImageNet prompts tested on ImageNetV2/Sketch/A/R.
    --method zero-shot (cross-dataset, dg): zero-shot CLIP on those datasets, the tables' CLIP row.
    --method linear-probe (few-shot, dg): linear-probe CLIP (coop_min.linear_probe), CoOp's dashed lines.
Unset train flags take the paper defaults (coop_min/options.py); other flags are passed to every run.
`--grid FLAG=V1,V2` runs each value (each combination, repeated) as its own runs in their own folders:
CoOp's four variants are `--grid class-token-position=end,middle --grid csc=off,on`.
`--datasets` takes the official names, and any folder of --data in a layout coop_min reads (a
class/image folder is a dataset named after its folder).

Layout under --output, as the official scripts' (dataset/shots/method/setting/seed):
    <dataset>/shots_<K>/<method>/<setting>/seed<S>/            few-shot runs, and the ImageNet runs of
                                                               cross-dataset and dg
    base2new/<dataset>/shots_<K>/<method>/<setting>/seed<S>/   base-to-new runs
    evaluation/<method>/<setting>_<K>shots/<dataset>/seed<S>/  an ImageNet run's prompts on a dataset
    evaluation/zero_shot/<backbone>[_ensemble]/<dataset>/      zero-shot CLIP on a dataset
    <dataset>/shots_<K>/linear-probe/<backbone>/seed<S>/       linear-probe CLIP
    evaluation/linear-probe/<backbone>_<K>shots/<dataset>/seed<S>/  an ImageNet linear probe on a dataset
    sweep-logs/<a folder's path>.log                           each subprocess's output
<setting> is the backbone then main.sh's `nctx<M>_csc<C>_ctp<P>`, `_ctxv1` for the "a photo of a" init.
A folder with results.json is skipped, one with state.pt continued (`train --resume --output DIR`),
any other started: interrupt the sweep and rerun the same command to continue. An evaluation folder
holds evaluate's results.json and sweep.json, naming the run whose prompts it tested.
"""
import argparse
import itertools
import os
import re
import shlex
import signal
import sys
from dataclasses import replace
from typing import NamedTuple

from coop_min import cli, inputs, jobs, options, runs
from coop_min.data import DATASETS
from coop_min.jobs import Job

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
          "dataset": "use --datasets", "subsample": "the protocol sets it",
          "output": "use the sweep's --output"}
_EVAL_FLAGS = ("workers", "device", "skip_bad_images", "reference_path")   # train flags evaluate has too
_PROBE_FLAGS = ("weights", "workers", "device", "skip_bad_images")         # train flags linear_probe has
_ON, _OFF = ("on", "true", "yes", "1"), ("off", "false", "no", "0")
PY = [sys.executable, "-m"]


# ----------------------------------------------------------------------------------------------
# the plan: every run of the protocol, ImageNet runs before their evaluations


def _flags(extras):
    """Pass-through tokens as [(train field name, tokens)], one group per --flag."""
    flags = options.flag_fields()
    groups = []
    for t in extras:
        if t.startswith("--"):
            flag = t.split("=")[0]
            groups.append((flags.get(flag, flag[2:].replace("-", "_")), [t]))
        elif groups:
            groups[-1][1].append(t)
    return groups


def _train_config(extras, method):
    """The TrainConfig of the pass-through flags, parsed by train's options as TrainConfig declares
    them (an unknown or bad flag: one line, exit 2): (as given, resolved)."""
    p = cli.parser("python -m coop_min.sweep", allow_abbrev=False, description="")
    options.add_options(p)
    given = options.config(p, vars(p.parse_args([*extras, "--method", method])))
    return given, options.resolve(replace(given), "")


def dataset_folder(data, key):
    """A dataset's folder under --data: its official folder name, or a folder of one's own named `key`."""
    return os.path.join(data, DATASETS[key][1] if key in DATASETS else key)


def _loader_name(key):                       # what --dataset tells train: the official NAME, else detect
    return DATASETS[key][0] if key in DATASETS else "auto"


class _Planner:
    """What the jobs of one setting share: the pass-through flags, the resolved settings, the commands."""

    def __init__(self, args, extras):
        self.args = args
        self.out = args.output
        self.sub = PROTOCOLS[args.protocol].subsample
        groups = _flags(extras)
        typed = {name for name, _ in groups}
        ctxv1 = args.method == "coop" and args.protocol in ("base2new", "cross-dataset")  # as CoCoOp ran CoOp
        if ctxv1 and not typed & {"ctx_init", "n_ctx"}:
            extras = [*extras, "--ctx-init", runs.CTX_V1]
        method = args.method if args.method in ("coop", "cocoop") else "coop"
        self.given, self.cfg = _train_config(extras, method)
        self.extras = extras
        self.free = [t for name, ts in groups if name in options.RESUME_MAY_CHANGE for t in ts]
        self.fixed = {name: getattr(self.cfg, name) for name in typed
                      if name not in options.RESUME_MAY_CHANGE}
        own = ("weights", "precision", "templates") if args.method == "zero-shot" else ()  # else the run's
        self.eval_flags = [t for name, ts in groups if name in (*_EVAL_FLAGS, *own) for t in ts]
        self.probe_flags = [t for name, ts in groups if name in _PROBE_FLAGS for t in ts]

    # a dataset's folder (the demo's: written into the cache on first use)
    def data(self, key):
        if self.args.data is None:
            return str(inputs.data_root(None))
        return dataset_folder(self.args.data, key)

    def line(self, key, k=None, s=None):
        a = self.args
        data = ["--data", a.data] if a.data else []
        shots = ["--shots", str(k), "--seeds", str(s)] if s is not None else []
        return ["python", "-m", "coop_min.sweep", *data, "--protocol", a.protocol, "--method", a.method,
                "--datasets", key, *shots, "--output", self.out, *self.extras]

    def train(self, key, k, s):
        method = self.args.method
        name = _loader_name(key)
        cfg = replace(self.cfg, method=method, shots=k, seed=s, subsample=self.sub)
        given = replace(self.given, method=method, shots=k, seed=s, subsample=self.sub)
        tags = options.folder_tags(given, DATASETS.get(key, (key,))[0])    # as train names its own folder
        f = runs.run_folder(cfg, key, tags, root=self.out)
        argv = [*PY, "coop_min.train", "--data", self.data(key), "--dataset", name, "--method", method,
                "--shots", str(k), "--seed", str(s), "--subsample", self.sub, "--output", f, *self.extras]
        expect = {"dataset": name, "method": method, "shots": k, "seed": s, "subsample": self.sub,
                  **self.fixed}
        resume = [*PY, "coop_min.train", "--resume", "--output", f, *self.free]
        return Job(f"{key} {k} shots seed {s} {method}", f, argv, self.line(key, k, s), resume=resume,
                   expect=expect)

    def probe(self, key, k, s):
        f = runs.probe_folder(self.out, key, self.cfg.weights, k, s)
        argv = [*PY, "coop_min.linear_probe", "--data", self.data(key), "--dataset", _loader_name(key),
                "--shots", str(k), "--seeds", str(s), "--output", self.out, *self.probe_flags]
        return Job(f"{key} {k} shots seed {s} linear probe", f, argv, self.line(key, k, s))

    def evaluation(self, key, source, k, s):
        method = self.args.method
        setting = os.path.basename(os.path.dirname(source.folder))       # the source run's, tags and all
        f = os.path.join(self.out, "evaluation", method, f"{setting}_{k}shots", key, f"seed{s}")
        if method == "linear-probe":
            argv = [*PY, "coop_min.linear_probe", "--classifier", source.folder,
                    *self._target(key, f, self.probe_flags)]
        else:
            argv = [*PY, "coop_min.evaluate", "--prompt", source.folder,
                    *self._target(key, f, self.eval_flags)]
        return Job(f"{key} <- {SOURCE} {k} shots seed {s} {method}", f, argv, self.line(key, k, s),
                   needs=source.folder, sidecar={"prompt": os.path.relpath(source.folder, f)})

    def zero_shot(self, key):
        clip = runs.backbone(self.cfg.weights) + ("_ensemble" if self.cfg.templates == "ensemble" else "")
        f = os.path.join(self.out, "evaluation", "zero_shot", clip, key)
        argv = [*PY, "coop_min.evaluate", "--zero-shot", *self._target(key, f, self.eval_flags)]
        sidecar = {"prompt": None, "weights": self.cfg.weights, "templates": self.cfg.templates}
        return Job(f"{key} zero-shot CLIP", f, argv, self.line(key), sidecar=sidecar)

    def _target(self, key, f, flags):
        return ["--data", self.data(key), "--dataset", _loader_name(key), "--output", f, *flags]


def _plan_one(args, extras):
    """The jobs of one setting in the order they run."""
    p = _Planner(args, extras)
    if args.method == "zero-shot":
        return [p.zero_shot(key) for key in args.datasets]
    first = p.probe if args.method == "linear-probe" else p.train
    if args.protocol in ("few-shot", "base2new"):
        return [first(key, k, s) for key in args.datasets for k in args.shots for s in args.seeds]
    sources = {(k, s): first(SOURCE, k, s) for k in args.shots for s in args.seeds}
    targets = [p.evaluation(key, src, k, s) for key in args.datasets if key != SOURCE
               for (k, s), src in sources.items()]
    return [*sources.values(), *targets]


def _grid_tokens(flag, value):
    """The train flags that set one grid value: --flag VALUE, or for a switch --flag / --no-flag / nothing."""
    fields = options.flag_fields()
    if options.TrainConfig.__dataclass_fields__[fields[flag]].type not in (bool, bool | None):
        return [flag, value]
    if value.lower() in _ON:
        return [flag]
    return [f"--no-{flag[2:]}"] if f"--no-{flag[2:]}" in fields else []


def plan(args, extras):
    """Every job of the sweep in the order they run: one setting, or each combination of --grid's values
    (its own run folders), the jobs they share once."""
    axes = [[_grid_tokens(flag, v) for v in values] for flag, values in args.grid]
    planned = {}
    for combination in itertools.product(*axes):
        for job in _plan_one(args, [*extras, *itertools.chain(*combination)]):
            if job.folder in planned and job.argv != planned[job.folder].argv:
                raise cli.UsageError(
                    f"two settings of --grid share the folder {job.folder}: the values of one "
                    "of its flags do not change where a run goes; drop that flag from --grid")
            planned.setdefault(job.folder, job)
    return list(planned.values())


def check_settings(planned):
    """A run already in a job's folder must hold the settings this sweep asks for (else UsageError)."""
    for job in planned:
        started = jobs.done(job.folder) or os.path.exists(os.path.join(job.folder, "state.pt"))
        if job.expect is None or not started:
            continue
        saved = runs.read_config(job.folder)
        differ = [f"{k} {saved.get(k)!r}, not {v!r}" for k, v in job.expect.items() if saved.get(k) != v]
        if differ:
            raise cli.UsageError(f"{job.folder} holds a run with other settings ({'; '.join(differ)}); rerun "
                                 "with that run's flags, or pass another --output")


# ----------------------------------------------------------------------------------------------
# command line


def _ints(text):
    if not re.fullmatch(r"\d+(,\d+)*", text):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,3, got {text!r}")
    return [int(v) for v in text.split(",")]


def _dataset_keys(text):
    """Official config names (their loader NAMEs and folders too); any other name is a folder under --data."""
    official = {alias: key
                for key, (name, folder) in DATASETS.items()
                for alias in (key, name.lower(), folder)}
    return [official.get(d.lower(), d) for d in text.split(",") if d]


def _grid(text):
    flag, sep, values = text.partition("=")
    flag = "--" + flag.removeprefix("--")
    if not sep or flag not in options.flag_fields() or flag.startswith("--no-"):
        raise argparse.ArgumentTypeError(
            f"expected a train flag and its values like n-ctx=4,8,16, got {text!r}")
    return flag, values.split(",")


def _check(p, args, extras):
    """Every input, before anything runs; p.error exits 2 with one line."""
    given = [name for name, _ in _flags(extras)]
    grid = [options.flag_fields()[flag] for flag, _ in args.grid]
    if owned := [n for n in given + grid if n in _OWNED]:
        p.error(f"--{owned[0].replace('_', '-')} is not a sweep flag ({_OWNED[owned[0]]})")
    if twice := [n for n in grid if n in given or grid.count(n) > 1]:
        p.error(f"--{twice[0].replace('_', '-')} is given twice (in --grid and as a flag); give it once")
    if args.method == "zero-shot" and args.protocol in ("few-shot", "base2new"):
        p.error("--method zero-shot is for cross-dataset and dg; "
                "every training run reports zero-shot CLIP already")
    if args.method == "linear-probe" and args.protocol not in ("few-shot", "dg"):
        p.error("--method linear-probe runs the few-shot and dg protocols, as the CoOp paper reports it")
    if args.method == "linear-probe" and (other := [n for n in given + grid if n not in _PROBE_FLAGS]):
        p.error(f"--{other[0].replace('_', '-')} is not a linear-probe setting; it takes "
                f"{', '.join('--' + n.replace('_', '-') for n in _PROBE_FLAGS)}")
    if args.protocol in ("few-shot", "base2new") and (bad := [d for d in args.datasets if d in TEST_ONLY]):
        p.error(f"{', '.join(bad)} cannot be trained on (test-only); evaluate on them with --protocol dg")
    if min(args.shots) < 1:
        p.error(f"--shots must be >= 1, got {','.join(map(str, args.shots))}")
    if any(d != "cpu" and not d.isdigit() for d in args.devices or []):
        p.error(f"--devices takes cpu or CUDA indices like 0,1,2,3, got {','.join(args.devices)}")
    if any(d != "cpu" for d in args.devices or []) and "device" in given:
        p.error("--device and CUDA --devices both choose the device; drop --device")
    _check_data(p, args)


def _check_data(p, args):
    if args.data is None:
        if args.datasets != ["demo"] or args.protocol in ("cross-dataset", "dg"):
            p.error("without --data the sweep runs few-shot or base2new on the bundled demo; "
                    "pass --data ROOT, the folder of the datasets")
        return
    if not os.path.isdir(args.data):
        p.error(f"--data {args.data} is not a folder; pass the folder that holds the dataset folders")
    source = [SOURCE] if args.protocol in ("cross-dataset", "dg") and args.method != "zero-shot" else []
    wanted = dict.fromkeys(source + args.datasets)
    if missing := [d for d in wanted if not os.path.isdir(dataset_folder(args.data, d))]:
        here = sorted(e.name for e in os.scandir(args.data) if e.is_dir() and not e.name.startswith("."))
        what = [f"{d} (folder {DATASETS[d][1]})" if d in DATASETS else f"folder {d}" for d in missing]
        p.error(f"{args.data} has no {', '.join(what)}; "
                "--datasets takes the official names (CoOp's DATASETS.md "
                f"layout) or folders of --data: {', '.join(here) or 'none'}")


def parse_args(argv=None):
    p = cli.parser("python -m coop_min.sweep", allow_abbrev=False, description=(
        "Run a protocol of the CoOp/CoCoOp papers over a data root, one run folder per run; "
        "finished runs are skipped and unfinished ones continued, so interrupt and rerun it freely. "
        "Other flags are "
        "coop_min.train flags, passed to every run."))
    a = p.add_argument
    a("--data", help="the folder holding the datasets under their official folder names, or folders of your "
                     "own (default: the demo)")
    a("--protocol", required=True, choices=list(PROTOCOLS),
      help="few-shot (CoOp Figure 3), base2new (CoCoOp Table 1), cross-dataset (Table 2), "
           "dg (domain generalisation)")
    a("--datasets", type=_dataset_keys,
      help="comma-separated, named as the official configs/datasets, or "
           "folders of --data (default: the protocol's, e.g. the 11 for few-shot)")
    a("--shots", type=_ints, help="comma-separated (default 1,2,4,8,16 for few-shot, else 16)")
    a("--seeds", type=_ints, default=[1, 2, 3], help="comma-separated (default 1,2,3)")
    a("--method", choices=["coop", "cocoop", "zero-shot", "linear-probe"],
      help="(default: coop for few-shot and dg, cocoop for base2new and cross-dataset); linear-probe: CLIP's "
           "linear probe (coop_min.linear_probe) for few-shot and dg")
    a("--grid", type=_grid, action="append", default=[], metavar="FLAG=V1,V2",
      help="a train flag and several values, each its own runs "
           "(repeat for a grid: --grid n-ctx=4,8,16 --grid "
           "class-token-position=end,middle; a switch takes on,off: --grid csc=off,on)")
    a("--output", default="runs", help="the folder of all the runs (default runs)")
    a("--devices", type=lambda t: t.split(","),
      help="cpu, or CUDA indices 0,1,2,3: one run per device at a time (default: one run at a time)")
    a("--print-commands", action="store_true",
      help="print one command per run (for a Slurm array, GNU parallel) and run nothing")
    args, extras = p.parse_known_args(argv)
    proto = PROTOCOLS[args.protocol]
    args.method = args.method or proto.method
    args.shots = args.shots or list(proto.shots)
    args.datasets = args.datasets or (["demo"] if args.data is None else list(proto.datasets))
    _check(p, args, extras)
    args.data = args.data and os.path.abspath(args.data)
    args.output = os.path.abspath(args.output)
    args.extras = extras
    return args, extras


def main(argv=None):
    cli.exit_with(cli.run(
        _main, argv,
        interrupted="interrupted: the running runs were stopped, each folder keeps "
                    "its last checkpoint; rerun the same command to continue"))


def _main(argv):
    args, extras = parse_args(argv)
    planned = plan(args, extras)
    if args.print_commands:
        print("\n".join(shlex.join(job.line) for job in planned))
        return 0
    check_settings(planned)
    runs.check_writable(args.output)
    # Ctrl-C, a kill -INT (even where a shell started the sweep ignoring it) and a scheduler's SIGTERM all
    # stop the runs; the runs, in process groups of their own, get SIGINT from the sweep alone, once
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    typed = {name for name, _ in _flags(extras)} | {options.flag_fields()[flag] for flag, _ in args.grid}
    if failed := jobs.execute(planned, args.devices or [None], typed, args.output):
        print(f"error: {len(failed)} of {len(planned)} runs failed "
              f"(logs in {os.path.join(args.output, 'sweep-logs')}); "
              "rerun the same command to retry them", file=sys.stderr)
        return 1
    print(f"all {len(planned)} runs finished; their tables: python -m coop_min.summarize {args.output}",
          flush=True)
    return 0


if __name__ == "__main__":
    main()
