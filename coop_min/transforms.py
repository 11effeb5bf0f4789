"""Image preprocessing: OpenAI CLIP's eval transform, bit for bit, and CoOp's train augmentation.

Both are the torchvision pipelines of the originals, rebuilt from PIL, numpy and torch:

    eval   (OpenAI `clip._transform`)   Resize(n_px, BICUBIC) -> CenterCrop(n_px) -> convert("RGB")
                                        -> ToTensor -> Normalize(CLIP_MEAN, CLIP_STD)
    train  (CoOp's Dassl configs)       convert("RGB") -> RandomResizedCrop(n_px, scale=(0.08, 1),
                                        BICUBIC) -> RandomHorizontalFlip(0.5) -> ToTensor -> Normalize

On a PIL image torchvision never resamples pixels itself: it computes sizes and boxes and calls
`PIL.Image.resize` / `crop` / `transpose` (no `reducing_gap`; PIL always antialiases bicubic). So
making the same PIL calls in the same order, then the same float32 arithmetic (`x / 255`, then
`(x - mean) / std`), gives the same bits.

Dassl converts to RGB when it loads a file, *before* resizing; OpenAI converts after the crop. For
RGB files (nearly all) the two agree. For others they differ (a palette image is resized with
nearest by PIL, an RGBA one with premultiplied alpha); `image_transform` follows OpenAI, and the
datasets (data.py) and `evaluate --image` load with `load_image(path, rgb=True)`, as CoOp does.

Randomness: `train_transform` draws only from the `random.Random` it is given, so a sample's crop
and flip depend on that generator alone (seed it per sample and epoch: resuming and any number of
loader workers give the same batches). The draws follow torchvision's `get_params` one for one,
with the same distributions, but from Python's generator instead of torch's: for a given seed the
crops are not torchvision's.
"""
import math
import random
from functools import partial

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# torchvision's Normalize turns the python floats into float32 tensors of the image's dtype
_MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
_BICUBIC = Image.Resampling.BICUBIC

# RandomResizedCrop defaults of the CoOp configs (Dassl keeps torchvision's ratio)
_SCALE = (0.08, 1.0)
_RATIO = (3.0 / 4.0, 4.0 / 3.0)


class BadImageError(ValueError):
    """An image file that cannot be decoded: missing, not an image, corrupt or truncated."""


def load_image(path, rgb=False):
    """Open and fully decode an image file, or raise BadImageError naming it. Its mode is unchanged,
    or with rgb=True converted to RGB as Dassl's read_image does (the datasets' order)."""
    try:
        with Image.open(path) as img:  # the context closes the file, even for multi-frame images
            img.load()  # decode now, so a truncated file fails here and not halfway through a batch
        _check_image(img)
        if rgb:
            img = _to_rgb(img)
    except Exception as e:  # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        reason = " ".join((getattr(e, "strerror", None) or str(e) or type(e).__name__).split())
        raise BadImageError(f"cannot read image {path}: {reason}") from e
    return img


def image_transform(n_px):
    """OpenAI CLIP's preprocess: callable(PIL.Image) -> FloatTensor[3, n_px, n_px], bit-identical."""
    return partial(_eval_transform, n_px=_check_size(n_px))


def train_transform(n_px):
    """CoOp's train augmentation: callable(PIL.Image, random.Random) -> FloatTensor[3, n_px, n_px]."""
    return partial(_train_transform, n_px=_check_size(n_px))


# ----------------------------------------------------------------------------------------------
# the two pipelines


def _eval_transform(img, n_px):
    _check_image(img)
    if img.mode == "PA":  # PIL resamples palette indices and drops the palette: an all-black image
        raise ValueError("image mode PA: resizing it before RGB conversion (as OpenAI does) gives garbage; "
                         "convert it to RGBA first")
    img = _resize_short_side(img, n_px)
    img = _center_crop(img, n_px)
    return _to_normalized_tensor(_to_rgb(img))


def _train_transform(img, rng, n_px):
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random (seeded per sample), got {type(rng).__name__}")
    _check_image(img)
    img = _to_rgb(img)
    top, left, h, w = _random_crop_box(*img.size, rng)
    img = img.crop((left, top, left + w, top + h))
    if img.size != (n_px, n_px):  # torchvision skips the resize when the crop already fits
        img = img.resize((n_px, n_px), _BICUBIC)
    if rng.random() < 0.5:  # RandomHorizontalFlip: torch.rand(1) < p
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_normalized_tensor(img)


# ----------------------------------------------------------------------------------------------
# the steps, each as torchvision does it on a PIL image


def _resized_size(w, h, size):
    """torchvision Resize(int): the short side becomes `size`, the long side int(size * long / short)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)  # (w, h)


def _resize_short_side(img, size):
    new_size = _resized_size(*img.size, size)
    if new_size == img.size:  # torchvision returns the image itself (PIL would only copy it)
        return img
    return img.resize(new_size, _BICUBIC)


def _center_crop(img, size):
    # after _resize_short_side both sides are >= size, so torchvision's zero padding never applies
    w, h = img.size
    top = int(round((h - size) / 2.0))  # round half to even, as torchvision
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _random_crop_box(width, height, rng, scale=_SCALE, ratio=_RATIO):
    """torchvision RandomResizedCrop.get_params, drawing from `rng`: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)  # inclusive: torch.randint(0, height - h + 1)
            left = rng.randint(0, width - w)
            return top, left, h, w
    # ten misses (very elongated images): the largest centred box with the ratio clamped into range
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _to_normalized_tensor(img):
    """ToTensor then Normalize on an RGB image: (H, W, 3) uint8 -> (3, H, W) float32."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3)
    x = x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # (3, H, W) in [0, 1]
    return x.sub_(_MEAN).div_(_STD)  # the order of torchvision's in-place ops, for the same bits


# ----------------------------------------------------------------------------------------------
# input checks: refuse what the original would crash on or silently turn into garbage


def _check_size(n_px):
    if isinstance(n_px, bool) or not isinstance(n_px, int) or n_px <= 0:
        raise ValueError(f"n_px must be a positive int (the model's input resolution), got {n_px!r}")
    return n_px


def _check_image(img):
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(img).__name__}; open files with load_image")
    w, h = img.size
    if w == 0 or h == 0:
        raise ValueError(f"empty image ({w}x{h} pixels)")
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        lo, hi = img.getextrema()  # PIL's convert("RGB") clips these modes to [0, 255]
        if lo < 0 or hi > 255:
            raise ValueError(f"image mode {img.mode} has values in [{lo}, {hi}], which RGB conversion "
                             "(as in the original) clips to [0, 255]; save the image with 8 bits per channel")


def _to_rgb(img):
    try:
        return img.convert("RGB")
    except ValueError as e:  # e.g. mode "La": PIL has no conversion to RGB
        raise ValueError(f"image mode {img.mode} cannot be converted to RGB ({e}); "
                         "convert it to LA, RGBA or RGB first") from None
