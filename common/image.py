"""Image loading and transforms with pillow + numpy (no torchvision).

Every script turns a PIL image into a normalised float tensor (3, S, S) with `ImageTransform`.
Evaluation: resize the short side to S (bicubic) and centre-crop.  Training: random resized crop
(area scale range, aspect 3/4..4/3) and an optional horizontal flip.  The random draws come from
Python's `random` module (or a `random.Random` you pass), so checkpoints that save RNG state resume
the same augmentations.  Flip is off by default: the toy world's captions say "left of"/"right of".
"""
import math
import random

import numpy as np
import torch
from PIL import Image

# CLIP (and BLIP / BLIP-2, which reuse CLIP's statistics) normalisation.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(path):
    """Open an image as RGB; return None when the file is missing or unreadable (callers count these)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        # missing, truncated or corrupt files, and images over PIL's decompression-bomb limit (2x
        # Image.MAX_IMAGE_PIXELS): all count as unreadable under the caller's max_bad_frac rule
        return None


def resize_short_side(img, size, resample=Image.BICUBIC):
    w, h = img.size
    scale = size / min(w, h)
    return img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)


def center_crop(img, size):
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_resized_crop(img, size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), rng=random):
    """Crop a random box of area fraction in `scale` and aspect in `ratio`, resize to size x size."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    return center_crop(resize_short_side(img, size), size)  # fallback: whole image


def to_tensor(img, mean=CLIP_MEAN, std=CLIP_STD):
    """PIL RGB -> float tensor (3, H, W), scaled to [0, 1] then normalised per channel."""
    x = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())  # (3, H, W)


class ImageTransform:
    """Callable PIL image -> (3, size, size) tensor; `train=True` adds random resized crop (+ flip)."""

    def __init__(self, size, train=False, mean=CLIP_MEAN, std=CLIP_STD, scale=(0.5, 1.0), hflip=False, rng=None):
        self.size, self.train, self.mean, self.std = size, train, mean, std
        self.scale, self.hflip, self.rng = scale, hflip, rng or random

    def __call__(self, img):
        if self.train:
            img = random_resized_crop(img, self.size, self.scale, rng=self.rng)
            if self.hflip and self.rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img = center_crop(resize_short_side(img, self.size), self.size)
        return to_tensor(img, self.mean, self.std)
