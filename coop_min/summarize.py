"""`python -m coop_min.summarize RUNS`: the papers' tables and plots from every results.json below RUNS.

A run is its results.json and config.json (train's, or linear_probe's); an evaluation made by
coop_min.sweep is a results.json and the sweep.json naming the run whose prompts (or classifier) it
tested (one without is left out, and counted). A row is one setting: the method and everything that
changes a number (context, class-token position, CSC, init, backbone, templates, precision, data
folder, and epochs / batch size / lr set apart from the paper's), so runs that differ in any of them
never share a cell; each table says in which settings its rows differ. Printed and written into
--output (default RUNS) as summary.md:
    few-shot       CoOp's Figure 3: per setting, datasets x shots, and zero-shot CLIP from the runs'
                   `zero_shot`; few_shot.csv; few_shot.png and .svg: a panel per dataset and the Average,
                   error bars of one std over seeds, linear-probe CLIP dashed, zero-shot CLIP a star.
    base-to-new    CoCoOp's Table 1: base / new / H per dataset and method; base2new.csv, base2new.png/.svg.
    cross-dataset  CoCoOp's Table 2, and dg (CoOp's DG, CoCoOp's Table 3): source and targets;
                   cross_dataset.csv, dg.csv.
    compute        per setting, the training time per run, images/s and peak GPU memory the runs recorded.
Means and stds are over seeds, the std np.std's (the population's), as parse_test_res.py prints. H is
that of the mean base and the mean new; the Average row averages base and new over the datasets and
takes H of those averages, as the CoCoOp paper does. A cell without results is "-", one over fewer
seeds than its table's fullest says how many ("(2/3)"); an average needs every dataset of its table.
The official CoOp/CoCoOp code's run folders below RUNS (their log.txt, coop_min.official_runs) are rows
of their own beside coop_min's, "CoOp (official)": few-shot runs, base-to-new from each test_new run and
the train_base run it loaded, transfer from each evaluation and its ImageNet run.
"""
import csv
import json
import os
import statistics

from coop_min import cli, official_runs, options, plots
from coop_min.data import DATASETS, dataset_key
from coop_min.evaluate import harmonic_mean

DG_TARGETS = ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")
ORDER = ("ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101", "FGVCAircraft",
         "SUN397", "DescribableTextures", "EuroSAT", "UCF101", *DG_TARGETS)      # the papers' order
# what a row is: every setting that changes a number
# ("training": epochs, batch size, lr set apart from the paper's)
SETTING = ("method", "n_ctx", "ctx_init", "csc", "class_token_position", "weights", "templates", "precision",
           "data", "training")
# in the papers' order, the official code's after ours
NAMES = {"zero-shot": "zero-shot CLIP", "linear-probe": "linear-probe CLIP", "coop": "CoOp",
         "coop-official": "CoOp (official)", "cocoop": "CoCoOp", "cocoop-official": "CoCoOp (official)"}
OFFICIAL = {"coop": "coop-official", "cocoop": "cocoop-official"}       # the official code's rows' method
TABLES = ("few_shot", "base2new", "cross_dataset", "dg")


# ----------------------------------------------------------------------------------------------
# reading: tables[table][setting][dataset][column] = {seed: accuracy}


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def collect(root):
    """(tables, how many results.json were left out) from everything below `root`; tables["compute"]:
    {setting: [a run's results.json]}."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if "results.json" in files:
            found[os.path.normpath(folder)] = [_read(os.path.join(folder, n))
                                               for n in ("results.json", "config.json", "sweep.json")]
    tables = {t: {} for t in (*TABLES, "compute")}
    runs = {f: (r, c) for f, (r, c, _) in found.items()
            if isinstance(r, dict) and {"method", "seed", "accuracy", "dataset"} <= set(r)}
    for r, config in runs.values():
        _add_run(tables, r, config)
    evals = {f: (r, side) for f, (r, _, side) in found.items()
             if f not in runs and isinstance(side, dict) and isinstance(r, dict) and "accuracy" in r}
    evaluated = {(side.get("weights"), side.get("templates", "single"), r["dataset"])
                 for r, side in evals.values()
                 if side.get("prompt") is None}
    used = sum(_add_evaluation(tables, folder, r, side, runs, evaluated)
               for folder, (r, side) in evals.items())
    return tables, len(found) - len(runs) - used


def _training(r, config):
    """The training settings set apart from the paper's defaults for the run's method, shots and dataset."""
    if r["method"] not in ("coop", "cocoop"):
        return ""
    paper = options.paper_defaults(r["method"], r.get("shots", 16), r["dataset"])
    return " ".join(f"{name} {config[name]:g}" for name in ("epochs", "batch_size", "lr")
                    if config.get(name) is not None and config[name] != paper[name])


def _data_root(folder, dataset):
    """The data root a run's --data belongs to: ROOT of ROOT/<the dataset's folder>, else the folder, so
    the datasets of one root share rows and two copies of a dataset do not."""
    if not folder:
        return None
    folder = os.path.normpath(folder)
    key = dataset_key(dataset)
    if os.path.basename(folder) in (key, dataset, DATASETS.get(key, ("", ""))[1]):
        return os.path.dirname(folder)
    return folder


def _setting(r, config):
    config = {"templates": "single", **(config if isinstance(config, dict) else {"method": r["method"]})}
    values = {"training": _training(r, config), "data": _data_root(config.get("data"), r["dataset"])}
    return tuple(values[k] if k in values else config.get(k) for k in SETTING)


def _zero_shot(weights, templates="single"):
    return tuple({"method": "zero-shot", "weights": weights, "templates": templates}.get(k) for k in SETTING)


def _add(table, setting, dataset, column, seed, value):   # a seed seen twice keeps its first value
    table.setdefault(setting, {}).setdefault(dataset, {}).setdefault(column, {}).setdefault(seed, value)


def _add_run(tables, r, config):
    s = _setting(r, config)
    d = r["dataset"]
    seed = r["seed"]
    zero_shot = r.get("zero_shot", {}).get("accuracy")
    tables["compute"].setdefault(s, []).append(r)
    if r.get("subsample") == "base" and "new" in r:
        zero_shot_new = r["zero_shot_new"]["accuracy"]
        clip = _zero_shot(s[SETTING.index("weights")], s[SETTING.index("templates")])
        for row, base, new in ((s, r["accuracy"], r["new"]), (clip, zero_shot, zero_shot_new)):
            _add(tables["base2new"], row, d, "base", seed, base)
            _add(tables["base2new"], row, d, "new", seed, new)
    elif r.get("subsample", "all") == "all":
        _add(tables["few_shot"], s, d, r["shots"], seed, r["accuracy"])
        if zero_shot is not None:
            _add(tables["few_shot"], s, d, 0, seed, zero_shot)                 # column 0: zero-shot CLIP


def _add_evaluation(tables, folder, r, side, runs, evaluated):
    """An evaluation into the cross-dataset or dg table, and its run's own accuracy as the source's;
    False if its run is not there."""
    table = tables["dg" if r["dataset"] in DG_TARGETS else "cross_dataset"]
    if side.get("prompt") is None:           # zero-shot CLIP; on the source, in both tables
        clip = _zero_shot(side.get("weights"), side.get("templates", "single"))
        for t in ([tables["dg"], tables["cross_dataset"]] if r["dataset"] == "ImageNet" else [table]):
            _add(t, clip, r["dataset"], "accuracy", None, r["accuracy"])
        return True
    source = os.path.normpath(os.path.join(folder, side["prompt"]))
    if source not in runs:
        return False
    src, config = runs[source]
    row = _setting(src, config)
    clip = (row[SETTING.index("weights")], row[SETTING.index("templates")])
    _add(table, row, r["dataset"], "accuracy", src["seed"], r["accuracy"])
    _add(table, row, src["dataset"], "accuracy", src["seed"], src["accuracy"])
    if (*clip, src["dataset"]) not in evaluated and "zero_shot" in src:   # else the run's own zero-shot test
        _add(table, _zero_shot(*clip), src["dataset"], "accuracy", src["seed"], src["zero_shot"]["accuracy"])
    return True


def _official_setting(run):
    """The row of an official_runs.OfficialRun: its settings under our names (its backbone is our
    weights), the method marked official."""
    config = {"method": OFFICIAL[run.method], "n_ctx": run.n_ctx, "ctx_init": run.ctx_init, "csc": run.csc,
              "class_token_position": run.class_token_position, "weights": run.backbone or None,
              "precision": run.precision or None, "data": run.data_root, "epochs": run.epochs,
              "batch_size": run.batch_size, "lr": run.lr}
    return _setting({"method": run.method, "shots": run.shots, "dataset": run.dataset}, config)


def _add_official(tables, runs):
    """The official code's runs into the few-shot, base-to-new and transfer tables; returns how many run
    folders were left out (no result, another trainer, an evaluation without its trained run)."""
    by_folder = {run.folder: run for run in runs}
    used = set()
    for run in runs:
        if run.method not in OFFICIAL or run.accuracy is None:
            continue
        if run.trained and run.subsample == "all" and run.shots is not None:
            _add(tables["few_shot"], _official_setting(run), run.dataset, run.shots, run.seed, run.accuracy)
            used.add(run.folder)
        elif (source := by_folder.get(run.source)) and _add_official_evaluation(tables, run, source):
            used |= {run.folder, source.folder}
    return len(runs) - len(used)


def _add_official_evaluation(tables, run, source):
    """An eval-only run and the trained run it loaded: base and new of test_new, or a transfer target and
    the source; False for any other pair."""
    if source.method != run.method or source.accuracy is None or source.shots is None:
        return False
    row = _official_setting(source)
    if source.subsample == "base" and run.subsample == "new":
        _add(tables["base2new"], row, source.dataset, "base", source.seed, source.accuracy)
        _add(tables["base2new"], row, source.dataset, "new", source.seed, run.accuracy)
        return True
    if source.subsample == run.subsample == "all" and run.dataset != source.dataset:
        table = tables["dg" if run.dataset in DG_TARGETS else "cross_dataset"]
        _add(table, row, run.dataset, "accuracy", source.seed, run.accuracy)
        _add(table, row, source.dataset, "accuracy", source.seed, source.accuracy)
        return True
    return False


def _value(name, value):
    if name in ("weights", "data"):       # a file or folder by its name; a model name whole ("ViT-B/16")
        text = str(value or "")
        named = name == "weights" and not os.path.splitext(text)[1] and not os.path.isabs(text)
        return (text if named else os.path.basename(text.rstrip("/"))) or "default"
    if name == "training":
        return value or "as the paper"
    return repr(value)


def labels(settings):
    """Row names in the papers' order: the method, and the settings in which rows of that method differ."""
    out = {}
    for s in settings:
        same = [t for t in settings if t[0] == s[0]]
        differ = [i for i in range(1, len(SETTING)) if len({t[i] for t in same}) > 1]
        extra = ", ".join(f"{SETTING[i].replace('_', ' ')} {_value(SETTING[i], s[i])}" for i in differ)
        out[s] = _label(NAMES[s[0]], extra)
    return dict(sorted(out.items(), key=lambda kv: (list(NAMES).index(kv[0][0]), kv[1])))


def _label(name, extra):
    """A method's name and the settings its row differs in: "CoOp (n ctx 4)", "CoOp (official, n ctx 4)"."""
    if not extra:
        return name
    if name.endswith(")"):
        return f"{name[:-1]}, {extra})"
    return f"{name} ({extra})"


def differing(settings):
    """The settings in which any two rows differ, e.g. ["n_ctx", "csc"] for CoOp's variants."""
    return [SETTING[i] for i in range(1, len(SETTING))
            if len({s[i] for s in settings if s[0] != "zero-shot"}) > 1]


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
    """"mean ± std" ("mean" of one seed), then "(n/most)" when fewer seeds than `most` went into it;
    "-" for no results."""
    if s is None:
        return "-"
    text = f"{s[0]:.2f} ± {s[1]:.2f}" if std and s[2] > 1 else f"{s[0]:.2f}"
    return text + (f" ({s[2]}/{most})" if s[2] < most else "")


def _cells(setting, stats, most):            # zero-shot CLIP has no seeds of its own: its mean alone
    return [_cell(s, *((0, False) if setting[0] == "zero-shot" else (most, True))) for s in stats]


def _h(b, n):
    return f"{harmonic_mean(b[0], n[0]):.2f}" if b and n else "-"


def _order(names):
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def _most(rows):
    return max((s[2]
                for row in rows.values()
                for d in row.values()
                for c in d.values()
                if (s := stat(c))),
               default=0)


def _md(header, rows):
    return ["| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def few_shot_md(table, name):
    most, datasets = _most({name: table}), _order(table)
    shots = sorted({k for d in table.values() for k in d if k})
    lines = [[d, _cell(stat(table[d].get(0)), std=False),
              *(_cell(stat(table[d].get(k)), most) for k in shots)]
             for d in datasets]
    if len(datasets) > 1:
        lines.append(["Average", *(_cell(average([stat(table[d].get(k)) for d in datasets]), std=False)
                                   for k in [0, *shots])])
    return [f"### {name}", "",
            *_md(["dataset", "zero-shot CLIP", *(f"{k} shot{'s' * (k > 1)}" for k in shots)], lines)]


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
    return _md(["method", *(f"{c} (source)" if c == "ImageNet" else c for c in columns), "Average (targets)"],
               lines)


def write_csv(path, rows):
    """One line per (method, dataset, column): mean, std, the number of seeds and each seed's value."""
    seeds = sorted({x
                    for row in rows.values()
                    for d in row.values()
                    for c in d.values()
                    for x in c
                    if x is not None})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "dataset", "column", "mean", "std", "seeds", *(f"seed_{s}" for s in seeds)])
        for s, name in labels(rows).items():
            for d in _order(rows[s]):
                for column, by_seed in sorted(rows[s][d].items(),
                                              key=lambda kv: (isinstance(kv[0], str), kv[0])):
                    m, sd, n = stat(by_seed)
                    w.writerow([name, d, "zero-shot" if column == 0 else column, f"{m:.4f}", f"{sd:.4f}", n,
                                *(f"{by_seed[x]:.4f}" if x in by_seed else "-" for x in seeds)])


def compute_md(compute, names):
    """What each setting cost, from the runs' results.json: mean training time per run, images/s,
    peak memory."""
    lines = []
    for s, name in names.items():
        rs = compute.get(s, [])
        seconds = [r.get("train_seconds", r.get("seconds")) for r in rs]
        speed = [r["images_per_second"] for r in rs if r.get("images_per_second")]
        memory = [r["peak_memory_bytes"] for r in rs if r.get("peak_memory_bytes")]
        lines.append([name, str(len(rs)),
                      _duration(statistics.mean(seconds)) if rs and None not in seconds else "-",
                      f"{statistics.mean(speed):.1f}" if speed else "-",
                      f"{max(memory) / 2**30:.2f} GiB" if memory else "-"])
    return _md(["setting", "runs", "time per run", "training images/s", "peak GPU memory"], lines)


def _duration(seconds):
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ----------------------------------------------------------------------------------------------
# plots (coop_min.plots draws them, PNG and SVG)


def _points(by_column, most):
    """{column: (mean, std or None, complete)} of one row on one dataset."""
    out = {}
    for column, by_seed in by_column.items():
        if column and (s := stat(by_seed)):
            out[column] = (s[0], s[1] if s[2] > 1 else None, s[2] >= most)
    return out


def _average_points(table):
    columns = {k for d in table.values() for k in d if k}
    out = {}
    for k in columns:
        if a := average([stat(table[d].get(k)) for d in table]):
            out[k] = (a[0], None, True)
    return out


def few_shot_panels(rows):
    """One plots.Panel per dataset, and the Average when there are several, of the few-shot table."""
    names, most = labels(rows), _most(rows)
    datasets = _order({d for table in rows.values() for d in table})
    panels = []
    for d in datasets + (["Average"] if len(datasets) > 1 else []):
        curves, zero_shot = [], {}
        for s, name in names.items():
            if d != "Average" and d not in rows[s]:
                continue
            points = _average_points(rows[s]) if d == "Average" else _points(rows[s][d], most)
            if points:
                curves.append(plots.Curve(name, points, dashed=s[0] == "linear-probe"))
            z = (average([stat(rows[s][x].get(0)) for x in rows[s]]) if d == "Average"
                 else stat(rows[s][d].get(0)))
            if z:
                zero_shot.setdefault(_zero_shot_label(s, names), z[0])
        panels.append(plots.Panel(d, curves, list(zero_shot.items())))
    return panels


def _zero_shot_label(s, names):
    """Zero-shot CLIP, named by its weights and templates when the table holds several of them."""
    kinds = {(t[SETTING.index("weights")], t[SETTING.index("templates")]) for t in names}
    if len(kinds) == 1:
        return "zero-shot CLIP"
    weights, templates = s[SETTING.index("weights")], s[SETTING.index("templates")]
    return f"zero-shot CLIP ({_value('weights', weights)}, {templates or 'single'})"


def base2new_groups(rows):
    """[(dataset, {row name: (base, new, H)})] of the base-to-new table, each (mean, std or None)."""
    names = labels(rows)
    groups = []
    for d in _order({d for row in rows.values() for d in row}):
        group = {}
        for s, name in names.items():
            if d in rows[s]:
                b, n = stat(rows[s][d]["base"]), stat(rows[s][d]["new"])
                group[name] = ((b[0], b[1] if b[2] > 1 else None), (n[0], n[1] if n[2] > 1 else None),
                               (harmonic_mean(b[0], n[0]), None))
        groups.append((d, group))
    if len(groups) > 1:                      # the Average: base and new over the datasets, H of those
        average_group = {}
        for s, name in names.items():
            b, n = (average([stat(rows[s].get(d, {}).get(h)) for d, _ in groups]) for h in ("base", "new"))
            if b and n:
                average_group[name] = ((b[0], None), (n[0], None), (harmonic_mean(b[0], n[0]), None))
        groups.insert(0, ("Average", average_group))
    return groups


# ----------------------------------------------------------------------------------------------
# all of it


_NOTE = ("Cells: mean ± std over seeds (np.std's, the population's), the mean alone for one seed; "
         "\"(n/m)\": n seeds of the m that the table's fullest cell has; \"-\": no results.")


def summarize(root, output=None):
    """Read everything below `root`; write summary.md, the CSVs and the plots into `output` (default
    root). Returns (the Markdown text, the tables)."""
    output = output or root
    os.makedirs(output, exist_ok=True)
    tables, left_out = collect(root)
    official_left_out = _add_official(tables, official_runs.find_runs(root))
    lines = [f"# Results below {root}", "", _NOTE, ""]
    if left_out:
        lines += [
            f"({left_out} results.json left out: unreadable, or evaluations without a sweep.json or run)",
            ""]
    if official_left_out:
        lines += [f"({official_left_out} official log.txt left out: no result, a trainer other than CoOp or "
                  "CoCoOp, or an evaluation whose trained run is not below RUNS)", ""]
    if rows := tables["few_shot"]:
        lines += ["## Few-shot (CoOp, Figure 3): test accuracy (%)", "", *_differ_line(rows)]
        for s, name in labels(rows).items():
            lines += [*few_shot_md(rows[s], name), ""]
        plots.few_shot_figure(few_shot_panels(rows), os.path.join(output, "few_shot"))
    if rows := tables["base2new"]:
        lines += ["## Base-to-new (CoCoOp, Table 1): test accuracy (%); H of the means", "",
                  *_differ_line(rows), *base2new_md(rows), ""]
        names = [n for n in labels(rows).values()]
        plots.bars_figure(base2new_groups(rows), names, os.path.join(output, "base2new"))
    for key, title in (("cross_dataset", "Cross-dataset transfer (CoCoOp, Table 2)"),
                       ("dg", "Domain generalisation (CoOp; CoCoOp, Table 3)")):
        if any(d != "ImageNet" for row in tables[key].values() for d in row):
            lines += [f"## {title}: test accuracy (%)", "",
                      *_differ_line(tables[key]), *transfer_md(tables[key]), ""]
    if tables["compute"]:
        lines += ["## Compute: what each setting cost, per run (as the runs recorded it)", "",
                  *compute_md(tables["compute"], labels(tables["compute"])), ""]
    for key in (key for key in TABLES if tables[key]):
        write_csv(os.path.join(output, f"{key}.csv"), tables[key])
    if not any(tables.values()):
        lines.append("No results yet: no results.json of a run, or of an evaluation with its sweep.json.")
    text = "\n".join(lines).rstrip() + "\n"
    with open(os.path.join(output, "summary.md"), "w") as f:
        f.write(text)
    return text, tables


def _differ_line(rows):
    if differ := differing(rows):
        return [f"Rows differ in: {', '.join(name.replace('_', ' ') for name in differ)}.", ""]
    return []


def main(argv=None):
    cli.exit_with(cli.run(_main, argv))


def _main(argv):
    p = cli.parser("python -m coop_min.summarize", description=(
        "The papers' tables (Markdown, CSV) and plots (PNG and SVG) from every results.json below RUNS, "
        "and from the official CoOp/CoCoOp code's run folders (log.txt) there, as rows of their own."))
    p.add_argument("runs", metavar="RUNS", help="the folder of the runs (a sweep's --output, or the official "
                   "code's output/)")
    p.add_argument("--output", help="the folder for summary.md, the CSV files and the plots (default RUNS)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.runs):
        p.error(f"{args.runs} is not a folder; pass a sweep's --output")
    text, _ = summarize(args.runs, args.output)
    print(text)
    print(f"written: summary.md, the CSV files and the plots in {args.output or args.runs}")


if __name__ == "__main__":
    main()
