#!/usr/bin/env bash
# The main job, the whole system on one machine: Fashion-MNIST (Debian's dataset-fashion-mnist)
# prepared as a Parquet dataset in the local store under .work/fashion-mnist, then the job
# configs/fashion-mnist.yaml submitted to the coordinator `effnet run` starts in-process, trained
# by two CPU workers over MPI (`mpirun -n 2 effnet worker --coordinator ...`), checkpointed,
# evaluated after each epoch, and reported.
#
# Interrupt it at any time: running it again reuses the prepared data and resumes from the newest
# checkpoint; once the job is done, a re-run only reports. EFFNET_DEMO_FRESH=1 starts over.
set -euo pipefail
cd "$(dirname "$0")/.."
EFFNET=target/release/effnet
JOB=configs/fashion-mnist.yaml
RUN=.work/runs/fashion-mnist
DATA=.work/fashion-mnist
started=$SECONDS

if [[ ! -f "$DATA/test/_manifest.json" ]]; then
  rm -rf "$DATA"
  "$EFFNET" prepare --from fashion-mnist --out "$DATA"
else
  echo "prepared data: $DATA (reused)"
fi
prepared=$SECONDS
echo
"$EFFNET" run "$JOB" --check
echo
if [[ "${EFFNET_DEMO_FRESH:-}" == 1 ]]; then
  "$EFFNET" run "$JOB" --fresh
else
  "$EFFNET" run "$JOB"
fi
echo
echo "report:  $RUN/report/report.html (also report.md, report.json)"
echo "logs:    $RUN/metrics.jsonl, $RUN/summary.json; the coordinator's state in $RUN/coordinator/"
python3 - "$RUN/summary.json" "$((prepared - started))" "$((SECONDS - started))" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
plan, model = summary["plan"], summary["plan"]["model"]
val, ema = summary.get("val") or {}, summary.get("val_ema") or {}
best = max((v for v in (val.get("top1"), ema.get("top1")) if v is not None), default=None)
print(f"trained: {model['architecture']} ({model['parameters']:,} parameters) at "
      f"{plan['resolution']}x{plan['resolution']} on {plan['train_samples']:,} images by "
      f"{summary.get('world_size', 1)} workers")
if best is not None:
    print(f"test top-1: {100 * best:.2f}% (raw {100 * (val.get('top1') or 0):.2f}%, "
          f"EMA {100 * (ema.get('top1') or 0):.2f}%)")
print(f"wall: {int(sys.argv[3]) // 60} min {int(sys.argv[3]) % 60} s "
      f"(preparation {sys.argv[2]} s)")
PY
