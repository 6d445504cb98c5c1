#!/usr/bin/env bash
# The main job. Until the trainer lands it is the model table: every variant built here,
# checked against torchvision's parameter counts and the paper's FLOPs.
set -euo pipefail
cd "$(dirname "$0")/.."
EFFNET=target/release/effnet
"$EFFNET" model summary --all
echo
"$EFFNET" model summary --variant b7
