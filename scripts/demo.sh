#!/usr/bin/env bash
# The main job. Until the trainer lands: the model table (every variant built here, checked against
# torchvision's parameter counts and the paper's FLOPs), then Fashion-MNIST from Debian's
# dataset-fashion-mnist prepared as a Parquet dataset under .work/fashion-mnist and verified.
set -euo pipefail
cd "$(dirname "$0")/.."
EFFNET=target/release/effnet
"$EFFNET" model summary --all
echo
"$EFFNET" model summary --variant b7
echo
DATA=.work/fashion-mnist
if [[ ! -f "$DATA/test/_manifest.json" ]]; then
  rm -rf "$DATA"
  "$EFFNET" prepare --from fashion-mnist --out "$DATA"
fi
"$EFFNET" data inspect "$DATA/train"
"$EFFNET" data verify "$DATA/test"
