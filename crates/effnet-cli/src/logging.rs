//! tracing set-up: RUST_LOG filter (default `info`), pretty or JSON lines on stderr, with the
//! credentials of any URL in a line redacted.

use std::io::Write;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(|| RedactingStderr);
    let result = match format {
        LogFormat::Pretty => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
    // A second init (tests) is harmless.
    drop(result);
}

/// stderr, with every URL in what is written passed through `effnet_store::redact_text`: call
/// sites redact the URLs they log, and this catches the rest (a library's error message that
/// quotes a URL, a field someone forgot). tracing's formatter writes each event with one
/// `write_all`, so a URL is never split between two writes.
struct RedactingStderr;

impl Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) if text.contains("://") => {
                std::io::stderr().write_all(effnet_store::redact_text(text).as_bytes())?
            }
            _ => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
