//! The `effnet` binary: parse arguments, set up logging, run one command, map the outcome to an
//! exit status (0 success, 2 bad input with a one-line reason, 1 anything else).

/// `println!` for a command's output that may be piped into `head` or a pager: when the reader has
/// gone (broken pipe) the command stops quietly with status 0 instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(error) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            panic!("writing to stdout: {error}");
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

fn main() -> ExitCode {
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
            let message = format!("{error:#}").replace('\n', " ");
            // One write: the workers of a group share a terminal or mpirun's stderr, and a line
            // written in pieces can interleave with another worker's.
            use std::io::Write as _;
            let _ = std::io::stderr().write_all(format!("error: {message}\n").as_bytes());
            ExitCode::from(exit_code(&error))
        }
    }
}
