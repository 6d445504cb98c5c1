//! The CLI's integration tests, in one test binary: each links the whole trainer with libtorch,
//! so one binary instead of one per file saves a link and several hundred MB of disk per file.
//! Run one file's tests with `cargo test -p effnet-cli --test cli train::`.

mod common;

mod checkpointing;
mod cli;
mod configs;
mod container;
mod coordinator;
mod data;
mod distributed;
mod eval;
mod exactly_once;
mod faults;
mod k8s;
mod overrides;
mod parity;
mod pipeline;
mod report;
mod secrets;
mod slurm;
mod train;
mod variants;
