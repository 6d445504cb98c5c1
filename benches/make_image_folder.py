#!/usr/bin/env python3
"""Write a synthetic ImageNet-format image folder (one folder per class, JPEG files) with Pillow and
NumPy alone: no photographs, no downloads, so it runs on a machine without network (the GPU device
check, scripts/device-check.sh). The pixels carry no class signal; the folder exists to time the
input pipeline and the model at ImageNet's shapes.

Each image is a coarse random colour field upsampled (bicubic) to about 500x375 (width 440-560,
height 3/4 of it +-10%, as ImageNet's mean), with a few filled shapes and mild noise, saved at
JPEG quality 90, 4:2:0: smooth areas and edges, so decode cost and file size (~30-60 KB) are
photo-like rather than those of pure noise (which decodes slower and is 4x larger).

    python benches/make_image_folder.py --out /tmp/folder --classes 1000 --per-class 4 --seed 0

Prints one JSON line: files, classes, mean size and bytes.
"""

import argparse
import json
import multiprocessing
import os
import random

import numpy as np
from PIL import Image, ImageDraw


def make_image(seed):
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    width = rng.randint(440, 560)
    height = round(width * 0.75 * rng.uniform(0.9, 1.1))
    coarse = noise.integers(0, 256, size=(rng.randint(3, 8), rng.randint(4, 10), 3), dtype=np.uint8)
    image = Image.fromarray(coarse, "RGB").resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 6)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randint(20, width // 2), y0 + rng.randint(20, height // 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    pixels = np.asarray(image, dtype=np.int16)
    pixels = pixels + noise.integers(-6, 7, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def write_one(task):
    path, seed, quality = task
    image = make_image(seed)
    image.save(path, "JPEG", quality=quality)
    return image.width, image.height, os.path.getsize(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write CLASS/NNNNN.jpg into")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    tasks = []
    for label in range(args.classes):
        folder = os.path.join(args.out, f"n{label:08d}")  # ImageNet-style synset-like names
        os.makedirs(folder, exist_ok=True)
        for index in range(args.per_class):
            number = label * args.per_class + index
            tasks.append((os.path.join(folder, f"{number:07d}.jpg"), args.seed * 1_000_003 + number, args.quality))
    with multiprocessing.Pool(max(1, args.workers)) as pool:
        written = pool.map(write_one, tasks, chunksize=16)
    count = len(written)
    print(json.dumps({
        "files": count,
        "classes": args.classes,
        "seed": args.seed,
        "mean_width": sum(w for w, _, _ in written) / count,
        "mean_height": sum(h for _, h, _ in written) / count,
        "mean_bytes": sum(b for _, _, b in written) / count,
    }))


if __name__ == "__main__":
    main()
