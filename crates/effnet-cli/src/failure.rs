//! Exit statuses: 2 for bad input (arguments, config, files the user named), [`RESTART_EXIT`]
//! for a coordinator's worker whose generation must restart, 1 otherwise.

use std::process::ExitCode;

/// An error caused by what the user passed in.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// Shorthand for a bad-input error with a formatted message.
macro_rules! bad_input {
    ($($arg:tt)*) => { anyhow::Error::new($crate::failure::BadInput(format!($($arg)*))) };
}
pub(crate) use bad_input;

/// The exit status of a worker whose generation ended while the job goes on (a peer died or
/// went silent, a collective failed): the engine that launched it relaunches it (`effnet run`,
/// a Slurm step loop, a Kubernetes restart policy). 75 is sysexits' EX_TEMPFAIL.
pub const RESTART_EXIT: u8 = 75;

/// This worker's generation must restart; see [`RESTART_EXIT`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Restart(pub String);

/// A launched worker group failed; each worker already printed its own error.
#[derive(Debug, thiserror::Error)]
#[error("the worker group failed (exit status {code})")]
pub struct WorkersFailed {
    pub code: i32,
}

pub fn exit_code(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if cause.downcast_ref::<Restart>().is_some() {
            return RESTART_EXIT;
        }
        if let Some(failed) = cause.downcast_ref::<WorkersFailed>() {
            return u8::try_from(failed.code).ok().filter(|c| *c != 0).unwrap_or(1);
        }
        if cause.downcast_ref::<BadInput>().is_some() {
            return 2;
        }
        if cause.downcast_ref::<effnet_config::ConfigError>().is_some() {
            return 2;
        }
        if let Some(train_error) = cause.downcast_ref::<effnet_train::Error>() {
            return if train_error.is_bad_input() { 2 } else { 1 };
        }
        if let Some(model_error) = cause.downcast_ref::<effnet_model::Error>() {
            return if model_error.is_bad_input() { 2 } else { 1 };
        }
        // An unknown variant or BatchNorm style, or a phi or coefficient out of range.
        if cause.downcast_ref::<effnet_scaling::Error>().is_some() {
            return 2;
        }
        if let Some(data_error) = cause.downcast_ref::<effnet_data::Error>() {
            return if data_error.is_bad_input() { 2 } else { 1 };
        }
        if let Some(report_error) = cause.downcast_ref::<effnet_report::Error>() {
            return match report_error {
                effnet_report::Error::Job { .. } => 2,
                effnet_report::Error::Io { .. } => 1,
            };
        }
        if let Some(client_error) = cause.downcast_ref::<effnet_coordinator::ClientError>() {
            return if client_error.is_bad_input() { 2 } else { 1 };
        }
        if let Some(coordinator_error) = cause.downcast_ref::<effnet_coordinator::Error>() {
            // The state directory is named by the user (--state-dir); the database is not.
            let bad = matches!(coordinator_error, effnet_coordinator::Error::StateDir { .. })
                || (400..500).contains(&coordinator_error.status());
            return if bad { 2 } else { 1 };
        }
        if let Some(store_error) = cause.downcast_ref::<effnet_store::Error>() {
            return if store_error.is_bad_input() { 2 } else { 1 };
        }
    }
    1
}

/// clap prints usage blocks; keep the contract of one line on stderr and status 2, except for
/// `--help` / `--version`, which print in full and succeed.
pub fn report_clap_error(error: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match error.kind() {
        // Help and version go to stdout, and a failed write there fails as any command's output
        // does: quietly with 0 when the reader has gone, with one error line and 1 otherwise.
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => match error.print() {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: writing to stdout: {error}");
                ExitCode::from(1)
            }
        },
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
            let _ = error.print();
            ExitCode::from(2)
        }
        _ => {
            let rendered = error.render().to_string();
            let mut lines = rendered.lines().skip_while(|l| l.trim().is_empty());
            let mut line = lines.next().unwrap_or("error: invalid arguments").trim_end().to_string();
            // "the following required arguments were not provided:" lists them on the next lines.
            if line.ends_with(':') {
                let listed: Vec<&str> = lines.take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
                line = format!("{line} {}", listed.join(", "));
            }
            eprintln!("{line}");
            ExitCode::from(2)
        }
    }
}
