"""`python -m coop_min.demo_table`: the papers' tables in miniature, on the demo benchmark and tiny CLIP.

Runs, with the paper defaults and seeds 1, 2, 3:
- base-to-new (CoCoOp's Table 1): zero-shot CLIP, CoOp ("a photo of a" init, M=4, as the CoCoOp
  paper's CoOp) and CoCoOp, trained on the base half, tested on base and new; H = harmonic mean;
- the few-shot curve (CoOp's Figure 3): CoOp (M=16, random init) at 1/2/4/8/16 shots vs zero-shot.
Writes `table.md`, `results.json` and `shots.png` (drawn with PIL) into --output; the README's table
is this script's output.
"""
import argparse
import json
import os
import statistics

from PIL import Image, ImageDraw

from coop_min.evaluate import harmonic_mean
from coop_min.train import TrainConfig, run

SEEDS = (1, 2, 3)
SHOTS = (1, 2, 4, 8, 16)


def _mean_std(values):
    return statistics.mean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def _runs(out, tag, seeds, **settings):
    results = []
    for seed in seeds:
        folder = os.path.join(out, "runs", tag, f"seed{seed}")
        done = os.path.join(folder, "results.json")
        if os.path.exists(done):                       # re-running the script reuses finished runs
            with open(done) as f:
                results.append(json.load(f))
            continue
        results.append(run(TrainConfig(seed=seed, output=folder, workers=0, print_every=10 ** 9, **settings)))
    return results


def base_to_new(out, weights, seeds):
    rows = {}
    coop = _runs(out, "b2n_coop", seeds, weights=weights, subsample="base", ctx_init="a photo of a")
    cocoop = _runs(out, "b2n_cocoop", seeds, weights=weights, subsample="base", method="cocoop")
    rows["zero-shot CLIP"] = [(r["zero_shot"]["accuracy"], r["zero_shot_new"]["accuracy"]) for r in coop]
    rows["CoOp"] = [(r["base"], r["new"]) for r in coop]
    rows["CoCoOp"] = [(r["base"], r["new"]) for r in cocoop]
    table = {}
    for name, pairs in rows.items():
        b = statistics.mean(p[0] for p in pairs)
        n = statistics.mean(p[1] for p in pairs)
        table[name] = {"base": b, "new": n, "H": harmonic_mean(b, n)}     # H of the means, as the paper
    return table


def shots_curve(out, weights, seeds):
    curve = {"zero-shot CLIP": [], "CoOp": []}
    for k in SHOTS:
        results = _runs(out, f"shots{k}", seeds, weights=weights, shots=k)
        curve["CoOp"].append(_mean_std([r["accuracy"] for r in results]))
        curve["zero-shot CLIP"].append(_mean_std([r["zero_shot"]["accuracy"] for r in results]))
    return curve


def plot(curve, path, size=(480, 320)):
    """Accuracy vs shots (log2 x axis), one polyline per method, drawn with PIL."""
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, top, right, bottom = 50, 20, size[0] - 20, size[1] - 40
    values = [m for series in curve.values() for m, _ in series]
    lo, hi = min(values) - 2, max(values) + 2
    x = lambda i: left + (right - left) * i / (len(SHOTS) - 1)                      # noqa: E731
    y = lambda v: bottom - (bottom - top) * (v - lo) / (hi - lo)                     # noqa: E731
    d.rectangle([left, top, right, bottom], outline="black")
    for i, k in enumerate(SHOTS):
        d.text((x(i) - 4, bottom + 6), str(k), fill="black")
    for v in range(int(lo) + 1, int(hi) + 1, max(1, int((hi - lo) / 5))):
        d.text((8, y(v) - 6), f"{v}%", fill="black")
    d.text(((left + right) // 2 - 40, bottom + 22), "shots per class", fill="black")
    for (name, series), colour in zip(curve.items(), ("grey", "blue")):
        points = [(x(i), y(m)) for i, (m, _) in enumerate(series)]
        d.line(points, fill=colour, width=2)
        for px, py in points:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        d.text((left + 8, top + 6 + 14 * list(curve).index(name)), name, fill=colour)
    img.save(path)


def markdown(b2n, curve, seeds):
    lines = [f"Base-to-new on the demo benchmark (16 shots, mean of seeds {', '.join(map(str, seeds))}):", "",
             "| method | base | new | H |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['base']:.2f} | {r['new']:.2f} | {r['H']:.2f} |" for name, r in b2n.items()]
    lines += ["", "Few-shot, all 36 classes (test accuracy, mean ± std over seeds):", "",
              "| shots | " + " | ".join(map(str, SHOTS)) + " |", "|---|" + "---|" * len(SHOTS)]
    for name, series in curve.items():
        lines.append(f"| {name} | " + " | ".join(f"{m:.2f} ± {s:.2f}" for m, s in series) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m coop_min.demo_table", description=__doc__.splitlines()[0])
    p.add_argument("--output", default="runs/demo_table", help="folder for the runs, table.md and shots.png")
    p.add_argument("--weights", help="CLIP weights (default: the bundled tiny CLIP)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    args = p.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    b2n = base_to_new(args.output, args.weights, args.seeds)
    curve = shots_curve(args.output, args.weights, args.seeds)
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump({"base_to_new": b2n, "shots": {k: [list(v) for v in s] for k, s in curve.items()}}, f, indent=2)
    plot(curve, os.path.join(args.output, "shots.png"))
    text = markdown(b2n, curve, args.seeds)
    with open(os.path.join(args.output, "table.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
