"""Image loading and transforms with pillow + numpy (no torchvision).

Every script turns a PIL image into a (3, S, S) tensor with `ImageTransform`.
Evaluation: CLIP's resize of the short side to S (bicubic) + centre crop, or BLIP's / BLIP-2's bicubic
resize of the whole image to S x S (`resize="square"`).  Training: random resized crop (area scale
range, aspect 3/4..4/3), an optional horizontal flip and BLIP's RandomAugment.  The random draws come
from `rng`: Python's `random` module unless a `random.Random` is passed or set.  The scripts set one
per sample, seeded by the run's seed and the sample (its epoch and index; ShardStream: its epoch,
shard and key), so every worker and a resumed run draw the same augmentations: the module's global
state lives in each DataLoader worker, which reseeds it, and a checkpoint's saved RNG state never
reaches it.  Flip is off by default: the toy world's captions say "left of"/"right of", and the
references flip without touching the caption.

On a GPU the loader should ship bytes, not floats: `uint8=True` returns the uint8 image (a quarter
of the float32 bytes through the workers' shared memory and the host-to-device copy) and the step
normalises it on the device with `normalize` -- the same values as the float path.  Every image is
decoded at full resolution, as the references' transforms read it (a JPEG decoded at a reduced DCT
scale and then resized is another image).
"""
import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from common import amp

# CLIP (and BLIP / BLIP-2, which reuse CLIP's statistics) normalisation.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_8bit(im):
    """A 16-bit or 32-bit single-channel image (PIL modes I;16*, I, F) as mode L, or None to leave it
    to `convert` (every other mode, and I/F values that already lie in 0..255).  PIL's own conversion
    clips such values at 255, so a 16-bit PNG comes back nearly white.  I;16*: the high byte.  I/F:
    values in 0..65535 are 16-bit (the high byte); F in 0..1 is scaled by 255; any other range is
    stretched linearly from its min..max to 0..255."""
    if not im.mode.startswith("I") and im.mode != "F":
        return None
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        return Image.fromarray((a.astype(np.uint16) >> 8).astype(np.uint8))
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 255 and not (im.mode == "F" and 0 < hi <= 1):
        return None
    if lo >= 0 and hi <= 1:
        a = a * 255
    elif lo >= 0 and hi <= 65535:
        a = np.floor(a) / 256
    else:
        a = (a - lo) * (255 / (hi - lo) if hi > lo else 0)
    return Image.fromarray(np.clip(np.floor(a), 0, 255).astype(np.uint8))


def load_image(path):
    """Open an image as RGB; return None when the file is missing or unreadable (callers count these).
    16/32-bit grey images (PNG, TIFF) are first brought to 8 bits (`_to_8bit`).  As LAVIS's datasets
    (caption_datasets.py: Image.open(path).convert("RGB")) and transformers' CLIPImageProcessor
    (do_convert_rgb first) do, the image is made RGB before any resize -- CLIP's `_transform`
    converts after its crop, so there a palette image is resized nearest-neighbour.  An EXIF
    orientation tag is not applied, as in LAVIS's and CLIP's loading (transformers' load_image
    helper, image_utils.py, does apply it: a rotated phone photo differs from its image there)."""
    if not path:  # no file named (Pillow 10 takes "" for a file object and fails with AttributeError)
        return None
    try:
        with Image.open(path) as im:
            return (_to_8bit(im) or im).convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        # missing, truncated or corrupt files, and images over PIL's decompression-bomb limit (2x
        # Image.MAX_IMAGE_PIXELS): all count as unreadable under the caller's max_bad_frac rule
        return None


def resize_short_side(img, size, resample=Image.BICUBIC):
    """The short side to `size`, the long one to int(size * long / short) (truncated), as torchvision's
    Resize(int) (transforms/functional.py _compute_resized_output_size; CLIP's clip.load, open_clip) and
    transformers' get_resize_output_image_size (CLIPImageProcessor) size it."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    return img.resize((size, new_long) if w <= h else (new_long, size), resample)


def center_crop(img, size):
    """The central size x size box at torchvision's CenterCrop offset, int(round((w - size) / 2.0))
    (rounding half to even).  transformers' CLIPImageProcessor floors it instead: one pixel apart
    when the margin is odd and its half rounds up."""
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def random_resized_crop(img, size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), rng=random):
    """Crop a random box of area fraction in `scale` and aspect in `ratio`, resize to size x size.
    After 10 failed draws, torchvision's RandomResizedCrop.get_params fallback: the whole image when
    its aspect lies in `ratio`, else the central box of the whole short side at the nearest bound.
    PIL's resize(box=) lets the bicubic filter read just outside the box where torchvision crops first,
    so the outermost output pixels may differ slightly from torchvision's."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    cw, ch = w, h
    if w / h < min(ratio):
        ch = int(round(w / min(ratio)))
    elif w / h > max(ratio):
        cw = int(round(h * max(ratio)))
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))


# ---- BLIP's RandomAugment(2, 5) (BLIP transform/randaugment.py, LAVIS processors/randaugment.py): two
# ops drawn with replacement from ten, each applied with probability 0.5 at magnitude 5 of 10; shears
# 0.15, translations 5 px and rotations 15 degrees take a random sign and fill with grey 128.  At
# magnitude 5 the enhance factor is 5 / 10 * 1.8 + 0.1 = 1.0, so Brightness and Sharpness leave the
# image as it is, as in the released code.
RANDAUG_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
               "TranslateX", "TranslateY", "Rotate")


def rand_augment(img, rng, n=2, m=5, max_level=10):
    grey, sign = (128, 128, 128), (lambda: 1 if rng.random() < 0.5 else -1)
    for op in [rng.choice(RANDAUG_OPS) for _ in range(n)]:
        if rng.random() > 0.5:
            continue
        shear, shift, factor = sign() * 0.3 * m / max_level, sign() * 10 * m / max_level, m / max_level * 1.8 + 0.1
        if op == "AutoContrast":
            img = ImageOps.autocontrast(img)
        elif op == "Equalize":
            img = ImageOps.equalize(img)
        elif op in ("Brightness", "Sharpness"):
            img = getattr(ImageEnhance, op)(img).enhance(factor)
        elif op in ("ShearX", "ShearY", "TranslateX", "TranslateY"):
            coeffs = {"ShearX": (1, shear, 0, 0, 1, 0), "ShearY": (1, 0, 0, shear, 1, 0),
                      "TranslateX": (1, 0, shift, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, shift)}[op]
            img = img.transform(img.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=grey)
        elif op == "Rotate":
            img = img.rotate(sign() * 30 * m / max_level, Image.BILINEAR, fillcolor=grey)
    return img


def to_uint8(img):
    """PIL RGB -> uint8 tensor (3, H, W), not normalised."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())  # (H, W, 3) -> (3, H, W)


def normalize(x, mean=CLIP_MEAN, std=CLIP_STD):
    """uint8 images (..., 3, H, W) on any device -> float32 scaled to [0, 1] and normalised per channel, in the
    same order of operations as `to_tensor` (so the same values)."""
    mean = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def to_tensor(img, mean=CLIP_MEAN, std=CLIP_STD):
    """PIL RGB -> float tensor (3, H, W), scaled to [0, 1] then normalised per channel."""
    x = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())  # (3, H, W)


class ImageTransform:
    """Callable PIL image -> (3, size, size) tensor; `train=True` adds random resized crop (+ flip, + BLIP's
    RandomAugment).  resize: the evaluation geometry, "crop" (CLIP) or "square" (BLIP, BLIP-2 / LAVIS
    blip_image_eval).  uint8: return the uint8 image; `self.normalize(x)` finishes it on the device."""

    def __init__(self, size, train=False, mean=CLIP_MEAN, std=CLIP_STD, scale=(0.5, 1.0), hflip=False, rng=None,
                 resize="crop", randaug=False, uint8=False):
        if resize not in ("crop", "square"):
            raise ValueError(f"resize must be 'crop' or 'square', not {resize!r}")
        self.size, self.train, self.mean, self.std = size, train, mean, std
        self.scale, self.hflip, self.rng = scale, hflip, rng or random
        self.resize, self.randaug, self.uint8 = resize, randaug, uint8

    def load(self, path):
        """Open `path` (decoded in full) and transform it; None when the file is missing or unreadable."""
        img = load_image(path)
        return None if img is None else self(img)

    def normalize(self, x):
        return normalize(x, self.mean, self.std)

    def __call__(self, img):
        if self.train:
            img = random_resized_crop(img, self.size, self.scale, rng=self.rng)
            if self.hflip and self.rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            if self.randaug:
                img = rand_augment(img, self.rng)
        elif self.resize == "square":
            img = img.resize((self.size, self.size), Image.BICUBIC)
        else:
            img = center_crop(resize_short_side(img, self.size), self.size)
        return to_uint8(img) if self.uint8 else to_tensor(img, self.mean, self.std)


# ------------------------------------------------------------------ clips: frame sampling, frozen encoder
def sample_frames(n, k):
    """Indices of k frames out of n at the centres of k equal segments (all of them when n <= k)."""
    return list(range(n)) if n <= k else [int((i + 0.5) * n / k) for i in range(k)]


@torch.no_grad()
def encode_frames(encoder, pixels, frame_mask, dtype):
    """A frozen HF vision tower (CLIPVisionModel) on the real frames only: pixels (B, T, 3, H, W),
    uint8 (normalised here, on the device) or float (normalised) -> its last_hidden_state
    (B, T, S, D) as float32, 0 on padding frames; run under autocast to `dtype` (common.amp)."""
    p = next(encoder.parameters())
    real = frame_mask.flatten().nonzero()[:, 0].to(p.device)  # (N,): a CPU mask, no device sync
    x = pixels.to(p.device, non_blocking=True).flatten(0, 1).index_select(0, real)    # (N, 3, H, W)
    x = normalize(x) if x.dtype == torch.uint8 else x
    with amp.autocast(p.device, dtype):
        h = encoder(pixel_values=x.to(p.dtype)).last_hidden_state                       # (N, S, D)
    out = h.new_zeros((frame_mask.numel(),) + h.shape[1:]).index_copy(0, real, h)    # (B*T, S, D)
    return out.view(frame_mask.shape + h.shape[1:]).float()                           # (B, T, S, D)
