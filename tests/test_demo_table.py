"""coop_min.demo_table's tables, from hand-written results.json files through summarize (no training):
the means of the seeds, H of the mean base and mean new, and the Markdown the README shows, as literals
worked out by hand."""
import json

import pytest

from coop_min import demo_table, summarize


def _write(folder, results, config):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "config.json").write_text(json.dumps(config))


def _config(method, n_ctx, ctx_init):
    return {"method": method, "n_ctx": n_ctx, "ctx_init": ctx_init, "csc": False, "class_token_position": "end",
            "weights": None}


def test_tables_and_markdown_of_hand_written_demo_results(tmp_path):
    runs = tmp_path / "runs"
    for method, seed, base, new in (("coop", 1, 80.0, 60.0), ("coop", 2, 84.0, 50.0),
                                    ("cocoop", 1, 81.0, 70.0), ("cocoop", 2, 83.0, 72.0)):
        _write(runs / "base2new" / method / f"seed{seed}",
               {"dataset": "Demo", "method": method, "shots": 16, "seed": seed, "subsample": "base",
                "accuracy": base, "base": base, "new": new, "harmonic_mean": 0.0,
                "zero_shot": {"accuracy": 70.0}, "zero_shot_new": {"accuracy": 74.0 + 2 * (seed - 1)}},
               _config(method, 4, "a photo of a"))
    for shots in demo_table.SHOTS:
        for seed in (1, 2):
            _write(runs / "few_shot" / f"shots{shots}" / f"seed{seed}",
                   {"dataset": "Demo", "method": "coop", "shots": shots, "seed": seed, "subsample": "all",
                    "accuracy": 38.0 + 2 * seed + shots, "zero_shot": {"accuracy": 50.0}},
                   _config("coop", 16, ""))
    _, rows = summarize.summarize(str(runs), str(tmp_path / "summary"))
    b2n, curve = demo_table.tables(rows, None)
    # base 82 (80, 84 / 81, 83 / 70), new 55 (60, 50), 71 (70, 72), 75 (74, 76); H = 2 b n / (b + n):
    # 9020 / 137 = 65.839, 11644 / 153 = 76.105, 10500 / 145 = 72.414
    expected = {"zero-shot CLIP": {"base": 70.0, "new": 75.0, "H": 10500 / 145},
                "CoOp": {"base": 82.0, "new": 55.0, "H": 9020 / 137},
                "CoCoOp": {"base": 82.0, "new": 71.0, "H": 11644 / 153}}
    assert list(b2n) == list(expected)
    assert all(b2n[name] == pytest.approx(row, rel=1e-12) for name, row in expected.items()), b2n
    # k shots: seed 1 at 40 + k, seed 2 at 42 + k: mean 41 + k, population std 1
    assert curve == {"zero-shot CLIP": [(50.0, 0.0)] * 5,
                     "CoOp": [(42.0, 1.0), (43.0, 1.0), (45.0, 1.0), (49.0, 1.0), (57.0, 1.0)]}
    assert demo_table.markdown(b2n, curve, [1, 2]) == """\
Base-to-new on the demo benchmark (16 shots, mean of seeds 1, 2):

| method | base | new | H |
|---|---|---|---|
| zero-shot CLIP | 70.00 | 75.00 | 72.41 |
| CoOp | 82.00 | 55.00 | 65.84 |
| CoCoOp | 82.00 | 71.00 | 76.10 |

Few-shot, all 36 classes (test accuracy, mean ± std over seeds; zero-shot CLIP has no seeds):

| shots | 1 | 2 | 4 | 8 | 16 |
|---|---|---|---|---|---|
| zero-shot CLIP | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 |
| CoOp | 42.00 ± 1.00 | 43.00 ± 1.00 | 45.00 ± 1.00 | 49.00 ± 1.00 | 57.00 ± 1.00 |
"""
