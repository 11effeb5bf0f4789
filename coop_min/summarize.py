"""`python -m coop_min.summarize RUNS`: the papers' tables and plots from every results.json below RUNS.

A train run is its results.json and config.json; an evaluation made by coop_min.sweep is evaluate's
results.json and the sweep.json naming the run whose prompts it tested (one without is left out, and
counted). The tables, printed and written into --output (default RUNS) as summary.md:
    few-shot       CoOp's Figure 3: per setting, datasets x shots, and zero-shot CLIP from the runs'
                   `zero_shot`; few_shot.csv; few_shot_<dataset>.png per dataset (and the Average):
                   accuracy vs shots, error bars of one std over seeds, zero-shot CLIP dashed.
    base-to-new    CoCoOp's Table 1: base / new / H per dataset and method; base2new.csv, base2new.png.
    cross-dataset  CoCoOp's Table 2, and dg (CoOp's DG, CoCoOp's Table 3): source and targets;
                   cross_dataset.csv, dg.csv.
Means and stds are over seeds, the std np.std's (the population's), as parse_test_res.py prints. H is
that of the mean base and the mean new; the Average row averages base and new over the datasets and
takes H of those averages, as the CoCoOp paper does. A cell without results is "-", one over fewer
seeds than its table's fullest says how many ("(2/3)"); an average needs every dataset of its table.
"""
import csv
import json
import os
import statistics

from PIL import Image, ImageDraw

from coop_min import cli
from coop_min.evaluate import harmonic_mean

DG_TARGETS = ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")
ORDER = ("ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101", "FGVCAircraft",
         "SUN397", "DescribableTextures", "EuroSAT", "UCF101", *DG_TARGETS)      # the papers' order
SETTING = ("method", "n_ctx", "ctx_init", "csc", "class_token_position", "weights")  # what a row is
NAMES = {"zero-shot": "zero-shot CLIP", "coop": "CoOp", "cocoop": "CoCoOp"}        # in the papers' order
TABLES = ("few_shot", "base2new", "cross_dataset", "dg")
SHOTS_SIZE, BARS_SIZE = (480, 320), (720, 540)                                   # plot sizes in pixels
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


# ----------------------------------------------------------------------------------------------
# reading: tables[table][setting][dataset][column] = {seed: accuracy}


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def collect(root):
    """(tables, how many results.json were left out) from everything below `root`."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if "results.json" in files:
            found[os.path.normpath(folder)] = [_read(os.path.join(folder, n))
                                               for n in ("results.json", "config.json", "sweep.json")]
    tables = {t: {} for t in TABLES}
    runs = {f: (r, c) for f, (r, c, _) in found.items()
            if isinstance(r, dict) and {"method", "seed", "zero_shot"} <= set(r)}
    for r, config in runs.values():
        _add_run(tables, r, config)
    evals = {f: (r, side) for f, (r, _, side) in found.items()
             if f not in runs and isinstance(side, dict) and isinstance(r, dict) and "accuracy" in r}
    evaluated = {(side.get("weights"), r["dataset"]) for r, side in evals.values() if side.get("prompt") is None}
    used = sum(_add_evaluation(tables, folder, r, side, runs, evaluated) for folder, (r, side) in evals.items())
    return tables, len(found) - len(runs) - used


def _setting(r, config):
    return tuple((config if isinstance(config, dict) else {"method": r["method"]}).get(k) for k in SETTING)


def _zero_shot(weights):
    return ("zero-shot", None, None, None, None, weights)


def _add(table, setting, dataset, column, seed, value):   # a seed seen twice keeps its first value
    table.setdefault(setting, {}).setdefault(dataset, {}).setdefault(column, {}).setdefault(seed, value)


def _add_run(tables, r, config):
    s, d, seed, zero_shot = _setting(r, config), r["dataset"], r["seed"], r["zero_shot"]["accuracy"]
    if r.get("subsample") == "base" and "new" in r:
        zero_shot_new = r["zero_shot_new"]["accuracy"]
        for row, base, new in ((s, r["accuracy"], r["new"]), (_zero_shot(s[-1]), zero_shot, zero_shot_new)):
            _add(tables["base2new"], row, d, "base", seed, base)
            _add(tables["base2new"], row, d, "new", seed, new)
    elif r.get("subsample", "all") == "all":
        _add(tables["few_shot"], s, d, r["shots"], seed, r["accuracy"])
        _add(tables["few_shot"], s, d, 0, seed, zero_shot)                     # column 0: zero-shot CLIP


def _add_evaluation(tables, folder, r, side, runs, evaluated):
    """An evaluation into the cross-dataset or dg table, and its run's own accuracy as the source's;
    False if its run is not there."""
    table = tables["dg" if r["dataset"] in DG_TARGETS else "cross_dataset"]
    if side.get("prompt") is None:           # zero-shot CLIP; on the source, in both tables
        for t in ([tables["dg"], tables["cross_dataset"]] if r["dataset"] == "ImageNet" else [table]):
            _add(t, _zero_shot(side.get("weights")), r["dataset"], "accuracy", None, r["accuracy"])
        return True
    source = os.path.normpath(os.path.join(folder, side["prompt"]))
    if source not in runs:
        return False
    (src, _), row = runs[source], _setting(*runs[source])
    _add(table, row, r["dataset"], "accuracy", src["seed"], r["accuracy"])
    _add(table, row, src["dataset"], "accuracy", src["seed"], src["accuracy"])
    if (row[-1], src["dataset"]) not in evaluated:        # else the run's own zero-shot test of the source
        _add(table, _zero_shot(row[-1]), src["dataset"], "accuracy", src["seed"], src["zero_shot"]["accuracy"])
    return True


def labels(settings):
    """Row names in the papers' order: the method, and the settings in which rows of that method differ."""
    out = {}
    for s in settings:
        same = [t for t in settings if t[0] == s[0]]
        differ = [i for i in range(1, len(SETTING)) if len({t[i] for t in same}) > 1]
        extra = ", ".join(f"{SETTING[i]} {os.path.basename(str(s[i])) if i == 5 else s[i]!r}" for i in differ)
        out[s] = NAMES[s[0]] + (f" ({extra})" if extra else "")
    return dict(sorted(out.items(), key=lambda kv: (list(NAMES).index(kv[0][0]), kv[1])))


# ----------------------------------------------------------------------------------------------
# statistics and tables


def stat(by_seed):
    """(mean, std over seeds, number of seeds), or None without values."""
    values = list((by_seed or {}).values())
    return (statistics.mean(values), statistics.pstdev(values), len(values)) if values else None


def average(stats):
    """The mean of the means, or None unless every one is there."""
    return None if not stats or None in stats else (statistics.mean(s[0] for s in stats), 0.0, 0)


def _cell(s, most=0, std=True):
    """"mean ± std", then "(n/most)" when fewer seeds than `most` went into it; "-" for no results."""
    if s is None:
        return "-"
    return (f"{s[0]:.2f} ± {s[1]:.2f}" if std else f"{s[0]:.2f}") + (f" ({s[2]}/{most})" if s[2] < most else "")


def _cells(setting, stats, most):            # zero-shot CLIP has no seeds of its own: its mean alone
    return [_cell(s, *((0, False) if setting[0] == "zero-shot" else (most, True))) for s in stats]


def _h(b, n):
    return f"{harmonic_mean(b[0], n[0]):.2f}" if b and n else "-"


def _order(names):
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def _most(rows):
    return max((s[2] for row in rows.values() for d in row.values() for c in d.values() if (s := stat(c))), default=0)


def _md(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def few_shot_md(table, name):
    most, datasets = _most({name: table}), _order(table)
    shots = sorted({k for d in table.values() for k in d if k})
    lines = [[d, _cell(stat(table[d].get(0)), std=False), *(_cell(stat(table[d].get(k)), most) for k in shots)]
             for d in datasets]
    if len(datasets) > 1:
        lines.append(["Average", *(_cell(average([stat(table[d].get(k)) for d in datasets]), std=False)
                                   for k in [0, *shots])])
    return [f"### {name}", "", *_md(["dataset", "zero-shot CLIP", *(f"{k} shot{'s' * (k > 1)}" for k in shots)], lines)]


def base2new_md(rows):
    names, most = labels(rows), _most(rows)
    datasets, lines = _order({d for row in rows.values() for d in row}), []
    for d in datasets:
        for s in (s for s in names if d in rows[s]):
            b, n = stat(rows[s][d].get("base")), stat(rows[s][d].get("new"))
            lines.append([d, names[s], *_cells(s, (b, n), most), _h(b, n)])
    for s in names if len(datasets) > 1 else ():
        b, n = (average([stat(rows[s].get(d, {}).get(h)) for d in datasets]) for h in ("base", "new"))
        lines.append(["Average", names[s], _cell(b, std=False), _cell(n, std=False), _h(b, n)])
    return _md(["dataset", "method", "base", "new", "H"], lines)


def transfer_md(rows):
    names, most = labels(rows), _most(rows)
    columns = _order({d for row in rows.values() for d in row})
    lines = []
    for s, name in names.items():
        stats = [stat(rows[s].get(c, {}).get("accuracy")) for c in columns]
        targets = average([x for c, x in zip(columns, stats) if c != "ImageNet"])
        lines.append([name, *_cells(s, stats, most), _cell(targets, std=False)])
    return _md(["method", *(f"{c} (source)" if c == "ImageNet" else c for c in columns), "Average (targets)"], lines)


def write_csv(path, rows):
    """One line per (method, dataset, column): mean, std, the number of seeds and each seed's value."""
    seeds = sorted({x for row in rows.values() for d in row.values() for c in d.values() for x in c if x is not None})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "dataset", "column", "mean", "std", "seeds", *(f"seed_{s}" for s in seeds)])
        for s, name in labels(rows).items():
            for d in _order(rows[s]):
                for column, by_seed in sorted(rows[s][d].items(), key=lambda kv: (isinstance(kv[0], str), kv[0])):
                    m, sd, n = stat(by_seed)
                    w.writerow([name, d, "zero-shot" if column == 0 else column, f"{m:.4f}", f"{sd:.4f}", n,
                                *(f"{by_seed[x]:.4f}" if x in by_seed else "-" for x in seeds)])


# ----------------------------------------------------------------------------------------------
# plots, drawn with PIL


class _Axes:
    """A plot box in an image: accuracy to pixels, a grid with labelled ticks, a title and a legend."""

    def __init__(self, img, box, lo, hi):
        self.img, self.d, self.box, self.lo, self.hi = img, ImageDraw.Draw(img), box, lo, max(hi, lo + 2)

    def y(self, v):
        return self.box[3] - (self.box[3] - self.box[1]) * (v - self.lo) / (self.hi - self.lo)

    def frame(self):
        step = next(s for s in (1, 2, 5, 10, 20, 25, 50) if (self.hi - self.lo) / s <= 6)
        for v in range(int(self.lo // step * step + step), int(self.hi) + 1, step):
            self.d.line([self.box[0], self.y(v), self.box[2], self.y(v)], fill="#e0e0e0")
            self.d.text((self.box[0] - 4, self.y(v)), str(v), fill="black", anchor="rm")
        self.d.rectangle(self.box, outline="black")

    def y_label(self, text, middle):         # rotated, at the left edge
        w = int(self.d.textlength(text)) + 4
        label = Image.new("L", (w, 14), 0)
        ImageDraw.Draw(label).text((2, 1), text, fill=255)
        self.img.paste("black", (4, int(middle - w / 2)), label.rotate(90, expand=True))

    def finish(self, title, items, path):
        """The title top left, a legend of [(label, colour, dashed)] in a row top right; save."""
        self.d.text((self.box[0], 12), title, fill="black", anchor="lm")
        widths = [int(self.d.textlength(t)) + 34 for t, _, _ in items]
        x = self.img.width - 16 - sum(widths)
        self.d.rectangle([x, 4, x + sum(widths), 22], fill="white", outline="#a0a0a0")
        for (label, colour, dashed), lx in zip(items, (x + sum(widths[:i]) for i in range(len(items)))):
            for a in range(lx + 4, lx + 24, 6 if dashed else 20):
                self.d.line([a, 13, a + (3 if dashed else 20), 13], fill=colour, width=2)
            self.d.text((lx + 28, 13), label, fill="black", anchor="lm")
        self.img.save(path)


def plot_shots(series, zero_shot, title, path, size=SHOTS_SIZE):
    """Accuracy vs shots per class (evenly spaced: a log2 axis), a line per series with error bars of one
    std, zero-shot CLIP dashed. series: {label: {shots: (mean, std)}}; zero_shot: {label: mean}."""
    shots = sorted({k for s in series.values() for k in s})
    values = [m + e * sign for s in series.values() for m, e in s.values() for sign in (-1, 1)]
    values += zero_shot.values()
    ax = _Axes(Image.new("RGB", size, "white"), (64, 26, size[0] - 16, size[1] - 46),
               max(0.0, min(values) - 2), min(100.0, max(values) + 2))
    ax.frame()
    left, top, right, bottom = ax.box
    x = {k: left + (right - left) * (i + 0.5) / len(shots) for i, k in enumerate(shots)}
    for k in shots:
        ax.d.text((x[k], bottom + 6), str(k), fill="black", anchor="ma")
    ax.d.text(((left + right) / 2, size[1] - 18), "shots per class", fill="black", anchor="ma")
    ax.y_label("test accuracy (%)", (top + bottom) / 2)
    items = []
    for (label, mean), colour in zip(zero_shot.items(), ("#707070", *COLOURS[::-1])):
        for a in range(int(left), int(right), 10):
            ax.d.line([a, ax.y(mean), min(a + 5, right), ax.y(mean)], fill=colour, width=2)
        items.append((label, colour, True))
    for (label, points), colour in zip(series.items(), COLOURS):
        ax.d.line([(x[k], ax.y(m)) for k, (m, _) in sorted(points.items())], fill=colour, width=2)
        for k, (m, e) in points.items():
            ax.d.line([x[k], ax.y(m - e), x[k], ax.y(m + e)], fill=colour)
            for v in (m - e, m + e):
                ax.d.line([x[k] - 4, ax.y(v), x[k] + 4, ax.y(v)], fill=colour)
            ax.d.ellipse([x[k] - 3, ax.y(m) - 3, x[k] + 3, ax.y(m) + 3], fill=colour)
        items.append((label, colour, False))
    ax.finish(title, items, path)


def plot_bars(groups, names, path, size=BARS_SIZE):
    """Base, new and H in three panels, a bar per method in each dataset's group.
    groups: [(dataset, {name: (base, new, H)})]; names: the methods in legend order."""
    img = Image.new("RGB", size, "white")
    lo = max(0, min(v for _, g in groups for t in g.values() for v in t) // 10 * 10 - 10)
    left, right, top, height = 64, size[0] - 16, 26, (size[1] - 62) / 3
    width = (right - left) / len(groups)
    bar = min(24.0, (width - 8) / len(names))
    for p, metric in enumerate(("base", "new", "H")):
        ax = _Axes(img, (left, top + p * height + 6, right, top + (p + 1) * height - 6), lo, 100)
        ax.frame()
        ax.d.text((left + 4, ax.box[1] + 2), metric, fill="black")
        for g, (dataset, values) in enumerate(groups):
            x0 = left + g * width + (width - bar * len(values)) / 2
            for m, name in enumerate(n for n in names if n in values):
                ax.d.rectangle([x0 + m * bar + 1, ax.y(values[name][p]), x0 + (m + 1) * bar - 1, ax.y(lo)],
                               fill=COLOURS[names.index(name) % len(COLOURS)])
            if p == 2:
                ax.d.text((x0 + bar * len(values) / 2, size[1] - 28), dataset[:max(3, int(width / 6))], fill="black",
                          anchor="ma")
    ax.y_label("test accuracy (%)", top + 1.5 * height)
    ax.finish("base-to-new: base, new and their harmonic mean H",
              [(n, COLOURS[m % len(COLOURS)], False) for m, n in enumerate(names)], path)


def shot_curves(table, dataset):
    """({shots: (mean, std)}, the zero-shot mean or None) of one setting on a dataset, or on the "Average"."""
    if dataset == "Average":
        stats = {k: average([stat(table[d].get(k)) for d in table]) for k in {k for d in table.values() for k in d}}
    else:
        stats = {k: stat(by_seed) for k, by_seed in table[dataset].items()}
    return {k: v[:2] for k, v in stats.items() if k and v}, stats[0][0] if stats.get(0) else None


# ----------------------------------------------------------------------------------------------
# all of it


def summarize(root, output=None):
    """Read everything below `root`; write summary.md, the CSVs and the plots into `output` (default
    root). Returns (the Markdown text, the tables)."""
    output = output or root
    os.makedirs(output, exist_ok=True)
    tables, left_out = collect(root)
    lines = [f"# Results below {root}", ""]
    if left_out:
        lines += [f"({left_out} results.json left out: unreadable, or evaluations without a sweep.json or run)", ""]
    if rows := tables["few_shot"]:
        lines += ["## Few-shot (CoOp, Figure 3): test accuracy (%), mean ± std over seeds", ""]
        for s, name in labels(rows).items():
            lines += [*few_shot_md(rows[s], name), ""]
        _plot_few_shot(rows, output)
    if rows := tables["base2new"]:
        lines += ["## Base-to-new (CoCoOp, Table 1): test accuracy (%), mean ± std over seeds; H of the means", "",
                  *base2new_md(rows), ""]
        _plot_base2new(rows, output)
    for key, title in (("cross_dataset", "Cross-dataset transfer (CoCoOp, Table 2)"),
                       ("dg", "Domain generalisation (CoOp; CoCoOp, Table 3)")):
        if any(d != "ImageNet" for row in tables[key].values() for d in row):
            lines += [f"## {title}: test accuracy (%), mean ± std over seeds", "", *transfer_md(tables[key]), ""]
    for key in (key for key in TABLES if tables[key]):
        write_csv(os.path.join(output, f"{key}.csv"), tables[key])
    if not any(tables.values()):
        lines.append("No results yet: no results.json of a run, or of an evaluation with its sweep.json.")
    text = "\n".join(lines).rstrip() + "\n"
    with open(os.path.join(output, "summary.md"), "w") as f:
        f.write(text)
    return text, tables


def _plot_few_shot(rows, output):
    names = labels(rows)
    datasets = _order({d for table in rows.values() for d in table})
    for d in datasets + (["Average"] if len(datasets) > 1 else []):
        curves = {s: shot_curves(rows[s], d) for s in names if d == "Average" or d in rows[s]}
        series = {names[s]: points for s, (points, _) in curves.items() if points}
        zero = {"zero-shot CLIP" + (f" ({names[s]})" if len(curves) > 1 else ""): z
                for s, (_, z) in curves.items() if z is not None}
        if series:
            plot_shots(series, zero, d, os.path.join(output, f"few_shot_{d}.png"))


def _plot_base2new(rows, output):
    names, groups = labels(rows), []
    for d in _order({d for row in rows.values() for d in row}):
        means = {n: (stat(rows[s][d]["base"])[0], stat(rows[s][d]["new"])[0]) for s, n in names.items() if d in rows[s]}
        groups.append((d, {n: (b, nw, harmonic_mean(b, nw)) for n, (b, nw) in means.items()}))
    plot_bars(groups, list(names.values()), os.path.join(output, "base2new.png"))


def main(argv=None):
    cli.exit_with(cli.run(_main, argv))


def _main(argv):
    p = cli.parser("python -m coop_min.summarize", description=(
        "The papers' tables (Markdown, CSV) and plots (PNG) from every results.json below RUNS."))
    p.add_argument("runs", metavar="RUNS", help="the folder of the runs (a sweep's --output)")
    p.add_argument("--output", help="the folder for summary.md, the CSV files and the plots (default RUNS)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.runs):
        p.error(f"{args.runs} is not a folder; pass a sweep's --output")
    text, _ = summarize(args.runs, args.output)
    print(text)
    print(f"written: summary.md, the CSV files and the plots in {args.output or args.runs}")


if __name__ == "__main__":
    main()
