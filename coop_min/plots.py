"""The papers' figures without a plotting library: CoOp's Figure 3 (accuracy against shots, a panel per
dataset and the Average) and base-to-new bars (CoCoOp's Table 1 as a figure), each written twice from one
drawing: stem.png (Pillow) and stem.svg (text, to scale in a paper).

A figure is drawn on a canvas with two implementations of the same few calls (line, circle, rect, star,
text): `_Svg` writes one element per call (<line>, <polyline>, <circle>, <rect>, <polygon>, <text> in
font-family sans-serif), each with a class naming what it draws (frame, grid, point, errorbar, cap, bar,
star, ...); `_Png` draws the same calls with ImageDraw at SCALE times the SVG's size. Coordinates are
the SVG's px. Text is Pillow's FreeType font at the given size; a Pillow without FreeType gets its
small bitmap font and a warning.

Few-shot panels: the Average first, as CoOp's Figure 3, then the others in the order given, `columns`
to a row, one legend above them and the axis titles under and left of the grid. x: shots 0 (zero-shot
CLIP, a star), 1, 2, 4, 8, 16 evenly spaced (log2, the paper's ticks). y: from the lowest to the highest
value drawn (mean - std to mean + std, zero-shot means), widened to whole ticks 1, 2, 5, 10 or 20
points apart (the first giving at most six intervals); the lowest and highest ticks are the plot box's
bottom and top edges, so a value v sits at bottom - (v - lo) / (hi - lo) * height. Error bars are one
std; a point over fewer seeds than the fullest (complete False) is hollow, and the legend says so.
Bars: a panel per dataset, base / new / H, a bar per method (the same slot in every panel); y from 0 to
100 with ticks every 20 (the box's bottom and top). An std of None or 0 draws no error bar.
"""
import math
import warnings
from functools import lru_cache
from html import escape
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFont, features

SCALE = 2                                   # PNG pixels per SVG px
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f")            # a colour per legend name, in order
SHOTS = (0, 1, 2, 4, 8, 16)                 # the paper's x ticks; 0 is zero-shot CLIP
Y_TITLE = "Score (%)"                       # CoOp's Figure 3
BAR_TITLE = "Base-to-new generalization: base and new classes, and their harmonic mean H"
BAR_Y_TITLE = "Accuracy (%)"
X_TITLE = "Number of labeled training examples per class"
HOLLOW = "hollow: fewer seeds than the fullest point"
BAR_METRICS = ("Base", "New", "H")
_TICK, _TEXT, _TITLE = 12, 13, 15           # font sizes, px
_CELL = (300, 236)                          # one panel: title, tick labels and plot box
_BOX = (46, 30, 14, 24)                     # the plot box in a cell: left, top, right, bottom margins
_MARGIN = 14
_Y_STRIP = 26                               # left of the grid, for the y title
_X_STRIP = 30                               # under the grid, for the x title


class Curve(NamedTuple):
    name: str
    points: dict                            # {shots: (mean, std or None, complete)}
    dashed: bool = False                    # e.g. linear-probe CLIP


class Panel(NamedTuple):
    title: str                              # a dataset's name, or "Average"
    curves: list                            # [Curve]
    zero_shot: list                         # [(name, mean)]: a star at shots 0


# ----------------------------------------------------------------------------------------------
# two canvases, one set of calls


@lru_cache(maxsize=None)
def _font(px):
    """Pillow's FreeType font at `px` pixels (Pillow >= 10.1), else DejaVu Sans; Pillow's bitmap font,
    which ignores the size, with a warning when neither is there."""
    if features.check("freetype2"):
        try:
            return ImageFont.load_default(size=px)
        except TypeError:                   # Pillow < 10.1
            try:
                return ImageFont.truetype("DejaVuSans.ttf", px)
            except OSError:
                pass
    warnings.warn("coop_min.plots: Pillow has no FreeType font; the PNG's text is Pillow's small bitmap "
                  "font (the SVG is not affected). Install Pillow >= 10.1 with FreeType.")
    return ImageFont.load_default_imagefont()


def _width(text, size):
    """The text's width in px (the PNG's font; a sans-serif of the SVG's viewer is about as wide)."""
    return _font(round(size * SCALE)).getlength(text) / SCALE


def _star(x, y, r):
    """A five-pointed star's ten corners, the first pointing up, every other one 0.42 r from the centre."""
    radii = [r if i % 2 == 0 else 0.42 * r for i in range(10)]
    angles = [math.pi * i / 5 for i in range(10)]
    return [(x + d * math.sin(a), y - d * math.cos(a)) for d, a in zip(radii, angles)]


def _dashes(points, on=7.0, off=4.0):
    """The drawn pieces [(p, q)] of a polyline dashed as SVG's stroke-dasharray "7 4" dashes it: the
    pattern runs on along the whole line, across its corners."""
    pieces = []
    done = 0.0                              # the length of the line before this segment
    for p, q in zip(points, points[1:]):
        length = math.dist(p, q)
        start = math.floor(done / (on + off)) * (on + off)
        while length and start < done + length:
            a = max(start - done, 0) / length
            b = min(start + on - done, length) / length
            if b > a:
                pieces.append([(p[0] + (q[0] - p[0]) * t, p[1] + (q[1] - p[1]) * t) for t in (a, b)])
            start += on + off
        done += length
    return pieces


def _n(v):
    return f"{v:.2f}"


class _Svg:
    suffix = ".svg"

    def __init__(self, width, height):
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                      f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
                      f'<rect class="background" width="{width}" height="{height}" fill="white"/>']

    def _add(self, tag, kind, attrs, text=None):
        pairs = " ".join(f'{k}="{v}"' for k, v in attrs.items() if v is not None)
        end = f">{escape(text)}</{tag}>" if text is not None else "/>"
        self.parts.append(f'<{tag} class="{kind}" {pairs}{end}')

    def line(self, points, colour, width=1.0, dashed=False, kind="line"):
        style = {"fill": "none", "stroke": colour, "stroke-width": width,
                 "stroke-dasharray": "7 4" if dashed else None}
        if len(points) == 2:
            (x1, y1), (x2, y2) = points
            self._add("line", kind, {"x1": _n(x1), "y1": _n(y1), "x2": _n(x2), "y2": _n(y2), **style})
        else:
            self._add("polyline", kind, {"points": " ".join(f"{_n(x)},{_n(y)}" for x, y in points), **style})

    def circle(self, x, y, r, colour, filled=True, kind="point"):
        self._add("circle", kind, {"cx": _n(x), "cy": _n(y), "r": r, "fill": colour if filled else "white",
                                   "stroke": colour, "stroke-width": 1.5})

    def rect(self, box, fill="none", outline=None, kind="rect"):
        x0, y0, x1, y1 = box
        self._add("rect", kind, {"x": _n(x0), "y": _n(y0), "width": _n(x1 - x0), "height": _n(y1 - y0),
                                 "fill": fill, "stroke": outline})

    def star(self, x, y, r, colour, kind="star"):
        corners = " ".join(f"{_n(a)},{_n(b)}" for a, b in _star(x, y, r))
        style = {"fill": colour, "stroke": "black", "stroke-width": 0.6}
        self._add("polygon", kind, {"points": corners, **style})

    def text(self, x, y, text, size, anchor="middle", vertical=False, kind="text"):
        """`text` centred vertically on y; `anchor` start, middle or end at x; vertical: read upwards."""
        turn = None
        if vertical:                        # the baseline 0.36 size right of x, turned to read upwards
            x += 0.36 * size
            turn = f"rotate(-90 {_n(x)} {_n(y)})"
        else:                               # the baseline 0.36 size under y
            y += 0.36 * size
        self._add("text", kind, {"x": _n(x), "y": _n(y), "font-size": size, "text-anchor": anchor,
                                 "transform": turn}, text)

    def save(self, path):
        with open(path, "w") as f:
            f.write("\n".join(self.parts + ["</svg>"]) + "\n")


class _Png:
    suffix = ".png"

    def __init__(self, width, height):
        self.img = Image.new("RGB", (width * SCALE, height * SCALE), "white")
        self.draw = ImageDraw.Draw(self.img)

    def line(self, points, colour, width=1.0, dashed=False, kind="line"):
        w = max(1, round(width * SCALE))
        for piece in _dashes(points) if dashed else [points]:
            self.draw.line([(x * SCALE, y * SCALE) for x, y in piece], fill=colour, width=w, joint="curve")

    def circle(self, x, y, r, colour, filled=True, kind="point"):
        box = [(x - r) * SCALE, (y - r) * SCALE, (x + r) * SCALE, (y + r) * SCALE]
        self.draw.ellipse(box, fill=colour if filled else "white", outline=colour, width=round(1.5 * SCALE))

    def rect(self, box, fill="none", outline=None, kind="rect"):
        x0, y0, x1, y1 = (v * SCALE for v in box)
        if y1 - y0 >= 1 and x1 - x0 >= 1:
            self.draw.rectangle([x0, y0, x1, y1], fill=None if fill == "none" else fill, outline=outline)

    def star(self, x, y, r, colour, kind="star"):
        self.draw.polygon([(a * SCALE, b * SCALE) for a, b in _star(x, y, r)], fill=colour, outline="black")

    def text(self, x, y, text, size, anchor="middle", vertical=False, kind="text"):
        font = _font(round(size * SCALE))
        if not vertical:
            where = {"start": "lm", "middle": "mm", "end": "rm"}[anchor]
            self.draw.text((x * SCALE, y * SCALE), text, fill="black", font=font, anchor=where)
            return
        w = math.ceil(font.getlength(text)) + 4
        h = round(size * SCALE * 1.4)
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).text((w / 2, h / 2), text, fill=255, font=font, anchor="mm")
        mask = mask.rotate(90, expand=True)
        self.img.paste("black", (round(x * SCALE - h / 2), round(y * SCALE - w / 2)), mask)

    def save(self, path):
        self.img.save(path)


def _write(stem, size, draw):
    """Draw the figure on both canvases; write stem.png and stem.svg; their paths."""
    paths = []
    for canvas in (_Png(*size), _Svg(*size)):
        draw(canvas)
        canvas.save(stem + canvas.suffix)
        paths.append(stem + canvas.suffix)
    return paths


# ----------------------------------------------------------------------------------------------
# what both figures share: legend, axes, the grid of panels


def _fit(text, size, width):
    """The font size, at most `size`, at which `text` fits `width` (with room for a wider SVG font)."""
    while size > 8 and _width(text, size) * 1.1 > width:
        size -= 1
    return size


def _legend_rows(items, width):
    """[(name, colour, swatch)] in rows that fit `width`: [(row width, [(x offset, item)])]."""
    rows = [[0, []]]
    for item in items:
        w = 32 + _width(item[0], _TEXT) * 1.1
        if rows[-1][1] and rows[-1][0] + 18 + w > width:
            rows.append([0, []])
        x = rows[-1][0] + (18 if rows[-1][1] else 0)
        rows[-1][1].append((x, item))
        rows[-1][0] = x + w
    return rows


def _legend(canvas, rows, left, top, width):
    for r, (row_width, row) in enumerate(rows):
        y = top + 11 + 22 * r
        for x, (name, colour, swatch) in row:
            x += left + (width - row_width) / 2
            if swatch == "bar":
                canvas.rect((x + 3, y - 6, x + 23, y + 6), fill=colour, kind="legend")
            elif swatch == "star":
                canvas.star(x + 13, y, 8, colour, kind="legend")
            elif swatch == "hollow":
                canvas.circle(x + 13, y, 4, "#555555", filled=False, kind="legend")
            else:
                canvas.line([(x, y), (x + 26, y)], colour, 2, dashed=swatch == "dashed", kind="legend")
                canvas.circle(x + 13, y, 3.5, colour, kind="legend")
            canvas.text(x + 32, y, name, _TEXT, anchor="start", kind="legend")


def _ticks(values, steps=(1, 2, 5, 10, 20)):
    """(lo, hi, step): the y axis, whole ticks around the values (see the module's docstring)."""
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"plots: cannot draw {values}: a mean or std is not a finite number")
    low, high = min(values), max(values)
    for step in steps:
        lo, hi = math.floor(low / step) * step, math.ceil(high / step) * step
        if (hi - lo) / step <= 6:
            break
    return lo, max(hi, lo + step), step


class _Axes(NamedTuple):
    box: tuple                              # the plot box: left, top, right, bottom (px)
    lo: float                               # y at the box's bottom and top
    hi: float
    x_lo: float                             # x (a position on the axis) at the box's left and right
    x_hi: float

    def x(self, position):
        left, _, right, _ = self.box
        return left + (position - self.x_lo) / (self.x_hi - self.x_lo) * (right - left)

    def y(self, value):
        _, top, _, bottom = self.box
        return bottom - (value - self.lo) / (self.hi - self.lo) * (bottom - top)


def _frame(canvas, ax, step, title):
    """Grid lines and labels at the y ticks, the box, and the panel's title above it."""
    left, top, right, bottom = ax.box
    for i in range(round((ax.hi - ax.lo) / step) + 1):
        v = ax.lo + i * step
        canvas.line([(left, ax.y(v)), (right, ax.y(v))], "#dddddd", 0.8, kind="grid")
        canvas.text(left - 5, ax.y(v), f"{v:g}", _TICK, anchor="end", kind="ytick")
    canvas.rect(ax.box, outline="black", kind="frame")
    canvas.text((left + right) / 2, top - 14, title, _fit(title, _TITLE, right - left), kind="title")


def _error_bar(canvas, ax, x, mean, std, colour):
    """One std above and below the mean; nothing for None or 0."""
    if not std:
        return
    y_low, y_high = ax.y(mean - std), ax.y(mean + std)
    canvas.line([(x, y_low), (x, y_high)], colour, 1.2, kind="errorbar")
    for y in (y_low, y_high):
        canvas.line([(x - 3, y), (x + 3, y)], colour, 1.2, kind="cap")


def _grid(count, columns, legend_items, above):
    """(columns, rows, legend rows, grid top, figure size) of `count` panels under `above` px of title."""
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    width = 2 * _MARGIN + _Y_STRIP + columns * _CELL[0]
    legend = _legend_rows(legend_items, width - 2 * _MARGIN)
    top = _MARGIN + above + 22 * len(legend) + 6
    return columns, rows, legend, top, (width, top + rows * _CELL[1] + _X_STRIP + _MARGIN)


def _box(i, columns, top):
    """The plot box (left, top, right, bottom) of the i-th panel of a grid starting at `top`."""
    left = _MARGIN + _Y_STRIP + (i % columns) * _CELL[0]
    top += (i // columns) * _CELL[1]
    return (left + _BOX[0], top + _BOX[1], left + _CELL[0] - _BOX[2], top + _CELL[1] - _BOX[3])


# ----------------------------------------------------------------------------------------------
# CoOp's Figure 3: accuracy against shots


def _position(shots):
    """Where `shots` sits on the x axis: 0 for zero-shot, then log2 spaced (1 -> 1, 2 -> 2, 4 -> 3, ...)."""
    return 0.0 if shots == 0 else math.log2(shots) + 1


def _shots_panel(canvas, panel, box, colours):
    points = [(c, k, p) for c in panel.curves for k, p in sorted(c.points.items())]
    values = [m + sign * (s or 0) for _, _, (m, s, _) in points for sign in (-1, 1)]
    values += [m for _, m in panel.zero_shot]
    lo, hi, step = _ticks(values or [0, 100])
    shots = sorted(set(SHOTS) | {k for _, k, _ in points})
    ax = _Axes(box, lo, hi, -0.4, _position(shots[-1]) + 0.4)
    _frame(canvas, ax, step, panel.title)
    for k in shots:
        x = ax.x(_position(k))
        canvas.line([(x, ax.box[3]), (x, ax.box[3] - 4)], "black", 1, kind="xtick")
        canvas.text(x, ax.box[3] + 11, f"{k:g}", _TICK, kind="xtick")
    for curve in panel.curves:
        xy = [(ax.x(_position(k)), ax.y(m)) for k, (m, _, _) in sorted(curve.points.items())]
        if len(xy) > 1:
            canvas.line(xy, colours[curve.name], 1.8, dashed=curve.dashed, kind="curve")
    for curve, k, (m, s, _) in points:
        _error_bar(canvas, ax, ax.x(_position(k)), m, s, colours[curve.name])
    for curve, k, (m, _, complete) in points:
        canvas.circle(ax.x(_position(k)), ax.y(m), 3.5, colours[curve.name], filled=complete)
    for name, m in panel.zero_shot:
        canvas.star(ax.x(0), ax.y(m), 8, colours[name])


def few_shot_figure(panels, stem, columns=4):
    """CoOp's Figure 3: a panel per Panel, the Average first, `columns` to a row; writes stem.png and
    stem.svg and returns their paths. Each curve name and zero-shot name has one colour in every panel."""
    if not panels:
        raise ValueError("few_shot_figure: no panels to draw; pass at least one plots.Panel")
    panels = sorted(panels, key=lambda p: p.title != "Average")
    names = list(dict.fromkeys(c.name for p in panels for c in p.curves))
    stars = list(dict.fromkeys(n for p in panels for n, _ in p.zero_shot if n not in names))
    colours = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names + stars)}
    dashed = {c.name for p in panels for c in p.curves if c.dashed}
    items = [(n, colours[n], "dashed" if n in dashed else "line") for n in names]
    items += [(n, colours[n], "star") for n in stars]
    if any(not c for p in panels for curve in p.curves for _, _, c in curve.points.values()):
        items.append((HOLLOW, "#555555", "hollow"))
    columns, rows, legend, top, size = _grid(len(panels), columns, items, 0)
    grid_left = _MARGIN + _Y_STRIP

    def draw(canvas):
        _legend(canvas, legend, _MARGIN, _MARGIN, size[0] - 2 * _MARGIN)
        for i, panel in enumerate(panels):
            _shots_panel(canvas, panel, _box(i, columns, top), colours)
        middle = grid_left + (columns * _CELL[0] + _BOX[0] - _BOX[2]) / 2
        bottom = top + rows * _CELL[1]
        canvas.text(middle, bottom + _X_STRIP / 2, X_TITLE, _fit(X_TITLE, _TEXT, size[0]), kind="axis-title")
        canvas.text(_MARGIN + 8, top + rows * _CELL[1] / 2, Y_TITLE, _TEXT, vertical=True, kind="axis-title")
    return _write(stem, size, draw)


# ----------------------------------------------------------------------------------------------
# base-to-new: bars from zero


def _bars_panel(canvas, dataset, values, names, box, colours):
    tops = [m + (s or 0) for triple in values.values() for m, s in triple]
    hi = max(100, _ticks([0, *tops], steps=(20,))[1])
    ax = _Axes(box, 0, hi, 0, len(BAR_METRICS))
    _frame(canvas, ax, 20, dataset)
    bar = min(16.0, (ax.x(1) - ax.x(0) - 12) / len(names))
    for j, metric in enumerate(BAR_METRICS):
        start = ax.x(j + 0.5) - bar * len(names) / 2
        canvas.text(ax.x(j + 0.5), ax.box[3] + 11, metric, _TICK, kind="xtick")
        for i, name in enumerate(names):
            if name not in values:
                continue
            m, s = values[name][j]
            x0 = start + i * bar
            canvas.rect((x0 + 0.5, ax.y(m), x0 + bar - 0.5, ax.y(0)), fill=colours[name], kind="bar")
            _error_bar(canvas, ax, x0 + bar / 2, m, s, "black")


def bars_figure(groups, names, stem, title=BAR_TITLE, columns=4):
    """Base / new / H bars from zero, a panel per dataset, `columns` to a row; writes stem.png and
    stem.svg and returns their paths. groups: [(dataset, {name: (base, new, H)})], each a (mean, std or
    None); names: every name in the groups, in legend (and bar) order."""
    if not groups:
        raise ValueError("bars_figure: no groups to draw; pass [(dataset, {name: (base, new, H)})]")
    unknown = sorted({n for _, values in groups for n in values} - set(names))
    if unknown:
        raise ValueError(f"bars_figure: {unknown} are in the groups but not in names {list(names)}; add them")
    colours = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    items = [(n, colours[n], "bar") for n in names]
    columns, rows, legend, top, size = _grid(len(groups), columns, items, 28)
    size = (size[0], size[1] - _X_STRIP + 6)

    def draw(canvas):
        canvas.text(size[0] / 2, _MARGIN + 10, title, _fit(title, _TITLE + 1, size[0] - 2 * _MARGIN),
                    kind="figure-title")
        _legend(canvas, legend, _MARGIN, _MARGIN + 28, size[0] - 2 * _MARGIN)
        for i, (dataset, values) in enumerate(groups):
            _bars_panel(canvas, dataset, values, list(names), _box(i, columns, top), colours)
        canvas.text(_MARGIN + 8, top + rows * _CELL[1] / 2, BAR_Y_TITLE, _TEXT, vertical=True,
                    kind="axis-title")
    return _write(stem, size, draw)
