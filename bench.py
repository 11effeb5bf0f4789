"""Throughput and memory of CoOp / CoCoOp: an official-equivalent path and ours, side by side.

    python bench.py [--device cuda|cpu] [--cases PREFIX,...] [--json PATH] [--smoke] [--memory | --cost]
    python bench.py --distributed [--device cuda|cpu] [--smoke] [--json PATH]
    python bench.py --markdown JSON [JSON ...]

One process, one device, the same random-init CLIP weights, inputs, class names and initial context
for both paths: "official" is the official compute path re-created (benchmarks/official.py: OpenAI's
CLIP as CoOp vendors it, fp16, trainers/coop.py and cocoop.py), "ours" is coop_min.fast's
FastPromptedCLIP (bf16 with fp32 LayerNorm and fp32 context), and on CUDA "buckets" runs ours with
length buckets in eager steps and "graph" replays ours' whole train step (with buckets) from a CUDA
graph, so the two gains show apart; benchmarks/methods.py says exactly what each runs. On CPU both
paths compute in fp32.

Cases: CoOp train steps (batch 32, M=16) at 10/100/1000 classes for ViT-B/16 and RN50, CoCoOp train
steps (M=4) at 50/500 classes and batch 1/8, each with ImageNet's first C class names as CoOp spells
them (benchmarks/imagenet_classnames.txt; their lengths set how far prompts pad, and "text tokens"
is what ours' text encoder runs per step, in its chunks), zero-shot evaluation (batch 256, 1000
classes; also ours with the image encoder under torch.compile unless --no-compile), and the
classification head alone (fused kernel vs its eager twin vs torch.compile of the twin, with
achieved GB/s against a measured device-to-device copy). Each case first computes its exact
reference once: the method itself in fp32 on the same device, weights and inputs (prompts.PromptedCLIP;
benchmarks/reference.py). Every method's first loss and, for train steps, first-step gradient of the
context is checked against it within a tolerance for the method's dtype (benchmarks/checks.py): at
random init the loss sits near log C whatever the prompts, so it alone misses real bugs. The official
path in fp16 is not checked but its distance is reported ("official_vs_fp32"): at ImageNet's class
counts its fp16 gradient is mostly rounding. Each method is timed after a warm-up as the median of N
steps, with the fastest and slowest beside it (benchmarks/timing.py); peak memory is that method
alone, its CLIP weights included, and beside the graph's the most the allocator reserved (its pool).
A method that runs out of memory reports OOM. The graph and compile methods, whose first calls vouch
for nothing (a graph's are eager warm-ups), are also checked after timing against as many eager steps
from the same start. A failed check prints FAIL in place of the time and no speedup, and the process
exits 1.

Instead of timing, on the CPU: `--memory` models each train case's peak GPU memory
(benchmarks/memory.py) and `--cost` each train and zero-shot case's GPU work from its ops
(benchmarks/cost.py). `--distributed` measures data-parallel CoOp instead of the cases: a per-rank
cost model of the sharded text encoder and, over several GPUs (or CPU processes), the scaling of
whole train steps (benchmarks/scaling.py). `--markdown` prints the README's speed table from the JSON
files of earlier runs (benchmarks/table.markdown).
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks import checks, cost, memory, scaling, table
from benchmarks.methods import Models, Settings, head_methods, train_methods, zeroshot_methods
from benchmarks.timing import copy_gbps, free
from coop_min import cli
from coop_min.kernels.cosine_ce import use_triton


@dataclass
class Case:
    name: str
    kind: str               # coop | cocoop | zeroshot | head
    arch: str = ""          # a key of benchmarks.methods.ARCHS (not for head)
    classes: int = 0
    batch: int = 0
    n_ctx: int = 0
    dim: int = 0            # head: feature width D
    per_image: bool = False  # head: CoCoOp's (B, C, D) text features
    repeats: int = 10


def all_cases(smoke=False):
    """Training and evaluation cases grouped by architecture (each is built once), then the head."""
    vit, rn = ("vit_tiny", "rn_tiny") if smoke else ("vit_b16", "rn50")
    coop_classes, cocoop_classes, cocoop_batches = ((3, 5, 8), (4, 6), (1, 2)) if smoke else \
        ((10, 100, 1000), (50, 500), (1, 8))
    reps = (lambda n: 2) if smoke else (lambda n: n)
    cases = []
    for arch in (vit, rn):
        cases += [Case(f"coop-{arch}-c{C}", "coop", arch, C, 4 if smoke else 32, 16,
                       repeats=reps(5 if C >= 1000 else 10)) for C in coop_classes]
        if arch == vit:
            cases += [Case(f"cocoop-{arch}-c{C}-b{B}", "cocoop", arch, C, B, 4, repeats=reps(3 if B * C >= 4000 else 5))
                      for C in cocoop_classes for B in cocoop_batches]
        cases.append(Case(f"zeroshot-{arch}", "zeroshot", arch, 10 if smoke else 1000, 4 if smoke else 256,
                          repeats=reps(10)))
    heads = [(4, 10, 32, False), (2, 6, 32, True), (4, 12, 32, True)] if smoke else \
        [(32, 1000, 512, False), (8, 500, 512, True), (32, 1000, 512, True)]   # the last: bandwidth-bound
    cases += [Case(f"head-{'cocoop' if p else 'coop'}-b{B}-c{C}-d{D}", "head", classes=C, batch=B, dim=D,
                   per_image=p, repeats=reps(50)) for B, C, D, p in heads]
    return cases


# ----------------------------------------------------------------------------------------------
# reporting


def summarise(case, methods):
    """The case's JSON record: its sizes, the fp32 reference, each method's numbers, its first output
    against the reference ("vs_fp32"), the ratios, and whether every check passed."""
    reference = methods.pop("reference")
    res = {"case": case.name, **{k: v for k, v in asdict(case).items() if k != "name"},
           "reference": reference, "methods": methods}
    reference_grad = reference.pop("grad", None)                  # tensors stay out of the JSON
    for name, m in methods.items():
        grad = m.pop("grad", None)
        if "loss" in m:           # reported only: the official path in fp16, and the CPU models (not timed)
            checked = "ms" in m and (name != "official" or m["dtype"] == "float32")
            m["vs_fp32"] = checks.vs_reference(m, grad, reference, reference_grad, checked)
    if "vs_fp32" in methods.get("official", {}):
        official = methods["official"]
        res["official_vs_fp32"] = {"dtype": official["dtype"],
                                   **{k: v for k, v in official["vs_fp32"].items() if k != "ok"}}
    res["match"] = all(m["vs_fp32"]["ok"] is not False for m in methods.values() if "vs_fp32" in m)
    base, new = (methods["eager"], methods["fused"]) if case.kind == "head" else (methods["official"], methods["ours"])
    ms = {name: r.get("ms") if checks.passed(r) else None for name, r in methods.items()}   # failed check: no speedup
    if case.kind == "head":
        res["speedup_vs_eager"] = _ratio(ms["eager"], ms["fused"])
        res["speedup_vs_compile"] = _ratio(ms.get("compile"), ms["fused"])
    else:
        res["speedup"] = _ratio(ms["official"], ms["ours"])
        res["memory_ratio"] = _ratio(base.get("peak_gib"), new.get("peak_gib"))
        for other in ("buckets", "graph", "compile"):
            if other in methods:
                res[f"speedup_{other}"] = _ratio(ms["official"], ms[other])
                res[f"memory_ratio_{other}"] = _ratio(base.get("peak_gib"), methods[other].get("peak_gib"))
        for r in methods.values():
            if "ms" in r:
                r["images_per_s"] = case.batch / (r["ms"] * 1e-3)
    res["checks_passed"] = all(checks.passed(r) for r in methods.values())
    return res


def _ratio(num, den):
    return num / den if num is not None and den else None


def _environment(device, args, copy_bw):
    import platform
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    probe, settings = torch.empty(1, device=device), args.settings
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "commit": _commit(), "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(),
            "official_dtype": str(settings.official_dtype), "ours_dtype": str(settings.ours_dtype),
            "fused_head": "triton" if use_triton(probe) else "pytorch twin", "shared_prefix": settings.shared_prefix,
            "fused_elementwise": settings.fused_elementwise and use_triton(probe),
            "fused_attention": settings.fused_attention and use_triton(probe),
            "length_buckets": settings.length_buckets, "copy_gbps": copy_bw, "smoke": args.smoke,
            "warmup": settings.warmup}


def _commit():
    """The checkout's commit, "+changes" where tracked files differ from it; $COMMIT where the copy has
    no .git (.ci/gpu passes it); None where neither tells."""
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}                # read only: git status writes no index

    def git(*args):
        return subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), *args],
                              capture_output=True, text=True, timeout=30, env=env)
    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return None if head.returncode else head.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


# ----------------------------------------------------------------------------------------------
# main


def _parser():
    p = cli.parser("bench.py", __doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--cases", default="", help="comma-separated name prefixes, e.g. coop-vit,head (default: all)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--smoke", action="store_true", help="tiny models and classes, 2 timed steps (CI on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per method (default 3, smoke 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per method (default: per case, 3-50)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip torch.compile (of the head twin, of the zero-shot image encoder; smoke skips it)")
    p.add_argument("--shared-prefix", action="store_true",
                   help="ours with the shared-prefix text path (less memory, more launches)")
    p.add_argument("--no-fused-elementwise", dest="fused_elementwise", action="store_false",
                   help="ours with PyTorch's LayerNorm and QuickGELU instead of kernels/elementwise.py (CUDA), to see what they give")
    p.add_argument("--no-fused-attention", dest="fused_attention", action="store_false",
                   help="ours with SDPA for the text's causal attention instead of kernels/attention.py (CUDA)")
    p.add_argument("--length-buckets", action="store_true",
                   help="ours with prompts in length buckets in eager steps too (the graph method always has them)")
    p.add_argument("--list", action="store_true", help="print the selected case names and exit")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="skip the methods replayed from a CUDA graph: ours for train steps, fused for the head (CUDA only)")
    p.add_argument("--memory", action="store_true",
                   help="CPU: model each train case's peak GPU memory instead of timing (benchmarks/memory.py)")
    p.add_argument("--cost", action="store_true",
                   help="CPU: model each train and zero-shot case's GPU work from its ops instead of timing (benchmarks/cost.py)")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel CoOp instead: per-rank text cost at 1k/10k/21k classes, scaling over GPUs")
    p.add_argument("--markdown", nargs="+", metavar="JSON",
                   help="print the README's speed table (Markdown) from earlier --json runs' files, and exit")
    return p


def _check(p, args):
    """Refuse bad combinations now, in one line, not after a long run."""
    for flag, what in (("memory", "GPU memory"), ("cost", "GPU work")):
        if getattr(args, flag) and (args.device != "cpu" or args.distributed or (args.memory and args.cost)):
            p.exit(2, f"bench.py: error: --{flag} models {what} on the CPU: pass --device cpu, without --distributed "
                      f"or the other model (on a GPU the tables measure it directly)\n")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "bench.py: error: --device cuda but torch sees no CUDA GPU; use --device cpu\n")
    if args.repeats is not None and args.repeats < 1:
        p.exit(2, f"bench.py: error: --repeats {args.repeats} must be >= 1\n")
    if args.json:                                     # never overwrite an earlier run's results
        try:
            open(args.json, "x").close()
            os.remove(args.json)
        except OSError as e:
            why = "exists; pick a new path (or remove it)" if os.path.exists(args.json) else f"cannot be written ({e.strerror})"
            p.exit(2, f"bench.py: error: --json {args.json} {why}\n")


def _report(p, path):
    """A results file that bench.py --json wrote, or exit 2 in one line."""
    try:
        with open(path) as fh:
            report = json.load(fh)
        if not isinstance(report.get("cases"), list) or "environment" not in report:
            raise ValueError("no cases and environment in it")
    except (OSError, ValueError, AttributeError) as e:
        p.exit(2, f"bench.py: error: --markdown {path}: not a results file of bench.py --json ({e})\n")
    return report


def _settings(args):
    gpu, modelled = args.device == "cuda", args.memory or args.cost   # modelled: in the GPU's 2-byte dtypes
    return Settings(
        official_dtype=torch.float16 if gpu else torch.bfloat16 if modelled else torch.float32,
        ours_dtype=torch.bfloat16 if gpu or modelled else torch.float32,
        warmup=args.warmup if args.warmup is not None else 1 if args.smoke else 3,
        # the CPU models count PyTorch's LayerNorm and QuickGELU (--cost models the kernels in their place)
        fused_elementwise=args.fused_elementwise and not modelled,
        fused_attention=args.fused_attention and not modelled,
        shared_prefix=args.shared_prefix, length_buckets=args.length_buckets,
        buckets=gpu and not args.length_buckets, cuda_graph=args.cuda_graph and gpu,
        compile=not (args.no_compile or args.smoke))  # inductor's first compile takes longer than CI allows


def parse_args(argv=None):
    """The command line: args with .selected (the cases to run) and .settings (a methods.Settings)."""
    p = _parser()
    args = p.parse_args(argv)
    if args.markdown:
        args.reports = [_report(p, path) for path in args.markdown]
        return args
    _check(p, args)
    prefixes = [s for s in args.cases.split(",") if s]
    args.selected = [c for c in all_cases(args.smoke) if not prefixes or any(c.name.startswith(s) for s in prefixes)]
    if args.memory:                                   # the train steps: the only cases with memory targets
        args.selected = [c for c in args.selected if c.kind in ("coop", "cocoop")]
    if args.cost:
        args.selected = [c for c in args.selected if c.kind != "head"]
    if not args.selected:
        p.exit(2, f"bench.py: error: --cases {args.cases!r} matches no case; see --list\n")
    for case in args.selected if args.repeats is not None else ():
        case.repeats = args.repeats
    args.settings = _settings(args)
    return args


def _distributed(args, device, env):
    print("per-rank cost of the sharded CoOp text encoder (forward + backward, one device):", flush=True)
    report = {"environment": env, "shard_cost": scaling.shard_cost(device, args.settings, args.smoke, args.repeats)}
    print(f"data-parallel CoOp train steps ({'gloo' if device.type == 'cpu' else 'nccl'}):", flush=True)
    report["scaling"] = scaling.scaling(device, args.settings, args.smoke, args.repeats)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    failed = [r for r in report["shard_cost"] if r.get("error", "OOM") != "OOM"]
    return 1 if failed else 0


class _Runner:
    """Runs one case after another; an architecture's models are built once for its cases in a row."""

    def __init__(self, args, device, copy_bw):
        self.args, self.device, self.copy_bw, self.models = args, device, copy_bw, None

    def __call__(self, case):
        args, device, settings = self.args, self.device, self.args.settings
        if case.kind == "head":
            return head_methods(case, device, settings, self.copy_bw)
        if args.memory:
            return memory.train_peaks(case, device, settings)
        if args.cost:
            return cost.step_costs(case, device, settings)
        if self.models is None or self.models.arch != case.arch:
            self.models = None                                   # free the previous architecture first
            free(device)
            self.models = Models(case.arch, device, settings)
        run = zeroshot_methods if case.kind == "zeroshot" else train_methods
        return run(case, self.models, device, settings)


def main(argv=None):
    args = parse_args(argv)
    if args.markdown:
        print(table.markdown(args.reports))
        return 0
    if args.list:
        print("\n".join(c.name for c in args.selected))
        return 0
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True   # as Dassl sets it
    t_start = time.perf_counter()
    copy_bw = copy_gbps(device)
    env = _environment(device, args, copy_bw)
    s = args.settings
    print(f"bench: {env['device']}, torch {env['torch']}, triton {env['triton']}, official {s.official_dtype}, "
          f"ours {s.ours_dtype}, fused head: {env['fused_head']}, copy {copy_bw:.0f} GB/s, "
          f"{0 if args.distributed else len(args.selected)} cases", flush=True)
    if args.distributed:
        return _distributed(args, device, env)
    results, run = [], _Runner(args, device, copy_bw)
    for i, case in enumerate(args.selected, 1):
        print(f"[{i}/{len(args.selected)}] {case.name}", flush=True)
        t0 = time.perf_counter()
        results.append(summarise(case, run(case)))
        if args.json:                                       # after every case: a killed run keeps its results
            with open(args.json, "w") as fh:
                json.dump({"environment": env, "cases": results}, fh, indent=1)
        cells = ", ".join(f"{h} {v}" for h, v in table.cells(results[-1]) if v != "-")
        print(f"    {cells} ({time.perf_counter() - t0:.0f} s)", flush=True)
    run = None
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s\n\n{table.render(results)}", flush=True)
    failed = [r["case"] for r in results if not (r.get("match", True) and r["checks_passed"]) or any(
        m.get("error", "OOM") != "OOM" for m in r["methods"].values())]
    if failed:
        print(f"bench: the paths disagree, a check failed or a method failed in: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
