#!/usr/bin/env python3
"""Python baseline for the per-sample image pipeline, one core.

What a PyTorch DataLoader worker does per training sample: Pillow decode from bytes, then
torchvision.transforms v1 RandomResizedCrop(224) -> RandomHorizontalFlip -> ToTensor -> Normalize
(ImageNet statistics). Files are read into memory first so only decode + augmentation is timed, as
in the Rust benchmark (crates/effnet-vision/benches/pipeline.rs). Prints one JSON line.

    .venv/bin/python benches/python_image_pipeline.py --dir /tmp/jpeg-corpus --passes 3
"""

import argparse
import io
import json
import os
import time

import torch
from PIL import Image
from torchvision import transforms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--decode-only", action="store_true", help="time Pillow decode alone")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    names = sorted(n for n in os.listdir(args.dir) if n.lower().endswith((".jpg", ".jpeg", ".png")))
    blobs = [open(os.path.join(args.dir, n), "rb").read() for n in names]
    transform = transforms.Compose([
        transforms.RandomResizedCrop(args.size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])

    def one(blob):
        image = Image.open(io.BytesIO(blob))
        image = image.convert("RGB")  # forces the decode, as torchvision's default loader does
        if args.decode_only:
            return image
        return transform(image)

    for blob in blobs[:50]:  # warm-up
        one(blob)
    start = time.perf_counter()
    checksum = 0.0
    for _ in range(args.passes):
        for blob in blobs:
            out = one(blob)
            if not args.decode_only:
                checksum += float(out[0, 0, 0])
    elapsed = time.perf_counter() - start
    images = len(blobs) * args.passes
    print(json.dumps({
        "pipeline": "pillow-decode" if args.decode_only else "pillow+torchvision-v1 rrc224-flip-totensor-normalize",
        "files": len(blobs),
        "passes": args.passes,
        "threads": 1,
        "seconds": round(elapsed, 3),
        "images_per_s": round(images / elapsed, 1),
        "checksum": round(checksum, 3),
    }))


if __name__ == "__main__":
    main()
