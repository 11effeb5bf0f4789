"""The offline demo world: procedural images with captions, and a few-shot benchmark drawn from it.

No real CLIP weights or datasets can be downloaded on an air-gapped machine, so the project makes
its own: a tiny CLIP pre-trained on captioned images of this world (weights/pretrain_tiny.py), and a
classification benchmark in the official CoOp split-file layout, so `--data` reads it through the
real data path. Everything is seeded and deterministic: the same seed gives the same pixels and
words (on one machine and Pillow version).

The world. An image (32x32 RGB, drawn at 4x and box-downsampled, so edges are anti-aliased) shows
1-3 identical objects on a plain background:

    shape       circle, square, triangle, star, ring, cross, diamond, heart
    colour      red, orange, yellow, green, blue, purple, pink, brown  (jittered in RGB)
    texture     solid, striped, dotted, checkered  (the colour with a darker second shade)
    size        small, large  (relative to the count)
    count       one, two, three
    position    center, left, right, top, bottom  (one object only)
    background  black, white, grey
    style       photo (filled, light grain), sketch (outline only, no texture),
                painting (blotchy colour, blurred)

Captions describe a random subset of the attributes in varied phrasings: "a red striped circle",
"two small blue squares on a black background", "a sketch of a pink heart at the top", "a photo of
three large dotted yellow stars". Shape and count are always said, colour nearly always.

The benchmark ("Demo"): 36 classes, colour x shape over 6 colours and 6 shapes, named "red circle",
"blue star", ... Labels interleave the combinations so that base (labels 0-17) and new (18-35) each
hold every colour and every shape three times: new classes are new combinations of known words.
The domain shift: pre-training captions are mostly photos (70%) of one solid object, while the
benchmark is mostly sketches and paintings (40% each) of textured objects, often two or three of
them, so a class name in a generic prompt ("a photo of a red circle.") describes its images only in
part. Hand-written prompts are thus not optimal, but the class words themselves are well known.
Per class: 24 train, 8 val, 30 test images.

    caption_corpus(n, seed)           -> (images, captions) for contrastive pre-training
    benchmark_split(split, seed=0)    -> [(image, label, classname)] in memory
    write_benchmark(root, seed=0)     -> <root>/coop_demo/ with split_zhou_Demo.json and images/
    materialize_demo(cache_dir)       -> the same, written once, atomically
"""
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RESOLUTION = 32
_SS = 4                      # supersampling factor: draw at 128 px, box-downsample to 32
_S = RESOLUTION * _SS

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "heart")
COLOURS = {"red": (215, 35, 35), "orange": (240, 130, 20), "yellow": (235, 215, 30), "green": (40, 160, 60),
           "blue": (40, 80, 215), "purple": (130, 50, 180), "pink": (240, 120, 185), "brown": (125, 75, 35)}
TEXTURES = ("solid", "striped", "dotted", "checkered")
SIZES = ("small", "large")
POSITIONS = ("center", "left", "right", "top", "bottom")
BACKGROUNDS = {"black": (22, 22, 26), "white": (236, 236, 232), "grey": (128, 128, 128)}
STYLES = ("photo", "sketch", "painting")

VERSION = 1                  # bump when a change to this file changes the benchmark's pixels
DATASET_NAME = "Demo"
FOLDER = "coop_demo"
BENCHMARK_SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
BENCHMARK_COLOURS = ("red", "yellow", "green", "blue", "purple", "pink")
SPLIT_SIZES = {"train": 24, "val": 8, "test": 30}

# attribute distributions (weights in the order of the tuples above): the domain shift lives here
_PRETRAIN = {"texture": (55, 15, 15, 15), "count": (70, 20, 10), "style": (70, 15, 15)}
_BENCHMARK = {"texture": (10, 30, 30, 30), "count": (40, 30, 30), "style": (20, 40, 40)}

_PLURAL = {"cross": "crosses"}
_NUMBER = {1: "a", 2: "two", 3: "three"}
_POSITION_PHRASE = {"center": "in the center", "left": "on the left", "right": "on the right",
                    "top": "at the top", "bottom": "at the bottom"}
_CENTRES = {"center": (0.5, 0.5), "left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7)}
# object radius (fraction of the image) by count and size: "large" is relative to the count
_RADIUS = {(1, "small"): (0.13, 0.17), (1, "large"): (0.28, 0.36), (2, "small"): (0.10, 0.13),
           (2, "large"): (0.17, 0.21), (3, "small"): (0.09, 0.11), (3, "large"): (0.14, 0.17)}


@dataclass(frozen=True)
class Scene:
    """What an image shows; the renderer adds the continuous jitter (exact places, angles, shades)."""
    shape: str
    colour: str
    texture: str = "solid"
    size: str = "small"
    count: int = 1
    position: str = "center"
    background: str = "black"
    style: str = "photo"


# ----------------------------------------------------------------------------------------------
# public API


def classnames():
    """The 36 benchmark class names in label order (base = the first 18, new = the rest)."""
    combos = [(s, c) for s in range(len(BENCHMARK_SHAPES)) for c in range(len(BENCHMARK_COLOURS))]
    base = [sc for sc in combos if sum(sc) % 2 == 0]    # a checkerboard: every shape and colour
    new = [sc for sc in combos if sum(sc) % 2 == 1]     # appears in both halves, 3 times each
    return [f"{BENCHMARK_COLOURS[c]} {BENCHMARK_SHAPES[s]}" for s, c in base + new]


def caption_corpus(n, seed, shape_only=False):
    """n pre-training pairs: (list of n 32x32 RGB PIL images, list of n captions). With shape_only
    the caption is the shape's name alone ("star"), for the first phase of pre-training."""
    images, captions = [], []
    for i in range(n):
        rng = random.Random(f"corpus/{seed}/{i}")
        scene = _sample_scene(rng, _PRETRAIN)
        images.append(render(scene, rng))
        captions.append(scene.shape if shape_only else caption(scene, rng))
    return images, captions


def benchmark_split(split, seed=0, per_class=None):
    """One split of the benchmark in memory: [(PIL image, label, classname)], classes in label order."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLIT_SIZES)}")
    per_class = SPLIT_SIZES[split] if per_class is None else per_class
    items = []
    for label, name in enumerate(classnames()):
        colour, shape = name.split(" ")
        for i in range(per_class):
            rng = random.Random(f"benchmark/{seed}/{split}/{label}/{i}")
            scene = _sample_scene(rng, _BENCHMARK, shape=shape, colour=colour)
            items.append((render(scene, rng), label, name))
    return items


def write_benchmark(root, seed=0):
    """Write the benchmark as <root>/coop_demo/{split_zhou_Demo.json, images/<class>/<split>_NNN.png}."""
    folder = Path(root) / FOLDER
    splits = {}
    for split in SPLIT_SIZES:
        rows = []
        for n, (image, label, name) in enumerate(benchmark_split(split, seed)):
            rel = f"{name.replace(' ', '_')}/{split}_{n:05d}.png"
            path = folder / "images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, optimize=False)
            rows.append([rel, label, name])
        splits[split] = rows
    (folder / f"split_zhou_{DATASET_NAME}.json").write_text(json.dumps(splits, indent=1))
    return folder


def materialize_demo(cache_dir, seed=0):
    """The benchmark folder under cache_dir, written on first use (atomically: a temp dir, then a
    rename). The folder name carries VERSION, so a cache from an older world is never reused."""
    cache_dir = Path(cache_dir)
    target = cache_dir / f"{FOLDER}_v{VERSION}_seed{seed}"
    if (target / f"split_zhou_{DATASET_NAME}.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=cache_dir))
    try:
        os.replace(write_benchmark(tmp, seed), target)
    except OSError:  # another process won the race: keep its copy
        if not (target / f"split_zhou_{DATASET_NAME}.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------
# scenes and captions


def _sample_scene(rng, dist, shape=None, colour=None):
    count = rng.choices((1, 2, 3), dist["count"])[0]
    return Scene(
        shape=shape or rng.choice(SHAPES),
        colour=colour or rng.choice(list(COLOURS)),
        texture=rng.choices(TEXTURES, dist["texture"])[0],
        size=rng.choice(SIZES),
        count=count,
        position=rng.choice(POSITIONS) if count == 1 else "center",
        background=rng.choice(list(BACKGROUNDS)),
        style=rng.choices(STYLES, dist["style"])[0])


def caption(scene, rng):
    """A caption that says the shape and count, and a random subset of the other attributes."""
    adjectives = []
    if rng.random() < 0.5:
        adjectives.append(scene.size)
    colour = [scene.colour] if rng.random() < 0.9 else []
    texture = []
    if scene.style != "sketch" and (scene.texture != "solid" and rng.random() < 0.7 or rng.random() < 0.05):
        texture = [scene.texture]
    adjectives += colour + texture if rng.random() < 0.6 else texture + colour
    noun = scene.shape if scene.count == 1 else _PLURAL.get(scene.shape, scene.shape + "s")
    number = _NUMBER[scene.count]
    if number == "a" and adjectives and adjectives[0][0] in "aeiou":
        number = "an"
    text = " ".join([number, *adjectives, noun])
    if scene.count == 1 and rng.random() < 0.4:
        text += " " + _POSITION_PHRASE[scene.position]
    if rng.random() < 0.5:
        text += f" on a {scene.background} background"
    if rng.random() < (0.5 if scene.style == "photo" else 0.9):
        text = f"a {scene.style} of {text}"
    return text


# ----------------------------------------------------------------------------------------------
# rendering


def render(scene, rng):
    """Draw a Scene as a 32x32 RGB image, with jitter drawn from rng (a random.Random)."""
    np_rng = np.random.default_rng(rng.getrandbits(64))
    background = Image.new("RGB", (_S, _S), _jitter(BACKGROUNDS[scene.background], rng, 10))
    colour = _jitter(COLOURS[scene.colour], rng, 18)
    mask = Image.new("L", (_S, _S), 0)
    r = rng.uniform(*_RADIUS[scene.count, scene.size])
    for cx, cy in _centres(scene, r, rng):
        _draw_shape(ImageDraw.Draw(mask), scene.shape, cx * _S, cy * _S, r * _S, rng.uniform(-0.3, 0.3))
    if scene.style == "sketch":  # keep only a band ~1.5 px wide (at 32 px) inside the edge
        inside = mask.filter(ImageFilter.BoxBlur(6)).point(lambda v: 255 if v > 254 else 0)  # 13x13 erosion
        mask.paste(0, mask=inside)
    texture = "solid" if scene.style == "sketch" else scene.texture
    image = Image.composite(_texture(texture, colour, rng), background, mask)
    if scene.style == "painting":  # low-frequency colour blotches, then a soft blur
        blotches = _upsample(np_rng.normal(0, 14, (6, 6, 3)))                 # (S, S, 3)
        image = Image.fromarray(np.clip(np.asarray(image, np.float32) + blotches, 0, 255).astype(np.uint8))
        image = image.filter(ImageFilter.GaussianBlur(4))
    image = image.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)
    if scene.style == "photo":  # light sensor grain
        grain = np_rng.normal(0, 4, (RESOLUTION, RESOLUTION, 3))
        image = Image.fromarray(np.clip(np.asarray(image, np.float32) + grain, 0, 255).astype(np.uint8))
    return image


def _jitter(rgb, rng, amount):
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)


def _upsample(noise):
    """(h, w, 3) float noise -> (S, S, 3), bicubic, one channel at a time (PIL mode F)."""
    return np.stack([np.asarray(Image.fromarray(noise[..., k].astype(np.float32)).resize(
        (_S, _S), Image.Resampling.BICUBIC)) for k in range(3)], axis=-1)


def _centres(scene, r, rng):
    """Object centres in [0, 1]^2 that keep every object inside the image and apart from the others."""
    lo, hi = r + 0.02, 1 - r - 0.02
    if scene.count == 1:
        cx, cy = _CENTRES[scene.position]
        return [(min(hi, max(lo, cx + rng.uniform(-0.04, 0.04))), min(hi, max(lo, cy + rng.uniform(-0.04, 0.04))))]
    for _ in range(200):
        centres = [(rng.uniform(lo, hi), rng.uniform(lo, hi)) for _ in range(scene.count)]
        if all(math.dist(a, b) > 2.1 * r for i, a in enumerate(centres) for b in centres[:i]):
            return centres
    raise RuntimeError(f"cannot place {scene.count} objects of radius {r:.2f}")  # radii are chosen so it can


def _draw_shape(draw, shape, cx, cy, r, angle):
    """Draw one filled shape of radius r (pixels) centred at (cx, cy), rotated by angle (radians)."""
    def poly(points):  # points in units of r around the centre, rotated by angle
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points], fill=255)

    def disc(x, y, radius, fill=255):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill)

    if shape == "circle":
        disc(cx, cy, r)
    elif shape == "ring":
        disc(cx, cy, r)
        disc(cx, cy, 0.55 * r, fill=0)
    elif shape == "square":
        poly([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])
    elif shape == "diamond":
        poly([(0, -1), (0.65, 0), (0, 1), (-0.65, 0)])
    elif shape == "triangle":
        poly([(0, -1), (0.95, 0.7), (-0.95, 0.7)])
    elif shape == "star":
        poly([(rad * math.sin(k * math.pi / 5), -rad * math.cos(k * math.pi / 5))
              for k, rad in zip(range(10), [1, 0.45] * 5)])
    elif shape == "cross":
        a, b = 0.3, 0.95
        poly([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)])
    elif shape == "heart":
        c, s = math.cos(angle), math.sin(angle)
        for x in (-0.45, 0.45):  # two lobes and a point, rotated together
            disc(cx + r * (x * c + 0.3 * s), cy + r * (x * s - 0.3 * c), 0.52 * r)
        poly([(-0.93, -0.15), (0.93, -0.15), (0, 0.95)])
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


def _texture(texture, colour, rng):
    """(S, S) RGB fill: the colour, patterned with a darker shade of itself at a random phase."""
    fill = Image.new("RGB", (_S, _S), colour)
    if texture != "solid":
        if texture not in _PATTERNS:
            raise ValueError(f"unknown texture {texture!r}; use one of {TEXTURES}")
        pattern = rng.choice(_PATTERNS[texture])
        x, y = rng.randrange(_S), rng.randrange(_S)
        fill.paste(tuple(int(0.4 * v) for v in colour), mask=pattern.crop((x, y, x + _S, y + _S)))
    return fill


def _make_patterns():
    """Binary masks twice the canvas size, cropped at a random offset per image (periods at 32 px:
    stripes 4 px in four directions, dots 6 px apart, checkers of 4 px)."""
    y, x = np.mgrid[0:2 * _S, 0:2 * _S].astype(np.float32)
    stripes = [((x * dx + y * dy) / 16) % 1 < 0.5 for dx, dy in [(1, 0), (0, 1), (0.71, 0.71), (0.71, -0.71)]]
    dots = [(x % 24 - 12) ** 2 + (y % 24 - 12) ** 2 < 6 ** 2]
    checkers = [(x // 16 + y // 16) % 2 == 1]
    as_image = lambda masks: [Image.fromarray(m.astype(np.uint8) * 255) for m in masks]
    return {"striped": as_image(stripes), "dotted": as_image(dots), "checkered": as_image(checkers)}


_PATTERNS = _make_patterns()
