#!/usr/bin/env bash
# Forward+backward of EfficientNet (default B0, 224x224, batch 8, 2 threads, CPU): effnet vs
# PyTorch eager on the same torch build, alternating rounds in one run; prints the ratio.
#   BENCH_ROUNDS=3 BENCH_VARIANT=b0 BENCH_BATCH=8 BENCH_THREADS=2 scripts/bench-model.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${BENCH_ROUNDS:-3}"
cargo bench -q -p effnet-model --bench fwd_bwd --no-run
OUT="$(mktemp)"
for round in $(seq "$ROUNDS"); do
  cargo bench -q -p effnet-model --bench fwd_bwd | tee -a "$OUT"
  .venv/bin/python benches/pytorch_fwd_bwd.py | tee -a "$OUT"
done
.venv/bin/python - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = {}
for r in rows:
    by.setdefault(r["impl"], []).append(r["median_ms"])
ours, theirs = statistics.median(by["effnet"]), statistics.median(by["pytorch-eager"])
r = rows[0]
print(f"{r['variant']} {r['resolution']}x{r['resolution']} batch {r['batch']} threads {r['threads']}: "
      f"effnet {ours:.1f} ms/step, PyTorch eager {theirs:.1f} ms/step, speed ratio {theirs / ours:.3f}x")
PY
rm -f "$OUT"
