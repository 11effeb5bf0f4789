"""bench.py's tables: one row per case, one function per table; a method that failed shows OOM or
error in its columns, and one whose check failed (benchmarks/checks.py) FAIL as its time. A time is
the median of the timed steps with the fastest and slowest in brackets. markdown() is the README's
speed table from the JSON of one or more runs (bench.py --markdown)."""
from benchmarks import checks, cost


def _fmt(x, spec=".1f", suffix=""):
    return "-" if x is None else format(x, spec) + suffix


def _table_kind(r):
    return "head" if r["kind"] == "head" else "cost" if "gpu_ms" in r["methods"].get("ours", {}) else "train"


def _cell(r, method, key, spec, suffix=""):
    """One number of one method: OOM or error where it failed; FAIL as the time where a check failed;
    a time with its spread."""
    m = r["methods"].get(method, {})
    if "error" in m:
        return "OOM" if m["error"] == "OOM" else "error"
    if key != "ms":
        return _fmt(m.get(key), spec, suffix)
    if not checks.passed(m):
        return "FAIL"
    spread = f" ({m['ms_min']:{spec}}-{m['ms_max']:{spec}})" if "ms_min" in m else ""
    return _fmt(m.get("ms"), spec) + spread


def _worst(c):
    """A check's larger relative difference, FAIL before it where the check failed."""
    worst = max((v for k, v in c.items() if k not in ("ok", "error") and v is not None), default=None)
    return ("FAIL " if c["ok"] is False else "") + (c.get("error") or format(worst, ".1e"))


def _checks_cell(r, key, names):
    return " / ".join(_worst(r["methods"][n][key]) for n in names if key in r["methods"].get(n, {})) or "-"


def _check_cell(r, *names):
    """The graph and compile methods' checks against eager steps."""
    return _checks_cell(r, "check", names)


def _vs_fp32(r, *names):
    """Each method's first output against the fp32 reference (the official path's, in fp16: reported)."""
    return _checks_cell(r, "vs_fp32", names)


def _cost_row(r):
    rec = {m: r["methods"][m].get("record", {}) for m in ("official", "ours", "fused")}

    def gb(m, k):
        return _fmt(rec[m].get(k, 0) / 1e9, ".1f")
    return (r["case"], _fmt(rec["official"].get("flops", 0) / 1e12, ".2f"),
            _fmt(rec["ours"].get("flops", 0) / 1e12, ".2f"),
            f"{gb('official', 'mm_bytes')} / {gb('official', 'other_bytes')}",
            f"{gb('ours', 'mm_bytes')} / {gb('ours', 'other_bytes')}", gb("fused", "other_bytes"),
            " / ".join(_fmt(rec[m].get("ops"), ".0f") for m in rec),
            *(_cell(r, m, "gpu_ms", ".1f") for m in ("official", "ours", "fused")),
            _fmt(_off_over_fused(r), ".1f", "x"), _vs_fp32(r, "official", "ours"))


def _off_over_fused(r):
    off, fused = r["methods"]["official"].get("gpu_ms"), r["methods"]["fused"].get("gpu_ms")
    return off / fused if off is not None and fused else None


def _head_row(r):
    return (r["case"], *(_cell(r, m, "ms", ".3f") for m in ("fused", "eager", "compile")),
            _fmt(r["speedup_vs_eager"], ".2f", "x"), _fmt(r["speedup_vs_compile"], ".2f", "x"),
            _cell(r, "fused", "gbps", ".1f"), _cell(r, "fused", "bandwidth_fraction", ".0%"),
            _cell(r, "graph", "ms", ".3f"), _cell(r, "graph", "bandwidth_fraction", ".0%"),
            _check_cell(r, "compile", "graph"), _vs_fp32(r, "fused", "eager", "compile", "graph"))


def _train_row(r):
    third = "compile" if r["kind"] == "zeroshot" else "graph"
    memory = " / ".join(_cell(r, third, key, ".2f") for key in ("peak_gib", "reserved_gib"))
    return (r["case"], _cell(r, "official", "ms", ".1f"), _cell(r, "ours", "ms", ".1f"), _fmt(r["speedup"], ".2f", "x"),
            _cell(r, "buckets", "ms", ".1f"), _fmt(r.get("speedup_buckets"), ".2f", "x"),
            _cell(r, third, "ms", ".1f"), _fmt(r.get(f"speedup_{third}"), ".2f", "x"),
            _cell(r, "official", "images_per_s", ".0f"), _cell(r, "ours", "images_per_s", ".0f"),
            _cell(r, "official", "peak_gib", ".2f"), _cell(r, "ours", "peak_gib", ".2f"),
            _fmt(r["memory_ratio"], ".1f", "x"), "-" if memory == "- / -" else memory, _tokens(r),
            _vs_fp32(r, "official", "ours", "buckets", third), _check_cell(r, third))


def _tokens(r):
    """Text-encoder tokens per step: ours, and bucketed where a method had length buckets."""
    methods = [r["methods"].get(m, {}) for m in ("ours", "buckets", "graph")]
    counts = dict.fromkeys(str(m["text_tokens"]) for m in methods if "text_tokens" in m)   # buckets = graph's plan
    return " / ".join(counts) or "-"


_ROWS = {"train": _train_row, "head": _head_row, "cost": _cost_row}
HEADERS = {"train": ("case", "official ms", "ours ms", "speedup", "buckets ms", "bkt speedup", "graph ms*",
                     "graph speedup*", "off img/s", "ours img/s", "off GiB", "ours GiB", "mem ratio",
                     "graph GiB* alloc / res", "text tokens", "vs fp32 off / ours / bkt / graph*",
                     "graph* vs eager"),
           "head": ("head case", "fused ms", "eager ms", "compile ms", "vs eager", "vs compile", "fused GB/s",
                    "of copy bw", "graph ms", "graph of bw", "compile / graph vs eager",
                    "vs fp32 fused / eager / compile / graph"),
           "cost": ("modelled case", "off TFLOP", "ours TFLOP", "off GB mm / other", "ours GB mm / other",
                    "fused GB other", "ops off / ours / fused", "GPU ms off", "ours", "fused", "off / fused",
                    "vs fp32 off / ours")}


def cells(r):
    """(header, cell) pairs of one result's row, the case's name left out (bench's progress line)."""
    kind = _table_kind(r)
    return list(zip(HEADERS[kind][1:], _ROWS[kind](r)[1:]))


def render(results):
    """The tables of bench's results: train steps and zero-shot, the head, or the modelled cases."""
    tables = []
    for kind, header in HEADERS.items():
        rows = [header] + [_ROWS[kind](r) for r in results if _table_kind(r) == kind]
        if len(rows) > 1:
            widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
            tables.append("\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                                              for i, (v, w) in enumerate(zip(row, widths))) for row in rows))
            if kind == "train":
                tables[-1] += ("\n* zero-shot rows: ours with the image encoder under torch.compile instead. "
                               "ms: median (fastest-slowest). vs fp32: each method's\nfirst loss and context "
                               "gradient against the method in fp32, the larger relative difference (the "
                               "official path's\nin fp16 reported, not checked); vs eager: the graph "
                               "(compile) after the timed steps against eager steps (benchmarks/checks.py)")
            if kind == "cost":
                tables[-1] += (f"\nGPU ms: matmuls at {cost.GPU_TFLOPS} TFLOPS, all other traffic at {cost.GPU_TBPS} "
                               "TB/s, no launch or host time; fused: ours with kernels/elementwise.py")
    return "\n\n".join(tables)


# ----------------------------------------------------------------------------------------------
# the README's speed table

ARCH_NAMES = {"vit_b16": "ViT-B/16", "rn50": "RN50", "vit_tiny": "tiny ViT", "rn_tiny": "tiny RN"}
# The project's targets for ours against the official path (ViT-B/16, on a GPU): "speedup" (the best
# checked column of ours; the head: the fused kernel over its eager twin), "speedup_vs_compile" (the
# head over torch.compile of its twin), "peak_gib" (ours' least checked peak), "memory_ratio" (the
# official peak over that, at least), "bandwidth_fraction" (the head's best of the copy bandwidth).
TARGETS = {"coop-vit_b16-c100": {"speedup": 4},
           "coop-vit_b16-c1000": {"speedup": 12, "peak_gib": 4},
           "cocoop-vit_b16-c50-b1": {"speedup": 8},
           "cocoop-vit_b16-c500-b1": {"speedup": 8},
           "cocoop-vit_b16-c50-b8": {"speedup": 25, "memory_ratio": 6},
           "cocoop-vit_b16-c500-b8": {"speedup": 25, "memory_ratio": 6},
           "zeroshot-vit_b16": {"speedup": 1.5},
           "head-cocoop-b8-c500-d512": {"speedup": 2, "speedup_vs_compile": 1.2},
           "head-cocoop-b32-c1000-d512": {"bandwidth_fraction": 0.7}}
_TARGET_TEXT = {"speedup": ("≥ {:g}x", "{:.1f}x"),                 # (goal, measured)
                "speedup_vs_compile": ("≥ {:g}x torch.compile", "{:.1f}x"),
                "peak_gib": ("≤ {:g} GiB", "{:.2f}"),
                "memory_ratio": ("≤ 1/{:g} of official", "1/{:.1f}"),
                "bandwidth_fraction": ("≥ {:.0%} of copy", "{:.0%}")}
MARKDOWN_HEADER = ("case", "official ms", "ours eager ms (speedup)", "ours graph ms (speedup)",
                   "peak GiB official / ours / graph", "target")


def _checked(r, names, key):
    """key of each named method that passed its checks."""
    found = [r["methods"][n] for n in names if n in r["methods"]]
    return [m[key] for m in found if checks.passed(m) and m.get(key) is not None]


def _measured(r, what):
    """The number a target is judged on (see TARGETS), None where no checked method gives it."""
    ours = ("ours", "buckets", "graph")
    if what == "speedup":
        keys = ("speedup_vs_eager",) if r["kind"] == "head" else (
            "speedup", "speedup_buckets", "speedup_graph", "speedup_compile")
        return max((r[k] for k in keys if r.get(k) is not None), default=None)
    if what == "speedup_vs_compile":
        return r.get(what)
    if what == "bandwidth_fraction":
        return max(_checked(r, ("fused", "graph"), what), default=None)
    peak = min(_checked(r, ours, "peak_gib"), default=None)
    if what == "peak_gib" or peak is None:
        return peak
    official = r["methods"]["official"].get("peak_gib")
    return official / peak if official else None


def _target(r):
    """Each of the case's targets: the goal, the measured number, met or not."""
    cells = []
    for what, goal in TARGETS.get(r["case"], {}).items():
        v, (goal_text, value_text) = _measured(r, what), _TARGET_TEXT[what]
        if v is None:
            cells.append(f"{goal_text.format(goal)}: no checked number")
        else:
            met = v <= goal if what == "peak_gib" else v >= goal
            cells.append(f"{goal_text.format(goal)}: {value_text.format(v)}, {'met' if met else 'not met'}")
    return "; ".join(cells) or "-"


def _label(r, env):
    """The case in words, with the run's non-default settings."""
    arch = ARCH_NAMES.get(r["arch"], r["arch"])
    if r["kind"] == "head":
        method = "CoCoOp" if r["per_image"] else "CoOp"
        label = f"head fwd+bwd, {method} B{r['batch']} C{r['classes']} D{r['dim']}"
    else:
        kind = {"coop": "CoOp", "cocoop": "CoCoOp", "zeroshot": "zero-shot"}[r["kind"]]
        label = f"{kind} {arch}, batch {r['batch']}, {r['classes']} classes"
    notes = [note for key, note in (("shared_prefix", "shared prefix"), ("length_buckets", "length buckets"))
             if env.get(key)]
    if env.get("fused_head") == "triton" and not env.get("fused_elementwise", True):
        notes.append("PyTorch LayerNorm/QuickGELU")
    return label + "".join(f", {note}" for note in notes)


def _with_speedup(r, method, speedup, spec=".1f"):
    cell = _cell(r, method, "ms", spec)
    return cell if speedup is None else f"{cell}, {speedup:.1f}x"


def _markdown_row(r, env):
    if r["kind"] == "head":             # its "official" is the kernel's eager twin
        eager, graph = _checked(r, ("eager",), "ms"), _checked(r, ("graph",), "ms")
        graph_cell = "-" if "graph" not in r["methods"] else _with_speedup(
            r, "graph", eager[0] / graph[0] if eager and graph else None, ".3f")
        return (_label(r, env), "eager twin " + _cell(r, "eager", "ms", ".3f"),
                _with_speedup(r, "fused", r.get("speedup_vs_eager"), ".3f"), graph_cell, "-", _target(r))
    third = "compile" if r["kind"] == "zeroshot" else "graph"   # zero-shot: ours under torch.compile
    third_cell = "-"
    if third in r["methods"]:
        prefix = "compile " if third == "compile" else ""
        third_cell = prefix + _with_speedup(r, third, r.get(f"speedup_{third}"))
    memory = " / ".join(_cell(r, n, "peak_gib", ".2f") for n in ("official", "ours", third))
    return (_label(r, env), _cell(r, "official", "ms", ".1f"), _with_speedup(r, "ours", r.get("speedup")),
            third_cell, "-" if memory == "- / - / -" else memory, _target(r))      # the CPU: no peaks


def markdown(reports):
    """The README's speed table from bench.py --json reports ({"environment", "cases"}): a line per
    run environment, then a row per timed case (the --memory and --cost models are left out)."""
    lines, rows = [], []
    for report in reports:
        env = report["environment"]
        about = (f"{env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}, "
                 f"commit {env.get('commit') or 'unknown'}")
        if about not in lines:
            lines.append(about)
        rows += [_markdown_row(r, env) for r in report["cases"]
                 if any("ms" in m or "error" in m for m in r["methods"].values())]
    caption = ("ms per step: the median of the timed steps (fastest-slowest); speedup over the official path "
               "(the head: over its eager twin); FAIL: a check failed, no speedup. " + "; ".join(lines) + ".")
    table = [MARKDOWN_HEADER, ("---",) * len(MARKDOWN_HEADER), *rows]
    return caption + "\n\n" + "\n".join("| " + " | ".join(row) + " |" for row in table)
