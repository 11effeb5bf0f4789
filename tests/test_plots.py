"""coop_min.plots: both files written, the SVG's elements (texts, error bars, dashes, hollow points) and
where they sit, checked against the axis the module documents (a value v at bottom - (v - lo) / (hi - lo)
* height between the lowest and highest tick labels), and the PNG's size and text."""
import math
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from coop_min import plots

SVG = "{http://www.w3.org/2000/svg}"
SHOT_LABELS = ["0", "1", "2", "4", "8", "16"]


def _curve(name, start, std=1.5, dashed=False, incomplete=()):
    return plots.Curve(name, {k: (start + 3 * i, std, k not in incomplete)
                              for i, k in enumerate((1, 2, 4, 8, 16))}, dashed)


def _panels():
    """Two datasets and the Average (given last): CoOp with one incomplete point, CoCoOp without stds,
    linear-probe CLIP dashed, zero-shot CLIP a star."""
    panels = []
    for title, start in (("Caltech101", 71.0), ("EuroSAT", 53.0)):
        curves = [_curve("CoOp", start, incomplete=(16,) if title == "EuroSAT" else ()),
                  _curve("CoCoOp", start + 1, std=None),
                  _curve("linear-probe CLIP", start - 10, std=2.0, dashed=True)]
        panels.append(plots.Panel(title, curves, [("zero-shot CLIP", start + 4)]))
    average = [_curve("CoOp", 62.0, std=None), _curve("CoCoOp", 63.0, std=None),
               _curve("linear-probe CLIP", 52.0, std=None, dashed=True)]
    return panels + [plots.Panel("Average", average, [("zero-shot CLIP", 66.0)])]


def _svg(path):
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg" and root.get("font-family") == "sans-serif"
    return root


def _all(root, tag, kind=None):
    return [e for e in root.iter(f"{SVG}{tag}") if kind is None or e.get("class") == kind]


def _texts(root):
    return [e.text for e in _all(root, "text")]


def _floats(element, *names):
    return [float(element.get(n)) for n in names]


@pytest.fixture(scope="module")
def few_shot(tmp_path_factory):
    stem = str(tmp_path_factory.mktemp("plots") / "few_shot")
    return plots.few_shot_figure(_panels(), stem, columns=2), _svg(stem + ".svg")


@pytest.fixture(scope="module")
def one_panel(tmp_path_factory):
    """One dataset alone: the axis read from its tick labels is the only one in the file."""
    stem = str(tmp_path_factory.mktemp("plots") / "one")
    plots.few_shot_figure(_panels()[:1], stem, columns=4)
    return _svg(stem + ".svg"), _panels()[0]


GROUPS = [("ImageNet", {"zero-shot CLIP": ((72.4, None), (68.1, None), (70.2, None)),
                        "CoOp": ((76.5, 0.3), (67.9, 0.8), (71.9, None)),
                        "CoCoOp": ((76.0, 0.2), (70.4, 0.5), (73.1, None))}),
          ("EuroSAT", {"zero-shot CLIP": ((56.5, None), (64.1, None), (60.0, None)),
                       "CoOp": ((92.2, 1.1), (0.0, None), (0.0, None))})]   # CoCoOp missing here


@pytest.fixture(scope="module")
def bars(tmp_path_factory):
    stem = str(tmp_path_factory.mktemp("plots") / "base2new")
    paths = plots.bars_figure(GROUPS, ["zero-shot CLIP", "CoOp", "CoCoOp"], stem, title="Base to new")
    return paths, _svg(stem + ".svg")


def test_both_files_are_written_and_the_png_is_the_svg_at_twice_the_size(few_shot, bars):
    for paths, root in (few_shot, bars):
        png, svg = paths
        assert png.endswith(".png") and svg.endswith(".svg")
        width, height = int(root.get("width")), int(root.get("height"))
        assert root.get("viewBox") == f"0 0 {width} {height}"
        assert Image.open(png).size == (plots.SCALE * width, plots.SCALE * height) == (2 * width, 2 * height)


def test_the_svg_has_one_text_per_label(few_shot):
    texts = _texts(few_shot[1])
    for label in ("Average", "Caltech101", "EuroSAT", "CoOp", "CoCoOp", "linear-probe CLIP", "zero-shot CLIP",
                  plots.HOLLOW, "Score (%)", "Number of labeled training examples per class"):
        assert texts.count(label) == 1, (label, texts)
    for label in SHOT_LABELS:                                    # the x ticks of each of the three panels
        assert [e.text for e in _all(few_shot[1], "text", "xtick")].count(label) == 3, label


def test_the_average_comes_first_and_each_name_keeps_its_colour(few_shot):
    titles = [e.text for e in _all(few_shot[1], "text", "title")]
    assert titles == ["Average", "Caltech101", "EuroSAT"]
    strokes = {}
    for line in _all(few_shot[1], "polyline", "curve"):
        strokes.setdefault(line.get("stroke-dasharray") is not None, set()).add(line.get("stroke"))
    assert len(strokes[True]) == 1 and len(strokes[False]) == 2      # linear probe; CoOp and CoCoOp
    assert not strokes[True] & strokes[False]


def test_error_bars_where_there_is_a_std_and_none_without(few_shot):
    with_std = sum(1 for p in _panels() for c in p.curves for _, s, _ in c.points.values() if s is not None)
    assert with_std == 2 * (5 + 5)                                   # CoOp and linear probe, two datasets
    assert len(_all(few_shot[1], "line", "errorbar")) == with_std
    assert len(_all(few_shot[1], "line", "cap")) == 2 * with_std


def test_the_dashed_curve_is_a_dashed_polyline_and_the_others_are_solid(few_shot):
    curves = _all(few_shot[1], "polyline", "curve")
    dashed = [c for c in curves if c.get("stroke-dasharray")]
    assert len(curves) == 9 and len(dashed) == 3                     # three curves in three panels
    legend = [e for e in _all(few_shot[1], "line", "legend") if e.get("stroke-dasharray")]
    assert len(legend) == 1 and legend[0].get("stroke") == dashed[0].get("stroke")


def test_incomplete_points_are_hollow_and_the_legend_says_so(few_shot, tmp_path):
    points = _all(few_shot[1], "circle", "point")
    assert len(points) == 3 * 3 * 5
    hollow = [p for p in points if p.get("fill") == "white"]
    assert len(hollow) == 1 and hollow[0].get("stroke") != "white"
    complete = []
    for p in _panels():
        curves = [c._replace(points={k: (m, s, True) for k, (m, s, _) in c.points.items()}) for c in p.curves]
        complete.append(p._replace(curves=curves))
    plots.few_shot_figure(complete, str(tmp_path / "complete"))
    root = _svg(tmp_path / "complete.svg")
    assert not [p for p in _all(root, "circle", "point") if p.get("fill") == "white"]
    assert plots.HOLLOW not in _texts(root)


def _y_axis(root):
    """(bottom, height, lo, hi) from the plot box and its tick labels, with the ticks' own check: evenly
    spaced labels at evenly spaced heights, the lowest on the bottom edge, the highest on the top."""
    (frame,) = _all(root, "rect", "frame")
    _, top, _, height = _floats(frame, "x", "y", "width", "height")
    ticks = sorted((float(t.text), float(t.get("y"))) for t in _all(root, "text", "ytick"))
    values = [v for v, _ in ticks]
    ys = [y for _, y in ticks]
    assert len(ticks) >= 3 and all(b - a == values[1] - values[0] for a, b in zip(values, values[1:]))
    assert all(math.isclose(ys[i] - ys[i + 1], ys[0] - ys[1], abs_tol=0.02) for i in range(len(ys) - 1))
    assert math.isclose(ys[0] - ys[-1], height, abs_tol=0.02)       # label baselines: the same offset
    return top + height, height, values[0], values[-1]


def test_points_sit_at_their_values_on_the_documented_axis(one_panel):
    root, panel = one_panel
    bottom, height, lo, hi = _y_axis(root)
    values = [m + sign * (s or 0) for c in panel.curves for m, s, _ in c.points.values() for sign in (-1, 1)]
    values += [m for _, m in panel.zero_shot]
    assert lo <= min(values) and max(values) <= hi and hi - lo < 2 * (max(values) - min(values))
    x_of = {t.text: float(t.get("x")) for t in _all(root, "text", "xtick")}
    assert list(x_of) == SHOT_LABELS
    steps = [x_of[b] - x_of[a] for a, b in zip(SHOT_LABELS, SHOT_LABELS[1:])]
    assert max(steps) - min(steps) < 0.02                            # 0, 1, 2, 4, 8, 16 evenly: log2
    expected = sorted((round(x_of[str(k)], 2), round(bottom - (m - lo) / (hi - lo) * height, 2))
                      for c in panel.curves for k, (m, _, _) in c.points.items())
    drawn = sorted(tuple(_floats(p, "cx", "cy")) for p in _all(root, "circle", "point"))
    assert len(drawn) == len(expected)
    for (x, y), (ex, ey) in zip(drawn, expected):
        assert abs(x - ex) <= 0.011 and abs(y - ey) <= 0.011, ((x, y), (ex, ey))
    (star,) = _all(root, "polygon", "star")
    corners = [tuple(map(float, c.split(","))) for c in star.get("points").split()]
    centre = [sum(c[i] for c in corners) / len(corners) for i in (0, 1)]
    zero_shot = panel.zero_shot[0][1]
    assert math.isclose(centre[0], x_of["0"], abs_tol=0.02)
    assert math.isclose(centre[1], bottom - (zero_shot - lo) / (hi - lo) * height, abs_tol=0.02)


def test_error_bars_span_one_std(one_panel):
    root, panel = one_panel
    bottom, height, lo, hi = _y_axis(root)
    coop = panel.curves[0]
    bars = sorted(_floats(e, "x1", "y1", "y2") for e in _all(root, "line", "errorbar")
                  if e.get("stroke") == _all(root, "polyline", "curve")[0].get("stroke"))
    assert len(bars) == 5
    for (x, y_low, y_high), (k, (m, s, _)) in zip(bars, sorted(coop.points.items())):
        assert math.isclose(y_low - y_high, 2 * s / (hi - lo) * height, abs_tol=0.03)
        assert math.isclose((y_low + y_high) / 2, bottom - (m - lo) / (hi - lo) * height, abs_tol=0.02)


def test_bars_start_at_zero_and_their_heights_are_proportional_to_their_values(bars):
    root = bars[1]
    ticks = [float(t.text) for t in _all(root, "text", "ytick")]
    assert ticks == [0, 20, 40, 60, 80, 100] * 2
    frames = [_floats(f, "x", "y", "width", "height") for f in _all(root, "rect", "frame")]
    assert len(frames) == 2
    heights = {}
    for r in _all(root, "rect", "bar"):
        x, y, width, h = _floats(r, "x", "y", "width", "height")
        frame = next(f for f in frames if f[0] <= x <= f[0] + f[2])
        assert math.isclose(y + h, frame[1] + frame[3], abs_tol=0.02)   # from the bottom edge: zero
        heights.setdefault(frames.index(frame), []).append(h / frame[3] * 100)
    values = [[m for triple in zip(*group.values()) for m, _ in triple] for _, group in GROUPS]
    for i, group in enumerate(values):                                  # base bars, then new, then H
        assert len(heights[i]) == len(group)
        for drawn, value in zip(heights[i], group):
            assert math.isclose(drawn, value, abs_tol=0.02), (drawn, value)
    assert sum(1 for hs in heights.values() for h in hs if h == 0) == 2   # EuroSAT's CoOp new and H


def test_bars_have_error_bars_where_there_is_a_std_and_a_legend(bars):
    root = bars[1]
    stds = [s for _, group in GROUPS for triple in group.values() for _, s in triple if s]
    assert len(_all(root, "line", "errorbar")) == len(stds) == 5
    assert [e.text for e in _all(root, "text", "legend")] == ["zero-shot CLIP", "CoOp", "CoCoOp"]
    legend = [r.get("fill") for r in _all(root, "rect", "legend")]
    assert len(set(legend)) == 3
    assert {r.get("fill") for r in _all(root, "rect", "bar")} == set(legend)
    for label in ("Base to new", "ImageNet", "EuroSAT", "Accuracy (%)"):
        assert _texts(root).count(label) == 1
    assert [e.text for e in _all(root, "text", "xtick")] == ["Base", "New", "H"] * 2


def _ink(png, svg_text, pad=(80, 16)):
    """The box of the dark pixels around a text of the SVG, in the PNG (2x): (width, height) or None."""
    x, y = float(svg_text.get("x")) * plots.SCALE, float(svg_text.get("y")) * plots.SCALE
    region = Image.open(png).convert("L").crop((int(x - pad[0]), int(y - 3 * pad[1]), int(x + pad[0]),
                                                int(y + pad[1])))
    box = region.point(lambda v: 255 if v < 128 else 0).getbbox()
    return None if box is None else (box[2] - box[0], box[3] - box[1])


def test_the_png_has_readable_text_where_the_svg_has_it(few_shot):
    png = few_shot[0][0]
    (title,) = [t for t in _all(few_shot[1], "text", "title") if t.text == "Caltech101"]
    width, height = _ink(png, title)
    assert height >= 18 and width >= 100, (width, height)           # a 15 px font at 2x, not 8 px text
    (shots,) = [t for t in _all(few_shot[1], "text", "axis-title") if t.text.startswith("Number")]
    assert _ink(png, shots, pad=(300, 14))[0] >= 500                 # spaces kept: words not squeezed
    empty = Image.open(png).convert("L").crop((0, Image.open(png).height - 6, 200, Image.open(png).height))
    assert empty.getextrema() == (255, 255)                           # a white margin, nothing cut


def test_without_freetype_the_png_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(plots.features, "check", lambda name: False)
    plots._font.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no FreeType"):
            paths = plots.few_shot_figure(_panels()[:1], str(tmp_path / "plain"))
    finally:
        plots._font.cache_clear()
    assert Image.open(paths[0]).getextrema() != ((255, 255),) * 3
    assert "Caltech101" in _texts(_svg(paths[1]))


def test_bad_input_is_refused_where_it_enters(tmp_path):
    with pytest.raises(ValueError, match="no panels"):
        plots.few_shot_figure([], str(tmp_path / "x"))
    with pytest.raises(ValueError, match=r"\['CoCoOp'\] are in the groups but not in names"):
        plots.bars_figure(GROUPS, ["zero-shot CLIP", "CoOp"], str(tmp_path / "x"))
    nan = plots.Panel("d", [plots.Curve("CoOp", {1: (float("nan"), None, True)})], [])
    with pytest.raises(ValueError, match="not a finite number"):
        plots.few_shot_figure([nan], str(tmp_path / "x"))


def test_dashes_follow_svgs_dasharray_across_corners():
    pieces = plots._dashes([(0, 0), (10, 0), (10, 10)])              # 7 on, 4 off: 0-7, 11-18 (a corner)
    assert pieces == [[(0, 0), (7, 0)], [(10, 1), (10, 8)]]
