#!/usr/bin/env bash
# Input pipeline: Parquet → decode → RandomResizedCrop(224) → flip → normalise, effnet's loader vs a
# PyTorch DataLoader (pyarrow + Pillow + torchvision) with the same worker count, on a reproducible
# corpus of ImageNet-sized JPEGs (scikit-image photographs, ~500x375, q90). Prints the ratio.
#   BENCH_IMAGES=2000 BENCH_WORKERS="1 2" scripts/bench-loader.sh
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGES="${BENCH_IMAGES:-2000}"
WORKERS="${BENCH_WORKERS:-1 2}"
WORK="${BENCH_DIR:-.work/bench-loader}"
mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)"   # cargo bench runs in the crate folder
PY=.venv/bin/python
if [[ ! -f "$WORK/dataset/_manifest.json" ]]; then
  rm -rf "$WORK" && mkdir -p "$WORK/folder"
  "$PY" benches/make_jpeg_corpus.py --out "$WORK/corpus" --count "$IMAGES" --seed 0 >/dev/null
  # image-folder layout: ten classes by file number.
  for f in "$WORK"/corpus/*.jpg; do
    n=$(basename "$f" .jpg); class="c$(( 10#$n % 10 ))"
    mkdir -p "$WORK/folder/$class" && ln "$f" "$WORK/folder/$class/$n.jpg"
  done
  cargo build -q --release -p effnet-cli
  target/release/effnet prepare --from image-folder "$WORK/folder" --out "$WORK/dataset" --rows-per-group 128
fi
cargo bench -q -p effnet-data --bench loader --no-run
for workers in $WORKERS; do
  ours=$(LOADER_BENCH_URL="$WORK/dataset" LOADER_THREADS=$workers cargo bench -q -p effnet-data --bench loader)
  theirs=$("$PY" benches/python_loader.py "$WORK/dataset" --workers "$workers")
  echo "$ours"; echo "$theirs"
  "$PY" -c "import json,sys; a,b=json.loads(sys.argv[1]),json.loads(sys.argv[2]); print(f'workers {$workers}: effnet {a[\"images_per_s\"]} images/s, PyTorch DataLoader {b[\"images_per_s\"]} images/s, ratio {a[\"images_per_s\"]/b[\"images_per_s\"]:.2f}x')" "$ours" "$theirs"
done
