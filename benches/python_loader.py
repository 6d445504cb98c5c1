"""Python baseline for the input pipeline: the same Parquet dataset read with pyarrow in a torch
DataLoader, each worker owning a share of the row groups, Pillow decode and torchvision transforms
(RandomResizedCrop(224), RandomHorizontalFlip, ToTensor, Normalize). Prints one JSON line.

    .venv/bin/python benches/python_loader.py DATASET_DIR --workers 1 --passes 2
"""

import argparse
import io
import json
import os
import time

import pyarrow.parquet as pq
import torch
from PIL import Image
from torchvision import transforms


class RowGroups(torch.utils.data.IterableDataset):
    def __init__(self, root):
        manifest = json.load(open(os.path.join(root, "_manifest.json")))
        self.groups = [
            (os.path.join(root, part["path"]), index)
            for part in manifest["files"]
            for index in range(len(part["row_groups"]))
        ]
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ])

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.groups if info is None else self.groups[info.id :: info.num_workers]
        files = {}
        for path, index in mine:
            file = files.setdefault(path, pq.ParquetFile(path))
            table = file.read_row_group(index, columns=["image", "label"])
            for image, label in zip(table.column("image").to_pylist(), table.column("label").to_pylist()):
                with Image.open(io.BytesIO(image)) as decoded:
                    yield self.transform(decoded.convert("RGB")), label


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    best, images = 0.0, 0
    for _ in range(args.passes):
        loader = torch.utils.data.DataLoader(RowGroups(args.root), batch_size=args.batch, num_workers=args.workers)
        start = time.perf_counter()
        images = 0
        for batch, labels in loader:
            images += len(labels)
        best = max(best, images / (time.perf_counter() - start))
    print(json.dumps({"impl": "pytorch-dataloader", "workers": args.workers, "batch": args.batch, "images": images,
                      "images_per_s": round(best, 1), "images_per_s_per_worker": round(best / args.workers, 1)}))


if __name__ == "__main__":
    main()
