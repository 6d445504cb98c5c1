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
source scripts/fmnist-bench.sh

job() { # name workers batch threads gradient_dtype [overlap] [bucket_mb]
  local backend
  backend=$([[ $2 == 1 ]] && echo local || echo mpi)
  bench_job "$WORK/$1.yaml" "$1" $((STEPS + WARMUP)) "$3" "$4" \
    "distributed: {workers: $2, backend: $backend, gradient_dtype: $5, overlap: ${6:-true}, bucket_mb: ${7:-25}}"
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
