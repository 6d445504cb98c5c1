//! Scale check of issue 14: many simulated workers heartbeating at 1 Hz against one coordinator.
//!
//! The coordinator runs as its own OS process (`effnet coordinator` on 127.0.0.1:0 with a
//! temporary state directory and token file), so its CPU time can be read from
//! `/proc/<pid>/stat`. This process is the load generator: one current-thread tokio runtime and
//! the crate's [`Client`] (reqwest, one keep-alive connection pool shared by every simulated
//! worker). It submits one job whose `distributed.workers` is the worker count, joins that many
//! workers (the generation runs when the last one joins), then each worker heartbeats once a
//! second with progress (a new step each time, so every heartbeat also writes a progress row),
//! starting at a random phase so the load is spread over the second. After a warm-up, every
//! heartbeat sent inside the measurement window is timed (send to parsed answer).
//!
//! Prints requests/s, p50/p90/p99/max latency, and the CPU share of one core of the
//! coordinator, of this load generator and of everything else on the machine over the window,
//! then one JSON line with the same figures. Run by `scripts/bench-coordinator.sh`:
//!
//! ```text
//! COORD_BENCH_EFFNET=target/release/effnet   the effnet binary (required; absolute, or relative
//!                                            to the directory the bench runs in)
//! COORD_BENCH_WORKERS=1000                   simulated workers (one job of that many ranks)
//! COORD_BENCH_WARMUP_S=5 COORD_BENCH_MEASURE_S=30
//! COORD_BENCH_INTERVAL_MS=1000               each worker's heartbeat period
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use effnet_coordinator::Client;
use effnet_coordinator::protocol::{Action, JobStart, JoinRequest, Progress};

const TOKEN: &str = "bench-token";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text.parse().unwrap_or_else(|_| panic!("{name}={text:?} is not a valid value")),
        Err(_) => default,
    }
}

/// The coordinator process; killed if the bench panics before stopping it.
struct Coordinator {
    child: Child,
    url: String,
}

impl Coordinator {
    fn start(effnet: &Path, state_dir: &Path, token_file: &Path, log: &Path) -> Coordinator {
        let log_file = std::fs::File::create(log).expect("creating the coordinator log");
        let mut child = Command::new(effnet)
            .args(["coordinator", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state_dir)
            .arg("--token-file")
            .arg(token_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|error| panic!("starting {}: {error}", effnet.display()));
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        BufReader::new(stdout).read_line(&mut line).expect("reading the coordinator's first line");
        // "coordinator listening on http://ADDR (state in DIR)"
        let url = line
            .split_whitespace()
            .find(|word| word.starts_with("http://"))
            .unwrap_or_else(|| {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                panic!("the coordinator did not say where it listens: {line:?}\n{log}")
            })
            .to_string();
        Coordinator { child, url }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM (the coordinator finishes the requests in flight), then waits.
    fn stop(mut self) {
        let terminated = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .is_ok_and(|status| status.success());
        if !terminated {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Clock ticks per second of `/proc/*/stat` (USER_HZ, 100 on Linux unless `getconf` says else).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, all its threads, in clock ticks.
fn process_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc/PID/stat");
    // The command name (field 2) may hold spaces; the fields after its ')' start at field 3.
    let rest = &stat[stat.rfind(')').expect("/proc/PID/stat has a ')'") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields[n - 3].parse::<u64>().expect("a tick count");
    field(14) + field(15)
}

/// Busy and total ticks of the whole machine (all cores), from `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("reading /proc/stat");
    let cpu = stat.lines().next().expect("/proc/stat's first line");
    let values: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let total: u64 = values.iter().take(8).sum();
    let idle = values[3] + values.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// splitmix64: the workers' phases, reproducible without a dependency.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[index.clamp(1, sorted.len()) - 1]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// What one simulated worker saw inside the measurement window.
#[derive(Default)]
struct WorkerLog {
    latencies: Vec<Duration>,
    errors: u64,
    not_train: u64,
}

fn main() {
    let effnet = PathBuf::from(
        std::env::var("COORD_BENCH_EFFNET")
            .expect("COORD_BENCH_EFFNET: the effnet binary to run the coordinator with"),
    );
    let workers: u32 = env_or("COORD_BENCH_WORKERS", 1000);
    let warmup = Duration::from_secs_f64(env_or("COORD_BENCH_WARMUP_S", 5.0));
    let measure = Duration::from_secs_f64(env_or("COORD_BENCH_MEASURE_S", 30.0));
    let interval = Duration::from_millis(env_or("COORD_BENCH_INTERVAL_MS", 1000));

    let dir = tempfile::tempdir().expect("a temporary directory");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("writing the token file");
    let log = dir.path().join("coordinator.log");
    let coordinator = Coordinator::start(&effnet, &dir.path().join("state"), &token_file, &log);
    let pid = coordinator.pid().to_string();

    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    let outcome = runtime.block_on(drive(&coordinator.url, &pid, workers, warmup, measure, interval));
    coordinator.stop();
    let Outcome { mut latencies, errors, not_train, window, coordinator_ticks, own_ticks, machine } = outcome;

    let ticks = clock_ticks();
    let seconds = window.as_secs_f64();
    let coordinator_cpu = coordinator_ticks as f64 / ticks / seconds;
    let generator_cpu = own_ticks as f64 / ticks / seconds;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let (machine_busy, machine_total) = machine;
    // /proc/stat's ticks are summed over cores: busy share of the machine × cores = cores busy.
    let machine_cpu = machine_busy as f64 / machine_total.max(1) as f64 * cores;
    let other_cpu = (machine_cpu - coordinator_cpu - generator_cpu).max(0.0);
    latencies.sort_unstable();
    let requests = latencies.len();
    let (p50, p90, p99, max) = (
        percentile(&latencies, 50.0),
        percentile(&latencies, 90.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or_default(),
    );
    let mean = latencies.iter().sum::<Duration>().checked_div(requests.max(1) as u32).unwrap_or_default();
    let rate = requests as f64 / seconds;

    println!(
        "{workers} workers heartbeating every {} ms, {:.1} s measured after {:.1} s warm-up",
        interval.as_millis(),
        seconds,
        warmup.as_secs_f64()
    );
    println!("requests: {requests} answered ({rate:.1}/s), {errors} failed, {not_train} not \"train\"");
    println!(
        "latency: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms, mean {:.2} ms",
        ms(p50),
        ms(p90),
        ms(p99),
        ms(max),
        ms(mean)
    );
    println!(
        "CPU (share of one core): coordinator {:.1}%, load generator {:.1}%, rest of the machine {:.1}% ({cores} cores)",
        coordinator_cpu * 100.0,
        generator_cpu * 100.0,
        other_cpu * 100.0
    );
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "target p99 < 10 ms: {}; coordinator < 10% of a core: {}",
        verdict(ms(p99) < 10.0),
        verdict(coordinator_cpu < 0.10)
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "coordinator-heartbeats",
            "workers": workers,
            "interval_ms": interval.as_millis() as u64,
            "warmup_s": warmup.as_secs_f64(),
            "measure_s": seconds,
            "requests": requests,
            "requests_per_s": rate,
            "errors": errors,
            "not_train": not_train,
            "p50_ms": ms(p50),
            "p90_ms": ms(p90),
            "p99_ms": ms(p99),
            "max_ms": ms(max),
            "mean_ms": ms(mean),
            "coordinator_cpu": coordinator_cpu,
            "load_generator_cpu": generator_cpu,
            "other_cpu": other_cpu,
            "cores": cores,
        })
    );
    if errors > 0 || requests == 0 {
        eprintln!("coordinator log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::process::exit(1);
    }
}

struct Outcome {
    latencies: Vec<Duration>,
    errors: u64,
    not_train: u64,
    window: Duration,
    coordinator_ticks: u64,
    own_ticks: u64,
    machine: (u64, u64),
}

async fn drive(
    url: &str,
    pid: &str,
    workers: u32,
    warmup: Duration,
    measure: Duration,
    interval: Duration,
) -> Outcome {
    let client = Client::new(url, TOKEN).expect("a client");
    let yaml = format!(
        "name: bench\nmodel: {{variant: b0}}\ndata: {{train: memory://bench/train}}\ndistributed: {{workers: {workers}}}\n"
    );
    let job = client.submit(&yaml, "bench.yaml", &JobStart::Latest).await.expect("submitting the job").id;
    let joining = Instant::now();
    let mut ids = Vec::with_capacity(workers as usize);
    for n in 0..workers {
        let request = JoinRequest { host: Some(format!("sim-{n}")), ..JoinRequest::default() };
        ids.push(client.join(&job, &request).await.expect("joining").worker_id);
    }
    eprintln!("{workers} workers joined job {job} in {:.2} s", joining.elapsed().as_secs_f64());

    let start = tokio::time::Instant::now();
    let window_start = start + warmup;
    let window_end = window_start + measure;
    let mut seed = 0x5EED_u64;
    let mut tasks = Vec::with_capacity(ids.len());
    for (rank, worker) in ids.into_iter().enumerate() {
        let phase = Duration::from_nanos(splitmix(&mut seed) % interval.as_nanos().max(1) as u64);
        let (client, job) = (client.clone(), job.clone());
        tasks.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(start + phase, interval);
            // A late heartbeat is sent at once and the next one a period after it, as a worker would.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut log = WorkerLog::default();
            let mut step = 0u64;
            loop {
                let due = ticks.tick().await;
                if due >= window_end {
                    break;
                }
                step += 1;
                let progress = Progress {
                    step: Some(step),
                    epoch: Some(step as f64 / 500.0),
                    images_per_s: Some(400.0 + (rank % 7) as f64),
                    loss: Some(2.3 / (1.0 + step as f64 / 100.0)),
                    checkpoint: None,
                };
                let sent = tokio::time::Instant::now();
                let answer = client.heartbeat(&job, &worker, &progress).await;
                let took = sent.elapsed();
                if sent < window_start {
                    continue;
                }
                match answer {
                    Ok(answer) => {
                        log.latencies.push(took);
                        if answer.action != Action::Train {
                            log.not_train += 1;
                        }
                    }
                    Err(error) => {
                        if log.errors == 0 {
                            eprintln!("worker {worker}: {error}");
                        }
                        log.errors += 1;
                    }
                }
            }
            log
        }));
    }

    tokio::time::sleep_until(window_start).await;
    let (coordinator_before, own_before, machine_before) =
        (process_ticks(pid), process_ticks("self"), machine_ticks());
    let measured_from = Instant::now();
    tokio::time::sleep_until(window_end).await;
    let (coordinator_after, own_after, machine_after) =
        (process_ticks(pid), process_ticks("self"), machine_ticks());
    let window = measured_from.elapsed();

    let mut outcome = Outcome {
        latencies: Vec::new(),
        errors: 0,
        not_train: 0,
        window,
        coordinator_ticks: coordinator_after - coordinator_before,
        own_ticks: own_after - own_before,
        machine: (machine_after.0 - machine_before.0, machine_after.1 - machine_before.1),
    };
    for task in tasks {
        let log = task.await.expect("a simulated worker");
        outcome.latencies.extend(log.latencies);
        outcome.errors += log.errors;
        outcome.not_train += log.not_train;
    }
    outcome
}
