#!/usr/bin/env bash
# The GPU device check: one command, at most 8 minutes on one H200, no network needed.
#
# NOT YET RUN ON A GPU. It was written on a CPU machine and only its rehearsal (below) has run;
# the first run on a GPU machine is its real test. Read its output before trusting its figures.
#
# On the build machine (CPU, with the CUDA torch wheels: docs/gpu.md):
#   make device-bundle       # -> target/device/effnet-device.tar.xz (stripped CUDA build, ~15 MB)
# Copy the repository with target/device to the GPU machine (target/ is ignored by git), then there:
#   scripts/device-check.sh  # OUT=DIR: also write the report, the log and raw results into DIR
#
# The GPU machine needs a Python with torch 2.11.0 (CUDA), torchvision, Pillow, NumPy and the
# nvidia-nccl wheel (PYTHON, default python3). LD_LIBRARY_PATH is set to that torch's lib folder
# and the NCCL wheel's, so the binaries built here load the GPU machine's libtorch; Open MPI
# libraries missing there are taken from the bundle.
#
# Phases, each under its own `timeout`, all inside one budget (DEVICE_CHECK_BUDGET_S, 450 s), so a
# hung phase cannot eat the rest; a phase without enough budget left is skipped and says so:
#   (a) the collective conformance suite on NCCL, world 1 (effnet-collective-check --backend nccl)
#   (b) `effnet run` steps of B0@224 (batch 256) and B7@600 (batch 32), bf16 + channels_last, on
#       a generated ImageNet-format JPEG folder (`effnet prepare --from image-folder`): images/s
#       from metrics.jsonl after the warm-up steps, peak GPU memory
#       (the B7 run saves one checkpoint in its timed steps: the stall it costs, in steps)
#   (d) the same steps in PyTorch eager (benches/pytorch_train_gpu.py), and the effnet/PyTorch ratios
#   (a) the NCCL gradient path inside training: `effnet worker` as rank 0 of a world of 1
#   (c) the largest B7@600 batch that fits, a bounded search (a few tries of 3 steps each)
# Output: a Markdown block ready for docs/benchmarks.md, on stdout and in $OUT/device-check.md.
#
# Rehearsal on a CPU machine (tiny sizes, no GPU, no NCCL), to check the script itself:
#   scripts/device-check.sh --rehearse      # uses .venv/bin/python and target/{release,debug}
#
# Knobs: PYTHON, EFFNET_DEVICE_BUNDLE (tarball), EFFNET_BIN + EFFNET_CHECK_BIN (unpacked binaries
# instead), DEVICE_CHECK_BUDGET_S, DEVICE_CHECK_WORK (work folder, kept), DEVICE_CHECK_SEARCH_TRIES.
set -uo pipefail   # no -e: a failed phase is reported and the next one still runs

cd "$(dirname "$0")/.." || exit 2
ROOT="$(pwd)"
REHEARSE=0
case "${1:-}" in
  --rehearse) REHEARSE=1 ;;
  "") ;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) echo "device-check: unknown argument $1 (--rehearse, --help)" >&2; exit 2 ;;
esac

START=$SECONDS
BUDGET_S="${DEVICE_CHECK_BUDGET_S:-450}"
if [[ -n "${DEVICE_CHECK_WORK:-}" ]]; then
  WORK="$DEVICE_CHECK_WORK"; mkdir -p "$WORK"; KEEP_WORK=1
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/effnet-device-check.XXXXXX")"; KEEP_WORK=0
fi
WORK="$(cd "$WORK" && pwd)"
FACTS="$WORK/facts"        # key=value lines: what the report is made of
LOGS="$WORK/logs"
mkdir -p "$LOGS" "$WORK/runs" "$WORK/syslib" "$WORK/nccl-link"
: > "$FACTS"
TEE_PID=""
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/device-check.log") 2>&1
  TEE_PID=$!
fi
SAMPLER_PID=""
cleanup() {
  [[ -n "$SAMPLER_PID" ]] && kill "$SAMPLER_PID" 2> /dev/null
  (( KEEP_WORK )) || rm -rf "$WORK"
  if [[ -n "$TEE_PID" ]]; then   # let tee finish the log before the script ends
    exec 1>&- 2>&-
    wait "$TEE_PID" 2> /dev/null
  fi
}
trap cleanup EXIT

say() { echo "device-check [$((SECONDS - START))s]: $*"; }
fact() { printf '%s=%s\n' "$1" "$2" >> "$FACTS"; }
problem() { say "PROBLEM: $*"; fact problem "$*"; }

# Run one phase: run_phase NAME CAP_S MIN_S COMMAND... under `timeout`, capped by what is left of
# the budget; stdout/stderr to $LOGS/NAME.{out,err}. Records NAME.rc, NAME.seconds. Returns the
# command's status, 124 on a timeout, 98 when skipped for lack of time.
run_phase() {
  local name=$1 cap=$2 min=$3; shift 3
  local left=$(( BUDGET_S - (SECONDS - START) ))
  if (( left < min )); then
    say "$name: skipped, ${left}s of the ${BUDGET_S}s budget left (it needs ${min}s)"
    fact "$name.rc" skipped
    return 98
  fi
  local limit=$(( cap < left ? cap : left ))
  local began=$SECONDS
  say "$name: $* (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.out" 2> "$LOGS/$name.err"
  local rc=$?
  (( rc == 137 )) && rc=124
  fact "$name.rc" "$rc"
  fact "$name.seconds" "$(( SECONDS - began ))"
  if (( rc == 124 )); then
    problem "$name timed out after ${limit}s"
  elif (( rc != 0 )); then
    say "$name: exit $rc; last lines of its stderr:"
    tail -n 5 "$LOGS/$name.err" | sed 's/^/    /'
  fi
  return $rc
}

# nvidia-smi's device memory in use, sampled every 250 ms during a phase (an upper bound on the
# process's peak: it includes the CUDA context and the caching allocator's reserve).
start_sampler() {
  SAMPLER_PID=""
  command -v nvidia-smi > /dev/null || return 0
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$LOGS/$1.smi" 2> /dev/null &
  SAMPLER_PID=$!
}
stop_sampler() {
  [[ -n "$SAMPLER_PID" ]] || return 0
  kill "$SAMPLER_PID" 2> /dev/null
  wait "$SAMPLER_PID" 2> /dev/null
  SAMPLER_PID=""
}

# ---------------------------------------------------------------------------------------------
# Sizes. The GPU sizes fit the budget on one H200; the rehearsal's only exercise the script.
if (( REHEARSE )); then
  PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
  # fp32: bf16 on a CPU is slow and older builds refuse it there.
  DEVICE=cpu; PRECISION=fp32; CLASSES=10; PER_CLASS=8; RESOLUTION_OVERRIDE=64
  B0_BATCH=8; B0_WARMUP=2; B0_TIMED=3
  B7_BATCH=2; B7_WARMUP=1; B7_TIMED=2
  SEARCH_TRIES="${DEVICE_CHECK_SEARCH_TRIES:-2}"; SEARCH_STEPS=2
  LOADER_THREADS=1
else
  PYTHON="${PYTHON:-python3}"
  DEVICE=cuda; PRECISION=bf16; CLASSES=1000; PER_CLASS=4; RESOLUTION_OVERRIDE=""
  B0_BATCH=256; B0_WARMUP=8; B0_TIMED=24
  B7_BATCH=32; B7_WARMUP=5; B7_TIMED=15
  SEARCH_TRIES="${DEVICE_CHECK_SEARCH_TRIES:-5}"; SEARCH_STEPS=3
  cores=$(nproc)
  LOADER_THREADS=$(( cores > 4 ? cores - 2 : 2 ))
fi
fact rehearse "$REHEARSE"
fact device "$DEVICE"
fact precision "$PRECISION"
fact resolution_override "$RESOLUTION_OVERRIDE"
fact budget_s "$BUDGET_S"
fact loader_threads "$LOADER_THREADS"
fact classes "$CLASSES"
fact images "$(( CLASSES * PER_CLASS ))"

# ---------------------------------------------------------------------------------------------
# Setup: the machine, its torch, the binaries and their libraries.
say "work folder $WORK"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$LOGS/gpu.txt" 2>&1
  fact gpu "$(head -n 1 "$LOGS/gpu.txt")"
  say "GPU: $(head -n 1 "$LOGS/gpu.txt")"
elif (( ! REHEARSE )); then
  problem "nvidia-smi not found: is this a GPU machine?"
fi

# torch's folder, version, CUDA and NCCL versions, device and its memory, in one Python start.
if ! "$PYTHON" - > "$LOGS/torch.txt" 2> "$LOGS/torch.err" <<'PY'
import importlib.util, os, torch
print("torch_dir=" + os.path.dirname(torch.__file__))
print("torch=" + torch.__version__)
print("torch_cuda=" + str(torch.version.cuda))
cuda = torch.cuda.is_available()
print("cuda_available=" + str(int(cuda)))
if cuda:
    props = torch.cuda.get_device_properties(0)
    print("gpu_name=" + props.name)
    print("gpu_memory_bytes=" + str(props.total_memory))
    try:
        print("nccl=" + ".".join(map(str, torch.cuda.nccl.version())))
    except Exception as error:  # torch built without NCCL
        print("nccl=unknown (" + str(error).replace("\n", " ") + ")")
spec = importlib.util.find_spec("nvidia.nccl")
for folder in (spec.submodule_search_locations or []) if spec else []:
    if os.path.isdir(os.path.join(folder, "lib")):
        print("nccl_lib=" + os.path.join(folder, "lib"))
        break
PY
then
  problem "$PYTHON cannot import torch: $(tail -n 1 "$LOGS/torch.err")"
  sed 's/^/    /' "$LOGS/torch.err" | tail -n 5
fi
torch_fact() { sed -n "s/^$1=//p" "$LOGS/torch.txt" | head -n 1; }
TORCH_DIR="$(torch_fact torch_dir)"
NCCL_LIB="$(torch_fact nccl_lib)"
GPU_MEMORY_BYTES="$(torch_fact gpu_memory_bytes)"
for key in torch torch_cuda cuda_available gpu_name gpu_memory_bytes nccl; do fact "$key" "$(torch_fact "$key")"; done
if [[ -z "$NCCL_LIB" && -n "$TORCH_DIR" ]]; then
  # The wheel's usual place beside torch in site-packages.
  NCCL_LIB="$(dirname "$(find "$(dirname "$TORCH_DIR")/nvidia" -name 'libnccl.so*' 2> /dev/null | head -n 1)" 2> /dev/null)"
fi
[[ "$(torch_fact cuda_available)" == 1 ]] || (( REHEARSE )) || problem "torch sees no CUDA device"

# The binaries: unpacked from the bundle, or given.
BUNDLE="${EFFNET_DEVICE_BUNDLE:-$ROOT/target/device/effnet-device.tar.xz}"
BUNDLE_LIB=""
if [[ -n "${EFFNET_BIN:-}" ]]; then
  EFFNET="$EFFNET_BIN"; CHECK="${EFFNET_CHECK_BIN:-$(dirname "$EFFNET_BIN")/effnet-collective-check}"
elif [[ -f "$BUNDLE" ]]; then
  mkdir -p "$WORK/bundle"
  if ! tar -C "$WORK/bundle" -xJf "$BUNDLE" 2> "$LOGS/unpack.err"; then
    # No xz program: Python's tarfile reads .tar.xz too.
    "$PYTHON" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$BUNDLE" "$WORK/bundle" \
      || problem "cannot unpack $BUNDLE: $(tail -n 1 "$LOGS/unpack.err")"
  fi
  EFFNET="$WORK/bundle/bin/effnet"; CHECK="$WORK/bundle/bin/effnet-collective-check"; BUNDLE_LIB="$WORK/bundle/lib"
  if [[ -f "$WORK/bundle/MANIFEST.json" ]]; then
    fact bundle_manifest "$WORK/bundle/MANIFEST.json"
    say "bundle: $(tr -d '\n' < "$WORK/bundle/MANIFEST.json" | head -c 200)..."
  fi
elif (( REHEARSE )); then
  built() { if [[ -x "$ROOT/target/release/$1" ]]; then echo "$ROOT/target/release/$1"; else echo "$ROOT/target/debug/$1"; fi; }
  EFFNET="$(built effnet)"; CHECK="$(built effnet-collective-check)"
else
  problem "no $BUNDLE: run \`make device-bundle\` on the build machine and copy target/device here"
  EFFNET=""; CHECK=""
fi
fact effnet_bin "$EFFNET"

# cudarc opens NCCL as libnccl.so; the wheel ships libnccl.so.2 only.
if [[ -n "$NCCL_LIB" && -e "$NCCL_LIB/libnccl.so.2" ]]; then
  ln -sfn "$NCCL_LIB/libnccl.so.2" "$WORK/nccl-link/libnccl.so"
elif (( ! REHEARSE )); then
  problem "no libnccl.so.2 found beside $PYTHON's torch (the nvidia-nccl wheel)"
fi
export LD_LIBRARY_PATH="${TORCH_DIR:+$TORCH_DIR/lib:}${NCCL_LIB:+$NCCL_LIB:}$WORK/nccl-link:$WORK/syslib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# Every library a binary loads must resolve here; one this machine lacks (Open MPI, say) is
# linked from the bundle into $WORK/syslib, round by round (a found library can need more).
resolve_libraries() {
  local binary=$1 round missing soname added
  for round in 1 2 3 4 5 6; do
    ldd "$binary" > "$LOGS/ldd.txt" 2>&1
    if grep -q "version .* not found" "$LOGS/ldd.txt"; then
      problem "$(basename "$binary"): $(grep -m 1 "version .* not found" "$LOGS/ldd.txt" | sed 's/^[[:space:]]*//')"
      return 1
    fi
    missing=$(awk '/=> not found/ {print $1}' "$LOGS/ldd.txt")
    [[ -z "$missing" ]] && return 0
    added=0
    for soname in $missing; do
      if [[ -n "$BUNDLE_LIB" && -e "$BUNDLE_LIB/$soname" && ! -e "$WORK/syslib/$soname" ]]; then
        ln -s "$BUNDLE_LIB/$soname" "$WORK/syslib/$soname"
        say "$soname is not on this machine: using the bundle's copy"
        fact bundled_library "$soname"
        added=1
      fi
    done
    (( added )) || { problem "$(basename "$binary") cannot start, not found: $(echo "$missing" | tr '\n' ' ')"; return 1; }
  done
  problem "$(basename "$binary"): libraries still unresolved after $round rounds"
  return 1
}
EFFNET_OK=0; CHECK_OK=0
for binary in "$CHECK" "$EFFNET"; do
  [[ -z "$binary" || -x "$binary" ]] || problem "no executable $binary"
done
if [[ -n "$CHECK" && -x "$CHECK" ]] && resolve_libraries "$CHECK"; then CHECK_OK=1; fi
if [[ -n "$EFFNET" && -x "$EFFNET" ]] && resolve_libraries "$EFFNET"; then
  if "$EFFNET" --version > "$LOGS/version.txt" 2>&1; then
    EFFNET_OK=1
    fact effnet_version "$(head -n 1 "$LOGS/version.txt")"
  else
    problem "effnet --version failed: $(tail -n 1 "$LOGS/version.txt")"
  fi
fi
fact setup_seconds "$(( SECONDS - START ))"

# ---------------------------------------------------------------------------------------------
# (a) The collective conformance suite on NCCL, one rank on the one GPU.
PORT=$(( 29500 + RANDOM % 2000 ))
if (( CHECK_OK )); then
  mkdir -p "$WORK/collective"
  run_phase collective 120 20 env NCCL_DEBUG="${NCCL_DEBUG:-WARN}" RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 \
    MASTER_ADDR=127.0.0.1 MASTER_PORT="$PORT" \
    "$CHECK" --backend nccl --timeout-s 60 --bandwidth --out "$WORK/collective"
  fact collective.report "$WORK/collective/rank-0.json"
  fact collective.err "$LOGS/collective.err"
fi

# ---------------------------------------------------------------------------------------------
# The dataset: generated JPEGs in one folder per class, prepared into Parquet by effnet.
DATASET="$WORK/dataset"
DATA_OK=0
if (( EFFNET_OK )); then
  run_phase data-jpeg 90 15 "$PYTHON" benches/make_image_folder.py --out "$WORK/folder" \
      --classes "$CLASSES" --per-class "$PER_CLASS" --seed 0 \
    && run_phase data-prepare 120 15 "$EFFNET" prepare --from image-folder "$WORK/folder" --out "$DATASET" \
      --rows-per-group 128 \
    && DATA_OK=1
  fact data.summary "$(tail -n 1 "$LOGS/data-jpeg.out" 2> /dev/null)"
  rm -rf "$WORK/folder"   # the Parquet files hold the JPEG bytes
fi

# A job file: write_job NAME VARIANT BATCH STEPS [EXTRA YAML LINES for distributed:]
write_job() {
  local name=$1 variant=$2 batch=$3 steps=$4 distributed=${5:-"{device: $DEVICE}"}
  local resolution_line=""
  [[ -n "$RESOLUTION_OVERRIDE" ]] && resolution_line="  resolution: $RESOLUTION_OVERRIDE"
  local checkpoint_line=""
  [[ -n "${CHECKPOINT_EVERY:-}" ]] && checkpoint_line="  every_steps: $CHECKPOINT_EVERY"
  cat > "$WORK/runs/$name.yaml" <<YAML
# Device check: throughput of the training step, not learning. EMA off and no report, as the
# PyTorch baseline has neither; one checkpoint at the end (the trainer always saves the last step),
# and in the B7 run one more in its timed steps (the stall a save costs).
name: device-check-$name
job_dir: $WORK/runs/$name
seed: 0
model:
  variant: $variant
$resolution_line
data:
  train: $DATASET
  batch_size: $batch
  loader_threads: $LOADER_THREADS
  shuffle_buffer: 512
optimizer:
  kind: rmsprop_tf
training:
  steps: $steps
  precision: $PRECISION
  channels_last: true
  progress: false
  ema: {enabled: false}
checkpoint:
  at_epoch_end: false
  keep_last: 1
$checkpoint_line
report:
  enabled: false
distributed: $distributed
YAML
  echo "$WORK/runs/$name.yaml"
}

# effnet_run NAME VARIANT BATCH STEPS CAP MIN: one training run, GPU memory sampled meanwhile.
effnet_run() {
  local name=$1 variant=$2 batch=$3 steps=$4 cap=$5 min=$6 job rc
  job=$(write_job "$name" "$variant" "$batch" "$steps")
  fact "$name.batch" "$batch"
  fact "$name.job_dir" "$WORK/runs/$name"
  start_sampler "$name"
  run_phase "$name" "$cap" "$min" "$EFFNET" run "$job" --progress never
  rc=$?
  stop_sampler
  fact "$name.smi" "$LOGS/$name.smi"
  fact "$name.err" "$LOGS/$name.err"
  return $rc
}

# torch_run NAME VARIANT BATCH WARMUP STEPS CAP MIN: the PyTorch-eager baseline.
torch_run() {
  local name=$1 variant=$2 batch=$3 warmup=$4 steps=$5 cap=$6 min=$7 rc
  local extra=()
  [[ -n "$RESOLUTION_OVERRIDE" ]] && extra+=(--resolution "$RESOLUTION_OVERRIDE")
  start_sampler "$name"
  run_phase "$name" "$cap" "$min" "$PYTHON" benches/pytorch_train_gpu.py --variant "$variant" --batch "$batch" \
    --warmup "$warmup" --steps "$steps" --classes "$CLASSES" --device "$DEVICE" --precision "$PRECISION" \
    "${extra[@]}"
  rc=$?
  stop_sampler
  fact "$name.json" "$LOGS/$name.out"
  fact "$name.smi" "$LOGS/$name.smi"
  return $rc
}

# ---------------------------------------------------------------------------------------------
# (b) effnet training steps, then (d) the same in PyTorch eager.
if (( DATA_OK )); then
  fact effnet-b0.warmup "$B0_WARMUP"
  fact effnet-b7.warmup "$B7_WARMUP"
  effnet_run effnet-b0 b0 "$B0_BATCH" $(( B0_WARMUP + B0_TIMED )) 150 45
  # One checkpoint in the middle of the timed B7 steps, saved beside them: the stall it costs
  # training (the `checkpoint` record's blocked_s, and how much slower the steps it overlaps run).
  CHECKPOINT_EVERY=$(( B7_WARMUP + (B7_TIMED >= 3 ? B7_TIMED / 3 : 1) )) \
    effnet_run effnet-b7 b7 "$B7_BATCH" $(( B7_WARMUP + B7_TIMED )) 180 60
fi
torch_run torch-b0 b0 "$B0_BATCH" "$B0_WARMUP" "$B0_TIMED" 120 30
torch_run torch-b7 b7 "$B7_BATCH" "$B7_WARMUP" "$B7_TIMED" 150 45

# ---------------------------------------------------------------------------------------------
# (a, in training) The NCCL gradient path: `effnet worker` as rank 0 of a world of 1, a few B0
# steps (gradients bucketed, all-reduced through NCCL on libtorch's stream, written back).
if (( DATA_OK )) && (( ! REHEARSE )); then
  job=$(write_job nccl-train b0 32 4 "{workers: 1, backend: nccl, device: cuda}")
  fact nccl-train.job_dir "$WORK/runs/nccl-train"
  fact nccl-train.err "$LOGS/nccl-train.err"
  run_phase nccl-train 120 40 env NCCL_DEBUG="${NCCL_DEBUG:-WARN}" RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 \
    LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$(( PORT + 1 )) \
    "$EFFNET" worker "$job" --progress never
fi

# (a, through the coordinator) The same NCCL world of 1, but joined through an `effnet
# coordinator` on loopback: the NCCL unique id goes through the coordinator's rendezvous
# (POST/GET .../rendezvous) instead of MASTER_ADDR:MASTER_PORT, and the job ends succeeded.
if (( DATA_OK )) && (( ! REHEARSE )); then
  job=$(write_job nccl-coord b0 32 4 "{workers: 1, backend: nccl, device: cuda}")
  fact nccl-coord.job_dir "$WORK/runs/nccl-coord"
  fact nccl-coord.err "$LOGS/nccl-coord.err"
  head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/coord.token"
  "$EFFNET" coordinator --listen 127.0.0.1:$(( PORT + 2 )) --state-dir "$WORK/coord" \
    --token-file "$WORK/coord.token" > "$LOGS/coordinator.out" 2> "$LOGS/coordinator.err" &
  coord_pid=$!
  for _ in $(seq 300); do   # up to 30 s for its "coordinator listening on" line
    grep -q '^coordinator listening on' "$LOGS/coordinator.out" 2> /dev/null && break
    sleep 0.1
  done
  coord="http://127.0.0.1:$(( PORT + 2 ))"
  if job_id=$("$EFFNET" submit "$job" --coordinator "$coord" --token-file "$WORK/coord.token" 2>> "$LOGS/nccl-coord.err"); then
    run_phase nccl-coord 120 40 env NCCL_DEBUG="${NCCL_DEBUG:-WARN}" RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 \
      LOCAL_WORLD_SIZE=1 "$EFFNET" worker --coordinator "$coord" --job "$job_id" \
      --token-file "$WORK/coord.token" --progress never
    fact nccl-coord.state "$("$EFFNET" status "$job_id" --json --coordinator "$coord" \
      --token-file "$WORK/coord.token" | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["state"])')"
  else
    fact nccl-coord.rc submit-failed
  fi
  kill "$coord_pid" 2> /dev/null; wait "$coord_pid" 2> /dev/null
fi

# ---------------------------------------------------------------------------------------------
# (c) The largest B7 batch that fits: a few short runs. The first guess scales the B7 run's peak
# memory to 92% of the card (an underestimate, since the peak includes the weights and optimiser
# state); after two measured points the next guess solves peak = fixed + per_image * batch for
# 95% of the card; after an out-of-memory, bisection in steps of 8.
peak_of() {   # NAME: the run's peak GPU memory in bytes (effnet's own record, else nvidia-smi), or nothing
  "$PYTHON" scripts/device-check-report.py peak "$WORK/runs/$1" "$LOGS/$1.smi"
}
round8() { echo $(( $1 / 8 * 8 > 8 ? $1 / 8 * 8 : 8 )); }
if (( DATA_OK )) && [[ "$(sed -n 's/^effnet-b7.rc=//p' "$FACTS")" == 0 ]]; then
  fit=$B7_BATCH; fit_peak=$(peak_of effnet-b7); fail=0
  base_batch=$B7_BATCH; base_peak=$fit_peak
  if [[ -n "$GPU_MEMORY_BYTES" && -n "$fit_peak" && "$fit_peak" -gt 0 ]]; then
    guess=$(round8 $(( GPU_MEMORY_BYTES * 92 * fit / (100 * fit_peak) )))
  else
    guess=$(( fit * 2 ))
  fi
  (( REHEARSE )) && guess=$(( fit + 1 ))
  (( guess > fit )) || guess=$(( fit + 8 ))
  for (( try = 1; try <= SEARCH_TRIES; try++ )); do
    name="search-$try"
    effnet_run "$name" b7 "$guess" "$SEARCH_STEPS" 75 45
    rc=$?
    (( rc == 98 )) && break
    if (( rc == 0 )); then
      outcome=fits; fit=$guess; fit_peak=$(peak_of "$name")
    elif grep -qi "out of memory" "$LOGS/$name.err" "$LOGS/$name.out" 2> /dev/null; then
      outcome=oom; fail=$guess
    else
      outcome=error; fact "$name.outcome" error
      problem "B7 batch $guess: exit $rc, not out of memory (see its log)"; break
    fi
    fact "$name.outcome" "$outcome"
    say "B7 batch $guess: $outcome"
    # The next guess.
    if (( fail > 0 )); then
      (( fail - fit <= 8 )) && break
      guess=$(round8 $(( (fit + fail) / 2 )))
      (( guess <= fit )) && guess=$(( fit + 8 ))
      (( guess >= fail )) && break
    elif [[ -n "$GPU_MEMORY_BYTES" && -n "$fit_peak" && -n "$base_peak" && "$fit" -gt "$base_batch" \
            && "$fit_peak" -gt "$base_peak" ]]; then
      per_image=$(( (fit_peak - base_peak) / (fit - base_batch) ))
      fixed=$(( base_peak - per_image * base_batch ))
      guess=$(round8 $(( (GPU_MEMORY_BYTES * 95 / 100 - fixed) / per_image )))
      (( guess <= fit )) && guess=$(( fit + 8 ))
    else
      guess=$(( fit * 2 ))
    fi
    (( REHEARSE )) && guess=$(( fit + 1 ))
  done
  fact search.fit "$fit"
  fact search.fail "$fail"
fi

# ---------------------------------------------------------------------------------------------
fact total_seconds "$(( SECONDS - START ))"
say "done in $(( SECONDS - START ))s; the report:"
echo
# Exit 1 when a phase failed or a problem was noted (the report lists them).
"$PYTHON" scripts/device-check-report.py report "$FACTS" ${OUT:+--out "$OUT"}
