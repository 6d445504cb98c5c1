//! Checkpoint save of a B7-sized training state (model, RMSProp-TF optimiser slots, EMA) to a
//! local directory, against a raw sequential write of the same bytes to the same disk
//! (docs/benchmarks.md, docs/reliability.md).
//!
//! - **Throughput**: `CheckpointStore::save` (sha256 of every file, each file written through
//!   the object store and flushed to the disk, the commit marker last) against `std::fs::write`
//!   of the same files, each flushed (`sync_all`), and the directory flushed: both durable, as a
//!   checkpoint that survives a machine crash must be. The raw write without flushes (into the
//!   page cache) is printed too. Best of `ROUNDS` each, alternated.
//! - **Stall**: what a save costs the training thread. The trainer assembles the files on the
//!   training thread (tensors to safetensors bytes) and hands them to a background task; the
//!   stall is that assembly, plus how much slower the steps that run while the save is in flight
//!   are than steps without one. It is stated in steps of a B7 forward/backward at batch 1 and
//!   224 px (a CPU step; a GPU step is shorter, see the doc).
//!
//! `cargo bench -p effnet-train --bench checkpoint_save` (scripts/bench-checkpoint.sh)

use std::time::{Duration, Instant};

use effnet_config::JobSpec;
use effnet_model::EfficientNetConfig;
use effnet_train::checkpoint::CheckpointStore;
use effnet_train::checkpointer::Checkpointer;
use effnet_train::evaluate::Precision;
use effnet_train::network::{Averaged, Network};
use effnet_train::optim::{Optimizer, OptimizerRule};
use effnet_train::state::{ModelIdentity, Stateful};
use tch::{Device, Kind, Tensor};

const ROUNDS: usize = 3;

fn main() {
    let dir = std::env::var_os("EFFNET_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::current_dir().unwrap().join(".work/bench-checkpoint"));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = JobSpec::from_yaml_str(
        "name: bench\nmodel: {variant: b7}\ndata: {train: memory://bench/train}\noptimizer: {kind: rmsprop_tf}\n",
        "bench",
    )
    .unwrap();
    tch::set_num_threads(2);
    tch::manual_seed(0);
    let config = EfficientNetConfig::from_spec(&spec.model, 1000);
    let identity = ModelIdentity {
        architecture: "EfficientNet-B7".into(),
        classes: 1000,
        input_channels: 3,
        parameters: 0,
    };
    let precision = Precision { device: Device::Cpu, bf16: false, channels_last: false };
    let network = Network::build(&config, &identity, precision).unwrap();
    let optimizer = Optimizer::new(
        OptimizerRule::from_config(&spec.optimizer),
        network.trainable(),
        spec.optimizer.weight_decay(),
        spec.optimizer.decay_norm_and_bias,
    );
    let averaged = Averaged::new(&network, &config, &spec).unwrap();
    let parts: [&dyn Stateful; 3] = [&network, &optimizer, &averaged];

    let assembled = Instant::now();
    let files = Checkpointer::assemble(&parts).unwrap();
    let assemble_s = assembled.elapsed().as_secs_f64();
    let bytes: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    println!(
        "B7 state: {} files, {:.0} MB (model + RMSProp-TF slots + EMA); assembling took {assemble_s:.2} s",
        files.len(),
        bytes as f64 / 1e6
    );

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let store = CheckpointStore::new(effnet_store::open(dir.join("store").to_str().unwrap()).unwrap());
    let raw_dir = dir.join("raw");
    let (mut save_best, mut raw_best, mut cached_best) = (f64::MAX, f64::MAX, f64::MAX);
    for round in 0..ROUNDS {
        let _ = std::fs::remove_dir_all(&raw_dir);
        std::fs::create_dir_all(&raw_dir).unwrap();
        let started = Instant::now();
        for (name, content) in &files {
            std::fs::write(raw_dir.join(name), content).unwrap();
        }
        cached_best = cached_best.min(started.elapsed().as_secs_f64());
        let _ = std::fs::remove_dir_all(&raw_dir);
        std::fs::create_dir_all(&raw_dir).unwrap();
        let started = Instant::now();
        for (name, content) in &files {
            let mut file = std::fs::File::create(raw_dir.join(name)).unwrap();
            std::io::Write::write_all(&mut file, content).unwrap();
            file.sync_all().unwrap();
        }
        std::fs::File::open(&raw_dir).unwrap().sync_all().unwrap();
        raw_best = raw_best.min(started.elapsed().as_secs_f64());

        let started = Instant::now();
        runtime.block_on(store.save(round as u64 + 1, None, files.clone())).unwrap();
        save_best = save_best.min(started.elapsed().as_secs_f64());
        runtime.block_on(store.purge(1, 0)).unwrap();
    }
    let (save_rate, raw_rate) = (bytes as f64 / save_best / 1e6, bytes as f64 / raw_best / 1e6);
    println!(
        "save {save_rate:.0} MB/s ({save_best:.2} s), raw sequential write flushed to disk {raw_rate:.0} MB/s \
         ({raw_best:.2} s): ratio {:.2}; raw write into the page cache {:.0} MB/s ({cached_best:.2} s)",
        save_rate / raw_rate,
        bytes as f64 / cached_best / 1e6
    );

    // Steps with and without a save in flight: B7 forward and backward, batch 1 at 224 px.
    let images = Tensor::randn([1, 3, 224, 224], (Kind::Float, Device::Cpu));
    let labels = Tensor::from_slice(&[3i64]);
    let step = || {
        let started = Instant::now();
        let logits = network.forward(&images, true).unwrap();
        logits.cross_entropy_for_logits(&labels).backward();
        started.elapsed()
    };
    step();
    let quiet: Vec<Duration> = (0..3).map(|_| step()).collect();
    let quiet_s = quiet.iter().map(Duration::as_secs_f64).sum::<f64>() / quiet.len() as f64;
    let assembled = Instant::now();
    let files = Checkpointer::assemble(&parts).unwrap();
    let handed_over = assembled.elapsed().as_secs_f64();
    let save = runtime.spawn({
        let store = store.clone();
        async move { store.save(100, None, files).await }
    });
    let mut busy = Vec::new();
    while !save.is_finished() || busy.is_empty() {
        busy.push(step());
    }
    runtime.block_on(save).unwrap().unwrap();
    let busy_s = busy.iter().map(Duration::as_secs_f64).sum::<f64>() / busy.len() as f64;
    let slowdown = (busy_s - quiet_s).max(0.0) * busy.len() as f64;
    let stall = handed_over + slowdown;
    println!(
        "B7 CPU step {quiet_s:.2} s (batch 1, 224 px); a save costs the training thread {handed_over:.2} s of assembly \
         and slows the {} steps it overlaps by {slowdown:.2} s in all: stall {stall:.2} s = {:.2} steps",
        busy.len(),
        stall / quiet_s
    );
    let _ = std::fs::remove_dir_all(&dir);
}
