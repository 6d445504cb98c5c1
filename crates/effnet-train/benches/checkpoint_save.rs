//! Checkpoint save of a B7-sized training state (model, RMSProp-TF optimiser slots, EMA) to a
//! local directory, against a raw sequential write of the same bytes to the same disk
//! (docs/benchmarks.md, docs/reliability.md).
//!
//! - **Checksum**: BLAKE3 (`COMMIT` format 2) against SHA-256 (format 1) of the largest file.
//! - **Throughput**: `CheckpointStore::save` (each file written around the page cache and
//!   hashed with BLAKE3 on the way, then flushed to the disk, the commit marker last) against
//!   `std::fs::write` of the same files, each flushed (`sync_all`), and the directory flushed:
//!   both durable, as a checkpoint that survives a machine crash must be. The raw write without
//!   flushes (into the page cache) is printed too. Best of `ROUNDS` each, alternated.
//! - **Stall**: what a save costs training, through the trainer's own `Checkpointer`: the files
//!   are assembled on the training thread (each tensor copied once into its safetensors buffer)
//!   and saved in the background. Pairs of windows of `WINDOW` steps of B7 forward/backward at
//!   batch 1 and 224 px run alone or with one save (waited for at the end of the window if still
//!   running), alternated; the stall is how much longer a window with a save takes, stated in
//!   steps (a CPU step; a GPU step is shorter, see the doc). Training uses every core, or
//!   `EFFNET_BENCH_THREADS`: one fewer leaves the save a core, as a GPU node's idle cores do.
//!   For the stall study (docs/benchmarks.md): `EFFNET_BENCH_SAVE_PRIORITY` (`idle` or a nice
//!   value) runs the save's threads at a lower priority, `EFFNET_BENCH_YIELD_CORE=1` trains on
//!   one thread fewer while a save runs. `EFFNET_BENCH_WINDOW_STEPS` and `EFFNET_BENCH_PAIRS` set
//!   the windows' length and number (10 and 8).
//!
//! `cargo bench -p effnet-train --bench checkpoint_save` (scripts/bench-checkpoint.sh)

use std::time::Instant;

use effnet_config::JobSpec;
use effnet_model::EfficientNetConfig;
use effnet_train::checkpoint::CheckpointStore;
use effnet_train::checkpointer::Checkpointer;
use effnet_train::evaluate::Precision;
use effnet_train::metrics::MetricsLog;
use effnet_train::network::{Averaged, Network};
use effnet_train::optim::{Optimizer, OptimizerRule};
use effnet_train::state::{ModelIdentity, Stateful};
use tch::{Device, Kind, Tensor};

const ROUNDS: usize = 3;
/// Steps in a stall window (a save beside training takes 1–3 CPU steps), and windows with a save
/// (as many again without); `EFFNET_BENCH_WINDOW_STEPS` and `EFFNET_BENCH_PAIRS` change them.
/// Short windows, many of them: this machine's speed drifts by ±15% over minutes, and 30-step
/// windows left ±1.4 steps of error with three pairs.
const WINDOW: usize = 10;
const WINDOWS: usize = 8;

/// A positive count from the environment, or `default`.
fn count_from_env(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or_else(|| panic!("{name}={value}: not a positive count")),
        Err(_) => default,
    }
}

/// Busy CPU seconds of the whole machine so far (every core, every process and kernel thread:
/// the kernel's writeback and interrupts included), from /proc/stat; 0 where there is none.
fn machine_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return 0.0 };
    let Some(line) = stat.lines().next() else { return 0.0 };
    // cpu user nice system idle iowait irq softirq steal ...: all but idle and iowait.
    let ticks: Vec<f64> = line.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    // SAFETY: sysconf only reads system configuration.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let busy: f64 = ticks.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    busy / hz
}

/// User and system CPU seconds of this process so far (every thread).
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Set the calling thread's scheduling: `idle` for SCHED_IDLE, else a nice value.
fn lower_priority(priority: Option<&str>) {
    let rc = match priority {
        None => return,
        // SAFETY: sets the calling thread's policy from a valid parameter.
        Some("idle") => unsafe {
            libc::sched_setscheduler(0, libc::SCHED_IDLE, &libc::sched_param { sched_priority: 0 })
        },
        Some(nice) => {
            let nice = nice.parse().expect("EFFNET_BENCH_SAVE_PRIORITY is idle or a nice value");
            // SAFETY: sets the calling thread's nice value (PRIO_PROCESS of thread id 0: this thread).
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) }
        }
    };
    assert_eq!(rc, 0, "setting the save threads' priority: {}", std::io::Error::last_os_error());
}

fn list(values: &[f64], digits: usize) -> String {
    values.iter().map(|v| format!("{v:.digits$}")).collect::<Vec<_>>().join(", ")
}

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
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = count_from_env("EFFNET_BENCH_THREADS", cores) as i32;
    tch::set_num_threads(threads);
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

    // The checksum of the largest file, COMMIT format 2's (BLAKE3) against format 1's (SHA-256),
    // on one thread as a save hashes each file: best of ROUNDS.
    let (_, largest) = files.iter().max_by_key(|(_, content)| content.len()).unwrap();
    let rate = |hash: fn(&[u8]) -> String| {
        let best = (0..ROUNDS)
            .map(|_| {
                let started = Instant::now();
                std::hint::black_box(hash(largest));
                started.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min);
        largest.len() as f64 / best / 1e9
    };
    let (blake3_rate, sha256_rate) =
        (rate(effnet_train::checkpoint::blake3_hex), rate(effnet_train::checkpoint::sha256_hex));
    println!(
        "checksum of the largest file ({:.0} MB) on one thread: BLAKE3 {blake3_rate:.2} GB/s, SHA-256 {sha256_rate:.2} GB/s",
        largest.len() as f64 / 1e6
    );

    // The save's threads (the runtime's, and the hashing and flushing threads they start, which
    // inherit it) at a lower priority, for the stall study: EFFNET_BENCH_SAVE_PRIORITY=idle
    // (SCHED_IDLE) or a nice value (1..19).
    let priority = std::env::var("EFFNET_BENCH_SAVE_PRIORITY").ok();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || lower_priority(priority.as_deref()))
        .build()
        .unwrap();
    let store = CheckpointStore::new(effnet_store::open(dir.join("store").to_str().unwrap()).unwrap());
    let raw_dir = dir.join("raw");
    let (mut save_best, mut raw_best, mut cached_best, mut save_cpu, mut machine_cpu) =
        (f64::MAX, f64::MAX, f64::MAX, f64::MAX, f64::MAX);
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
        let (cpu, machine) = (cpu_seconds(), machine_cpu_seconds());
        runtime.block_on(store.save(round as u64 + 1, None, files.clone())).unwrap();
        save_best = save_best.min(started.elapsed().as_secs_f64());
        save_cpu = save_cpu.min(cpu_seconds() - cpu);
        machine_cpu = machine_cpu.min(machine_cpu_seconds() - machine);
        runtime.block_on(store.purge(1, 0)).unwrap();
    }
    let (save_rate, raw_rate) = (bytes as f64 / save_best / 1e6, bytes as f64 / raw_best / 1e6);
    println!(
        "save {save_rate:.0} MB/s ({save_best:.2} s), raw sequential write flushed to disk {raw_rate:.0} MB/s \
         ({raw_best:.2} s): ratio {:.2}; raw write into the page cache {:.0} MB/s ({cached_best:.2} s)",
        save_rate / raw_rate,
        bytes as f64 / cached_best / 1e6
    );
    println!(
        "a save alone uses {save_cpu:.2} s of this process's CPU time (hashing, writing, flushing), \
         {machine_cpu:.2} s of the machine's (the kernel's writeback and interrupts too)"
    );

    drop(files);

    // The stall: windows of WINDOW steps (B7 forward and backward, batch 1 at 224 px), each
    // alone or with one save through the trainer's own `Checkpointer` (assembled on this thread,
    // saved in the background, waited for at the window's end if still running),
    // alternated. The stall is how much longer a window with a save takes.
    let images = Tensor::randn([1, 3, 224, 224], (Kind::Float, Device::Cpu));
    let labels = Tensor::from_slice(&[3i64]);
    let step = || {
        let logits = network.forward(&images, true).unwrap();
        logits.cross_entropy_for_logits(&labels).backward();
    };
    step();
    let job = dir.join("job");
    let spec = JobSpec::from_yaml_str(
        &format!(
            "name: bench\njob_dir: {}\nmodel: {{variant: b7}}\ndata: {{train: memory://bench/train}}\n\
             checkpoint: {{keep_last: 1}}\n",
            job.display()
        ),
        "bench",
    )
    .unwrap();
    std::fs::create_dir_all(&job).unwrap();
    let mut checkpointer = Checkpointer::from_config(&spec, true).unwrap();
    let mut metrics = MetricsLog::open(&job, 0, 0, false).unwrap();
    // For the stall study: train on one thread fewer while a save runs (EFFNET_BENCH_YIELD_CORE=1).
    // Not the trainer's behaviour: libtorch's CPU results depend on the thread count, so steps
    // whose thread count depends on timing would end bitwise reproducibility.
    let yield_core = std::env::var_os("EFFNET_BENCH_YIELD_CORE").is_some();
    let (mut alone, mut with_save, mut blocked, mut saving) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let window = count_from_env("EFFNET_BENCH_WINDOW_STEPS", WINDOW);
    let pairs = count_from_env("EFFNET_BENCH_PAIRS", WINDOWS).max(2);
    for round in 0..pairs * 2 {
        let save = (round % 4 == 1) || (round % 4 == 2);
        let started = Instant::now();
        if save {
            let files = Checkpointer::assemble(&parts).unwrap();
            checkpointer.save(&runtime, round as u64 + 1, None, files, started, &mut metrics).unwrap();
            blocked.push(started.elapsed().as_secs_f64());
        }
        for _ in 0..window {
            if yield_core {
                tch::set_num_threads(if checkpointer.saving() { (threads - 1).max(1) } else { threads });
            }
            step();
            checkpointer.poll(&runtime, &mut metrics).unwrap();
        }
        checkpointer.finish(&runtime, &mut metrics).unwrap();
        let took = started.elapsed().as_secs_f64();
        if save {
            with_save.push(took);
            saving.push(checkpointer.saves.last().unwrap().seconds);
        } else {
            alone.push(took);
        }
    }
    let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
    let step_s = mean(&alone) / window as f64;
    let stalls: Vec<f64> = with_save.iter().zip(&alone).map(|(with, without)| with - without).collect();
    let stall = mean(&stalls);
    let spread = (stalls.iter().map(|s| (s - stall).powi(2)).sum::<f64>() / (stalls.len() - 1) as f64).sqrt()
        / (stalls.len() as f64).sqrt();
    println!(
        "B7 CPU step {step_s:.2} s (batch 1, 224 px, {threads} of {cores} cores); {pairs} pairs of windows of {window} steps alone {} s, with a save {} s \
         (the save took {} s beside training, blocking it {} s): stall {stall:.2} s = {:.2} ± {:.2} steps \
         (per window: {} steps)",
        list(&alone, 1),
        list(&with_save, 1),
        list(&saving, 1),
        list(&blocked, 2),
        stall / step_s,
        spread / step_s,
        list(&stalls.iter().map(|s| s / step_s).collect::<Vec<_>>(), 2),
    );
    let _ = std::fs::remove_dir_all(&dir);
}
