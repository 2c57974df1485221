"""The training image pipeline, old against new, side by side in one run (issue 18.7): COCO-sized JPEGs (640 x
480, written here) decoded, cropped to 224 and batched by DataLoader workers, as the scripts' loaders do.

    old: full-size decode, float32 normalised on the CPU, each micro batch handed to one worker
    new: full-size decode too (the JPEG draft decode it once used is gone: docs/RESULTS.md), uint8 through the
         workers (normalised on the device by the step: timed here too, on the CPU), each micro batch split over
         the workers (common.data.make_loader)

Reported per variant: images/s over the whole pass (the new pipeline's normalisation, a GPU kernel in the scripts,
excluded; and included, as done here on one CPU thread), the wait for the first batch, and the bytes one batch
carries from the workers to the main process (and then to the GPU).  Medians of interleaved repetitions.

    python bench/image_pipeline.py --images 256 --micro 64 --workers 2 --reps 3
"""
import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from common.data import make_loader  # noqa: E402
from common.image import ImageTransform, load_image  # noqa: E402


def write_jpegs(root, n, seed=0):
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:480, 0:640]
    for i in range(n):  # smooth colour fields plus noise: a photo's JPEG size (~100-200 KB at quality 90)
        base = np.stack([np.sin(xx / (30 + 20 * rng.rand()) + rng.rand() * 6) for _ in range(3)], -1)
        img = (127 + 100 * base + rng.randn(480, 640, 3) * 20).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(root, f"{i:05d}.jpg"), quality=90)
    return sorted(os.listdir(root))


class Images(torch.utils.data.Dataset):
    def __init__(self, root, names, tf):
        self.root, self.names, self.tf = root, names, tf

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        self.tf.rng = random.Random(i)  # per-sample draws, as the scripts seed them
        return self.tf(load_image(os.path.join(self.root, self.names[i])))


def one_pass(ds, batches, workers, new):
    t0 = time.perf_counter()
    if new:
        loader = make_loader(ds, batches, torch.stack, workers)
    else:
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=torch.stack, num_workers=workers)
    first, n, nbytes, t_norm = None, 0, 0, 0.0
    for x in loader:
        nbytes = nbytes or x.numel() * x.element_size()  # a full micro batch, as it leaves the workers
        if new:  # the step's first op on a GPU (a microsecond kernel); here on one CPU thread, timed apart
            t = time.perf_counter()
            x = ds.tf.normalize(x)
            t_norm += time.perf_counter() - t
        first = first or time.perf_counter() - t0
        n += len(x)
    total = time.perf_counter() - t0
    return n / (total - t_norm), n / total, first, nbytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--micro", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        names = write_jpegs(root, args.images)
        batches = [list(range(i, min(i + args.micro, args.images))) for i in range(0, args.images, args.micro)]
        print(f"{args.images} JPEGs 640x480 -> {args.size}, micro batch {args.micro}, {args.workers} workers")
        print("| transform | pipeline | images/s | images/s, normalising on the CPU | first batch (s) | "
              "MB per batch to the main process |")
        print("|---|---|---|---|---|---|")
        for train in (False, True):
            res = {"old": [], "new": []}
            for _ in range(args.reps):
                for name in ("old", "new"):
                    new = name == "new"
                    tf = ImageTransform(args.size, train=train, hflip=train, uint8=new)
                    res[name].append(one_pass(Images(root, names, tf), batches, args.workers, new))
            for name in ("old", "new"):
                ips, cpu, first = (statistics.median(r[k] for r in res[name]) for k in range(3))
                print(f"| {'train (crop 0.5-1, flip)' if train else 'eval'} | {name} | {ips:.1f} | {cpu:.1f} | "
                      f"{first:.2f} | {res[name][0][3] / 2**20:.3g} |", flush=True)


if __name__ == "__main__":
    main()
