"""Export reference EfficientNets from torchvision or timm for the parity tests.

For each case: build the model with random weights, give every BatchNorm non-trivial affine
parameters and running statistics (calibrated on random batches, so eval-mode activations are
neither ~0 nor exploding: with untouched statistics the logits are ~1e-13 and any model would
"match"), then save

    <out>/<name>/weights.safetensors   the state dict, with the library's own key names
    <out>/<name>/input.npy             N x C x H x W float32
    <out>/<name>/expected.npy          eval-mode logits, N x classes float32
    <out>/<name>/meta.json             logits std, multiply-adds from torch's FLOP counter

Usage: python export_reference.py OUT_DIR CASES_JSON
CASES_JSON is a list of {"name", "source": "torchvision"|"timm", "variant": "b0".., "resolution",
"batch", "classes", "input_channels", "seed"}.
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode


def build(source, variant, classes, input_channels):
    if source == "torchvision":
        import torchvision

        model = getattr(torchvision.models, f"efficientnet_{variant}")(weights=None, num_classes=classes)
        if input_channels != 3:
            stem = model.features[0][0]
            model.features[0][0] = torch.nn.Conv2d(
                input_channels, stem.out_channels, 3, stride=2, padding=1, bias=False
            )
        return model
    if source == "timm":
        import timm

        return timm.create_model(
            f"efficientnet_{variant}", pretrained=False, num_classes=classes, in_chans=input_channels
        )
    raise SystemExit(f"unknown source {source!r}")


def randomise_batch_norm(model, generator):
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in norms:
            bn.weight.copy_(torch.empty_like(bn.weight).uniform_(0.5, 1.5, generator=generator))
            bn.bias.copy_(torch.empty_like(bn.bias).normal_(0.0, 0.2, generator=generator))
    return norms


def export(case, out_dir):
    torch.manual_seed(case["seed"])
    generator = torch.Generator().manual_seed(case["seed"])
    model = build(case["source"], case["variant"], case["classes"], case["input_channels"])
    norms = randomise_batch_norm(model, generator)
    shape = (case["batch"], case["input_channels"], case["resolution"], case["resolution"])
    # Calibrate in one eval-mode pass: a pre-hook sets each BatchNorm's running statistics from
    # the input it actually receives (upstream layers already use their calibrated statistics),
    # so eval activations stay well scaled however deep the network is.
    def calibrate(module, args):
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    model.eval()
    hooks = [bn.register_forward_pre_hook(calibrate) for bn in norms]
    calibration_shape = (max(8, shape[0]),) + shape[1:]
    with torch.no_grad():
        model(torch.randn(calibration_shape, generator=generator))
    for hook in hooks:
        hook.remove()
    model.eval()
    inputs = torch.randn(shape, generator=generator)
    with torch.no_grad():
        logits = model(inputs)
        counter = FlopCounterMode(display=False)
        with counter:
            model(inputs[:1])
    target = os.path.join(out_dir, case["name"])
    os.makedirs(target, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(target, "weights.safetensors"))
    np.save(os.path.join(target, "input.npy"), inputs.numpy().astype(np.float32))
    np.save(os.path.join(target, "expected.npy"), logits.numpy().astype(np.float32))
    meta = {
        "logits_std": float(logits.std()),
        "logits_abs_max": float(logits.abs().max()),
        # FlopCounterMode counts 2 FLOPs per multiply-add.
        "multiply_adds": int(counter.get_total_flops() // 2),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "torch": torch.__version__,
    }
    with open(os.path.join(target, "meta.json"), "w") as f:
        json.dump(meta, f)
    print(json.dumps({"case": case["name"], **meta}))


def main():
    out_dir, cases = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    for case in cases:
        export(case, out_dir)


if __name__ == "__main__":
    main()
