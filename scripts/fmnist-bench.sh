# Shared by the Fashion-MNIST training benchmarks (bench-train, bench-precision,
# bench-distributed); source it. Sets EFFNET, DATA (prepared once) and WORK (a temporary
# folder removed on exit), and `bench_job FILE NAME STEPS BATCH THREADS [EXTRA]`, which writes
# the benchmarks' one recipe: B0 at 32×32 with one input channel, AdamW, label smoothing 0.1,
# drop path 0.2, dropout 0.2, crop augmentation, no EMA, no epoch-end checkpoint; EXTRA is
# appended as further top-level YAML (e.g. a `distributed:` section).
EFFNET=target/release/effnet
DATA=.work/fashion-mnist
[[ -f "$DATA/train/_manifest.json" ]] || "$EFFNET" prepare --from fashion-mnist --out "$DATA"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

bench_job() { # file name steps batch threads [extra yaml]
  cat > "$1" <<YAML
name: bench-$2
job_dir: $WORK/$2
model: {variant: b0, input_channels: 1, resolution: 32, dropout: 0.2, drop_path: {rate: 0.2}}
data:
  train: $DATA/train
  batch_size: $4
  loader_threads: 1
  normalization: fashion_mnist
  augmentation: {crop_scale: [0.6, 1.0], crop_ratio: [0.8, 1.25]}
optimizer: {kind: adamw, lr: 0.008, weight_decay: 0.05, label_smoothing: 0.1}
schedule: {kind: cosine, warmup_steps: 10}
training: {steps: $3, threads: $5, ema: {enabled: false}}
checkpoint: {at_epoch_end: false}
${6:-}
YAML
}
