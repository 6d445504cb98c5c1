"""PyTorch-eager baseline for `effnet run` on Fashion-MNIST: torchvision's EfficientNet-B0 with a
one-channel stem and 10 classes at 32x32, batch 64, AdamW, label smoothing 0.1, stochastic depth
0.2, dropout 0.2, 2 threads. Images are decoded from the idx files once and kept in memory as a
tensor (random crop + flip on tensors), so the baseline pays nothing for data loading: the
comparison is conservative for effnet, whose numbers include Parquet reads and PNG decoding.

    BENCH_STEPS=100 BENCH_WARMUP=10 BENCH_THREADS=2 python benches/pytorch_train_fmnist.py [IDX_DIR]

Prints one JSON line: steady-state training images/s (steps after the warm-up)."""

import gzip
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

source = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist"
steps = int(os.environ.get("BENCH_STEPS", 100))
warmup = int(os.environ.get("BENCH_WARMUP", 10))
threads = int(os.environ.get("BENCH_THREADS", 2))
batch = int(os.environ.get("BENCH_BATCH", 64))


def idx(name):
    for candidate in (name, name + ".gz"):
        path = os.path.join(source, candidate)
        if os.path.exists(path):
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rb") as f:
                data = f.read()
            dims = data[3]
            shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
            return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)
    raise SystemExit(f"{name} not found under {source}")


torch.set_num_threads(threads)
torch.manual_seed(0)
images = torch.from_numpy(idx("train-images-idx3-ubyte").copy()).float().div_(255).unsqueeze(1)
labels = torch.from_numpy(idx("train-labels-idx1-ubyte").astype(np.int64))
images = (images - 0.2860) / 0.3530

model = torchvision.models.efficientnet_b0(weights=None, num_classes=10, stochastic_depth_prob=0.2)
stem = model.features[0][0]
model.features[0][0] = torch.nn.Conv2d(1, stem.out_channels, 3, stride=2, padding=1, bias=False)
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)


def batch_at(i):
    index = torch.randint(len(images), (batch,))
    x = F.interpolate(images[index], size=36, mode="bilinear", align_corners=False)
    dx, dy = torch.randint(5, (2,)).tolist()
    x = x[:, :, dy : dy + 32, dx : dx + 32]
    if i % 2:
        x = x.flip(3)
    return x.contiguous(), labels[index]


timed = 0.0
for i in range(warmup + steps):
    x, y = batch_at(i)
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    loss.item()
    if i >= warmup:
        timed += time.perf_counter() - started
print(json.dumps({"impl": "pytorch-eager", "steps": steps, "batch": batch, "threads": threads,
                  "images_per_s": steps * batch / timed, "ms_per_step": 1000 * timed / steps}))
