"""PyTorch-eager twin of crates/effnet-model/benches/fwd_bwd.rs: torchvision's EfficientNet, one
training step (forward in train mode, cross-entropy, backward, no optimiser), median time.
Same environment variables; prints one JSON line."""

import json
import os
import time

import torch
import torchvision

variant = os.environ.get("BENCH_VARIANT", "b0")
resolution = int(os.environ.get("BENCH_RESOLUTION", 224))
batch = int(os.environ.get("BENCH_BATCH", 8))
threads = int(os.environ.get("BENCH_THREADS", 2))
warmup = int(os.environ.get("BENCH_WARMUP", 3))
steps = int(os.environ.get("BENCH_STEPS", 10))

torch.set_num_threads(threads)
torch.manual_seed(0)
model = getattr(torchvision.models, f"efficientnet_{variant}")(weights=None)
model.train()
images = torch.randn(batch, 3, resolution, resolution)
labels = torch.randint(1000, (batch,))
loss_fn = torch.nn.CrossEntropyLoss()


def step():
    model.zero_grad(set_to_none=False)
    loss = loss_fn(model(images), labels)
    loss.backward()


for _ in range(warmup):
    step()
times = []
for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
times.sort()
median = times[len(times) // 2]
print(json.dumps({"impl": "pytorch-eager", "variant": variant, "resolution": resolution, "batch": batch,
                  "threads": threads, "steps": steps, "median_ms": round(median * 1e3, 2),
                  "images_per_s": round(batch / median, 2), "torch": torch.__version__}))
