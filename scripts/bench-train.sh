#!/usr/bin/env bash
# Training throughput on Fashion-MNIST, B0 at 32×32 with one input channel, batch 64, 2 threads,
# AdamW, label smoothing 0.1, drop path 0.2, dropout 0.2: `effnet run` (full pipeline from Parquet,
# PNG decode and augmentation included) against PyTorch eager with the images already in memory.
# Steady state: the first BENCH_WARMUP steps are left out. Prints both and the ratio.
#   BENCH_STEPS=100 BENCH_WARMUP=10 scripts/bench-train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${BENCH_STEPS:-100}"
WARMUP="${BENCH_WARMUP:-10}"
source scripts/fmnist-bench.sh
bench_job "$WORK/job.yaml" train $((STEPS + WARMUP)) 64 2
"$EFFNET" run "$WORK/job.yaml" --progress never > /dev/null
.venv/bin/python benches/pytorch_train_fmnist.py > "$WORK/pytorch.json"
.venv/bin/python - "$WORK/train/metrics.jsonl" "$WORK/pytorch.json" "$WARMUP" <<'PY'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1])]
steps = [s for s in steps if s["type"] == "step" and s["step"] > int(sys.argv[3])]
ours = sum(64 for _ in steps) / sum(s["step_s"] for s in steps)
wait = sum(s["data_wait"] * s["step_s"] for s in steps) / sum(s["step_s"] for s in steps)
theirs = json.load(open(sys.argv[2]))["images_per_s"]
print(f"B0 32x32 1-channel batch 64, 2 threads, {len(steps)} steps: effnet {ours:.1f} images/s "
      f"(data wait {100 * wait:.1f}%), PyTorch eager {theirs:.1f} images/s, ratio {ours / theirs:.2f}x")
PY
