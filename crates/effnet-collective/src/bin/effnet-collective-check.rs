//! Run the collective conformance suite on every rank of a launch:
//!
//!   mpirun -n 2 effnet-collective-check --backend mpi
//!   RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 effnet-collective-check --backend nccl
//!
//! Each rank prints one JSON line (or, with `--out DIR`, writes `DIR/rank-N.json`, since mpirun
//! may interleave long lines of several ranks): its rank, the backend, and every case with
//! pass/fail. Exit 0
//! when every case passed on this rank, 1 when one failed, 2 on bad arguments, 3 when a
//! collective failed (timeout, dead peer, missing library), with the error on one line.
//!
//! `--kill-rank R` makes rank R kill itself (SIGKILL) half a second after the others enter an
//! all-reduce: the fault test. `--bandwidth` adds all-reduce timings at a few sizes.

use std::time::Duration;

use effnet_collective::{Backend, Collective, Mpi, Nccl, ReduceOp, WorldInfo, conformance, rendezvous};

struct Args {
    backend: Backend,
    timeout: Duration,
    kill_rank: Option<usize>,
    bandwidth: bool,
    out: Option<std::path::PathBuf>,
}

fn usage(message: &str) -> ! {
    eprintln!("effnet-collective-check: {message}");
    eprintln!(
        "usage: effnet-collective-check --backend mpi|nccl [--timeout-s N] [--kill-rank R] [--bandwidth] [--out DIR]"
    );
    std::process::exit(2);
}

fn parse() -> Args {
    let mut args = Args {
        backend: Backend::Mpi,
        timeout: Duration::from_secs(60),
        kill_rank: None,
        bandwidth: false,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().unwrap_or_else(|| usage(&format!("{name} needs a value")));
        match arg.as_str() {
            "--backend" => {
                args.backend = match value("--backend").as_str() {
                    "mpi" => Backend::Mpi,
                    "nccl" => Backend::Nccl,
                    other => usage(&format!("--backend must be mpi or nccl, got {other:?}")),
                }
            }
            "--timeout-s" => {
                let v = value("--timeout-s");
                let seconds: f64 =
                    v.parse().unwrap_or_else(|_| usage(&format!("--timeout-s: not a number: {v:?}")));
                args.timeout = Duration::from_secs_f64(seconds);
            }
            "--kill-rank" => {
                let v = value("--kill-rank");
                args.kill_rank =
                    Some(v.parse().unwrap_or_else(|_| usage(&format!("--kill-rank: not a rank: {v:?}"))));
            }
            "--bandwidth" => args.bandwidth = true,
            "--out" => args.out = Some(value("--out").into()),
            "-h" | "--help" => usage("run the collective conformance suite on this rank"),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    args
}

/// One line on stderr in a single write: the ranks share mpirun's stderr, and a line written in
/// pieces can interleave with another rank's.
fn report_line(line: String) {
    use std::io::Write as _;
    let _ = std::io::stderr().write_all(format!("effnet-collective-check: {line}\n").as_bytes());
}

fn fail(rank: Option<usize>, error: impl std::fmt::Display) -> ! {
    match rank {
        Some(rank) => report_line(format!("rank {rank}: {error}")),
        None => report_line(error.to_string()),
    }
    std::process::exit(3);
}

fn main() {
    let args = parse();
    let collective: Box<dyn Collective> = match args.backend {
        Backend::Mpi => Box::new(Mpi::init(args.timeout).unwrap_or_else(|e| fail(None, e))),
        Backend::Nccl => {
            let info = WorldInfo::from_env().unwrap_or_else(|e| fail(None, e));
            // Without EFFNET_RENDEZVOUS_TOKEN every check run shares this token: the check has
            // no job to derive one from.
            let rendezvous = rendezvous::Tcp::from_env("effnet-collective-check");
            Box::new(
                Nccl::init(&info, &rendezvous, args.timeout).unwrap_or_else(|e| fail(Some(info.rank), e)),
            )
        }
    };
    let rank = collective.rank();
    if let Some(victim) = args.kill_rank {
        // Everyone meets once, then the victim dies while the others wait in an all-reduce.
        collective.barrier().unwrap_or_else(|e| fail(Some(rank), e));
        if rank == victim {
            std::thread::sleep(Duration::from_millis(500));
            // SAFETY: raising SIGKILL on this process.
            unsafe {
                libc_kill_self();
            }
        }
        let mut buffer = vec![1.0f32; 1000];
        let started = std::time::Instant::now();
        match collective.all_reduce((&mut buffer[..]).into(), ReduceOp::Sum) {
            Ok(()) => fail(Some(rank), "the all-reduce completed although a rank was killed"),
            Err(error) => {
                report_line(format!(
                    "rank {rank}: {error} (noticed after {:.1} s)",
                    started.elapsed().as_secs_f64()
                ));
                collective.abort(3);
                std::process::exit(3);
            }
        }
    }
    let cases = conformance::run(collective.as_ref()).unwrap_or_else(|e| {
        collective.abort(3);
        fail(Some(rank), e)
    });
    let mut bandwidth = Vec::new();
    if args.bandwidth {
        for elements in [1usize << 10, 1 << 16, 1 << 20, conformance::BUCKET_ELEMENTS] {
            let iterations = if elements >= 1 << 20 { 10 } else { 100 };
            let (seconds, bus_gb_s) = conformance::bandwidth(collective.as_ref(), elements, iterations)
                .unwrap_or_else(|e| fail(Some(rank), e));
            bandwidth
                .push(serde_json::json!({ "bytes": elements * 4, "seconds": seconds, "bus_gb_s": bus_gb_s }));
        }
    }
    let passed = cases.iter().all(|c| c.passed);
    let report = serde_json::json!({
        "rank": rank,
        "world_size": collective.world_size(),
        "backend": collective.backend(),
        "passed": passed,
        "cases": cases,
        "bandwidth": bandwidth,
    });
    match &args.out {
        Some(dir) => {
            let path = dir.join(format!("rank-{rank}.json"));
            std::fs::write(&path, report.to_string())
                .unwrap_or_else(|e| fail(Some(rank), format!("{}: {e}", path.display())));
        }
        None => println!("{report}"),
    }
    drop(collective);
    std::process::exit(if passed { 0 } else { 1 });
}

unsafe extern "C" {
    fn getpid() -> i32;
    fn kill(pid: i32, signal: i32) -> i32;
}

/// SIGKILL this process (no libc crate needed for two calls).
unsafe fn libc_kill_self() {
    // SAFETY: plain syscalls on our own pid.
    unsafe {
        kill(getpid(), 9);
    }
}
