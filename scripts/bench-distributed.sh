#!/usr/bin/env bash
# Data-parallel training throughput on this machine: the same global batch (64) trained by one
# process (2 threads) and by two MPI ranks (`effnet run` launches `mpirun -n 2 effnet worker`,
# one core and one thread each, batch 32 per rank), with f32 and bf16 gradient all-reduce.
# B0 at 32×32, one input channel, on Fashion-MNIST; steady state (the first BENCH_WARMUP steps
# are left out). Prints images/s, the ratio against one process, and the share of step time
# spent in the all-reduce (rank 0's). The two-rank runs go with the all-reduce overlapped with
# backward (`distributed.overlap`, the default) in 25 MiB and 4 MiB buckets, and without it.
#   BENCH_STEPS=60 BENCH_WARMUP=10 scripts/bench-distributed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${BENCH_STEPS:-60}"
WARMUP="${BENCH_WARMUP:-10}"
EFFNET=target/release/effnet
DATA=.work/fashion-mnist
[[ -f "$DATA/train/_manifest.json" ]] || "$EFFNET" prepare --from fashion-mnist --out "$DATA"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

job() { # name workers batch threads gradient_dtype [overlap] [bucket_mb]
  cat > "$WORK/$1.yaml" <<YAML
name: bench-$1
job_dir: $WORK/$1
model: {variant: b0, input_channels: 1, resolution: 32, dropout: 0.2, drop_path: {rate: 0.2}}
data:
  train: $DATA/train
  batch_size: $3
  loader_threads: 1
  normalization: fashion_mnist
  augmentation: {crop_scale: [0.6, 1.0], crop_ratio: [0.8, 1.25]}
optimizer: {kind: adamw, lr: 0.008, weight_decay: 0.05, label_smoothing: 0.1}
schedule: {kind: cosine, warmup_steps: 10}
training: {steps: $((STEPS + WARMUP)), threads: $4, ema: {enabled: false}}
checkpoint: {at_epoch_end: false}
distributed: {workers: $2, backend: $([[ $2 == 1 ]] && echo local || echo mpi), gradient_dtype: $5, overlap: ${6:-true}, bucket_mb: ${7:-25}}
YAML
  "$EFFNET" run "$WORK/$1.yaml" --progress never > /dev/null
}

job single 1 64 2 f32
job mpi-f32 2 32 1 f32 false
job mpi-bf16 2 32 1 bf16 false
job mpi-overlap 2 32 1 f32 true 25
job mpi-overlap-4 2 32 1 f32 true 4

.venv/bin/python - "$WORK" "$WARMUP" <<'PY'
import json, sys
work, warmup = sys.argv[1], int(sys.argv[2])

def measure(name):
    steps = [json.loads(l) for l in open(f"{work}/{name}/metrics.jsonl")]
    steps = [s for s in steps if s["type"] == "step" and s["step"] > warmup]
    seconds = sum(s["step_s"] for s in steps)
    images = 64 * len(steps)
    comm = sum(s.get("comm", 0.0) * s["step_s"] for s in steps) / seconds
    return images / seconds, comm, len(steps)

base, _, n = measure("single")
print(f"B0 32x32 1-channel, global batch 64, {n} steps after {warmup} warm-up steps")
print(f"| setup | images/s | vs 1 process | vs all-reduce after backward | all-reduce share of step time |")
print(f"|---|---|---|---|---|")
print(f"| 1 process, 2 threads | {base:.1f} | 1.00x | - | - |")
serial, _, _ = measure("mpi-f32")
for name, label in [
    ("mpi-f32", "2 MPI ranks x 1 thread, f32 gradients, all-reduce after backward"),
    ("mpi-bf16", "2 MPI ranks x 1 thread, bf16 gradients, all-reduce after backward"),
    ("mpi-overlap", "2 MPI ranks x 1 thread, f32, overlapped with backward, 25 MiB buckets"),
    ("mpi-overlap-4", "2 MPI ranks x 1 thread, f32, overlapped with backward, 4 MiB buckets"),
]:
    ips, comm, _ = measure(name)
    print(f"| {label} | {ips:.1f} | {ips / base:.2f}x | {ips / serial:.2f}x | {100 * comm:.1f}% |")
PY
