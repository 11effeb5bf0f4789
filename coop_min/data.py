"""Datasets: the official CoOp folder layouts, few-shot sampling, base/new classes, and loaders.

`load_dataset(root, name)` reads the layouts of CoOp's DATASETS.md. `root` is either the dataset's own
folder (.../oxford_pets) or the data root holding the official folder names; `name` is "auto", an
official NAME (or its folder name), "imagefolder", or the <Name> of a folder's split_zhou_<Name>.json.

    split files    OxfordPets OxfordFlowers StanfordCars Food101 SUN397 Caltech101
                   DescribableTextures EuroSAT UCF101: split_zhou_<NAME>.json, rows [relpath, label,
                   classname], relpath under the image folder (StanfordCars: under the dataset folder).
                   Any other folder with one split_zhou_<Name>.json: images under images/ (the demo).
    FGVCAircraft   variants.txt (class order) + images_variant_{train,val,test}.txt ("<id> <variant>").
    ImageNet       images/{train,val}/<wnid>/ + classnames.txt ("<wnid> <name>"); label = index of the
                   wnid in the sorted folders; test = the val folder; no val split (nothing reads it).
    ImageNetV2     imagenetv2-matched-frequency-format-val/<i>/: class i is line i of classnames.txt.
    ImageNetSketch images/<wnid>/; ImageNetA imagenet-a/<wnid>/; ImageNetR imagenet-r/<wnid>/: label =
                   index in the sorted folders, so A and R are 200-way. classnames.txt is read from the
                   dataset folder (DATASETS.md asks for a copy there), else from ../imagenet/.
    imagefolder    <class>/<image>: a seeded per-class 50/20/30 split (DTD's builder, see _split_folder),
                   named after its folder (.../flowers_of_my_garden -> "flowers_of_my_garden").

Test-only sets (ImageNetV2/Sketch/A/R) have only `test`. For the ImageNet family, `imagenet_labels`
maps each class to its ImageNet-1k label, so CSC prompts or 1000-way logits learned on ImageNet can
be evaluated on the 200-class A/R. Without a split file, Caltech101, DescribableTextures, EuroSAT and
Food101 fall back (with a warning) to the official builder's seeded split with its class-name fixes.

Where we differ on purpose: folder listings are sorted (the official `os.listdir` order depends on
the filesystem, so its few-shot draws on ImageNet are not reproducible across machines).

Files listed by a split file are checked up front (all of them: one stat each, as Dassl's Datum
does); one that is a folder, a broken link or missing fails with its path, what it is, and the split
file that listed it. Folder listings keep regular files only (a folder or a broken link named x.jpg
is not an image), so they exist by construction and are not stat'ed again. Every bad input raises
ValueError with one line naming the value and the fix.

Image contents are checked in two steps. `check_images` reads each file's header before training (a
file PIL cannot identify fails then, not at the test after training, or with --skip-bad-images is
dropped and counted); ImageDataset decodes the pixels and catches what only decoding finds (a
truncated file), raising or, with skip_bad, skipping and counting it.
"""
import json
import math
import os
import random
import re
import sys
import warnings
from dataclasses import dataclass, replace

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from coop_min.files import atomic_write
from coop_min.transforms import load_image  # PIL.Image, or ValueError naming the file


@dataclass(frozen=True, slots=True)
class Datum:
    path: str  # full path of the image file
    label: int
    classname: str


@dataclass
class DatasetSplits:
    name: str
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    classnames: list[str]  # label order, spelled as the official code (the prompt learner turns "_" into " ")
    root: str = ""  # the dataset folder; saved splits store paths relative to it
    imagenet_labels: list[int] | None = None  # ImageNet-1k label of each class (ImageNet family only)


# official NAME -> (folder under the data root, folder that the split file's paths are relative to)
# the official configs/datasets/<name>.yaml names (sweep's --datasets, run folders)
# -> (the loader's NAME, folder under --data)
DATASETS = {
    "imagenet": ("ImageNet", "imagenet"), "caltech101": ("Caltech101", "caltech-101"),
    "oxford_pets": ("OxfordPets", "oxford_pets"), "stanford_cars": ("StanfordCars", "stanford_cars"),
    "oxford_flowers": ("OxfordFlowers", "oxford_flowers"), "food101": ("Food101", "food-101"),
    "fgvc_aircraft": ("FGVCAircraft", "fgvc_aircraft"), "sun397": ("SUN397", "sun397"),
    "dtd": ("DescribableTextures", "dtd"), "eurosat": ("EuroSAT", "eurosat"), "ucf101": ("UCF101", "ucf101"),
    "imagenetv2": ("ImageNetV2", "imagenetv2"), "imagenet_sketch": ("ImageNetSketch", "imagenet-sketch"),
    "imagenet_a": ("ImageNetA", "imagenet-adversarial"), "imagenet_r": ("ImageNetR", "imagenet-rendition"),
    "demo": ("Demo", "coop_demo"),           # the bundled demo benchmark, the default without --data
}


def dataset_key(name):
    """The official config name of a loader NAME (OxfordPets -> oxford_pets); other names lower-cased."""
    keys = {loader: key for key, (loader, _) in DATASETS.items()}
    return keys.get(name, re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"))


_SPLIT_FILE_DATASETS = {
    "OxfordPets": ("oxford_pets", "images"),
    "OxfordFlowers": ("oxford_flowers", "jpg"),
    "StanfordCars": ("stanford_cars", ""),  # rows like cars_train/00001.jpg
    "Food101": ("food-101", "images"),
    "SUN397": ("sun397", "SUN397"),
    "Caltech101": ("caltech-101", "101_ObjectCategories"),
    "DescribableTextures": ("dtd", "images"),
    "EuroSAT": ("eurosat", "2750"),
    "UCF101": ("ucf101", "UCF-101-midframes"),
}
# the image folder of each test-only ImageNet variant, inside its dataset folder
_IMAGENET_VARIANTS = {
    "ImageNetV2": "imagenetv2-matched-frequency-format-val",
    "ImageNetSketch": "images",
    "ImageNetA": "imagenet-a",
    "ImageNetR": "imagenet-r",
}
_FOLDERS = {name: folder for name, (folder, _) in _SPLIT_FILE_DATASETS.items()} | {
    "FGVCAircraft": "fgvc_aircraft", "ImageNet": "imagenet", "ImageNetV2": "imagenetv2",
    "ImageNetSketch": "imagenet-sketch", "ImageNetA": "imagenet-adversarial",
    "ImageNetR": "imagenet-rendition",
}
# datasets whose official fallback without a split file is DTD's folder split: (ignored folders, renames)
_FOLDER_SPLIT_FIXES = {
    "Caltech101": (("BACKGROUND_Google", "Faces_easy"),
                   {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard",
                    "Motorbikes": "motorbike"}),
    "EuroSAT": ((), {"AnnualCrop": "Annual Crop Land", "Forest": "Forest",
                     "HerbaceousVegetation": "Herbaceous Vegetation Land", "Highway": "Highway or Road",
                     "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
                     "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings",
                     "River": "River", "SeaLake": "Sea or Lake"}),
    "DescribableTextures": ((), {}),
    "Food101": ((), {}),
}
# torchvision's
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_LAYOUTS = ("split_zhou_<Name>.json, FGVCAircraft variants.txt, "
            "ImageNet images/{train,val} + classnames.txt, "
            "imagenetv2-matched-frequency-format-val/, imagenet-sketch images/, imagenet-a/, imagenet-r/, "
            "class_name/image.jpg folders")


# ----------------------------------------------------------------------------------------------
# finding the dataset


def detect_dataset(root):
    """The NAME of the dataset at `root`: its own folder, or a data root holding exactly one official
    folder."""
    root = _check_dir(root)
    found = _detect_in(root)
    if not found:  # a data root: children with the official folder names
        found = [name for name, folder in _FOLDERS.items() if _detect_in(os.path.join(root, folder))]
    if not found and _looks_like_imagefolder(root):
        return "imagefolder"
    if len(found) > 1:
        raise ValueError(f"{root} holds several datasets ({', '.join(found)}); pass --dataset NAME")
    if not found:
        raise ValueError(f"no known dataset layout in {root}; "
                         f"expected one of: {_LAYOUTS} (see CoOp's DATASETS.md)")
    return found[0]


def load_dataset(root, name="auto", split_seed=1) -> DatasetSplits:
    """Read a dataset's full train/val/test splits. `split_seed` seeds only the folder splits
    (imagefolder)."""
    root = os.path.abspath(_check_dir(root))
    name = detect_dataset(root) if name == "auto" else _canonical_name(name, root)
    folder = _FOLDERS.get(name)
    d = os.path.join(root, folder) if folder and os.path.isdir(os.path.join(root, folder)) else root
    if name == "imagefolder":                # a dataset of one's own is named after its folder
        return _split_folder(d, os.path.basename(os.path.normpath(d)), split_seed)
    if name == "FGVCAircraft":
        return _read_fgvc_aircraft(d)
    if name == "ImageNet":
        return _read_imagenet(d)
    if name in _IMAGENET_VARIANTS:
        return _read_imagenet_variant(d, name)
    return _read_split_file(d, name, split_seed)


def _check_dir(root):
    if not os.path.isdir(root):
        what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise ValueError(f"data folder {root} {what}; pass --data the dataset folder or the data root")
    return root


def _canonical_name(name, root):
    if name == "imagefolder":
        return name
    for official, folder in _FOLDERS.items():
        if name.lower() in (official.lower(), folder):
            return official
    if os.path.isfile(os.path.join(root, f"split_zhou_{name}.json")):
        return name
    raise ValueError(f"unknown dataset {name!r}; use auto, imagefolder, a split_zhou_<Name>.json's Name, "
                     f"or one of {', '.join(_FOLDERS)}")


def _detect_in(d):
    if not os.path.isdir(d):
        return []
    split_files = sorted(f for f in os.listdir(d) if f.startswith("split_zhou_") and f.endswith(".json"))
    if len(split_files) > 1:
        raise ValueError(f"{d} holds several split files ({', '.join(split_files)}); "
                         "keep one, or pass --dataset NAME")
    if split_files:
        return [split_files[0][len("split_zhou_"):-len(".json")]]
    has = lambda *p: os.path.exists(os.path.join(d, *p))  # noqa: E731
    base = os.path.basename(os.path.normpath(d))
    found = [name for name, sign in [
        ("FGVCAircraft", has("variants.txt") and has("images_variant_train.txt")),
        ("ImageNet", has("images", "train") and has("images", "val")),
        ("ImageNetV2", has(_IMAGENET_VARIANTS["ImageNetV2"])),
        ("ImageNetSketch", has("images") and not has("images", "train")
         and (has("classnames.txt") or base == _FOLDERS["ImageNetSketch"])),
        ("ImageNetA", has("imagenet-a")),
        ("ImageNetR", has("imagenet-r")),
    ] if sign]
    if not found:  # an official folder without its split file (e.g. Caltech101 can be split from folders)
        found = [name for name, folder in _FOLDERS.items() if base == folder]
    return found


def _looks_like_imagefolder(d):
    entries = [e for e in os.scandir(d) if not e.name.startswith(".")]
    return bool(entries) and all(e.is_dir() for e in entries) and bool(_image_files(entries[0].path))


# ----------------------------------------------------------------------------------------------
# readers, one per layout


def _read_split_file(d, name, split_seed):
    path = os.path.join(d, f"split_zhou_{name}.json")
    image_dir = os.path.join(d, _SPLIT_FILE_DATASETS.get(name, (None, "images"))[1])
    if not os.path.isfile(path):
        if name in _FOLDER_SPLIT_FIXES and os.path.isdir(image_dir):
            warnings.warn(f"{path} not found: using a seeded 50/20/30 split of {image_dir} "
                          f"(split_seed={split_seed}); "
                          "it is not the authors' fixed split, so results are not comparable to the papers")
            return _split_folder(image_dir, name, split_seed, *_FOLDER_SPLIT_FIXES[name], root=d)
        raise ValueError(f"split file {path} not found; download it (links in CoOp's DATASETS.md) "
                         "or point --data at its folder")
    train, val, test = _read_rows(_read_json(path), image_dir, path)
    _check_files(train + val + test, path)
    return DatasetSplits(name, train, val, test, _classnames(train + val + test, path), d)


def _read_fgvc_aircraft(d):
    classnames = [line.strip() for line in _read_lines(os.path.join(d, "variants.txt")) if line.strip()]
    label_of = {c: i for i, c in enumerate(classnames)}

    def read(split):
        path, items = os.path.join(d, f"images_variant_{split}.txt"), []
        for line in filter(str.strip, _read_lines(path)):
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise ValueError(f"{path}: variant {variant!r} is not in variants.txt")
            items.append(Datum(os.path.join(d, "images", image_id + ".jpg"), label_of[variant], variant))
        _check_files(items, path)
        return items

    return DatasetSplits("FGVCAircraft", read("train"), read("val"), read("test"), classnames, d)


def _read_imagenet(d):
    names = _read_wnid_names(os.path.join(d, "classnames.txt"))
    train_dir, val_dir = os.path.join(d, "images", "train"), os.path.join(d, "images", "val")
    wnids = _subdirs(train_dir)
    if _subdirs(val_dir) != wnids:
        raise ValueError(f"{val_dir} must hold the same class folders as {train_dir} "
                         f"({len(_subdirs(val_dir))} vs {len(wnids)}); sort the val images into wnid folders")
    classnames = [_lookup(names, w, d) for w in wnids]
    train, test = _list_classes(train_dir, wnids, classnames), _list_classes(val_dir, wnids, classnames)
    # the official ImageNet sets val = test; nothing in the protocol reads it, so it stays empty here
    return DatasetSplits("ImageNet", train, [], test, classnames, d, imagenet_labels=list(range(len(wnids))))


def _read_imagenet_variant(d, name):
    names_path = os.path.join(d, "classnames.txt")
    if not os.path.isfile(names_path):  # not copied as DATASETS.md asks: use ImageNet's, next to this folder
        names_path = os.path.join(os.path.dirname(os.path.normpath(d)), "imagenet", "classnames.txt")
        if not os.path.isfile(names_path):
            raise ValueError(f"classnames.txt found neither in {d} nor in {os.path.dirname(names_path)}; "
                             "copy ImageNet's classnames.txt into the dataset folder")
    names = _read_wnid_names(names_path)
    image_dir = os.path.join(d, _IMAGENET_VARIANTS[name])
    if name == "ImageNetV2":  # folder i holds class i, the i-th line of classnames.txt
        wnids, folders = list(names), [str(i) for i in range(len(names))]
        if _subdirs(image_dir) != sorted(folders):
            raise ValueError(f"{image_dir} must hold folders 0..{len(names) - 1}, "
                             f"one per line of {names_path}")
    else:  # label = index in the sorted wnid folders (README.txt and other files are not folders)
        wnids = folders = _subdirs(image_dir)
    classnames = [_lookup(names, w, names_path) for w in wnids]
    imagenet_index = {w: i for i, w in enumerate(sorted(names))}  # ImageNet's labels: its sorted wnid folders
    test = _list_classes(image_dir, folders, classnames)
    return DatasetSplits(name, [], [], test, classnames, d,
                         imagenet_labels=[imagenet_index[w] for w in wnids])


def _split_folder(image_dir, name, seed, ignored=(), renames=None, root=None):
    """DTD's read_and_split_data, seeded: classes = sorted folders minus `ignored` (label = index); per
    class, shuffle its sorted image files with one random.Random(seed) shared by all classes in label
    order, then the first round(0.5 n) are train, the next round(0.2 n) val, the rest test."""
    rng, splits = random.Random(seed), ([], [], [])
    classes = [c for c in _subdirs(image_dir) if c not in ignored]
    if not classes:
        raise ValueError(f"{image_dir} has no class folders; expected {image_dir}/<class_name>/<image>")
    for label, c in enumerate(classes):
        files = _image_files(os.path.join(image_dir, c))
        rng.shuffle(files)
        n_train, n_val = round(len(files) * 0.5), round(len(files) * 0.2)
        if min(n_train, n_val, len(files) - n_train - n_val) == 0:
            raise ValueError(f"class folder {c!r} in {image_dir} has {len(files)} images; "
                             "a 50/20/30 split needs at least 4")
        name_c = (renames or {}).get(c, c)
        for part, chunk in zip(splits, (files[:n_train], files[n_train:n_train + n_val],
                                        files[n_train + n_val:])):
            part.extend(Datum(f, label, name_c) for f in chunk)
    classnames = [(renames or {}).get(c, c) for c in classes]
    return DatasetSplits(name, *splits, classnames, root or image_dir)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _read_rows(split, prefix, source):
    """{"train"|"val"|"test": [[relpath, label, classname], ...]} -> three lists of Datum under `prefix`."""
    try:
        return [[Datum(os.path.join(prefix, rel), int(y), c) for rel, y, c in split[k]]
                for k in ("train", "val", "test")]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source} is not a split file ({type(e).__name__}: {e}); expected "
                         '{"train"|"val"|"test": [[relpath, label, classname], ...]}') from None


def _read_lines(path):
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found; the official layout needs it (see CoOp's DATASETS.md)")
    with open(path) as f:
        return f.read().splitlines()


def _read_wnid_names(path):
    """classnames.txt: "<wnid> <class name words>" per line -> {wnid: name}, in file order."""
    return {w: name
            for w, _, name in (line.strip().partition(" ") for line in _read_lines(path) if line.strip())}


def _lookup(names, wnid, source):
    if wnid not in names:
        raise ValueError(f"class folder {wnid} has no line in the classnames.txt of {source}; "
                         "use ImageNet's classnames.txt")
    return names[wnid]


def _subdirs(d):
    if not os.path.isdir(d):
        raise ValueError(f"folder {d} not found; the official layout needs it (see CoOp's DATASETS.md)")
    return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))


def _list_classes(image_dir, folders, classnames):
    """Every regular file of each class folder, as the official readers (any name, not only images)."""
    return [Datum(os.path.join(image_dir, folder, f), label, classnames[label])
            for label, folder in enumerate(folders) for f in _files(os.path.join(image_dir, folder))]


def _image_files(d):
    return [os.path.join(d, f) for f in _files(d) if f.lower().endswith(_IMAGE_EXTENSIONS)]


def _files(d):
    """Sorted names of the regular files in `d`, hidden ones left out. A folder or a broken link named
    like an image is not one (is_file follows links, and costs a stat only for links)."""
    return sorted(e.name for e in os.scandir(d) if not e.name.startswith(".") and e.is_file())


def _classnames(items, source):
    """Class names in label order; labels must be 0..C-1, each with one name."""
    name_of = {}
    for d in items:
        if name_of.setdefault(d.label, d.classname) != d.classname:
            raise ValueError(f"{source}: label {d.label} is named both {name_of[d.label]!r} "
                             f"and {d.classname!r}")
    if sorted(name_of) != list(range(len(name_of))):
        raise ValueError(f"{source}: labels must be 0..{len(name_of) - 1}, got {sorted(name_of)[:5]}...")
    return [name_of[y] for y in range(len(name_of))]


def _check_files(items, source):
    missing = [d.path for d in items if not os.path.isfile(d.path)]
    if missing:
        raise ValueError(f"{len(missing)} of {len(items)} images listed in {source} "
                         "are missing or not files, "
                         f"first: {missing[0]} ({_not_a_file(missing[0])}); "
                         "check that --data points at the complete dataset")


def _not_a_file(path):
    if os.path.isdir(path):
        return "a folder"
    if os.path.exists(path):
        return "not a regular file"
    return "a broken link" if os.path.islink(path) else "not found"


# ----------------------------------------------------------------------------------------------
# few-shot sets, base/new classes, saved splits


def sample_few_shot(items, shots, seed, strict=True):
    """Dassl's generate_fewshot_dataset: for each label in order of first appearance, `rng.sample(its
    items, shots)`, concatenated. `seed` is an int or a random.Random (to continue a stream): the
    official code draws from the global `random` after `random.seed(seed)`, the same sequence.
    A class with fewer than `shots` items raises (strict) or is kept whole (official, repeat=False)."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive int, got {shots!r}")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    by_label = {}
    for d in items:
        by_label.setdefault(d.label, []).append(d)
    out = []
    for group in by_label.values():
        if len(group) < shots and strict:
            raise ValueError(f"class {group[0].label} ({group[0].classname!r}) "
                             f"has {len(group)} training images, "
                             f"fewer than --shots {shots}; lower --shots")
        out.extend(rng.sample(group, shots) if len(group) >= shots else group)
    return out


def few_shot(splits, shots, seed):
    """CoOp's few-shot splits: `shots` train images per class, then min(shots, 4) val images per class,
    drawn in that order from one random.Random(seed). Test stays whole."""
    if not splits.train:
        raise ValueError(f"{splits.name} has no train split (a test-only dataset); "
                         "train elsewhere and evaluate here")
    rng = random.Random(seed)
    train = sample_few_shot(splits.train, shots, rng)
    val = sample_few_shot(splits.val, min(shots, 4), rng, strict=False)
    return replace(splits, train=train, val=val)


def subsample_classes(splits, subsample):
    """Base-to-new: the sorted labels of train (of test for test-only sets); base = the first ceil(n/2),
    new = the rest; keep that half in train/val/test, relabelled 0.. in label order."""
    if subsample not in ("all", "base", "new"):
        raise ValueError(f"subsample must be all, base or new, got {subsample!r}")
    if subsample == "all":
        return splits
    labels = sorted({d.label for d in (splits.train or splits.test)})
    m = math.ceil(len(labels) / 2)
    relabel = {y: i for i, y in enumerate(labels[:m] if subsample == "base" else labels[m:])}
    keep = lambda items: [Datum(d.path, relabel[d.label], d.classname)  # noqa: E731
                          for d in items if d.label in relabel]
    in_labels = lambda values: [values[y] for y in relabel]  # noqa: E731
    return replace(splits, train=keep(splits.train), val=keep(splits.val), test=keep(splits.test),
                   classnames=in_labels(splits.classnames),
                   imagenet_labels=splits.imagenet_labels and in_labels(splits.imagenet_labels))


def save_split(path, splits):
    """Write splits as JSON, image paths relative to splits.root (rows [relpath, label, classname], as
    split_zhou files), so a run folder keeps its exact few-shot set. Atomic: a kill leaves no half file."""
    rows = lambda items: [[os.path.relpath(d.path, splits.root), d.label, d.classname]  # noqa: E731
                          for d in items]
    data = {"name": splits.name, "root": splits.root, "classnames": splits.classnames,
            "imagenet_labels": splits.imagenet_labels,
            "train": rows(splits.train), "val": rows(splits.val), "test": rows(splits.test)}

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f)                   # one line: ImageNet's test split is 50,000 rows
    atomic_write(path, write)


def load_split(path, root=None) -> DatasetSplits:
    """Read a save_split file; `root` replaces the data root stored in it (the data moved)."""
    data = _read_json(path)
    root = os.path.abspath(root or data["root"])
    train, val, test = _read_rows(data, root, path)
    _check_files(train + val + test, path)
    return DatasetSplits(data["name"], train, val, test, data["classnames"], root, data["imagenet_labels"])


# ----------------------------------------------------------------------------------------------
# loading images


def check_images(items, skip_bad=False):
    """Open every item's image file and read its header only (format, mode, size; no pixels decoded,
    each file closed), so that a file PIL cannot identify fails before training, not at the test after
    it. Returns (the items whose header reads, [(path, reason), ...] for the others), in item order.

    skip_bad=False and any bad file: ValueError, one line naming the first bad file, the number of bad
    files and the fix. A file whose header reads but whose pixels are corrupt (a truncated JPEG) passes
    here and is caught when ImageDataset decodes it: it raises, or with skip_bad is skipped and counted."""
    good, bad = [], []
    for d in items:
        reason = _header_error(d.path)
        if reason is None:
            good.append(d)
        else:
            bad.append((d.path, reason))
    if bad and not skip_bad:
        raise ValueError(f"{len(bad)} of {len(items)} images cannot be read, first: {bad[0][1]}; "
                         "remove them, or pass --skip-bad-images to skip and count them")
    return good, bad


def _header_error(path):
    """None if PIL reads the header of the image at `path`, else a one-line reason naming the file."""
    try:
        with Image.open(path):  # parses the header only; the pixels are decoded by load_image
            return None
    except Exception as e:  # OSError (missing, unidentified, truncated header), SyntaxError, ValueError, ...
        # as load_image
        reason = " ".join((getattr(e, "strerror", None) or str(e) or type(e).__name__).split())
        return f"cannot read image {path}: {reason}"


class ImageDataset(Dataset):
    """Items -> (image tensor, label); images are converted to RGB as they are read, before any
    transform, as Dassl's read_image does. Eval: transform(img). Train: transform(img, rng) with rng a
    random.Random seeded from (seed, epoch, index), so the augmentation of a sample depends on nothing
    else (not the worker, not the batch); `set_epoch` before each epoch (make_loader does).

    cache_decoded: decode every image once, now, and keep it in memory (for few-shot sets: about
    width*height*3 bytes per image); loader workers forked later share it copy-on-write. Off, every
    epoch decodes every file again.
    skip_bad: an unreadable image gives (None, (path, reason)), which make_loader's batches drop,
    count and report; otherwise it raises ValueError naming the file."""

    def __init__(self, items, transform, train=False, seed=0, cache_decoded=False, skip_bad=False):
        self.items, self.transform, self.train, self.seed = list(items), transform, train, seed
        self.skip_bad, self.epoch = skip_bad, 0
        self.cache = None
        # a bad file raises now, or (skip_bad) its error is kept and the sample skipped at each use
        if cache_decoded:
            self.cache = [_load_or_error(d.path) for d in self.items]
            if not skip_bad and (bad := next((e for e in self.cache if isinstance(e, str)), None)):
                raise ValueError(f"{bad}; {_SKIP_ADVICE}")

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        d = self.items[i]
        try:
            img = load_image(d.path, rgb=True) if self.cache is None else self.cache[i]
            if isinstance(img, str):  # a cached error
                raise ValueError(img)
            x = (self.transform(img, random.Random(f"{self.seed}/{self.epoch}/{i}")) if self.train
                 else self.transform(img))
        except ValueError as e:  # load_image and the transforms raise ValueError for bad image content
            reason = str(e) if d.path in str(e) else f"cannot use image {d.path}: {e}"
            if not self.skip_bad:
                raise ValueError(f"{reason}; {_SKIP_ADVICE}") from e
            return None, (d.path, reason)
        return x, d.label  # (3, n_px, n_px) float32, int


_SKIP_ADVICE = "remove it or pass --skip-bad-images"


def _load_or_error(path):
    try:
        return load_image(path, rgb=True)
    except ValueError as e:
        return str(e)  # the message, not the exception: a traceback would keep its frames alive


def make_loader(dataset, batch_size, shuffle=None, seed=0, epoch=0, num_workers=0, pin_memory=False,
                drop_last=None, start_batch=0, rank=0, world_size=1):
    """A DataLoader over `dataset` for one epoch, yielding (images (B, 3, H, W), labels (B,)).

    shuffle=None and drop_last=None follow Dassl: a train set is shuffled and drops its last partial
    batch when it has at least one full batch; an eval set keeps its order and every image. The order
    is a function of (seed, epoch) only, random.Random(f"order/{seed}/{epoch}").shuffle, so resuming
    at `start_batch` replays the rest of the epoch exactly. Data-parallel (world_size > 1): the same
    global batches, each cut into world_size contiguous parts of which this loader yields part `rank`,
    every one, even when empty, so that all ranks take the same steps. Skipped bad images (skip_bad)
    are listed in `loader.skipped` and reported on stderr; a single process drops an all-bad batch."""
    dataset.set_epoch(epoch)
    order = list(range(len(dataset)))
    if dataset.train if shuffle is None else shuffle:
        random.Random(f"order/{seed}/{epoch}").shuffle(order)
    if drop_last is None:
        drop_last = dataset.train and len(dataset) >= batch_size
    n_batches = len(order) // batch_size if drop_last else math.ceil(len(order) / batch_size)
    if not 0 <= start_batch <= n_batches:
        raise ValueError(f"start_batch {start_batch} is outside this epoch's {n_batches} batches")
    batches = [order[b * batch_size:(b + 1) * batch_size] for b in range(start_batch, n_batches)]
    batches = [b[len(b) * rank // world_size:len(b) * (rank + 1) // world_size] for b in batches]
    loader = _Loader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
                     collate_fn=_collate)
    loader.keep_empty = world_size > 1
    return loader


class _Loader(DataLoader):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped = []  # paths of the unreadable images skipped so far
        self.keep_empty = False

    def __iter__(self):
        for images, labels, bad in super().__iter__():
            for path, reason in bad:
                print(f"warning: skipped {reason}", file=sys.stderr)
                self.skipped.append(path)
            if len(labels) or self.keep_empty:
                yield images, labels


def _collate(samples):
    good = [s for s in samples if s[0] is not None]
    bad = [s[1] for s in samples if s[0] is None]
    images = torch.stack([x for x, _ in good]) if good else torch.empty(0)
    return images, torch.tensor([y for _, y in good], dtype=torch.long), bad
