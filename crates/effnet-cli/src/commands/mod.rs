pub mod coordinator;
pub mod data;
pub mod eval;
pub mod local;
pub mod model;
pub mod pipeline;
pub mod report;
pub mod run;
pub mod worker;

use crate::failure::bad_input;

/// A count flag (classes, batch size, rows per group...): a whole number from 1 to u32::MAX.
/// Flags are parsed as i64 so a negative value gets this message rather than clap's.
pub(crate) fn positive_u32(flag: &str, value: i64) -> anyhow::Result<u32> {
    u32::try_from(value)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| bad_input!("{flag} must be a whole number from 1 to {}, got {value}", u32::MAX))
}
