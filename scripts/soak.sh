#!/usr/bin/env bash
# The reliability soak (docs/reliability.md): 10,000 steps on two MPI workers through `effnet run`,
# a checkpoint every 100 steps, store faults throughout and a worker SIGKILLed or SIGSTOPped about
# every 1,000 steps; memory, open files and temporary files sampled every 0.5 s. About 8 minutes on
# an idle 2-core machine. Writes docs/soak/ (soak.md, rss.svg, soak.csv); exits 1 when a check fails.
#
#   make soak                    the whole soak
#   scripts/soak.sh --steps 700  a short one (its checks need at least one epoch: 3,750 steps)
#   EFFNET_SOAK_OUT=docs/soak-local-writer scripts/soak.sh --read-faults
#                                store faults on reads only, so checkpoints go through the
#                                local-disk writer rather than the object-store path
set -euo pipefail
cd "$(dirname "$0")/.."
EFFNET="${CARGO_TARGET_DIR:-target}/release/effnet"
DATA=.work/fashion-mnist
if [[ ! -f "$DATA/train/_manifest.json" ]]; then
  rm -rf "$DATA"
  "$EFFNET" prepare --from fashion-mnist --out "$DATA"
fi
rm -rf .work/soak
exec python3 scripts/soak.py "$EFFNET" "$DATA" .work/soak "${EFFNET_SOAK_OUT:-docs/soak}" "$@"
