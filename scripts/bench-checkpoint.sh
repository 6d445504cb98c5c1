#!/usr/bin/env bash
# Checkpoint save of a B7-sized training state (model + RMSProp-TF slots + EMA, 1,064 MB) to a
# local directory against a raw sequential write of the same bytes to the same disk, and the
# training-thread stall of a save (crates/effnet-train/benches/checkpoint_save.rs).
#   EFFNET_BENCH_DIR=/mnt/fast scripts/bench-checkpoint.sh   (default .work/bench-checkpoint)
#   EFFNET_BENCH_THREADS=1 scripts/bench-checkpoint.sh       (training threads; default every core)
#   EFFNET_BENCH_SAVE_PRIORITY=idle|1..19                    (the save's threads: SCHED_IDLE or nice)
#   EFFNET_BENCH_YIELD_CORE=1                                (one training thread fewer during a save)
#   EFFNET_BENCH_WINDOW_STEPS=4 EFFNET_BENCH_PAIRS=24        (stall windows: steps each, pairs; 10 and 8)
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench -p effnet-train --bench checkpoint_save
