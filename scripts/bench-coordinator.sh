#!/usr/bin/env bash
# Coordinator scale check (issue 14): 1,000 simulated workers heartbeating at 1 Hz against one
# `effnet coordinator` process on this machine (loopback, temporary state directory and token).
# The load generator is crates/effnet-coordinator/benches/heartbeats.rs: one current-thread tokio
# runtime, the crate's Client (reqwest, one shared keep-alive pool), one job of 1,000 ranks, each
# worker heartbeating with progress once a second at a random phase. Prints requests/s, p50/p99/max
# latency and the CPU share of one core of the coordinator (from /proc/PID/stat), of the load
# generator and of the rest of the machine over the measurement window. Release builds.
#   BENCH_WORKERS=1000 BENCH_WARMUP_S=5 BENCH_MEASURE_S=30 scripts/bench-coordinator.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p effnet-cli
cargo bench -q -p effnet-coordinator --bench heartbeats --no-run
COORD_BENCH_EFFNET="$PWD/target/release/effnet" \
COORD_BENCH_WORKERS="${BENCH_WORKERS:-1000}" \
COORD_BENCH_WARMUP_S="${BENCH_WARMUP_S:-5}" \
COORD_BENCH_MEASURE_S="${BENCH_MEASURE_S:-30}" \
  cargo bench -q -p effnet-coordinator --bench heartbeats
