"""bench.py's tables: one row per case, one function per table; a method that failed shows OOM or
error in its columns, and one whose check failed (benchmarks/checks.py) FAIL as its time."""
from benchmarks import checks, cost


def _fmt(x, spec=".1f", suffix=""):
    return "-" if x is None else format(x, spec) + suffix


def _table_kind(r):
    return "head" if r["kind"] == "head" else "cost" if "gpu_ms" in r["methods"].get("ours", {}) else "train"


def _cell(r, method, key, spec, suffix=""):
    """One number of one method: OOM or error where it failed; FAIL as the time where its check failed."""
    m = r["methods"].get(method, {})
    if "error" in m:
        return "OOM" if m["error"] == "OOM" else "error"
    return "FAIL" if key == "ms" and not checks.passed(m) else _fmt(m.get(key), spec, suffix)


def _check_cell(r, *names):
    """The methods' checks (buckets: against the official path; graph and compile: against eager
    steps): each one's larger relative difference, FAIL where it is too large."""
    cells = []
    for name in names:
        c = r["methods"].get(name, {}).get("check")
        if c is not None:
            worst = max(v for k, v in c.items() if k != "ok" and v is not None)
            cells.append(("" if c["ok"] else "FAIL ") + format(worst, ".1e"))
    return " / ".join(cells) or "-"


def _diff(r):
    grad = "" if "grad_rel_diff" not in r else f" / {r['grad_rel_diff']:.1e}"
    return _fmt(r.get("loss_rel_diff"), ".1e") + grad + ("" if r.get("match", True) else " FAIL")


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
            _fmt(_off_over_fused(r), ".1f", "x"), _diff(r))


def _off_over_fused(r):
    off, fused = r["methods"]["official"].get("gpu_ms"), r["methods"]["fused"].get("gpu_ms")
    return off / fused if off is not None and fused else None


def _head_row(r):
    return (r["case"], *(_cell(r, m, "ms", ".3f") for m in ("fused", "eager", "compile")),
            _fmt(r["speedup_vs_eager"], ".2f", "x"), _fmt(r["speedup_vs_compile"], ".2f", "x"),
            _cell(r, "fused", "gbps", ".1f"), _cell(r, "fused", "bandwidth_fraction", ".0%"),
            _cell(r, "graph", "ms", ".3f"), _cell(r, "graph", "bandwidth_fraction", ".0%"),
            _check_cell(r, "compile", "graph"), _diff(r))


def _train_row(r):
    third = "compile" if r["kind"] == "zeroshot" else "graph"
    memory = " / ".join(_cell(r, third, key, ".2f") for key in ("peak_gib", "reserved_gib"))
    return (r["case"], _cell(r, "official", "ms", ".1f"), _cell(r, "ours", "ms", ".1f"), _fmt(r["speedup"], ".2f", "x"),
            _cell(r, "buckets", "ms", ".1f"), _fmt(r.get("speedup_buckets"), ".2f", "x"),
            _cell(r, third, "ms", ".1f"), _fmt(r.get(f"speedup_{third}"), ".2f", "x"), _check_cell(r, "buckets", third),
            _cell(r, "official", "images_per_s", ".0f"), _cell(r, "ours", "images_per_s", ".0f"),
            _cell(r, "official", "peak_gib", ".2f"), _cell(r, "ours", "peak_gib", ".2f"),
            _fmt(r["memory_ratio"], ".1f", "x"), "-" if memory == "- / -" else memory, _tokens(r), _diff(r))


def _tokens(r):
    """Text-encoder tokens per step: ours, and bucketed where a method had length buckets."""
    methods = [r["methods"].get(m, {}) for m in ("ours", "buckets", "graph")]
    counts = dict.fromkeys(str(m["text_tokens"]) for m in methods if "text_tokens" in m)   # buckets = graph's plan
    return " / ".join(counts) or "-"


_ROWS = {"train": _train_row, "head": _head_row, "cost": _cost_row}
HEADERS = {"train": ("case", "official ms", "ours ms", "speedup", "buckets ms", "bkt speedup", "graph ms*",
                     "graph speedup*", "check bkt / graph*", "off img/s", "ours img/s", "off GiB", "ours GiB",
                     "mem ratio", "graph GiB* alloc / res", "text tokens", "loss / grad diff"),
           "head": ("head case", "fused ms", "eager ms", "compile ms", "vs eager", "vs compile", "fused GB/s",
                    "of copy bw", "graph ms", "graph of bw", "check compile / graph", "loss diff"),
           "cost": ("modelled case", "off TFLOP", "ours TFLOP", "off GB mm / other", "ours GB mm / other",
                    "fused GB other", "ops off / ours / fused", "GPU ms off", "ours", "fused", "off / fused",
                    "loss / grad diff")}


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
                tables[-1] += ("\n* zero-shot rows: ours with the image encoder under torch.compile instead. check: "
                               "buckets' first step against the official one, graph (compile) against eager steps "
                               "after the timed ones (benchmarks/checks.py)")
            if kind == "cost":
                tables[-1] += (f"\nGPU ms: matmuls at {cost.GPU_TFLOPS} TFLOPS, all other traffic at {cost.GPU_TBPS} "
                               "TB/s, no launch or host time; fused: ours with kernels/elementwise.py")
    return "\n\n".join(tables)
