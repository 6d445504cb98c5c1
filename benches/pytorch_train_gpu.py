"""PyTorch-eager baseline for `effnet run` on a GPU (scripts/device-check.sh): torchvision's
EfficientNet-B0...B7 with 1000 classes, bf16 autocast, channels_last, RMSprop with TensorFlow's
settings as far as torch.optim allows (alpha 0.9, momentum 0.9, eps 1e-3, weight decay 1e-5),
label smoothing 0.1, torchvision's stochastic depth 0.2 and per-variant dropout, in training mode.
The batches are random images already on the GPU (a pool of two, alternated), so the baseline pays
nothing for data loading: the comparison is conservative for effnet, whose figures include Parquet
reads, JPEG decoding and augmentation. Every step reads the loss back (`loss.item()`), as effnet's
loop does. cuDNN autotuning (`torch.backends.cudnn.benchmark`) stays at PyTorch's default (off),
as in libtorch under effnet; `--cudnn-benchmark` turns it on.

    python benches/pytorch_train_gpu.py --variant b7 --batch 32 --steps 20 --warmup 5

Prints one JSON line: steady-state training images/s (steps after the warm-up), ms per step and
the CUDA caching allocator's peak (allocated and reserved bytes). A batch that does not fit is
reported as {"error": "out of memory", ...} with exit status 3."""

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

RESOLUTION = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "b4": 380, "b5": 456, "b6": 528, "b7": 600}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(RESOLUTION), default="b0")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, help="default: the variant's")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--optimizer", choices=["rmsprop", "sgd"], default="rmsprop")
    parser.add_argument("--cudnn-benchmark", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    resolution = args.resolution or RESOLUTION[args.variant]
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    model = getattr(torchvision.models, f"efficientnet_{args.variant}")(weights=None, num_classes=args.classes)
    model = model.to(device=device, memory_format=memory_format).train()
    lr = 0.016 * args.batch / 256
    if args.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop(model.parameters(), lr=lr, alpha=0.9, momentum=0.9, eps=1e-3,
                                        weight_decay=1e-5)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-5)

    shape = (args.batch, 3, resolution, resolution)
    pool = [(torch.randn(shape, device=device).contiguous(memory_format=memory_format),
             torch.randint(args.classes, (args.batch,), device=device)) for _ in range(2)]

    def step(i):
        x, y = pool[i % len(pool)]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        return loss.item()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    result = {"impl": "pytorch-eager", "variant": args.variant, "resolution": resolution, "batch": args.batch,
              "precision": args.precision, "channels_last": args.channels_last, "optimizer": args.optimizer,
              "cudnn_benchmark": args.cudnn_benchmark, "torch": torch.__version__,
              "torchvision": torchvision.__version__,
              "device_name": torch.cuda.get_device_name(device) if cuda else "cpu"}
    try:
        for i in range(args.warmup):
            step(i)
        sync()
        started = time.perf_counter()
        for i in range(args.steps):
            loss = step(args.warmup + i)
        sync()
        timed = time.perf_counter() - started
    except torch.OutOfMemoryError as error:
        result.update({"error": "out of memory", "detail": str(error).splitlines()[0]})
        print(json.dumps(result))
        sys.exit(3)
    result.update({"steps": args.steps, "warmup": args.warmup, "images_per_s": args.steps * args.batch / timed,
                   "ms_per_step": 1000 * timed / args.steps, "last_loss": loss})
    if cuda:
        result["peak_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_memory_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
