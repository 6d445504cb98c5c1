#!/usr/bin/env python3
"""Write a reproducible corpus of ImageNet-sized JPEGs for image-pipeline benchmarks.

Sources are scikit-image's bundled sample photographs (no download), so the corpus can be rebuilt
anywhere from the same seed. Each file is a random crop of a random photo, resized to about
500x375 (width 440-560, height 3/4 of it +-10%, mean 500x375), saved at
JPEG quality 90 with 4:2:0 chroma subsampling (Pillow's default, as most camera JPEGs).

    .venv/bin/python benches/make_jpeg_corpus.py --out /tmp/jpeg-corpus --count 2000 --seed 0
"""

import argparse
import json
import os
import random

import numpy as np
from PIL import Image
from skimage import data

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "retina", "camera"]


def load_photos():
    photos = []
    for name in PHOTOS:
        loader = getattr(data, name, None)
        if loader is None:
            continue
        array = np.asarray(loader())
        if array.ndim == 2:  # camera is grey; keep one grey source like ImageNet's few grey files
            image = Image.fromarray(array, mode="L")
        else:
            image = Image.fromarray(array[..., :3]).convert("RGB")
        photos.append((name, image))
    return photos


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write NNNNN.jpg files into")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    photos = load_photos()
    os.makedirs(args.out, exist_ok=True)
    widths, heights, sizes = [], [], []
    for index in range(args.count):
        name, photo = photos[rng.randrange(len(photos))]
        width = rng.randint(440, 560)
        height = round(width * 0.75 * rng.uniform(0.9, 1.1))
        # A random crop covering 60-100% of the photo's shorter side at the target aspect, then a
        # resize to (width, height): varied content, realistic JPEG statistics.
        aspect = width / height
        crop_h = int(min(photo.height, photo.width / aspect) * rng.uniform(0.6, 1.0))
        crop_w = int(crop_h * aspect)
        left = rng.randint(0, photo.width - crop_w)
        top = rng.randint(0, photo.height - crop_h)
        image = photo.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        path = os.path.join(args.out, f"{index:05d}.jpg")
        image.save(path, "JPEG", quality=args.quality)
        widths.append(width)
        heights.append(height)
        sizes.append(os.path.getsize(path))
    summary = {
        "files": args.count,
        "seed": args.seed,
        "quality": args.quality,
        "mean_width": sum(widths) / len(widths),
        "mean_height": sum(heights) / len(heights),
        "mean_bytes": sum(sizes) / len(sizes),
        "sources": [name for name, _ in photos],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
