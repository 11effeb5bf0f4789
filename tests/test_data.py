"""coop_min.data on synthetic copies of every official layout (tiny 8x8 images, the real folder and
file names of CoOp's DATASETS.md), with the official algorithms (Dassl generate_fewshot_dataset,
DTD's folder split, OxfordPets.subsample_classes) re-written here on the global `random`."""
import json
import os
import random
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from coop_min import data as D

# NAME: (folder under the data root, image folder the split file is relative to), typed from DATASETS.md
SPLIT_FILE_LAYOUTS = {
    "OxfordPets": ("oxford_pets", "images"),
    "OxfordFlowers": ("oxford_flowers", "jpg"),
    "StanfordCars": ("stanford_cars", ""),
    "Food101": ("food-101", "images"),
    "SUN397": ("sun397", "SUN397"),
    "Caltech101": ("caltech-101", "101_ObjectCategories"),
    "DescribableTextures": ("dtd", "images"),
    "EuroSAT": ("eurosat", "2750"),
    "UCF101": ("ucf101", "UCF-101-midframes"),
}
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]
WNID_NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark"]


# ----------------------------------------------------------------------------------------------
# builders of the official layouts


def _image(path, value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), (value, 7, 9)).save(path)


def make_split_file_dataset(d, name, image_dir, classnames, counts=(4, 2, 3)):
    """split_zhou_<name>.json with rows [relpath, label, classname], images under d/image_dir."""
    split = {}
    for part, n in zip(("train", "val", "test"), counts):
        split[part] = []
        for label, c in enumerate(classnames):
            for i in range(n):
                if name == "StanfordCars":  # rows like cars_train/00001.jpg, relative to the dataset folder
                    rel = f"cars_{'test' if part == 'test' else 'train'}/{label:03d}{part}{i}.jpg"
                else:
                    rel = f"{c.replace(' ', '_')}/{part}_{i}.jpg"
                _image(os.path.join(d, image_dir, rel), label)
                split[part].append([rel, label, c])
    with open(os.path.join(d, f"split_zhou_{name}.json"), "w") as f:
        json.dump(split, f, indent=4, separators=(",", ": "))
    return split


def make_fgvc(d, variants=("707-320", "A300B4", "Boeing 737-200")):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "variants.txt"), "w") as f:
        f.write("".join(v + "\n" for v in variants))
    for part, n in (("train", 3), ("val", 2), ("test", 2)):
        with open(os.path.join(d, f"images_variant_{part}.txt"), "w") as f:
            for label, v in enumerate(variants):
                for i in range(n):
                    image_id = f"{label}{part}{i:04d}"
                    _image(os.path.join(d, "images", image_id + ".jpg"))
                    f.write(f"{image_id} {v}\n")


def write_classnames(path, order=None):
    order = order or range(len(WNIDS))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(f"{WNIDS[i]} {WNID_NAMES[i]}\n" for i in order))


def make_imagenet(d, n_train=3, n_val=2):
    write_classnames(os.path.join(d, "classnames.txt"), order=[3, 0, 4, 1, 2])  # file order must not matter
    for split, n in (("train", n_train), ("val", n_val)):
        for w in WNIDS:
            for i in range(n):
                _image(os.path.join(d, "images", split, w, f"{w}_{i}.JPEG"))


def make_imagenet_variant(d, name, wnid_idx, n=2, classnames_here=True):
    image_dir = {"ImageNetV2": "imagenetv2-matched-frequency-format-val", "ImageNetSketch": "images",
                 "ImageNetA": "imagenet-a", "ImageNetR": "imagenet-r"}[name]
    for k, i in enumerate(wnid_idx):
        folder = str(k) if name == "ImageNetV2" else WNIDS[i]
        for j in range(n):
            _image(os.path.join(d, image_dir, folder, f"{j}.jpg"))
    if name in ("ImageNetA", "ImageNetR"):
        open(os.path.join(d, image_dir, "README.txt"), "w").close()
    if classnames_here:
        write_classnames(os.path.join(d, "classnames.txt"))


def make_imagefolder(d, classes=("cat", "dog", "red_fox"), n=10):
    for c in classes:
        for i in range(n):
            _image(os.path.join(d, c, f"{i:03d}.jpg"))


def _names(items):
    return [(os.path.basename(d.path), d.label, d.classname) for d in items]


# ----------------------------------------------------------------------------------------------
# layouts: detection, class names, counts


@pytest.mark.parametrize("name", list(SPLIT_FILE_LAYOUTS))
def test_split_file_layouts(tmp_path, name):
    folder, image_dir = SPLIT_FILE_LAYOUTS[name]
    classnames = ["Annual Crop Land", "face", "yellow_lady's_slipper"]
    split = make_split_file_dataset(str(tmp_path / folder), name, image_dir, classnames)
    for root in (tmp_path / folder, tmp_path):  # the dataset folder itself, or the data root
        assert D.detect_dataset(str(root)) == name
        s = D.load_dataset(str(root))
        assert s.name == name and s.classnames == classnames  # names as in the file, "_" kept
        assert (len(s.train), len(s.val), len(s.test)) == (12, 6, 9)
        for part, items in (("train", s.train), ("val", s.val), ("test", s.test)):
            assert [[os.path.relpath(x.path, os.path.join(tmp_path, folder, image_dir)), x.label, x.classname]
                    for x in items] == split[part]
            assert all(os.path.isfile(x.path) for x in items)
    assert D.load_dataset(str(tmp_path), name).name == name


def test_fgvc_aircraft(tmp_path):
    make_fgvc(str(tmp_path / "fgvc_aircraft"))
    assert D.detect_dataset(str(tmp_path)) == "FGVCAircraft"
    s = D.load_dataset(str(tmp_path / "fgvc_aircraft"))
    assert s.classnames == ["707-320", "A300B4", "Boeing 737-200"]  # variants.txt order, spaces kept
    assert (len(s.train), len(s.val), len(s.test)) == (9, 6, 6)
    assert _names(s.test)[-1] == ("2test0001.jpg", 2, "Boeing 737-200")


def test_imagenet_labels_follow_sorted_folders_and_test_is_val(tmp_path):
    make_imagenet(str(tmp_path / "imagenet"))
    assert D.detect_dataset(str(tmp_path)) == "ImageNet"
    s = D.load_dataset(str(tmp_path), "imagenet")
    assert s.classnames == WNID_NAMES  # WNIDS are sorted, so label i = WNIDS[i]
    assert (len(s.train), len(s.val), len(s.test)) == (15, 0, 10)
    assert all(x.path.split(os.sep)[-3:-1] == ["val", WNIDS[x.label]] for x in s.test)
    assert all(x.path.split(os.sep)[-3:-1] == ["train", WNIDS[x.label]] for x in s.train)
    assert s.imagenet_labels == [0, 1, 2, 3, 4]


def test_imagenet_v2_folder_i_is_line_i(tmp_path):
    d = tmp_path / "imagenetv2"
    make_imagenet_variant(str(d), "ImageNetV2", range(5), classnames_here=False)
    write_classnames(str(d / "classnames.txt"), order=[2, 0, 1, 4, 3])
    assert D.detect_dataset(str(tmp_path)) == "ImageNetV2"
    s = D.load_dataset(str(d))
    assert s.classnames == [WNID_NAMES[i] for i in (2, 0, 1, 4, 3)]
    assert s.imagenet_labels == [2, 0, 1, 4, 3]  # rank of each wnid among the sorted wnids
    assert (s.train, s.val, len(s.test)) == ([], [], 10)
    assert all(x.path.split(os.sep)[-2] == str(x.label) for x in s.test)


@pytest.mark.parametrize("name,folder", [("ImageNetSketch", "imagenet-sketch"), ("ImageNetA", "imagenet-adversarial"),
                                         ("ImageNetR", "imagenet-rendition")])
def test_imagenet_subsets_have_own_labels_and_map_to_imagenet(tmp_path, name, folder):
    subset = [0, 1, 2, 3, 4] if name == "ImageNetSketch" else [1, 3, 4]
    make_imagenet(str(tmp_path / "imagenet"))
    make_imagenet_variant(str(tmp_path / folder), name, subset, classnames_here=name == "ImageNetSketch")
    s = D.load_dataset(str(tmp_path / folder))  # A/R: classnames.txt from ../imagenet/
    assert s.name == name and s.classnames == [WNID_NAMES[i] for i in subset]
    assert sorted({x.label for x in s.test}) == list(range(len(subset)))  # README.txt is not a class
    imagenet = D.load_dataset(str(tmp_path), "ImageNet")
    assert [imagenet.classnames[y] for y in s.imagenet_labels] == s.classnames
    assert s.imagenet_labels == subset


def test_demo_split_file_and_imagefolder_detection(tmp_path):
    make_split_file_dataset(str(tmp_path / "demo"), "Demo", "images", ["a", "b"])
    assert D.detect_dataset(str(tmp_path / "demo")) == "Demo"
    assert D.load_dataset(str(tmp_path / "demo"), "Demo").classnames == ["a", "b"]
    make_imagefolder(str(tmp_path / "pets"))
    assert D.detect_dataset(str(tmp_path / "pets")) == "imagefolder"


def _official_folder_split(image_dir, seed, ignored=(), new_cnames=None):
    """DTD.read_and_split_data on the global random (sorted file lists instead of os.listdir order)."""
    random.seed(seed)
    categories = sorted(c for c in os.listdir(image_dir) if not c.startswith(".") and c not in ignored)
    train, val, test = [], [], []
    for label, category in enumerate(categories):
        images = sorted(os.path.join(image_dir, category, im) for im in os.listdir(os.path.join(image_dir, category)))
        random.shuffle(images)
        n_train, n_val = round(len(images) * 0.5), round(len(images) * 0.2)
        name = (new_cnames or {}).get(category, category)
        train += [(im, label, name) for im in images[:n_train]]
        val += [(im, label, name) for im in images[n_train:n_train + n_val]]
        test += [(im, label, name) for im in images[n_train + n_val:]]
    return train, val, test


def test_imagefolder_split_is_seeded_stratified_50_20_30(tmp_path):
    make_imagefolder(str(tmp_path))
    a, b, c = (D.load_dataset(str(tmp_path), "imagefolder", split_seed=s) for s in (1, 1, 2))
    assert a.classnames == ["cat", "dog", "red_fox"]
    assert (len(a.train), len(a.val), len(a.test)) == (15, 6, 9)  # 5/2/3 per class of 10
    assert a == b and a.train != c.train
    tuples = lambda items: [(x.path, x.label, x.classname) for x in items]  # noqa: E731
    assert (tuples(a.train), tuples(a.val), tuples(a.test)) == _official_folder_split(str(tmp_path), 1)


def test_folder_fallback_applies_official_class_name_fixes(tmp_path):
    caltech = tmp_path / "caltech-101" / "101_ObjectCategories"
    make_imagefolder(str(caltech), ("BACKGROUND_Google", "Faces", "Faces_easy", "accordion", "airplanes"), n=4)
    with pytest.warns(UserWarning, match="not the authors' fixed split"):
        s = D.load_dataset(str(tmp_path / "caltech-101"))
    assert s.name == "Caltech101" and s.classnames == ["face", "accordion", "airplane"]
    fixes = {"Faces": "face", "airplanes": "airplane"}
    expect = _official_folder_split(str(caltech), 1, ("BACKGROUND_Google", "Faces_easy"), fixes)
    assert [(x.path, x.label, x.classname) for x in s.train] == expect[0]
    make_imagefolder(str(tmp_path / "eurosat" / "2750"), ("AnnualCrop", "SeaLake"), n=4)
    with pytest.warns(UserWarning):
        assert D.load_dataset(str(tmp_path), "EuroSAT").classnames == ["Annual Crop Land", "Sea or Lake"]


# ----------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs_fail_with_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        D.load_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no known dataset layout.*split_zhou"):
        D.detect_dataset(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown dataset 'Pets'"):
        D.load_dataset(str(tmp_path / "empty"), "Pets")
    make_fgvc(str(tmp_path / "fgvc_aircraft"))
    make_imagenet(str(tmp_path / "imagenet"))
    with pytest.raises(ValueError, match="several datasets .*FGVCAircraft, ImageNet"):
        D.detect_dataset(str(tmp_path))
    (tmp_path / "oxford_pets").mkdir()
    with pytest.raises(ValueError, match="split_zhou_OxfordPets.json not found"):
        D.load_dataset(str(tmp_path), "OxfordPets")


def test_missing_images_named_and_counted(tmp_path):
    make_split_file_dataset(str(tmp_path), "DescribableTextures", "images", ["banded", "dotted"])
    os.remove(tmp_path / "images" / "dotted" / "test_1.jpg")
    os.remove(tmp_path / "images" / "banded" / "val_0.jpg")
    with pytest.raises(ValueError, match=r"2 of 18 images .* first: .*banded/val_0.jpg"):
        D.load_dataset(str(tmp_path))


def _image_impostors(class_dir):
    """A folder and a broken link named like images, in a class folder: neither is an image."""
    os.makedirs(os.path.join(class_dir, "sub.jpg"))
    _image(os.path.join(class_dir, "sub.jpg", "inner.jpg"))
    os.symlink(os.path.join(class_dir, "gone.jpg"), os.path.join(class_dir, "dead.JPEG"))


def test_folders_and_broken_links_named_like_images_are_not_listed(tmp_path):
    make_imagefolder(str(tmp_path / "pets"), n=10)
    _image_impostors(str(tmp_path / "pets" / "cat"))
    s = D.load_dataset(str(tmp_path / "pets"), "imagefolder")
    assert (len(s.train), len(s.val), len(s.test)) == (15, 6, 9)
    assert all(os.path.isfile(x.path) and not os.path.islink(x.path) for x in s.train + s.val + s.test)
    D.save_split(str(tmp_path / "split.json"), s)  # the run's own split file reloads: it lists only files
    assert D.load_split(str(tmp_path / "split.json")) == s
    make_imagenet(str(tmp_path / "imagenet"))
    for split in ("train", "val"):
        _image_impostors(str(tmp_path / "imagenet" / "images" / split / WNIDS[0]))
    s = D.load_dataset(str(tmp_path / "imagenet"))
    assert (len(s.train), len(s.test)) == (15, 10) and all(os.path.isfile(x.path) for x in s.train + s.test)


@pytest.mark.parametrize("bad,what", [("folder", "a folder"), ("link", "a broken link"), ("gone", "not found")])
def test_split_file_path_that_is_no_file_is_named_with_its_split_file(tmp_path, bad, what):
    make_split_file_dataset(str(tmp_path), "DescribableTextures", "images", ["banded", "dotted"])
    path = tmp_path / "images" / "dotted" / "val_1.jpg"
    os.remove(path)
    if bad == "folder":
        path.mkdir()
    elif bad == "link":
        path.symlink_to(tmp_path / "elsewhere.jpg")
    with pytest.raises(ValueError) as e:
        D.load_dataset(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and f"listed in {tmp_path / 'split_zhou_DescribableTextures.json'}" in msg
    assert f"first: {path} ({what});" in msg


def test_two_split_files_and_classnames_missing(tmp_path):
    make_split_file_dataset(str(tmp_path / "x"), "A", "images", ["a"])
    make_split_file_dataset(str(tmp_path / "x"), "B", "images", ["a"])
    with pytest.raises(ValueError, match="several split files"):
        D.detect_dataset(str(tmp_path / "x"))
    make_imagenet_variant(str(tmp_path / "imagenet-rendition"), "ImageNetR", [0, 2], classnames_here=False)
    with pytest.raises(ValueError, match="classnames.txt found neither"):
        D.load_dataset(str(tmp_path / "imagenet-rendition"))


# ----------------------------------------------------------------------------------------------
# few-shot sampling, base/new, saved splits


def _official_fewshot(items, k):
    """Dassl DatasetBase.generate_fewshot_dataset(items, num_shots=k, repeat=False), global random."""
    tracker = defaultdict(list)
    for item in items:
        tracker[item.label].append(item)
    out = []
    for label, group in tracker.items():
        out.extend(random.sample(group, k) if len(group) >= k else group)
    return out


def _synthetic(n_classes=5, per_class=20, seed=0):
    items = [D.Datum(f"/x/{y}/{i}.jpg", y, f"c{y}") for y in range(n_classes) for i in range(per_class)]
    random.Random(seed).shuffle(items)  # first-appearance order differs from label order
    return items


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_few_shot_matches_the_official_global_random_sequence(seed):
    train, val = _synthetic(seed=10), [D.Datum(f"/v/{y}/{i}", y, f"c{y}") for y in (3, 1, 0, 2, 4) for i in range(6)]
    random.seed(seed)  # what Dassl's set_random_seed does, then the dataset draws train, then val
    official_train, official_val = _official_fewshot(train, 8), _official_fewshot(val, min(8, 4))
    s = D.few_shot(D.DatasetSplits("X", train, val, [], [f"c{y}" for y in range(5)]), 8, seed)
    assert s.train == official_train and s.val == official_val
    assert D.sample_few_shot(train, 8, seed) == official_train
    assert D.few_shot(D.DatasetSplits("X", train, val, [], []), 8, seed + 10).train != s.train


def test_shots_larger_than_a_class_raise_unless_official_keep_all():
    items = _synthetic(3, 5) + [D.Datum("/x/9/0.jpg", 3, "rare")]
    with pytest.raises(ValueError, match=r"class 3 \('rare'\) has 1 training images, fewer than --shots 4"):
        D.sample_few_shot(items, 4, 1)
    random.seed(1)
    assert D.sample_few_shot(items, 4, 1, strict=False) == _official_fewshot(items, 4)
    with pytest.raises(ValueError, match="test-only"):
        D.few_shot(D.DatasetSplits("ImageNetA", [], [], items, []), 1, 1)


def test_base_new_split_relabels_each_half():
    items = _synthetic(5, 2)
    s = D.DatasetSplits("X", items, items[:4], items, [f"c{y}" for y in range(5)], imagenet_labels=[10, 11, 12, 13, 14])
    base, new = D.subsample_classes(s, "base"), D.subsample_classes(s, "new")
    assert base.classnames == ["c0", "c1", "c2"] and new.classnames == ["c3", "c4"]  # ceil(5/2) = 3 base
    assert base.imagenet_labels == [10, 11, 12] and new.imagenet_labels == [13, 14]
    for sub, offset in ((base, 0), (new, 3)):
        for part, full in ((sub.train, s.train), (sub.test, s.test), (sub.val, s.val)):
            kept = [x for x in full if x.label - offset in range(len(sub.classnames))]
            assert [(x.path, x.label + offset, x.classname) for x in part] == [(x.path, x.label, x.classname) for x in kept]
    assert D.subsample_classes(s, "all") is s
    with pytest.raises(ValueError, match="all, base or new"):
        D.subsample_classes(s, "novel")


def test_save_and_load_split_round_trip_relative_paths(tmp_path):
    make_split_file_dataset(str(tmp_path / "data" / "dtd"), "DescribableTextures", "images", ["banded", "dotted"])
    s = D.few_shot(D.load_dataset(str(tmp_path / "data")), 2, 1)
    D.save_split(str(tmp_path / "split.json"), s)
    assert D.load_split(str(tmp_path / "split.json")) == s
    rows = json.load(open(tmp_path / "split.json"))["train"]
    assert all(not os.path.isabs(rel) and rel.startswith("images/") for rel, _, _ in rows)
    os.rename(tmp_path / "data", tmp_path / "moved")
    with pytest.raises(ValueError, match="images listed in .*split.json are missing"):
        D.load_split(str(tmp_path / "split.json"))
    moved = D.load_split(str(tmp_path / "split.json"), root=str(tmp_path / "moved" / "dtd"))
    assert _names(moved.train) == _names(s.train)


# ----------------------------------------------------------------------------------------------
# image loading


def _eval_tf(img):
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)  # (3, 8, 8)


def _train_tf(img, rng):
    return _eval_tf(img) + rng.random()


def _folder_items(tmp_path, n=10):
    for i in range(n):
        _image(str(tmp_path / f"{i}.png"), i)
    return [D.Datum(str(tmp_path / f"{i}.png"), i % 3, "c") for i in range(n)]


def test_loader_order_and_augmentation_are_functions_of_seed_epoch_index(tmp_path):
    ds = D.ImageDataset(_folder_items(tmp_path), _train_tf, train=True, seed=5)
    epoch = lambda e, start=0, workers=0: [(x.clone(), y) for x, y in D.make_loader(  # noqa: E731
        ds, 4, seed=5, epoch=e, start_batch=start, num_workers=workers)]
    e1 = epoch(1)
    assert len(e1) == 2 and all(len(y) == 4 for _, y in e1)  # train, 10 >= 4: the partial batch is dropped
    again = epoch(1, workers=1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e1, again))
    resumed = epoch(1, start=1)
    assert len(resumed) == 1 and torch.equal(resumed[0][0], e1[1][0])
    e2 = epoch(2)
    assert not torch.equal(e1[0][0], e2[0][0])
    seen = [int(x[0, 0, 0]) for images, _ in e1 for x in images]  # the red value is the file index
    assert len(set(seen)) == 8 and seen != list(range(8))  # shuffled, each image at most once
    small = D.ImageDataset(_folder_items(tmp_path, 3), _train_tf, train=True)
    assert [len(y) for _, y in D.make_loader(small, 4, shuffle=True)] == [3]  # smaller than a batch: one batch
    test = D.make_loader(D.ImageDataset(_folder_items(tmp_path), _eval_tf), 4)
    assert [y.tolist() for _, y in test] == [[0, 1, 2, 0], [1, 2, 0, 1], [2, 0]]  # eval: in order, all kept


def test_unreadable_image_raises_or_is_skipped_and_counted(tmp_path):
    items = _folder_items(tmp_path, 4)
    with open(items[2].path, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(ValueError, match="2.png.*; remove it or pass --skip-bad-images$"):
        list(D.make_loader(D.ImageDataset(items, _eval_tf), 4))
    loader = D.make_loader(D.ImageDataset(items, _eval_tf, skip_bad=True), 2)
    batches = [y.tolist() for _, y in loader]
    assert batches == [[0, 1], [0]] and loader.skipped == [items[2].path]


def test_decoded_cache_survives_file_removal_and_keeps_bad_files_visible(tmp_path):
    items = _folder_items(tmp_path, 3)
    ds = D.ImageDataset(items, _eval_tf, cache_decoded=True)
    os.remove(items[1].path)
    assert torch.equal(ds[1][0], torch.tensor([1.0, 7.0, 9.0]).view(3, 1, 1).expand(3, 8, 8))
    with pytest.raises(ValueError, match="1.png"):
        D.ImageDataset(items, _eval_tf)[1]
    with pytest.raises(ValueError, match="1.png.*--skip-bad-images$"):  # caching decodes up front: fails at once
        D.ImageDataset(items, _eval_tf, cache_decoded=True)
    skipping = D.ImageDataset(items, _eval_tf, cache_decoded=True, skip_bad=True)
    loader = D.make_loader(skipping, 3)
    assert [y.tolist() for _, y in loader] == [[0, 2]] and loader.skipped == [items[1].path]


def _bad_files(tmp_path):
    """Paths a split can list that PIL cannot open: garbage bytes, an empty file, a folder, nothing."""
    garbage, empty, folder = tmp_path / "garbage.jpg", tmp_path / "empty.png", tmp_path / "folder.jpg"
    garbage.write_bytes(b"not an image")
    empty.write_bytes(b"")
    folder.mkdir()
    return [str(p) for p in (garbage, empty, folder, tmp_path / "gone.jpg")]


def test_check_images_raises_one_line_naming_the_first_and_the_count(tmp_path):
    items = _folder_items(tmp_path, 6)
    bad_paths = _bad_files(tmp_path)
    mixed = items[:2] + [D.Datum(p, 0, "c") for p in bad_paths] + items[2:]
    assert D.check_images(items) == (items, [])
    with pytest.raises(ValueError) as e:
        D.check_images(mixed)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"4 of 10 images cannot be read, first: cannot read image {bad_paths[0]}: ")
    assert msg.endswith("; remove them, or pass --skip-bad-images to skip and count them")
    good, bad = D.check_images(mixed, skip_bad=True)
    assert good == items and [p for p, _ in bad] == bad_paths
    assert all(reason.startswith(f"cannot read image {p}: ") and "\n" not in reason for p, reason in bad)


def test_check_images_reads_headers_only_and_decode_errors_stay_with_the_dataset(tmp_path, monkeypatch):
    items = _folder_items(tmp_path, 3)
    truncated = str(tmp_path / "truncated.png")  # a valid header, then half the pixel data
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(truncated)
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[:len(data) // 2])
    items.insert(1, D.Datum(truncated, 1, "c"))

    def no_decoding(self):
        raise AssertionError("check_images decoded pixels")
    with monkeypatch.context() as m:
        m.setattr(Image.Image, "load", no_decoding)
        m.setattr(Image.Image, "convert", no_decoding)
        assert D.check_images(items) == (items, [])
    with pytest.raises(ValueError, match="truncated.png.*; remove it or pass --skip-bad-images$"):
        list(D.make_loader(D.ImageDataset(items, _eval_tf), 4))
    loader = D.make_loader(D.ImageDataset(items, _eval_tf, skip_bad=True), 4)
    assert [y.tolist() for _, y in loader] == [[0, 1, 2]] and loader.skipped == [truncated]


def test_real_transforms_plug_in(tmp_path):
    from coop_min.transforms import image_transform, train_transform

    items = _folder_items(tmp_path, 2)
    assert D.ImageDataset(items, image_transform(4))[0][0].shape == (3, 4, 4)
    assert D.ImageDataset(items, train_transform(4), train=True)[1][0].shape == (3, 4, 4)


@pytest.mark.parametrize("mode", ["P", "RGBA", "1"])
def test_dataset_images_become_rgb_before_the_eval_transform_as_in_dassl(tmp_path, mode):
    """Dassl's read_image converts to RGB on load, before the test transform resizes; OpenAI's
    preprocess (image_transform) converts after the crop. For these modes the two orders differ."""
    from coop_min.transforms import image_transform

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    pixels[..., 3] = np.where(pixels[..., 3] > 127, 255, 60)         # partly transparent
    img = Image.fromarray(pixels, "RGBA")
    img = img if mode == "RGBA" else img.convert("RGB").convert(mode) if mode == "1" else \
        img.convert("RGB").quantize(16)
    path = str(tmp_path / "x.png")
    img.save(path)
    with Image.open(path) as f:
        assert f.mode == mode
        f.load()
        dassl, openai = image_transform(24)(f.convert("RGB")), image_transform(24)(f)
    x, _ = D.ImageDataset([D.Datum(path, 0, "c")], image_transform(24))[0]
    assert torch.equal(x, dassl) and not torch.allclose(x, openai, atol=1e-2)
