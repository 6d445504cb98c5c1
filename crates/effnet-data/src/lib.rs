//! Parquet image datasets: format, manifest, `prepare` converters, shard plans, the streaming
//! reader and its resumable cursor.
//!
//! # Layout
//! - [`manifest`]: `_manifest.json`, written last, checksummed.
//! - [`plan`]: per-epoch shard plans over row groups, the shuffle buffer, and the
//!   [`plan::DataCursor`] that makes resume exactly-once at any world size.
//! - [`rng`]: the crate's own SplitMix64, so orders never change with a dependency.

pub mod error;
pub mod loader;
pub mod manifest;
pub mod panics;
pub mod plan;
pub mod prepare;
pub mod reader;
pub mod rng;
pub mod writer;

pub use error::{Error, Result};
pub use manifest::Manifest;
pub use plan::{DataCursor, EpochPlan, RankCursor, RankWork, RowGroupRef, SampleRef, WorkUnit};
