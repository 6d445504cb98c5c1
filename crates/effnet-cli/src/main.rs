//! The `effnet` binary: parse arguments, set up logging, run one command, map the outcome to an
//! exit status (0 success, 2 bad input with a one-line reason, 1 anything else).

/// `println!` for a command's output that may be piped into `head` or a pager: when the reader has
/// gone (broken pipe) the command stops quietly with status 0; any other write error (a full
/// disk, an I/O error) is one `error:` line on stderr and status 1, never a panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(error) = writeln!(std::io::stdout().lock(), $($arg)*) {
            $crate::stdout_failed(error);
        }
    }};
}

mod commands;
mod failure;
mod logging;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::failure::exit_code;
use crate::logging::LogFormat;

/// Train EfficientNet B0–B7 data-parallel from Parquet datasets in object storage.
#[derive(Debug, Parser)]
#[command(name = "effnet", version, about, propagate_version = true)]
struct Cli {
    /// Log format on stderr; the level comes from RUST_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a job (YAML), resuming from its newest committed checkpoint; launches
    /// `distributed.workers` worker processes when there are several.
    Run(commands::run::RunArgs),
    /// One rank of a data-parallel job, started by a launcher (mpirun, srun, or RANK/WORLD_SIZE).
    Worker(commands::run::WorkerArgs),
    /// Serve the coordinator: jobs, generations of workers, heartbeats, a status page and
    /// /metrics over HTTP/JSON, state in SQLite under --state-dir.
    Coordinator(commands::coordinator::CoordinatorArgs),
    /// Check a job file like `run --check` does its spec, then submit it to a coordinator; prints the job id.
    Submit(commands::coordinator::SubmitArgs),
    /// The coordinator's jobs, or one job's generations and workers.
    Status(commands::coordinator::StatusArgs),
    /// Cancel a job on the coordinator; its workers are told to stop.
    Cancel(commands::coordinator::CancelArgs),
    /// For engines: the job's workers failed; end its generation now so the next launch
    /// restarts it (`--give-up`: fail the job).
    Restart(commands::coordinator::RestartArgs),
    /// A job's newest progress records (step, epoch, throughput, loss per rank) from the coordinator.
    Logs(commands::coordinator::LogsArgs),
    /// Evaluate a committed checkpoint on a dataset: top-1/top-5, loss, per-class accuracy,
    /// confusion matrix, parameters, GFLOPs, throughput, peak memory.
    Eval(commands::eval::EvalArgs),
    /// The benchmark report of job directories: accuracy against parameters and FLOPs beside the
    /// paper's Table 2, training curves, restarts, checkpoints (report.md, report.html, report.json).
    Report(commands::report::ReportArgs),
    /// Inspect EfficientNet variants and run inference with saved weights.
    #[command(subcommand)]
    Model(commands::model::ModelCommand),
    /// Run a pipeline: stages (prepare, train jobs, report) in order, each skipped when its
    /// outputs exist (`pipelines/`).
    #[command(subcommand)]
    Pipeline(commands::pipeline::PipelineCommand),
    /// Convert idx files, Fashion-MNIST or an image folder into a Parquet dataset.
    Prepare(commands::data::PrepareArgs),
    /// Inspect or verify a dataset.
    #[command(subcommand)]
    Data(commands::data::DataCommand),
}

/// What [`out!`] does when stdout cannot be written: exits, quietly (0) when the reader has gone,
/// with one error line (1) otherwise.
fn stdout_failed(error: std::io::Error) -> ! {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    print_error_line(&format!("writing to stdout: {error}"));
    std::process::exit(1);
}

/// `error: <message>` on stderr in one write: the workers of a group share a terminal or
/// mpirun's stderr, and a line written in pieces can interleave with another worker's. The
/// message is made one line and its URLs redacted (error messages of other libraries quote the
/// URLs they were given, credentials included).
fn print_error_line(message: &str) {
    use std::io::Write as _;
    let message = effnet_store::redact_text(&message.replace('\n', " "));
    let _ = std::io::stderr().write_all(format!("error: {message}\n").as_bytes());
}

/// Where users report a bug: the repository's issues (workspace.package.repository).
const REPORT_URL: &str = concat!(env!("CARGO_PKG_REPOSITORY"), "/issues");

/// Turns any panic, on the main thread or another, into one line and exit status 1.
///
/// The hook exits the process itself instead of letting the panic unwind, for three reasons:
/// a panic on a loader, I/O or collective thread would otherwise leave the main thread waiting
/// on a channel or a peer (a hang, or a later and misleading error); the only `catch_unwind`
/// users (effnet-train's autograd callbacks) catch only so that unwinding never crosses into
/// libtorch, not to recover, and exiting keeps that promise too; and the first panic is the one
/// worth reporting. Destructors do not run, which is safe here: checkpoints and datasets count
/// only once their commit marker is written, so an interrupted write is never taken as whole.
/// With `RUST_BACKTRACE` set (not 0) the backtrace follows the line, for developers.
fn install_panic_hook() {
    static PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    std::panic::set_hook(Box::new(|info| {
        // A panic the data reader catches and reports as a corrupt file (parquet-rs panics on
        // some corrupt pages) is not ours to end the process for.
        if effnet_data::panics::expected() {
            return;
        }
        // One line even when threads panic together: the first reports and exits, the others
        // wait for the exit.
        if PANICKED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            loop {
                std::thread::park();
            }
        }
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("a panic without a message");
        let backtrace = || {
            let backtrace = std::backtrace::Backtrace::capture();
            if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
                eprintln!("{backtrace}");
            }
        };
        // Running out of memory is not a bug to report but a job too large for the machine:
        // libtorch's allocator error, without its C++ stack, and what to change. Status 2, as
        // for any input the user must change: a restart would only run out again.
        if let Some(allocator) = out_of_memory(message) {
            print_error_line(&format!("out of memory: {allocator}; {OUT_OF_MEMORY_ADVICE}"));
            backtrace();
            std::process::exit(2);
        }
        let place = info.location().map(|l| format!(" (at {}:{})", l.file(), l.line())).unwrap_or_default();
        print_error_line(&format!("internal error: {message}{place}; please report it at {REPORT_URL}"));
        backtrace();
        std::process::exit(1);
    }));
}

const OUT_OF_MEMORY_ADVICE: &str = "the model, batch or resolution needs more memory than this machine \
    has: lower data.batch_size (optimizer.accumulate_steps keeps the global batch), set \
    model.activation_checkpointing: true, or choose a smaller model or resolution";

/// libtorch's out-of-memory error inside a panic's message (tch panics with libtorch's error on
/// a failed allocation): the allocator's sentence, up to the C++ stack that follows it. On a CPU
/// `DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes. Error code 12
/// (Cannot allocate memory)`; on a GPU `CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has
/// a total capacity of ...`.
fn out_of_memory(message: &str) -> Option<&str> {
    let start = ["DefaultCPUAllocator:", "CUDA out of memory", "CUDA error: out of memory"]
        .iter()
        .filter_map(|marker| message.find(marker))
        .min()?;
    let rest = &message[start..];
    // The C++ stack follows on the next line: a newline, or `\n` where tch's error was
    // debug-formatted into the panic message.
    let end = ["\n", "\\n", "\")"].iter().filter_map(|marker| rest.find(marker)).min().unwrap_or(rest.len());
    Some(rest[..end].trim_end())
}

/// A panic on purpose, for the tests of the panic hook: `EFFNET_TEST_PANIC=main` panics on the
/// main thread, `EFFNET_TEST_PANIC=thread` on a spawned one (whose panic would otherwise only end
/// that thread), `EFFNET_TEST_PANIC=caught` inside the data reader's [`effnet_data::panics::catching`]
/// (which must not end the process). No command of the tool panics on any input the tests know of, so they need one
/// made to order; unset, this does nothing.
fn panic_if_asked() {
    match std::env::var("EFFNET_TEST_PANIC").as_deref() {
        Ok("main") => panic!("EFFNET_TEST_PANIC asked for a panic on the main thread"),
        Ok("caught") => {
            // A panic inside the data reader's catching, as a corrupt Parquet page raises one:
            // the hook leaves it to the reader, and the command goes on.
            let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
            let caught = runtime.block_on(effnet_data::panics::catching(async {
                panic!("EFFNET_TEST_PANIC asked for a caught panic")
            }));
            assert!(caught.is_err());
            eprintln!("the caught panic was handled");
        }
        Ok("thread") => {
            let panicked =
                std::thread::spawn(|| panic!("EFFNET_TEST_PANIC asked for a panic on a thread")).join();
            // Not reached: the hook exits the process first.
            drop(panicked);
        }
        _ => {}
    }
}

fn main() -> ExitCode {
    install_panic_hook();
    panic_if_asked();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return failure::report_clap_error(error),
    };
    logging::init(cli.log_format);
    let outcome = match cli.command {
        Command::Run(args) => commands::run::run(args),
        Command::Worker(args) => commands::run::worker(args),
        Command::Coordinator(args) => commands::coordinator::serve(args),
        Command::Submit(args) => commands::coordinator::submit(args),
        Command::Status(args) => commands::coordinator::status(args),
        Command::Cancel(args) => commands::coordinator::cancel(args),
        Command::Restart(args) => commands::coordinator::restart(args),
        Command::Logs(args) => commands::coordinator::logs(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Report(args) => commands::report::run(args),
        Command::Pipeline(command) => commands::pipeline::run(command),
        Command::Model(command) => commands::model::run(command),
        Command::Prepare(args) => commands::data::prepare(args),
        Command::Data(command) => commands::data::run(command),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` joins the context chain on one line.
            print_error_line(&format!("{error:#}"));
            ExitCode::from(exit_code(&error))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::out_of_memory;

    #[test]
    fn out_of_memory_is_the_allocators_sentence_without_the_stack() {
        // As tch's unwrap formats libtorch's CUDA error into a panic (PyTorch 2.x's wording).
        let cuda = r#"called `Result::unwrap()` on an `Err` value: Torch("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.80 GiB of which 1.06 GiB is free. Of the allocated memory 135.12 GiB is allocated by PyTorch.\nException raised from malloc at /pytorch/c10/cuda/CUDACachingAllocator.cpp:1131 (most recent call first):\nframe #0: c10::Error::Error(...)")"#;
        assert_eq!(
            out_of_memory(cuda),
            Some(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.80 GiB \
                 of which 1.06 GiB is free. Of the allocated memory 135.12 GiB is allocated by PyTorch."
            )
        );
        // Our own error's Display (activation checkpointing's panic): real newlines.
        let cpu = "activation checkpointing: libtorch: [enforce fail at alloc_cpu.cpp:127] err == 0. \
                   DefaultCPUAllocator: can't allocate memory: you tried to allocate 64 bytes.\nframe #0: x";
        assert_eq!(
            out_of_memory(cpu),
            Some("DefaultCPUAllocator: can't allocate memory: you tried to allocate 64 bytes.")
        );
        assert_eq!(out_of_memory(r#"Torch("CUDA error: out of memory")"#), Some("CUDA error: out of memory"));
        assert_eq!(out_of_memory("index out of bounds: the len is 3"), None);
    }
}
