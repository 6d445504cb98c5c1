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
        let place = info.location().map(|l| format!(" (at {}:{})", l.file(), l.line())).unwrap_or_default();
        print_error_line(&format!("internal error: {message}{place}; please report it at {REPORT_URL}"));
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            eprintln!("{backtrace}");
        }
        std::process::exit(1);
    }));
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
