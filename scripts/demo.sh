#!/usr/bin/env bash
# The main job: Fashion-MNIST (Debian's dataset-fashion-mnist) prepared as a Parquet dataset under
# .work/fashion-mnist, then EfficientNet-B0 (one input channel, 32×32) trained for two epochs on the
# CPU with configs/fashion-mnist-b0.yaml, evaluated after each epoch, checkpointed, and summarised.
# Interrupt it at any time: running it again resumes from the newest checkpoint. Set
# EFFNET_DEMO_FRESH=1 to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
EFFNET=target/release/effnet
"$EFFNET" model summary --variant b0 --classes 10 --resolution 32 --input-channels 1
echo
DATA=.work/fashion-mnist
if [[ ! -f "$DATA/test/_manifest.json" ]]; then
  rm -rf "$DATA"
  "$EFFNET" prepare --from fashion-mnist --out "$DATA"
fi
"$EFFNET" data verify "$DATA/test"
echo
JOB=configs/fashion-mnist-b0.yaml
"$EFFNET" run "$JOB" --check
echo
if [[ "${EFFNET_DEMO_FRESH:-}" == 1 ]]; then
  "$EFFNET" run "$JOB" --fresh
else
  "$EFFNET" run "$JOB"
fi
echo
echo "report: .work/runs/fashion-mnist-b0/report/report.html (also report.md, report.json)"
echo "metrics: .work/runs/fashion-mnist-b0/metrics.jsonl  summary: .work/runs/fashion-mnist-b0/summary.json"
