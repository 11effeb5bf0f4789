"""coop_min.transforms against independent references: hand-computed sizes, offsets and pixels, and
twins written here from torchvision's source (Resize / CenterCrop / ToTensor / Normalize and
RandomResizedCrop.get_params), compared bit for bit."""
import io
import math
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from coop_min import transforms as T

# the official values, typed from OpenAI's clip.py / Dassl's configs
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------
# reference twins, written from torchvision's code


def _tv_output_size(h, w, size):
    # torchvision.transforms.functional._compute_resized_output_size with size=[n], max_size=None
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return [new_h, new_w]


def _tv_to_tensor(pic):
    # torchvision ToTensor for a uint8 PIL image
    img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
    img = img.view(pic.size[1], pic.size[0], len(pic.getbands()))
    img = img.permute((2, 0, 1)).contiguous()
    return img.to(dtype=torch.float32).div(255)


def _tv_normalize(tensor):
    tensor = tensor.clone()
    mean = torch.as_tensor(MEAN, dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.as_tensor(STD, dtype=tensor.dtype).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


def _openai_preprocess(img, n_px):
    # Compose([Resize(n_px, BICUBIC), CenterCrop(n_px), _convert_image_to_rgb, ToTensor(), Normalize])
    height, width = img.height, img.width
    out = _tv_output_size(height, width, n_px)
    if [height, width] != out:
        img = img.resize(tuple(out[::-1]), Image.BICUBIC)
    crop_top = int(round((img.height - n_px) / 2.0))
    crop_left = int(round((img.width - n_px) / 2.0))
    img = img.crop((crop_left, crop_top, crop_left + n_px, crop_top + n_px))
    return _tv_normalize(_tv_to_tensor(img.convert("RGB")))


def _tv_get_params(img, scale, ratio, rng):
    # RandomResizedCrop.get_params with torch's draws replaced by the same draws from `rng`
    width, height = img.size
    area = height * width
    log_ratio = [math.log(r) for r in ratio]
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = rng.randrange(0, height - h + 1)
            j = rng.randrange(0, width - w + 1)
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


def _coop_train(img, n_px, rng):
    # Dassl: .convert("RGB") on load, RandomResizedCrop(BICUBIC), RandomHorizontalFlip, ToTensor, Normalize
    img = img.convert("RGB")
    i, j, h, w = _tv_get_params(img, (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0), rng)
    img = img.crop((j, i, j + w, i + h))  # F.crop
    if [img.height, img.width] != [n_px, n_px]:  # F.resize with size [n_px, n_px]
        img = img.resize((n_px, n_px), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return _tv_normalize(_tv_to_tensor(img))


def _random_image(mode, w, h, seed=0):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba = Image.fromarray(a, "RGBA")  # random alpha, so premultiplied resizing matters
    if mode == "RGBA":
        return rgba
    if mode == "P":  # an adaptive palette with a transparent index, as GIFs and PNGs have
        p = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
        p.info["transparency"] = 3
        return p
    if mode == "I;16":
        return Image.fromarray(a[..., 0].astype(np.uint16))
    if mode == "I":
        return Image.fromarray(a[..., 0].astype(np.int32))
    if mode == "F":
        return Image.fromarray(a[..., 0].astype(np.float32) * 0.99 + 0.3)
    return rgba.convert(mode) if mode == "LA" else rgba.convert("RGB").convert(mode)


MODES = ["RGB", "L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "I", "F", "YCbCr"]
SIZES = [(224, 224), (300, 200), (200, 300), (225, 224), (224, 227), (37, 51), (401, 333), (3, 250)]


# ----------------------------------------------------------------------------------------------
# eval transform


def test_constants_are_clip_mean_std():
    assert T.CLIP_MEAN == MEAN and T.CLIP_STD == STD


@pytest.mark.parametrize("wh, expected", [
    ((300, 200), (336, 224)), ((200, 300), (224, 336)), ((224, 224), (224, 224)),
    ((333, 250), (298, 224)),  # 224 * 333 / 250 = 298.37, truncated
    ((1, 3), (224, 672)), ((500, 224), (500, 224)),
])
def test_resized_size_is_short_side_to_n_px(wh, expected):
    assert T._resized_size(*wh, 224) == expected


def test_short_side_equal_to_n_px_is_not_resampled():
    # 4x6 image, n_px 4: no resize (bicubic would blur the random pixels), rows 1..4 kept
    a = np.random.default_rng(1).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    out = T.image_transform(4)(Image.fromarray(a))
    kept = a[1:5].astype(np.float32) / np.float32(255)  # round((6 - 4) / 2) = 1
    expected = (kept - np.float32(MEAN)) / np.float32(STD)  # float32 ops in torchvision's order
    assert torch.equal(out, torch.from_numpy(expected.transpose(2, 0, 1).copy()))


def test_known_pixel_normalised_by_hand():
    img = Image.new("RGB", (3, 3), (255, 0, 128))
    out = T.image_transform(3)(img)
    assert out.shape == (3, 3, 3) and out.dtype == torch.float32
    hand = [(1.0 - 0.48145466) / 0.26862954, (0.0 - 0.4578275) / 0.26130258, (128 / 255 - 0.40821073) / 0.27577711]
    assert hand[0] == pytest.approx(1.9303361, abs=1e-6)
    for c in range(3):
        assert torch.allclose(out[c], torch.full((3, 3), hand[c]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("length, offset", [(5, 0), (6, 1), (7, 2), (8, 2), (9, 2), (11, 4)])
@pytest.mark.parametrize("wide", [True, False])
def test_center_crop_offsets_round_half_to_even(length, offset, wide):
    # short side = n_px = 4 so nothing is resized; pixel value = index along the long side
    a = np.tile(np.arange(length, dtype=np.uint8), (4, 1))
    out = T.image_transform(4)(Image.fromarray(a if wide else a.T.copy(), "L"))
    line = out[0, 0] if wide else out[0, :, 0]
    kept = torch.round((line * STD[0] + MEAN[0]) * 255).to(torch.int64)
    assert kept.tolist() == list(range(offset, offset + 4))  # round(0.5)=0, round(1.5)=2, round(2.5)=2


@pytest.mark.parametrize("mode", MODES)
def test_eval_matches_openai_preprocess_bitwise(mode):
    for n_px in (224, 16):
        tf = T.image_transform(n_px)
        for k, (w, h) in enumerate(SIZES):
            img = _random_image(mode, w, h, seed=k)
            assert torch.equal(tf(img), _openai_preprocess(img, n_px)), (mode, n_px, w, h)


def test_eval_output_is_contiguous_and_batchable():
    tf = T.image_transform(32)
    x = torch.stack([tf(_random_image("RGB", 50, 40)), tf(_random_image("L", 40, 70))])
    assert x.shape == (2, 3, 32, 32) and x.is_contiguous()


def test_eval_refuses_modes_the_original_garbles():
    tf = T.image_transform(8)
    pa = _random_image("P", 20, 20).convert("PA")  # PIL resizes palette indices and drops the palette
    with pytest.raises(ValueError, match="mode PA"):
        tf(pa)
    with pytest.raises(ValueError, match="mode La"):  # no conversion to RGB exists in PIL
        tf(Image.new("La", (8, 8)))


def test_wide_range_modes_refused_not_clipped():
    img16 = Image.fromarray(np.array([[0, 1000], [65535, 7]], dtype=np.uint16))
    assert img16.mode == "I;16"
    for tf in (T.image_transform(2), lambda im: T.train_transform(2)(im, random.Random(0))):
        with pytest.raises(ValueError, match=r"mode I;16 has values in \[0, 65535\]"):
            tf(img16)
        with pytest.raises(ValueError, match="mode F"):
            tf(Image.fromarray(np.full((4, 4), -1.5, np.float32)))


def test_bad_arguments_raise():
    for bad in (0, -3, 2.5, "224", True):
        with pytest.raises(ValueError, match="n_px"):
            T.image_transform(bad)
    with pytest.raises(TypeError, match="PIL"):
        T.image_transform(4)(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="empty image"):
        T.image_transform(4)(Image.new("RGB", (0, 5)))
    with pytest.raises(TypeError, match="random.Random"):
        T.train_transform(4)(Image.new("RGB", (5, 5)), 0)


def test_transforms_pickle_for_spawned_workers():
    img = _random_image("RGB", 30, 20)
    tf, tr = pickle.loads(pickle.dumps(T.image_transform(8))), pickle.loads(pickle.dumps(T.train_transform(8)))
    assert torch.equal(tf(img), T.image_transform(8)(img))
    assert torch.equal(tr(img, random.Random(3)), T.train_transform(8)(img, random.Random(3)))


# ----------------------------------------------------------------------------------------------
# train transform


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK"])
def test_train_matches_coop_augmentation_twin_bitwise(mode):
    sizes = [(300, 200), (64, 64), (224, 224), (2000, 10), (12, 900)]  # the last two take the fallback
    for k, (w, h) in enumerate(sizes):
        img = _random_image(mode, w, h, seed=k)
        for seed in range(4):
            for n_px in (224, 12):
                ours = T.train_transform(n_px)(img, random.Random(seed))
                assert ours.shape == (3, n_px, n_px) and ours.dtype == torch.float32
                assert torch.equal(ours, _coop_train(img, n_px, random.Random(seed))), (mode, w, h, seed, n_px)


def test_crop_boxes_match_get_params_twin():
    for seed in range(300):
        for w, h in [(500, 375), (375, 500), (7, 5), (1000, 10)]:
            ours = T._random_crop_box(w, h, random.Random(seed))
            ref = _tv_get_params(Image.new("L", (w, h)), (0.08, 1.0), (3 / 4, 4 / 3), random.Random(seed))
            assert ours == ref, (seed, w, h)


def test_fallback_box_by_hand():
    # every attempt is taller than 10 px, so torchvision centres a 10 x round(10 * 4/3) box
    assert T._random_crop_box(1000, 10, random.Random(0)) == (0, (1000 - 13) // 2, 10, 13)
    assert T._random_crop_box(10, 1000, random.Random(0)) == ((1000 - 13) // 2, 0, 13, 10)  # round(10 / 0.75)
    assert T._random_crop_box(1000, 11, random.Random(0)) == (0, (1000 - 15) // 2, 11, 15)  # round(14.67)
    assert T._random_crop_box(11, 1000, random.Random(0)) == ((1000 - 15) // 2, 0, 15, 11)


def test_crop_boxes_respect_scale_and_ratio_bounds():
    rng = random.Random(0)
    W, H = 400, 400  # square, so rejections do not favour one orientation
    fracs, log_ratios = [], []
    for _ in range(20000):
        i, j, h, w = T._random_crop_box(W, H, rng)
        assert 0 <= i and i + h <= H and 0 <= j and j + w <= W
        fracs.append(w * h / (W * H))
        log_ratios.append(math.log(w / h))
    fracs, log_ratios = np.array(fracs), np.array(log_ratios)
    slack = 0.01  # w and h are rounded to integers of >= 98 px
    assert fracs.min() >= 0.08 - slack and fracs.max() <= 1.0
    assert fracs.min() < 0.09 and fracs.max() > 0.97  # the whole range is used
    assert log_ratios.min() >= math.log(3 / 4) - slack and log_ratios.max() <= math.log(4 / 3) + slack
    assert abs(log_ratios.mean()) < 0.01  # log-uniform ratio: symmetric around square


def test_train_flips_about_half_the_time():
    ramp = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (256, 1)), "L")  # brightness = column
    tf = T.train_transform(8)
    flips = 0
    for seed in range(1000):
        out = tf(ramp, random.Random(seed))
        slope = (out[0, :, -1] - out[0, :, 0]).mean().item()
        assert slope != 0  # every crop is >= 60 px wide, so the ramp survives
        flips += slope < 0
    assert 430 < flips < 570  # 500 +- 4.4 sigma


def test_train_is_deterministic_given_the_generator():
    img = _random_image("RGB", 120, 90)
    tf = T.train_transform(16)
    a, b = tf(img, random.Random(7)), tf(img, random.Random(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, tf(img, random.Random(8)))
    rng = random.Random(7)
    tf(img, rng)
    assert rng.getstate() != random.Random(7).getstate()  # the generator advances: draws are its own


# ----------------------------------------------------------------------------------------------
# load_image


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_reads_and_keeps_mode(tmp_path):
    img = _random_image("P", 20, 10)
    path = tmp_path / "ok.png"
    path.write_bytes(_png_bytes(img))
    loaded = T.load_image(path)
    assert loaded.mode == "P" and loaded.size == (20, 10)
    assert np.array_equal(np.array(loaded), np.array(img))


@pytest.mark.parametrize("content", [None, b"", b"not an image at all", "truncated", "sixteen_bit"])
def test_load_image_failures_name_the_file(tmp_path, content):
    path = tmp_path / "bad image.png"
    if content == "truncated":
        data = _png_bytes(_random_image("RGB", 64, 64))
        content = data[: len(data) // 2]
    elif content == "sixteen_bit":  # decodes, but RGB conversion would clip it to white
        content = _png_bytes(Image.fromarray(np.full((4, 4), 40000, np.uint16)))
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(T.BadImageError) as e:
        T.load_image(path)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert msg.startswith(f"cannot read image {path}: ") and "skip" not in msg   # the advice is the caller's
    assert "\n" not in msg
