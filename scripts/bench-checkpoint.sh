#!/usr/bin/env bash
# Checkpoint save of a B7-sized training state (model + RMSProp-TF slots + EMA, 1,064 MB) to a
# local directory against a raw sequential write of the same bytes to the same disk, and the
# training-thread stall of a save (crates/effnet-train/benches/checkpoint_save.rs).
#   EFFNET_BENCH_DIR=/mnt/fast scripts/bench-checkpoint.sh   (default .work/bench-checkpoint)
#   EFFNET_BENCH_THREADS=1 scripts/bench-checkpoint.sh       (training threads; default every core)
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench -p effnet-train --bench checkpoint_save
