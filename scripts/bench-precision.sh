#!/usr/bin/env bash
# CPU training throughput of the precision and memory-format choices, on the settings of
# scripts/bench-train.sh (B0 at 32×32, one channel, batch 64, 2 threads, Fashion-MNIST):
# fp32 and bf16 autocast, each with and without channels_last. Steady state (the first
# BENCH_WARMUP steps are left out). Prints images/s and the ratio against fp32 NCHW.
#   BENCH_STEPS=60 BENCH_WARMUP=10 scripts/bench-precision.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${BENCH_STEPS:-60}"
WARMUP="${BENCH_WARMUP:-10}"
source scripts/fmnist-bench.sh
bench_job "$WORK/job.yaml" precision $((STEPS + WARMUP)) 64 2
for precision in fp32 bf16; do
  for layout in false true; do
    "$EFFNET" run "$WORK/job.yaml" --progress never --set "job_dir=$WORK/$precision-$layout" \
      --set "training.precision=$precision" --set "training.channels_last=$layout" > /dev/null
  done
done
.venv/bin/python - "$WORK" "$WARMUP" <<'PY'
import json, sys
work, warmup = sys.argv[1], int(sys.argv[2])

def measure(name):
    steps = [json.loads(l) for l in open(f"{work}/{name}/metrics.jsonl")]
    steps = [s for s in steps if s["type"] == "step" and s["step"] > warmup]
    return 64 * len(steps) / sum(s["step_s"] for s in steps)

base = measure("fp32-false")
print("| precision | channels_last | images/s | vs fp32 NCHW |")
print("|---|---|---|---|")
for precision in ["fp32", "bf16"]:
    for layout in ["false", "true"]:
        ips = measure(f"{precision}-{layout}")
        print(f"| {precision} | {layout} | {ips:.1f} | {ips / base:.2f}x |")
PY
