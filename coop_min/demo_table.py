"""`python -m coop_min.demo_table`: the papers' tables in miniature, on the demo benchmark and tiny CLIP.

Four sweeps (coop_min.sweep) with the paper defaults and seeds 1, 2, 3, then coop_min.summarize:
- base-to-new (CoCoOp's Table 1): zero-shot CLIP, CoOp ("a photo of a" init, M=4, as the CoCoOp
  paper's CoOp) and CoCoOp, trained on the base half, tested on base and new; H of the mean base and
  mean new;
- the few-shot curve (CoOp's Figure 3): CoOp (M=16, random init) and linear-probe CLIP at 1/2/4/8/16
  shots vs zero-shot.
The runs go to OUTPUT/runs in the sweep's layout, so Ctrl-C stops it (one line) and a rerun continues
where it stopped, reusing the finished runs. Writes into --output `table.md` (the README's table),
`results.json` and `shots.png` / `shots.svg` (the README's figure), and summarize's summary.md, CSV
files and plots.
"""
import os
import subprocess
import sys
from pathlib import Path

from coop_min import cli, plots, summarize
from coop_min.evaluate import harmonic_mean
from coop_min.files import atomic_write, write_json

SEEDS = (1, 2, 3)
SHOTS = (1, 2, 4, 8, 16)


def tables(rows, weights):
    """(base-to-new {method: {base, new, H}}, few-shot curve {method: [(mean, std) per shot]}) of the
    demo's runs with these weights, from summarize's tables."""
    b2n, curve = {}, {}
    ours = _with_weights(rows["base2new"], weights)
    base2new = {s: ours[s]["Demo"] for s in ours if "Demo" in ours[s]}
    for s, name in summarize.labels(base2new).items():
        b, n = (summarize.stat(base2new[s][h])[0] for h in ("base", "new"))
        b2n[name] = {"base": b, "new": n, "H": harmonic_mean(b, n)}     # H of the means, as the paper
    few_shot = _with_weights(rows["few_shot"], weights)
    for s, name in summarize.labels(few_shot).items():
        demo = few_shot[s].get("Demo", {})
        if zero_shot := summarize.stat(demo.get(0)):
            curve["zero-shot CLIP"] = [zero_shot[:2]] * len(SHOTS)
        curve[name] = [summarize.stat(demo.get(k))[:2] for k in SHOTS]
    order = ["zero-shot CLIP", *(name for name in curve if name != "zero-shot CLIP")]
    return b2n, {name: curve[name] for name in order if name in curve}


def _with_weights(table, weights):
    return {s: row for s, row in table.items() if s[summarize.SETTING.index("weights")] == weights}


def markdown(b2n, curve, seeds):
    lines = [f"Base-to-new on the demo benchmark (16 shots, mean of seeds {', '.join(map(str, seeds))}):", "",
             "| method | base | new | H |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['base']:.2f} | {r['new']:.2f} | {r['H']:.2f} |" for name, r in b2n.items()]
    lines += ["", "Few-shot, all 36 classes (test accuracy, mean ± std over seeds; zero-shot CLIP has no "
              "seeds):", "", "| shots | " + " | ".join(map(str, SHOTS)) + " |", "|---|" + "---|" * len(SHOTS)]
    for name, series in curve.items():
        cells = [f"{m:.2f}" if name == "zero-shot CLIP" else f"{m:.2f} ± {s:.2f}" for m, s in series]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    cli.exit_with(cli.run(_main, argv))


def _main(argv):
    p = cli.parser("python -m coop_min.demo_table", __doc__.splitlines()[0])
    p.add_argument("--output", default="runs/demo_table", help="folder for the runs, table.md and shots.png")
    p.add_argument("--weights", help="CLIP weights (default: the bundled tiny CLIP)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    args = p.parse_args(argv)
    runs = os.path.join(args.output, "runs")
    common = ["--output", runs, "--seeds", ",".join(map(str, args.seeds))]
    common += ["--weights", args.weights] if args.weights else []
    sweeps = (("base2new", "coop"), ("base2new", "cocoop"),
              ("few-shot", "coop"), ("few-shot", "linear-probe"))
    for protocol, method in sweeps:
        command = [sys.executable, "-m", "coop_min.sweep",
                   "--protocol", protocol, "--method", method, *common]
        if subprocess.run(command).returncode:               # the sweep said why, in one line
            return 1
    _, rows = summarize.summarize(runs, args.output)
    b2n, curve = tables(rows, args.weights)
    write_json(os.path.join(args.output, "results.json"),
               {"base_to_new": b2n, "shots": {k: [list(v) for v in s] for k, s in curve.items()}})
    curves = [plots.Curve(name, {k: (m, sd, True) for k, (m, sd) in zip(SHOTS, points)},
                          dashed=name.startswith("linear-probe"))
              for name, points in curve.items() if name != "zero-shot CLIP"]
    zero_shot = [("zero-shot CLIP", curve["zero-shot CLIP"][0][0])]
    plots.few_shot_figure([plots.Panel("demo benchmark, all 36 classes", curves, zero_shot)],
                          os.path.join(args.output, "shots"), columns=1)
    text = markdown(b2n, curve, args.seeds)
    atomic_write(os.path.join(args.output, "table.md"), lambda tmp: Path(tmp).write_text(text))
    print(text)
    return 0


if __name__ == "__main__":
    main()
